//! Per-identity quotas: how much of the registry one workload identity may
//! hold (instances, gRPC service names, contract bytes, open watches), so
//! that one misbehaving or compromised workload cannot exhaust the control
//! plane for the rest of the mesh. Exceeding one is RESOURCE_EXHAUSTED with
//! a message naming the identity, the limit and the flag that raises it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

use crate::validate::MAX_DESCRIPTOR_BYTES;

/// The limits, each per workload identity (SPIFFE ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Registered instances at once.
    pub instances: usize,
    /// gRPC service names held by first claim (names declared for the
    /// identity in config do not count).
    pub grpc_names: usize,
    /// Bytes of the registered contract (file descriptors); one contract is
    /// kept per mesh service, replaced by each registration carrying one.
    pub descriptor_bytes: usize,
    /// Open watches, Registry `Watch` and Config `WatchConfig` together.
    pub watches: usize,
}

impl Quotas {
    /// The defaults: far above what the repository's mesh uses (at most 2
    /// instances, 3 names and ~100 KiB of descriptors per service; each
    /// proxy holds 1 registry watch and 1 config watch per mesh service).
    pub const DEFAULT: Self = Self {
        instances: 64,
        grpc_names: 64,
        descriptor_bytes: MAX_DESCRIPTOR_BYTES,
        watches: 256,
    };

    /// No limit at all (benchmarks and tests of other behaviour).
    pub const UNLIMITED: Self = Self {
        instances: usize::MAX,
        grpc_names: usize::MAX,
        descriptor_bytes: MAX_DESCRIPTOR_BYTES,
        watches: usize::MAX,
    };

    /// Start-up checks across fields; the message names the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.descriptor_bytes > MAX_DESCRIPTOR_BYTES {
            return Err(format!(
                "--max-descriptor-bytes-per-identity {} is more than {MAX_DESCRIPTOR_BYTES}, the largest contract one registration can carry",
                self.descriptor_bytes
            ));
        }
        for (flag, value) in [
            ("--max-instances-per-identity", self.instances),
            ("--max-grpc-names-per-identity", self.grpc_names),
            ("--max-watches-per-identity", self.watches),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(())
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The flag and environment variable raising each limit, for messages.
pub(crate) mod flag {
    pub const INSTANCES: &str =
        "--max-instances-per-identity (TRELLIS_REGISTRY_MAX_INSTANCES_PER_IDENTITY)";
    pub const GRPC_NAMES: &str =
        "--max-grpc-names-per-identity (TRELLIS_REGISTRY_MAX_GRPC_NAMES_PER_IDENTITY)";
    pub const DESCRIPTOR_BYTES: &str =
        "--max-descriptor-bytes-per-identity (TRELLIS_REGISTRY_MAX_DESCRIPTOR_BYTES_PER_IDENTITY)";
    pub const WATCHES: &str =
        "--max-watches-per-identity (TRELLIS_REGISTRY_MAX_WATCHES_PER_IDENTITY)";
}

/// RESOURCE_EXHAUSTED for `identity`, which `what` (e.g. "would hold 65
/// registered instances"), over `limit`; `remedy` says what the workload
/// can do itself, and the flag raises the limit.
pub(crate) fn exhausted(
    identity: &str,
    what: &str,
    limit: impl std::fmt::Display,
    flag: &str,
    remedy: &str,
) -> Status {
    Status::resource_exhausted(format!(
        "{identity} {what}; the limit is {limit} per identity: {remedy}, or ask the operator to raise the registry's {flag}"
    ))
}

/// Open watches per identity, shared by the Registry and Config APIs.
#[derive(Debug)]
pub struct Watches {
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One admitted watch; dropping it (when the stream ends) frees its place.
#[derive(Debug)]
pub struct WatchPermit {
    watches: Arc<Watches>,
    identity: String,
}

impl Watches {
    /// At most `limit` watches per identity.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more watch for `identity`, or refuses it.
    pub fn admit(self: &Arc<Self>, identity: &str) -> Result<WatchPermit, Status> {
        let mut open = self.lock();
        let count = open.entry(identity.to_owned()).or_default();
        if *count >= self.limit {
            let limit = self.limit;
            return Err(exhausted(
                identity,
                &format!(
                    "already has {count} open watches (Registry Watch and Config WatchConfig together)"
                ),
                limit,
                flag::WATCHES,
                "close watches it no longer reads (one per process and followed service is enough)",
            ));
        }
        *count += 1;
        Ok(WatchPermit {
            watches: self.clone(),
            identity: identity.to_owned(),
        })
    }

    /// Open watches of `identity` now.
    pub fn open(&self, identity: &str) -> usize {
        self.lock().get(identity).copied().unwrap_or(0)
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.watches.lock();
        if let Some(count) = open.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// Parses a byte size: a number of bytes, or with a `KiB` or `MiB` suffix
/// (`4MiB`, `512KiB`, `65536`).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = if let Some(n) = t.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else if let Some(n) = t.strip_suffix("KiB") {
        (n, 1024)
    } else {
        (t.strip_suffix('B').unwrap_or(t), 1)
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a size such as 4MiB, 512KiB or 65536"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 * 1024 * 1024));
        assert_eq!(parse_bytes("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("100B"), Ok(100));
        for bad in ["", "MiB", "4GiB", "-1", "1.5MiB", "99999999999999999999MiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn watches_are_counted_per_identity_and_freed_on_drop() {
        let watches = Watches::new(2);
        let a = watches.admit("a").unwrap();
        let _b = watches.admit("a").unwrap();
        let refused = watches.admit("a").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-watches-per-identity"));
        watches.admit("b").unwrap();
        drop(a);
        assert_eq!(watches.open("a"), 1);
        watches.admit("a").unwrap();
    }

    #[test]
    fn defaults_pass_their_own_checks() {
        Quotas::DEFAULT.check().unwrap();
        Quotas::UNLIMITED.check().unwrap();
        let too_big = Quotas {
            descriptor_bytes: MAX_DESCRIPTOR_BYTES + 1,
            ..Quotas::DEFAULT
        };
        assert!(too_big.check().is_err());
    }
}
