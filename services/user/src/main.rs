//! `trellis-user`: the user service of the reference billing application.
//!
//! Listens on loopback (h2c) behind its sidecar; see the library crate for
//! what it serves.

use clap::Parser;
use trellis::cli::exit_with;
use trellis::metrics_http::{AdminArgs, service_scrape};
use trellis::pb::telco::user::v1::user_outbox_service_server::UserOutboxServiceServer;
use trellis::pb::telco::user::v1::user_service_server::UserServiceServer;
use trellis::service::{Context, ServiceArgs};
use trellis_user::{Api, OutboxApi, SPEC};

/// The Trellis reference user service.
#[derive(Debug, Parser)]
#[command(name = "trellis-user", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[tokio::main]
async fn main() {
    let _telemetry = trellis::telemetry::init_traced("user", "warn,trellis=info,trellis_user=info");
    let args = Args::parse();
    let ctx = Context::start(&SPEC, &args.service)
        .await
        .unwrap_or_else(|e| exit_with("trellis-user", &format!("{e:#}")));
    let _admin = args
        .admin
        .start(SPEC.name, service_scrape(&ctx, SPEC.publishes_events))
        .await
        .unwrap_or_else(|e| exit_with("trellis-user", &format!("{e:#}")));
    let router = ctx
        .router()
        .add_service(UserServiceServer::new(Api::new(ctx.clone())))
        .add_service(UserOutboxServiceServer::new(OutboxApi(ctx.outbox_admin())));
    if let Err(e) = ctx.serve(router).await {
        exit_with("trellis-user", &format!("{e:#}"));
    }
}
