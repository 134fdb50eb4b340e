//! The registry's metrics, served on its admin port (`--admin`): computed
//! at scrape time from the registry's and the config store's own state,
//! so there is nothing kept twice to drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use trellis::metrics_http::{Scrape, collector_scrape, counter, gauge, gauges};

use crate::config::ConfigStore;
use crate::registry::{Registry, RegistryStats};
use crate::xds::{XdsNumbers, XdsStats};

/// Most mesh services shown by name in `trellis_registry_instances`; the
/// rest are summed under [`OTHER_SERVICES`]. Services are bounded by the
/// identities the CA signs, not by the registry, so the series are bounded
/// here.
pub const MAX_SERVICES: usize = 256;
/// The `service` label of the services past [`MAX_SERVICES`].
pub const OTHER_SERVICES: &str = "(other)";

/// Everything the registry's `/metrics` shows, read at one scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryMetrics {
    /// The registry's numbers.
    pub registry: RegistryStats,
    /// Open `WatchConfig` streams.
    pub config_watchers: usize,
    /// The configuration revision in force.
    pub config_revision: u64,
    /// Problems `GetConfigStatus` reports now (files refused, methods no
    /// contract defines, split versions without a serving instance).
    pub config_problems: usize,
    /// The xDS control plane's numbers.
    pub xds: XdsNumbers,
}

impl RegistryMetrics {
    /// Reads `registry` and `config` now.
    pub fn read(registry: &Registry, config: &ConfigStore, xds: &XdsStats) -> Self {
        let status = config.status();
        Self {
            registry: registry.stats(),
            config_watchers: config.watchers(),
            config_revision: status.revision,
            config_problems: status.problems.len(),
            xds: xds.read(),
        }
    }

    /// The admin port's scrape: [`RegistryMetrics::read`] each time.
    pub fn scrape(registry: Arc<Registry>, config: Arc<ConfigStore>, xds: Arc<XdsStats>) -> Scrape {
        collector_scrape(move || Self::read(&registry, &config, &xds))
    }

    /// Instances per service, at most [`MAX_SERVICES`] by name (the ones
    /// with the most instances, then by name) and the rest summed.
    fn instances(&self) -> BTreeMap<&str, usize> {
        let mut by_count: Vec<(&str, usize)> = self
            .registry
            .instances
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, (service, n)) in by_count.into_iter().enumerate() {
            let key = if i < MAX_SERVICES {
                service
            } else {
                OTHER_SERVICES
            };
            *shown.entry(key).or_default() += n;
        }
        shown
    }
}

impl Collector for RegistryMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let instances = self.instances();
        let labels: Vec<[(&str, &str); 1]> = instances.keys().map(|s| [("service", *s)]).collect();
        gauges(
            &mut encoder,
            "trellis_registry_instances",
            "Registered instances per mesh service.",
            labels
                .iter()
                .zip(instances.values())
                .map(|(l, n)| (&l[..], *n as i64)),
        )?;
        gauges(
            &mut encoder,
            "trellis_registry_watchers",
            "Open watch streams, by API: Registry Watch (kind=\"registry\") and Config WatchConfig (kind=\"config\").",
            [
                (&[("kind", "registry")][..], self.registry.watchers as i64),
                (&[("kind", "config")][..], self.config_watchers as i64),
            ],
        )?;
        gauge(
            &mut encoder,
            "trellis_registry_serving",
            "1 while the registry may serve its view: always with its own store; with etcd (--store), while it is in step with etcd.",
            i64::from(self.registry.serving),
        )?;
        gauge(
            &mut encoder,
            "trellis_registry_revision",
            "The registry's revision: bumped by every change watchers see.",
            self.registry.revision,
        )?;
        gauge(
            &mut encoder,
            "trellis_registry_config_revision",
            "The configuration revision in force.",
            self.config_revision,
        )?;
        gauge(
            &mut encoder,
            "trellis_registry_config_problems",
            "Configuration problems GetConfigStatus reports now.",
            self.config_problems as i64,
        )?;
        gauge(
            &mut encoder,
            "trellis_registry_xds_streams",
            "Open xDS (ADS) streams of proxyless gRPC clients.",
            self.xds.streams,
        )?;
        counter(
            &mut encoder,
            "trellis_registry_xds_responses",
            "xDS responses sent to proxyless clients since the registry started.",
            self.xds.responses,
        )?;
        counter(
            &mut encoder,
            "trellis_registry_xds_nacks",
            "xDS responses a client rejected (NACKed) since the registry started; the registry logs each with its reason at WARN.",
            self.xds.nacks,
        )?;
        counter(
            &mut encoder,
            "trellis_registry_registrations",
            "Registrations accepted since the registry started.",
            self.registry.registrations,
        )?;
        counter(
            &mut encoder,
            "trellis_registry_deregistrations",
            "Instances deregistered by their sidecars since the registry started.",
            self.registry.deregistrations,
        )?;
        counter(
            &mut encoder,
            "trellis_registry_lease_expiries",
            "Instances removed because their lease ran out, since the registry started.",
            self.registry.lease_expiries,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis::metrics_http::encode_collector;

    #[test]
    fn renders_every_metric() {
        let metrics = RegistryMetrics {
            registry: RegistryStats {
                revision: 12,
                instances: BTreeMap::from([("usage".to_owned(), 2), ("user".to_owned(), 1)]),
                watchers: 3,
                registrations: 5,
                deregistrations: 1,
                lease_expiries: 2,
                serving: true,
            },
            config_watchers: 4,
            config_revision: 7,
            config_problems: 1,
            xds: XdsNumbers {
                streams: 2,
                responses: 9,
                nacks: 1,
            },
        };
        let text = encode_collector(metrics);
        for line in [
            "trellis_registry_instances{service=\"usage\"} 2",
            "trellis_registry_instances{service=\"user\"} 1",
            "trellis_registry_watchers{kind=\"registry\"} 3",
            "trellis_registry_watchers{kind=\"config\"} 4",
            "trellis_registry_revision 12",
            "trellis_registry_serving 1",
            "trellis_registry_config_revision 7",
            "trellis_registry_config_problems 1",
            "trellis_registry_registrations_total 5",
            "trellis_registry_deregistrations_total 1",
            "trellis_registry_lease_expiries_total 2",
            "# TYPE trellis_registry_lease_expiries counter",
            "trellis_registry_xds_streams 2",
            "trellis_registry_xds_responses_total 9",
            "trellis_registry_xds_nacks_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn services_past_the_cap_are_summed() {
        let instances: BTreeMap<String, usize> = (0..MAX_SERVICES + 3)
            .map(|i| (format!("s{i:04}"), 1))
            .chain([("big".to_owned(), 5)])
            .collect();
        let metrics = RegistryMetrics {
            registry: RegistryStats {
                instances,
                ..Default::default()
            },
            ..Default::default()
        };
        let shown = metrics.instances();
        assert_eq!(shown.len(), MAX_SERVICES + 1);
        // The largest keeps its name; four of the ones are folded.
        assert_eq!(shown["big"], 5);
        assert_eq!(shown[OTHER_SERVICES], 4);
        assert_eq!(shown.values().sum::<usize>(), MAX_SERVICES + 3 + 5);
    }
}
