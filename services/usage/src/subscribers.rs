//! Whether a user may record usage: they exist and a plan is in force. The
//! user service owns that; we ask it through our sidecar, and remember the
//! users it confirmed for a short while.
//!
//! ## The cache of subscribed users
//!
//! A busy feed records many usage events per user; asking the user service
//! every time would double the mesh traffic of RecordUsage. UserService
//! has no way to end a subscription (Subscribe only replaces the plan in
//! force), so once a user has a plan in force they keep one, and a cached
//! "yes" cannot go stale in a way that matters. The cache is still bounded
//! in time ([`CACHE_TTL`], in case the contract gains cancellation) and in
//! size ([`CACHE_CAPACITY`] users; when full, expired entries go first, then
//! the oldest). Only "yes" is cached: a user created or subscribed a moment
//! ago must be able to record at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Status};
use trellis::pb::telco::user::v1::user_service_client::UserServiceClient;
use trellis::pb::telco::user::v1::{GetSubscriptionRequest, GetUserRequest};
use trellis::rpc_trace::MeshChannel as Channel;

/// How long a confirmed subscription is trusted without asking again.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// How many users the cache remembers at most.
pub const CACHE_CAPACITY: usize = 10_000;
/// How long one call to the user service may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Users recently confirmed to have a plan in force.
#[derive(Debug)]
pub struct SubscribedCache {
    ttl: Duration,
    capacity: usize,
    confirmed: Mutex<HashMap<String, Instant>>,
}

impl SubscribedCache {
    /// An empty cache remembering at most `capacity` users for `ttl` each.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            confirmed: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `user_id` was confirmed less than the TTL before `now`.
    pub fn contains(&self, user_id: &str, now: Instant) -> bool {
        let confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        confirmed
            .get(user_id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Remembers that `user_id` had a plan in force at `now`.
    pub fn insert(&self, user_id: &str, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        if confirmed.len() >= self.capacity && !confirmed.contains_key(user_id) {
            let ttl = self.ttl;
            confirmed.retain(|_, at| now.saturating_duration_since(*at) < ttl);
            if confirmed.len() >= self.capacity {
                // Still full of live entries: drop the oldest. A linear scan,
                // but only on inserts into a full cache of live users.
                if let Some(oldest) = confirmed
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(id, _)| id.clone())
                {
                    confirmed.remove(&oldest);
                }
            }
        }
        confirmed.insert(user_id.to_owned(), now);
    }

    /// How many users are remembered (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether nobody is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for SubscribedCache {
    fn default() -> Self {
        Self::new(CACHE_TTL, CACHE_CAPACITY)
    }
}

/// Checks with the user service (through the sidecar on `channel`) that
/// `user_id` exists and has a plan in force now, consulting and filling
/// `cache`.
///
/// Errors: NOT_FOUND if the user does not exist; FAILED_PRECONDITION if
/// they have no plan in force; UNAVAILABLE if the user service cannot
/// answer (its own message is logged, not passed on).
pub async fn ensure_subscribed(
    channel: &Channel,
    cache: &SubscribedCache,
    user_id: &str,
) -> Result<(), Status> {
    if cache.contains(user_id, Instant::now()) {
        return Ok(());
    }
    let mut users = UserServiceClient::new(channel.clone());
    let asked = call(users.get_subscription(request(GetSubscriptionRequest {
        user_id: user_id.to_owned(),
    })))
    .await;
    match asked {
        Ok(()) => {
            cache.insert(user_id, Instant::now());
            return Ok(());
        }
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(user_service_failed("GetSubscription", user_id, &s)),
    }
    // NOT_FOUND means "no such user" or "no plan in force": tell them apart,
    // the client's remedy differs.
    let asked = call(users.get_user(request(GetUserRequest {
        user_id: user_id.to_owned(),
    })))
    .await;
    match asked {
        Ok(()) => Err(Status::failed_precondition(format!(
            "user {user_id} has no subscription in force"
        ))),
        Err(s) if s.code() == Code::NotFound => {
            Err(Status::not_found(format!("user {user_id} does not exist")))
        }
        Err(s) => Err(user_service_failed("GetUser", user_id, &s)),
    }
}

fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    // Sent as grpc-timeout, so the sidecar and the user service give up too.
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Awaits a unary call, bounded by [`CALL_TIMEOUT`] even if the channel
/// does not enforce the deadline itself.
async fn call<T>(
    future: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<(), Status> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("no answer in time")),
    }
}

fn user_service_failed(method: &str, user_id: &str, status: &Status) -> Status {
    tracing::warn!(
        method,
        user.id = user_id,
        code = ?status.code(),
        message = status.message(),
        "user service call failed"
    );
    Status::unavailable(
        "cannot check the user's subscription now (user service unavailable); try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_the_ttl_only() {
        let cache = SubscribedCache::new(Duration::from_secs(30), 10);
        let t0 = Instant::now();
        assert!(!cache.contains("a", t0));
        cache.insert("a", t0);
        assert!(cache.contains("a", t0 + Duration::from_secs(29)));
        assert!(!cache.contains("a", t0 + Duration::from_secs(30)));
        assert!(!cache.contains("b", t0));
    }

    #[test]
    fn stays_bounded_evicting_expired_then_oldest() {
        let cache = SubscribedCache::new(Duration::from_secs(30), 3);
        let t0 = Instant::now();
        cache.insert("old", t0);
        cache.insert("b", t0 + Duration::from_secs(20));
        cache.insert("c", t0 + Duration::from_secs(21));
        // "old" has expired by now: it makes room.
        let t1 = t0 + Duration::from_secs(31);
        cache.insert("d", t1);
        assert_eq!(cache.len(), 3);
        assert!(!cache.contains("old", t1));
        assert!(cache.contains("b", t1) && cache.contains("c", t1) && cache.contains("d", t1));
        // All live: the oldest ("b") goes.
        cache.insert("e", t1);
        assert_eq!(cache.len(), 3);
        assert!(!cache.contains("b", t1));
        assert!(cache.contains("c", t1) && cache.contains("d", t1) && cache.contains("e", t1));
        // Refreshing a known user does not evict anyone.
        cache.insert("c", t1);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn a_zero_ttl_or_capacity_disables_it() {
        let t0 = Instant::now();
        for cache in [
            SubscribedCache::new(Duration::ZERO, 10),
            SubscribedCache::new(Duration::from_secs(30), 0),
        ] {
            cache.insert("a", t0);
            assert!(!cache.contains("a", t0));
            assert!(cache.is_empty());
        }
    }
}
