//! A TLS listener (here the registry's) under a flood of connections that
//! never start TLS: handshakes in progress are bounded, and connections
//! past the bound are closed at once instead of each holding a task and a
//! buffer for the whole handshake timeout.

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use trellis_test_support::{ChildGuard, TestPki, free_port, sibling_binary, wait_for_tcp};

/// The bound the registry runs with here (`TRELLIS_TLS_MAX_PENDING_HANDSHAKES`).
const LIMIT: usize = 32;

#[test]
fn handshakes_in_progress_are_bounded() {
    let pki = TestPki::new("trellis.local");
    let config = tempfile::tempdir().unwrap();
    let identity = pki.issue("registry", "registry");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(sibling_binary(
        env!("CARGO_BIN_EXE_trellis"),
        "trellis-registry",
    ));
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config-dir")
        .arg(config.path())
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca)
        .env("TRELLIS_TLS_MAX_PENDING_HANDSHAKES", LIMIT.to_string());
    let registry = ChildGuard::spawn("registry", cmd).unwrap();
    assert!(
        wait_for_tcp(addr, Duration::from_secs(20)),
        "{}",
        registry.output()
    );

    // Connections that never say a word: each is a TLS handshake waiting
    // (for up to the 10 s handshake timeout). Eight more than the bound.
    let extra = 8;
    let mut idle = Vec::new();
    for _ in 0..LIMIT + extra {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nonblocking(true).unwrap();
        idle.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    // The ones past the bound were closed at once (the listener's probe
    // connections at start-up may still hold a place or two); the others
    // are still waiting for their handshake.
    let closed = idle.iter_mut().map(is_closed).filter(|c| *c).count();
    assert!(
        (extra..=extra + 2).contains(&closed),
        "{closed} of {} idle connections were closed; at most {LIMIT} handshakes may wait:\n{}",
        idle.len(),
        registry.output()
    );
}

/// Whether the peer has closed `stream` (a read returns 0 bytes, or the
/// connection was reset), as opposed to nothing to read yet.
fn is_closed(stream: &mut TcpStream) -> bool {
    match stream.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}
