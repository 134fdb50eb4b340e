//! The edge's access log: one structured line per call, with who called,
//! what, how it ended and how long it took (target `mesh_proxy::access`,
//! level info, so on by default; `RUST_LOG=mesh_proxy::access=off` silences
//! it).

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio::time::Instant;
use tonic::Code;

use crate::body::CallObserver;
use crate::grpc;

/// Who made a call and how; put in a request's extensions by the edge so
/// the outbound path logs the call when it ends.
#[derive(Clone, Debug)]
pub struct AccessInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// `grpc`, `grpc-web` or `json`.
    pub protocol: &'static str,
    /// The verified external caller as `x-trellis-principal` carries it;
    /// none for an anonymous one. It travels in the request's extensions,
    /// which no client can set, and the outbound path turns it into the
    /// header: a header a client sent is never taken for it.
    pub principal: Option<HeaderValue>,
    /// The trace the call is in, once the trace layer knows it (none when
    /// the caller sent no context and nothing is traced).
    /// (Bytes, not a `u128`, whose alignment would double the size of
    /// what carries this.)
    pub trace_id: Option<[u8; 16]>,
}

impl AccessInfo {
    /// The verified external caller, or `anonymous`.
    pub fn caller(&self) -> &str {
        self.principal
            .as_ref()
            .and_then(|p| p.to_str().ok())
            .unwrap_or("anonymous")
    }

    /// Logs a call that ended at once (refused, or answered by the edge).
    pub fn log(&self, service: &str, method: &str, code: Code, started: Instant) {
        tracing::info!(
            target: "mesh_proxy::access",
            caller = %self.caller(),
            peer = %self.peer,
            protocol = self.protocol,
            trace_id = self
                .trace_id
                .map(|id| tracing::field::display(format!("{:032x}", u128::from_be_bytes(id)))),
            service,
            method,
            status = grpc::code_name(code),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

/// Passes a call's end on to `inner` (metrics) and logs it.
pub struct AccessLog {
    /// The metrics observer.
    pub inner: Arc<dyn CallObserver>,
    /// Who called.
    pub info: AccessInfo,
    /// The gRPC service.
    pub service: String,
    /// The method.
    pub method: String,
}

impl CallObserver for AccessLog {
    fn finished(&self, code: Code, started: Instant) {
        self.inner.finished(code, started);
        self.info.log(&self.service, &self.method, code, started);
    }
}
