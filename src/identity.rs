//! Workload identity: SPIFFE IDs and the certificate, key and CA files that
//! carry them.
//!
//! A workload's identity is the SPIFFE ID in its certificate's URI SAN:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`. One CA signs every
//! certificate of a trust domain. [`Workload::load`] reads the files a
//! process was given and checks them up front, so a bad file is reported by
//! name at start-up rather than as a failed handshake later.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
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

/// A loaded, checked workload identity: its certificate chain, its key, and
/// the CA its peers must chain to.
pub struct Workload {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// Loads the certificate, key and CA, and checks that they are usable:
    /// each parses, the key belongs to the certificate, the certificate
    /// carries a SPIFFE ID, is currently valid and chains to the CA.
    /// Every error names the file at fault.
    pub fn load(paths: &IdentityPaths) -> Result<Self, IdentityError> {
        let chain = read_certs(&paths.cert)?;
        let key = read_key(&paths.key)?;
        let ca = read_certs(&paths.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| IdentityError::BadFile {
                path: paths.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let workload = Self::from_parts(chain, key, roots).map_err(|e| match e {
            IdentityError::BadFile { path, reason } if path.as_os_str().is_empty() => {
                IdentityError::BadFile {
                    path: paths.cert.clone(),
                    reason,
                }
            }
            IdentityError::NoSpiffeId(reason) => IdentityError::BadFile {
                path: paths.cert.clone(),
                reason: format!("certificate has no SPIFFE ID: {reason}"),
            },
            other => other,
        })?;
        // Key mismatch is only visible once both are parsed together.
        crate::tls::check_key_matches(&workload.chain, &workload.key).map_err(|reason| {
            IdentityError::BadFile {
                path: paths.key.clone(),
                reason: format!(
                    "does not match certificate {}: {reason}",
                    paths.cert.display()
                ),
            }
        })?;
        Ok(workload)
    }

    /// Builds a workload from certificates and a key already in memory
    /// (tests, or a secret store). Checks validity and the chain to `roots`.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or_else(|| IdentityError::BadFile {
            path: PathBuf::new(),
            reason: "no certificate found".into(),
        })?;
        let id = spiffe_id_of(leaf)?;
        let bad = |reason: String| IdentityError::BadFile {
            path: PathBuf::new(),
            reason,
        };
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| bad(format!("certificate does not parse: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            crate::tls::provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            bad(format!(
                "certificate for {id} is not usable with this CA: {e}"
            ))
        })?;
        Ok(Self {
            id,
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    /// This workload's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
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
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every PEM certificate in a file; at least one is required.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
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
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
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
