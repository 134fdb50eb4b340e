//! `trellis-usage`: the usage service of the reference billing application.
//! It listens on loopback (h2c) behind its sidecar and calls the user
//! service through that sidecar.

use clap::Parser;
use trellis::cli::exit_with;
use trellis::metrics_http::{AdminArgs, service_scrape};
use trellis::pb::telco::usage::v1::usage_outbox_service_server::UsageOutboxServiceServer;
use trellis::pb::telco::usage::v1::usage_service_server::UsageServiceServer;
use trellis::service::{Context, ServiceArgs, ServiceSpec};
use trellis_usage::{OutboxApi, UsageApi};

static SPEC: ServiceSpec = ServiceSpec {
    name: "usage",
    grpc_services: &[
        "telco.usage.v1.UsageService",
        "telco.usage.v1.UsageOutboxService",
    ],
    migrations: trellis_usage::migrations,
    publishes_events: true,
};

/// The Trellis reference usage service.
#[derive(Parser)]
#[command(name = "trellis-usage", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[tokio::main]
async fn main() {
    let _telemetry =
        trellis::telemetry::init_traced("usage", "warn,trellis=info,trellis_usage=info");
    let args = Args::parse();
    let ctx = Context::start(&SPEC, &args.service)
        .await
        .unwrap_or_else(|e| exit_with("trellis-usage", &format!("{e:#}")));
    let _admin = args
        .admin
        .start(SPEC.name, service_scrape(&ctx, SPEC.publishes_events))
        .await
        .unwrap_or_else(|e| exit_with("trellis-usage", &format!("{e:#}")));
    let router = ctx
        .router()
        .add_service(UsageServiceServer::new(UsageApi::new(ctx.clone())))
        .add_service(UsageOutboxServiceServer::new(OutboxApi(ctx.outbox_admin())));
    if let Err(e) = ctx.serve(router).await {
        exit_with("trellis-usage", &format!("{e:#}"));
    }
}
