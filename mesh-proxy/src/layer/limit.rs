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

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Code;

use super::authorize::Authorized;
use super::route::Routed;
use super::{Answer, CarriesCall, Handle};
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

/// Keeps `place` (if any) until `answer` ends.
fn hold(place: Option<OwnedSemaphorePermit>, started: Instant, answer: Answer) -> Answer {
    let Some(place) = place else {
        return answer;
    };
    if grpc::status_of(answer.headers()).is_some() {
        return answer;
    }
    answer.map(|body| {
        body.with_another_end(CallEnd::new(
            Arc::new(Release(Mutex::new(Some(place)))),
            started,
        ))
    })
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

    async fn handle(&self, routed: Routed) -> Answer {
        // One await of the inner future on every path: a second would
        // make this layer's future carry (and copy) room for it twice.
        let place = match routed.policy.caller_limit {
            None => None,
            Some(limit) => match self.place(&routed, limit).await {
                Ok(place) => Some(place),
                Err(refusal) => return *refusal,
            },
        };
        let started = routed.call.started;
        hold(place, started, self.inner.handle(routed).await)
    }
}

impl<S> CallerLimit<S> {
    /// A place for a call to `routed`'s upstream under `limit`, or the
    /// refusal.
    async fn place(
        &self,
        routed: &Routed,
        limit: Limit,
    ) -> Result<OwnedSemaphorePermit, Box<Answer>> {
        let service = &routed.upstream.mesh_service;
        let limiter = self
            .view
            .caller_limits
            .get(service, |l| l.limit() == limit, || Limiter::new(limit))
            .map_err(|full| {
                Box::new(grpc::status_response(
                    Code::ResourceExhausted,
                    &full.to_string(),
                ))
            })?;
        limiter.acquire().await.map_err(|Shed { limit }| {
            metrics::get().shed("outbound", routed.call.method.service());
            Box::new(grpc::status_response(
                Code::ResourceExhausted,
                &format!(
                    "this sidecar already has {} calls in flight to {service} and {} waiting, the most its caller_limit allows; try again later",
                    limit.max_concurrent, limit.max_queued
                ),
            ))
        })
    }
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

    async fn handle(&self, authorized: Authorized) -> Answer {
        // One await of the inner future on every path (see CallerLimit).
        let place = if authorized.policy.limited() {
            match self.place(&authorized).await {
                Ok(place) => place,
                Err(refusal) => return *refusal,
            }
        } else {
            None
        };
        let started = authorized.call().started;
        hold(place, started, self.inner.handle(authorized).await)
    }
}

impl<S> MethodLimit<S> {
    /// A place for `authorized` under its route's limit (none if the
    /// route has none), or the refusal.
    async fn place(
        &self,
        authorized: &Authorized,
    ) -> Result<Option<OwnedSemaphorePermit>, Box<Answer>> {
        let method = &authorized.call().method;
        let (service, name) = (method.service(), method.method());
        let route = authorized.policy.route(service, name);
        let Some(limit) = route.limit else {
            return Ok(None);
        };
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
        let limiter = self
            .view
            .method_limits
            .get(&key, |l| l.limit() == limit, || Limiter::new(limit))
            .map_err(|full| {
                Box::new(grpc::status_response(
                    Code::ResourceExhausted,
                    &full.to_string(),
                ))
            })?;
        match limiter.acquire().await {
            Ok(place) => Ok(Some(place)),
            Err(Shed { limit }) => {
                metrics::get().shed("inbound", if known { service } else { metrics::UNKNOWN });
                Err(Box::new(grpc::status_response(
                    Code::ResourceExhausted,
                    &format!(
                        "{} already has {} calls of {key} in flight and {} waiting, the most its route limit allows; try again later",
                        authorized.service, limit.max_concurrent, limit.max_queued
                    ),
                )))
            }
        }
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
}
