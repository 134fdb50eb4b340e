//! Outbound: the circuit breaker of each upstream mesh service, over all
//! of this proxy's calls to it. Closed, calls go through and their final
//! statuses are counted; after too many failures (in a row, or as a share
//! of a window) it opens and every call fails at once with UNAVAILABLE
//! naming the service and why; after a while it lets a few probes
//! through (half-open) and closes when they succeed. Per-endpoint
//! ejection (the balance layer) is another thing: it takes one instance
//! out of rotation, the breaker stops calls to the whole service.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use std::future::Future;

use futures::future::{Either, ready};

use super::route::Routed;
use super::{Answer, Ending, Handle};
use crate::body::{CallEnd, CallObserver};
use crate::discovery::MeshView;
use crate::grpc;
use crate::metrics;
use crate::policy::Breaker;

/// Slices of a breaker's window: failures age out a slice at a time.
const SLICES: usize = 10;

/// Whether a call's final status counts against its service.
pub fn is_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant, why: String },
    HalfOpen { probes_left: u32, succeeded: u32 },
}

/// Calls and failures in one slice of the window.
#[derive(Clone, Copy, Debug, Default)]
struct Slice {
    index: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    in_a_row: u32,
    slices: [Slice; SLICES],
}

/// One upstream mesh service's circuit.
#[derive(Debug)]
pub struct Circuit {
    service: String,
    breaker: Breaker,
    epoch: Instant,
    state: Mutex<State>,
}

/// How a call got through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The circuit was closed.
    Normal,
    /// It was half-open: the call is a probe.
    Probe,
}

impl Circuit {
    /// A closed circuit for `service` under `breaker`.
    pub fn new(service: &str, breaker: Breaker) -> Self {
        metrics::get().circuit(service, 0);
        Self {
            service: service.to_owned(),
            breaker,
            epoch: Instant::now(),
            state: Mutex::new(State {
                phase: Phase::Closed,
                in_a_row: 0,
                slices: [Slice::default(); SLICES],
            }),
        }
    }

    /// The settings it was made for.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a call through, or says why not.
    pub fn admit(&self, now: Instant) -> Result<Admission, String> {
        let mut state = self.lock();
        if let Phase::Open { until, why } = &state.phase {
            if now < *until {
                return Err(format!(
                    "the circuit to {} is open: {why}; calls to it fail at once for {}ms more, then a probe goes through",
                    self.service,
                    (*until - now).as_millis().max(1)
                ));
            }
            state.phase = Phase::HalfOpen {
                probes_left: self.breaker.half_open_calls,
                succeeded: 0,
            };
            metrics::get().circuit(&self.service, 2);
            tracing::info!(service = %self.service, "circuit half-open: probing");
        }
        match &mut state.phase {
            Phase::Closed => Ok(Admission::Normal),
            Phase::HalfOpen { probes_left, .. } if *probes_left > 0 => {
                *probes_left -= 1;
                Ok(Admission::Probe)
            }
            _ => Err(format!(
                "the circuit to {} is half-open and its probe calls are still in flight; calls fail at once until they succeed",
                self.service
            )),
        }
    }

    /// Records how a call let through by `admission` ended: `code`, or
    /// none if the caller went away first (which says nothing about the
    /// service).
    pub fn record(&self, admission: Admission, code: Option<Code>, now: Instant) {
        let mut state = self.lock();
        let failed = code.is_some_and(is_failure);
        match (admission, &mut state.phase) {
            (Admission::Probe, Phase::HalfOpen { probes_left, .. }) if code.is_none() => {
                // The probe told nothing: another may go.
                *probes_left += 1;
            }
            (Admission::Probe, Phase::HalfOpen { .. }) if failed => {
                let why = format!(
                    "a probe call failed with {}",
                    grpc::code_name(code.unwrap_or(Code::Unknown))
                );
                self.open(&mut state, now, why);
            }
            (Admission::Probe, Phase::HalfOpen { succeeded, .. }) => {
                *succeeded += 1;
                if *succeeded >= self.breaker.half_open_calls {
                    state.phase = Phase::Closed;
                    state.in_a_row = 0;
                    state.slices = [Slice::default(); SLICES];
                    metrics::get().circuit(&self.service, 0);
                    tracing::info!(service = %self.service, "circuit closed: probes succeeded");
                }
            }
            (Admission::Normal, Phase::Closed) if code.is_some() => {
                state.in_a_row = if failed { state.in_a_row + 1 } else { 0 };
                let slice = self.slice_of(now);
                let at = (slice % SLICES as u64) as usize;
                if state.slices[at].index != slice {
                    state.slices[at] = Slice {
                        index: slice,
                        ..Slice::default()
                    };
                }
                state.slices[at].calls += 1;
                state.slices[at].failures += u32::from(failed);
                if !failed {
                    return;
                }
                let b = &self.breaker;
                let code = grpc::code_name(code.unwrap_or(Code::Unknown));
                if b.consecutive_failures > 0 && state.in_a_row >= b.consecutive_failures {
                    let why = format!(
                        "{} calls in a row failed (the last with {code})",
                        state.in_a_row
                    );
                    self.open(&mut state, now, why);
                    return;
                }
                if b.failure_rate > 0.0 {
                    let oldest = slice.saturating_sub(SLICES as u64 - 1);
                    let (calls, failures) = state
                        .slices
                        .iter()
                        .filter(|s| s.index >= oldest && s.index <= slice)
                        .fold((0u32, 0u32), |(c, f), s| (c + s.calls, f + s.failures));
                    if calls >= b.minimum_calls
                        && f64::from(failures) >= b.failure_rate * f64::from(calls)
                    {
                        let why = format!(
                            "{failures} of the last {calls} calls within {}ms failed (the last with {code})",
                            b.window.as_millis()
                        );
                        self.open(&mut state, now, why);
                    }
                }
            }
            // A call let through before the circuit opened (or a probe
            // of an earlier half-open spell) ends late: it changes
            // nothing now.
            _ => {}
        }
    }

    fn slice_of(&self, now: Instant) -> u64 {
        let slice = (self.breaker.window / SLICES as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.epoch).as_nanos() / slice.as_nanos()) as u64
    }

    fn open(&self, state: &mut State, now: Instant, why: String) {
        tracing::warn!(service = %self.service, reason = %why, open_ms = self.breaker.open_for.as_millis() as u64, "circuit opened");
        state.phase = Phase::Open {
            until: now + self.breaker.open_for,
            why,
        };
        state.in_a_row = 0;
        metrics::get().circuit(&self.service, 1);
    }
}

/// Reports a streamed call's end to its circuit.
struct Outcome {
    circuit: Arc<Circuit>,
    admission: Admission,
}

impl CallObserver for Outcome {
    fn finished(&self, code: Code, _started: Instant) {
        // CANCELLED from a call dropped before its end is the caller
        // going away, not the service failing.
        let code = (code != Code::Cancelled).then_some(code);
        self.circuit.record(self.admission, code, Instant::now());
    }
}

/// The circuit layer.
#[derive(Debug)]
pub struct CircuitLayer<S> {
    inner: S,
    view: Arc<MeshView>,
}

impl<S> CircuitLayer<S> {
    /// Breaks circuits by the configurations in `view`.
    pub fn new(view: Arc<MeshView>, inner: S) -> Self {
        Self { inner, view }
    }
}

impl<S> Handle<Routed> for CircuitLayer<S>
where
    S: Handle<Routed, Answer = Answer>,
{
    type Answer = Answer;

    fn handle(&self, routed: Routed) -> impl Future<Output = Answer> + Send {
        let end = match routed.policy.breaker {
            None => None,
            Some(breaker) => match self.admit(&routed, breaker) {
                Ok((circuit, admission)) => Some(CallEnd::new(
                    Arc::new(Outcome { circuit, admission }),
                    routed.call.started,
                )),
                Err(refusal) => return Either::Left(ready(*refusal)),
            },
        };
        Either::Right(Ending::new(self.inner.handle(routed), end))
    }
}

impl<S> CircuitLayer<S> {
    /// Lets a call to `routed`'s upstream through its circuit, or the
    /// refusal.
    fn admit(
        &self,
        routed: &Routed,
        breaker: Breaker,
    ) -> Result<(Arc<Circuit>, Admission), Box<Answer>> {
        let service = &routed.upstream.mesh_service;
        let circuit = self
            .view
            .circuits
            .get(
                service,
                |c| *c.breaker() == breaker,
                || Circuit::new(service, breaker),
            )
            .map_err(|full| full.answer())?;
        match circuit.admit(Instant::now()) {
            Ok(admission) => Ok((circuit, admission)),
            Err(why) => {
                metrics::get().circuit_rejected(service);
                Err(Box::new(grpc::status_response(Code::Unavailable, &why)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(in_a_row: u32, rate: f64) -> Breaker {
        Breaker {
            consecutive_failures: in_a_row,
            failure_rate: rate,
            minimum_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(1),
            half_open_calls: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_it_and_probes_close_it() {
        let c = Circuit::new("echo", breaker(3, 0.0));
        let now = Instant::now();
        for _ in 0..2 {
            c.record(c.admit(now).unwrap(), Some(Code::Unavailable), now);
        }
        c.record(c.admit(now).unwrap(), Some(Code::Ok), now);
        for _ in 0..3 {
            c.record(c.admit(now).unwrap(), Some(Code::Unavailable), now);
        }
        let why = c.admit(now).unwrap_err();
        assert!(
            why.contains("echo") && why.contains("3 calls in a row"),
            "{why}"
        );
        let later = now + Duration::from_secs(1);
        let probe = c.admit(later).unwrap();
        assert_eq!(probe, Admission::Probe);
        let second = c.admit(later).unwrap();
        assert!(c.admit(later).is_err(), "only two probes at once");
        c.record(probe, Some(Code::Ok), later);
        c.record(second, None, later);
        let third = c.admit(later).unwrap();
        c.record(third, Some(Code::NotFound), later);
        assert_eq!(c.admit(later).unwrap(), Admission::Normal, "closed again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let c = Circuit::new("echo", breaker(1, 0.0));
        let now = Instant::now();
        c.record(c.admit(now).unwrap(), Some(Code::Internal), now);
        let later = now + Duration::from_secs(2);
        let probe = c.admit(later).unwrap();
        c.record(probe, Some(Code::Unavailable), later);
        let why = c.admit(later).unwrap_err();
        assert!(why.contains("probe"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_opens_it() {
        let c = Circuit::new("echo", breaker(0, 0.5));
        let now = Instant::now();
        // Old failures age out of the window.
        for _ in 0..9 {
            c.record(c.admit(now).unwrap(), Some(Code::Unavailable), now);
        }
        let later = now + Duration::from_secs(11);
        for i in 0..10 {
            let code = if i % 2 == 0 {
                Code::Ok
            } else {
                Code::Unavailable
            };
            assert!(c.admit(later).is_ok(), "call {i}");
            c.record(Admission::Normal, Some(code), later);
        }
        let why = c.admit(later).unwrap_err();
        assert!(why.contains("5 of the last 10"), "{why}");
        // Not a failure: an answer the service meant.
        assert!(!is_failure(Code::NotFound) && !is_failure(Code::ResourceExhausted));
    }
}
