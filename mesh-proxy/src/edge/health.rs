//! grpc.health.v1 at the edge, and the task that keeps the edge's view of
//! the mesh (reflection contracts, health) in step with the registry.
//!
//! The empty service name is the edge itself: SERVING until it drains.
//! A mesh gRPC service is SERVING while at least one healthy endpoint
//! serves it, NOT_SERVING once the registry has named it and none does
//! (its last instance stopped or turned unhealthy), and unknown (Check
//! answers NOT_FOUND) if the mesh has never named it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::discovery::MeshView;
use crate::edge::reflection::Contracts;

/// Follows `view` until the process ends: rebuilds `contracts` when the
/// registered services or their contracts change, and reports every
/// service's health to `reporter`.
pub async fn follow(
    view: Arc<MeshView>,
    contracts: Arc<ArcSwap<Contracts>>,
    reporter: HealthReporter,
) {
    let mut changes = view.changes.subscribe();
    let mut reported: HashMap<String, ServingStatus> = HashMap::new();
    let mut built_from = (
        Arc::clone(&view.registered.load()),
        Arc::clone(&view.contracts.load()),
    );
    contracts.store(Arc::new(Contracts::build(&built_from.0, &built_from.1)));
    loop {
        let registered = view.registered.load_full();
        let known = view.contracts.load_full();
        if !Arc::ptr_eq(&registered, &built_from.0) || !Arc::ptr_eq(&known, &built_from.1) {
            let merged = Contracts::build(&registered, &known);
            tracing::debug!(
                services = merged.listed().len(),
                "reflection contracts rebuilt"
            );
            contracts.store(Arc::new(merged));
            built_from = (registered, known);
        }
        // An owned snapshot: the reporter's awaits below must not hold an
        // arc-swap guard.
        let table = view.directory.load_full();
        for (service, serving) in table.services() {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if reported.get(service) != Some(&status) {
                tracing::info!(service, serving, "mesh service health at the edge");
                reporter.set_service_status(service, status).await;
                reported.insert(service.to_owned(), status);
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
