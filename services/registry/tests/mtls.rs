//! Two processes on 127.0.0.1 speaking gRPC over mTLS with SPIFFE
//! identities: this test process is the client, the registry binary the
//! server. Each way a peer can be wrong is refused with its reason.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use trellis::identity::{IdentityPaths, Workload};
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{ChildGuard, TestPki};

const REGISTRY: &str = env!("CARGO_BIN_EXE_trellis-registry");

/// Certificates expire with one-second precision: a certificate valid for
/// 2 s is certainly expired 3.2 s after it was issued.
const EXPIRY_WAIT: Duration = Duration::from_millis(3_200);

struct Registry {
    addr: SocketAddr,
    process: ChildGuard,
    _config: tempfile::TempDir,
}

fn start_registry(identity: &IdentityPaths) -> Registry {
    let config = tempfile::tempdir().unwrap();
    let running = trellis_test_support::spawn_registry(REGISTRY, identity, config.path());
    Registry {
        addr: running.addr,
        process: running.process,
        _config: config,
    }
}

async fn health(
    channel: tonic::transport::Channel,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Waits for the registry's log to mention `needle` (logs are written
/// asynchronously to the refusal the client sees).
fn wait_for_log(registry: &Registry, needle: &str) -> String {
    registry
        .process
        .wait_for_output(needle, Duration::from_secs(2))
        .unwrap_or_else(|| {
            panic!(
                "registry log never mentioned {needle:?}:\n{}",
                registry.process.output()
            )
        })
}

fn full_error(status: &tonic::Status) -> String {
    let mut text = format!("{status}");
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[tokio::test]
async fn mtls_call_between_two_processes_and_each_refusal() {
    let pki = TestPki::new("trellis.local");
    let registry = start_registry(&pki.issue("registry", "registry"));
    let client = Workload::load(&pki.issue("usage", "usage")).unwrap();

    // The right CA and the right identity: the call completes.
    let good = channel(
        &client,
        registry.addr,
        ExpectedPeer::Exactly(pki.id("registry")),
    )
    .unwrap();
    assert_eq!(
        health(good).await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // The server is not who the client meant to reach: the client refuses.
    let wrong_server = channel(
        &client,
        registry.addr,
        ExpectedPeer::Exactly(pki.id("settlement")),
    )
    .unwrap();
    let status = health(wrong_server).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let text = full_error(&status);
    assert!(
        text.contains(
            "peer identity spiffe://trellis.local/ns/default/sa/registry is not the expected \
             spiffe://trellis.local/ns/default/sa/settlement"
        ),
        "{text}"
    );

    // A client certificate from another CA: the server refuses the handshake.
    let other_pki = TestPki::new("trellis.local");
    let mut foreign = other_pki.issue("usage", "usage");
    // It trusts both CAs, so only the server's check can fail.
    foreign.ca = other_pki.dir().join("both-cas.pem");
    std::fs::write(
        &foreign.ca,
        std::fs::read_to_string(other_pki.ca_path()).unwrap()
            + &std::fs::read_to_string(pki.ca_path()).unwrap(),
    )
    .unwrap();
    let foreign = Workload::load(&foreign).unwrap();
    let status = health(
        channel(
            &foreign,
            registry.addr,
            ExpectedPeer::Exactly(pki.id("registry")),
        )
        .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let text = full_error(&status);
    assert!(text.contains("UnknownCA"), "{text}");
    wait_for_log(&registry, "UnknownIssuer");

    // No client certificate at all.
    let status = health(no_client_cert_channel(registry.addr))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let text = full_error(&status);
    assert!(text.contains("CertificateRequired"), "{text}");
    wait_for_log(&registry, "peer sent no certificates");

    // A client from another trust domain of the same CA is refused too.
    let stranger = pki_stranger(&pki);
    let status = health(
        channel(
            &stranger,
            registry.addr,
            ExpectedPeer::Exactly(pki.id("registry")),
        )
        .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let text = full_error(&status);
    assert!(text.contains("CertificateUnknown"), "{text}");
    wait_for_log(&registry, "is outside trust domain trellis.local");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = TestPki::new("trellis.local");
    let registry = start_registry(&pki.issue("registry", "registry"));
    let now = time::OffsetDateTime::now_utc();
    let short = pki.issue_with_validity(
        "usage",
        "usage-short",
        now - time::Duration::minutes(1),
        now + time::Duration::seconds(2),
    );
    let expired_at = tokio::time::Instant::now() + EXPIRY_WAIT;
    let client = Workload::load(&short).unwrap();
    tokio::time::sleep_until(expired_at).await;
    let status = health(
        channel(
            &client,
            registry.addr,
            ExpectedPeer::Exactly(pki.id("registry")),
        )
        .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let text = full_error(&status);
    assert!(text.contains("CertificateExpired"), "{text}");
    wait_for_log(&registry, "certificate expired");
}

#[tokio::test]
async fn expired_server_certificate_is_refused_by_the_client() {
    let pki = TestPki::new("trellis.local");
    let now = time::OffsetDateTime::now_utc();
    let short = pki.issue_with_validity(
        "registry",
        "registry-short",
        now - time::Duration::minutes(1),
        now + time::Duration::seconds(2),
    );
    let expired_at = tokio::time::Instant::now() + EXPIRY_WAIT;
    let registry = start_registry(&short);
    let client = Workload::load(&pki.issue("usage", "usage")).unwrap();
    tokio::time::sleep_until(expired_at).await;
    let status = health(
        channel(
            &client,
            registry.addr,
            ExpectedPeer::Exactly(pki.id("registry")),
        )
        .unwrap(),
    )
    .await
    .unwrap_err();
    let text = full_error(&status);
    assert!(text.contains("certificate expired"), "{text}");
}

#[test]
fn bad_identity_files_exit_with_a_message_naming_the_file() {
    let pki = TestPki::new("trellis.local");
    let good = pki.issue("registry", "registry");
    let other = pki.issue("usage", "usage");
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let empty = pki.dir().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = pki.dir().join("missing.pem");

    let cases = [
        (
            IdentityPaths {
                cert: missing.clone(),
                ..good.clone()
            },
            missing.display().to_string(),
            "cannot read",
        ),
        (
            IdentityPaths {
                cert: empty.clone(),
                ..good.clone()
            },
            empty.display().to_string(),
            "no PEM CERTIFICATE block",
        ),
        (
            IdentityPaths {
                key: garbage.clone(),
                ..good.clone()
            },
            garbage.display().to_string(),
            "malformed PEM",
        ),
        (
            IdentityPaths {
                key: other.key.clone(),
                ..good.clone()
            },
            other.key.display().to_string(),
            "private key belongs to another certificate",
        ),
        (
            IdentityPaths {
                ca: good.key.clone(),
                ..good.clone()
            },
            good.key.display().to_string(),
            "no PEM CERTIFICATE block",
        ),
    ];
    for (paths, file, reason) in cases {
        let out = Command::new(REGISTRY)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&paths.cert)
            .arg("--key")
            .arg(&paths.key)
            .arg("--ca")
            .arg(&paths.ca)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&file) && stderr.contains(reason),
            "expected {file} and {reason:?} in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A workload of another trust domain whose certificate the real CA signed.
fn pki_stranger(pki: &TestPki) -> Workload {
    let paths = pki.issue_for_id(
        &trellis::SpiffeId::parse("spiffe://elsewhere.example/ns/default/sa/usage").unwrap(),
        "stranger",
    );
    Workload::load(&paths).unwrap()
}

/// A channel that presents no client certificate.
fn no_client_cert_channel(addr: SocketAddr) -> tonic::transport::Channel {
    let config = rustls::ClientConfig::builder_with_provider(trellis::tls::provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let config = config.clone();
            async move {
                trellis::tls::connect(addr, config)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
}

/// Trusts any server: this test is about what the server refuses.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        trellis::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
