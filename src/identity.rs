//! Workload identity: SPIFFE IDs and the certificate, key and CA files that
//! carry them.
//!
//! A workload's identity is the SPIFFE ID in its certificate's URI SAN:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`. One CA signs every
//! certificate of a trust domain. [`Workload::load`] reads the files a
//! process was given and checks them up front, so a bad file is reported by
//! name at start-up rather than as a failed handshake later;
//! [`Workload::watch`] reads them again when they change (rotation needs no
//! restart), keeping the last good ones when the new ones are unusable and
//! never letting a process change its SPIFFE ID.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";
/// The namespace used when none is configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Something wrong with an identity, a certificate or a key, with the file
/// it came from when there is one.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read at all.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file was read but its content is unusable.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words a person can act on.
        reason: String,
    },
    /// A string is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    BadSpiffeId {
        /// The offending text.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A certificate carries no usable SPIFFE ID.
    #[error("certificate has no SPIFFE ID: {0}")]
    NoSpiffeId(String),
    /// TLS configuration could not be built from otherwise valid files.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A SPIFFE ID such as `spiffe://trellis.local/ns/default/sa/usage`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (just after the trust domain).
    path_start: usize,
}

impl SpiffeId {
    const SCHEME: &'static str = "spiffe://";

    /// Parses and validates a SPIFFE ID (lower-case trust domain, a
    /// non-empty path of non-empty segments, no query or fragment).
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bad = |reason| IdentityError::BadSpiffeId {
            id: text.to_owned(),
            reason,
        };
        let rest = text
            .strip_prefix(Self::SCHEME)
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if domain.is_empty() {
            return Err(bad("trust domain is empty"));
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "trust domain may only hold lower-case letters, digits, '-', '.' and '_'",
            ));
        }
        if path.is_empty() || path == "/" {
            return Err(bad("path is empty; expected /ns/<namespace>/sa/<service>"));
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("path segments must be non-empty and not '.' or '..'"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad(
                    "path segments may only hold letters, digits, '-', '.' and '_'",
                ));
            }
        }
        Ok(Self {
            uri: text.to_owned(),
            path_start: Self::SCHEME.len() + domain.len(),
        })
    }

    /// The ID of a mesh service: `spiffe://<domain>/ns/<namespace>/sa/<service>`.
    pub fn for_service(
        trust_domain: &str,
        namespace: &str,
        service: &str,
    ) -> Result<Self, IdentityError> {
        Self::parse(&format!(
            "{}{trust_domain}/ns/{namespace}/sa/{service}",
            Self::SCHEME
        ))
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain, e.g. `trellis.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[Self::SCHEME.len()..self.path_start]
    }

    /// The path, e.g. `/ns/default/sa/usage`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The mesh service this ID names, when it has the
    /// `/ns/<namespace>/sa/<service>` form.
    pub fn service(&self) -> Option<&str> {
        match self.path()[1..].split('/').collect::<Vec<_>>()[..] {
            ["ns", _, "sa", service] => Some(service),
            _ => None,
        }
    }

    /// The namespace, when the ID has the `/ns/<namespace>/sa/<service>` form.
    pub fn namespace(&self) -> Option<&str> {
        match self.path()[1..].split('/').collect::<Vec<_>>()[..] {
            ["ns", namespace, "sa", _] => Some(namespace),
            _ => None,
        }
    }

    /// The mesh service this ID names, only when it is in `trust_domain`
    /// and `namespace`: `spiffe://<trust_domain>/ns/<namespace>/sa/<service>`.
    ///
    /// Authorization decisions must use this rather than [`Self::service`]:
    /// one CA may sign identities for several namespaces (or, with a shared
    /// bundle, trust domains), and `ns/other/sa/usage` is not `usage`.
    pub fn service_in(&self, trust_domain: &str, namespace: &str) -> Option<&str> {
        if self.trust_domain() != trust_domain || self.namespace() != Some(namespace) {
            return None;
        }
        self.service()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Reads the SPIFFE ID from a DER certificate's URI SAN. Exactly one
/// `spiffe://` URI must be present.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| IdentityError::NoSpiffeId(format!("certificate does not parse: {e}")))?;
    let mut found = None;
    for ext in parsed.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with(SpiffeId::SCHEME)
                {
                    if found.is_some() {
                        return Err(IdentityError::NoSpiffeId(
                            "more than one spiffe:// URI SAN".into(),
                        ));
                    }
                    found = Some(SpiffeId::parse(uri)?);
                }
            }
        }
    }
    found.ok_or_else(|| IdentityError::NoSpiffeId("no spiffe:// URI SAN".into()))
}

/// The three files that make a workload's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificate(s) of the mesh CA the peers must chain to.
    pub ca: PathBuf,
}

impl IdentityPaths {
    /// The conventional layout written by `trellis certs`:
    /// `<dir>/<name>.pem`, `<dir>/<name>.key` and `<dir>/ca.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }
}

/// A loaded, checked workload identity: its SPIFFE ID, which never
/// changes, and its credentials (certificate chain, key and the CA bundle
/// peers must chain to), which [`Workload::watch`] replaces when their
/// files change. The TLS configurations built from a workload (see
/// [`crate::tls`]) always present and verify with the current credentials.
pub struct Workload {
    id: SpiffeId,
    current: Arc<ArcSwap<Credentials>>,
}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload")
            .field("id", &self.id)
            .field("credentials", &**self.current.load())
            .finish()
    }
}

/// How often [`Workload::watch`] reads the identity files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a certificate must be valid now to be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    /// Valid now.
    Now,
    /// Outside its validity period too (everything else is still
    /// checked); [`Workload::validity_problem`] reports it.
    Any,
}

/// One generation of a workload's credentials: what its files held when
/// they were last read successfully.
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// The chain and key, ready to present.
    pub(crate) certified: Arc<rustls::sign::CertifiedKey>,
    /// Checks client certificates against `roots` (webpki).
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    /// A digest of the files they were read from (zeros when built in
    /// memory): the watch reads the files again only when this changes.
    source: [u8; 32],
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("serial", &self.serial)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// What is wrong with a set of credentials, and which part is at fault.
enum Problem {
    Cert(String),
    Key(String),
}

impl Credentials {
    /// Checks `chain`, `key` and `roots` together: the leaf parses and
    /// carries a SPIFFE ID, chains to `roots` (and, with `Window::Now`, is
    /// valid now), and the key is the leaf's.
    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
        window: Window,
    ) -> Result<(SpiffeId, Self), Problem> {
        let leaf = chain
            .first()
            .ok_or_else(|| Problem::Cert("no certificate found".into()))?;
        let id = spiffe_id_of(leaf)
            .map_err(|e| Problem::Cert(format!("certificate has no SPIFFE ID: {e}")))?;
        let (_, x509) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| Problem::Cert(format!("certificate does not parse: {e}")))?;
        let validity = x509.validity();
        let not_before = system_time(validity.not_before.timestamp());
        let not_after = system_time(validity.not_after.timestamp());
        let serial = x509.raw_serial_as_string();
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| Problem::Cert(format!("certificate does not parse: {e}")))?;
        let verify_at = |at: UnixTime| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &chain[1..],
                at,
                crate::tls::provider().signature_verification_algorithms.all,
            )
        };
        let checked = match verify_at(UnixTime::now()) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. }
                | rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. },
            )) if window == Window::Any => {
                // Everything but the time: check the chain at a moment
                // inside the certificate's own validity period.
                let inside = if SystemTime::now() > not_after {
                    not_after - Duration::from_secs(1)
                } else {
                    not_before + Duration::from_secs(1)
                };
                verify_at(UnixTime::since_unix_epoch(
                    inside.duration_since(UNIX_EPOCH).unwrap_or_default(),
                ))
            }
            other => other,
        };
        checked.map_err(|e| {
            Problem::Cert(format!(
                "certificate for {id} is not usable with this CA: {e}"
            ))
        })?;
        let certified = crate::tls::certified_key(&chain, &key).map_err(Problem::Key)?;
        let roots = Arc::new(roots);
        let client_verifier = crate::tls::webpki_client_verifier(roots.clone())
            .map_err(|e| Problem::Cert(format!("the CA bundle is not usable: {e}")))?;
        Ok((
            id,
            Self {
                chain,
                key,
                roots,
                certified,
                client_verifier,
                not_before,
                not_after,
                serial,
                source: [0; 32],
            },
        ))
    }

    /// Reads and checks the three files; every error names the file at
    /// fault.
    fn read(paths: &IdentityPaths, window: Window) -> Result<(SpiffeId, Self), IdentityError> {
        let files = ReadFiles::read(paths)?;
        Self::parse(paths, &files, window)
    }

    fn parse(
        paths: &IdentityPaths,
        files: &ReadFiles,
        window: Window,
    ) -> Result<(SpiffeId, Self), IdentityError> {
        let chain = parse_certs(&paths.cert, &files.cert)?;
        let key = parse_key(&paths.key, &files.key)?;
        let mut roots = RootCertStore::empty();
        for cert in parse_certs(&paths.ca, &files.ca)? {
            roots.add(cert).map_err(|e| IdentityError::BadFile {
                path: paths.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let (id, mut credentials) =
            Self::build(chain, key, roots, window).map_err(|problem| match problem {
                Problem::Cert(reason) => IdentityError::BadFile {
                    path: paths.cert.clone(),
                    reason,
                },
                // Key mismatch is only visible once both are parsed together.
                Problem::Key(reason) => IdentityError::BadFile {
                    path: paths.key.clone(),
                    reason: format!(
                        "does not match certificate {}: {reason}",
                        paths.cert.display()
                    ),
                },
            })?;
        credentials.source = files.digest;
        Ok((id, credentials))
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The CA certificates peers must chain to.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The leaf certificate's serial number (hex, `01:a2:...`).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// When the leaf certificate's validity ends.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// The identity files' contents, as read together.
struct ReadFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
    digest: [u8; 32],
}

impl ReadFiles {
    fn read(paths: &IdentityPaths) -> Result<Self, IdentityError> {
        let (cert, key, ca) = (
            read_file(&paths.cert)?,
            read_file(&paths.key)?,
            read_file(&paths.ca)?,
        );
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&cert, &key, &ca] {
            digest.update(&(part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        let mut out = [0; 32];
        out.copy_from_slice(digest.finish().as_ref());
        Ok(Self {
            cert,
            key,
            ca,
            digest: out,
        })
    }
}

fn system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}

/// How long ago (or until) `t`, rounded to the second, for people.
fn distance(t: SystemTime, now: SystemTime) -> String {
    let d = now
        .duration_since(t)
        .or_else(|_| t.duration_since(now))
        .unwrap_or_default();
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

impl Workload {
    /// Loads the certificate, key and CA, and checks that they are usable:
    /// each parses, the key belongs to the certificate, the certificate
    /// carries a SPIFFE ID, is currently valid and chains to the CA.
    /// Every error names the file at fault.
    pub fn load(paths: &IdentityPaths) -> Result<Self, IdentityError> {
        Self::from_credentials(Credentials::read(paths, Window::Now)?)
    }

    /// Like [`Workload::load`], but accepts a certificate outside its
    /// validity period (everything else is checked the same): for a
    /// process that keeps running, reports the problem (see
    /// [`Workload::validity_problem`]) and picks up a renewed certificate
    /// by [`Workload::watch`], rather than exiting.
    pub fn load_allowing_expiry(paths: &IdentityPaths) -> Result<Self, IdentityError> {
        Self::from_credentials(Credentials::read(paths, Window::Any)?)
    }

    fn from_credentials((id, credentials): (SpiffeId, Credentials)) -> Result<Self, IdentityError> {
        Ok(Self {
            id,
            current: Arc::new(ArcSwap::from_pointee(credentials)),
        })
    }

    /// Builds a workload from certificates and a key already in memory
    /// (tests, or a secret store). Checks validity, the chain to `roots`
    /// and that the key is the certificate's.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, IdentityError> {
        let built = Credentials::build(chain, key, roots, Window::Now).map_err(|problem| {
            let reason = match problem {
                Problem::Cert(reason) => reason,
                Problem::Key(reason) => format!("the private key: {reason}"),
            };
            IdentityError::BadFile {
                path: PathBuf::new(),
                reason,
            }
        })?;
        Self::from_credentials(built)
    }

    /// This workload's SPIFFE ID (the same for the life of the process:
    /// a reload never changes it).
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The credentials in use now.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// Another handle on the same identity (the same credentials cell).
    fn share(&self) -> Self {
        Self {
            id: self.id.clone(),
            current: self.current.clone(),
        }
    }

    /// The shared cell holding the current credentials, for the TLS
    /// configurations that present and verify with them.
    pub(crate) fn current(&self) -> &Arc<ArcSwap<Credentials>> {
        &self.current
    }

    /// Why the current certificate cannot be used now (it has expired,
    /// or is not valid yet), in words that say what to do; `None` when it
    /// is within its validity period.
    pub fn validity_problem(&self) -> Option<String> {
        let c = self.current.load();
        let now = SystemTime::now();
        if now > c.not_after {
            Some(format!(
                "certificate {} of {} expired at {} ({} ago); renew it: new files are read without a restart",
                c.serial,
                self.id,
                humantime::format_rfc3339_seconds(c.not_after),
                distance(c.not_after, now),
            ))
        } else if now < c.not_before {
            Some(format!(
                "certificate {} of {} is not valid until {} (in {}); is the clock right?",
                c.serial,
                self.id,
                humantime::format_rfc3339_seconds(c.not_before),
                distance(c.not_before, now),
            ))
        } else {
            None
        }
    }

    /// Reads the identity files again and, if they changed and are good,
    /// makes them the current credentials: new connections present the
    /// new certificate and verify peers against the new CA bundle, while
    /// connections already open are left as they are.
    ///
    /// Refused, keeping the current credentials: files that do not parse
    /// or do not fit together, a new certificate that is not valid now or
    /// does not chain to the (new) CA bundle, and a certificate with
    /// another SPIFFE ID (a process keeps its identity for life).
    pub fn reload(&self, paths: &IdentityPaths) -> Result<Reloaded, IdentityError> {
        let files = ReadFiles::read(paths)?;
        let current = self.current.load();
        if files.digest == current.source {
            return Ok(Reloaded::Unchanged);
        }
        // A new certificate must be valid now; with the same one (only the
        // CA bundle changed) its validity is no news.
        let same_leaf = parse_certs(&paths.cert, &files.cert)
            .ok()
            .and_then(|c| c.into_iter().next())
            .is_some_and(|leaf| current.chain.first() == Some(&leaf));
        let window = if same_leaf { Window::Any } else { Window::Now };
        let (id, new) = Credentials::parse(paths, &files, window)?;
        if id != self.id {
            return Err(IdentityError::BadFile {
                path: paths.cert.clone(),
                reason: format!(
                    "the new certificate has SPIFFE ID {id}, but this process is {}; \
                     a workload keeps its SPIFFE ID for life (restart it to take another)",
                    self.id
                ),
            });
        }
        let reloaded = Reloaded::Replaced {
            certificate: !same_leaf,
            ca: current.roots.roots != new.roots.roots,
            serial: new.serial.clone(),
            not_after: new.not_after,
        };
        self.current.store(Arc::new(new));
        Ok(reloaded)
    }

    /// Follows the identity files from a task: every [`RELOAD_INTERVAL`]
    /// they are read, and when their contents change they are reloaded
    /// (see [`Workload::reload`]). A reload is logged; a refused one is
    /// logged with why (once per problem), and the last good credentials
    /// stay. The task stops when the returned guard is dropped. Needs a
    /// Tokio runtime.
    pub fn watch(&self, paths: IdentityPaths) -> IdentityWatch {
        let workload = self.share();
        IdentityWatch(tokio::spawn(async move {
            let mut interval = tokio::time::interval(RELOAD_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reported: Option<String> = None;
            loop {
                interval.tick().await;
                // File reads block: off the runtime's threads.
                let result = tokio::task::spawn_blocking({
                    let (workload, paths) = (workload.share(), paths.clone());
                    move || workload.reload(&paths)
                })
                .await;
                let Ok(result) = result else { return };
                match result {
                    Ok(Reloaded::Unchanged) => reported = None,
                    Ok(Reloaded::Replaced {
                        certificate,
                        ca,
                        serial,
                        not_after,
                    }) => {
                        reported = None;
                        tracing::info!(
                            identity = %workload.id,
                            certificate,
                            ca,
                            cert.serial = %serial,
                            cert.not_after = %humantime::format_rfc3339_seconds(not_after),
                            "identity files reloaded; new connections use them"
                        );
                    }
                    Err(error) => {
                        let why = error.to_string();
                        if reported.as_ref() != Some(&why) {
                            tracing::warn!(
                                identity = %workload.id,
                                %error,
                                "identity files changed but are not usable; keeping the current certificate and CA"
                            );
                            reported = Some(why);
                        }
                    }
                }
            }
        }))
    }
}

/// What [`Workload::reload`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold what is already in use.
    Unchanged,
    /// New credentials are in use.
    Replaced {
        /// The certificate (and key) changed.
        certificate: bool,
        /// The CA bundle changed.
        ca: bool,
        /// The new certificate's serial number.
        serial: String,
        /// When it expires.
        not_after: SystemTime,
    },
}

/// Stops [`Workload::watch`]'s task when dropped.
#[derive(Debug)]
pub struct IdentityWatch(tokio::task::JoinHandle<()>);

impl Drop for IdentityWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every PEM certificate in a file; at least one is required.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    parse_certs(path, &read_file(path)?)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadFile {
            path: path.to_path_buf(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::BadFile {
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first PEM private key in a file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    parse_key(path, &read_file(path)?)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, IdentityError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| IdentityError::BadFile {
            path: path.to_path_buf(),
            reason: format!("malformed PEM: {e}"),
        })?
        .ok_or_else(|| IdentityError::BadFile {
            path: path.to_path_buf(),
            reason: "no PEM PRIVATE KEY block found".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_ids() {
        let id = SpiffeId::parse("spiffe://trellis.local/ns/default/sa/usage").unwrap();
        assert_eq!(id.trust_domain(), "trellis.local");
        assert_eq!(id.path(), "/ns/default/sa/usage");
        assert_eq!(id.service(), Some("usage"));
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(
            SpiffeId::for_service("trellis.local", "default", "usage").unwrap(),
            id
        );
    }

    #[test]
    fn service_in_requires_the_trust_domain_and_namespace() {
        let id = SpiffeId::parse("spiffe://trellis.local/ns/default/sa/usage").unwrap();
        assert_eq!(id.service_in("trellis.local", "default"), Some("usage"));
        for (domain, namespace) in [
            ("trellis.local", "other"),
            ("other.local", "default"),
            ("trellis.local", "defaul"),
            ("trellis.local", ""),
        ] {
            assert_eq!(
                id.service_in(domain, namespace),
                None,
                "{domain} {namespace}"
            );
        }
        let other = SpiffeId::parse("spiffe://trellis.local/ns/other/sa/settlement").unwrap();
        assert_eq!(other.service(), Some("settlement"));
        assert_eq!(other.service_in("trellis.local", "default"), None);
        // Not of the /ns/<ns>/sa/<service> form at all.
        let plain = SpiffeId::parse("spiffe://trellis.local/ns/default/sa/usage/x").unwrap();
        assert_eq!(plain.service_in("trellis.local", "default"), None);
    }

    mod reload {
        use super::*;
        use crate::certs::{CertAuthority, IssuedCert};

        fn id(service: &str) -> SpiffeId {
            SpiffeId::for_service(DEFAULT_TRUST_DOMAIN, DEFAULT_NAMESPACE, service).unwrap()
        }

        fn install(paths: &IdentityPaths, issued: &IssuedCert, ca: &str) {
            std::fs::write(&paths.cert, &issued.cert_pem).unwrap();
            std::fs::write(&paths.key, &issued.key_pem).unwrap();
            std::fs::write(&paths.ca, ca).unwrap();
        }

        fn setup() -> (tempfile::TempDir, IdentityPaths, CertAuthority) {
            let dir = tempfile::tempdir().unwrap();
            let paths = IdentityPaths::in_dir(dir.path(), "usage");
            let ca = CertAuthority::generate(DEFAULT_TRUST_DOMAIN, 1).unwrap();
            install(&paths, &ca.issue(&id("usage"), 1).unwrap(), ca.cert_pem());
            (dir, paths, ca)
        }

        #[test]
        fn a_new_certificate_with_the_same_id_replaces_the_old() {
            let (_dir, paths, ca) = setup();
            let workload = Workload::load(&paths).unwrap();
            assert_eq!(workload.reload(&paths).unwrap(), Reloaded::Unchanged);
            let before = workload.credentials().serial().to_owned();
            install(&paths, &ca.issue(&id("usage"), 1).unwrap(), ca.cert_pem());
            match workload.reload(&paths).unwrap() {
                Reloaded::Replaced {
                    certificate: true,
                    ca: false,
                    serial,
                    ..
                } => assert_ne!(serial, before),
                other => panic!("{other:?}"),
            }
            assert_ne!(workload.credentials().serial(), before);
        }

        #[test]
        fn bad_files_and_other_identities_are_refused_and_the_last_good_stays() {
            let (_dir, paths, ca) = setup();
            let workload = Workload::load(&paths).unwrap();
            let serial = workload.credentials().serial().to_owned();
            install(&paths, &ca.issue(&id("billing"), 1).unwrap(), ca.cert_pem());
            let e = workload.reload(&paths).unwrap_err().to_string();
            assert!(e.contains("sa/billing") && e.contains("SPIFFE ID"), "{e}");
            std::fs::write(&paths.cert, "garbage").unwrap();
            let e = workload.reload(&paths).unwrap_err().to_string();
            assert!(e.contains("usage.pem"), "{e}");
            // Certificate and key from two issues: a rotation half written.
            let (one, two) = (
                ca.issue(&id("usage"), 1).unwrap(),
                ca.issue(&id("usage"), 1).unwrap(),
            );
            std::fs::write(&paths.cert, &one.cert_pem).unwrap();
            std::fs::write(&paths.key, &two.key_pem).unwrap();
            let e = workload.reload(&paths).unwrap_err().to_string();
            assert!(e.contains("usage.key"), "{e}");
            let now = time::OffsetDateTime::now_utc();
            let expired = ca
                .issue_with_validity(
                    &id("usage"),
                    now - time::Duration::days(2),
                    now - time::Duration::days(1),
                )
                .unwrap();
            install(&paths, &expired, ca.cert_pem());
            let e = workload.reload(&paths).unwrap_err().to_string();
            assert!(e.contains("xpired"), "{e}");
            assert_eq!(workload.credentials().serial(), serial);
            assert_eq!(workload.id(), &id("usage"));
        }

        #[test]
        fn the_ca_bundle_rotates_only_with_certificates_that_chain_to_it() {
            let (_dir, paths, old) = setup();
            let workload = Workload::load(&paths).unwrap();
            let issued = ca_issue(&old);
            install(&paths, &issued, old.cert_pem());
            workload.reload(&paths).unwrap();
            let new = CertAuthority::generate(DEFAULT_TRUST_DOMAIN, 1).unwrap();
            let both = format!("{}{}", old.cert_pem(), new.cert_pem());
            std::fs::write(&paths.ca, &both).unwrap();
            assert!(matches!(
                workload.reload(&paths).unwrap(),
                Reloaded::Replaced {
                    certificate: false,
                    ca: true,
                    ..
                }
            ));
            assert_eq!(workload.credentials().roots().len(), 2);
            // Only the new CA, but still the old CA's certificate: refused.
            std::fs::write(&paths.ca, new.cert_pem()).unwrap();
            assert!(workload.reload(&paths).is_err());
            assert_eq!(workload.credentials().roots().len(), 2);
            install(&paths, &ca_issue(&new), new.cert_pem());
            workload.reload(&paths).unwrap();
            assert_eq!(workload.credentials().roots().len(), 1);
        }

        fn ca_issue(ca: &CertAuthority) -> IssuedCert {
            ca.issue(&id("usage"), 1).unwrap()
        }

        #[test]
        fn an_expired_certificate_loads_only_when_allowed_and_says_so() {
            let (_dir, paths, ca) = setup();
            let now = time::OffsetDateTime::now_utc();
            let expired = ca
                .issue_with_validity(
                    &id("usage"),
                    now - time::Duration::days(2),
                    now - time::Duration::days(1),
                )
                .unwrap();
            install(&paths, &expired, ca.cert_pem());
            assert!(Workload::load(&paths).is_err());
            let workload = Workload::load_allowing_expiry(&paths).unwrap();
            let problem = workload.validity_problem().unwrap();
            assert!(
                problem.contains("expired at") && problem.contains("sa/usage"),
                "{problem}"
            );
            // Everything else is still checked.
            let other = CertAuthority::generate(DEFAULT_TRUST_DOMAIN, 1).unwrap();
            std::fs::write(&paths.ca, other.cert_pem()).unwrap();
            assert!(Workload::load_allowing_expiry(&paths).is_err());
            std::fs::write(&paths.ca, ca.cert_pem()).unwrap();
            // A renewal is taken, and the problem is gone.
            install(&paths, &ca_issue(&ca), ca.cert_pem());
            workload.reload(&paths).unwrap();
            assert_eq!(workload.validity_problem(), None);
        }
    }

    #[test]
    fn other_paths_have_no_service() {
        let id = SpiffeId::parse("spiffe://example.org/workload").unwrap();
        assert_eq!(id.service(), None);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://trellis.local/ns/a/sa/b",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Trellis/ns/a",
            "spiffe://trellis.local",
            "spiffe://trellis.local/",
            "spiffe://trellis.local//a",
            "spiffe://trellis.local/a/../b",
            "spiffe://trellis.local/a?b=c",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
