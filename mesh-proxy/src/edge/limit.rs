//! Per-key token buckets whose memory is bounded: the edge's rate limits
//! (per caller) and failed-authentication limits (per client IP).
//!
//! Each key costs one entry (the GCRA "theoretical arrival time", which is
//! all a token bucket needs). A key whose bucket has refilled completely is
//! idle: forgetting it changes nothing, since a fresh bucket is full too.
//! So when the table reaches its cap, idle keys are dropped first; only if
//! it is still full of active keys do new keys share one overflow bucket
//! (logged once). Sharing rather than refusing keeps new callers served at
//! the route's rate as a group, and a flood of new keys (spoofed IPs,
//! minted token subjects) cannot grow memory or push out known callers.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most often a full table is swept for idle keys: a sweep is O(keys),
/// so a table full of active keys must not be swept on every call.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A refusal: the bucket is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Empty {
    /// When the next call would be let through.
    pub retry_after: Duration,
    /// Whether the key was not tracked and used the shared overflow bucket.
    pub shared: bool,
}

/// Token buckets of `burst` tokens refilled at one per `interval`, one
/// per key, at most `max_keys` keys.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    /// Time to earn one token (GCRA's emission interval).
    interval: Duration,
    /// `burst * interval`: how far ahead of now a bucket may be spent.
    tolerance: Duration,
    max_keys: usize,
    /// Names the table in the one warning it logs when full.
    name: String,
    warned: AtomicBool,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K> {
    /// Each key's theoretical arrival time: the bucket is full at or after
    /// it, and empty when it is `tolerance` ahead of now.
    tats: HashMap<K, Instant>,
    overflow: Option<Instant>,
    last_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// Buckets of `burst` (at least 1) refilled at `rate_per_second`
    /// (at least one a day; slower is taken as one a day), for at most
    /// `max_keys` (at least 1) keys; `name` says what they limit, for
    /// the log.
    pub fn new(rate_per_second: f64, burst: u32, max_keys: usize, name: String) -> Self {
        const DAY: Duration = Duration::from_secs(86_400);
        let interval = Duration::try_from_secs_f64(1.0 / rate_per_second)
            .unwrap_or(DAY)
            .min(DAY);
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.max(1)),
            max_keys: max_keys.max(1),
            name,
            warned: AtomicBool::new(false),
            state: Mutex::new(State {
                tats: HashMap::new(),
                overflow: None,
                last_sweep: None,
            }),
        }
    }

    /// Takes a token from `key`'s bucket, or says when one will be there.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Empty> {
        self.take(key, now, true)
    }

    /// Whether `key`'s bucket has a token, without taking it (and without
    /// tracking a new key).
    pub fn peek(&self, key: &K, now: Instant) -> Result<(), Empty> {
        self.take(key, now, false)
    }

    /// How many keys are tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().tats.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // A panic while holding the lock cannot leave a half-written
        // entry; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, key: &K, now: Instant, spend: bool) -> Result<(), Empty> {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(tat) = state.tats.get_mut(key) {
            return gcra(tat, now, self.interval, self.tolerance, spend, false);
        }
        if state.tats.len() >= self.max_keys
            && state
                .last_sweep
                .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            state.last_sweep = Some(now);
            state.tats.retain(|_, tat| *tat > now);
        }
        if state.tats.len() < self.max_keys {
            if spend {
                let mut tat = now;
                let result = gcra(&mut tat, now, self.interval, self.tolerance, true, false);
                state.tats.insert(key.clone(), tat);
                return result;
            }
            // An untracked key's bucket is full.
            return Ok(());
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = %self.name,
                keys = self.max_keys,
                "rate limiter full of active callers; new callers share one bucket until some go idle (logged once)"
            );
        }
        let tat = state.overflow.get_or_insert(now);
        gcra(tat, now, self.interval, self.tolerance, spend, true)
    }
}

/// The generic cell rate algorithm: a call at `now` is let through if the
/// bucket, once this call's token is taken, is not overdrawn.
fn gcra(
    tat: &mut Instant,
    now: Instant,
    interval: Duration,
    tolerance: Duration,
    spend: bool,
    shared: bool,
) -> Result<(), Empty> {
    let next = (*tat).max(now) + interval;
    let ahead = next.saturating_duration_since(now);
    if ahead > tolerance {
        return Err(Empty {
            retry_after: ahead - tolerance,
            shared,
        });
    }
    if spend {
        *tat = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(max: usize) -> KeyedBuckets<&'static str> {
        // One token a second, bursts of two.
        KeyedBuckets::new(1.0, 2, max, "test".into())
    }

    #[test]
    fn a_bucket_holds_its_burst_and_refills_at_its_rate() {
        let b = buckets(10);
        let t0 = Instant::now();
        assert!(b.check(&"a", t0).is_ok());
        assert!(b.check(&"a", t0).is_ok());
        let e = b.check(&"a", t0).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_secs(1));
        assert!(!e.shared);
        // Peeking takes nothing.
        assert!(b.peek(&"a", t0 + Duration::from_secs(1)).is_ok());
        assert!(b.peek(&"a", t0 + Duration::from_secs(1)).is_ok());
        assert!(b.check(&"a", t0 + Duration::from_secs(1)).is_ok());
        assert!(b.check(&"a", t0 + Duration::from_secs(1)).is_err());
        // Other keys have their own buckets; peeking does not track one.
        assert!(b.peek(&"b", t0).is_ok());
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn idle_keys_make_room_first_then_new_keys_share_one_bucket() {
        let b = buckets(2);
        let t0 = Instant::now();
        assert!(b.check(&"a", t0).is_ok());
        assert!(b.check(&"b", t0).is_ok());
        // Full of active keys: "c" and "d" share the overflow bucket (2).
        assert!(b.check(&"c", t0).is_ok());
        assert!(b.check(&"d", t0).is_ok());
        let e = b.check(&"c", t0).unwrap_err();
        assert!(e.shared);
        assert_eq!(b.len(), 2);
        // Known keys keep their own buckets.
        assert!(b.check(&"a", t0).is_ok());
        // Once "b" is idle (its bucket full again), a new key takes its
        // place; "a" spent twice and is not idle yet, so it keeps its
        // bucket (one token left).
        let t1 = t0 + Duration::from_millis(1500);
        assert!(b.check(&"e", t1).is_ok());
        assert_eq!(b.len(), 2);
        assert!(b.check(&"a", t1).is_ok());
        assert!(b.check(&"a", t1).is_err(), "a kept its bucket");
        // Sweeps are rate-limited: within a second of the last one, "e"
        // going idle makes no room and "f" uses the shared bucket.
        let t2 = t1 + Duration::from_millis(900);
        assert!(b.check(&"f", t2).is_ok());
        assert!(b.check(&"f", t2).is_ok());
        assert_eq!(b.len(), 2);
        assert!(b.check(&"f", t2).unwrap_err().shared);
        // A second after the last sweep, idle "e" makes room for "g".
        let t3 = t1 + SWEEP_EVERY;
        assert!(b.check(&"g", t3).is_ok());
        assert!(b.check(&"g", t3).is_ok());
        assert!(!b.check(&"g", t3).unwrap_err().shared);
    }

    #[test]
    fn a_flood_of_new_keys_stays_within_the_cap() {
        let b: KeyedBuckets<u32> = KeyedBuckets::new(1.0, 1, 100, "flood".into());
        let t0 = Instant::now();
        for i in 0..100_000 {
            let _ = b.check(&i, t0 + Duration::from_micros(u64::from(i)));
        }
        assert!(b.len() <= 100);
    }
}
