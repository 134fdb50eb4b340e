//! The protobuf contracts instances register: their file descriptors,
//! checked, indexed by symbol, and served back for reflection, retry safety
//! (`idempotency_level`) and config validation.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use prost::Message;
use prost_reflect::{DescriptorPool, FileDescriptor};
use prost_types::FileDescriptorProto;

use crate::validate::MAX_DESCRIPTOR_BYTES;

/// The checked descriptors of one mesh service.
#[derive(Debug)]
pub struct Contract {
    pool: DescriptorPool,
    /// Each file's bytes exactly as registered (comments included).
    files: HashMap<String, Bytes>,
    /// The same files in the order they were registered, to store them.
    registered: Vec<Bytes>,
}

/// Where a symbol is defined in a contract; see [`Contract::locate`].
#[derive(Debug, PartialEq, Eq)]
pub struct Located {
    /// The gRPC services defined in the symbol's file.
    pub file_services: Vec<String>,
    /// Whether the symbol is a gRPC service or one of its methods.
    pub is_service: bool,
}

/// Why a set of descriptors was refused; `field` names the request field.
#[derive(Debug, PartialEq, Eq)]
pub struct ContractError {
    /// The request field at fault, e.g. `file_descriptors[1]`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl ContractError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Contract {
    /// Parses and checks registered descriptors: each must decode as a
    /// `FileDescriptorProto`, together they must be complete (every import
    /// present, every type resolvable), and every claimed gRPC service must
    /// be defined in them.
    pub fn parse(blobs: &[Vec<u8>], grpc_services: &[String]) -> Result<Self, ContractError> {
        let total: usize = blobs.iter().map(Vec::len).sum();
        if total > MAX_DESCRIPTOR_BYTES {
            return Err(ContractError::new(
                "file_descriptors",
                format!("{total} bytes is more than the {MAX_DESCRIPTOR_BYTES} allowed"),
            ));
        }
        let mut protos = Vec::with_capacity(blobs.len());
        let mut files = HashMap::with_capacity(blobs.len());
        let mut registered = Vec::with_capacity(blobs.len());
        for (i, blob) in blobs.iter().enumerate() {
            let field = format!("file_descriptors[{i}]");
            let proto = FileDescriptorProto::decode(blob.as_slice()).map_err(|e| {
                ContractError::new(&field, format!("not a FileDescriptorProto: {e}"))
            })?;
            let name = proto.name().to_owned();
            if name.is_empty() {
                return Err(ContractError::new(field, "file has no name"));
            }
            // prost-reflect 0.16 panics on any other syntax (its error
            // label indexes a file it has not stored yet).
            if let Some(syntax) = proto.syntax.as_deref()
                && syntax != "proto2"
                && syntax != "proto3"
            {
                return Err(ContractError::new(
                    field,
                    format!("{name}: syntax {syntax:?} is not supported (proto2 or proto3)"),
                ));
            }
            let bytes = Bytes::from(blob.clone());
            if files.insert(name.clone(), bytes.clone()).is_some() {
                return Err(ContractError::new(field, format!("{name} is given twice")));
            }
            registered.push(bytes);
            protos.push(proto);
        }
        let names: HashSet<&str> = protos.iter().map(|p| p.name()).collect();
        for proto in &protos {
            for dep in &proto.dependency {
                if !names.contains(dep.as_str()) {
                    return Err(ContractError::new(
                        "file_descriptors",
                        format!(
                            "{} imports {dep}, which is not among the descriptors (send every transitive dependency)",
                            proto.name()
                        ),
                    ));
                }
            }
        }
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(protos)
            .map_err(|e| ContractError::new("file_descriptors", e.to_string()))?;
        for (i, service) in grpc_services.iter().enumerate() {
            if pool.get_service_by_name(service).is_none() {
                return Err(ContractError::new(
                    format!("grpc_services[{i}]"),
                    format!("{service} is not defined in the file_descriptors"),
                ));
            }
        }
        Ok(Self {
            pool,
            files,
            registered,
        })
    }

    /// The files as registered, in their order.
    pub fn registered_files(&self) -> &[Bytes] {
        &self.registered
    }

    /// The file defining `symbol` (a service, method, message, enum or
    /// extension, fully qualified) and its transitive dependencies, file
    /// first, each as registered.
    pub fn file_containing(&self, symbol: &str) -> Option<Vec<Bytes>> {
        let file = self.find_file(symbol)?;
        Some(self.with_dependencies(&file))
    }

    /// Where `symbol` is defined: the gRPC services of its file (whose
    /// owners decide who may answer for it) and whether the symbol is
    /// itself a service or a method of one.
    pub fn locate(&self, symbol: &str) -> Option<Located> {
        let file = self.find_file(symbol)?;
        let is_service = self.pool.get_service_by_name(symbol).is_some()
            || symbol.rsplit_once('.').is_some_and(|(parent, leaf)| {
                self.pool
                    .get_service_by_name(parent)
                    .is_some_and(|s| s.methods().any(|m| m.name() == leaf))
            });
        Some(Located {
            file_services: file.services().map(|s| s.full_name().to_owned()).collect(),
            is_service,
        })
    }

    /// Whether the contract defines gRPC service `service` with method
    /// `method` (`method` of `None` means any method).
    pub fn has_method(&self, service: &str, method: Option<&str>) -> bool {
        self.pool
            .get_service_by_name(service)
            .is_some_and(|s| method.is_none_or(|m| s.methods().any(|d| d.name() == m)))
    }

    fn find_file(&self, symbol: &str) -> Option<FileDescriptor> {
        let pool = &self.pool;
        if let Some(s) = pool.get_service_by_name(symbol) {
            return Some(s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(symbol) {
            return Some(m.parent_file());
        }
        if let Some(e) = pool.get_enum_by_name(symbol) {
            return Some(e.parent_file());
        }
        if let Some(x) = pool.get_extension_by_name(symbol) {
            return Some(x.parent_file());
        }
        let (parent, leaf) = symbol.rsplit_once('.')?;
        if let Some(s) = pool.get_service_by_name(parent)
            && s.methods().any(|m| m.name() == leaf)
        {
            return Some(s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(parent)
            && m.get_field_by_name(leaf).is_some()
        {
            return Some(m.parent_file());
        }
        None
    }

    fn with_dependencies(&self, file: &FileDescriptor) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![file.clone()];
        while let Some(f) = stack.pop() {
            if !seen.insert(f.name().to_owned()) {
                continue;
            }
            let bytes = self
                .files
                .get(f.name())
                .cloned()
                .unwrap_or_else(|| Bytes::from(f.file_descriptor_proto().encode_to_vec()));
            out.push(bytes);
            stack.extend(f.dependencies());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trellis_files() -> Vec<Vec<u8>> {
        let set = prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
        set.file.iter().map(|f| f.encode_to_vec()).collect()
    }

    #[test]
    fn finds_files_by_symbol_with_dependencies() {
        let contract =
            Contract::parse(&trellis_files(), &["telco.usage.v1.UsageService".into()]).unwrap();
        for symbol in [
            "telco.usage.v1.UsageService",
            "telco.usage.v1.UsageService.RecordUsage",
            "telco.usage.v1.RecordUsageRequest",
            "telco.usage.v1.UsageType",
        ] {
            let files = contract.file_containing(symbol).unwrap();
            let first = FileDescriptorProto::decode(files[0].as_ref()).unwrap();
            assert_eq!(first.name(), "telco/usage/v1/usage.proto", "{symbol}");
            let names: Vec<String> = files
                .iter()
                .map(|b| {
                    FileDescriptorProto::decode(b.as_ref())
                        .unwrap()
                        .name()
                        .to_owned()
                })
                .collect();
            assert!(names.contains(&"google/protobuf/timestamp.proto".to_owned()));
        }
        assert!(contract.file_containing("telco.usage.v1.Nope").is_none());
        assert!(contract.has_method("telco.usage.v1.UsageService", Some("RecordUsage")));
        assert!(!contract.has_method("telco.usage.v1.UsageService", Some("Record")));
    }

    #[test]
    fn refuses_incomplete_or_garbage_descriptors() {
        let files = trellis_files();
        let usage_only: Vec<Vec<u8>> = files
            .iter()
            .filter(|b| {
                FileDescriptorProto::decode(b.as_slice()).unwrap().name()
                    == "telco/usage/v1/usage.proto"
            })
            .cloned()
            .collect();
        let err = Contract::parse(&usage_only, &[]).unwrap_err();
        assert_eq!(err.field, "file_descriptors");
        assert!(
            err.reason
                .contains("imports google/protobuf/timestamp.proto"),
            "{err:?}"
        );

        let err = Contract::parse(&[vec![0xff, 0xff, 0xff]], &[]).unwrap_err();
        assert_eq!(err.field, "file_descriptors[0]");

        let err = Contract::parse(&files, &["telco.usage.v1.Nope".into()]).unwrap_err();
        assert_eq!(err.field, "grpc_services[0]");
    }
}
