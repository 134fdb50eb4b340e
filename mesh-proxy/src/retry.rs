//! When a call may be tried again, and how long to wait first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

use crate::grpc;
use crate::policy::RetryPolicy;

/// Retries allowed per second per upstream whatever the ratio, so a
/// quiet service can still retry a lone failure.
const MIN_RETRIES_PER_SECOND: u32 = 10;
/// The window the budget's ratio is measured over.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retry budgets, one per upstream gRPC service and ratio. Lookups are
/// lock-free; a new budget is added copy-on-write (rare).
#[derive(Debug, Default)]
pub struct Budgets {
    // Service, then ratio in thousandths: looked up by `&str`, no
    // allocation per call.
    budgets: ArcSwap<HashMap<String, HashMap<u32, Arc<TpsBudget>>>>,
}

impl Budgets {
    /// The budget for calls to `service` under `ratio`.
    pub fn get(&self, service: &str, ratio: f64) -> Arc<TpsBudget> {
        let key_ratio = (ratio * 1000.0).round() as u32;
        if let Some(b) = self
            .budgets
            .load()
            .get(service)
            .and_then(|by_ratio| by_ratio.get(&key_ratio))
        {
            return b.clone();
        }
        let budget = Arc::new(TpsBudget::new(
            BUDGET_WINDOW,
            MIN_RETRIES_PER_SECOND,
            ratio as f32,
        ));
        self.budgets.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(service.to_owned())
                .or_default()
                .entry(key_ratio)
                .or_insert_with(|| budget.clone());
            next
        });
        self.budgets.load()[service][&key_ratio].clone()
    }
}

/// Deposits one call into `budget`.
pub fn deposit(budget: &TpsBudget) {
    budget.deposit();
}

/// Takes one retry out of `budget`; false when the budget is spent.
pub fn withdraw(budget: &TpsBudget) -> bool {
    budget.withdraw()
}

/// What a server said about retrying, in `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing said: back off as usual.
    None,
    /// Wait exactly this long.
    Wait(Duration),
    /// Do not retry (negative or unreadable value).
    Stop,
}

/// Reads `grpc-retry-pushback-ms` from a response's headers or trailers.
pub fn pushback(headers: &HeaderMap) -> Pushback {
    match headers.get(grpc::PUSHBACK_HEADER) {
        None => Pushback::None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok()) {
            Some(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms as u64)),
            _ => Pushback::Stop,
        },
    }
}

/// The wait before retry number `retry` (1 for the first): exponential
/// from the policy's initial backoff, capped, with full jitter.
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let exp = policy
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
    let cap = exp.min(policy.max_backoff);
    if cap.is_zero() {
        return cap;
    }
    rand::rng().random_range(Duration::ZERO..=cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_values() {
        let mut h = HeaderMap::new();
        assert_eq!(pushback(&h), Pushback::None);
        h.insert(grpc::PUSHBACK_HEADER, "120".parse().unwrap());
        assert_eq!(pushback(&h), Pushback::Wait(Duration::from_millis(120)));
        h.insert(grpc::PUSHBACK_HEADER, "-1".parse().unwrap());
        assert_eq!(pushback(&h), Pushback::Stop);
        h.insert(grpc::PUSHBACK_HEADER, "soon".parse().unwrap());
        assert_eq!(pushback(&h), Pushback::Stop);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        for retry in 1..10 {
            let cap = (policy.initial_backoff * 2u32.pow(retry - 1)).min(policy.max_backoff);
            for _ in 0..50 {
                assert!(backoff(&policy, retry) <= cap);
            }
        }
    }

    #[test]
    fn the_budget_limits_retries_to_a_fraction_of_calls() {
        let budgets = Budgets::default();
        let budget = budgets.get("a.S", 0.2);
        assert!(Arc::ptr_eq(&budget, &budgets.get("a.S", 0.2)));
        for _ in 0..1000 {
            deposit(&budget);
        }
        let mut allowed = 0;
        while withdraw(&budget) {
            allowed += 1;
            assert!(allowed < 10_000, "budget never runs out");
        }
        // 20 % of 1000 calls, plus the per-second floor over the window.
        let floor = (MIN_RETRIES_PER_SECOND as u64 * BUDGET_WINDOW.as_secs()) as i32;
        assert!((200..=200 + floor + 5).contains(&allowed), "{allowed}");
    }
}
