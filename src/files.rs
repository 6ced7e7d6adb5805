//! Reading paths an operator or a runtime names (configs, config directories, access logs,
//! policy files, the state file) as hostile input: only regular files, opened without blocking
//! (a FIFO never waits for a writer), and never more than a stated number of bytes (a device
//! like /dev/zero never fills memory).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a path is, in words, when it is not a regular file.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    match () {
        _ if t.is_dir() => "a directory",
        _ if t.is_fifo() => "a FIFO",
        _ if t.is_char_device() => "a character device",
        _ if t.is_block_device() => "a block device",
        _ if t.is_socket() => "a socket",
        _ => "not a regular file",
    }
}

/// Opens `path` for reading when it is a regular file (symlinks are followed: reading through
/// one is harmless). Anything else is an `InvalidInput` error naming what it is.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {}", path.display(), kind_of(&meta)),
        ));
    }
    Ok(file)
}

/// The whole of a regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {} bytes", path.display(), limit),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_never_past_the_limit() {
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "/dev/zero is a character device");
        let e = read_bounded(Path::new("/"), 1).unwrap_err();
        assert_eq!(e.to_string(), "/ is a directory");
        let dir = std::env::temp_dir().join(format!("raylimit-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would wait forever.
        let e = read_bounded(&fifo, 10).unwrap_err();
        assert_eq!(e.to_string(), format!("{} is a FIFO", fifo.display()));
        let big = dir.join("big");
        std::fs::write(&big, [b'x'; 11]).unwrap();
        assert!(read_bounded(&big, 10)
            .unwrap_err()
            .to_string()
            .contains("larger than 10 bytes"));
        assert_eq!(read_bounded(&big, 11).unwrap().len(), 11);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
