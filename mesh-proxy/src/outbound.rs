//! The outbound side: the local service's calls to the rest of the mesh.
//!
//! One call goes through these steps, in this order (order is behaviour):
//!
//! 1. Check it is gRPC and split `:path` into service and method.
//! 2. Look the service up in the routing table (no endpoints:
//!    UNAVAILABLE; unknown: UNIMPLEMENTED).
//! 3. Take the route's policy and fix the call's deadline: the route's
//!    timeout or the caller's `grpc-timeout`, whichever is sooner. The
//!    deadline is outermost: it bounds every attempt and every backoff.
//! 4. Attempt: pick an endpoint round robin (skipping ejected ones), send
//!    over its pooled mTLS connection with the time left in
//!    `grpc-timeout`.
//! 5. Decide: a request that never left goes to another endpoint; a
//!    retryable status on a safe method is retried after backoff (or the
//!    server's pushback) if the budget allows and the request could be
//!    replayed; anything else, including a response that has started to
//!    stream, goes back to the caller as it is.

use std::sync::Arc;

use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;

use crate::access::{AccessInfo, AccessLog};
use crate::body::{CallEnd, Recorder, RequestBody, ResponseBody, first_frame};
use crate::directory::{Lookup, Upstream};
use crate::discovery::MeshView;
use crate::endpoint::{Endpoint, Outcome};
use crate::forward::{self, AttemptError};
use crate::grpc;
use crate::metrics;
use crate::policy::Route;
use crate::retry::{self, Pushback};

/// Attempts a request that never left may take, whatever the policy: the
/// endpoint did not see it, so sending it elsewhere is always safe.
const MAX_UNSENT_ATTEMPTS: u32 = 3;

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    view: Arc<MeshView>,
    direction: &'static str,
}

impl Outbound {
    /// An outbound proxy routing by `view`; `direction` labels its metrics
    /// (`outbound`, or `edge` for the edge).
    pub fn new(view: Arc<MeshView>, direction: &'static str) -> Arc<Self> {
        Arc::new(Self { view, direction })
    }

    /// Handles one call from the local service.
    pub async fn handle<B: Into<RequestBody>>(
        &self,
        request: Request<B>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let path = match grpc::method_of(&request, "the outbound port") {
            Ok(path) => path,
            Err(answer) => return answer,
        };
        let (service, method) = (path.service.to_owned(), path.method.to_owned());
        let lookup = self.view.directory.load().lookup(&service);
        // Only services the mesh can route get their own metric labels: a
        // caller choosing paths must not choose how many series we keep.
        // Asked only for a series not seen yet: no contract lookup per call.
        let mut observer = metrics::get().call(self.direction, &service, &method, || {
            !matches!(lookup, Lookup::Unknown) && self.view.known_method(&service, &method)
        });
        let mut principal = None;
        if let Some(info) = request.extensions().get::<AccessInfo>() {
            principal = info.principal.clone();
            observer = Arc::new(AccessLog {
                inner: observer,
                info: info.clone(),
                service: service.clone(),
                method: method.clone(),
            });
        }
        let mut end = CallEnd::new(observer, started);
        let upstream = match lookup {
            Lookup::Found(upstream) => upstream,
            Lookup::NoEndpoints => {
                end.finish(Code::Unavailable);
                return grpc::status_response(
                    Code::Unavailable,
                    &format!("no healthy endpoint serves {service} right now"),
                );
            }
            Lookup::Unknown => {
                end.finish(Code::Unimplemented);
                return grpc::status_response(
                    Code::Unimplemented,
                    &format!("no service in the mesh serves {service}"),
                );
            }
        };
        let policy = self.view.policy(&upstream.mesh_service);
        let route = policy.route(&service, &method);
        let safe = route.idempotent || self.view.contract_safe(&service, &method);
        let caller_timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(grpc::parse_timeout);
        let deadline = [route.timeout, caller_timeout]
            .into_iter()
            .flatten()
            .min()
            .map(|d| started + d);
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        // Only the inbound side names the caller, from its certificate.
        headers.remove(grpc::CALLER_HEADER);
        // Only an edge names an external caller, from credentials it
        // verified (an extension no client can send): a local process
        // claiming a principal on this port must not be believed.
        headers.remove(grpc::PRINCIPAL_HEADER);
        if let Some(principal) = principal {
            headers.insert(grpc::PRINCIPAL_HEADER, principal);
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .expect("a parsed gRPC path");
        let call = Call {
            outbound: self,
            service: &service,
            upstream: &upstream,
            route,
            safe,
            deadline,
            headers,
            path: path_and_query,
        };
        call.run(body.into(), end).await
    }
}

struct Call<'a> {
    outbound: &'a Outbound,
    service: &'a str,
    upstream: &'a Upstream,
    route: &'a Route,
    safe: bool,
    deadline: Option<Instant>,
    headers: HeaderMap,
    path: http::uri::PathAndQuery,
}

/// What to do after an attempt that did not succeed.
// Lives on the stack for one decision; boxing the response would cost an
// allocation per call.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Give this answer to the caller.
    Answer(Response<ResponseBody>),
    /// Try again, after this long.
    Retry(std::time::Duration),
}

/// The caller's request body, streamed once or recorded for replay.
struct BodySlot {
    recorder: Option<Recorder>,
    direct: Option<RequestBody>,
}

impl BodySlot {
    fn new(body: RequestBody, policy: &crate::policy::RetryPolicy) -> Self {
        // Recording costs a reference count per frame; only calls that
        // may be retried pay it.
        if policy.max_attempts > 1 {
            Self {
                recorder: Some(Recorder::new(body, policy.max_buffered_bytes)),
                direct: None,
            }
        } else {
            Self {
                recorder: None,
                direct: Some(body),
            }
        }
    }

    /// The body for the next attempt.
    fn take(&mut self) -> RequestBody {
        match &self.recorder {
            Some(r) => RequestBody::Replay(r.body()),
            None => self.direct.take().unwrap_or_default(),
        }
    }

    /// Takes back the body of an attempt that never left.
    fn put_back(&mut self, body: RequestBody) {
        if body.is_fresh() {
            self.direct = Some(body);
        }
    }

    /// Whether the caller has finished sending (so a response may be
    /// waited on without waiting on the caller).
    fn complete(&self) -> bool {
        self.recorder.as_ref().is_some_and(Recorder::complete)
    }

    /// Whether another attempt could send the whole request.
    fn replayable(&self) -> bool {
        match &self.recorder {
            Some(r) => r.replayable(),
            None => self.direct.is_some(),
        }
    }
}

impl Call<'_> {
    async fn run(self, body: RequestBody, mut end: CallEnd) -> Response<ResponseBody> {
        let policy = &self.route.retry;
        let budget = self
            .outbound
            .view
            .budgets
            .get(self.service, policy.budget_ratio);
        retry::deposit(&budget);
        let mut body_slot = BodySlot::new(body, policy);
        let mut attempt = 0u32;
        let mut avoid: Option<Arc<Endpoint>> = None;
        let mut last_failure = String::new();
        loop {
            attempt += 1;
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                end.finish(Code::DeadlineExceeded);
                return grpc::status_response(
                    Code::DeadlineExceeded,
                    &self.deadline_message(&last_failure),
                );
            }
            let Some(endpoint) = self.upstream.pick(avoid.as_ref()) else {
                end.finish(Code::Unavailable);
                return grpc::status_response(
                    Code::Unavailable,
                    &format!("no healthy endpoint serves {} right now", self.service),
                );
            };
            let mut headers = self.headers.clone();
            if let Some(deadline) = self.deadline {
                headers.insert("grpc-timeout", grpc::encode_timeout(deadline - now));
            }
            let request = forward::request(
                forward::uri_for(&endpoint, &self.path),
                &headers,
                body_slot.take(),
            );
            let sent = match self.deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, forward::send(&endpoint, request)).await
                    {
                        Ok(result) => result,
                        Err(_) => {
                            // Dropping the attempt resets its stream: the
                            // callee sees the cancellation.
                            end.finish(Code::DeadlineExceeded);
                            return grpc::status_response(
                                Code::DeadlineExceeded,
                                &self.deadline_message(&last_failure),
                            );
                        }
                    }
                }
                None => forward::send(&endpoint, request).await,
            };
            let next = match sent {
                Ok(response) => {
                    match self
                        .judge(response, &endpoint, attempt, &body_slot, &budget)
                        .await
                    {
                        Judged::Answer(response) => {
                            if let Some(code) = grpc::status_of(response.headers()) {
                                end.finish(code);
                                return response;
                            }
                            return response.map(|b| b.with_end(end.take()));
                        }
                        Judged::Retry(wait, why) => {
                            last_failure = why;
                            Next::Retry(wait)
                        }
                    }
                }
                Err(AttemptError::NotSent(request, why)) => {
                    self.record(&endpoint, Outcome::Unreachable);
                    body_slot.put_back(request.into_body());
                    last_failure = format!("cannot reach {} endpoint: {why}", self.service);
                    if attempt < MAX_UNSENT_ATTEMPTS && body_slot.replayable() {
                        Next::Retry(std::time::Duration::ZERO)
                    } else {
                        Next::Answer(grpc::status_response(Code::Unavailable, &last_failure))
                    }
                }
                Err(AttemptError::Failed(why, refused)) => {
                    self.record(&endpoint, Outcome::Failure);
                    last_failure = format!("call to {} failed: {why}", self.service);
                    let may = (refused || self.safe)
                        && attempt < policy.max_attempts
                        && body_slot.replayable()
                        && retry::withdraw(&budget);
                    if may {
                        Next::Retry(retry::backoff(policy, attempt))
                    } else {
                        Next::Answer(grpc::status_response(Code::Unavailable, &last_failure))
                    }
                }
            };
            match next {
                Next::Answer(answer) => {
                    end.finish(grpc::status_of(answer.headers()).unwrap_or(Code::Unknown));
                    return answer;
                }
                Next::Retry(wait) => {
                    metrics::get().retried(self.service);
                    tracing::debug!(service = self.service, attempt, wait_ms = wait.as_millis() as u64, reason = %last_failure, "retrying");
                    avoid = Some(endpoint);
                    if !wait.is_zero() {
                        let until = Instant::now() + wait;
                        let until = self.deadline.map_or(until, |d| d.min(until));
                        tokio::time::sleep_until(until).await;
                    }
                }
            }
        }
    }

    fn deadline_message(&self, last_failure: &str) -> String {
        if last_failure.is_empty() {
            format!("deadline exceeded calling {}", self.service)
        } else {
            format!(
                "deadline exceeded calling {} (last failure: {last_failure})",
                self.service
            )
        }
    }

    fn record(&self, endpoint: &Endpoint, outcome: Outcome) {
        if endpoint.record(outcome) {
            metrics::get().ejected(self.service);
        }
    }

    /// Looks at a response: a success, or anything not worth another
    /// attempt, goes back to the caller; a retryable failure asks for
    /// another attempt.
    async fn judge(
        &self,
        response: Response<Incoming>,
        endpoint: &Endpoint,
        attempt: u32,
        body_slot: &BodySlot,
        budget: &tower::retry::budget::TpsBudget,
    ) -> Judged {
        let policy = &self.route.retry;
        let (mut parts, mut body) = response.into_parts();
        if parts.status != StatusCode::OK {
            // Not a gRPC answer (a proxy or load balancer in the way): the
            // caller gets the gRPC status it stands for.
            let code = grpc::code_for_http(parts.status);
            self.record(endpoint, Outcome::Failure);
            let message = format!(
                "{} endpoint {} answered HTTP {} instead of gRPC",
                self.service, endpoint.addr, parts.status
            );
            if self.safe
                && policy.retryable.contains(&code)
                && attempt < policy.max_attempts
                && body_slot.replayable()
                && retry::withdraw(budget)
            {
                return Judged::Retry(retry::backoff(policy, attempt), message);
            }
            return Judged::Answer(grpc::status_response(code, &message));
        }
        let mut first = None;
        let (code, pushback, unprocessed) = if let Some(code) = grpc::status_of(&parts.headers) {
            (
                code,
                retry::pushback(&parts.headers),
                parts.headers.contains_key(grpc::UNPROCESSED_HEADER),
            )
        } else if self.safe
            && attempt < policy.max_attempts
            && body_slot.replayable()
            && body_slot.complete()
        {
            // A status may follow at once in trailers, with no message:
            // look before committing, so that it can still be retried.
            // Only once the caller has sent everything: a streaming caller
            // may be waiting for these very headers before it sends more.
            let frame = match self.deadline {
                Some(d) => tokio::time::timeout_at(d, first_frame(&mut body))
                    .await
                    .ok()
                    .flatten(),
                None => first_frame(&mut body).await,
            };
            let mut status = (Code::Ok, Pushback::None, false);
            if let Some(Ok(frame)) = frame {
                if let Some(t) = frame.trailers_ref() {
                    status = (
                        grpc::status_of(t).unwrap_or(Code::Unknown),
                        retry::pushback(t),
                        false,
                    );
                }
                first = Some(frame);
            }
            status
        } else {
            (Code::Ok, Pushback::None, false)
        };

        let failed = code == Code::Unavailable;
        self.record(
            endpoint,
            if failed {
                Outcome::Failure
            } else {
                Outcome::Success
            },
        );
        let retryable = unprocessed || (self.safe && policy.retryable.contains(&code));
        if code != Code::Ok && retryable && attempt < policy.max_attempts && body_slot.replayable()
        {
            let wait = match pushback {
                Pushback::Stop => None,
                Pushback::Wait(d) => Some(d),
                Pushback::None => Some(retry::backoff(policy, attempt)),
            };
            if let Some(wait) = wait
                && retry::withdraw(budget)
            {
                let why = format!(
                    "{} endpoint {} answered {}",
                    self.service,
                    endpoint.addr,
                    grpc::code_name(code)
                );
                return Judged::Retry(wait, why);
            }
        }
        parts.headers.remove(grpc::UNPROCESSED_HEADER);
        if grpc::status_of(&parts.headers).is_some() {
            // Trailers-only: the status is all there is.
            return Judged::Answer(Response::from_parts(parts, ResponseBody::default()));
        }
        let body = ResponseBody::upstream(body, first).with_deadline(self.deadline);
        Judged::Answer(Response::from_parts(parts, body))
    }
}

/// The verdict on one response.
#[allow(clippy::large_enum_variant)]
enum Judged {
    /// Pass this on (the call's end is attached by the caller).
    Answer(Response<ResponseBody>),
    /// Try again after the wait; the reason is kept for the final message.
    Retry(std::time::Duration, String),
}
