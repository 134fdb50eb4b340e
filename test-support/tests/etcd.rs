//! The etcd fixture: a real cluster on 127.0.0.1 that keeps serving with a
//! member killed, a killed member that comes back with the latest value,
//! and clear failures when etcd is missing or a member cannot start.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use trellis_test_support::EtcdCluster;

/// Runs `etcdctl` against one member; its stdout, or its stderr as the
/// error.
fn etcdctl(endpoint: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{endpoint}"))
        .args(["--dial-timeout=1s", "--command-timeout=3s"])
        .args(args)
        .output()
        .expect("etcdctl runs (Debian package etcd-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The value of `key` as `endpoint` serves it; `serializable` reads the
/// member's own copy instead of going through the leader.
fn get(endpoint: &str, key: &str, serializable: bool) -> Result<String, String> {
    let consistency = if serializable {
        "--consistency=s"
    } else {
        "--consistency=l"
    };
    let out = etcdctl(endpoint, &["get", key, "--print-value-only", consistency])?;
    Ok(out.trim_end().to_owned())
}

/// Retries `op` for up to 15 s (a leader election after a kill, a member
/// catching up after a restart); the last error when it never succeeds.
fn within<T>(what: &str, mut op: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match op() {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("127.0.0.1:port")
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

#[test]
fn three_members_survive_one_killed_and_the_restarted_one_catches_up() {
    let mut etcd = EtcdCluster::start(3);
    let eps = etcd.endpoints();
    assert_eq!(eps.len(), 3);
    for ep in &eps {
        assert!(ep.starts_with("127.0.0.1:"), "{ep}");
    }
    let ports: Vec<u16> = eps.iter().map(|e| port_of(e)).collect();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one client port per member: {eps:?}");
    assert_eq!(etcd.store_url(), format!("etcd://{}", eps.join(",")));
    assert!((0..3).all(|i| etcd.is_running(i)));

    // Written through one member, read through another.
    etcdctl(&eps[0], &["put", "k", "v1"]).expect("put through member 0");
    assert_eq!(get(&eps[1], "k", false).unwrap(), "v1");
    assert_eq!(get(&eps[2], "k", false).unwrap(), "v1");

    // Member 0 crashes: it no longer answers, and the other two (still a
    // majority) take writes and serve them, once they have a leader.
    etcd.kill(0);
    assert!(!etcd.is_running(0));
    assert!(etcd.is_running(1) && etcd.is_running(2));
    assert!(
        !accepts(port_of(&eps[0])),
        "a killed member's port is closed"
    );
    assert!(get(&eps[0], "k", false).is_err());
    within("put through member 1 with member 0 down", || {
        etcdctl(&eps[1], &["put", "k", "v2"])
    });
    assert_eq!(get(&eps[2], "k", false).unwrap(), "v2");
    within("put through member 2 with member 0 down", || {
        etcdctl(&eps[2], &["put", "k", "v3"])
    });

    // Member 0 comes back on its port with its data, and serves the value
    // written while it was down from its own copy.
    etcd.restart(0);
    assert!(etcd.is_running(0));
    let value = within("member 0 catching up after its restart", || {
        get(&eps[0], "k", true).and_then(|v| {
            if v == "v3" {
                Ok(v)
            } else {
                Err(format!("member 0 serves {v:?}"))
            }
        })
    });
    assert_eq!(value, "v3");
    etcdctl(&eps[0], &["put", "k", "v4"]).expect("put through the restarted member");
    assert_eq!(get(&eps[1], "k", false).unwrap(), "v4");
    // Both runs of member 0 are in its log (which may be empty: warnings
    // only).
    let _ = etcd.output(0);

    let data: Vec<_> = (0..3).map(|i| etcd.data_dir(i).to_path_buf()).collect();
    assert!(data.iter().all(|d| d.join("member").is_dir()), "{data:?}");
    drop(etcd);
    for (port, dir) in ports.iter().zip(&data) {
        assert!(!accepts(*port), "port {port} still accepts after drop");
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn a_member_that_cannot_start_is_named_with_its_log() {
    // Something else holds the client port: etcd exits at once, and the
    // fixture says so without waiting out its deadline.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let started = Instant::now();
    let panic = std::panic::catch_unwind(|| EtcdCluster::start_on(&[port]))
        .expect_err("a member on a taken port cannot start");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains(&format!("etcd member m0 (client port {port}")),
        "{message}"
    );
    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("address already in use"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Set in the child run of the test below.
const CHILD: &str = "TRELLIS_ETCD_FIXTURE_WITHOUT_ETCD";

#[test]
fn without_etcd_the_fixture_says_what_to_install() {
    if std::env::var_os(CHILD).is_some() {
        EtcdCluster::start(1);
        return;
    }
    // This test again, in a process whose PATH has no etcd.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "without_etcd_the_fixture_says_what_to_install",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("etcd not found: install the Debian package etcd-server"),
        "{text}"
    );
}
