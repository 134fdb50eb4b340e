//! When a call may be tried again, and how long to wait first: the one
//! retry decision ([`decide`]), retry budgets, backoff and server
//! pushback. The retry layer ([`crate::layer::retry`]) applies them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

use crate::grpc;
use crate::layer::endpoint::FinalStatus;
use crate::policy::RetryPolicy;
use crate::settings::RetryLimits;

/// What went wrong with an attempt, as far as retrying it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request never left.
    NotSent,
    /// Sent, then the stream or connection failed; `refused`: the peer
    /// says it did not process it.
    Reset {
        /// HTTP/2 REFUSED_STREAM.
        refused: bool,
    },
    /// Answered with this final status (a non-gRPC HTTP answer counts as
    /// the gRPC status it stands for).
    Status(FinalStatus),
}

/// What the call knows about itself when an attempt fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Circumstances {
    /// Attempts made so far, the failed one included.
    pub made: u32,
    /// The method may be repeated without harm.
    pub safe: bool,
    /// The whole request can be sent again (recorded, or never read).
    pub replayable: bool,
}

/// Whether to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Give the caller this answer.
    Answer,
    /// Try another endpoint after `after`; `budgeted` retries must also
    /// be allowed by the retry budget.
    Retry {
        /// The wait first.
        after: Duration,
        /// Whether the retry budget must allow it.
        budgeted: bool,
    },
}

/// The retry decision. A request that never left goes elsewhere at once,
/// up to `limits.max_unsent_attempts`, whatever the method. Otherwise only within the policy's
/// attempts: a reset stream when the method is safe or the peer refused
/// it unprocessed; a status when the callee's sidecar says the service
/// never saw the call, or when the method is safe and the status is one
/// the policy retries, after the server's pushback (a negative one: never)
/// or an exponential backoff with jitter.
pub fn decide(
    failure: Failure,
    policy: &RetryPolicy,
    limits: &RetryLimits,
    now: Circumstances,
) -> Decision {
    if !now.replayable {
        return Decision::Answer;
    }
    let within_policy = now.made < policy.max_attempts;
    let backoff = || Decision::Retry {
        after: backoff(policy, now.made),
        budgeted: true,
    };
    match failure {
        Failure::NotSent if now.made < limits.max_unsent_attempts => Decision::Retry {
            after: Duration::ZERO,
            budgeted: false,
        },
        Failure::NotSent => Decision::Answer,
        Failure::Reset { refused } if (refused || now.safe) && within_policy => backoff(),
        Failure::Reset { .. } => Decision::Answer,
        Failure::Status(status) => {
            let retryable = status.code != tonic::Code::Ok
                && (status.unprocessed || (now.safe && policy.retryable.contains(&status.code)));
            if !retryable || !within_policy {
                return Decision::Answer;
            }
            match status.pushback {
                Pushback::Stop => Decision::Answer,
                Pushback::Wait(after) => Decision::Retry {
                    after,
                    budgeted: true,
                },
                Pushback::None => backoff(),
            }
        }
    }
}

/// Retry budgets, one per upstream gRPC service and ratio. Lookups are
/// lock-free; a new budget is added copy-on-write (rare).
#[derive(Debug, Default)]
pub struct Budgets {
    limits: RetryLimits,
    // Service, then ratio in thousandths: looked up by `&str`, no
    // allocation per call.
    budgets: ArcSwap<HashMap<String, HashMap<u32, Arc<TpsBudget>>>>,
}

impl Budgets {
    /// Budgets with `limits`' floor and window.
    pub fn new(limits: RetryLimits) -> Self {
        Self {
            limits,
            budgets: ArcSwap::default(),
        }
    }

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
            self.limits.budget_window,
            self.limits.min_retries_per_second,
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
    use tonic::Code;

    use super::*;

    fn status(code: Code) -> Failure {
        Failure::Status(FinalStatus {
            code,
            pushback: Pushback::None,
            unprocessed: false,
        })
    }

    fn when(made: u32, safe: bool, replayable: bool) -> Circumstances {
        Circumstances {
            made,
            safe,
            replayable,
        }
    }

    fn retries(d: Decision) -> bool {
        matches!(d, Decision::Retry { .. })
    }

    #[test]
    fn a_request_that_never_left_goes_elsewhere_at_once_whatever_the_method() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let l = RetryLimits::default();
        for made in 1..l.max_unsent_attempts {
            assert_eq!(
                decide(Failure::NotSent, &p, &l, when(made, false, true)),
                Decision::Retry {
                    after: Duration::ZERO,
                    budgeted: false
                }
            );
        }
        assert_eq!(
            decide(
                Failure::NotSent,
                &p,
                &l,
                when(l.max_unsent_attempts, false, true)
            ),
            Decision::Answer
        );
        assert_eq!(
            decide(Failure::NotSent, &p, &l, when(1, false, false)),
            Decision::Answer
        );
    }

    #[test]
    fn statuses_are_retried_only_on_safe_methods_within_the_policy() {
        let (p, l) = (RetryPolicy::default(), RetryLimits::default());
        assert!(retries(decide(
            status(Code::Unavailable),
            &p,
            &l,
            when(1, true, true)
        )));
        assert!(retries(decide(
            status(Code::Unavailable),
            &p,
            &l,
            when(2, true, true)
        )));
        assert!(
            !retries(decide(
                status(Code::Unavailable),
                &p,
                &l,
                when(3, true, true)
            )),
            "attempts spent"
        );
        assert!(
            !retries(decide(
                status(Code::Unavailable),
                &p,
                &l,
                when(1, false, true)
            )),
            "not safe"
        );
        assert!(
            !retries(decide(
                status(Code::Unavailable),
                &p,
                &l,
                when(1, true, false)
            )),
            "not replayable"
        );
        assert!(
            !retries(decide(status(Code::Internal), &p, &l, when(1, true, true))),
            "not retryable"
        );
        assert!(!retries(decide(
            status(Code::Ok),
            &p,
            &l,
            when(1, true, true)
        )));
        let Decision::Retry { after, budgeted } =
            decide(status(Code::Unavailable), &p, &l, when(1, true, true))
        else {
            unreachable!()
        };
        assert!(budgeted && after <= p.initial_backoff);
    }

    #[test]
    fn unprocessed_calls_are_retried_whatever_the_method() {
        let (p, l) = (RetryPolicy::default(), RetryLimits::default());
        let unprocessed = Failure::Status(FinalStatus {
            code: Code::Unavailable,
            pushback: Pushback::None,
            unprocessed: true,
        });
        assert!(retries(decide(unprocessed, &p, &l, when(1, false, true))));
    }

    #[test]
    fn the_server_pushback_decides_the_wait() {
        let (p, l) = (RetryPolicy::default(), RetryLimits::default());
        let pushed = |pushback| {
            Failure::Status(FinalStatus {
                code: Code::Unavailable,
                pushback,
                unprocessed: false,
            })
        };
        assert_eq!(
            decide(
                pushed(Pushback::Wait(Duration::from_secs(1))),
                &p,
                &l,
                when(1, true, true)
            ),
            Decision::Retry {
                after: Duration::from_secs(1),
                budgeted: true
            }
        );
        assert_eq!(
            decide(pushed(Pushback::Stop), &p, &l, when(1, true, true)),
            Decision::Answer
        );
    }

    #[test]
    fn a_reset_stream_is_retried_when_safe_or_refused_unprocessed() {
        let (p, l) = (RetryPolicy::default(), RetryLimits::default());
        let reset = |refused| Failure::Reset { refused };
        assert!(retries(decide(reset(false), &p, &l, when(1, true, true))));
        assert!(retries(decide(reset(true), &p, &l, when(1, false, true))));
        assert!(!retries(decide(reset(false), &p, &l, when(1, false, true))));
        assert!(!retries(decide(reset(true), &p, &l, when(3, false, true))));
    }

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
        let l = RetryLimits::default();
        let floor = (l.min_retries_per_second as u64 * l.budget_window.as_secs()) as i32;
        assert!((200..=200 + floor + 5).contains(&allowed), "{allowed}");
    }
}
