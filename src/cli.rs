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
