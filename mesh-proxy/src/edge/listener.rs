//! The edge's external listener: h2c, or TLS with a certificate from a
//! file (ALPN h2 and http/1.1, no client certificate: external callers
//! authenticate with API keys or tokens).

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// The TLS configuration of the external listener, from PEM files.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = trellis::identity::read_certs(cert)?;
    let key_der = trellis::identity::read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(trellis::tls::provider().clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            anyhow::anyhow!(
                "{} and {}: the key does not match the certificate or is unusable: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TLS connections on `listener`; handshakes run concurrently
/// with a timeout, so one slow client never holds up the others.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    trellis::tls::tls_incoming(listener, config, "edge", |tls, _| Some(tls))
}
