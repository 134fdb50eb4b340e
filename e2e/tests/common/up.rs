//! The real `trellis up` as a test harness: started on a mesh file with
//! `--any-ports`, its output collected, its processes found through
//! `<state>/run/*.pid`, stopped with Ctrl-C (and, if a test fails, killed
//! with everything it started).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use trellis_test_support::{binary_dir, server_url, workspace_binary};

/// `trellis up` running with a state directory of its own.
pub struct Up {
    child: Child,
    state: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    /// The h2c edge.
    pub edge: SocketAddr,
    /// The registry.
    pub registry: SocketAddr,
}

impl Up {
    /// Runs `trellis up --file FILE --state-dir STATE --any-ports
    /// --bin-dir <built binaries> EXTRA...` with `env` added (and
    /// `RUST_LOG` removed), and waits up to `limit` for its `edge:` line.
    pub fn start(
        file: &Path,
        state: &Path,
        extra: &[&str],
        env: &[(&str, String)],
        limit: Duration,
    ) -> Self {
        let mut command = Command::new(workspace_binary("trellis"));
        command
            .args(["up", "--any-ports"])
            .arg("--file")
            .arg(file)
            .arg("--state-dir")
            .arg(state)
            .arg("--bin-dir")
            .arg(binary_dir())
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("trellis up starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (output, tx) = (output.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut up = Self {
            child,
            state: state.to_owned(),
            output,
            lines,
            edge: "0.0.0.0:0".parse().unwrap(),
            registry: "0.0.0.0:0".parse().unwrap(),
        };
        let edge = up.wait_line("edge: ", limit);
        up.edge = edge.trim_start_matches("edge: ").trim().parse().unwrap();
        let registry = up.wait_line("registry: ", Duration::from_secs(5));
        up.registry = registry
            .trim_start_matches("registry: ")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        up
    }

    /// The next line starting with `prefix`, or a panic showing the output.
    pub fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no line starting {prefix:?} within {limit:?}:\n{}",
                    self.output()
                ),
            }
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Its state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    /// The pid of process `name` (`registry`, `usage-1`, `usage-1-proxy`) now.
    pub fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every process it runs now, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::fs::read_dir(self.run_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let path = e.path();
                        let name = path.file_stem()?.to_str()?.to_owned();
                        if path.extension()? != "pid" || name == "trellis-up" {
                            return None;
                        }
                        let pid = self.pid(&name)?;
                        Some((name, pid))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An instance's sidecar admin address, from the run file.
    pub fn admin(&self, instance: &str) -> SocketAddr {
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.run_dir().join("up.json")).unwrap())
                .unwrap();
        run["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance"] == instance)
            .unwrap_or_else(|| panic!("{instance} in up.json: {run}"))["admin"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// `trellis status` against this mesh: exit code and output.
    pub fn status(&self) -> (i32, String) {
        let out = Command::new(workspace_binary("trellis"))
            .args(["status", "--registry", &self.registry.to_string()])
            .arg("--certs")
            .arg(self.state.join("certs"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// SIGKILLs process `name`, waits until trellis up has started it
    /// again, and returns how long that took.
    pub async fn kill_and_wait_restart(&self, name: &str, limit: Duration) -> Duration {
        let old = self.pid(name).unwrap_or_else(|| panic!("{name} runs"));
        let killed = Instant::now();
        signal(old, "KILL");
        loop {
            if let Some(new) = self.pid(name)
                && new != old
                && alive(new)
            {
                return killed.elapsed();
            }
            assert!(
                killed.elapsed() < limit,
                "{name} was not restarted within {limit:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ctrl-C, then waits for trellis up to exit.
    pub fn interrupt(&mut self, limit: Duration) -> std::process::ExitStatus {
        signal(self.child.id(), "INT");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "trellis up did not stop within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // A failed test: stop the mesh, and kill what is left.
            signal(self.child.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
                for (_, pid) in self.pids() {
                    signal(pid, "KILL");
                }
            }
        }
    }
}

/// The databases of the mesh whose state directory is `state`
/// (`trellis_<its id>_<service>`), dropped with this.
pub struct Databases(String);

impl Databases {
    /// Those of the mesh whose state directory is `state`.
    pub fn of(state: &Path) -> Self {
        let id = std::fs::read_to_string(state.join("mesh-id")).unwrap();
        Self(format!("trellis_{}", id.trim()))
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        drop_databases(&self.0);
    }
}

fn drop_databases(prefix: &str) {
    let url = match server_url() {
        Ok(u) => u,
        Err(_) => return,
    };
    for service in ["user", "usage", "settlement"] {
        let _ = Command::new("psql")
            .arg(format!("{url}/postgres"))
            .args(["-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {prefix}_{service} WITH (FORCE)"
            ))
            .output();
    }
}

/// Sends signal `name` (`INT`, `KILL`) to `pid`.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// Whether `pid` runs (a zombie has exited; only its parent has not
/// reaped it yet).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}
