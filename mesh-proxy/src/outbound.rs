//! The outbound side: the local service's calls to the rest of the mesh
//! (and the edge's calls into it), as one stack of layers, outermost
//! first (see [`crate::layer`] for what each does):
//!
//! ```text
//! classify → trace → observe → route → circuit → deadline → limit → retry → balance → endpoint
//! ```
//!
//! Order is behaviour: the span (trace) covers everything the proxy does
//! with the call, and the attempts inside it; a call is counted (observe)
//! whatever route answers;
//! an open circuit fails a call before it takes a place under the limit or
//! waits for one; the deadline is outside the limit and retry, so it
//! bounds the wait for a place, every attempt and every backoff; the
//! circuit is outside the deadline, so a call that runs out of time counts
//! against its service; balance is inside retry, so each attempt (and
//! each hedged copy) may go to another endpoint.

use std::sync::Arc;

use http::Request;

use crate::body::RequestBody;
use crate::discovery::MeshView;
use crate::layer::balance::Balance;
use crate::layer::circuit::CircuitLayer;
use crate::layer::classify::Classify;
use crate::layer::deadline::Deadline;
use crate::layer::endpoint::ToEndpoint;
use crate::layer::limit::CallerLimit;
use crate::layer::observe::Observe;
use crate::layer::retry::Retry;
use crate::layer::route::{self, RouteLayer};
use crate::layer::trace::{Side, Trace};
use crate::layer::{Answer, Handle};
use crate::settings::Settings;

/// The outbound stack's type, outermost first.
type Stack = Classify<
    Trace<Observe<RouteLayer<CircuitLayer<Deadline<CallerLimit<Retry<Balance<ToEndpoint>>>>>>>>,
>;

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    stack: Stack,
}

impl Outbound {
    /// An outbound proxy routing by `view`; `direction` labels its metrics
    /// (`outbound`, or `edge` for the edge).
    pub fn new(view: Arc<MeshView>, direction: &'static str, settings: &Settings) -> Arc<Self> {
        let side = if direction == "edge" {
            Side::Edge
        } else {
            Side::Outbound
        };
        let stack = Classify::new(
            "the outbound port",
            Trace::new(
                side,
                Observe::new(
                    direction,
                    route::routable(view.clone()),
                    RouteLayer::new(
                        view.clone(),
                        CircuitLayer::new(
                            view.clone(),
                            Deadline::new(CallerLimit::new(
                                view.clone(),
                                Retry::new(
                                    view.clone(),
                                    settings.retry,
                                    Balance::new(view.locale.zone.clone(), ToEndpoint),
                                ),
                            )),
                        ),
                    ),
                ),
            ),
        );
        Arc::new(Self { stack })
    }

    /// Handles one call.
    pub async fn handle<B>(&self, request: Request<B>) -> Answer
    where
        B: Into<RequestBody> + Send + 'static,
    {
        self.stack.handle(request).await
    }
}
