//! A TCP connection from a chosen local address: std cannot bind a client socket before
//! connecting. Shared by the namespace tests (`common`) and the stock-kernel VM's `rl-traffic`.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

/// Connects from `source` to `addr` (IPv4), with read and write timeouts of `timeout` set before
/// the connect, so they bound it too (SO_SNDTIMEO).
pub fn connect_from(
    source: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let (SocketAddr::V4(dst), IpAddr::V4(src)) = (addr, source) else {
        return Err(std::io::Error::other("connect_from handles IPv4 only"));
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (local, remote) = (sockaddr(src, 0), sockaddr(*dst.ip(), dst.port()));
    // SAFETY: a fresh descriptor, owned by the TcpStream from its creation on; the addresses are
    // valid sockaddr_in values of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let (l, r) = (
            &local as *const _ as *const libc::sockaddr,
            &remote as *const _ as *const libc::sockaddr,
        );
        if libc::bind(fd, l, len) != 0 || libc::connect(fd, r, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
