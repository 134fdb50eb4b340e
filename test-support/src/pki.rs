//! Certificate authorities and workload certificates made at test time.

use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};
use trellis::certs::{CertAuthority, write_file};
use trellis::identity::{DEFAULT_NAMESPACE, IdentityPaths, SpiffeId};

/// A CA in a temporary directory that issues workload certificates as files.
#[derive(Debug)]
pub struct TestPki {
    ca: CertAuthority,
    trust_domain: String,
    dir: tempfile::TempDir,
}

impl TestPki {
    /// A new CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let ca = CertAuthority::generate(trust_domain, 1).expect("test CA");
        let dir = tempfile::tempdir().expect("temporary directory");
        write_file(&dir.path().join("ca.pem"), ca.cert_pem(), false).expect("write CA");
        Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            dir,
        }
    }

    /// The directory the files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a TLS server certificate for `names` (DNS names or IPs), as
    /// the edge's external listener uses: (certificate file, key file).
    pub fn issue_server(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let issued = self.ca.issue_server(&names, 1).expect("server certificate");
        let cert = self.dir.path().join("edge-server.pem");
        let key = self.dir.path().join("edge-server.key");
        write_file(&cert, &issued.cert_pem, false).expect("write certificate");
        write_file(&key, &issued.key_pem, true).expect("write key");
        (cert, key)
    }

    /// The SPIFFE ID of `service` in this trust domain.
    pub fn id(&self, service: &str) -> SpiffeId {
        SpiffeId::for_service(&self.trust_domain, DEFAULT_NAMESPACE, service).expect("valid id")
    }

    /// Issues a currently valid certificate for `service`; the files are
    /// named after `file_name`.
    pub fn issue(&self, service: &str, file_name: &str) -> IdentityPaths {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            service,
            file_name,
            now - Duration::minutes(5),
            now + Duration::days(1),
        )
    }

    /// Issues a certificate for `service` valid only between the two times.
    pub fn issue_with_validity(
        &self,
        service: &str,
        file_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> IdentityPaths {
        // The registry also names the hosts xDS clients dial it by, as
        // `trellis certs` issues it.
        let hosts: Vec<String> = if service == "registry" {
            trellis::certs::REGISTRY_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect()
        } else {
            Vec::new()
        };
        let issued = self
            .ca
            .issue_for_hosts(&self.id(service), &hosts, not_before, not_after)
            .expect("issue test certificate");
        let paths = IdentityPaths::in_dir(self.dir.path(), file_name);
        write_file(&paths.cert, &issued.cert_pem, false).expect("write cert");
        write_file(&paths.key, &issued.key_pem, true).expect("write key");
        paths
    }

    /// Issues a currently valid certificate for any SPIFFE ID (another
    /// trust domain, say), signed by this CA.
    pub fn issue_for_id(&self, id: &SpiffeId, file_name: &str) -> IdentityPaths {
        let issued = self.ca.issue(id, 1).expect("issue test certificate");
        let paths = IdentityPaths::in_dir(self.dir.path(), file_name);
        write_file(&paths.cert, &issued.cert_pem, false).expect("write cert");
        write_file(&paths.key, &issued.key_pem, true).expect("write key");
        paths
    }

    /// Issues an already expired certificate for `service`.
    pub fn issue_expired(&self, service: &str, file_name: &str) -> IdentityPaths {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            service,
            file_name,
            now - Duration::days(10),
            now - Duration::days(1),
        )
    }

    /// Issues a certificate for `service` that becomes valid only
    /// tomorrow (a clock set wrong, or a certificate issued early).
    pub fn issue_not_yet_valid(&self, service: &str, file_name: &str) -> IdentityPaths {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            service,
            file_name,
            now + Duration::days(1),
            now + Duration::days(2),
        )
    }
}
