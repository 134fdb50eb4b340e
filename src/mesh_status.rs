//! `trellis status`: the registry's view of the mesh, read through its gRPC
//! API with a read-only identity.
//!
//! One snapshot of every instance comes from the first message of a
//! registry Watch with no targets (the whole registry, at one revision),
//! and the configuration's revision and problems from GetConfigStatus. Both
//! are open to any identity with a mesh certificate, including one the
//! registry was started to treat as read-only (`--read-only edge,cli`).
//!
//! With `--watch` a Watch stream stays open: each change it pushes (and a
//! one-second tick, since lease renewals are not pushed and ages move on)
//! takes a fresh snapshot, redrawn in place on a terminal or printed as a
//! new block otherwise.
//!
//! The flags that find the registry ([`RegistryArgs`]) and the listing of
//! instances ([`RegistryReader`]) are shared with `trellis top`.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::cli::RegistryTargets;
use crate::identity::{IdentityPaths, SpiffeId, Workload};
use crate::pb::trellis::config::v1 as config_pb;
use crate::pb::trellis::registry::v1 as registry_pb;
use crate::tls::ExpectedPeer;
use config_pb::config_service_client::ConfigServiceClient;
use registry_pb::registry_service_client::RegistryServiceClient;
use registry_pb::{RemovalReason, ServingStatus, WatchEventKind};

const PROGRAM: &str = "trellis status";
/// How long one snapshot (both calls, connecting included) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(12);
/// How often `--watch` refreshes without a pushed change, and retries an
/// unreachable registry.
const TICK: Duration = Duration::from_secs(1);
/// How long `--watch` lets a burst of pushed changes gather.
const BURST: Duration = Duration::from_millis(20);
/// Metadata longer than this (as `k=v k=v`) is shown as a count.
const MAX_METADATA_WIDTH: usize = 40;
/// How many pushed changes `--watch` keeps on screen.
const RECENT_CHANGES: usize = 8;

/// How a command finds the registry and who it is to it: the flags
/// `trellis status` and `trellis top` share.
#[derive(Clone, Debug, clap::Args)]
pub struct RegistryArgs {
    /// The registry's address (its Registry and Config APIs, mTLS):
    /// `host:port`, or several replicas comma-separated (at most 16); the
    /// first that answers is used.
    #[arg(
        long,
        env = "TRELLIS_REGISTRY",
        default_value = "127.0.0.1:7000",
        value_name = "ADDR[,ADDR...]",
        value_parser = RegistryTargets::parse
    )]
    pub registry: RegistryTargets,
    /// SPIFFE ID the registry must present; default: service `registry`
    /// in this identity's trust domain and namespace.
    #[arg(long, env = "TRELLIS_REGISTRY_IDENTITY", value_name = "SPIFFE_ID")]
    pub registry_identity: Option<SpiffeId>,
    /// Directory holding `ca.pem` and the identity's `<name>.pem` and
    /// `<name>.key` (where `trellis up` writes them).
    #[arg(
        long,
        env = "TRELLIS_CLI_CERTS",
        default_value = ".trellis/certs",
        value_name = "DIR"
    )]
    pub certs: PathBuf,
    /// Which certificate in `--certs` to call the registry with; `trellis
    /// up` issues `cli`, an identity the registry lets read but not register.
    #[arg(
        long,
        env = "TRELLIS_CLI_IDENTITY",
        default_value = "cli",
        value_name = "NAME"
    )]
    pub identity: String,
}

impl RegistryArgs {
    /// The registry access these flags stand for.
    pub fn access(&self) -> RegistryAccess {
        RegistryAccess {
            registry: self.registry.clone(),
            registry_identity: self.registry_identity.clone(),
            identity: IdentityPaths::in_dir(&self.certs, &self.identity),
        }
    }
}

/// Where the registry is and how to call it.
#[derive(Clone, Debug)]
pub struct RegistryAccess {
    /// The registry's replicas.
    pub registry: RegistryTargets,
    /// The identity the registry must present; `None`: `registry` in the
    /// caller's trust domain and namespace.
    pub registry_identity: Option<SpiffeId>,
    /// The caller's certificate, key and CA.
    pub identity: IdentityPaths,
}

/// Flags of `trellis status`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// The registry and the identity to ask it with.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Keep following the mesh (redrawn in place on a terminal, a new block
    /// per change otherwise) until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON instead of tables (with `--watch`: one object per line,
    /// per change).
    #[arg(long)]
    pub json: bool,
}

/// What `trellis status` needs.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    /// The registry and how to call it.
    pub access: RegistryAccess,
    /// Follow changes until Ctrl-C.
    pub watch: bool,
    /// JSON instead of tables.
    pub json: bool,
    /// With `watch`: redraw in place (ANSI) instead of printing a block per
    /// change; for a terminal.
    pub redraw: bool,
}

impl StatusArgs {
    /// The options these flags stand for; `redraw` when stdout is a
    /// terminal.
    pub fn options(&self) -> StatusOptions {
        StatusOptions {
            access: self.registry.access(),
            watch: self.watch,
            json: self.json,
            redraw: std::io::stdout().is_terminal(),
        }
    }
}

/// Runs `trellis status` on a runtime of its own, printing to stdout and
/// errors to stderr. Returns the exit status: 0 when every instance is
/// serving and the configuration has no problems, 1 when not (or nothing
/// is registered), 2 on an error (bad identity, registry unreachable).
/// From inside a Tokio runtime, use [`command`] instead.
pub fn main(args: StatusArgs) -> i32 {
    crate::cli::on_runtime(PROGRAM, command(args))
}

/// [`main`] for a caller already on a Tokio runtime.
pub async fn command(args: StatusArgs) -> i32 {
    match run(args.options(), &mut std::io::stdout()).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("{PROGRAM}: {e:#}");
            2
        }
    }
}

/// What can stop `trellis status` from showing anything.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The identity files are missing or unusable.
    #[error(
        "{cause}\n  (`trellis up` issues the `cli` identity into .trellis/certs; otherwise give --certs DIR and --identity NAME)"
    )]
    Identity {
        /// What is wrong, naming the file (already in the message, so not
        /// a `source` to print again).
        cause: crate::IdentityError,
    },
    /// No connection to the registry could be made.
    #[error("cannot reach the registry at {addr}: {detail}\n  ({hint})")]
    Unreachable {
        /// Where it was expected.
        addr: String,
        /// The innermost cause (connection refused, TLS alert, ...).
        detail: String,
        /// What to check.
        hint: &'static str,
    },
    /// The registry refused a call.
    #[error("the registry at {addr} refused {rpc} to {caller}: {code:?}: {message}")]
    Refused {
        /// The registry.
        addr: String,
        /// The call, e.g. `RegistryService/Watch`.
        rpc: &'static str,
        /// Our identity.
        caller: SpiffeId,
        /// The gRPC status code.
        code: Code,
        /// The registry's message.
        message: String,
    },
    /// The registry failed a call some other way.
    #[error("{rpc} at the registry {addr} failed: {code:?}: {message}")]
    Failed {
        /// The registry.
        addr: String,
        /// The call.
        rpc: &'static str,
        /// The gRPC status code.
        code: Code,
        /// The message.
        message: String,
    },
    /// No replica of several answered.
    #[error("no registry replica answered (tried {}):{}", tried.join(", "), failures.iter().map(|f| format!("\n  - {f}")).collect::<String>())]
    NoneAnswered {
        /// Every address tried, in order.
        tried: Vec<String>,
        /// What each said, in order.
        failures: Vec<String>,
    },
    /// No answer in time.
    #[error("the registry at {addr} did not answer within {timeout:?}")]
    TimedOut {
        /// The registry.
        addr: String,
        /// How long we waited.
        timeout: Duration,
    },
}

/// Prints the mesh to `out` and returns `Ok(true)` when every instance is
/// serving and the configuration has no problems (`Ok(false)` also when
/// nothing is registered). With `watch`, follows changes until Ctrl-C and
/// returns the verdict on the last view.
pub async fn run(options: StatusOptions, out: &mut impl Write) -> anyhow::Result<bool> {
    let reader = RegistryReader::connect(&options.access)?;
    let mut source = Source { reader };
    let workload_id = source.reader.caller.clone();
    let style = Style {
        trust_domain: workload_id.trust_domain().to_owned(),
        caller: workload_id,
        json: options.json,
    };
    let view = source.snapshot().await?;
    if !options.watch {
        let text = if options.json {
            serde_json::to_string_pretty(&style.json(&view, None, &[]))? + "\n"
        } else {
            style.text(&view, None, &[], false)
        };
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(view.healthy());
    }
    // Installed before the first drawing, so a Ctrl-C right after it
    // stops us cleanly rather than killing the process.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let verdict = Cell::new(view.healthy());
    tokio::select! {
        followed = follow(&mut source, &style, options.redraw, view, out, &verdict) => followed?,
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(verdict.get())
}

/// A read-only client of the registry: the listing of instances that
/// `trellis status` and `trellis top` share. Given several replicas, it
/// asks the one that answered last, and the others in turn when that one
/// cannot answer.
#[derive(Debug, Clone)]
pub struct RegistryReader {
    caller: SpiffeId,
    /// Every replica, in the order given.
    replicas: Vec<Replica>,
    /// The one in use: the last that answered.
    current: usize,
}

/// One registry replica, for one question.
#[derive(Debug, Clone)]
struct Replica {
    /// Its entry of `--registry`.
    addr: String,
    caller: SpiffeId,
    channel: Channel,
}

/// Every instance the registry knows, at one revision.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The registry's revision.
    pub revision: u64,
    /// By service, then instance ID.
    pub instances: Vec<registry_pb::Instance>,
}

impl StatusError {
    /// Whether another replica may answer where this one did not: it is
    /// unreachable, silent or says it cannot serve. A refusal is an answer.
    fn replica_down(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::TimedOut { .. } => true,
            Self::Failed { code, .. } => matches!(
                code,
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ),
            Self::Identity { .. } | Self::Refused { .. } | Self::NoneAnswered { .. } => false,
        }
    }
}

impl RegistryReader {
    /// Loads the caller's identity and prepares an mTLS channel to each
    /// registry replica (connected on first use; names resolved on every
    /// connection).
    pub fn connect(access: &RegistryAccess) -> anyhow::Result<Self> {
        let workload =
            Workload::load(&access.identity).map_err(|cause| StatusError::Identity { cause })?;
        let registry_id = match &access.registry_identity {
            Some(id) => id.clone(),
            None => SpiffeId::for_service(
                workload.id().trust_domain(),
                workload
                    .id()
                    .namespace()
                    .unwrap_or(crate::identity::DEFAULT_NAMESPACE),
                "registry",
            )?,
        };
        let caller = workload.id().clone();
        let replicas = access
            .registry
            .entries()
            .iter()
            .map(|entry| {
                let channel = crate::tls::channel_to(
                    &workload,
                    entry,
                    0,
                    ExpectedPeer::Exactly(registry_id.clone()),
                )?;
                Ok(Replica {
                    addr: entry.clone(),
                    caller: caller.clone(),
                    channel,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!replicas.is_empty(), "no registry address given");
        Ok(Self {
            caller,
            replicas,
            current: 0,
        })
    }

    /// The address of the replica in use (the last that answered).
    pub fn addr(&self) -> String {
        self.replica().addr.clone()
    }

    fn replica(&self) -> &Replica {
        &self.replicas[self.current]
    }

    /// Who we are to the registry.
    pub fn caller(&self) -> &SpiffeId {
        &self.caller
    }

    /// Every instance, sorted by service and instance ID, from the first
    /// message of a Watch with no targets; an error after 12 s without an
    /// answer (per replica).
    pub async fn instances(&mut self) -> Result<Listing, StatusError> {
        self.first_answer(|replica| async move { replica.fetch_instances().await })
            .await
    }

    /// A Watch of the whole registry, opened on the replica in use or the
    /// next that answers: its first message is a snapshot. Returns the
    /// replica's address with the stream.
    pub async fn watch(
        &mut self,
    ) -> Result<(String, Streaming<registry_pb::WatchResponse>), StatusError> {
        self.first_answer(|replica| async move {
            let stream = replica.open_watch().await?;
            Ok((replica.addr, stream))
        })
        .await
    }

    /// The configuration's revision, when it was loaded, and its problems.
    pub async fn config(&mut self) -> Result<config_pb::GetConfigStatusResponse, StatusError> {
        self.first_answer(|replica| async move { replica.config_status().await })
            .await
    }

    /// Every instance of a service as the registry holds it now (leases
    /// included: a Watch sends no renewals).
    pub async fn resolve(
        &mut self,
        target: &str,
    ) -> Result<registry_pb::ResolveResponse, StatusError> {
        let target = target.to_owned();
        self.first_answer(|replica| {
            let target = target.clone();
            async move {
                RegistryServiceClient::new(replica.channel.clone())
                    .resolve(registry_pb::ResolveRequest { target })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| replica.error("RegistryService/Resolve", s))
            }
        })
        .await
    }

    /// The registered contract of a gRPC service: the descriptor of its
    /// file first, then every dependency's.
    pub async fn contract(
        &mut self,
        grpc_service: &str,
    ) -> Result<registry_pb::GetServiceDescriptorsResponse, StatusError> {
        let name = grpc_service.to_owned();
        self.first_answer(|replica| {
            let name = name.clone();
            async move {
                RegistryServiceClient::new(replica.channel.clone())
                    .get_service_descriptors(registry_pb::GetServiceDescriptorsRequest {
                        grpc_service: name,
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| replica.error("RegistryService/GetServiceDescriptors", s))
            }
        })
        .await
    }

    /// `ask`'s answer from the replica in use or, when it cannot answer,
    /// from the next one that does (which is then in use); with several
    /// replicas and none answering, an error naming each and what it said.
    async fn first_answer<T, F, Fut>(&mut self, mut ask: F) -> Result<T, StatusError>
    where
        F: FnMut(Replica) -> Fut,
        Fut: std::future::Future<Output = Result<T, StatusError>>,
    {
        let n = self.replicas.len();
        let (mut tried, mut failures) = (Vec::new(), Vec::new());
        for k in 0..n {
            let i = (self.current + k) % n;
            let replica = self.replicas[i].clone();
            let addr = replica.addr.clone();
            let answer = tokio::time::timeout(FETCH_TIMEOUT, ask(replica))
                .await
                .unwrap_or_else(|_| {
                    Err(StatusError::TimedOut {
                        addr: addr.clone(),
                        timeout: FETCH_TIMEOUT,
                    })
                });
            match answer {
                Err(e) if n > 1 && e.replica_down() => {
                    failures.push(e.to_string().replace('\n', "\n    "));
                    tried.push(addr);
                }
                answer => {
                    self.current = i;
                    return answer;
                }
            }
        }
        Err(StatusError::NoneAnswered { tried, failures })
    }
}

impl Replica {
    async fn fetch_instances(&self) -> Result<Listing, StatusError> {
        let mut stream = self.open_watch().await?;
        let first = stream
            .message()
            .await
            .map_err(|s| self.error("RegistryService/Watch", s))?
            .ok_or_else(|| StatusError::Failed {
                addr: self.addr.clone(),
                rpc: "RegistryService/Watch",
                code: Code::Unavailable,
                message: "the stream ended before its first snapshot".into(),
            })?;
        drop(stream);
        let mut instances = first.instances;
        instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        Ok(Listing {
            revision: first.revision,
            instances,
        })
    }

    /// A Watch of the whole registry; its first message is a snapshot.
    async fn open_watch(&self) -> Result<Streaming<registry_pb::WatchResponse>, StatusError> {
        RegistryServiceClient::new(self.channel.clone())
            .watch(registry_pb::WatchRequest { targets: vec![] })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error("RegistryService/Watch", s))
    }

    /// The configuration's revision and problems.
    async fn config_status(&self) -> Result<config_pb::GetConfigStatusResponse, StatusError> {
        ConfigServiceClient::new(self.channel.clone())
            .get_config_status(config_pb::GetConfigStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error("ConfigService/GetConfigStatus", s))
    }

    /// Says what a failed call means for the person running the command.
    fn error(&self, rpc: &'static str, status: Status) -> StatusError {
        if let Some(io) = innermost::<std::io::Error>(&status) {
            let hint = match io.kind() {
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut => {
                    "is `trellis up` running? Start it, or point --registry (TRELLIS_REGISTRY) at the registry"
                }
                std::io::ErrorKind::NotFound => {
                    "check the name given with --registry (TRELLIS_REGISTRY)"
                }
                _ => {
                    "mTLS with it failed: check that --certs holds this mesh's ca.pem and a certificate that CA issued, and that the address is the registry's"
                }
            };
            return StatusError::Unreachable {
                addr: self.addr.clone(),
                detail: io.to_string(),
                hint,
            };
        }
        match status.code() {
            // The registry answered, but cannot serve (e.g. a replica that
            // lost its etcd store): its own message says why.
            Code::Unavailable
                if !status.message().is_empty() && std::error::Error::source(&status).is_none() =>
            {
                StatusError::Failed {
                    addr: self.addr.clone(),
                    rpc,
                    code: Code::Unavailable,
                    message: status.message().to_owned(),
                }
            }
            Code::Unavailable => StatusError::Unreachable {
                addr: self.addr.clone(),
                detail: deepest_message(&status),
                hint: "is `trellis up` running? Start it, or point --registry (TRELLIS_REGISTRY) at the registry",
            },
            Code::PermissionDenied | Code::Unauthenticated => StatusError::Refused {
                addr: self.addr.clone(),
                rpc,
                caller: self.caller.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            },
            code => StatusError::Failed {
                addr: self.addr.clone(),
                rpc,
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// The registry's clients and who we are to it.
#[derive(Debug)]
struct Source {
    reader: RegistryReader,
}

impl Source {
    /// Every instance at one revision, and the configuration's status,
    /// from one replica (the first that answers).
    async fn snapshot(&mut self) -> Result<View, StatusError> {
        self.reader
            .first_answer(|replica| async move {
                let listing = replica.fetch_instances().await?;
                let config = replica.config_status().await?;
                Ok(View {
                    registry: replica.addr,
                    revision: listing.revision,
                    instances: listing.instances,
                    config,
                    at: SystemTime::now(),
                })
            })
            .await
    }
}

/// The innermost error of type `E` in `error`'s cause chain.
fn innermost<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut found = None;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(hit) = e.downcast_ref::<E>() {
            found = Some(hit);
        }
        next = e.source();
    }
    found
}

/// The message of the last error in the cause chain, the most specific.
fn deepest_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// One look at the mesh.
#[derive(Debug, Clone)]
struct View {
    /// The replica that answered.
    registry: String,
    revision: u64,
    /// By service, then instance ID.
    instances: Vec<registry_pb::Instance>,
    config: config_pb::GetConfigStatusResponse,
    /// When it was taken: ages and leases are relative to this.
    at: SystemTime,
}

impl View {
    fn not_serving(&self) -> impl Iterator<Item = &registry_pb::Instance> {
        self.instances
            .iter()
            .filter(|i| i.health() != ServingStatus::Serving)
    }

    /// Something registered, all of it serving, and no config problems.
    fn healthy(&self) -> bool {
        !self.instances.is_empty()
            && self.not_serving().next().is_none()
            && self.config.problems.is_empty()
    }

    /// Per mesh service: its gRPC services (sorted), instances serving and
    /// in all.
    fn services(&self) -> Vec<ServiceRow<'_>> {
        let mut rows: Vec<ServiceRow<'_>> = Vec::new();
        for i in &self.instances {
            if rows.last().is_none_or(|r| r.name != i.service) {
                rows.push(ServiceRow {
                    name: &i.service,
                    grpc_services: Vec::new(),
                    serving: 0,
                    total: 0,
                });
            }
            let row = rows.last_mut().expect("pushed above");
            row.total += 1;
            if i.health() == ServingStatus::Serving {
                row.serving += 1;
            }
            for g in &i.grpc_services {
                if !row.grpc_services.contains(&g.as_str()) {
                    row.grpc_services.push(g);
                }
            }
        }
        for row in &mut rows {
            row.grpc_services.sort_unstable();
        }
        rows
    }

    /// What changes when the mesh does, not when time passes: `--watch`
    /// prints a new block (off a terminal) only when this changes.
    fn signature(&self) -> String {
        format!(
            "{}/{}/{:?}",
            self.revision, self.config.revision, self.config.problems
        )
    }
}

#[derive(Debug)]
struct ServiceRow<'a> {
    name: &'a str,
    grpc_services: Vec<&'a str>,
    serving: usize,
    total: usize,
}

/// A change the Watch stream pushed, for the `--watch` display.
#[derive(Debug, Clone)]
struct Change {
    at: SystemTime,
    text: String,
}

/// Follows the registry until the caller stops polling (Ctrl-C), keeping
/// `verdict` on the latest view.
async fn follow(
    source: &mut Source,
    style: &Style,
    redraw: bool,
    first: View,
    out: &mut impl Write,
    verdict: &Cell<bool>,
) -> anyhow::Result<()> {
    let mut last = first;
    let mut error: Option<String> = None;
    let mut changes: VecDeque<Change> = VecDeque::new();
    let mut known: Option<HashMap<String, registry_pb::Instance>> = None;
    let mut stream: Option<Streaming<registry_pb::WatchResponse>> = None;
    let mut printed: Option<String> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is due at once; `first` is that fresh.
    tick.tick().await;
    let mut shown = false;
    loop {
        // Draw what we have, then wait for a push or the tick.
        let changes_now: Vec<Change> = changes.iter().cloned().collect();
        let signature = format!(
            "{}/{error:?}/{:?}",
            last.signature(),
            changes.front().map(|c| (c.at, &c.text))
        );
        if redraw || printed.as_ref() != Some(&signature) {
            let text = if style.json {
                serde_json::to_string(&style.json(&last, error.as_deref(), &changes_now))? + "\n"
            } else if redraw {
                // Home, draw over the old lines clearing each one's rest,
                // then clear whatever the old drawing had below.
                let body = style.text(&last, error.as_deref(), &changes_now, true);
                let mut screen = String::from(if shown { "\x1b[H" } else { "\x1b[H\x1b[2J" });
                for line in body.lines() {
                    screen.push_str(line);
                    screen.push_str("\x1b[K\n");
                }
                screen.push_str("\x1b[J");
                screen
            } else {
                let body = style.text(&last, error.as_deref(), &changes_now, true);
                if shown { format!("\n{body}") } else { body }
            };
            out.write_all(text.as_bytes())?;
            out.flush()?;
            printed = Some(signature);
            shown = true;
        }

        if stream.is_none() {
            match tokio::time::timeout(TICK * 2, source.reader.replica().open_watch()).await {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(_) => {
                    error = Some(
                        StatusError::TimedOut {
                            addr: source.reader.addr(),
                            timeout: TICK * 2,
                        }
                        .to_string(),
                    )
                }
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            pushed = next_message(&mut stream) => {
                let mut pushed = pushed;
                loop {
                    match pushed {
                        Ok(Some(response)) => record(&mut known, response, &mut changes),
                        Ok(None) => {
                            stream = None;
                            error = Some(format!(
                                "the registry at {} ended the watch; reconnecting",
                                source.reader.addr()
                            ));
                            break;
                        }
                        Err(status) => {
                            stream = None;
                            error = Some(format!(
                                "lost the watch on the registry at {} ({:?}: {}); reconnecting",
                                source.reader.addr(),
                                status.code(),
                                status.message()
                            ));
                            break;
                        }
                    }
                    // Let a burst of changes land, and take them all, so
                    // that it costs one snapshot (`message` is cancel safe).
                    tokio::time::sleep(BURST).await;
                    match next_message(&mut stream).now_or_never() {
                        Some(next) => pushed = next,
                        None => break,
                    }
                }
            }
        }
        match source.snapshot().await {
            Ok(view) => {
                last = view;
                if stream.is_some() {
                    error = None;
                }
                verdict.set(last.healthy());
            }
            Err(e) => {
                error = Some(e.to_string());
                verdict.set(false);
            }
        }
    }
}

/// The next message of the watch, or never when there is none.
async fn next_message(
    stream: &mut Option<Streaming<registry_pb::WatchResponse>>,
) -> Result<Option<registry_pb::WatchResponse>, Status> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// Applies one pushed step to what the stream has told us so far and notes
/// what changed in words.
fn record(
    known: &mut Option<HashMap<String, registry_pb::Instance>>,
    response: registry_pb::WatchResponse,
    changes: &mut VecDeque<Change>,
) {
    let now = SystemTime::now();
    let mut note = |text: String| {
        changes.push_front(Change { at: now, text });
        changes.truncate(RECENT_CHANGES);
    };
    let kind = response.kind();
    let reason = response.removal_reason();
    let instances = response.instances;
    if kind == WatchEventKind::Snapshot {
        let fresh: HashMap<_, _> = instances
            .into_iter()
            .map(|i| (i.instance_id.clone(), i))
            .collect();
        // A first snapshot after (re)connecting is no news; what differs
        // from before a reconnection or a resync is.
        if let Some(old) = known.as_ref() {
            for (id, i) in &fresh {
                match old.get(id) {
                    None => note(format!("{} {id} registered at {}", i.service, i.address)),
                    Some(o) if o.health() != i.health() => note(format!(
                        "{} {id} {} -> {}",
                        i.service,
                        health_name(o.health()),
                        health_name(i.health())
                    )),
                    Some(_) => {}
                }
            }
            for (id, o) in old {
                if !fresh.contains_key(id) {
                    note(format!("{} {id} removed", o.service));
                }
            }
        }
        *known = Some(fresh);
        return;
    }
    let map = known.get_or_insert_with(HashMap::new);
    for i in instances {
        let id = i.instance_id.clone();
        if kind == WatchEventKind::Remove {
            let why = match reason {
                RemovalReason::Deregistered => "deregistered",
                RemovalReason::LeaseExpired => "lease expired",
                RemovalReason::Replaced => "replaced by a new registration",
                RemovalReason::Unspecified => "removed",
            };
            note(format!("{} {id} {why}", i.service));
            map.remove(&id);
            continue;
        }
        match map.get(&id) {
            None => note(format!(
                "{} {id} registered at {} ({})",
                i.service,
                i.address,
                health_name(i.health())
            )),
            Some(o) if o.health() != i.health() => note(format!(
                "{} {id} {} -> {}",
                i.service,
                health_name(o.health()),
                health_name(i.health())
            )),
            Some(_) => note(format!("{} {id} updated", i.service)),
        }
        map.insert(id, i);
    }
}

fn health_name(health: ServingStatus) -> &'static str {
    match health {
        ServingStatus::Serving => "SERVING",
        ServingStatus::NotServing => "NOT_SERVING",
        ServingStatus::Unspecified => "UNKNOWN",
    }
}

/// How views are written.
#[derive(Debug)]
struct Style {
    trust_domain: String,
    caller: SpiffeId,
    json: bool,
}

impl Style {
    /// An identity, without the `spiffe://<our trust domain>/` every mesh
    /// identity shares.
    fn short_identity<'a>(&self, id: &'a str) -> &'a str {
        id.strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_prefix(self.trust_domain.as_str()))
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(id)
    }

    /// The tables and summary for a person.
    fn text(&self, view: &View, error: Option<&str>, changes: &[Change], watching: bool) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "registry {}  revision {}  as {}",
            view.registry, view.revision, self.caller
        );
        if watching {
            s.push_str("  (watching; Ctrl-C to stop)");
        }
        s.push('\n');
        if let Some(error) = error {
            let _ = writeln!(s, "! {}", error.replace('\n', "\n  "));
            let _ = writeln!(
                s,
                "! showing the last view, from {} ago",
                age(elapsed(view.at, SystemTime::now()))
            );
        }
        s.push('\n');

        let services = view.services();
        if !services.is_empty() {
            let rows: Vec<Vec<String>> = services
                .iter()
                .map(|r| {
                    vec![
                        r.name.to_owned(),
                        format!("{}/{}", r.serving, r.total),
                        r.grpc_services.join(", "),
                    ]
                })
                .collect();
            table(&mut s, &["SERVICE", "SERVING", "GRPC SERVICES"], &rows);
            s.push('\n');

            let with_metadata = view
                .instances
                .iter()
                .any(|i| operator_labels(&i.metadata).next().is_some());
            let mut headers = vec![
                "SERVICE",
                "INSTANCE",
                "ADDRESS",
                "VERSION",
                "ZONE",
                "HEALTH",
                "IDENTITY",
                "REGISTERED",
                "LEASE",
            ];
            if with_metadata {
                headers.push("METADATA");
            }
            let rows: Vec<Vec<String>> = view
                .instances
                .iter()
                .map(|i| {
                    let mut row = vec![
                        i.service.clone(),
                        i.instance_id.clone(),
                        i.address.clone(),
                        or_dash(&i.version),
                        or_dash(&i.zone),
                        health_name(i.health()).to_owned(),
                        self.short_identity(&i.identity).to_owned(),
                        i.registered_at
                            .as_ref()
                            .map_or("-".into(), |t| format!("{} ago", age(since(t, view.at)))),
                        i.lease_expires_at
                            .as_ref()
                            .map_or("-".into(), |t| lease(since(t, view.at))),
                    ];
                    if with_metadata {
                        row.push(metadata(&i.metadata));
                    }
                    row
                })
                .collect();
            table(&mut s, &headers, &rows);
            s.push('\n');
        }

        let config = &view.config;
        let _ = write!(s, "config revision {}", config.revision);
        if let Some(t) = &config.loaded_at {
            let _ = write!(s, ", loaded {} ago", age(since(t, view.at)));
        }
        match config.problems.len() {
            0 => s.push_str(": no problems\n"),
            n => {
                let _ = writeln!(s, ": {}", plural(n, "problem"));
                let rows: Vec<Vec<String>> = config
                    .problems
                    .iter()
                    .map(|p| {
                        let place = if p.line == 0 {
                            p.file.clone()
                        } else {
                            format!("{}:{}", p.file, p.line)
                        };
                        let effect = if p.rejected {
                            "file rejected, previous version in force"
                        } else {
                            "entry ignored"
                        };
                        vec![
                            format!("  {place}"),
                            or_dash(&p.rule),
                            format!("{} ({effect})", p.message),
                        ]
                    })
                    .collect();
                table(&mut s, &[], &rows);
            }
        }
        if !config.xds_rejections.is_empty() {
            let _ = writeln!(
                s,
                "{} rejected by proxyless (xDS) clients, which keep what they had before",
                plural(config.xds_rejections.len(), "resource update")
            );
            let rows: Vec<Vec<String>> = config
                .xds_rejections
                .iter()
                .map(|r| {
                    let when =
                        r.at.as_ref()
                            .map(|t| format!("{} ago", age(since(t, view.at))))
                            .unwrap_or_default();
                    vec![
                        format!("  {}", self.short_identity(&r.caller)),
                        format!("node {}", or_dash(&r.node)),
                        short_type(&r.type_url).to_owned(),
                        when,
                        r.reason.clone(),
                    ]
                })
                .collect();
            table(&mut s, &[], &rows);
        }

        if !changes.is_empty() {
            s.push_str("\nrecent changes\n");
            for c in changes {
                let _ = writeln!(
                    s,
                    "  {:>8} ago  {}",
                    age(elapsed(c.at, SystemTime::now())),
                    c.text
                );
            }
        }

        s.push('\n');
        s.push_str(&summary(view));
        s.push('\n');
        s
    }

    /// The same for a program.
    fn json(&self, view: &View, error: Option<&str>, changes: &[Change]) -> serde_json::Value {
        use serde_json::json;
        let services: Vec<_> = view
            .services()
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "grpc_services": r.grpc_services,
                    "instances": r.total,
                    "serving": r.serving,
                })
            })
            .collect();
        let instances: Vec<_> = view
            .instances
            .iter()
            .map(|i| {
                json!({
                    "service": i.service,
                    "instance_id": i.instance_id,
                    "address": i.address,
                    "version": i.version,
                    "zone": i.zone,
                    "health": health_name(i.health()),
                    "identity": i.identity,
                    "grpc_services": i.grpc_services,
                    "metadata": i.metadata,
                    "registered_at": i.registered_at.as_ref().map(rfc3339),
                    "lease_expires_at": i.lease_expires_at.as_ref().map(rfc3339),
                    // Negative once the lease is overdue.
                    "lease_remaining_ms": i.lease_expires_at.as_ref().map(|t| {
                        let d = since(t, view.at);
                        let ms = i64::try_from(d.duration.as_millis()).unwrap_or(i64::MAX);
                        if d.past { -ms } else { ms }
                    }),
                })
            })
            .collect();
        let problems: Vec<_> = view
            .config
            .problems
            .iter()
            .map(|p| {
                json!({
                    "file": p.file,
                    "line": p.line,
                    "rule": p.rule,
                    "message": p.message,
                    "rejected": p.rejected,
                })
            })
            .collect();
        let xds_rejections: Vec<_> = view
            .config
            .xds_rejections
            .iter()
            .map(|r| {
                json!({
                    "caller": r.caller,
                    "node": r.node,
                    "type_url": r.type_url,
                    "rejected_version": r.rejected_version,
                    "kept_version": r.kept_version,
                    "reason": r.reason,
                    "at": r.at.as_ref().map(rfc3339),
                })
            })
            .collect();
        let changes: Vec<_> = changes
            .iter()
            .map(|c| {
                json!({
                    "at": rfc3339(&prost_types::Timestamp::from(c.at)),
                    "change": c.text,
                })
            })
            .collect();
        json!({
            "registry": view.registry,
            "revision": view.revision,
            "services": services,
            "instances": instances,
            "config": {
                "revision": view.config.revision,
                "loaded_at": view.config.loaded_at.as_ref().map(rfc3339),
                "problems": problems,
                "xds_rejections": xds_rejections,
            },
            "error": error,
            "recent_changes": changes,
            "healthy": view.healthy(),
            "summary": summary(view),
        })
    }
}

/// The last line: how many instances, and what is wrong.
fn summary(view: &View) -> String {
    let services = view.services().len();
    let instances = view.instances.len();
    let problems = view.config.problems.len();
    let mut s = if instances == 0 {
        "no instances registered".to_owned()
    } else {
        let not_serving: Vec<String> = view
            .not_serving()
            .map(|i| format!("{} {}", i.service, i.instance_id))
            .collect();
        let head = format!(
            "{} in {}",
            plural(instances, "instance"),
            plural(services, "service")
        );
        if not_serving.is_empty() {
            format!("{head}, all serving")
        } else {
            format!(
                "{head}: {} not serving ({})",
                not_serving.len(),
                not_serving.join(", ")
            )
        }
    };
    if problems > 0 {
        let _ = write!(s, "; {}", plural(problems, "config problem"));
    }
    let rejections = view.config.xds_rejections.len();
    if rejections > 0 {
        let _ = write!(s, "; {}", plural(rejections, "xDS rejection"));
    }
    s
}

/// "Cluster" for "type.googleapis.com/envoy.config.cluster.v3.Cluster".
pub(crate) fn short_type(type_url: &str) -> &str {
    type_url.rsplit(['.', '/']).next().unwrap_or(type_url)
}

/// Writes rows as columns separated by two spaces; the last column is
/// not padded.
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    let columns = headers
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut widths = vec![0; columns];
    let all = std::iter::once(headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())
        .filter(|h| !h.is_empty())
        .chain(rows.iter().cloned());
    let all: Vec<Vec<String>> = all.collect();
    for row in &all {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The labels an operator gave, without the mesh's own (`trellis.admin`,
/// the sidecar's admin address, is for `trellis top`; `--json` shows it).
fn operator_labels(labels: &HashMap<String, String>) -> impl Iterator<Item = (&String, &String)> {
    labels.iter().filter(|(k, _)| !k.starts_with("trellis."))
}

/// `k=v k=v` of the operator's labels, sorted, or how many when that is
/// too long.
fn metadata(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = operator_labels(labels)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    let text = pairs.join(" ");
    if text.chars().count() <= MAX_METADATA_WIDTH {
        text
    } else {
        plural(pairs.len(), "label")
    }
}

/// A signed span of time: positive when `t` lies before the reference.
#[derive(Debug, Clone, Copy)]
struct Span {
    past: bool,
    duration: Duration,
}

/// How long before `reference` the timestamp `t` lies.
fn since(t: &prost_types::Timestamp, reference: SystemTime) -> Span {
    let t = SystemTime::try_from(*t).unwrap_or(SystemTime::UNIX_EPOCH);
    elapsed(t, reference)
}

fn elapsed(t: SystemTime, reference: SystemTime) -> Span {
    match reference.duration_since(t) {
        Ok(duration) => Span {
            past: true,
            duration,
        },
        Err(e) => Span {
            past: false,
            duration: e.duration(),
        },
    }
}

/// A lease's expiry as seen from the snapshot.
fn lease(until: Span) -> String {
    if until.past {
        format!("expired {} ago", age(until))
    } else {
        format!("expires in {}", age(until))
    }
}

/// `7s`, `2m05s`, `3h04m`, `2d05h`: precise enough to read at a glance.
fn age(span: Span) -> String {
    let s = span.duration.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn rfc3339(t: &prost_types::Timestamp) -> String {
    time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .map(|d| d + time::Duration::nanoseconds(i64::from(t.nanos)))
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str, health: ServingStatus) -> registry_pb::Instance {
        registry_pb::Instance {
            instance_id: id.into(),
            service: service.into(),
            version: "1.0".into(),
            address: "127.0.0.1:4143".into(),
            grpc_services: vec![format!("pkg.{service}.Api")],
            health: health as i32,
            identity: format!("spiffe://trellis.local/ns/default/sa/{service}"),
            ..Default::default()
        }
    }

    fn view(instances: Vec<registry_pb::Instance>, problems: usize) -> View {
        View {
            registry: "127.0.0.1:7000".into(),
            revision: 3,
            instances,
            config: config_pb::GetConfigStatusResponse {
                revision: 2,
                loaded_at: None,
                problems: (0..problems)
                    .map(|_| config_pb::ConfigProblem {
                        file: "usage.toml".into(),
                        line: 4,
                        rule: "routes[0]".into(),
                        message: "bad".into(),
                        rejected: true,
                    })
                    .collect(),
                ..Default::default()
            },
            at: SystemTime::now(),
        }
    }

    #[test]
    fn summarizes_what_is_not_serving_and_config_problems() {
        let all = view(
            vec![
                instance("usage", "a", ServingStatus::Serving),
                instance("user", "b", ServingStatus::Serving),
            ],
            0,
        );
        assert!(all.healthy());
        assert_eq!(summary(&all), "2 instances in 2 services, all serving");

        let one_down = view(
            vec![
                instance("usage", "a", ServingStatus::Serving),
                instance("usage", "c", ServingStatus::NotServing),
            ],
            1,
        );
        assert!(!one_down.healthy());
        assert_eq!(
            summary(&one_down),
            "2 instances in 1 service: 1 not serving (usage c); 1 config problem"
        );

        let empty = view(vec![], 0);
        assert!(!empty.healthy(), "an empty mesh is not a healthy one");
        assert_eq!(summary(&empty), "no instances registered");
    }

    #[test]
    fn groups_instances_by_service() {
        let v = view(
            vec![
                instance("usage", "a", ServingStatus::Serving),
                instance("usage", "c", ServingStatus::NotServing),
                instance("user", "b", ServingStatus::Serving),
            ],
            0,
        );
        let rows = v.services();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].name, rows[0].serving, rows[0].total),
            ("usage", 1, 2)
        );
        assert_eq!(rows[0].grpc_services, ["pkg.usage.Api"]);
    }

    #[test]
    fn aligns_columns() {
        let mut s = String::new();
        table(
            &mut s,
            &["A", "BB", "C"],
            &[vec!["xxx".into(), "y".into(), "last".into()]],
        );
        assert_eq!(s, "A    BB  C\nxxx  y   last\n");
    }

    #[test]
    fn ages_read_at_a_glance() {
        let span = |s| Span {
            past: true,
            duration: Duration::from_secs(s),
        };
        assert_eq!(age(span(7)), "7s");
        assert_eq!(age(span(125)), "2m05s");
        assert_eq!(age(span(3 * 3600 + 240)), "3h04m");
        assert_eq!(age(span(2 * 86_400 + 5 * 3600)), "2d05h");
        assert_eq!(
            lease(Span {
                past: false,
                duration: Duration::from_secs(8)
            }),
            "expires in 8s"
        );
        assert_eq!(lease(span(2)), "expired 2s ago");
    }

    #[test]
    fn xds_rejections_are_listed_with_their_reason_and_summed_up() {
        let mut v = view(vec![instance("usage", "a", ServingStatus::Serving)], 0);
        v.config.xds_rejections = vec![config_pb::XdsRejection {
            caller: "spiffe://trellis.local/ns/default/sa/billing".into(),
            node: "billing-7".into(),
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            reason: "cluster usage: LB policy is not supported".into(),
            at: Some(prost_types::Timestamp::from(v.at - Duration::from_secs(5))),
            ..Default::default()
        }];
        let style = Style {
            trust_domain: "trellis.local".into(),
            caller: SpiffeId::parse("spiffe://trellis.local/ns/default/sa/cli").unwrap(),
            json: false,
        };
        let text = style.text(&v, None, &[], false);
        assert!(
            text.contains("1 resource update rejected by proxyless (xDS) clients"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.contains("billing-7"))
            .unwrap_or_else(|| panic!("no row for the rejection:\n{text}"));
        for part in [
            "ns/default/sa/billing",
            "Cluster",
            "5s ago",
            "LB policy is not supported",
        ] {
            assert!(row.contains(part), "{part:?} missing from {row:?}");
        }
        assert!(
            summary(&v).ends_with("; 1 xDS rejection"),
            "{}",
            summary(&v)
        );
        let json = style.json(&v, None, &[]);
        assert_eq!(
            json["config"]["xds_rejections"][0]["reason"],
            "cluster usage: LB policy is not supported"
        );
    }

    #[test]
    fn shortens_identities_of_the_own_trust_domain_only() {
        let style = Style {
            trust_domain: "trellis.local".into(),
            caller: SpiffeId::parse("spiffe://trellis.local/ns/default/sa/cli").unwrap(),
            json: false,
        };
        assert_eq!(
            style.short_identity("spiffe://trellis.local/ns/default/sa/usage"),
            "ns/default/sa/usage"
        );
        assert_eq!(
            style.short_identity("spiffe://other.example/ns/default/sa/usage"),
            "spiffe://other.example/ns/default/sa/usage"
        );
        assert_eq!(
            style.short_identity("spiffe://trellis.localhost/x"),
            "spiffe://trellis.localhost/x"
        );
    }

    #[test]
    fn long_metadata_is_counted() {
        let short: HashMap<_, _> = [
            ("zone".to_owned(), "a".to_owned()),
            ("trellis.admin".to_owned(), "127.0.0.1:4191".to_owned()),
        ]
        .into();
        assert_eq!(
            metadata(&short),
            "zone=a",
            "the mesh's own labels are left out"
        );
        let long: HashMap<_, _> = (0..5)
            .map(|i| (format!("key-number-{i}"), "value".to_owned()))
            .collect();
        assert_eq!(metadata(&long), "5 labels");
    }
}
