//! The request path as an ordered stack of small layers.
//!
//! Each layer does one thing to a call and hands it to the layer inside
//! it; the answer comes back out through the same layers in reverse. The
//! two stacks, outermost first, are composed in one function each
//! ([`crate::outbound::Outbound::new`], [`crate::inbound::Inbound::new`]):
//!
//! ```text
//! outbound (the local service's calls, and the edge's):
//!   classify → trace → observe → route → circuit → deadline → limit → retry → balance → endpoint
//! inbound (calls from other sidecars, over mTLS):
//!   classify → trace → observe → authorize → deadline → limit → app
//! ```
//!
//! | layer | what it does |
//! |---|---|
//! | [`classify`] | refuses what is not gRPC; splits `:path` into service and method |
//! | [`trace`] | continues the W3C trace: a client or server span per call |
//! | [`observe`] | counts the call's final status and latency (and the edge's access log) |
//! | [`route`] | finds the upstream and the route policy; removes headers only the mesh may set |
//! | [`authorize`] | checks the verified caller against the service's rules; names the caller |
//! | [`deadline`] | fixes the call's deadline and ends the call when it passes |
//! | [`retry`] | sends attempts until one answers or the policy says stop |
//! | [`balance`] | picks an endpoint and keeps its health (ejection) |
//! | [`endpoint`] | sends one attempt over an endpoint's pooled HTTP/2 connection |
//! | [`app`] | sends the call to the local service and reports its failures as gRPC |
//!
//! A layer is a struct holding the layer inside it and implementing
//! [`Handle`]. The trait is ours rather than `tower::Service` because a
//! layer here is an `async fn` over `&self`: no readiness to poll, no
//! service to clone per call, no boxed future per layer; the compiler
//! inlines the stack into one future per call. New behaviour (circuit
//! breaking, concurrency limits, tracing) is a new layer in one of the two
//! lists above, not another branch in an existing one.

pub mod app;
pub mod authorize;
pub mod balance;
pub mod circuit;
pub mod classify;
pub mod deadline;
pub mod endpoint;
pub mod limit;
pub mod observe;
pub mod retry;
pub mod route;
pub mod trace;

use std::future::Future;

use http::{HeaderMap, Response};
use tokio::time::Instant;

use crate::access::AccessInfo;
use crate::body::{RequestBody, ResponseBody};
use crate::grpc::GrpcMethod;

/// One layer of the request path.
pub trait Handle<Request>: Send + Sync + 'static {
    /// What answers the request.
    type Answer;

    /// Handles one request.
    fn handle(&self, request: Request) -> impl Future<Output = Self::Answer> + Send;
}

pin_project_lite::pin_project! {
    /// `future`, or `None` once `deadline` passes (never without one).
    /// One future for both cases: `match deadline { Some(d) =>
    /// timeout_at(d, f).await, None => f.await }` would hold room for
    /// `f` twice, and every layer outside would carry and copy that room
    /// with each call.
    pub struct Within<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

/// Runs `future` until `deadline`, if there is one.
pub fn within<F: Future>(deadline: Option<Instant>, future: F) -> Within<F> {
    Within {
        future,
        sleep: deadline.map(tokio::time::sleep_until),
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(output) = this.future.poll(cx) {
            return std::task::Poll::Ready(Some(output));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx).map(|()| None),
            None => std::task::Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// `inner`'s answer, with `end` (if any) told when the call ends: at
    /// once for a status-only answer, else when the response body does.
    /// For layers that add something to a call's end (a circuit's
    /// outcome, a limit's place): polling the inner future in place, it
    /// adds a few bytes to the call's future where an `async fn` would
    /// add room for the request and the answer too.
    pub struct Ending<F> {
        #[pin]
        inner: F,
        end: Option<crate::body::CallEnd>,
    }
}

impl<F> Ending<F> {
    /// `inner`, reporting its end to `end`.
    pub fn new(inner: F, end: Option<crate::body::CallEnd>) -> Self {
        Self { inner, end }
    }
}

impl<F: Future<Output = Answer>> Future for Ending<F> {
    type Output = Answer;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        let Some(mut end) = this.end.take() else {
            return std::task::Poll::Ready(answer);
        };
        std::task::Poll::Ready(match crate::grpc::status_of(answer.headers()) {
            Some(code) => {
                end.finish(code);
                answer
            }
            None => answer.map(|body| body.with_another_end(end)),
        })
    }
}

/// What every call ends in: a gRPC response whose body reports the call's
/// end (see [`ResponseBody`]).
pub type Answer = Response<ResponseBody>;

/// A gRPC call on its way down a stack.
#[derive(Debug)]
pub struct Call {
    /// The method called (the request's own `:path`).
    pub method: GrpcMethod,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body, not yet read.
    pub body: RequestBody,
    /// When the proxy received the call.
    pub started: Instant,
    /// When the whole call must be over; set by the deadline layer.
    pub deadline: Option<Instant>,
    /// The external caller the edge verified (edge calls only).
    pub access: Option<AccessInfo>,
    /// The call's span, when it is recorded (see [`trace`]).
    pub trace: Option<std::sync::Arc<trace::CallSpan>>,
}

impl Call {
    /// The call's `grpc-timeout`, if it sent a valid one.
    pub fn caller_timeout(&self) -> Option<std::time::Duration> {
        self.headers
            .get("grpc-timeout")
            .and_then(crate::grpc::parse_timeout)
    }
}

/// A request that carries a [`Call`] (each layer may add its own facts).
pub trait CarriesCall: Send + 'static {
    /// The call.
    fn call(&self) -> &Call;
    /// The call, to change.
    fn call_mut(&mut self) -> &mut Call;
    /// The caller's verified identity, where the request carries one.
    fn peer_identity(&self) -> Option<&str> {
        None
    }
}

impl CarriesCall for Call {
    fn call(&self) -> &Call {
        self
    }
    fn call_mut(&mut self) -> &mut Call {
        self
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Stand-ins for inner layers in the layers' unit tests.

    use std::sync::Mutex;

    use super::*;

    /// An inner layer that answers every request with `answer` and keeps
    /// what it saw.
    pub struct Recorder<R, A> {
        pub seen: Mutex<Vec<R>>,
        pub answer: Box<dyn Fn(&R) -> A + Send + Sync>,
    }

    impl<R: Send + 'static, A: Send + 'static> Recorder<R, A> {
        pub fn new(answer: impl Fn(&R) -> A + Send + Sync + 'static) -> Self {
            Self {
                seen: Mutex::new(Vec::new()),
                answer: Box::new(answer),
            }
        }
    }

    impl<R: Send + 'static, A: Send + 'static> Handle<R> for Recorder<R, A> {
        type Answer = A;
        async fn handle(&self, request: R) -> A {
            let answer = (self.answer)(&request);
            self.seen.lock().unwrap().push(request);
            answer
        }
    }

    /// A call of `/a.v1.S/M` with these headers.
    pub fn call(headers: &[(&'static str, &'static str)]) -> Call {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        Call {
            method: GrpcMethod::parse(&http::uri::PathAndQuery::from_static("/a.v1.S/M")).unwrap(),
            headers: map,
            body: RequestBody::Empty,
            started: Instant::now(),
            deadline: None,
            access: None,
            trace: None,
        }
    }

    /// A response body for test servers.
    pub type TestBody =
        http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

    /// An address on 127.0.0.1 where nothing listens (bound, then closed).
    pub async fn closed_addr() -> std::net::SocketAddr {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// An h2c server on 127.0.0.1 answering every request with `answer`.
    pub async fn server(answer: fn() -> Response<TestBody>) -> std::net::SocketAddr {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    move |_: http::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(answer())
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        addr
    }

    #[tokio::test(start_paused = true)]
    async fn within_a_deadline_or_without_one() {
        let soon = Instant::now() + std::time::Duration::from_millis(10);
        let slow = tokio::time::sleep(std::time::Duration::from_secs(1));
        assert_eq!(within(Some(soon), slow).await, None);
        assert_eq!(within(Some(soon), async { 7 }).await, Some(7));
        let slow = async {
            tokio::time::sleep(std::time::Duration::from_secs(100)).await;
            8
        };
        assert_eq!(within(None, slow).await, Some(8));
    }

    /// The gRPC status of an answer (in its headers: trailers-only).
    pub fn status(answer: &Answer) -> Option<tonic::Code> {
        crate::grpc::status_of(answer.headers())
    }
}
