//! `trellis-archive serve`: recover the directory, then serve delivery and
//! status over h2c until SIGTERM, and roll the journal on the way out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::{
    ARCHIVE_SERVICE, ArchiveEventsServiceServer, ArchiveServiceServer, EVENTS_SERVICE, EventsApi,
    StatusApi,
};
use crate::store::StoreOptions;
use crate::writer::{Archive, RollPolicy};

/// Everything `serve` needs, checked by the command line.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The archive directory.
    pub dir: PathBuf,
    /// Loopback address to serve h2c on.
    pub listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub grace: Duration,
    /// When to roll the journal.
    pub roll: RollPolicy,
    /// Limits of the store.
    pub store: StoreOptions,
}

/// Runs the archive server until SIGTERM or Ctrl-C.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let ServeConfig {
        dir,
        listen,
        grace,
        roll,
        store,
    } = config;
    let archive = tokio::task::spawn_blocking(move || Archive::open(&dir, store, roll))
        .await
        .context("recovering the archive")??;

    let (router, reporter) = trellis::server::router_serving(&[EVENTS_SERVICE, ARCHIVE_SERVICE]);
    // SERVING only now that the directory is recovered and open, and only
    // while it stays writable.
    let mut healthy = archive.healthy();
    set_health(&reporter, *healthy.borrow_and_update()).await;
    let follower = tokio::spawn(async move {
        while healthy.changed().await.is_ok() {
            let now = *healthy.borrow_and_update();
            tracing::warn!(serving = now, "archive health changed");
            set_health(&reporter, now).await;
        }
    });

    let router = router
        .add_service(ArchiveEventsServiceServer::new(EventsApi::new(
            archive.handle(),
        )))
        .add_service(ArchiveServiceServer::new(StatusApi::new(archive.handle())));
    let served = trellis::server::run_plaintext("archive", listen, grace, router).await;
    // Roll what the journal holds, so a clean stop leaves only day files.
    archive.shutdown().await;
    follower.abort();
    served
}

async fn set_health(reporter: &HealthReporter, healthy: bool) {
    let status = if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", EVENTS_SERVICE, ARCHIVE_SERVICE] {
        reporter.set_service_status(service, status).await;
    }
}
