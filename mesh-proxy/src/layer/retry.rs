//! Outbound: attempts until one answers or the retry decision
//! ([`crate::retry::decide`]) says stop. Each attempt carries the time left
//! in `grpc-timeout` and goes to another endpoint than the one before; a
//! request that may be retried is recorded as it streams (up to the
//! policy's cap) so that it can be replayed; retries after a sent attempt
//! also need the retry budget. When the deadline passes between attempts,
//! the caller learns what the last attempt ran into.

use http::Response;
use std::sync::{Arc, OnceLock};
use tokio::time::Instant;
use tonic::Code;

use super::balance::{Attempt, Balanced};
use super::endpoint::{Answered, Attempted, FinalStatus};
use super::route::Routed;
use super::{Answer, Call, Handle, within};
use crate::body::{Recorder, RequestBody, ResponseBody};
use crate::directory::Upstream;
use crate::discovery::MeshView;
use crate::endpoint::Endpoint;
use crate::grpc::{self, GrpcMethod};
use crate::metrics;
use crate::policy::{Hedge, RetryPolicy, Route, ServicePolicy};
use crate::retry::{self, Circumstances, Decision, Failure, Pushback};
use crate::settings::RetryLimits;
use tower::retry::budget::TpsBudget;

/// The retry layer.
#[derive(Debug)]
pub struct Retry<S> {
    inner: S,
    view: Arc<MeshView>,
    limits: RetryLimits,
}

impl<S> Retry<S> {
    /// Retries through `inner`, with the retry budgets of `view`, within
    /// `limits`.
    pub fn new(view: Arc<MeshView>, limits: RetryLimits, inner: S) -> Self {
        Self {
            inner,
            view,
            limits,
        }
    }
}

/// The caller's request body, streamed once or recorded for replay.
struct BodySlot {
    recorder: Option<Recorder>,
    direct: Option<RequestBody>,
}

impl BodySlot {
    fn new(body: RequestBody, policy: &RetryPolicy) -> Self {
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

    /// Whether another attempt could send the whole request.
    fn replayable(&self) -> bool {
        match &self.recorder {
            Some(r) => r.replayable(),
            None => self.direct.is_some(),
        }
    }
}

/// What one attempt's outcome means for the call.
enum Step {
    /// The caller gets this.
    Answer(Answer),
    /// It failed; the retry decision says whether another goes.
    Failed(Failed),
}

/// A failed attempt.
struct Failed {
    failure: Failure,
    give_up: GiveUp,
    /// Where it went, if it went anywhere.
    endpoint: Option<Arc<Endpoint>>,
    /// The headers and body of an attempt that never left.
    returned: Option<(Option<http::HeaderMap>, RequestBody)>,
}

/// Reads an attempt's outcome; `last_failure` learns what went wrong.
fn step(balanced: Balanced, service: &str, mesh: &str, last_failure: &mut String) -> Step {
    let (endpoint, attempted) = match balanced {
        Balanced::Tried(endpoint, attempted) => (endpoint, attempted),
        Balanced::TimedOut(endpoint, after) => {
            *last_failure = format!(
                "{service} endpoint {} did not answer within the per-try timeout of {}ms",
                endpoint.addr,
                after.as_millis()
            );
            return Step::Failed(Failed {
                failure: Failure::Reset { refused: false },
                give_up: GiveUp::Status(Code::DeadlineExceeded),
                endpoint: Some(endpoint),
                returned: None,
            });
        }
        Balanced::NoEndpoint => {
            return Step::Answer(grpc::status_response(
                Code::Unavailable,
                &format!("no healthy endpoint serves {service} right now"),
            ));
        }
        Balanced::NoVersion(version) => {
            return Step::Answer(grpc::status_response(
                Code::Unavailable,
                &format!(
                    "no healthy instance of {mesh} at version {version:?}, which the call's {} header asks for",
                    grpc::VERSION_HEADER
                ),
            ));
        }
    };
    let (failure, give_up, returned) = match attempted {
        Attempted::Answered(answered) => match answered.status {
            Some(status) if status.code != Code::Ok => {
                *last_failure = format!(
                    "{service} endpoint {} answered {}",
                    endpoint.addr,
                    grpc::code_name(status.code)
                );
                (
                    Failure::Status(status),
                    GiveUp::Pass(Box::new(answered)),
                    None,
                )
            }
            _ => return Step::Answer(pass_on(answered)),
        },
        Attempted::NotGrpc(http_status) => {
            // Not a gRPC answer (a proxy or load balancer in the way):
            // the caller gets the gRPC status it stands for.
            let code = grpc::code_for_http(http_status);
            *last_failure = format!(
                "{service} endpoint {} answered HTTP {http_status} instead of gRPC",
                endpoint.addr
            );
            let status = FinalStatus {
                code,
                pushback: Pushback::None,
                unprocessed: false,
            };
            (Failure::Status(status), GiveUp::Status(code), None)
        }
        Attempted::NotSent {
            error,
            headers,
            body,
        } => {
            *last_failure = format!("cannot reach {service} endpoint: {error}");
            (
                Failure::NotSent,
                GiveUp::Status(Code::Unavailable),
                Some((headers, body)),
            )
        }
        Attempted::Reset(reset) => {
            *last_failure = format!("call to {service} failed: {reset}");
            let refused = reset.refused;
            (
                Failure::Reset { refused },
                GiveUp::Status(Code::Unavailable),
                None,
            )
        }
    };
    Step::Failed(Failed {
        failure,
        give_up,
        endpoint: Some(endpoint),
        returned,
    })
}

impl<S> Handle<Routed> for Retry<S>
where
    S: Handle<Attempt, Answer = Balanced>,
{
    type Answer = Answer;

    async fn handle(&self, routed: Routed) -> Answer {
        let Routed {
            call:
                Call {
                    method,
                    headers,
                    body,
                    deadline,
                    trace,
                    ..
                },
            upstream,
            route,
            policy: service_policy,
            pinned,
            safe,
        } = routed;
        let service = method.service();
        let policy = &route.retry;
        let budget = self.view.budgets.get(service, policy.budget_ratio);
        retry::deposit(&budget);
        let target = Target {
            upstream: &upstream,
            route: &route,
            policy: &service_policy,
            pinned: &pinned,
            method: &method,
            deadline,
            trace: &trace,
        };
        if let Some(hedge) = route.hedge.filter(|_| safe) {
            let hedging = Hedging {
                hedge,
                policy: RetryPolicy {
                    max_attempts: hedge.max_attempts,
                    ..policy.clone()
                },
                budget,
                deadline,
            };
            // Boxed: the hedged path's state (copies in flight, their
            // timers) would otherwise be carried and copied with every
            // call's future, hedged or not.
            return Box::pin(self.hedged(hedging, &target, headers, body)).await;
        }
        let mut body = BodySlot::new(body, policy);
        // Headers for an attempt after one that was sent (which took its
        // own): copied only when such an attempt is possible.
        let template = body.recorder.is_some().then(|| headers.clone());
        let mut headers = Some(headers);
        let mut made = 0u32;
        let mut avoid: Vec<Arc<Endpoint>> = Vec::new();
        let mut last_failure = String::new();
        loop {
            made += 1;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return expired(service, &last_failure);
            }
            let attempt_headers = match headers.take() {
                Some(h) => h,
                None => template.clone().unwrap_or_default(),
            };
            let peek = body
                .recorder
                .clone()
                .filter(|_| safe && made < policy.max_attempts);
            let next = target.attempt(
                attempt_headers,
                body.take(),
                std::mem::take(&mut avoid),
                peek,
                None,
            );
            let Some(balanced) = within(deadline, self.inner.handle(next)).await else {
                // Dropping the attempt resets its stream: the callee sees
                // the cancellation.
                return expired(service, &last_failure);
            };
            let failed = match step(balanced, service, &upstream.mesh_service, &mut last_failure) {
                Step::Answer(answer) => return answer,
                Step::Failed(failed) => failed,
            };
            if let Some((returned, unsent)) = failed.returned {
                body.put_back(unsent);
                headers = returned;
            }
            let now = Circumstances {
                made,
                safe,
                // The headers too: a request HTTP/2 refused after taking
                // them can go again only from the copy kept for retries.
                replayable: body.replayable() && (headers.is_some() || template.is_some()),
            };
            let wait = match retry::decide(failed.failure, policy, &self.limits, now) {
                Decision::Retry { after, budgeted } if !budgeted || retry::withdraw(&budget) => {
                    after
                }
                _ => return failed.give_up.answer(&last_failure),
            };
            metrics::get().retried(service);
            tracing::debug!(service, attempt = made, wait_ms = wait.as_millis() as u64, reason = %last_failure, "retrying");
            avoid.extend(failed.endpoint);
            if !wait.is_zero() {
                let until = Instant::now() + wait;
                tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
            }
        }
    }
}

/// What every attempt of one call shares.
struct Target<'a> {
    upstream: &'a Arc<Upstream>,
    route: &'a Route,
    policy: &'a Arc<ServicePolicy>,
    pinned: &'a Option<Arc<str>>,
    method: &'a GrpcMethod,
    deadline: Option<Instant>,
    trace: &'a Option<Arc<crate::layer::trace::CallSpan>>,
}

impl Target<'_> {
    /// An attempt carrying `headers` (plus the time left, in
    /// `grpc-timeout`) and `body`.
    fn attempt(
        &self,
        mut headers: http::HeaderMap,
        body: RequestBody,
        avoid: Vec<Arc<Endpoint>>,
        peek: Option<Recorder>,
        chosen: Option<Arc<OnceLock<Arc<Endpoint>>>>,
    ) -> Attempt {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            headers.insert("grpc-timeout", grpc::encode_timeout(left));
        }
        Attempt {
            upstream: self.upstream.clone(),
            balancing: self.route.balancing,
            policy: self.policy.clone(),
            pinned: self.pinned.clone(),
            avoid,
            chosen,
            method: self.method.clone(),
            headers,
            body,
            deadline: self.deadline,
            per_try: self.route.retry.per_try_timeout,
            peek,
            trace: self.trace.clone(),
        }
    }
}

/// What a hedged call goes by.
struct Hedging {
    hedge: Hedge,
    /// The route's retry policy with the hedge's attempts: which failures
    /// of a copy let the next go at once.
    policy: RetryPolicy,
    budget: Arc<TpsBudget>,
    deadline: Option<Instant>,
}

impl<S> Retry<S>
where
    S: Handle<Attempt, Answer = Balanced>,
{
    /// A safe call with a hedge policy: a copy goes to another endpoint
    /// each time `delay` passes without an answer (or at once when a copy
    /// fails in a way worth another), up to `max_attempts` copies, each
    /// after the first paid from the retry budget. The first answer wins;
    /// the others are cancelled (their streams reset).
    async fn hedged(
        &self,
        hedging: Hedging,
        target: &Target<'_>,
        headers: http::HeaderMap,
        body: RequestBody,
    ) -> Answer {
        use futures::StreamExt;
        let Hedging {
            hedge,
            policy,
            budget,
            deadline,
        } = hedging;
        let service = target.method.service();
        let mesh = &target.upstream.mesh_service;
        let recorder = Recorder::new(body, policy.max_buffered_bytes);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut chosen: Vec<Arc<OnceLock<Arc<Endpoint>>>> = Vec::new();
        let mut failed_on: Vec<Arc<Endpoint>> = Vec::new();
        let mut made = 0u32;
        let mut last_failure = String::new();
        let mut last_give_up: Option<GiveUp> = None;
        let mut hedge_at: Option<Instant> = None;
        let expired_at = deadline.map(tokio::time::sleep_until);
        tokio::pin!(expired_at);
        loop {
            let launch = in_flight.is_empty() || hedge_at.is_some_and(|at| Instant::now() >= at);
            if launch {
                let can = made < hedge.max_attempts && (made == 0 || recorder.replayable());
                let paid = can && (made == 0 || retry::withdraw(&budget));
                if paid {
                    made += 1;
                    if made > 1 {
                        metrics::get().hedged(service);
                        tracing::debug!(service, copy = made, reason = %last_failure, "hedging");
                    }
                    let slot = Arc::new(OnceLock::new());
                    let mut avoid = failed_on.clone();
                    avoid.extend(chosen.iter().filter_map(|c| c.get().cloned()));
                    chosen.push(slot.clone());
                    let peek = (made < hedge.max_attempts).then(|| recorder.clone());
                    let next = target.attempt(
                        headers.clone(),
                        RequestBody::Replay(recorder.body()),
                        avoid,
                        peek,
                        Some(slot),
                    );
                    in_flight.push(self.inner.handle(next));
                    hedge_at = (made < hedge.max_attempts).then(|| Instant::now() + hedge.delay);
                } else {
                    hedge_at = None;
                    if in_flight.is_empty() {
                        return match last_give_up {
                            Some(give_up) => give_up.answer(&last_failure),
                            None => expired(service, &last_failure),
                        };
                    }
                }
            }
            let hedge_sleep = hedge_at.map(tokio::time::sleep_until);
            tokio::select! {
                Some(balanced) = in_flight.next() => {
                    let failed = match step(balanced, service, mesh, &mut last_failure) {
                        Step::Answer(answer) => return answer,
                        Step::Failed(failed) => failed,
                    };
                    failed_on.extend(failed.endpoint);
                    let now = Circumstances {
                        made,
                        safe: true,
                        replayable: recorder.replayable(),
                    };
                    // A copy's failure that the policy would not retry is
                    // the answer; one it would lets the next copy go now.
                    if !matches!(
                        retry::decide(failed.failure, &policy, &self.limits, now),
                        Decision::Retry { .. }
                    ) {
                        return failed.give_up.answer(&last_failure);
                    }
                    last_give_up = Some(failed.give_up);
                    if in_flight.is_empty() {
                        hedge_at = Some(Instant::now());
                    }
                }
                () = async { hedge_sleep.expect("only when set").await }, if hedge_sleep.is_some() => {}
                () = async { expired_at.as_mut().as_pin_mut().expect("only with a deadline").await }, if deadline.is_some() => {
                    return expired(service, &last_failure);
                }
            }
        }
    }
}

/// The answer when the retry decision says stop.
enum GiveUp {
    /// The last response, as it came.
    Pass(Box<Answered>),
    /// A status of the proxy's own, with the last failure as its message.
    Status(Code),
}

impl GiveUp {
    fn answer(self, last_failure: &str) -> Answer {
        match self {
            Self::Pass(answered) => pass_on(*answered),
            Self::Status(code) => grpc::status_response(code, last_failure),
        }
    }
}

/// A response passed on to the caller as it came (less the header meant
/// only for this proxy).
fn pass_on(answered: Answered) -> Answer {
    let Answered {
        mut parts,
        body,
        first,
        ..
    } = answered;
    parts.headers.remove(grpc::UNPROCESSED_HEADER);
    if grpc::status_of(&parts.headers).is_some() {
        // Trailers-only: the status is all there is.
        return Response::from_parts(parts, ResponseBody::default());
    }
    Response::from_parts(parts, ResponseBody::upstream(body, first))
}

/// DEADLINE_EXCEEDED, naming what the last attempt ran into.
fn expired(service: &str, last_failure: &str) -> Answer {
    let message = if last_failure.is_empty() {
        format!("deadline exceeded calling {service}")
    } else {
        format!("deadline exceeded calling {service} (last failure: {last_failure})")
    };
    grpc::status_response(Code::DeadlineExceeded, &message)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::directory::Upstream;
    use crate::endpoint::{ConnectError, Transport};
    use crate::layer::endpoint::NotSent;
    use crate::layer::testing::{call, status};
    use crate::policy::Route;

    /// What one attempt carried: the endpoint it avoided, its
    /// `grpc-timeout`, and when it was made.
    type Seen = (Option<std::net::SocketAddr>, Option<String>, Instant);

    /// Answers attempts from a script; records what each attempt carried.
    struct Script {
        answer: fn(&Attempt) -> Attempted,
        seen: Mutex<Vec<Seen>>,
    }

    impl Handle<Attempt> for Arc<Script> {
        type Answer = Balanced;
        async fn handle(&self, attempt: Attempt) -> Balanced {
            let endpoint = attempt
                .upstream
                .pick(attempt.avoid.last())
                .expect("endpoints");
            self.seen.lock().unwrap().push((
                attempt.avoid.last().map(|e| e.addr),
                attempt
                    .headers
                    .get("grpc-timeout")
                    .map(|v| v.to_str().unwrap().to_owned()),
                Instant::now(),
            ));
            Balanced::Tried(endpoint, (self.answer)(&attempt))
        }
    }

    fn unreachable(a: &Attempt) -> Attempted {
        Attempted::NotSent {
            error: NotSent::Connect(ConnectError::FailedWhileQueued {
                addr: "127.0.0.1:9".parse().unwrap(),
            }),
            headers: Some(a.headers.clone()),
            body: RequestBody::Empty,
        }
    }

    fn bad_gateway(_: &Attempt) -> Attempted {
        Attempted::NotGrpc(StatusCode::SERVICE_UNAVAILABLE)
    }

    fn retry(answer: fn(&Attempt) -> Attempted) -> (Retry<Arc<Script>>, Arc<Script>) {
        let script = Arc::new(Script {
            answer,
            seen: Mutex::default(),
        });
        let layer = Retry::new(
            Arc::new(MeshView::default()),
            RetryLimits::default(),
            script.clone(),
        );
        (layer, script)
    }

    fn routed(safe: bool, backoff: Duration, deadline: Option<Duration>) -> Routed {
        let mut call = call(&[]);
        call.deadline = deadline.map(|d| call.started + d);
        let endpoints = (0..3)
            .map(|i| {
                Endpoint::new(
                    format!("127.0.0.1:{}", 9100 + i).parse().unwrap(),
                    Transport::H2c,
                )
            })
            .collect();
        Routed {
            call,
            upstream: Upstream::new("a".into(), endpoints),
            route: Arc::new(Route {
                retry: RetryPolicy {
                    initial_backoff: backoff,
                    max_backoff: backoff,
                    ..RetryPolicy::default()
                },
                ..Route::default()
            }),
            policy: Arc::default(),
            pinned: None,
            safe,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_left_is_sent_elsewhere_at_once() {
        let (layer, script) = retry(unreachable);
        let started = Instant::now();
        let answer = layer
            .handle(routed(false, Duration::from_secs(1), None))
            .await;
        assert_eq!(status(&answer), Some(Code::Unavailable));
        assert!(
            grpc::message_of(answer.headers()).starts_with("cannot reach a.v1.S endpoint"),
            "{:?}",
            answer.headers()
        );
        let seen = script.seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            RetryLimits::default().max_unsent_attempts as usize
        );
        assert!(seen.iter().all(|(_, _, at)| *at == started), "no backoff");
        assert_eq!(seen[0].0, None);
        assert!(
            seen[1].0.is_some(),
            "the next attempt avoids the last endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_safe_method_is_retried_after_a_backoff_and_an_unsafe_one_is_not() {
        let (layer, script) = retry(bad_gateway);
        let answer = layer
            .handle(routed(true, Duration::from_millis(100), None))
            .await;
        assert_eq!(status(&answer), Some(Code::Unavailable));
        assert!(grpc::message_of(answer.headers()).contains("answered HTTP 503"));
        assert_eq!(script.seen.lock().unwrap().len(), 3, "max_attempts");

        let (layer, script) = retry(bad_gateway);
        layer
            .handle(routed(false, Duration::from_millis(100), None))
            .await;
        assert_eq!(script.seen.lock().unwrap().len(), 1, "not safe to repeat");
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_carries_the_time_left_and_the_deadline_names_the_last_failure() {
        let (layer, script) = retry(bad_gateway);
        // A backoff of up to 10 s against a deadline of 300 ms.
        let answer = layer
            .handle(routed(
                true,
                Duration::from_secs(10),
                Some(Duration::from_millis(300)),
            ))
            .await;
        let seen = script.seen.lock().unwrap();
        assert_eq!(seen[0].1.as_deref(), Some("300000u"));
        if seen.len() == 1 {
            assert_eq!(status(&answer), Some(Code::DeadlineExceeded));
            let message = grpc::message_of(answer.headers());
            assert!(
                message.contains("last failure: a.v1.S endpoint") && message.contains("HTTP 503"),
                "{message}"
            );
        } else {
            // The jittered backoff happened to be short: the next attempt
            // had less time.
            let left = seen[1].1.as_deref().unwrap();
            assert!(parse(left) < Duration::from_millis(300), "{left}");
        }
    }

    fn parse(timeout: &str) -> Duration {
        grpc::parse_timeout(&http::HeaderValue::from_str(timeout).unwrap()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_retries() {
        let (layer, script) = retry(bad_gateway);
        let budget = layer.view.budgets.get("a.v1.S", 0.0);
        while retry::withdraw(&budget) {}
        let mut r = routed(true, Duration::ZERO, None);
        Arc::get_mut(&mut r.route).unwrap().retry.budget_ratio = 0.0;
        layer.handle(r).await;
        assert_eq!(script.seen.lock().unwrap().len(), 1);
    }

    /// Sends every attempt round robin (skipping the ones to avoid); the
    /// first endpoint stalls, the others answer (not gRPC) at once.
    #[derive(Default)]
    struct Stall {
        seen: Mutex<Vec<(u16, Instant)>>,
    }

    impl Handle<Attempt> for Arc<Stall> {
        type Answer = Balanced;
        async fn handle(&self, attempt: Attempt) -> Balanced {
            let u = &attempt.upstream;
            let endpoint = u
                .choose(
                    crate::policy::Balancing::RoundRobin,
                    |e| attempt.avoid.iter().any(|a| Arc::ptr_eq(a, e)),
                    |_| true,
                )
                .map(|i| u.endpoints[i].clone())
                .expect("endpoints");
            if let Some(chosen) = &attempt.chosen {
                chosen.set(endpoint.clone()).unwrap();
            }
            self.seen
                .lock()
                .unwrap()
                .push((endpoint.addr.port(), Instant::now()));
            if Arc::ptr_eq(&endpoint, &u.endpoints[0]) {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Balanced::Tried(endpoint, Attempted::NotGrpc(StatusCode::OK))
        }
    }

    fn hedged(safe: bool) -> Routed {
        let mut r = routed(safe, Duration::from_millis(1), None);
        Arc::get_mut(&mut r.route).unwrap().hedge = Some(Hedge {
            delay: Duration::from_millis(50),
            max_attempts: 3,
        });
        r
    }

    #[tokio::test(start_paused = true)]
    async fn a_safe_call_is_hedged_elsewhere_after_the_delay_and_the_first_answer_wins() {
        let stall = Arc::new(Stall::default());
        let layer = Retry::new(
            Arc::new(MeshView::default()),
            RetryLimits::default(),
            stall.clone(),
        );
        let started = Instant::now();
        let answer = layer.handle(hedged(true)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let message = grpc::message_of(answer.headers());
        assert!(message.contains("127.0.0.1:9101"), "{message}");
        let seen = stall.seen.lock().unwrap();
        assert_eq!(
            seen.iter().map(|(port, _)| *port).collect::<Vec<_>>(),
            [9100, 9101],
            "the second copy went elsewhere, and its answer ended the call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsafe_call_is_never_hedged() {
        let stall = Arc::new(Stall::default());
        let layer = Retry::new(
            Arc::new(MeshView::default()),
            RetryLimits::default(),
            stall.clone(),
        );
        let started = Instant::now();
        layer.handle(hedged(false)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(stall.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_are_paid_from_the_retry_budget() {
        let stall = Arc::new(Stall::default());
        let layer = Retry::new(
            Arc::new(MeshView::default()),
            RetryLimits::default(),
            stall.clone(),
        );
        let budget = layer.view.budgets.get("a.v1.S", 0.0);
        while retry::withdraw(&budget) {}
        let mut r = hedged(true);
        Arc::get_mut(&mut r.route).unwrap().retry.budget_ratio = 0.0;
        let started = Instant::now();
        layer.handle(r).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "no budget, no hedge"
        );
        assert_eq!(stall.seen.lock().unwrap().len(), 1);
    }
}
