//! A minimal OTLP/gRPC trace collector for benchmarks: it serves
//! `opentelemetry.proto.collector.trace.v1.TraceService` on the address
//! given, decodes every export (as any collector must), counts the spans
//! by the exporter's `service.name` and keeps nothing else, so it can take
//! spans at any rate for as long as a benchmark runs. On SIGTERM or SIGINT
//! it prints what it received and exits.
//!
//! Run by `bench/tracing.sh` as the collector of the proxies that export
//! at 100 % sampling; its CPU time per call is measured beside theirs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// Most distinct `service.name`s counted apart; the spans of any further
/// ones are counted under [`OTHER`].
const MAX_SERVICES: usize = 64;
const OTHER: &str = "(other services)";

/// Receive OTLP/gRPC traces and count them.
#[derive(Debug, Parser)]
#[command(name = "otlp-sink", about)]
struct Args {
    /// Where to listen, e.g. `127.0.0.1:4317`.
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(Debug, Default)]
struct Counts {
    exports: u64,
    spans: u64,
    by_service: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone)]
struct Sink {
    counts: Arc<Mutex<Counts>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut counts = self.counts.lock().unwrap();
        counts.exports += 1;
        for resource in &request.resource_spans {
            let spans: u64 = resource
                .scope_spans
                .iter()
                .map(|s| s.spans.len() as u64)
                .sum();
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.as_str()),
                    _ => None,
                })
                .unwrap_or("(no service.name)");
            counts.spans += spans;
            let known = counts.by_service.contains_key(service);
            let key = if known || counts.by_service.len() < MAX_SERVICES {
                service
            } else {
                OTHER
            };
            *counts.by_service.entry(key.to_owned()).or_default() += spans;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sink = Sink::default();
    let counts = sink.counts.clone();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await?;
    let counts = counts.lock().unwrap();
    println!(
        "otlp-sink: {} spans in {} exports",
        counts.spans, counts.exports
    );
    for (service, spans) in &counts.by_service {
        println!("otlp-sink:   {service}: {spans} spans");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread, as a collector given one core would have.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}
