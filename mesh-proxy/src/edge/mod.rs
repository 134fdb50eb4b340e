//! Edge mode: the front door for clients outside the mesh.
//!
//! One request goes through these steps, in this order (order is
//! behaviour):
//!
//! 1. Sort by protocol: gRPC-Web (and CORS preflights) is unwrapped into
//!    gRPC first, so it meets every later step exactly as gRPC does; JSON
//!    is recognised by its content type; anything else is refused.
//! 2. Split the path into service and method, and say what is wanted: a
//!    call into the mesh, reflection, or health.
//! 3. Authenticate and rate-limit (the edge policy), after removing any
//!    principal the caller claimed; the verified one is set instead.
//! 4. Answer reflection and health here; send calls into the mesh through
//!    the same outbound path a sidecar uses (discovery, balancing,
//!    deadlines, retries, mTLS under the edge's identity). JSON is
//!    transcoded just before and after that path.
//! 5. Log the call (target `mesh_proxy::access`) when it ends.

pub mod health;
pub mod json;
pub mod limit;
pub mod listener;
pub mod policy;
pub mod reflection;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;
use tonic::server::NamedService;
use tower::{Layer, Service, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::access::AccessInfo;
use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::discovery::MeshView;
use crate::grpc::{self, GrpcPath};
use crate::outbound::Outbound;
use crate::shutdown::Shutdown;

use self::policy::{EdgePolicy, Target};
use self::reflection::{Contracts, Reflection};

type HealthServer =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// What the edge needs besides the mesh view.
#[derive(Debug)]
pub struct EdgeConfig {
    /// Who may call, and how often.
    pub policy: EdgePolicy,
    /// Largest JSON request body read, in bytes.
    pub max_json_body: usize,
    /// Largest gRPC message read from the mesh to answer a JSON call, in
    /// bytes.
    pub max_json_response: usize,
    /// Browser origins allowed; empty means any.
    pub cors_origins: Vec<HeaderValue>,
    /// The proxy's settings (the edge's calls into the mesh take the
    /// outbound stack).
    pub settings: crate::settings::Settings,
}

/// The edge.
#[derive(Debug)]
pub struct Edge {
    outbound: Arc<Outbound>,
    policy: EdgePolicy,
    contracts: Arc<ArcSwap<Contracts>>,
    reflection: Reflection,
    health: HealthServer,
    max_json_body: usize,
    max_json_response: usize,
    cors: CorsLayer,
}

/// The body of every edge answer.
#[derive(Debug)]
pub enum EdgeBody {
    /// A call answered by the mesh, passed through.
    Proxied(ResponseBody),
    /// Anything else (answered here, gRPC-Web, JSON).
    Other(UnsyncBoxBody<Bytes, BoxError>),
}

impl Default for EdgeBody {
    fn default() -> Self {
        Self::Proxied(ResponseBody::default())
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Proxied(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Self::Other(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Proxied(b) => b.is_end_stream(),
            Self::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Proxied(b) => b.size_hint(),
            Self::Other(b) => b.size_hint(),
        }
    }
}

fn boxed<B>(body: B) -> EdgeBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    EdgeBody::Other(body.map_err(Into::into).boxed_unsync())
}

/// What a gRPC request asks of the edge.
enum Wanted {
    Call,
    ReflectionV1,
    ReflectionV1Alpha,
    Health,
}

fn wanted(path: &GrpcPath<'_>) -> Wanted {
    use tonic_reflection::pb::{v1, v1alpha};
    type V1 = v1::server_reflection_server::ServerReflectionServer<Reflection>;
    type V1Alpha = v1alpha::server_reflection_server::ServerReflectionServer<Reflection>;
    match path.service {
        s if s == V1::NAME => Wanted::ReflectionV1,
        s if s == V1Alpha::NAME => Wanted::ReflectionV1Alpha,
        s if s == HealthServer::NAME => Wanted::Health,
        _ => Wanted::Call,
    }
}

impl Edge {
    /// An edge over `view`; starts, under `shutdown`, the task that keeps
    /// reflection and health in step with the registry, and the one that
    /// turns the edge's own health NOT_SERVING when the proxy starts
    /// draining.
    pub fn start(view: Arc<MeshView>, config: EdgeConfig, shutdown: &mut Shutdown) -> Arc<Self> {
        let contracts = Arc::new(ArcSwap::from_pointee(Contracts::build(
            &Default::default(),
            &Default::default(),
        )));
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        shutdown.spawn(health::follow(
            view.clone(),
            contracts.clone(),
            reporter.clone(),
        ));
        let mut phases = shutdown.phases();
        shutdown.spawn(async move {
            if phases.wait_for(|p| !p.serving()).await.is_ok() {
                reporter
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
        let allow_origin = if config.cors_origins.is_empty() {
            AllowOrigin::mirror_request()
        } else {
            AllowOrigin::list(config.cors_origins)
        };
        let cors = CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::POST, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("x-api-key"),
                header::HeaderName::from_static("x-grpc-web"),
                header::HeaderName::from_static("x-user-agent"),
                header::HeaderName::from_static("grpc-timeout"),
            ])
            .expose_headers([
                header::HeaderName::from_static("grpc-status"),
                header::HeaderName::from_static("grpc-message"),
                header::HeaderName::from_static("grpc-status-details-bin"),
            ])
            .max_age(Duration::from_secs(24 * 3600));
        Arc::new(Self {
            outbound: Outbound::new(view, "edge", &config.settings),
            policy: config.policy,
            reflection: Reflection::new(contracts.clone()),
            contracts,
            health,
            max_json_body: config.max_json_body,
            max_json_response: config.max_json_response,
            cors,
        })
    }

    /// Handles one request from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<EdgeBody> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.starts_with("application/grpc-web") || request.method() == Method::OPTIONS {
            return self.grpc_web(request, peer).await;
        }
        if grpc::is_grpc(request.headers()) {
            if request.version() != Version::HTTP_2 {
                let mut answer = grpc::status_response(
                    Code::Unimplemented,
                    "gRPC needs HTTP/2; over HTTP/1.1 use gRPC-Web or JSON",
                );
                *answer.status_mut() = StatusCode::HTTP_VERSION_NOT_SUPPORTED;
                return answer;
            }
            return self
                .grpc(request.map(RequestBody::from), peer, "grpc")
                .await;
        }
        if json::is_json(request.headers()) && request.method() == Method::POST {
            return self.json(request, peer).await.map(boxed);
        }
        let mut answer = json::error(
            Code::InvalidArgument,
            "the edge takes gRPC (application/grpc over HTTP/2), gRPC-Web (application/grpc-web) \
             or JSON (POST /package.Service/Method with content-type application/json)",
        );
        *answer.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        answer.map(boxed)
    }

    /// gRPC-Web (and CORS): unwrapped into gRPC, answered as gRPC, wrapped
    /// back.
    async fn grpc_web(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<EdgeBody> {
        let cors = self.cors.clone();
        let edge = self;
        let inner = tower::service_fn(move |request: Request<tonic::body::Body>| {
            let edge = edge.clone();
            async move {
                let request =
                    request.map(|b| RequestBody::from(b.map_err(BoxError::from).boxed_unsync()));
                Ok::<_, Infallible>(edge.grpc(request, peer, "grpc-web").await)
            }
        });
        let service = cors.layer(tonic_web::GrpcWebLayer::new().layer(inner));
        match service.oneshot(request).await {
            Ok(response) => response.map(boxed),
            Err(never) => match never {},
        }
    }

    /// A gRPC call, whatever it came as.
    async fn grpc(
        &self,
        mut request: Request<RequestBody>,
        peer: SocketAddr,
        protocol: &'static str,
    ) -> Response<EdgeBody> {
        let started = Instant::now();
        let path = match grpc::method_of(&request, "the edge") {
            Ok(path) => path,
            Err(answer) => return answer,
        };
        let (service, method) = (path.service.to_owned(), path.method.to_owned());
        let wanted = wanted(&path);
        let target = match wanted {
            Wanted::Call => Target::Call {
                service: &service,
                method: &method,
            },
            Wanted::ReflectionV1 | Wanted::ReflectionV1Alpha => Target::Reflection,
            Wanted::Health => Target::Health,
        };
        let info = match self.admit(&mut request, target, peer, protocol) {
            Ok(info) => info,
            Err(refused) => {
                let (info, code, message) = *refused;
                info.log(&service, &method, code, started);
                return grpc::status_response(code, &message);
            }
        };
        match wanted {
            Wanted::Call => {
                request.extensions_mut().insert(info);
                self.outbound.handle(request).await.map(EdgeBody::Proxied)
            }
            Wanted::ReflectionV1 => {
                info.log(&service, &method, Code::Ok, started);
                local(self.reflection.v1(), request).await
            }
            Wanted::ReflectionV1Alpha => {
                info.log(&service, &method, Code::Ok, started);
                local(self.reflection.v1alpha(), request).await
            }
            Wanted::Health => {
                let answer = local(self.health.clone(), request).await;
                info.log(
                    &service,
                    &method,
                    grpc::status_of(answer.headers()).unwrap_or(Code::Ok),
                    started,
                );
                answer
            }
        }
    }

    /// Authenticates and rate-limits, then removes the credentials; on
    /// success the returned info carries the verified principal, which the
    /// outbound path sets as the only `x-trellis-principal` (a claimed one
    /// is removed here and again there).
    fn admit<B>(
        &self,
        request: &mut Request<B>,
        target: Target<'_>,
        peer: SocketAddr,
        protocol: &'static str,
    ) -> Result<AccessInfo, Box<(AccessInfo, Code, String)>> {
        let headers = request.headers_mut();
        headers.remove(grpc::PRINCIPAL_HEADER);
        let mut info = AccessInfo {
            peer,
            protocol,
            principal: None,
            trace_id: None,
        };
        let admitted = self.policy.admit(target, headers, peer.ip());
        // Checked, so no service behind the edge needs them, and every
        // one that logs headers would otherwise collect credentials.
        headers.remove("x-api-key");
        headers.remove(header::AUTHORIZATION);
        match admitted {
            Ok(None) => Ok(info),
            Ok(Some(principal)) => {
                let name = principal.to_string();
                let Ok(value) = HeaderValue::from_str(&name) else {
                    return Err(Box::new((
                        info,
                        Code::Unauthenticated,
                        "the caller's name cannot be carried in a header (control characters)"
                            .to_owned(),
                    )));
                };
                info.principal = Some(value);
                Ok(info)
            }
            // Boxed: refusals are the rare path.
            Err(rejection) => Err(Box::new((info, rejection.code, rejection.message))),
        }
    }

    /// JSON in, a gRPC call into the mesh, JSON out.
    async fn json(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<json::JsonBody> {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let Some(GrpcPath { service, method }) = GrpcPath::parse(&path) else {
            return json::error(
                Code::NotFound,
                &format!("{path:?} is not a method path: POST /package.Service/Method"),
            );
        };
        let target = Target::Call { service, method };
        let info = match self.admit(&mut request, target, peer, "json") {
            Ok(info) => info,
            Err(refused) => {
                let (info, code, message) = *refused;
                info.log(service, method, code, started);
                return json::error(code, &message);
            }
        };
        let descriptor = match self.contracts.load().method(service, method) {
            Ok(m) => m,
            Err(why) => {
                let code = if why.starts_with("no service") {
                    Code::Unimplemented
                } else {
                    Code::NotFound
                };
                info.log(service, method, code, started);
                return json::error(code, &why);
            }
        };
        let transcoded = match json::transcode(request, &descriptor, self.max_json_body).await {
            Ok(t) => t,
            Err(answer) => {
                info.log(service, method, Code::InvalidArgument, started);
                return answer;
            }
        };
        let mut grpc_request = transcoded.request;
        grpc_request.extensions_mut().insert(info);
        let response = self.outbound.handle(grpc_request).await;
        json::answer(
            response,
            transcoded.output,
            transcoded.server_streaming,
            self.max_json_response,
        )
        .await
    }
}

/// Calls one of the edge's own gRPC services.
async fn local<S>(service: S, request: Request<RequestBody>) -> Response<EdgeBody>
where
    S: Service<Request<RequestBody>, Response = Response<tonic::body::Body>, Error = Infallible>,
{
    match service.oneshot(request).await {
        Ok(response) => response.map(boxed),
        Err(never) => match never {},
    }
}
