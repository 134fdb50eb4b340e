//! Both sides: bulkheads. A limit on the calls in flight at one point,
//! with a bounded queue: a call over the limit waits for a place (within
//! its deadline, which the deadline layer outside enforces) if the queue
//! has room, and fails at once with RESOURCE_EXHAUSTED if not, without
//! reaching the service. A place is held until the call's response ends.
//!
//! Outbound, the limit is per upstream mesh service (`caller_limit` in its
//! configuration: one slow dependency cannot take every call this service
//! makes); inbound, per method of the local service (a route's `limit`:
//! one flood of one method cannot take the whole service).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use std::future::Future;

use futures::future::{Either, ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Code;

use super::authorize::Authorized;
use super::route::Routed;
use super::{Answer, CarriesCall, Ending, Handle};
use crate::body::{CallEnd, CallObserver};
use crate::discovery::MeshView;
use crate::grpc;
use crate::metrics;
use crate::policy::Limit;

/// Places for calls, and a bounded queue for them.
#[derive(Debug)]
pub struct Limiter {
    limit: Limit,
    places: Arc<Semaphore>,
    waiting: AtomicU32,
}

/// Why a call got no place.
#[derive(Debug, PartialEq, Eq)]
pub struct Shed {
    /// The limit that refused it.
    pub limit: Limit,
}

impl Limiter {
    /// A limiter enforcing `limit`.
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            places: Arc::new(Semaphore::new(limit.max_concurrent as usize)),
            waiting: AtomicU32::new(0),
        }
    }

    /// The limit it enforces.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// A place now, if one is free.
    pub fn try_now(&self) -> Option<OwnedSemaphorePermit> {
        self.places.clone().try_acquire_owned().ok()
    }

    /// A place: at once, after waiting in the queue, or none when the
    /// queue is full.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Shed> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(place);
        }
        let shed = Shed { limit: self.limit };
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        struct Leave<'a>(&'a AtomicU32);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _leave = Leave(&self.waiting);
        if queued >= self.limit.max_queued {
            return Err(shed);
        }
        // The semaphore is never closed.
        self.places.clone().acquire_owned().await.map_err(|_| shed)
    }
}

/// Gives a call's place back when its response ends.
struct Release(Mutex<Option<OwnedSemaphorePermit>>);

impl CallObserver for Release {
    fn finished(&self, _code: Code, _started: Instant) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// What reports a call's end by giving its place back.
fn release(place: OwnedSemaphorePermit, started: Instant) -> CallEnd {
    CallEnd::new(Arc::new(Release(Mutex::new(Some(place)))), started)
}

/// Where a call stands with a limiter.
enum Admission {
    /// In, with this place.
    In(OwnedSemaphorePermit),
    /// Refused, with this answer.
    Refused(Box<Answer>),
    /// It must wait in the queue (which has room).
    Wait(Arc<Limiter>),
}

/// A call's way through a limiter: straight in (the common case, a few
/// bytes of future), refused at once, or (rarely) waiting in the queue,
/// boxed so the other two do not carry its room.
fn through<'a, F>(
    admission: Option<Admission>,
    started: Instant,
    inner: impl FnOnce() -> F + Send + 'a,
    refuse: impl FnOnce(Shed) -> Answer + Send + 'a,
) -> impl Future<Output = Answer> + Send + 'a
where
    F: Future<Output = Answer> + Send + 'a,
{
    match admission {
        None => Either::Left(Ending::new(inner(), None)),
        Some(Admission::In(place)) => {
            Either::Left(Ending::new(inner(), Some(release(place, started))))
        }
        Some(Admission::Refused(answer)) => Either::Right(Either::Left(ready(*answer))),
        Some(Admission::Wait(limiter)) => Either::Right(Either::Right(Box::pin(async move {
            match limiter.acquire().await {
                Ok(place) => Ending::new(inner(), Some(release(place, started))).await,
                Err(shed) => refuse(shed),
            }
        })
            as std::pin::Pin<Box<dyn Future<Output = Answer> + Send + 'a>>)),
    }
}

/// Admits a call to `limiter` now if it can: in, refused (queue full), or
/// to wait.
fn admit(limiter: Arc<Limiter>, refuse: impl FnOnce(Shed) -> Answer) -> Admission {
    if let Some(place) = limiter.try_now() {
        return Admission::In(place);
    }
    let limit = limiter.limit();
    if limiter.waiting.load(Ordering::Acquire) >= limit.max_queued {
        return Admission::Refused(Box::new(refuse(Shed { limit })));
    }
    Admission::Wait(limiter)
}

/// Outbound: the caller-side limit per upstream mesh service.
#[derive(Debug)]
pub struct CallerLimit<S> {
    inner: S,
    view: Arc<MeshView>,
}

impl<S> CallerLimit<S> {
    /// Limits calls by the `caller_limit`s in `view`.
    pub fn new(view: Arc<MeshView>, inner: S) -> Self {
        Self { inner, view }
    }
}

impl<S> Handle<Routed> for CallerLimit<S>
where
    S: Handle<Routed, Answer = Answer>,
{
    type Answer = Answer;

    fn handle(&self, routed: Routed) -> impl Future<Output = Answer> + Send {
        let mut names = None;
        let admission = routed.policy.caller_limit.map(|limit| {
            let called = CallerNames {
                service: routed.upstream.mesh_service.clone(),
                grpc_service: routed.call.method.service().to_owned(),
            };
            let admission = match self.view.caller_limits.get(
                &called.service,
                |l| l.limit() == limit,
                || Limiter::new(limit),
            ) {
                Ok(limiter) => admit(limiter, |shed| caller_shed(&called, shed)),
                Err(full) => Admission::Refused(full.answer()),
            };
            names = Some(called);
            admission
        });
        let started = routed.call.started;
        through(
            admission,
            started,
            move || self.inner.handle(routed),
            move |shed| caller_shed(&names.unwrap_or_default(), shed),
        )
    }
}

/// What a caller-side refusal names.
#[derive(Default)]
struct CallerNames {
    /// The upstream mesh service.
    service: String,
    /// The gRPC service called, for metrics.
    grpc_service: String,
}

/// The answer to a call the caller limit refused.
fn caller_shed(names: &CallerNames, Shed { limit }: Shed) -> Answer {
    metrics::get().shed("outbound", &names.grpc_service);
    grpc::status_response(
        Code::ResourceExhausted,
        &format!(
            "this sidecar already has {} calls in flight to {} and {} waiting, the most its caller_limit allows; try again later",
            limit.max_concurrent, names.service, limit.max_queued
        ),
    )
}

/// Inbound: the callee-side limit per method of the local service.
#[derive(Debug)]
pub struct MethodLimit<S> {
    inner: S,
    view: Arc<MeshView>,
}

impl<S> MethodLimit<S> {
    /// Limits calls by the routes' `limit`s of the local service in `view`.
    pub fn new(view: Arc<MeshView>, inner: S) -> Self {
        Self { inner, view }
    }
}

impl<S> Handle<Authorized> for MethodLimit<S>
where
    S: Handle<Authorized, Answer = Answer>,
{
    type Answer = Answer;

    fn handle(&self, authorized: Authorized) -> impl Future<Output = Answer> + Send {
        let found = if authorized.policy.limited() {
            self.limiter(&authorized)
        } else {
            None
        };
        let mut refuse_with = None;
        let admission = found.map(|found| match found {
            Ok((limiter, names)) => {
                let admission = admit(limiter, |shed| method_shed(&names, shed));
                if matches!(admission, Admission::Wait(_)) {
                    refuse_with = Some(names);
                }
                admission
            }
            Err(refusal) => Admission::Refused(refusal),
        });
        let started = authorized.call().started;
        through(
            admission,
            started,
            move || self.inner.handle(authorized),
            move |shed| method_shed(&refuse_with.unwrap_or_default(), shed),
        )
    }
}

/// What a method's refusal names: the local service, the limiter's key,
/// and the gRPC service for metrics.
#[derive(Default)]
struct MethodNames {
    service: String,
    key: String,
    metric: String,
}

/// The answer to a call its method's limit refused.
fn method_shed(names: &MethodNames, Shed { limit }: Shed) -> Answer {
    metrics::get().shed("inbound", &names.metric);
    grpc::status_response(
        Code::ResourceExhausted,
        &format!(
            "{} already has {} calls of {} in flight and {} waiting, the most its route limit allows; try again later",
            names.service, limit.max_concurrent, names.key, limit.max_queued
        ),
    )
}

impl<S> MethodLimit<S> {
    /// The limiter of `authorized`'s method under its route's limit (none
    /// if the route has none), or the refusal.
    #[allow(clippy::type_complexity)]
    fn limiter(
        &self,
        authorized: &Authorized,
    ) -> Option<Result<(Arc<Limiter>, MethodNames), Box<Answer>>> {
        let method = &authorized.call().method;
        let (service, name) = (method.service(), method.method());
        let route = authorized.policy.route(service, name);
        let limit = route.limit?;
        // Each method of the contract has its own place count; paths the
        // contract does not name share their route's, so that made-up
        // paths cannot make this table grow.
        let known = self
            .view
            .methods
            .load()
            .get(service)
            .is_some_and(|m| m.contains(name));
        let key = if known {
            method.path().as_str().to_owned()
        } else {
            route.method_match.clone()
        };
        let names = MethodNames {
            service: authorized.service.to_string(),
            metric: if known { service } else { metrics::UNKNOWN }.to_owned(),
            key,
        };
        Some(
            self.view
                .method_limits
                .get(&names.key, |l| l.limit() == limit, || Limiter::new(limit))
                .map(|limiter| (limiter, names))
                .map_err(|full| full.answer()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn over_the_limit_calls_wait_in_a_bounded_queue() {
        let limiter = Arc::new(Limiter::new(Limit {
            max_concurrent: 2,
            max_queued: 1,
        }));
        let a = limiter.acquire().await.unwrap();
        let _b = limiter.acquire().await.unwrap();
        let waiting = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await.map(drop) }
        });
        tokio::task::yield_now().await;
        while limiter.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            limiter.acquire().await.unwrap_err(),
            Shed {
                limit: limiter.limit()
            },
            "the queue is full"
        );
        drop(a);
        waiting.await.unwrap().unwrap();
        assert_eq!(limiter.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn no_queue_sheds_at_once() {
        let limiter = Limiter::new(Limit {
            max_concurrent: 1,
            max_queued: 0,
        });
        let _a = limiter.acquire().await.unwrap();
        assert!(limiter.acquire().await.is_err());
    }

    /// Answers after a second.
    struct Slow;

    impl Handle<Routed> for Slow {
        type Answer = Answer;
        async fn handle(&self, _: Routed) -> Answer {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            grpc::status_response(Code::Ok, "")
        }
    }

    fn routed(limit: Limit) -> Routed {
        use trellis::pb::trellis::config::v1 as pb;
        let policy = crate::policy::ServicePolicy::from_proto(&pb::ServiceConfig {
            caller_limit: Some(pb::ConcurrencyLimit {
                max_concurrent: limit.max_concurrent,
                max_queued: limit.max_queued,
            }),
            ..Default::default()
        });
        Routed {
            call: crate::layer::testing::call(&[]),
            upstream: crate::directory::Upstream::new("echo".into(), vec![]),
            route: Arc::default(),
            policy: Arc::new(policy),
            pinned: None,
            safe: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_caller_limit_queues_what_fits_and_sheds_the_rest_at_once() {
        let layer = Arc::new(CallerLimit::new(Arc::new(MeshView::default()), Slow));
        let limit = Limit {
            max_concurrent: 1,
            max_queued: 1,
        };
        let started = Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let layer = layer.clone();
                tokio::spawn(async move {
                    let answer = layer.handle(routed(limit)).await;
                    (crate::layer::testing::status(&answer), started.elapsed())
                })
            })
            .collect();
        let mut ends = Vec::new();
        for call in calls {
            ends.push(call.await.unwrap());
        }
        ends.sort_by_key(|(_, took)| *took);
        let second = std::time::Duration::from_secs(1);
        assert_eq!(
            ends,
            [
                (Some(Code::ResourceExhausted), std::time::Duration::ZERO),
                (Some(Code::Ok), second),
                (Some(Code::Ok), 2 * second),
            ],
            "one in, one queued behind it, one shed at once"
        );
    }
}
