//! The inbound side: calls from other sidecars (mTLS) to the local
//! service, as one stack of layers, outermost first (see [`crate::layer`]):
//!
//! ```text
//! classify → trace → observe → authorize → deadline → limit → app
//! ```
//!
//! A call is counted (observe) whether or not it is authorized; nothing
//! reaches the service before its caller's identity has been checked; a
//! call waiting for a place under its method's limit waits within its
//! deadline.

use std::sync::{Arc, OnceLock};

use http::Request;
use hyper::body::Incoming;
use trellis::identity::SpiffeId;

use crate::discovery::MeshView;
use crate::endpoint::Endpoint;
use crate::layer::app::App;
use crate::layer::authorize::{self, Authorize};
use crate::layer::classify::{Classify, Peer};
use crate::layer::deadline::Deadline;
use crate::layer::limit::MethodLimit;
use crate::layer::observe::{Observe, Routable};
use crate::layer::trace::{Side, Trace};
use crate::layer::{Answer, Handle};

/// The inbound stack's type, outermost first.
type Stack = Classify<Trace<Observe<Authorize<Deadline<MethodLimit<App>>>>>>;

/// The process's inbound side, for readiness (there is at most one): the
/// view and the local mesh service.
static INBOUND: OnceLock<(Arc<MeshView>, String)> = OnceLock::new();

/// Readiness as far as the inbound side goes: with a registry, not before
/// the local service's configuration (its authorization rules) is in.
pub fn ready() -> Result<(), String> {
    match INBOUND.get() {
        Some((view, service)) => authorize::policy(view, service)
            .map(drop)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// The inbound proxy in front of one local service.
#[derive(Debug)]
pub struct Inbound {
    stack: Stack,
}

impl Inbound {
    /// An inbound proxy forwarding to `app`, enforcing the authorization
    /// rules of mesh service `service`, whose identity is `own`.
    /// Calls from `trusted_edges` (service names, in `own`'s trust domain
    /// and namespace) may carry an external caller's principal.
    pub fn new(
        app: Arc<Endpoint>,
        service: String,
        own: &SpiffeId,
        view: Arc<MeshView>,
        trusted_edges: Vec<String>,
    ) -> Arc<Self> {
        let _ = INBOUND.set((view.clone(), service.clone()));
        let stack = Classify::new(
            "the inbound port",
            Trace::new(
                Side::Inbound,
                Observe::new(
                    "inbound",
                    serves(view.clone(), service.clone()),
                    Authorize::new(
                        view.clone(),
                        &service,
                        own,
                        trusted_edges,
                        Deadline::new(MethodLimit::new(view, App::new(app))),
                    ),
                ),
            ),
        );
        Arc::new(Self { stack })
    }

    /// Handles one call from `peer`.
    pub async fn handle(&self, peer: Arc<Peer>, request: Request<Incoming>) -> Answer {
        self.stack.handle((peer, request)).await
    }
}

/// Whether a method gets inbound metric labels of its own: one of the
/// local service's, as far as the registry says. Without a registry's
/// word on our own service (no registry, or not registered yet) any
/// service may be ours; the series cap still bounds them.
fn serves(view: Arc<MeshView>, service: String) -> Routable {
    Box::new(move |method| {
        let registered = view.registered.load();
        let ours = match registered.get(method.service()) {
            Some(mesh_service) => *mesh_service == service,
            None => !registered.values().any(|m| *m == service),
        };
        ours && view.known_method(method.service(), method.method())
    })
}
