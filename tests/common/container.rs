//! A container as raylimit sees one, without a container engine on the machine: a fake Docker
//! Engine API on a unix socket, and a cgroup whose path names the container's id.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::temp_dir;

/// A fake Docker Engine API on a unix socket: lists one container and describes it, with the
/// port bindings given (the JSON of `NetworkSettings.Ports`).
pub struct FakeEngine {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEngine {
    pub fn start(id: &str, name: &str, pid: u32, ports: &str) -> FakeEngine {
        let path = temp_dir("engine").join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, id, name) = (stop.clone(), id.to_string(), name.to_string());
        let ports = ports.to_string();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if req.starts_with("GET /containers/json ") {
                    format!(
                        r#"[{{"Id":"{id}","Names":["/{name}"],"Image":"example/proxy:1","Command":"/bin/sh -c run","State":"running","Status":"Up 2 minutes","Labels":{{}}}}]"#
                    )
                } else if req.starts_with(&format!("GET /containers/{id}/json ")) {
                    format!(
                        r#"{{"Id":"{id}","Name":"/{name}","Path":"/bin/sh","Args":["-c","run"],"State":{{"Status":"running","Pid":{pid}}},"HostConfig":{{"NetworkMode":"bridge"}},"NetworkSettings":{{"Ports":{ports}}}}}"#
                    )
                } else {
                    r#"{"message":"no such thing"}"#.to_string()
                };
                let status = if body.contains("no such thing") {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
        });
        FakeEngine {
            path,
            stop,
            thread: Some(thread),
        }
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.path.display())
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_dir_all(self.path.parent().unwrap());
    }
}

/// A cgroup (v1 `pids` hierarchy) whose path names a container id, as docker's do.
pub struct ContainerCgroup(PathBuf);

impl ContainerCgroup {
    pub fn enter(id: &str, pid: &str) -> ContainerCgroup {
        let parent = PathBuf::from(format!(
            "/sys/fs/cgroup/pids/raylimit-test-{}",
            std::process::id()
        ));
        let dir = parent.join(format!("docker-{id}.scope"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!(
                "cgroups are needed to fake a container: {}: {e}",
                dir.display()
            )
        });
        fs::write(dir.join("cgroup.procs"), pid).unwrap();
        ContainerCgroup(dir)
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // The runtime is killed first (it is declared after this guard), so both are empty.
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir(self.0.parent().unwrap());
    }
}
