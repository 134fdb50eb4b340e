//! Certificates (issue 11, item 7), with real processes over real mTLS on
//! 127.0.0.1: workload certificates and the CA bundle are re-read when
//! their files change (no restart), a sidecar whose own certificate is out
//! of its validity period says so on /ready, and pooled connections to
//! peers are replaced after `--max-connection-age`, so that peers are
//! verified again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use trellis::identity::{IdentityPaths, SpiffeId, Workload, read_certs};
use trellis::pb::trellis::echo::v1 as echo;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    ProxyOptions, RunningProxy, TestPki, sibling_binary, spawn_echo, spawn_proxy,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
/// A static route that is never used: a sidecar without a registry needs one.
const NO_ROUTE: &str = "none.v1.None=http://127.0.0.1:9";
/// How long a sidecar may take to notice changed files (it looks every second).
const RELOAD_WITHIN: Duration = Duration::from_secs(10);

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

fn echo_bin() -> PathBuf {
    sibling_binary(PROXY, "trellis-echo")
}

/// Writes `contents` to `path` the way rotation tools do: a new file
/// renamed over the old one, so that no reader sees half a file.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Installs the certificate and key of `issued` (and `ca`, the bundle's
/// contents) as `<dir>/<name>.pem`, `.key` and `<dir>/ca.pem`.
fn install(issued: &IdentityPaths, ca: &[u8], dir: &Path, name: &str) -> IdentityPaths {
    let paths = IdentityPaths::in_dir(dir, name);
    replace(&paths.ca, ca);
    replace(&paths.cert, &std::fs::read(&issued.cert).unwrap());
    replace(&paths.key, &std::fs::read(&issued.key).unwrap());
    paths
}

fn leaf(path: &Path) -> CertificateDer<'static> {
    read_certs(path).unwrap().remove(0)
}

/// The leaf certificate `addr` presents to a fresh mTLS client holding
/// `client`, which expects `expected`; Err when the handshake fails.
async fn presented(
    client: &IdentityPaths,
    addr: SocketAddr,
    expected: &SpiffeId,
) -> Result<CertificateDer<'static>, String> {
    let workload = Workload::load(client).map_err(|e| e.to_string())?;
    let config = workload
        .client_config(ExpectedPeer::Exactly(expected.clone()))
        .map_err(|e| e.to_string())?;
    let stream = trellis::tls::connect(addr, config)
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream
        .session()
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a verified peer has a certificate")
        .clone()
        .into_owned())
}

/// Waits until `addr` presents `want` to new connections.
async fn wait_presented(
    client: &IdentityPaths,
    addr: SocketAddr,
    expected: &SpiffeId,
    want: &CertificateDer<'static>,
    proxy: &RunningProxy,
) {
    let deadline = Instant::now() + RELOAD_WITHIN;
    loop {
        let now = presented(client, addr, expected).await;
        if now.as_ref() == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {RELOAD_WITHIN:?} new connections still get {}, not the new certificate\n{}",
            match now {
                Ok(_) => "the old certificate".to_owned(),
                Err(e) => format!("an error: {e}"),
            },
            proxy.process.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn h2c(addr: SocketAddr) -> EchoServiceClient<Channel> {
    EchoServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    )
}

fn say(message: &str) -> tonic::Request<echo::EchoRequest> {
    tonic::Request::new(echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    })
}

/// Waits until /ready answers `status`; returns its body.
async fn wait_ready_status(proxy: &RunningProxy, status: u16) -> String {
    let deadline = Instant::now() + RELOAD_WITHIN;
    loop {
        let (now, body) = proxy.admin_get("/ready");
        if now == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still answers {now} {body:?}, not {status}\n{}",
            proxy.process.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_rotated_certificate_is_presented_without_a_restart() {
    let pki = TestPki::new("trellis.local");
    let ca = std::fs::read(pki.ca_path()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let paths = install(&pki.issue("echo", "echo-1"), &ca, files.path(), "echo");
    let app = spawn_echo(&echo_bin(), "e1", &[]);
    let sidecar = spawn_proxy(
        &proxy_bin(),
        "echo",
        ProxyOptions::new(&paths, Some(app.addr), None).args(&["--static-route", NO_ROUTE]),
    );
    let client = pki.issue("client", "client");
    let echo_id = pki.id("echo");
    let first = leaf(&paths.cert);
    assert_eq!(
        presented(&client, sidecar.inbound, &echo_id).await.unwrap(),
        first
    );

    // Same CA, same SPIFFE ID, new key and certificate.
    install(&pki.issue("echo", "echo-2"), &ca, files.path(), "echo");
    let second = leaf(&paths.cert);
    assert_ne!(first, second);
    wait_presented(&client, sidecar.inbound, &echo_id, &second, &sidecar).await;
    // The same process, still serving calls.
    let workload = Workload::load(&client).unwrap();
    let mut mtls = EchoServiceClient::new(
        channel(
            &workload,
            sidecar.inbound,
            ExpectedPeer::Exactly(echo_id.clone()),
        )
        .unwrap(),
    );
    mtls.echo(say("after rotation")).await.unwrap();

    // A certificate for another identity is refused, and so is a file
    // that does not parse: the last good certificate stays.
    install(
        &pki.issue("intruder", "intruder"),
        &ca,
        files.path(),
        "echo",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        presented(&client, sidecar.inbound, &echo_id).await.unwrap(),
        second
    );
    let log = sidecar.process.output();
    assert!(
        log.contains("sa/intruder") && log.contains("SPIFFE ID"),
        "the refusal names the other identity: {log}"
    );
    replace(&paths.cert, b"not a certificate");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        presented(&client, sidecar.inbound, &echo_id).await.unwrap(),
        second
    );
    mtls.echo(say("after a bad file")).await.unwrap();
    assert_eq!(sidecar.admin_get("/ready").0, 200);
}

#[tokio::test]
async fn a_ca_rotation_loses_no_call() {
    let old = TestPki::new("trellis.local");
    let new = TestPki::new("trellis.local");
    let old_ca = std::fs::read(old.ca_path()).unwrap();
    let new_ca = std::fs::read(new.ca_path()).unwrap();
    let both = [old_ca.clone(), new_ca.clone()].concat();
    let (server_files, caller_files) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server_paths = install(
        &old.issue("echo", "echo"),
        &old_ca,
        server_files.path(),
        "echo",
    );
    let caller_paths = install(
        &old.issue("frontend", "frontend"),
        &old_ca,
        caller_files.path(),
        "frontend",
    );
    let app = spawn_echo(&echo_bin(), "e1", &[]);
    let server = spawn_proxy(
        &proxy_bin(),
        "echo",
        ProxyOptions::new(&server_paths, Some(app.addr), None).args(&["--static-route", NO_ROUTE]),
    );
    // The caller reconnects every second, so each step is also seen by
    // fresh handshakes, not only by a connection made before it.
    let route = format!("*=https://{}", server.inbound);
    let caller = spawn_proxy(
        &proxy_bin(),
        "frontend",
        ProxyOptions::new(&caller_paths, None, None).args(&[
            "--static-route",
            &route,
            "--max-connection-age",
            "1s",
        ]),
    );
    let mut client = h2c(caller.outbound);
    client.echo(say("before")).await.unwrap();

    // Steady calls throughout.
    let ok = Arc::new(AtomicUsize::new(0));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = {
        let ok = ok.clone();
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !*stop_rx.borrow_and_update() {
                match client.echo(say("during")).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => failures.push(status),
                }
                tokio::select! {
                    _ = stop_rx.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            failures
        })
    };
    let settle = Duration::from_millis(2500);

    // 1. Trust both CAs.
    replace(&server_paths.ca, &both);
    replace(&caller_paths.ca, &both);
    tokio::time::sleep(settle).await;
    // 2. Certificates from the new CA.
    install(
        &new.issue("echo", "echo"),
        &both,
        server_files.path(),
        "echo",
    );
    install(
        &new.issue("frontend", "frontend"),
        &both,
        caller_files.path(),
        "frontend",
    );
    let probe = IdentityPaths {
        ca: new.ca_path(),
        ..new.issue("probe", "probe")
    };
    let echo_id = new.id("echo");
    wait_presented(
        &probe,
        server.inbound,
        &echo_id,
        &leaf(&server_paths.cert),
        &server,
    )
    .await;
    tokio::time::sleep(settle).await;
    // 3. Trust only the new CA.
    replace(&server_paths.ca, &new_ca);
    replace(&caller_paths.ca, &new_ca);
    tokio::time::sleep(settle).await;

    let _ = stop_tx.send(true);
    let failures = load.await.unwrap();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} calls failed during the rotation, first: {:?}\n{}\n{}",
        failures.len(),
        failures.len() + ok,
        failures.first(),
        server.process.output(),
        caller.process.output()
    );
    assert!(ok > 50, "only {ok} calls made");
    client.echo(say("after")).await.unwrap();

    // The old CA is no longer trusted: a client holding a certificate it
    // signed is refused by the server.
    let retired = IdentityPaths {
        ca: {
            let p = caller_files.path().join("both.pem");
            std::fs::write(&p, &both).unwrap();
            p
        },
        ..old.issue("frontend", "old-frontend")
    };
    let refused = presented(&retired, server.inbound, &echo_id).await;
    assert!(
        refused.is_err(),
        "a certificate from the retired CA is still accepted"
    );
}

#[tokio::test]
async fn a_sidecar_with_an_expired_certificate_is_not_ready_and_says_why() {
    let pki = TestPki::new("trellis.local");
    let ca = std::fs::read(pki.ca_path()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let paths = install(
        &pki.issue_expired("echo", "expired"),
        &ca,
        files.path(),
        "echo",
    );
    let app = spawn_echo(&echo_bin(), "e1", &[]);
    let mut options =
        ProxyOptions::new(&paths, Some(app.addr), None).args(&["--static-route", NO_ROUTE]);
    options.wait_ready = false;
    let sidecar = spawn_proxy(&proxy_bin(), "echo", options);
    let body = wait_ready_status(&sidecar, 503).await;
    assert!(
        body.contains("expired") && body.contains("spiffe://trellis.local/ns/default/sa/echo"),
        "{body}"
    );
    // A renewed certificate makes it ready, without a restart.
    install(&pki.issue("echo", "renewed"), &ca, files.path(), "echo");
    wait_ready_status(&sidecar, 200).await;
}

#[tokio::test]
async fn a_sidecar_with_a_certificate_not_valid_yet_is_not_ready() {
    let pki = TestPki::new("trellis.local");
    let ca = std::fs::read(pki.ca_path()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let paths = install(
        &pki.issue_not_yet_valid("echo", "future"),
        &ca,
        files.path(),
        "echo",
    );
    let app = spawn_echo(&echo_bin(), "e1", &[]);
    let mut options =
        ProxyOptions::new(&paths, Some(app.addr), None).args(&["--static-route", NO_ROUTE]);
    options.wait_ready = false;
    let sidecar = spawn_proxy(&proxy_bin(), "echo", options);
    let body = wait_ready_status(&sidecar, 503).await;
    assert!(body.contains("not valid until"), "{body}");
}

/// A TCP relay in front of `target` that counts the connections it
/// accepted and those still open.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, open)
}

#[tokio::test]
async fn pooled_connections_are_replaced_after_their_maximum_age() {
    let pki = TestPki::new("trellis.local");
    let app = spawn_echo(&echo_bin(), "e1", &[]);
    let server = spawn_proxy(
        &proxy_bin(),
        "echo",
        ProxyOptions::new(&pki.issue("echo", "echo"), Some(app.addr), None)
            .args(&["--static-route", NO_ROUTE]),
    );
    let (relay, accepted, open) = counting_relay(server.inbound).await;
    let route = format!("*=https://{relay}");
    let caller = spawn_proxy(
        &proxy_bin(),
        "frontend",
        ProxyOptions::new(&pki.issue("frontend", "frontend"), None, None).args(&[
            "--static-route",
            &route,
            "--max-connection-age",
            "1s",
        ]),
    );
    let mut client = h2c(caller.outbound);
    client.echo(say("first")).await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // A call in flight on the first connection when it comes of age...
    let slow = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut request = echo::SleepRequest::default();
            let mut duration = request.duration.take().unwrap_or_default();
            duration.seconds = 2;
            duration.nanos = 500_000_000;
            request.duration = Some(duration);
            client.sleep(tonic::Request::new(request)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.echo(say("young")).await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a young connection is reused"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // ...while a new call goes over a new connection.
    client.echo(say("old")).await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "after the maximum age a new call opens a new connection\n{}",
        caller.process.output()
    );
    assert_eq!(open.load(Ordering::SeqCst), 2, "the old one still serves");
    slow.await
        .unwrap()
        .expect("the call in flight on the old connection finishes");
    // With nothing left on it, the old connection closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open.load(Ordering::SeqCst) > 1 {
        assert!(Instant::now() < deadline, "the old connection stays open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
