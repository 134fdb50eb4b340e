//! A TLS listener (here the registry's) under a flood of connections that
//! never start TLS: handshakes in progress are bounded, and connections
//! past the bound are closed at once instead of each holding a task and a
//! buffer for the whole handshake timeout.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use trellis::tls::MAX_PENDING_HANDSHAKES;
use trellis_test_support::{TestPki, sibling_binary, spawn_registry};

#[test]
fn handshakes_in_progress_are_bounded() {
    let pki = TestPki::new("trellis.local");
    let config = tempfile::tempdir().unwrap();
    let bin = sibling_binary(env!("CARGO_BIN_EXE_trellis"), "trellis-registry");
    let registry = spawn_registry(
        bin.to_str().unwrap(),
        &pki.issue("registry", "registry"),
        config.path(),
    );

    // Connections that never say a word: each is a TLS handshake waiting.
    let extra = 64;
    let mut idle = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..MAX_PENDING_HANDSHAKES + extra {
        let stream = TcpStream::connect(registry.addr).unwrap();
        stream.set_nonblocking(true).unwrap();
        idle.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    // All well inside the handshake timeout, which would close them all.
    assert!(
        started.elapsed() < trellis::tls::HANDSHAKE_TIMEOUT / 2,
        "connecting took {:?}",
        started.elapsed()
    );
    // The server closed the ones past the bound (a read sees the end);
    // the others are still waiting for their handshake.
    let closed = idle.iter_mut().map(is_closed).filter(|c| *c).count();
    assert!(
        closed >= extra,
        "{closed} of {} idle connections were closed; at most {MAX_PENDING_HANDSHAKES} handshakes may wait",
        idle.len()
    );
    assert!(
        closed <= extra + 8,
        "{closed} closed: the bound is {MAX_PENDING_HANDSHAKES}"
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
