//! The registry's durable state: one file, `<state-dir>/registry.state`,
//! holding the instances with their leases (as absolute expiry times), the
//! owners of gRPC service names, the contracts and the revision.
//!
//! The file is rewritten whole, atomically (a temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves either the old state
//! or the new one, never a torn file. Writes are coalesced by the registry
//! (see `Registry::spawn_persist`), so registration throughput is not bound
//! by fsync. Its size follows the per-identity quotas.
//!
//! Format: the line `TRELLIS-REGISTRY-STATE 1\n`, then one protobuf
//! [`StoredState`] message.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use trellis::pb::trellis::registry::v1 as pb;

const MAGIC: &[u8] = b"TRELLIS-REGISTRY-STATE 1\n";
/// The state file's name in the state directory.
pub const FILE_NAME: &str = "registry.state";

/// The whole durable state.
#[derive(Clone, PartialEq, Message)]
pub struct StoredState {
    /// The last revision published when this state was taken.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// Registered instances.
    #[prost(message, repeated, tag = "2")]
    pub instances: Vec<StoredInstance>,
    /// gRPC service name → the mesh service that holds it by claim.
    #[prost(map = "string, string", tag = "3")]
    pub claims: HashMap<String, String>,
    /// Registered contracts, one per mesh service.
    #[prost(message, repeated, tag = "4")]
    pub contracts: Vec<StoredContract>,
}

/// One instance and its lease. The absolute expiry is the instance's
/// `lease_expires_at`.
#[derive(Clone, PartialEq, Message)]
pub struct StoredInstance {
    /// The instance as served.
    #[prost(message, optional, tag = "1")]
    pub instance: Option<pb::Instance>,
    /// The SPIFFE ID that registered it (and alone may renew or remove it).
    #[prost(string, tag = "2")]
    pub owner: String,
    /// Its lease.
    #[prost(string, tag = "3")]
    pub lease_id: String,
    /// The lease's time to live, in milliseconds.
    #[prost(uint64, tag = "4")]
    pub ttl_ms: u64,
}

/// One mesh service's contract: its file descriptors as registered.
#[derive(Clone, PartialEq, Message)]
pub struct StoredContract {
    /// The mesh service.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Serialized `FileDescriptorProto`s.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub files: Vec<Vec<u8>>,
}

/// Why the state could not be read or written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but is not a state this registry can read.
    #[error(
        "{path}: {reason}; the registry does not start from a state it cannot read, since names it forgot could be claimed by another identity: restore the file, or move it aside to start with an empty registry"
    )]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The state file in a directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            path: dir.join(FILE_NAME),
        })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored state; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<StoredState>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.display().to_string(),
                    source,
                });
            }
        };
        decode(&bytes)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt {
                path: self.path.display().to_string(),
                reason,
            })
    }

    /// Replaces the stored state with `state`, atomically and durably.
    pub fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        let tmp = self.dir.join(format!(".{FILE_NAME}.tmp"));
        let mut bytes = Vec::with_capacity(MAGIC.len() + state.encoded_len());
        bytes.extend_from_slice(MAGIC);
        state
            .encode(&mut bytes)
            .expect("a Vec grows to fit the message");
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        // The rename itself is durable only once the directory is.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Result<StoredState, String> {
    let Some(body) = bytes.strip_prefix(MAGIC) else {
        return Err(if bytes.is_empty() {
            "the file is empty".to_owned()
        } else {
            format!(
                "not a registry state file (it does not start with {:?})",
                String::from_utf8_lossy(MAGIC).trim_end()
            )
        });
    };
    StoredState::decode(body).map_err(|e| format!("unreadable state: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredState {
        StoredState {
            revision: 42,
            instances: vec![StoredInstance {
                instance: Some(pb::Instance {
                    instance_id: "usage-1".into(),
                    service: "usage".into(),
                    ..Default::default()
                }),
                owner: "spiffe://trellis.local/ns/default/sa/usage".into(),
                lease_id: "lease-1".into(),
                ttl_ms: 30_000,
            }],
            claims: HashMap::from([("telco.usage.v1.UsageService".into(), "usage".into())]),
            contracts: vec![StoredContract {
                service: "usage".into(),
                files: vec![vec![1, 2, 3]],
            }],
        }
    }

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("registry")).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample()));
        let empty = StoredState {
            revision: 43,
            ..Default::default()
        };
        store.save(&empty).unwrap();
        assert_eq!(store.load().unwrap(), Some(empty));
        // Only the state file is left behind.
        let names: Vec<_> = std::fs::read_dir(store.dir.clone())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for bytes in [
            b"".to_vec(),
            b"hello".to_vec(),
            [MAGIC, &[0xff, 0xff, 0xff]].concat(),
        ] {
            std::fs::write(store.path(), &bytes).unwrap();
            let e = store.load().unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(FILE_NAME), "{e}");
        }
    }
}
