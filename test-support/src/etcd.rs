//! A real etcd cluster on 127.0.0.1 for tests: Debian's `etcd` (package
//! `etcd-server`), one process per member, each with its own data
//! directory and free client and peer ports. Members can be killed
//! (SIGKILL) and restarted on the same ports and data, rejoining the
//! cluster as a crashed member would. Each member logs warnings and
//! errors only, to a file that is printed when the test fails.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, free_port};

/// How long a member may take to answer `/health` after it starts.
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    process: Option<ChildGuard>,
    /// Runs of this member that were killed, kept for their logs.
    killed: Vec<ChildGuard>,
}

/// A running etcd cluster, stopped (and its data removed) when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts a cluster of `members` members and waits until every one is
    /// healthy.
    pub fn start(members: usize) -> Self {
        let ports: Vec<u16> = (0..members).map(|_| free_port()).collect();
        Self::start_on(&ports)
    }

    /// Starts a cluster whose members serve clients on `client_ports` (a
    /// test that pointed a process at a port before etcd ran there).
    pub fn start_on(client_ports: &[u16]) -> Self {
        assert!(
            !client_ports.is_empty(),
            "a cluster has at least one member"
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let members: Vec<Member> = client_ports
            .iter()
            .enumerate()
            .map(|(i, &client)| Member {
                name: format!("m{i}"),
                client,
                peer: free_port(),
                data: dir.path().join(format!("m{i}")),
                process: None,
                killed: Vec::new(),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token: format!("trellis-test-{:016x}", rand::random::<u64>()),
            _dir: dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let binary = "etcd";
        static FOUND: OnceLock<bool> = OnceLock::new();
        let found = *FOUND.get_or_init(|| {
            Command::new(binary)
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success())
        });
        if !found {
            panic!(
                "etcd not found: install the Debian package etcd-server (`.ci/run` and scripts/test do)"
            );
        }
        let m = &self.members[i];
        let client_url = format!("http://127.0.0.1:{}", m.client);
        let peer_url = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--log-level", "warn"])
            .args(["--logger", "zap"])
            // Small and quick: a test cluster holds little, keeps every
            // revision (no compaction behind a test's back) and snapshots
            // rarely.
            .args(["--quota-backend-bytes", &(256u64 << 20).to_string()])
            .args(["--auto-compaction-retention", "0"])
            .args(["--snapshot-count", "10000"]);
        // etcd 3.4 runs on arm64 only when told to (and warns about the
        // variable on every other architecture).
        if cfg!(target_arch = "aarch64") {
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let process = ChildGuard::spawn(&format!("etcd-{}", m.name), cmd).expect("etcd starts");
        self.members[i].process = Some(process);
    }

    /// Waits until member `i` answers `/health`; panics with the end of
    /// its log if it exits or is not healthy within [`HEALTHY_WITHIN`].
    fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let m = &mut self.members[i];
            if health(m.client) {
                return;
            }
            let process = m.process.as_mut().expect("a started member");
            // Polls for an exit while it waits between two checks.
            if let Some(status) = process.wait_exit(Duration::from_millis(50)) {
                panic!(
                    "etcd member {} (client port {}, peer port {}) exited ({status}) before it was healthy; its log ends:\n{}",
                    m.name,
                    m.client,
                    m.peer,
                    tail(&process.output(), 30)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd member {} (client port {}, peer port {}) not healthy within {HEALTHY_WITHIN:?}; its log ends:\n{}",
                    m.name,
                    m.client,
                    m.peer,
                    tail(&process.output(), 30)
                );
            }
        }
    }

    /// Every member's client address, `127.0.0.1:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// The registry's `--store` for this cluster.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Kills member `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut process) = m.process.take() {
            process.kill();
            m.killed.push(process);
        }
    }

    /// Whether member `i` runs: started, and not killed since (a member
    /// that exits by itself is not noticed here).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].process.is_some()
    }

    /// Starts killed member `i` again, on its ports and data, and waits
    /// until it is healthy (it rejoins the cluster and catches up).
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "member {i} runs already");
        self.spawn(i, "existing");
        self.wait_healthy(i);
    }

    /// Member `i`'s log so far, over all its runs.
    pub fn output(&self, i: usize) -> String {
        let m = &self.members[i];
        m.killed
            .iter()
            .chain(&m.process)
            .map(ChildGuard::output)
            .collect::<Vec<_>>()
            .join("--- restarted ---\n")
    }

    /// Member `i`'s data directory (removed with the cluster).
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data
    }
}

/// The last `lines` lines of `log`.
fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether the member serving clients on `port` answers `/health` with
/// `"health":"true"` (it has a leader and serves).
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") && answer.contains("\"health\":\"true\"")
}
