//! Mutual TLS between workloads.
//!
//! Both sides present a certificate from the mesh CA. The server accepts any
//! client whose certificate chains to the CA and carries a SPIFFE ID in its
//! trust domain, and hands the verified [`PeerIdentity`] to the code that
//! serves the request. The client checks the server's chain and that its
//! SPIFFE ID is the one it expected to reach: DNS names play no part.
//!
//! Configurations built from a [`Workload`] present its current certificate
//! and verify against its current CA bundle, so a rotation read by
//! [`Workload::watch`] applies to every connection made after it, without a
//! restart. Sessions are never resumed: every connection verifies its peer.
//!
//! One crypto provider (ring) is used everywhere.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::{Credentials, IdentityError, SpiffeId, Workload, spiffe_id_of};

/// How long a peer may take to complete the TLS handshake before the
/// connection is dropped (slow or stalled peers must not pin resources).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes one listener runs at once, by default; more
/// connections are closed as soon as they are accepted.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The bound on handshakes in progress per listener:
/// `TRELLIS_TLS_MAX_PENDING_HANDSHAKES` (1 to 65,536), else
/// [`MAX_PENDING_HANDSHAKES`]. A value out of range is ignored with a
/// warning.
pub fn max_pending_handshakes() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let Ok(text) = std::env::var("TRELLIS_TLS_MAX_PENDING_HANDSHAKES") else {
            return MAX_PENDING_HANDSHAKES;
        };
        match text.parse::<usize>() {
            Ok(n) if (1..=65_536).contains(&n) => n,
            _ => {
                tracing::warn!(value = %text, default = MAX_PENDING_HANDSHAKES, "TRELLIS_TLS_MAX_PENDING_HANDSHAKES is not 1 to 65536; using the default");
                MAX_PENDING_HANDSHAKES
            }
        }
    })
}

/// The process-wide crypto provider: ring, the only one linked.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// `key` and `chain` as a certificate to present, once `key` is checked
/// to be the private key of the leaf of `chain`.
pub(crate) fn certified_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unsupported or malformed key: {e}"))?;
    let certified = CertifiedKey::new(chain.to_vec(), signing_key);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key belongs to another certificate".to_owned()
        }
        other => other.to_string(),
    })?;
    Ok(Arc::new(certified))
}

/// webpki's client certificate checks against `roots` (chain, validity,
/// client-auth usage).
pub(crate) fn webpki_client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    WebPkiClientVerifier::builder_with_provider(roots, provider().clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Presents a workload's current certificate: whichever its files held
/// when last (re)loaded, so that new connections get a rotated one.
#[derive(Debug)]
struct CurrentCertificate(Arc<ArcSwap<Credentials>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a peer's certificate was refused, beyond what webpki itself checks.
#[derive(thiserror::Error)]
pub enum PeerRejected {
    /// The certificate chains to the CA but carries no usable SPIFFE ID.
    #[error("peer certificate has no valid SPIFFE ID: {0}")]
    NoIdentity(String),
    /// The peer's SPIFFE ID is in another trust domain.
    #[error("peer identity {actual} is outside trust domain {expected}")]
    WrongTrustDomain {
        /// The domain we serve.
        expected: String,
        /// What the peer presented.
        actual: SpiffeId,
    },
    /// The peer is not the workload we meant to reach.
    #[error("peer identity {actual} is not the expected {expected}")]
    WrongIdentity {
        /// Whom we meant to reach.
        expected: SpiffeId,
        /// Whom we reached.
        actual: SpiffeId,
    },
}

// rustls shows the reason with `{:?}`: make that the readable sentence.
impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn reject(reason: PeerRejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, rustls::Error> {
    spiffe_id_of(cert).map_err(|e| reject(PeerRejected::NoIdentity(e.to_string())))
}

/// Which server a client is willing to talk to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedPeer {
    /// Exactly this workload.
    Exactly(SpiffeId),
    /// Any workload of this trust domain.
    TrustDomain(String),
}

impl ExpectedPeer {
    fn check(&self, actual: SpiffeId) -> Result<(), PeerRejected> {
        match self {
            Self::Exactly(expected) if *expected != actual => Err(PeerRejected::WrongIdentity {
                expected: expected.clone(),
                actual,
            }),
            Self::TrustDomain(domain) if actual.trust_domain() != domain => {
                Err(PeerRejected::WrongTrustDomain {
                    expected: domain.clone(),
                    actual,
                })
            }
            _ => Ok(()),
        }
    }
}

/// Verifies a server: chain to the mesh CA (the current bundle), validity,
/// then SPIFFE ID.
struct MeshServerVerifier {
    credentials: Arc<ArcSwap<Credentials>>,
    expected: ExpectedPeer,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            self.credentials.load().roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let actual = identity_of(end_entity)?;
        self.expected.check(actual).map_err(reject)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client: webpki's chain and client-auth checks against the
/// current CA bundle, then a SPIFFE ID in our trust domain.
#[derive(Debug)]
struct MeshClientVerifier {
    credentials: Arc<ArcSwap<Credentials>>,
    /// Signature checks only (they do not depend on the bundle).
    signatures: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under a running server; hints are
        // optional, and mesh clients present their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.credentials.load().client_verifier.clone();
        inner.verify_client_cert(end_entity, intermediates, now)?;
        let actual = identity_of(end_entity)?;
        ExpectedPeer::TrustDomain(self.trust_domain.clone())
            .check(actual)
            .map_err(reject)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

impl Workload {
    /// A server configuration that presents this workload's current
    /// certificate, requires a client certificate from the current mesh CA
    /// bundle with a SPIFFE ID in this workload's trust domain, and speaks
    /// HTTP/2 (ALPN `h2`). Reloaded credentials (see [`Workload::watch`])
    /// apply to the connections accepted after the reload.
    ///
    /// Sessions are never resumed: a resumed session would skip checking
    /// the client's certificate, which may have expired or lost its CA
    /// since the first handshake.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let current = self.current().clone();
        let verifier = Arc::new(MeshClientVerifier {
            signatures: current.load().client_verifier.clone(),
            credentials: current.clone(),
            trust_domain: self.id().trust_domain().to_owned(),
        });
        let mut config = ServerConfig::builder_with_provider(provider().clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCertificate(current)));
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client configuration that presents this workload's current
    /// certificate and accepts only a server whose identity matches
    /// `expected`, chaining to the current CA bundle. Like the server side,
    /// it never resumes a session: every connection checks the peer anew.
    pub fn client_config(
        &self,
        expected: ExpectedPeer,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let current = self.current().clone();
        let verifier = Arc::new(MeshServerVerifier {
            credentials: current.clone(),
            expected,
            provider: provider().clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider().clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentCertificate(current)));
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Peers are found by address and checked by SPIFFE ID; SNI carries nothing.
        config.enable_sni = false;
        Ok(Arc::new(config))
    }
}

/// The verified identity of the peer on an mTLS connection. Request
/// handlers find it in the request's extensions (see [`peer_identity`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID from the peer's verified certificate.
    pub id: SpiffeId,
    /// The peer's socket address.
    pub remote_addr: SocketAddr,
}

/// The verified caller of a gRPC request served over [`serve_incoming`], or
/// UNAUTHENTICATED when the request did not arrive over mesh mTLS.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<&PeerIdentity, tonic::Status> {
    request.extensions().get::<PeerIdentity>().ok_or_else(|| {
        tonic::Status::unauthenticated("this call requires a mesh mTLS client certificate")
    })
}

/// A server-side mTLS stream that carries the verified peer identity.
#[derive(Debug)]
pub struct MeshTlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl MeshTlsStream {
    /// The verified peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
}

impl tonic::transport::server::Connected for MeshTlsStream {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Writes go straight to the TLS stream inside (the wrappers only add
/// state on the read side or alongside).
macro_rules! delegate_async_write {
    ($stream:ty) => {
        impl AsyncWrite for $stream {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

delegate_async_write!(MeshTlsStream);

/// Accepts mTLS connections on `listener` and yields those whose handshake
/// succeeded, each carrying its verified peer. Handshakes run concurrently
/// with a timeout, so one slow peer never holds up the others; a refused
/// handshake is logged with its reason and the peer's address.
pub fn serve_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<MeshTlsStream>> {
    tls_incoming(listener, config, "mTLS", |tls, remote_addr| {
        let Some(id) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| spiffe_id_of(leaf).ok())
        else {
            // The verifier guarantees a SPIFFE ID; this is defence in depth.
            tracing::warn!(peer.addr = %remote_addr, "mTLS peer without identity dropped");
            return None;
        };
        Some(MeshTlsStream {
            inner: tls,
            peer: PeerIdentity { id, remote_addr },
        })
    })
}

/// What is told of each failed handshake on a listener of [`tls_incoming`].
static HANDSHAKE_FAILED: OnceLock<fn(&'static str)> = OnceLock::new();

/// Has `hook` told, with the listener's kind (`mTLS` for
/// [`serve_incoming`], else the kind given to [`tls_incoming`]), of every
/// TLS handshake a listener refuses (a client certificate from another CA,
/// none, a protocol error) or gives up on (timed out). A connection closed
/// before any TLS (a bare TCP probe) is not one. For a process's metrics:
/// set once at start-up; a second hook is ignored.
pub fn on_handshake_failure(hook: fn(&'static str)) {
    let _ = HANDSHAKE_FAILED.set(hook);
}

fn handshake_failed(kind: &'static str) {
    if let Some(hook) = HANDSHAKE_FAILED.get() {
        hook(kind);
    }
}

/// Accepts TLS connections on `listener` under `config`, handshakes
/// concurrently (each within a timeout), and yields what `accepted` makes
/// of each completed one (`None` drops it). `kind` names the listener in
/// logs.
pub fn tls_incoming<T, F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    kind: &'static str,
    accepted: F,
) -> ReceiverStream<io::Result<T>>
where
    T: Send + 'static,
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr) -> Option<T>
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let accepted = Arc::new(accepted);
    // Handshakes in progress hold a task and a buffer each: bounded, so a
    // flood of connections that never finish TLS cannot grow them.
    let limit = max_pending_handshakes();
    let pending = Arc::new(tokio::sync::Semaphore::new(limit));
    tokio::spawn(async move {
        let mut backoff = crate::server::AcceptBackoff::new();
        let mut refused: u64 = 0;
        loop {
            let (tcp, remote_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => {
                        backoff.succeeded();
                        pair
                    }
                    Err(error) => {
                        // Out of file descriptors or memory: wait for some
                        // to be freed instead of spinning.
                        let wait = backoff.failed();
                        tracing::warn!(%error, wait_ms = wait.as_millis() as u64, "accept failed");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(peer.addr = %remote_addr, kind, refused, limit, "too many TLS handshakes in progress; connection closed");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    // A bare TCP probe (health checkers, port scans) closes
                    // before any TLS: not worth a warning.
                    Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(peer.addr = %remote_addr, %error, "connection closed before the TLS handshake");
                        return;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(peer.addr = %remote_addr, %error, kind, "TLS handshake refused");
                        handshake_failed(kind);
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer.addr = %remote_addr, kind, "TLS handshake timed out");
                        handshake_failed(kind);
                        return;
                    }
                };
                if let Some(stream) = accepted(tls, remote_addr) {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Opens an mTLS connection to `addr`, checking the server against
/// `config`'s expected peer.
///
/// With TLS 1.3 the server judges the client's certificate only after the
/// client's side of the handshake is over, so a refusal would otherwise
/// surface later as a bare "connection closed". An HTTP/2 server speaks
/// first (its SETTINGS frame), so this waits for those first bytes: a
/// refused client gets the server's alert (`UnknownCA`,
/// `CertificateExpired`, ...) as the connect error, and the bytes read are
/// replayed to the caller.
pub async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<MeshClientStream> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let mut first = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut tls, &mut first).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("{addr} closed the connection right after the TLS handshake"),
            ));
        }
        first.truncate(n);
        Ok(MeshClientStream {
            inner: tls,
            replay: first,
            replay_pos: 0,
        })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("mTLS handshake with {addr} timed out"),
            )
        })?
        .map_err(|e| io::Error::new(e.kind(), format!("mTLS to {addr}: {e}")))
}

/// A client-side mTLS stream (see [`connect`]).
#[derive(Debug)]
pub struct MeshClientStream {
    inner: tokio_rustls::client::TlsStream<TcpStream>,
    replay: Vec<u8>,
    replay_pos: usize,
}

impl MeshClientStream {
    /// The TLS session, e.g. to read the peer's certificates.
    pub fn session(&self) -> &rustls::ClientConnection {
        self.inner.get_ref().1
    }
}

impl AsyncRead for MeshClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay_pos < self.replay.len() {
            let n = buf.remaining().min(self.replay.len() - self.replay_pos);
            let start = self.replay_pos;
            buf.put_slice(&self.replay[start..start + n]);
            self.replay_pos += n;
            if self.replay_pos == self.replay.len() {
                self.replay = Vec::new();
                self.replay_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

delegate_async_write!(MeshClientStream);

/// A lazily connecting tonic channel to `addr` over mTLS, accepting only a
/// server that matches `expected`.
pub fn channel(
    workload: &Workload,
    addr: SocketAddr,
    expected: ExpectedPeer,
) -> Result<tonic::transport::Channel, IdentityError> {
    let config = workload.client_config(expected)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?
        .connect_timeout(HANDSHAKE_TIMEOUT);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let config = config.clone();
            async move {
                connect(addr, config)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        })),
    )
}

/// A lazily connecting mTLS channel to `target` (`host:port`, a DNS name
/// or an IP address), resolved again on every connection: its addresses
/// are tried in turn, from the `start`-th (so a caller moving on from a
/// replica that answers badly can start a new channel further along).
pub fn channel_to(
    workload: &Workload,
    target: &str,
    start: usize,
    expected: ExpectedPeer,
) -> Result<tonic::transport::Channel, IdentityError> {
    /// Time for one address: a replica that is gone costs this, not the
    /// whole handshake timeout.
    const EACH: Duration = Duration::from_secs(3);
    let config = workload.client_config(expected)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| IdentityError::Tls(rustls::Error::General(format!("{target}: {e}"))))?
        .connect_timeout(HANDSHAKE_TIMEOUT);
    let target = target.to_owned();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let (config, target) = (config.clone(), target.clone());
            async move {
                let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target)
                    .await
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{target} does not resolve: {e}"),
                        )
                    })?
                    .collect();
                addrs.truncate(64);
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{target} resolves to no address"),
                    ));
                }
                let n = addrs.len();
                addrs.rotate_left(start % n);
                let mut last = None;
                for addr in addrs {
                    match tokio::time::timeout(EACH, connect(addr, config.clone())).await {
                        Ok(Ok(stream)) => return Ok(hyper_util::rt::TokioIo::new(stream)),
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {
                            last = Some(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("{addr} ({target}) did not complete mTLS within {EACH:?}"),
                            ))
                        }
                    }
                }
                Err(last.expect("at least one address"))
            }
        })),
    )
}
