//! The routing table: which endpoints serve each gRPC service, replaced
//! whole on every change so the request path reads it without locks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::time::Instant;

use crate::endpoint::Endpoint;
use crate::policy::Balancing;

/// What an instance registered about itself that routing uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// Its version (empty if it gave none).
    pub version: Arc<str>,
    /// Its zone (empty if it gave none).
    pub zone: Arc<str>,
}

/// The endpoints of one mesh service, as seen for one gRPC service.
#[derive(Debug)]
pub struct Upstream {
    /// The mesh service that serves it (its config applies), or the
    /// static route's name.
    pub mesh_service: String,
    /// Healthy endpoints, in a stable order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Each endpoint's labels, in the same order.
    pub labels: Vec<Labels>,
    next: AtomicUsize,
}

impl Upstream {
    /// An upstream over `endpoints`, none of them labelled.
    pub fn new(mesh_service: String, endpoints: Vec<Arc<Endpoint>>) -> Arc<Self> {
        let labels = vec![Labels::default(); endpoints.len()];
        Self::labelled(mesh_service, endpoints, labels)
    }

    /// An upstream over `endpoints`, labelled by `labels` (same order).
    pub fn labelled(
        mesh_service: String,
        endpoints: Vec<Arc<Endpoint>>,
        labels: Vec<Labels>,
    ) -> Arc<Self> {
        debug_assert_eq!(endpoints.len(), labels.len());
        Arc::new(Self {
            mesh_service,
            endpoints,
            labels,
            next: AtomicUsize::new(0),
        })
    }

    /// The next endpoint round robin, skipping ejected ones and `avoid`
    /// (the one that just failed). When every endpoint is ejected, one is
    /// used anyway: a probe beats failing the call outright.
    #[cfg(test)]
    pub fn pick(&self, avoid: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let is_avoided = |e: &Arc<Endpoint>| avoid.is_some_and(|a| Arc::ptr_eq(a, e));
        self.choose(Balancing::RoundRobin, is_avoided, |_| true)
            .map(|i| self.endpoints[i].clone())
    }

    /// The index of an endpoint among those `eligible` (by index) admits, by
    /// `balancing`, skipping ejected ones and those `is_avoided` says
    /// while others remain; when every eligible endpoint is ejected, one
    /// is used anyway: a probe beats failing the call outright.
    pub fn choose(
        &self,
        balancing: Balancing,
        is_avoided: impl Fn(&Arc<Endpoint>) -> bool,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let usable = |i: usize| {
            let e = &self.endpoints[i];
            eligible(i) && !is_avoided(e) && e.available()
        };
        let picked = match balancing {
            Balancing::RoundRobin => self.round_robin(&usable),
            Balancing::LeastRequest => self.two_choices(&usable, |e| e.in_flight() as f64),
            Balancing::PeakEwma => {
                let now = Instant::now();
                self.two_choices(&usable, |e| e.cost(now))
            }
        };
        picked
            .or_else(|| {
                // Every eligible endpoint is ejected (or the one to
                // avoid): one of them, in turn.
                self.round_robin(&|i| eligible(i) && !is_avoided(&self.endpoints[i]))
            })
            .or_else(|| self.round_robin(&eligible))
    }

    /// The next index `usable` admits, in turn. A skipped endpoint uses
    /// up its turn, so its share goes round the others evenly rather
    /// than all to its successor.
    fn round_robin(&self, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        (0..n)
            .map(|_| self.next.fetch_add(1, Ordering::Relaxed) % n)
            .find(|i| usable(*i))
    }

    /// Power of two choices: of two distinct indices `usable` admits,
    /// picked at random, the one of lower `cost` (the only one, if there
    /// is one).
    fn two_choices(
        &self,
        usable: &dyn Fn(usize) -> bool,
        cost: impl Fn(&Endpoint) -> f64,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        let count = (0..n).filter(|i| usable(*i)).count();
        let nth = |k: usize| (0..n).filter(|i| usable(*i)).nth(k);
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..count);
                let mut b = rng.random_range(0..count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                if cost(&self.endpoints[b]) < cost(&self.endpoints[a]) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }
}

/// gRPC service name to upstream.
#[derive(Debug, Default)]
pub struct Table {
    routes: HashMap<String, Arc<Upstream>>,
    /// Services seen at some point that have no endpoint now.
    known: HashSet<String>,
    fallback: Option<Arc<Upstream>>,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Endpoints to choose from (possibly none healthy).
    Found(Arc<Upstream>),
    /// Known to the mesh, but no endpoint serves it now.
    NoEndpoints,
    /// No mesh service has ever served it.
    Unknown,
}

impl Table {
    /// A table of `routes`; `known` are services with no endpoints left;
    /// `fallback` serves every other service (a plain hop).
    pub fn new(
        routes: HashMap<String, Arc<Upstream>>,
        known: HashSet<String>,
        fallback: Option<Arc<Upstream>>,
    ) -> Self {
        Self {
            routes,
            known,
            fallback,
        }
    }

    /// Every gRPC service the mesh has named (static catch-all aside),
    /// and whether at least one healthy endpoint serves it now.
    pub fn services(&self) -> impl Iterator<Item = (&str, bool)> {
        self.routes
            .iter()
            .map(|(name, u)| (name.as_str(), !u.endpoints.is_empty()))
            .chain(
                self.known
                    .iter()
                    .filter(|k| !self.routes.contains_key(*k))
                    .map(|k| (k.as_str(), false)),
            )
    }

    /// Whether `grpc_service` has a route of its own (the catch-all
    /// aside).
    pub fn has_route(&self, grpc_service: &str) -> bool {
        self.routes.contains_key(grpc_service)
    }

    /// Finds the upstream for `grpc_service`.
    pub fn lookup(&self, grpc_service: &str) -> Lookup {
        match self.routes.get(grpc_service) {
            Some(u) if u.endpoints.is_empty() => Lookup::NoEndpoints,
            Some(u) => Lookup::Found(u.clone()),
            None if self.known.contains(grpc_service) => Lookup::NoEndpoints,
            None => match &self.fallback {
                Some(u) => Lookup::Found(u.clone()),
                None => Lookup::Unknown,
            },
        }
    }
}

/// The shared, swappable routing table.
pub type Directory = Arc<ArcSwap<Table>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Outcome, Transport};

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Endpoint::new(
                    format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    Transport::H2c,
                )
            })
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let u = Upstream::new("s".into(), endpoints(3));
        let mut counts = HashMap::new();
        for _ in 0..300 {
            *counts.entry(u.pick(None).unwrap().addr).or_insert(0) += 1;
        }
        assert!(counts.values().all(|c| *c == 100), "{counts:?}");
    }

    #[tokio::test]
    async fn an_ejected_endpoints_share_is_spread_evenly() {
        let u = Upstream::new("s".into(), endpoints(3));
        u.endpoints[1].record(Outcome::Unreachable);
        let mut counts = HashMap::new();
        for _ in 0..200 {
            *counts.entry(u.pick(None).unwrap().addr).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(
            counts.values().all(|c| (99..=101).contains(c)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn ejected_and_avoided_endpoints_are_skipped_while_others_remain() {
        let u = Upstream::new("s".into(), endpoints(3));
        let bad = u.endpoints[1].clone();
        bad.record(Outcome::Unreachable);
        for _ in 0..10 {
            assert_ne!(u.pick(None).unwrap().addr, bad.addr);
        }
        let first = u.endpoints[0].clone();
        for _ in 0..10 {
            assert_eq!(u.pick(Some(&first)).unwrap().addr, u.endpoints[2].addr);
        }
        for e in &u.endpoints {
            e.record(Outcome::Unreachable);
        }
        assert!(u.pick(None).is_some(), "all ejected: probe one anyway");
    }

    #[test]
    fn lookups_tell_unknown_from_unserved() {
        let mut routes = HashMap::new();
        routes.insert("a.S".to_owned(), Upstream::new("a".into(), endpoints(1)));
        routes.insert("b.S".to_owned(), Upstream::new("b".into(), vec![]));
        let known = HashSet::from(["c.S".to_owned()]);
        let table = Table::new(routes, known, None);
        assert!(matches!(table.lookup("a.S"), Lookup::Found(_)));
        assert!(matches!(table.lookup("b.S"), Lookup::NoEndpoints));
        assert!(matches!(table.lookup("c.S"), Lookup::NoEndpoints));
        assert!(matches!(table.lookup("d.S"), Lookup::Unknown));
    }
}
