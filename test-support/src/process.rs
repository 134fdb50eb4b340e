//! Child processes for integration tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for a child to take).
/// No port is handed out twice in one test process: the kernel may offer
/// a just-released port again, and a mesh under test takes many at once.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("an ephemeral port on 127.0.0.1");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Variables every process started from now on gets (a test setting up
/// what the mesh's processes read from their environment, such as the
/// OTLP collector's address, without changing its own).
static CHILD_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Gives every child started after this call `name=value`.
pub fn set_child_env(name: &str, value: &str) {
    let mut env = CHILD_ENV.lock().expect("child env lock");
    env.retain(|(n, _)| n != name);
    env.push((name.to_owned(), value.to_owned()));
}

/// A child process that is killed when the guard is dropped. Its stderr
/// goes to a file, printed when the test fails to help diagnose it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr sent to a log file.
    pub fn spawn(name: &str, mut cmd: Command) -> std::io::Result<Self> {
        cmd.envs(CHILD_ENV.lock().expect("child env lock").iter().cloned());
        let dir = tempfile::tempdir()?;
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything the child wrote, once it has written `needle` (logs
    /// are written asynchronously to what a client sees); none if it has
    /// not within `timeout`.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains(needle) {
                return Some(out);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits up to `timeout` for the child to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- output of {} ---\n{}", self.name, self.output());
        }
    }
}
