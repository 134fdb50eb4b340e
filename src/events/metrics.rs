//! A producer's outbox as Prometheus metrics, computed at scrape time:
//! pending and parked events and the age of the oldest pending event per
//! subscriber (one query, with a short timeout), and what this instance's
//! dispatcher delivered and failed to deliver since it started.
//!
//! When the database does not answer in time, the scrape still succeeds:
//! `trellis_outbox_up` is 0 and the numbers that need the database are
//! left out, while the dispatcher's counters are still shown.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::{DispatchStats, OutboxAdmin};
use crate::metrics_http::{counters, gauge, gauges};

/// How long the outbox query of one scrape may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// Most subscribers shown by name; the rest are summed under
/// [`OTHER_SUBSCRIBERS`]. Subscribers come from configuration (and rows
/// left by earlier configurations), so more than this is a mistake to
/// notice, not a reason for unbounded series.
pub const MAX_SUBSCRIBERS: usize = 64;
/// The `subscriber` label of the subscribers past [`MAX_SUBSCRIBERS`].
pub const OTHER_SUBSCRIBERS: &str = "(other)";

impl DispatchStats {
    /// Counts a failed delivery attempt to `subscriber` (one that will be
    /// retried after a backoff). At most [`MAX_SUBSCRIBERS`] names are
    /// kept; the rest count under [`OTHER_SUBSCRIBERS`].
    pub(crate) fn record_failure(&self, subscriber: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = failed.get_mut(subscriber) {
            *n += 1;
            return;
        }
        let key = if failed.len() < MAX_SUBSCRIBERS {
            subscriber
        } else {
            OTHER_SUBSCRIBERS
        };
        *failed.entry(key.to_owned()).or_default() += 1;
    }

    /// Failed delivery attempts per subscriber since the start.
    pub fn failures(&self) -> HashMap<String, u64> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One subscriber's line in the outbox, as the database says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// Events waiting for delivery.
    pub pending: i64,
    /// Events set aside (refused as invalid), waiting for an operator.
    pub parked: i64,
    /// Seconds since the oldest pending event was written; 0 with none.
    pub oldest_pending_seconds: f64,
}

/// One subscriber's numbers in a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriberMetrics {
    /// From the database; `None` when it did not answer.
    pub backlog: Option<Backlog>,
    /// Events this instance delivered since it started.
    pub delivered: u64,
    /// Failed delivery attempts of this instance since it started.
    pub failed: u64,
}

/// One scrape of a producer's outbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxSnapshot {
    /// Whether the database answered the outbox query.
    pub up: bool,
    /// Whether this instance dispatches now (holds the dispatch lock).
    pub dispatching: bool,
    /// Per subscriber, by name.
    pub subscribers: BTreeMap<String, SubscriberMetrics>,
}

/// Scrapes one producer's outbox.
#[derive(Debug, Clone)]
pub struct OutboxMetrics {
    admin: OutboxAdmin,
}

impl OutboxMetrics {
    /// The metrics of the outbox `admin` reports on.
    pub fn new(admin: OutboxAdmin) -> Self {
        Self { admin }
    }

    /// Reads the outbox (within [`QUERY_TIMEOUT`]) and the dispatcher's
    /// statistics.
    pub async fn scrape(&self) -> OutboxSnapshot {
        let backlog = match tokio::time::timeout(QUERY_TIMEOUT, self.backlog()).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "outbox metrics: the database did not answer");
                None
            }
            Err(_) => {
                tracing::debug!(
                    timeout_ms = QUERY_TIMEOUT.as_millis() as u64,
                    "outbox metrics: the database did not answer in time"
                );
                None
            }
        };
        let delivered = self
            .admin
            .stats
            .snapshot()
            .into_iter()
            .map(|(name, (delivered, _, _))| (name, delivered.max(0) as u64));
        OutboxSnapshot::assemble(
            backlog,
            self.admin.outbox.all_subscribers(),
            delivered,
            self.admin.stats.failures(),
            self.admin.stats.dispatching(),
        )
    }

    async fn backlog(&self) -> Result<Vec<(String, Backlog)>, crate::db::DbError> {
        let client = self.admin.pool.get().await?;
        let rows = client
            .query(
                "SELECT subscriber,
                        count(*) FILTER (WHERE parked_at IS NULL),
                        count(*) FILTER (WHERE parked_at IS NOT NULL),
                        EXTRACT(EPOCH FROM (now() - min(occurred_at) FILTER (WHERE parked_at IS NULL)))::float8
                 FROM trellis_outbox GROUP BY subscriber",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let age: Option<f64> = row.get(3);
                (
                    row.get(0),
                    Backlog {
                        pending: row.get(1),
                        parked: row.get(2),
                        oldest_pending_seconds: age.unwrap_or(0.0).max(0.0),
                    },
                )
            })
            .collect())
    }
}

impl OutboxSnapshot {
    /// Puts a scrape together: the database's rows (`None` when it did not
    /// answer), the configured subscribers (shown with zeros when nothing
    /// waits for them), and the dispatcher's counters. Past
    /// [`MAX_SUBSCRIBERS`] names, the rest are summed under
    /// [`OTHER_SUBSCRIBERS`] (the oldest age is the largest).
    pub fn assemble(
        backlog: Option<Vec<(String, Backlog)>>,
        configured: impl IntoIterator<Item = String>,
        delivered: impl IntoIterator<Item = (String, u64)>,
        failed: impl IntoIterator<Item = (String, u64)>,
        dispatching: bool,
    ) -> Self {
        let up = backlog.is_some();
        let mut subscribers: BTreeMap<String, SubscriberMetrics> = BTreeMap::new();
        let slot = |subscribers: &mut BTreeMap<String, SubscriberMetrics>, name: String| {
            let key = if subscribers.contains_key(&name) || subscribers.len() < MAX_SUBSCRIBERS {
                name
            } else {
                OTHER_SUBSCRIBERS.to_owned()
            };
            subscribers.entry(key).or_insert_with(|| SubscriberMetrics {
                backlog: up.then(Backlog::default),
                ..Default::default()
            });
        };
        // Configured names first, so that they keep their own series
        // whatever else the table holds.
        let mut names: Vec<String> = configured.into_iter().collect();
        names.sort();
        for name in names {
            slot(&mut subscribers, name);
        }
        let mut rows = backlog.unwrap_or_default();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut add = |name: String, f: &dyn Fn(&mut SubscriberMetrics)| {
            slot(&mut subscribers, name.clone());
            let key = if subscribers.contains_key(&name) {
                name
            } else {
                OTHER_SUBSCRIBERS.to_owned()
            };
            if let Some(s) = subscribers.get_mut(&key) {
                f(s);
            }
        };
        for (name, b) in rows {
            add(name, &|s| {
                let total = s.backlog.get_or_insert_with(Backlog::default);
                total.pending += b.pending;
                total.parked += b.parked;
                total.oldest_pending_seconds =
                    total.oldest_pending_seconds.max(b.oldest_pending_seconds);
            });
        }
        for (name, n) in delivered {
            add(name, &|s| s.delivered += n);
        }
        for (name, n) in failed {
            add(name, &|s| s.failed += n);
        }
        Self {
            up,
            dispatching,
            subscribers,
        }
    }
}

impl Collector for OutboxSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "trellis_outbox_up",
            "Whether the outbox could be read for this scrape (1) or the database did not answer in time (0).",
            i64::from(self.up),
        )?;
        gauge(
            &mut encoder,
            "trellis_outbox_dispatching",
            "Whether this instance dispatches the outbox now (holds the dispatch lock).",
            i64::from(self.dispatching),
        )?;
        let labels: Vec<[(&str, &str); 1]> = self
            .subscribers
            .keys()
            .map(|name| [("subscriber", name.as_str())])
            .collect();
        let series = || labels.iter().map(|l| &l[..]).zip(self.subscribers.values());
        if self.up {
            let backlog = |s: &SubscriberMetrics| s.backlog.clone().unwrap_or_default();
            gauges(
                &mut encoder,
                "trellis_outbox_pending",
                "Events waiting for delivery, per subscriber.",
                series().map(|(l, s)| (l, backlog(s).pending)),
            )?;
            gauges(
                &mut encoder,
                "trellis_outbox_parked",
                "Events parked (refused as invalid), waiting for an operator, per subscriber.",
                series().map(|(l, s)| (l, backlog(s).parked)),
            )?;
            gauges(
                &mut encoder,
                "trellis_outbox_delivery_lag_seconds",
                "Age of the oldest pending event per subscriber; 0 when none is pending.",
                series().map(|(l, s)| (l, backlog(s).oldest_pending_seconds)),
            )?;
        }
        counters(
            &mut encoder,
            "trellis_outbox_delivered",
            "Events this instance delivered (acknowledged) since it started, per subscriber.",
            series().map(|(l, s)| (l, s.delivered)),
        )?;
        counters(
            &mut encoder,
            "trellis_outbox_failed_attempts",
            "Delivery attempts of this instance that failed and will be retried, per subscriber.",
            series().map(|(l, s)| (l, s.failed)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics_http::encode_collector;

    fn line_of<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn renders_backlog_and_counters_per_subscriber() {
        let snapshot = OutboxSnapshot::assemble(
            Some(vec![(
                "settlement".to_owned(),
                Backlog {
                    pending: 3,
                    parked: 1,
                    oldest_pending_seconds: 2.5,
                },
            )]),
            ["settlement".to_owned(), "archive".to_owned()],
            [("settlement".to_owned(), 9)],
            [("archive".to_owned(), 4)],
            true,
        );
        let text = encode_collector(snapshot);
        for line in [
            "trellis_outbox_up 1",
            "trellis_outbox_dispatching 1",
            "trellis_outbox_pending{subscriber=\"settlement\"} 3",
            "trellis_outbox_pending{subscriber=\"archive\"} 0",
            "trellis_outbox_parked{subscriber=\"settlement\"} 1",
            "trellis_outbox_delivery_lag_seconds{subscriber=\"settlement\"} 2.5",
            "trellis_outbox_delivery_lag_seconds{subscriber=\"archive\"} 0.0",
            "trellis_outbox_delivered_total{subscriber=\"settlement\"} 9",
            "trellis_outbox_failed_attempts_total{subscriber=\"archive\"} 4",
            "# TYPE trellis_outbox_delivered counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn a_silent_database_is_said_and_the_counters_still_shown() {
        let snapshot = OutboxSnapshot::assemble(
            None,
            ["settlement".to_owned()],
            [("settlement".to_owned(), 2)],
            [],
            false,
        );
        let text = encode_collector(snapshot);
        assert_eq!(
            line_of(&text, "trellis_outbox_up "),
            Some("trellis_outbox_up 0")
        );
        assert!(!text.contains("trellis_outbox_pending"), "{text}");
        assert!(
            text.contains("trellis_outbox_delivered_total{subscriber=\"settlement\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn subscribers_past_the_cap_are_summed_under_other() {
        let rows: Vec<(String, Backlog)> = (0..MAX_SUBSCRIBERS + 5)
            .map(|i| {
                (
                    format!("s{i:03}"),
                    Backlog {
                        pending: 1,
                        parked: 0,
                        oldest_pending_seconds: i as f64,
                    },
                )
            })
            .collect();
        let snapshot = OutboxSnapshot::assemble(Some(rows), [], [], [], true);
        assert_eq!(snapshot.subscribers.len(), MAX_SUBSCRIBERS + 1);
        let other = &snapshot.subscribers[OTHER_SUBSCRIBERS];
        let backlog = other.backlog.clone().unwrap();
        assert_eq!(backlog.pending, 5);
        assert_eq!(backlog.oldest_pending_seconds, (MAX_SUBSCRIBERS + 4) as f64);
        let total: i64 = snapshot
            .subscribers
            .values()
            .map(|s| s.backlog.as_ref().unwrap().pending)
            .sum();
        assert_eq!(total, (MAX_SUBSCRIBERS + 5) as i64);
    }

    #[test]
    fn failures_are_counted_and_bounded() {
        let stats = DispatchStats::default();
        for i in 0..MAX_SUBSCRIBERS + 3 {
            stats.record_failure(&format!("s{i}"));
        }
        stats.record_failure("s0");
        let failures = stats.failures();
        assert_eq!(failures.len(), MAX_SUBSCRIBERS + 1);
        assert_eq!(failures["s0"], 2);
        assert_eq!(failures[OTHER_SUBSCRIBERS], 3);
    }
}
