//! Command-line pieces shared by every Trellis binary.

use std::path::PathBuf;

use crate::identity::{IdentityPaths, Workload};

/// The files that make a workload's mTLS identity. Each flag can also be
/// given by its `TRELLIS_*` environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct IdentityArgs {
    /// PEM certificate chain of this workload, leaf first; its URI SAN holds
    /// the workload's SPIFFE ID.
    #[arg(long = "cert", env = "TRELLIS_CERT", value_name = "FILE")]
    pub cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long = "key", env = "TRELLIS_KEY", value_name = "FILE")]
    pub key: PathBuf,
    /// PEM certificate of the mesh CA; peers must chain to it.
    #[arg(long = "ca", env = "TRELLIS_CA", value_name = "FILE")]
    pub ca: PathBuf,
}

impl IdentityArgs {
    /// The paths as an [`IdentityPaths`].
    pub fn paths(&self) -> IdentityPaths {
        IdentityPaths {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }

    /// Loads the identity, or prints what is wrong (naming the file) and
    /// exits with status 2: a process without a usable identity cannot do
    /// anything in the mesh.
    pub fn load_or_exit(&self, program: &str) -> Workload {
        Workload::load(&self.paths()).unwrap_or_else(|e| exit_with(program, &e))
    }
}

/// Prints `program: error` (with its causes) to stderr and exits with status 2.
pub fn exit_with(program: &str, error: &dyn std::fmt::Display) -> ! {
    eprintln!("{program}: {error}");
    std::process::exit(2)
}

/// Runs a command's `future` on a runtime of its own and returns its exit
/// status; 2, with a message, when no runtime can be had.
pub fn on_runtime(program: &str, future: impl std::future::Future<Output = i32>) -> i32 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            2
        }
    }
}

/// Parses a duration with its unit, as flags take them: `750ms`, `5s`, `2m`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration with a unit such as 750ms, 5s or 2m: {e}"))
}

/// Most registry replicas `--registry` may name.
pub const MAX_REGISTRY_TARGETS: usize = 16;

/// Where the registry replicas are: `--registry host:port[,host:port...]`.
/// Each entry is an IP address or a DNS name (resolved again on every
/// connection, so a name listing every replica, such as a Kubernetes
/// headless Service, works as one entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTargets(Vec<String>);

impl RegistryTargets {
    /// Parses a comma-separated list of `host:port` entries.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<String> = Vec::new();
        for (i, entry) in text.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(format!(
                    "entry {} is empty: give host:port entries separated by single commas",
                    i + 1
                ));
            }
            if i >= MAX_REGISTRY_TARGETS {
                return Err(format!(
                    "entry {} ({entry:?}) is one too many: at most {MAX_REGISTRY_TARGETS} registry addresses may be given",
                    i + 1
                ));
            }
            let valid = entry.rsplit_once(':').is_some_and(|(host, port)| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                !host.is_empty()
                    && !host.contains(['/', '@', '?', '#', ' ', ','])
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(format!(
                    "entry {} ({entry:?}) is not host:port (an IP address or DNS name, and a port)",
                    i + 1
                ));
            }
            if !entries.iter().any(|e| e == entry) {
                entries.push(entry.to_owned());
            }
        }
        Ok(Self(entries))
    }

    /// One address.
    pub fn one(addr: std::net::SocketAddr) -> Self {
        Self(vec![addr.to_string()])
    }

    /// The entries, in the order given.
    pub fn entries(&self) -> &[String] {
        &self.0
    }

    /// The entries that are IP addresses with a port, resolved without
    /// asking DNS, and the names resolved now (a name that does not
    /// resolve is left out).
    pub fn resolve_now(&self) -> Vec<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        let mut all = Vec::new();
        for entry in &self.0 {
            match entry.to_socket_addrs() {
                Ok(addrs) => all.extend(addrs.take(MAX_REGISTRY_TARGETS)),
                Err(e) => {
                    tracing::warn!(registry = %entry, error = %e, "registry address does not resolve now")
                }
            }
        }
        all.dedup();
        all
    }
}

impl std::fmt::Display for RegistryTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl std::str::FromStr for RegistryTargets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod registry_targets_tests {
    use super::*;

    #[test]
    fn parses_lists_of_replicas() {
        let t =
            RegistryTargets::parse("127.0.0.1:7000, registry.trellis.svc:7000,[::1]:7000").unwrap();
        assert_eq!(
            t.entries(),
            ["127.0.0.1:7000", "registry.trellis.svc:7000", "[::1]:7000"]
        );
        assert_eq!(
            t.to_string(),
            "127.0.0.1:7000,registry.trellis.svc:7000,[::1]:7000"
        );
        assert_eq!(
            RegistryTargets::parse("a:1,a:1").unwrap().entries().len(),
            1
        );
        for (bad, named) in [
            ("", "entry 1 is empty"),
            ("nonsense", "entry 1 (\"nonsense\")"),
            ("a:1,,b:2", "entry 2 is empty"),
            ("a:1,", "entry 2 is empty"),
            ("a:0", "entry 1 (\"a:0\")"),
            ("a:1, :7000", "entry 2 (\":7000\")"),
            ("a:70000", "entry 1 (\"a:70000\")"),
            ("a/b:1", "entry 1 (\"a/b:1\")"),
        ] {
            let e = RegistryTargets::parse(bad).unwrap_err();
            assert!(e.contains(named), "{bad}: {e}");
            assert!(e.contains("host:port"), "{bad}: {e}");
        }
        let mut many: Vec<String> = (0..16).map(|i| format!("r{i}:7000")).collect();
        assert_eq!(
            RegistryTargets::parse(&many.join(","))
                .unwrap()
                .entries()
                .len(),
            16
        );
        many.push("r16:7000".into());
        let e = RegistryTargets::parse(&many.join(",")).unwrap_err();
        assert!(e.contains("entry 17 (\"r16:7000\")"), "{e}");
        assert!(e.contains("at most 16"), "{e}");
    }
}
