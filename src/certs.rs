//! A development certificate authority and workload certificates.
//!
//! `trellis certs` writes `ca.pem`/`ca.key` and `<workload>.pem`/`<workload>.key`
//! into a directory. An existing CA is kept, so certificates issued earlier
//! stay valid; workload certificates are issued anew on every run. Tests use
//! the same code to make CAs and certificates on the fly.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::SpiffeId;

/// Failure to make or store certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Key or certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// Why it failed.
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An existing CA file is unusable.
    #[error("{}: existing CA is unusable: {reason} (move it away to make a new CA)", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A certificate authority that can issue workload certificates.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Generate { what, source }
}

impl CertAuthority {
    /// Makes a new self-signed CA for `trust_domain`, valid for `days`.
    pub fn generate(trust_domain: &str, days: i64) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        // A distinct name per CA: a certificate from another CA of the same
        // trust domain is then reported as an unknown issuer, not as a bad
        // signature from a namesake.
        let tag: u32 = rand::random();
        dn.push(
            DnType::CommonName,
            format!("Trellis mesh CA {trust_domain} {tag:08x}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a workload certificate for `id`, valid from `not_before` to
    /// `not_after`, usable for both TLS server and client authentication.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertError> {
        self.issue_for_hosts(id, &[], not_before, not_after)
    }

    /// Issues a workload certificate for `id` that also names `hosts` (DNS
    /// names or IP addresses), for clients that check the host they dial
    /// as well: gRPC's xDS clients dialing the registry.
    pub fn issue_for_hosts(
        &self,
        id: &SpiffeId,
        hosts: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertError> {
        let what = format!("certificate for {id}");
        let key = KeyPair::generate().map_err(gen_err(what.clone()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, id.service().unwrap_or(id.path()));
        params.distinguished_name = dn;
        let uri = id
            .as_str()
            .to_owned()
            .try_into()
            .map_err(gen_err(what.clone()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for host in hosts {
            params.subject_alt_names.push(host_san(host, &what)?);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a TLS server certificate for external clients (the edge's
    /// listener) naming `names`: DNS names, or IP addresses, as clients
    /// dial them. Not a mesh identity: it has no SPIFFE ID.
    pub fn issue_server(&self, names: &[String], days: i64) -> Result<IssuedCert, CertError> {
        let what = format!("server certificate for {}", names.join(", "));
        let key = KeyPair::generate().map_err(gen_err(what.clone()))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err(what.clone()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            names.first().map_or("edge", String::as_str),
        );
        params.distinguished_name = dn;
        for name in names {
            params.subject_alt_names.push(host_san(name, &what)?);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a workload certificate for `id`, valid for `days` from now.
    pub fn issue(&self, id: &SpiffeId, days: i64) -> Result<IssuedCert, CertError> {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(id, now - Duration::minutes(5), now + Duration::days(days))
    }
}

/// A DNS name or IP address as a subject alternative name.
fn host_san(host: &str, what: &str) -> Result<SanType, CertError> {
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            host.to_owned()
                .try_into()
                .map_err(gen_err(what.to_owned()))?,
        ),
    })
}

/// The hosts the registry's certificate names besides its SPIFFE ID: what
/// gRPC's xDS clients on this machine dial it by, and check.
pub const REGISTRY_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What `write_dev_certs` did.
#[derive(Debug)]
pub struct CertReport {
    /// Whether a new CA was made (false: the existing one was kept).
    pub created_ca: bool,
    /// The workload certificates written, with their identities.
    pub workloads: Vec<(SpiffeId, PathBuf)>,
    /// The edge's server certificate (`edge-server.pem`), if names were given.
    pub server: Option<PathBuf>,
}

/// Makes (or keeps) the CA in `dir` and issues one certificate per workload.
pub fn write_dev_certs(
    dir: &Path,
    trust_domain: &str,
    namespace: &str,
    workloads: &[String],
    server_names: &[String],
    days: i64,
) -> Result<CertReport, anyhow::Error> {
    let (ca, created_ca) = load_or_create_ca(dir, trust_domain, days)?;
    let mut written = Vec::new();
    for name in workloads {
        let id = SpiffeId::for_service(trust_domain, namespace, name)?;
        let hosts: Vec<String> = if name == "registry" {
            REGISTRY_HOSTS.iter().map(|h| (*h).to_owned()).collect()
        } else {
            Vec::new()
        };
        let now = OffsetDateTime::now_utc();
        let issued = ca.issue_for_hosts(
            &id,
            &hosts,
            now - Duration::minutes(5),
            now + Duration::days(days),
        )?;
        let cert_path = dir.join(format!("{name}.pem"));
        write_file(&cert_path, &issued.cert_pem, false)?;
        write_file(&dir.join(format!("{name}.key")), &issued.key_pem, true)?;
        written.push((id, cert_path));
    }
    let mut server = None;
    if !server_names.is_empty() {
        let issued = ca.issue_server(server_names, days)?;
        let cert_path = dir.join("edge-server.pem");
        write_file(&cert_path, &issued.cert_pem, false)?;
        write_file(&dir.join("edge-server.key"), &issued.key_pem, true)?;
        server = Some(cert_path);
    }
    Ok(CertReport {
        server,
        created_ca,
        workloads: written,
    })
}

/// Writes `<workload>.xds.json` beside the workload certificate `cert`
/// (`<workload>.pem`, with its key `<workload>.key` and `ca.pem` beside
/// it): a gRPC xDS bootstrap file for a proxyless client with identity
/// `id` that takes its endpoints and policy from the registry at
/// `registry` (host:port) over mTLS (gRFC A65 `tls` channel credentials),
/// and dials services' sidecars with the same certificate through the
/// `trellis` certificate provider (gRFC A29 `file_watcher`, which picks up
/// a renewed certificate). Returns the path written.
pub fn write_xds_bootstrap(
    cert: &Path,
    id: &SpiffeId,
    registry: &str,
    zone: &str,
) -> Result<PathBuf, anyhow::Error> {
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let cert_file = absolute(cert.to_path_buf());
    let key_file = cert_file.with_extension("key");
    let ca_file = cert_file.with_file_name("ca.pem");
    let files = serde_json::json!({
        "ca_certificate_file": ca_file,
        "certificate_file": cert_file,
        "private_key_file": key_file,
    });
    let mut provider = files.clone();
    provider["refresh_interval"] = "60s".into();
    let bootstrap = serde_json::json!({
        "xds_servers": [{
            "server_uri": registry,
            "channel_creds": [{ "type": "tls", "config": files }],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": id.as_str(),
            "cluster": id.service().unwrap_or_default(),
            "locality": { "zone": zone },
        },
        "certificate_providers": {
            "trellis": { "plugin_name": "file_watcher", "config": provider },
        },
    });
    let path = cert_file.with_extension("xds.json");
    write_file(&path, &serde_json::to_string_pretty(&bootstrap)?, false)?;
    Ok(path)
}

/// The CA in `dir` (`ca.pem`, `ca.key`), or a new one written there; true
/// when it was made now.
fn load_or_create_ca(
    dir: &Path,
    trust_domain: &str,
    days: i64,
) -> Result<(CertAuthority, bool), anyhow::Error> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    if ca_cert.exists() || ca_key.exists() {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&ca_cert)?;
        let key_pem = read(&ca_key)?;
        let ca = CertAuthority::from_pem(&cert_pem, &key_pem).map_err(|e| CertError::BadCa {
            path: ca_cert.clone(),
            reason: e.to_string(),
        })?;
        Ok((ca, false))
    } else {
        let ca = CertAuthority::generate(trust_domain, days.max(3650))?;
        write_file(&ca_cert, ca.cert_pem(), false)?;
        write_file(&ca_key, &ca.key_pem(), true)?;
        Ok((ca, true))
    }
}

/// The Secret holding a workload's identity in Kubernetes: keys `ca.pem`,
/// `<workload>.pem` and `<workload>.key`, so that mounted on a directory it
/// looks like a `trellis certs --dir` directory.
pub fn kubernetes_identity_secret(workload: &str) -> String {
    format!("identity-{workload}")
}

/// The Secret (type `kubernetes.io/tls`: `tls.crt`, `tls.key`) holding the
/// TLS edge's server certificate, made with `--server-name`.
pub const KUBERNETES_EDGE_SERVER_SECRET: &str = "edge-server-tls";

/// Longest Kubernetes namespace or object name part we make (a DNS label).
const MAX_DNS_LABEL: usize = 63;

/// What `kubernetes_secrets` made.
#[derive(Debug)]
pub struct KubernetesSecrets {
    /// Whether a new CA was made in the directory (false: the existing one
    /// was kept).
    pub created_ca: bool,
    /// Every Secret's name with the identity its certificate carries
    /// (`None` for the edge's server certificate).
    pub secrets: Vec<(String, Option<SpiffeId>)>,
    /// The Secret manifests: one YAML document per Secret. They hold
    /// private keys: write them only where keys may be.
    pub yaml: String,
}

/// Checks that `name` is a DNS-1123 label (lowercase letters, digits and
/// `-`, starting and ending with a letter or digit, at most 63 characters),
/// as Kubernetes namespaces and the names made from workloads must be.
pub fn check_dns_label(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_DNS_LABEL
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} cannot name a Kubernetes object: use lowercase letters, digits and '-' (not first or last), at most {MAX_DNS_LABEL} characters"
        ))
    }
}

/// Makes (or keeps) the CA in `dir` and issues one certificate per
/// workload, as Kubernetes Secrets in `namespace` (which is also the
/// namespace of the SPIFFE IDs): one Secret per identity, named by
/// [`kubernetes_identity_secret`], holding the CA certificate, the
/// workload's certificate and its key; with `server_names`, the edge's
/// TLS certificate as [`KUBERNETES_EDGE_SERVER_SECRET`]. The CA's key stays
/// in `dir` and is in no Secret; workload keys are written nowhere else.
pub fn kubernetes_secrets(
    dir: &Path,
    trust_domain: &str,
    namespace: &str,
    workloads: &[String],
    server_names: &[String],
    days: i64,
) -> Result<KubernetesSecrets, anyhow::Error> {
    check_dns_label("namespace", namespace).map_err(anyhow::Error::msg)?;
    if workloads.is_empty() {
        anyhow::bail!("no workloads: name them with --workload");
    }
    let mut ids = Vec::with_capacity(workloads.len());
    for name in workloads {
        check_dns_label("workload", name).map_err(anyhow::Error::msg)?;
        ids.push(SpiffeId::for_service(trust_domain, namespace, name)?);
    }
    let (ca, created_ca) = load_or_create_ca(dir, trust_domain, days)?;
    let mut yaml = String::new();
    let mut secrets = Vec::new();
    for (name, id) in workloads.iter().zip(ids) {
        let issued = ca.issue(&id, days)?;
        let secret = kubernetes_identity_secret(name);
        push_secret(
            &mut yaml,
            &format!("The identity {id}, valid for {days} days."),
            &secret,
            namespace,
            "Opaque",
            &[
                ("ca.pem".to_owned(), ca.cert_pem()),
                (format!("{name}.pem"), &issued.cert_pem),
                (format!("{name}.key"), &issued.key_pem),
            ],
        );
        secrets.push((secret, Some(id)));
    }
    if !server_names.is_empty() {
        let issued = ca.issue_server(server_names, days)?;
        push_secret(
            &mut yaml,
            &format!(
                "The TLS edge's server certificate for {}, valid for {days} days.",
                server_names.join(", ")
            ),
            KUBERNETES_EDGE_SERVER_SECRET,
            namespace,
            "kubernetes.io/tls",
            &[
                ("tls.crt".to_owned(), &issued.cert_pem),
                ("tls.key".to_owned(), &issued.key_pem),
            ],
        );
        secrets.push((KUBERNETES_EDGE_SERVER_SECRET.to_owned(), None));
    }
    Ok(KubernetesSecrets {
        created_ca,
        secrets,
        yaml,
    })
}

/// Appends one Secret document. Names and namespace are DNS labels and the
/// values PEM (base64 lines between `-----` lines), so nothing needs
/// quoting; each value is a literal block, as readable as the PEM file.
fn push_secret(
    out: &mut String,
    comment: &str,
    name: &str,
    namespace: &str,
    kind: &str,
    data: &[(String, &str)],
) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "---\n# {comment}\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/part-of: trellis\ntype: {kind}\nstringData:\n"
    );
    for (key, pem) in data {
        let _ = writeln!(out, "  {key}: |");
        for line in pem.lines() {
            let _ = writeln!(out, "    {}", line.trim_end_matches('\r'));
        }
    }
}

/// Writes a file; private files are created readable by the owner only.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}
