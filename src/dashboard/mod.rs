//! `trellis dashboard`: the mesh in a browser. Server-rendered pages
//! (askama templates compiled into the binary) of every service and
//! instance, live golden metrics, a call map, the registry's and the
//! configuration's state and recent registrations, plus a console that
//! calls any registered method through the edge.
//!
//! What it shows comes from three sources, each followed by a task of its
//! own: the registry (one Watch of the whole mesh, see [`mesh`]), every
//! sidecar's `/metrics` (see [`traffic`]) and the registry's Config API.
//! The live part of each page is re-rendered on the server whenever one
//! of them changes and pushed to the browser as server-sent events; a
//! small script (`static/app.js`) swaps it in. A source that cannot be
//! read is shown as such, never as an empty mesh.
//!
//! Safe by default: every page is read-only. The console calls methods
//! only for an operator whose credential (API key or JWT) the edge's
//! policy accepts; the credential stays in the browser tab and is passed
//! to the edge per call, never stored, logged or rendered.

mod console;
pub mod mesh;
pub mod schema;
pub mod traffic;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use tokio::sync::watch;

use crate::mesh_status::{RegistryArgs, RegistryReader};
use mesh::Mesh;
use traffic::{ConfigState, Traffic};

const PROGRAM: &str = "trellis dashboard";

/// Flags of `trellis dashboard`.
#[derive(Clone, Debug, clap::Args)]
pub struct DashboardArgs {
    /// The registry and the identity to read it with.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Where to serve the dashboard (plain HTTP: keep it on loopback, or
    /// behind a TLS-terminating proxy).
    #[arg(
        long,
        env = "TRELLIS_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:8090",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// The edge the console sends calls to, as JSON
    /// (`https://127.0.0.1:8443`, or `http://…` for a plaintext edge).
    /// Without it the console only shows contracts.
    #[arg(long, env = "TRELLIS_DASHBOARD_EDGE", value_name = "URL")]
    pub edge: Option<String>,
    /// The CA that signed an https edge's certificate; default: `ca.pem`
    /// in `--certs`.
    #[arg(long, value_name = "FILE")]
    pub edge_ca: Option<PathBuf>,
    /// How often sidecars' metrics are read (the rates' interval).
    #[arg(long, default_value = "2s", value_parser = parse_interval, value_name = "DURATION")]
    pub interval: Duration,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = crate::cli::parse_duration(text)?;
    if !(Duration::from_millis(250)..=Duration::from_secs(60)).contains(&d) {
        return Err(format!(
            "{text:?}: the interval must be between 250ms and 60s"
        ));
    }
    Ok(d)
}

/// Runs `trellis dashboard` until Ctrl-C; returns the exit status.
pub fn main(args: DashboardArgs) -> i32 {
    crate::cli::on_runtime(PROGRAM, async move {
        crate::telemetry::init("warn,trellis::dashboard=info");
        match run(args).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{PROGRAM}: {e:#}");
                2
            }
        }
    })
}

/// What every request handler shares.
pub(crate) struct Dashboard {
    mesh: watch::Receiver<Mesh>,
    traffic: watch::Receiver<Traffic>,
    config: watch::Receiver<ConfigState>,
    /// For contracts, asked on demand.
    registry: tokio::sync::Mutex<RegistryReader>,
    /// The registry replicas given, as given.
    replicas: Vec<String>,
    /// Our identity to the registry.
    caller: String,
    /// Where the console's calls go.
    edge: Option<console::Edge>,
    /// Set when the dashboard stops: live streams end.
    stopping: watch::Sender<bool>,
    /// Contracts read from the registry.
    contracts: console::Contracts,
}

/// Serves the dashboard until Ctrl-C or SIGTERM.
pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let access = args.registry.access();
    let reader = RegistryReader::connect(&access)?;
    let edge = match &args.edge {
        Some(url) => {
            let ca = args
                .edge_ca
                .clone()
                .unwrap_or_else(|| args.registry.certs.join("ca.pem"));
            Some(console::Edge::new(url, &ca).context("--edge")?)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (mesh_tx, mesh_rx) = watch::channel(Mesh::default());
    let (traffic_tx, traffic_rx) = watch::channel(Traffic::default());
    let (config_tx, config_rx) = watch::channel(ConfigState::default());
    let tasks = [
        tokio::spawn(mesh::follow(reader.clone(), mesh_tx)),
        tokio::spawn(traffic::follow(mesh_rx.clone(), traffic_tx, args.interval)),
        tokio::spawn(traffic::follow_config(
            reader.clone(),
            config_tx,
            args.interval.max(Duration::from_secs(2)),
        )),
    ];
    let state = Arc::new(Dashboard {
        mesh: mesh_rx,
        traffic: traffic_rx,
        config: config_rx,
        caller: reader.caller().to_string(),
        registry: tokio::sync::Mutex::new(reader),
        replicas: access.registry.entries().to_vec(),
        edge,
        stopping: watch::channel(false).0,
        contracts: console::Contracts::default(),
    });
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the dashboard serves plain HTTP beyond loopback: put it behind TLS");
    }
    println!("{PROGRAM}: serving http://{addr}/");
    // Live streams never end by themselves: on a stop they are ended
    // first, so that the graceful shutdown has only short requests to
    // wait for.
    let stopping = state.stopping.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            stop_signal().await;
            let _ = stopping.send(true);
        })
        .await;
    for task in tasks {
        task.abort();
    }
    served.context("serving")
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let term = async {
        match terminate.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Every route of the dashboard.
pub(crate) fn router(state: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page_services))
        .route("/services/{name}", get(page_service))
        .route("/instances/{id}", get(page_instance))
        .route("/map", get(page_map))
        .route("/registry", get(page_registry))
        .route("/events", get(page_events))
        .route("/console", get(console::page))
        .route("/live/", get(live_services))
        .route("/live/services/{name}", get(live_service))
        .route("/live/instances/{id}", get(live_instance))
        .route("/live/map", get(live_map))
        .route("/live/registry", get(live_registry))
        .route("/live/events", get(live_events))
        .route("/live/console", get(console::live))
        .route("/api/schema", get(console::schema))
        .route("/api/sign-in", post(console::sign_in))
        .route("/api/call", post(console::call))
        .route("/static/{file}", get(asset))
        .route("/ready", get(ready))
        .fallback(not_found)
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(state)
}

/// No framing, no inline scripts, no referrer beyond the dashboard.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// 200 once the registry has been read, else 503 with why: what `trellis
/// up` waits for.
async fn ready(State(d): Shared) -> Response {
    let mesh = d.mesh.borrow();
    match &mesh.source {
        mesh::Source::Following { .. } => (StatusCode::OK, "ready\n").into_response(),
        mesh::Source::Down { reason, .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response()
        }
        mesh::Source::Connecting => {
            (StatusCode::SERVICE_UNAVAILABLE, "reading the registry\n").into_response()
        }
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(views::error_page(
            "Not found",
            "No such page in the dashboard.",
        )),
    )
        .into_response()
}

/// The script, styles and form builder, compiled in.
async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (include_str!("static/app.js"), "text/javascript"),
        "console.js" => (include_str!("static/console.js"), "text/javascript"),
        "form.js" => (include_str!("static/form.js"), "text/javascript"),
        "style.css" => (include_str!("static/style.css"), "text/css"),
        _ => return not_found().await,
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Which live part of which page.
#[derive(Debug, Clone)]
pub(crate) enum View {
    Services(views::Filters),
    Service(String),
    Instance(String),
    Map,
    Registry,
    Events(views::Filters),
    Console(Option<String>),
}

impl Dashboard {
    /// The live part of `view`, as it is now.
    async fn fragment(&self, view: &View) -> String {
        match view {
            View::Services(f) => views::services(self, f),
            View::Service(name) => views::service(self, name).await,
            View::Instance(id) => views::instance(self, id).await,
            View::Map => views::map(self),
            View::Registry => views::registry(self),
            View::Events(f) => views::events(self, f),
            View::Console(method) => console::fragment(self, method.as_deref()),
        }
    }

    /// A whole page: the layout around `head` (what does not change) and
    /// the live part of `view`.
    async fn page(&self, title: &str, nav: &str, head: String, view: View, live: &str) -> Response {
        let fragment = self.fragment(&view).await;
        Html(views::layout(title, nav, &head, &fragment, live)).into_response()
    }

    /// Server-sent events: the live part of `view` now, then again each
    /// time a source changes (at most every 250 ms).
    fn live(
        self: Arc<Self>,
        view: View,
    ) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>> {
        let mut mesh = self.mesh.clone();
        let mut traffic = self.traffic.clone();
        let mut config = self.config.clone();
        let mut stopping = self.stopping.subscribe();
        let stream = async_stream(move |tx| async move {
            let mut last = String::new();
            loop {
                let html = self.fragment(&view).await;
                if html != last {
                    if tx
                        .send(SseEvent::default().event("live").data(&html))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = html;
                }
                tokio::select! {
                    r = mesh.changed() => if r.is_err() { return },
                    r = traffic.changed() => if r.is_err() { return },
                    r = config.changed() => if r.is_err() { return },
                    _ = stopping.changed() => return,
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                mesh.mark_unchanged();
                traffic.mark_unchanged();
                config.mark_unchanged();
            }
        });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}

/// A stream fed by a task that sends into a bounded channel; the task
/// ends when the stream is dropped (the browser went away).
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    })
}

type Shared = State<Arc<Dashboard>>;

async fn page_services(State(d): Shared, Query(f): Query<views::Filters>) -> Response {
    let head = views::services_head(&d, &f);
    let live = format!("/live/{}", f.query());
    d.page("Services", "services", head, View::Services(f), &live)
        .await
}

async fn live_services(State(d): Shared, Query(f): Query<views::Filters>) -> impl IntoResponse {
    d.live(View::Services(f))
}

async fn page_service(State(d): Shared, Path(name): Path<String>) -> Response {
    let head = views::service_head(&name);
    let live = format!("/live/services/{}", views::path_segment(&name));
    d.page(&name, "services", head, View::Service(name.clone()), &live)
        .await
}

async fn live_service(State(d): Shared, Path(name): Path<String>) -> impl IntoResponse {
    d.live(View::Service(name))
}

async fn page_instance(State(d): Shared, Path(id): Path<String>) -> Response {
    let head = views::instance_head(&id);
    let live = format!("/live/instances/{}", views::path_segment(&id));
    d.page("Instance", "services", head, View::Instance(id), &live)
        .await
}

async fn live_instance(State(d): Shared, Path(id): Path<String>) -> impl IntoResponse {
    d.live(View::Instance(id))
}

async fn page_map(State(d): Shared) -> Response {
    d.page("Call map", "map", views::map_head(), View::Map, "/live/map")
        .await
}

async fn live_map(State(d): Shared) -> impl IntoResponse {
    d.live(View::Map)
}

async fn page_registry(State(d): Shared) -> Response {
    d.page(
        "Registry and config",
        "registry",
        views::registry_head(),
        View::Registry,
        "/live/registry",
    )
    .await
}

async fn live_registry(State(d): Shared) -> impl IntoResponse {
    d.live(View::Registry)
}

async fn page_events(State(d): Shared, Query(f): Query<views::Filters>) -> Response {
    let head = views::events_head(&f);
    let live = format!("/live/events{}", f.query());
    d.page("Recent changes", "events", head, View::Events(f), &live)
        .await
}

async fn live_events(State(d): Shared, Query(f): Query<views::Filters>) -> impl IntoResponse {
    d.live(View::Events(f))
}
