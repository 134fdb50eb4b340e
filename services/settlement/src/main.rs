//! The settlement service: users' monthly bills, kept up to date from
//! subscription and usage events. It listens on loopback (h2c) behind its
//! sidecar; see the library crate for what it does.

use clap::Parser;
use trellis::cli::exit_with;
use trellis::metrics_http::{AdminArgs, service_scrape};
use trellis::pb::telco::settlement::v1::settlement_events_service_server::SettlementEventsServiceServer;
use trellis::pb::telco::settlement::v1::settlement_service_server::SettlementServiceServer;
use trellis::service::{Context, ServiceArgs, ServiceSpec};
use trellis_settlement::{BillingApi, EventsApi};

/// What settlement is to the mesh: it serves bills and receives events, and
/// publishes none.
static SPEC: ServiceSpec = ServiceSpec {
    name: "settlement",
    grpc_services: &[
        "telco.settlement.v1.SettlementService",
        "telco.settlement.v1.SettlementEventsService",
    ],
    migrations: trellis_settlement::migrations,
    publishes_events: false,
};

/// The Trellis reference settlement service.
#[derive(Debug, Parser)]
#[command(name = "trellis-settlement", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[tokio::main]
async fn main() {
    let _telemetry =
        trellis::telemetry::init_traced("settlement", "warn,trellis=info,trellis_settlement=info");
    let args = Args::parse();
    let ctx = Context::start(&SPEC, &args.service)
        .await
        .unwrap_or_else(|e| exit_with("trellis-settlement", &format!("{e:#}")));
    let _admin = args
        .admin
        .start(SPEC.name, service_scrape(&ctx, SPEC.publishes_events))
        .await
        .unwrap_or_else(|e| exit_with("trellis-settlement", &format!("{e:#}")));
    let router = ctx
        .router()
        .add_service(SettlementServiceServer::new(BillingApi::new(ctx.clone())))
        .add_service(SettlementEventsServiceServer::new(EventsApi::new(
            ctx.clone(),
        )));
    if let Err(e) = ctx.serve(router).await {
        exit_with("trellis-settlement", &format!("{e:#}"));
    }
}
