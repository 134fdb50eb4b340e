//! What a registered contract says of its methods, read the same way by
//! the sidecars and the registry's xDS routes: which methods a gRPC
//! service has, and which of them are safe to repeat.

use std::collections::HashSet;

use prost::Message;

/// Every method of `grpc_service` in `files`, and those whose idempotency
/// level says a repeat is harmless.
pub fn contract_methods(
    files: &[Vec<u8>],
    grpc_service: &str,
) -> (HashSet<String>, HashSet<String>) {
    use prost_types::method_options::IdempotencyLevel;
    let mut all = HashSet::new();
    let mut safe = HashSet::new();
    for bytes in files {
        let Ok(file) = prost_types::FileDescriptorProto::decode(bytes.as_slice()) else {
            continue;
        };
        for service in &file.service {
            let full = match file.package() {
                "" => service.name().to_owned(),
                p => format!("{p}.{}", service.name()),
            };
            if full != grpc_service {
                continue;
            }
            for method in &service.method {
                all.insert(method.name().to_owned());
                let level = method
                    .options
                    .as_ref()
                    .map(|o| o.idempotency_level())
                    .unwrap_or(IdempotencyLevel::IdempotencyUnknown);
                if matches!(
                    level,
                    IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent
                ) {
                    safe.insert(method.name().to_owned());
                }
            }
        }
    }
    (all, safe)
}
