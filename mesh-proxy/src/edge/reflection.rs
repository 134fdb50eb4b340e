//! Server reflection at the edge, answered from the contracts the registry
//! holds rather than from any one instance: every registered gRPC service
//! is listed, and any of their symbols resolves, whatever language the
//! service is written in and whichever instance would answer a call.
//!
//! The contracts of all services are merged into one descriptor pool
//! (rebuilt whenever the registry reports a change), which also serves
//! JSON transcoding. v1 and v1alpha are one protocol under two names; the
//! v1alpha service re-reads its messages as v1 (the wire format is the
//! same) and answers through the v1 code.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};

use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// The services the edge itself answers, listed beside the mesh's.
const OWN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Every registered contract, merged.
#[derive(Debug)]
pub struct Contracts {
    pool: DescriptorPool,
    /// Fully qualified symbol to the file that defines it.
    symbols: HashMap<String, String>,
    /// (extended message, field number) to the file of the extension.
    extensions: HashMap<(String, u32), String>,
    /// What `list` answers, sorted.
    listed: Vec<String>,
    /// Registered services whose contract could not be merged, with why.
    unusable: HashMap<String, String>,
}

impl Contracts {
    /// Merges the contracts of the `registered` gRPC services (name to
    /// mesh service) found in `contracts`. A contract that conflicts with
    /// one merged before it is left out and reported; the rest still work.
    pub fn build(
        registered: &BTreeMap<String, String>,
        contracts: &HashMap<String, Arc<Vec<Bytes>>>,
    ) -> Self {
        // The well-known types, then the edge's own services.
        let mut pool = DescriptorPool::global();
        for set in [
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            v1::FILE_DESCRIPTOR_SET,
            v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let files = prost_types::FileDescriptorSet::decode(set)
                .map(|s| s.file)
                .unwrap_or_default();
            let fresh: Vec<_> = files
                .into_iter()
                .filter(|f| pool.get_file_by_name(f.name()).is_none())
                .collect();
            if let Err(e) = pool.add_file_descriptor_protos(fresh) {
                tracing::error!(error = %e, "built-in descriptors do not load");
            }
        }
        let mut unusable = HashMap::new();
        for (grpc_service, mesh_service) in registered {
            if pool.get_service_by_name(grpc_service).is_some() {
                continue;
            }
            let Some(files) = contracts.get(grpc_service) else {
                unusable.insert(
                    grpc_service.clone(),
                    format!("{mesh_service} registered {grpc_service} without a contract"),
                );
                continue;
            };
            let decoded: Result<Vec<_>, _> = files
                .iter()
                .map(|b| prost_types::FileDescriptorProto::decode(b.as_ref()))
                .collect();
            let fresh: Vec<_> = match decoded {
                // prost-reflect 0.16 panics on any other syntax.
                Ok(files)
                    if files.iter().any(|f| {
                        !matches!(f.syntax.as_deref(), None | Some("proto2" | "proto3"))
                    }) =>
                {
                    unusable.insert(
                        grpc_service.clone(),
                        format!("the contract of {grpc_service} is neither proto2 nor proto3"),
                    );
                    continue;
                }
                Ok(files) => files
                    .into_iter()
                    .filter(|f| pool.get_file_by_name(f.name()).is_none())
                    .collect(),
                Err(e) => {
                    unusable.insert(
                        grpc_service.clone(),
                        format!("the contract of {grpc_service} does not decode: {e}"),
                    );
                    continue;
                }
            };
            // Added on a copy: a contract that fails leaves no half of
            // itself behind.
            let mut next = pool.clone();
            match next.add_file_descriptor_protos(fresh) {
                Ok(()) if next.get_service_by_name(grpc_service).is_some() => pool = next,
                Ok(()) => {
                    unusable.insert(
                        grpc_service.clone(),
                        format!("the contract registered for {grpc_service} does not define it"),
                    );
                }
                Err(e) => {
                    tracing::warn!(service = %grpc_service, error = %e, "contract conflicts with another service's; left out of reflection");
                    unusable.insert(
                        grpc_service.clone(),
                        format!(
                            "the contract of {grpc_service} conflicts with another service's: {e}"
                        ),
                    );
                }
            }
        }

        let mut symbols = HashMap::new();
        for service in pool.services() {
            let file = service.parent_file().name().to_owned();
            for method in service.methods() {
                symbols.insert(method.full_name().to_owned(), file.clone());
            }
            symbols.insert(service.full_name().to_owned(), file);
        }
        for message in pool.all_messages() {
            let file = message.parent_file().name().to_owned();
            for field in message.fields() {
                symbols.insert(field.full_name().to_owned(), file.clone());
            }
            symbols.insert(message.full_name().to_owned(), file);
        }
        for en in pool.all_enums() {
            let file = en.parent_file().name().to_owned();
            for value in en.values() {
                symbols.insert(value.full_name().to_owned(), file.clone());
            }
            symbols.insert(en.full_name().to_owned(), file);
        }
        let mut extensions = HashMap::new();
        for ext in pool.all_extensions() {
            let file = ext.parent_file().name().to_owned();
            symbols.insert(ext.full_name().to_owned(), file.clone());
            extensions.insert(
                (
                    ext.containing_message().full_name().to_owned(),
                    ext.number(),
                ),
                file,
            );
        }
        let listed: BTreeSet<String> = registered
            .keys()
            .cloned()
            .chain(OWN_SERVICES.iter().map(|s| (*s).to_owned()))
            .collect();
        Self {
            pool,
            symbols,
            extensions,
            listed: listed.into_iter().collect(),
            unusable,
        }
    }

    /// The descriptor of `service/method`, or why there is none.
    pub fn method(&self, service: &str, method: &str) -> Result<MethodDescriptor, String> {
        if let Some(why) = self.unusable.get(service) {
            return Err(why.clone());
        }
        let Some(svc) = self.pool.get_service_by_name(service) else {
            return Err(format!("no service in the mesh serves {service}"));
        };
        svc.methods()
            .find(|m| m.name() == method)
            .ok_or_else(|| format!("{service} has no method {method}"))
    }

    /// The listed services.
    pub fn listed(&self) -> &[String] {
        &self.listed
    }

    /// `name` and every file it depends on, each once, `name` first.
    fn file_with_dependencies(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        let root = self.pool.get_file_by_name(name)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![root];
        while let Some(file) = stack.pop() {
            if !seen.insert(file.name().to_owned()) {
                continue;
            }
            out.push(file.file_descriptor_proto().encode_to_vec());
            stack.extend(file.dependencies());
        }
        Some(out)
    }

    /// Answers one reflection request.
    pub fn answer(&self, request: v1::ServerReflectionRequest) -> v1::ServerReflectionResponse {
        let response = match &request.message_request {
            None => Err(Status::invalid_argument(
                "the reflection request names nothing to look up",
            )),
            Some(MessageRequest::ListServices(_)) => Ok(MessageResponse::ListServicesResponse(
                v1::ListServiceResponse {
                    service: self
                        .listed
                        .iter()
                        .map(|name| v1::ServiceResponse { name: name.clone() })
                        .collect(),
                },
            )),
            Some(MessageRequest::FileByFilename(name)) => {
                self.file_with_dependencies(name).map(files).ok_or_else(|| {
                    Status::not_found(format!("no registered contract has file {name}"))
                })
            }
            Some(MessageRequest::FileContainingSymbol(symbol)) => {
                let symbol = symbol.trim_start_matches('.');
                match self.symbols.get(symbol) {
                    Some(file) => Ok(files(self.file_with_dependencies(file).unwrap_or_default())),
                    None => Err(Status::not_found(match self.unusable.get(symbol) {
                        Some(why) => why.clone(),
                        None => format!("no registered contract defines symbol {symbol}"),
                    })),
                }
            }
            Some(MessageRequest::FileContainingExtension(ext)) => {
                let number = u32::try_from(ext.extension_number).unwrap_or(0);
                match self.extensions.get(&(ext.containing_type.clone(), number)) {
                    Some(file) => Ok(files(self.file_with_dependencies(file).unwrap_or_default())),
                    None => Err(Status::not_found(format!(
                        "no registered contract extends {} with field {}",
                        ext.containing_type, ext.extension_number
                    ))),
                }
            }
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => {
                match self.pool.get_message_by_name(name) {
                    Some(message) => Ok(MessageResponse::AllExtensionNumbersResponse(
                        v1::ExtensionNumberResponse {
                            base_type_name: name.clone(),
                            extension_number: message
                                .extensions()
                                .map(|e| e.number() as i32)
                                .collect(),
                        },
                    )),
                    None => Err(Status::not_found(format!(
                        "no registered contract defines message {name}"
                    ))),
                }
            }
        };
        let message_response = match response {
            Ok(r) => r,
            Err(status) => MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: status.code() as i32,
                error_message: status.message().to_owned(),
            }),
        };
        v1::ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(message_response),
        }
    }
}

fn files(file_descriptor_proto: Vec<Vec<u8>>) -> MessageResponse {
    MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse {
        file_descriptor_proto,
    })
}

/// The reflection services, both versions, over the current contracts.
#[derive(Clone, Debug)]
pub struct Reflection {
    contracts: Arc<ArcSwap<Contracts>>,
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Reflection {
    /// Reflection over `contracts`, read afresh for every request.
    pub fn new(contracts: Arc<ArcSwap<Contracts>>) -> Self {
        Self { contracts }
    }

    /// The v1 service.
    pub fn v1(&self) -> v1::server_reflection_server::ServerReflectionServer<Self> {
        v1::server_reflection_server::ServerReflectionServer::new(self.clone())
    }

    /// The v1alpha service.
    pub fn v1alpha(&self) -> v1alpha::server_reflection_server::ServerReflectionServer<Self> {
        v1alpha::server_reflection_server::ServerReflectionServer::new(self.clone())
    }
}

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = Responses<v1::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let contracts = self.contracts.clone();
        let answers = request
            .into_inner()
            .map(move |r| r.map(|r| contracts.load().answer(r)));
        Ok(Response::new(Box::pin(answers)))
    }
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = Responses<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let contracts = self.contracts.clone();
        let answers = request.into_inner().map(move |r| {
            let r = r?;
            let r = v1::ServerReflectionRequest::decode(r.encode_to_vec().as_slice())
                .map_err(|e| Status::invalid_argument(format!("reflection request: {e}")))?;
            let answer = contracts.load().answer(r);
            v1alpha::ServerReflectionResponse::decode(answer.encode_to_vec().as_slice())
                .map_err(|e| Status::internal(format!("reflection response: {e}")))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trellis_contract(service: &str) -> Arc<Vec<Bytes>> {
        let set = prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
        let pool = DescriptorPool::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
        let defining = pool
            .get_service_by_name(service)
            .unwrap()
            .parent_file()
            .name()
            .to_owned();
        let mut files: Vec<Bytes> = set
            .file
            .iter()
            .filter(|f| f.name() == defining)
            .map(|f| Bytes::from(f.encode_to_vec()))
            .collect();
        files.extend(
            set.file
                .iter()
                .filter(|f| f.name() != defining)
                .map(|f| Bytes::from(f.encode_to_vec())),
        );
        Arc::new(files)
    }

    fn ask(contracts: &Contracts, request: MessageRequest) -> MessageResponse {
        contracts
            .answer(v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            })
            .message_response
            .unwrap()
    }

    #[test]
    fn lists_registered_and_own_services_and_resolves_symbols_with_imports() {
        let echo = "trellis.echo.v1.EchoService";
        let registered = BTreeMap::from([
            (echo.to_owned(), "echo".to_owned()),
            ("legacy.v1.Old".to_owned(), "legacy".to_owned()),
        ]);
        let contracts = HashMap::from([(echo.to_owned(), trellis_contract(echo))]);
        let merged = Contracts::build(&registered, &contracts);
        let MessageResponse::ListServicesResponse(list) =
            ask(&merged, MessageRequest::ListServices(String::new()))
        else {
            panic!("not a list")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "legacy.v1.Old",
                echo
            ]
        );
        for symbol in [
            echo,
            "trellis.echo.v1.EchoService.Echo",
            "trellis.echo.v1.EchoRequest",
        ] {
            let MessageResponse::FileDescriptorResponse(files) =
                ask(&merged, MessageRequest::FileContainingSymbol(symbol.into()))
            else {
                panic!("{symbol} not resolved")
            };
            let first =
                prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
                    .unwrap();
            assert_eq!(first.name(), "trellis/echo/v1/echo.proto");
            // Every import travels with it.
            let names: HashSet<String> = files
                .file_descriptor_proto
                .iter()
                .map(|b| {
                    prost_types::FileDescriptorProto::decode(b.as_slice())
                        .unwrap()
                        .name()
                        .to_owned()
                })
                .collect();
            for dep in &first.dependency {
                assert!(names.contains(dep), "{dep} missing");
            }
        }
        let MessageResponse::ErrorResponse(e) = ask(
            &merged,
            MessageRequest::FileContainingSymbol("legacy.v1.Old".into()),
        ) else {
            panic!("resolved a service with no contract")
        };
        assert_eq!(e.error_code, tonic::Code::NotFound as i32);
        assert!(
            e.error_message.contains("without a contract"),
            "{}",
            e.error_message
        );
        let MessageResponse::FileDescriptorResponse(_) = ask(
            &merged,
            MessageRequest::FileContainingSymbol("grpc.health.v1.HealthCheckRequest".into()),
        ) else {
            panic!("own services resolve too")
        };
        assert!(merged.method(echo, "Count").is_ok());
        assert!(
            merged
                .method(echo, "Nope")
                .unwrap_err()
                .contains("no method")
        );
    }
}
