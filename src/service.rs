//! The bootstrap every database-backed Trellis service shares, so that a
//! new service costs a page of code: flags, a connection pool, migrations
//! under an advisory lock, settings from the Config API (live), health that
//! follows the database, reflection listing only the service's own gRPC
//! services, the event outbox and its dispatcher, and a bounded drain.
//!
//! ```text
//! start ──▶ migrate (retrying until the database answers) ─┐
//!       ──▶ follow settings (through the sidecar) ─────────┼─▶ SERVING
//!       ──▶ probe the database every second ───────────────┘   (NOT_SERVING
//!                                                                while any fails)
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::server::Router;
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::Status;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::db::{self, Pool};
use crate::events::dispatcher::Dispatcher;
use crate::events::{DispatchStats, Outbox, OutboxAdmin};
use crate::pb::trellis::config::v1::WatchConfigRequest;
use crate::pb::trellis::config::v1::config_service_client::ConfigServiceClient;

/// How often the database is probed for health.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take before the database counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often applied event IDs past their retention are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Flags every service takes (flatten them into the binary's own).
#[derive(Clone, Debug, clap::Args)]
pub struct ServiceArgs {
    /// Loopback address to serve gRPC on (plaintext h2c; the sidecar fronts it).
    #[arg(long, env = "TRELLIS_LISTEN")]
    pub listen: SocketAddr,
    /// The service's own PostgreSQL database, e.g.
    /// `postgres://root@127.0.0.1:5432/usage`.
    #[arg(long, env = "TRELLIS_DATABASE_URL")]
    pub database_url: String,
    /// The own sidecar's outbound port: every call to another service, and
    /// the Config API, go through it.
    #[arg(long, env = "TRELLIS_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: SocketAddr,
    /// How long calls in flight may take to finish after SIGTERM (`10s`).
    #[arg(long, env = "TRELLIS_GRACE", default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub grace: Duration,
    /// Most connections to the database.
    #[arg(long, env = "TRELLIS_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// Do not follow the Config API: settings come from --setting alone
    /// (a service run on its own, or in a test).
    #[arg(long, env = "TRELLIS_NO_CONFIG")]
    pub no_config: bool,
    /// A setting that overrides the Config API's, `KEY=VALUE`; the value is
    /// JSON if it parses as JSON, else a string. Repeat for more.
    #[arg(long = "setting", env = "TRELLIS_SETTINGS", value_delimiter = ';', value_parser = parse_setting)]
    pub settings: Vec<(String, Value)>,
}

fn parse_setting(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{key:?}: a setting name is letters, digits and _"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

/// What a service is.
#[derive(Debug)]
pub struct ServiceSpec {
    /// Its mesh service name (its certificate's and config file's), e.g. `usage`.
    pub name: &'static str,
    /// The gRPC services it serves, all that reflection lists besides
    /// health and reflection.
    pub grpc_services: &'static [&'static str],
    /// Its schema migrations (`refinery::embed_migrations!`'s `runner`).
    pub migrations: fn() -> refinery::Runner,
    /// Whether it publishes events (runs the outbox dispatcher).
    pub publishes_events: bool,
}

/// The service's own settings: the Config API's `[settings]` for it
/// (followed live), overridden by `--setting`.
#[derive(Clone, Debug)]
pub struct Settings {
    config: watch::Receiver<Option<Arc<Map<String, Value>>>>,
    overrides: Arc<Map<String, Value>>,
}

impl Settings {
    /// Fixed settings (tests; a service without the Config API).
    pub fn for_test(values: Value) -> Settings {
        let map = match values {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let (_tx, rx) = watch::channel(Some(Arc::new(Map::new())));
        Settings {
            config: rx,
            overrides: Arc::new(map),
        }
    }

    /// A top-level setting.
    pub fn get(&self, key: &str) -> Option<Value> {
        if let Some(v) = self.overrides.get(key) {
            return Some(v.clone());
        }
        self.config.borrow().as_ref()?.get(key).cloned()
    }

    /// A whole-number setting, or `default` when unset or not a whole
    /// number (logged).
    pub fn u64_or(&self, key: &str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(v) => v.as_u64().unwrap_or_else(|| {
                tracing::warn!(setting = key, value = %v, default, "setting is not a whole number; using the default");
                default
            }),
        }
    }

    /// Whether the settings are known (the Config API answered, or it is
    /// not followed).
    pub fn loaded(&self) -> bool {
        self.config.borrow().is_some()
    }
}

/// Everything a running service shares; cheap to clone.
#[derive(Clone, Debug)]
pub struct Context {
    /// The service's database.
    pub pool: Pool,
    /// Its settings, live.
    pub settings: Settings,
    /// A lazily connecting h2c channel to the own sidecar's outbound port;
    /// build generated clients on it.
    /// Calls on it carry the current span's trace context.
    pub channel: crate::rpc_trace::MeshChannel,
    /// Writes events in a transaction.
    pub outbox: Outbox,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: &'static ServiceSpec,
    args: ServiceArgs,
    migrated: AtomicBool,
    database_up: AtomicBool,
    router: Mutex<Option<Router>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<DispatchStats>,
    wake: Arc<Notify>,
}

impl Context {
    /// Builds the pool and starts, in the background, migrating, following
    /// settings, probing the database and (for a producer) dispatching
    /// events. Fails only on bad flags.
    pub async fn start(spec: &'static ServiceSpec, args: &ServiceArgs) -> anyhow::Result<Context> {
        let pg = db::parse_url(&args.database_url)?;
        let pool = db::pool(pg.clone(), args.db_pool_size as usize)?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.outbound))
            .map_err(|e| anyhow::anyhow!("--outbound {}: {e}", args.outbound))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let channel = crate::rpc_trace::mesh_channel(channel);
        let overrides: Map<String, Value> = args.settings.iter().cloned().collect();
        let (config_tx, config_rx) = watch::channel(if args.no_config {
            Some(Arc::new(Map::new()))
        } else {
            None
        });
        let settings = Settings {
            config: config_rx,
            overrides: Arc::new(overrides),
        };
        let own: Vec<&str> = spec.grpc_services.to_vec();
        let (router, health) = crate::server::router_serving(&own);
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(DispatchStats::default());
        let (stop, _) = watch::channel(false);
        let ctx = Context {
            outbox: Outbox::new(spec.name, settings.clone(), wake.clone()),
            pool,
            settings,
            channel,
            inner: Arc::new(Inner {
                spec,
                args: args.clone(),
                migrated: AtomicBool::new(false),
                database_up: AtomicBool::new(false),
                router: Mutex::new(Some(router)),
                stop,
                tasks: Mutex::new(Vec::new()),
                stats,
                wake,
            }),
        };
        ctx.spawn_until_stopped(ctx.clone().migrate(pg.clone()));
        if !args.no_config {
            ctx.spawn_until_stopped(ctx.clone().follow_config(config_tx));
        }
        ctx.spawn_until_stopped(ctx.clone().follow_health(health));
        ctx.spawn(ctx.clone().prune_inbox());
        if spec.publishes_events {
            let dispatcher = Dispatcher {
                source: spec.name,
                pool: ctx.pool.clone(),
                config: pg,
                channel: ctx.channel.clone(),
                wake: ctx.inner.wake.clone(),
                stats: ctx.inner.stats.clone(),
            };
            let stop = ctx.inner.stop.subscribe();
            ctx.spawn(async move {
                // Wait for the tables before delivering from them.
                dispatcher.run(stop).await;
            });
        }
        Ok(ctx)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.inner.tasks.lock().expect("tasks lock").push(handle);
    }

    /// A background task with nothing to finish: it ends the moment the
    /// service stops (a retry sleep, a watch through the sidecar, a health
    /// probe), so stopping never waits out their timers.
    fn spawn_until_stopped(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stop = self.inner.stop.subscribe();
        self.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        });
    }

    /// The router, with grpc.health.v1 and reflection (v1, v1alpha)
    /// listing the spec's gRPC services; add the service's own to it.
    /// Health of `""` and of each listed service is NOT_SERVING until the
    /// database is reachable and migrated and the settings are loaded, and
    /// again whenever the database is unreachable.
    ///
    /// # Panics
    /// When called twice: there is one router per service.
    pub fn router(&self) -> Router {
        self.inner
            .router
            .lock()
            .expect("router lock")
            .take()
            .expect("Context::router is called once")
    }

    /// The operator API of this service's outbox.
    pub fn outbox_admin(&self) -> OutboxAdmin {
        OutboxAdmin {
            source: self.inner.spec.name,
            pool: self.pool.clone(),
            stats: self.inner.stats.clone(),
            wake: self.inner.wake.clone(),
            outbox: self.outbox.clone(),
        }
    }

    /// UNAVAILABLE unless the database is migrated and reachable and the
    /// settings are loaded: call first in every handler that writes.
    pub fn check_ready(&self) -> Result<(), Status> {
        if !self.inner.migrated.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!(
                "{} is starting: its database is not migrated yet",
                self.inner.spec.name
            )));
        }
        if !self.settings.loaded() {
            return Err(Status::unavailable(format!(
                "{} is starting: its configuration has not arrived from the Config API yet",
                self.inner.spec.name
            )));
        }
        Ok(())
    }

    /// Whether the service would answer SERVING now.
    pub fn ready(&self) -> bool {
        self.check_ready().is_ok() && self.inner.database_up.load(Ordering::Acquire)
    }

    /// Serves `router` on `--listen` until SIGTERM or Ctrl-C, drains calls
    /// in flight within `--grace`, then stops the dispatcher (finishing its
    /// round) and the background tasks.
    pub async fn serve(self, router: Router) -> anyhow::Result<()> {
        let spec = self.inner.spec;
        let result = crate::server::run_plaintext(
            spec.name,
            self.inner.args.listen,
            self.inner.args.grace,
            router,
        )
        .await;
        let _ = self.inner.stop.send(true);
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        self.pool.close();
        tracing::info!(service = spec.name, "stopped");
        result
    }

    async fn migrate(self, pg: tokio_postgres::Config) {
        let spec = self.inner.spec;
        let mut delay = Duration::from_millis(200);
        loop {
            match db::migrate(
                &pg,
                spec.name,
                vec![(spec.migrations)(), crate::events::migrations()],
            )
            .await
            {
                Ok(applied) => {
                    tracing::info!(service = spec.name, applied, "database migrated");
                    self.inner.migrated.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    tracing::warn!(service = spec.name, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "database not migrated yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn follow_config(self, tx: watch::Sender<Option<Arc<Map<String, Value>>>>) {
        let name = self.inner.spec.name;
        let mut delay = Duration::from_millis(200);
        loop {
            let mut client = ConfigServiceClient::new(self.channel.clone());
            match client
                .watch_config(WatchConfigRequest {
                    service: name.to_owned(),
                })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                delay = Duration::from_millis(200);
                                let settings = update
                                    .config
                                    .and_then(|c| c.settings)
                                    .map(struct_to_map)
                                    .unwrap_or_default();
                                if tx.borrow().is_none() {
                                    tracing::info!(service = name, "configuration loaded");
                                }
                                tx.send_replace(Some(Arc::new(settings)));
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::warn!(code = ?status.code(), message = status.message(), "configuration watch lost; keeping the last settings");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), retry_in_ms = delay.as_millis() as u64, "cannot follow the configuration through the sidecar yet");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn follow_health(self, health: HealthReporter) {
        let mut last: Option<bool> = None;
        loop {
            let up = match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    if last != Some(false) {
                        tracing::warn!(error = %e, "database unreachable");
                    }
                    false
                }
                Err(_) => false,
            };
            self.inner.database_up.store(up, Ordering::Release);
            let serving = up && self.check_ready().is_ok();
            if last != Some(serving) {
                let status = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status("", status).await;
                for service in self.inner.spec.grpc_services {
                    health.set_service_status(*service, status).await;
                }
                tracing::info!(service = self.inner.spec.name, serving, "health");
                last = Some(serving);
            }
            // Probe quickly until serving, then once a period.
            let wait = if serving {
                PROBE_EVERY
            } else {
                Duration::from_millis(200)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Forgets applied event IDs older than the `inbox_retention_days`
    /// setting (default 7), so the inbox does not grow without bound. A
    /// redelivery happens within seconds of the first delivery (an
    /// acknowledgement lost in a crash); a week is ample.
    async fn prune_inbox(self) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
                _ = stop.changed() => return,
            }
            if !self.inner.migrated.load(Ordering::Acquire) {
                continue;
            }
            let days = self
                .settings
                .u64_or("inbox_retention_days", 7)
                .clamp(1, 3650) as f64;
            let pruned = async {
                let client = self.pool.get().await?;
                let n = client
                    .execute(
                        "DELETE FROM trellis_inbox WHERE applied_at < now() - make_interval(days => $1::float8::int)",
                        &[&days],
                    )
                    .await?;
                Ok::<u64, db::DbError>(n)
            }
            .await;
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, days, "old inbox entries forgotten"),
                Err(e) => tracing::debug!(error = %e, "inbox pruning failed; next time"),
            }
        }
    }

    async fn probe(&self) -> Result<(), db::DbError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// A `google.protobuf.Struct` as a JSON object.
pub fn struct_to_map(s: prost_types::Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers read back as integers (page sizes, counts).
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_map(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_parse_as_json_or_strings() {
        assert_eq!(
            parse_setting("max_page_size=20").unwrap(),
            ("max_page_size".into(), json!(20))
        );
        assert_eq!(
            parse_setting("name=abc").unwrap(),
            ("name".into(), json!("abc"))
        );
        assert_eq!(
            parse_setting(r#"subscribers={"a.b":["x.v1.Y"]}"#)
                .unwrap()
                .1,
            json!({"a.b": ["x.v1.Y"]})
        );
        assert!(parse_setting("no-equals").is_err());
        assert!(parse_setting("bad key=1").is_err());
    }

    #[test]
    fn overrides_win_and_numbers_are_read() {
        let s = Settings::for_test(json!({"max_page_size": 7, "text": "x"}));
        assert_eq!(s.u64_or("max_page_size", 500), 7);
        assert_eq!(s.u64_or("missing", 500), 500);
        assert_eq!(s.u64_or("text", 500), 500);
        assert!(s.loaded());
    }

    #[test]
    fn structs_become_json() {
        use prost_types::value::Kind;
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "n".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(500.0)),
            },
        );
        fields.insert(
            "f".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(0.5)),
            },
        );
        fields.insert(
            "l".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![prost_types::Value {
                        kind: Some(Kind::StringValue("a".into())),
                    }],
                })),
            },
        );
        let map = struct_to_map(prost_types::Struct { fields });
        assert_eq!(Value::Object(map), json!({"n": 500, "f": 0.5, "l": ["a"]}));
    }
}
