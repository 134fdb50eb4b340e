//! `trellis up`: builds and runs the mesh a mesh file describes, on this
//! machine, as separate processes, and supervises them.
//!
//! In order: the `[[build]]` steps; the addresses (every port checked
//! free); certificates; PostgreSQL (found, or a private cluster started);
//! the registry; the services by dependency level, each instance with its
//! own sidecar, a level waiting for the one before it to be ready; the
//! edges. A service listed once per `version` (a canary beside the
//! release) runs every entry's instances, each sidecar registering its
//! entry's version and zone; what depends on it starts once all are ready.
//! Then it prints how to call the mesh and supervises: a process that
//! exits is restarted with backoff, one that keeps crashing is given up
//! on, and the rest keep serving. Ctrl-C or SIGTERM stops everything in
//! reverse order (edges, sidecars, services, registry, PostgreSQL), each
//! draining within its grace period. If anything fails while starting,
//! what was started is stopped and the failure is shown with the
//! component's last lines and what to check.

pub mod logs;
pub mod mesh;
pub mod plan;
pub mod postgres;
pub mod supervisor;
pub mod traces;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use nix::sys::signal::Signal;
use tokio::sync::watch;

use self::logs::LogSink;
use self::mesh::{MeshFile, ServiceSpec};
use self::plan::{EdgePlan, InstancePlan, Placeholders, Plan, resolve};
use self::supervisor::{ProcessSpec, State, Supervised, Supervisor, indent};

/// `trellis up`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// The mesh file.
    #[arg(
        long,
        short = 'f',
        default_value = "trellis.toml",
        env = "TRELLIS_MESH_FILE"
    )]
    pub file: PathBuf,
    /// State directory (certificates, logs, the archive, a private
    /// PostgreSQL); overrides the mesh file's `[mesh] state_dir`.
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the built binaries are (`{bin}`); overrides `[mesh] bin_dir`.
    #[arg(long, env = "TRELLIS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Take any free ports instead of the mesh file's (to run a second
    /// mesh beside the first, or in tests).
    #[arg(long)]
    pub any_ports: bool,
    /// Skip the `[[build]]` step with this name (repeat or comma-separate;
    /// `all` skips every one).
    #[arg(long = "skip-build", value_delimiter = ',')]
    pub skip_build: Vec<String>,
    /// Databases are named `<prefix>_<service>`; overrides
    /// `[postgres] database_prefix`.
    #[arg(long, env = "TRELLIS_DATABASE_PREFIX")]
    pub database_prefix: Option<String>,
    /// Run a private PostgreSQL cluster under the state directory even if
    /// a server is configured or on 127.0.0.1:5432.
    #[arg(long)]
    pub private_postgres: bool,
    /// How long each level of the mesh may take to become ready.
    #[arg(long, default_value = "120s", value_parser = crate::cli::parse_duration)]
    pub ready_timeout: Duration,
    /// Export every process's traces: `jaeger` starts Jaeger's all-in-one
    /// binary if installed (UI on 127.0.0.1:16686); a URL names a running
    /// OTLP/gRPC collector (`http://127.0.0.1:4317`).
    #[arg(long, value_name = "jaeger|URL")]
    pub traces: Option<String>,
    /// Every process's log lines: `text` (human-readable) or `json` (one
    /// object a line, with the call's trace id inside a call).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How the mesh's processes write their logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line (`TRELLIS_LOG_FORMAT=json`).
    Json,
}

/// Runs `trellis up`; returns the process's exit status.
pub fn main(args: UpArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis up: cannot start the runtime: {e}");
            return 2;
        }
    };
    runtime.block_on(up(args))
}

/// The mesh as it runs: stages in start order, each a set of processes.
#[derive(Debug, Default)]
struct Running {
    stages: Vec<(Stage, Vec<Supervised>)>,
}

/// What a stage holds, which decides how it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Anything stopped on its own: PostgreSQL, the registry, the edges.
    Plain,
    /// Service instances; their sidecars are the stage after.
    Services,
    /// The sidecars of the stage before.
    Sidecars,
}

/// How long a sidecar keeps serving after SIGTERM while peers see it
/// deregistered (mesh-proxy's `--drain-delay` default), and a margin.
const SIDECAR_DRAIN_DELAY: Duration = Duration::from_millis(2500);

impl Running {
    /// Stops everything in reverse start order, each stage's processes at
    /// once. Sidecars are asked first and their services once the
    /// sidecars' drain delay is over: peers have stopped sending by then,
    /// calls in flight finish, and the services' own calls out through
    /// their sidecars (configuration watches) end, so the sidecars finish
    /// draining without running out their grace period.
    async fn stop(mut self, logs: &LogSink) {
        while let Some((stage, procs)) = self.stages.pop() {
            if procs.is_empty() {
                continue;
            }
            let started = Instant::now();
            let names = |procs: &[Supervised]| {
                procs
                    .iter()
                    .map(|p| p.spec.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let services = match (stage, self.stages.last()) {
                (Stage::Sidecars, Some((Stage::Services, _))) => self.stages.pop().map(|(_, p)| p),
                _ => None,
            };
            match services {
                Some(services) => {
                    logs.launcher(format!("stopping {} (draining)", names(&procs)));
                    for p in &procs {
                        p.request_stop();
                    }
                    tokio::time::sleep(SIDECAR_DRAIN_DELAY).await;
                    logs.launcher(format!("stopping {}", names(&services)));
                    futures::future::join_all(services.into_iter().map(Supervised::stop)).await;
                    futures::future::join_all(procs.into_iter().map(Supervised::stopped)).await;
                    logs.launcher(format!(
                        "stopped in {:.1}s",
                        started.elapsed().as_secs_f64()
                    ));
                }
                None => {
                    logs.launcher(format!("stopping {}", names(&procs)));
                    futures::future::join_all(procs.into_iter().map(Supervised::stop)).await;
                    logs.launcher(format!(
                        "stopped in {:.1}s",
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
    }

    fn push(&mut self, stage: Stage, procs: Vec<Supervised>) -> &[Supervised] {
        self.stages.push((stage, procs));
        &self.stages.last().expect("just pushed").1
    }
}

/// Why the mesh did not come up.
#[derive(Debug)]
struct StartFailure(String);

async fn up(args: UpArgs) -> i32 {
    let mut file = match MeshFile::load(&args.file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("trellis up: {e}");
            return 2;
        }
    };
    if args.any_ports {
        file.use_any_free_ports();
    }
    let traces = match args.traces.as_deref().map(|value| {
        let ports = if args.any_ports {
            (any_free_port(), any_free_port())
        } else {
            (4317, 16686)
        };
        traces::Traces::parse(value, std::env::var_os("PATH").as_deref(), ports)
    }) {
        None => None,
        Some(Ok(traces)) => Some(traces),
        Some(Err(e)) => {
            eprintln!("trellis up: {e}");
            return 2;
        }
    };
    if let Some(prefix) = &args.database_prefix {
        file.postgres.database_prefix = Some(prefix.clone());
    }
    let root = file.root();
    let state = resolve(
        &root,
        args.state_dir.as_deref().unwrap_or(&file.mesh.state_dir),
    );
    let bin = resolve(&root, args.bin_dir.as_deref().unwrap_or(&file.mesh.bin_dir));
    let prepared = match prepare(&args, &file, &root, &state).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("trellis up: {e:#}");
            return 2;
        }
    };
    if file.postgres.database_prefix.is_none() {
        match state_database_prefix(&state) {
            Ok(prefix) => file.postgres.database_prefix = Some(prefix),
            Err(e) => {
                eprintln!("trellis up: {e:#}");
                return 2;
            }
        }
    }

    let width = prepared
        .plan
        .instances
        .iter()
        .map(|i| i.name.len() + "-proxy".len())
        .chain(["registry".len(), "edge-tls".len()])
        .max()
        .unwrap_or(8);
    let logs = LogSink::stdout(width);
    let supervisor = Supervisor::new(logs.clone(), state.join("logs"), state.join("run"));
    let stop = stop_signal();
    let mut running = Running::default();
    let context = Launch {
        file: &file,
        root: &root,
        state: &state,
        bin: &bin,
        certs: state.join("certs"),
        supervisor: &supervisor,
        logs: &logs,
        ready_timeout: args.ready_timeout,
        private_postgres: args.private_postgres,
        stop: stop.clone(),
        base_env: [
            quiet_logs(),
            traces.as_ref().map(traces::Traces::env).unwrap_or_default(),
            match args.log_format {
                LogFormat::Json => vec![("TRELLIS_LOG_FORMAT".to_owned(), "json".to_owned())],
                LogFormat::Text => Vec::new(),
            },
        ]
        .concat(),
        traces,
    };
    let mut plan = prepared.plan;
    let started = Instant::now();
    let outcome = start(&context, &mut plan, &mut running).await;
    let code = match outcome {
        Ok(server) => {
            supervisor.start_restarting();
            let banner = banner(
                &context,
                &plan,
                server.as_ref(),
                &prepared.api_key,
                started.elapsed(),
            );
            logs.flush().await;
            println!("{banner}");
            let _ = write_run_file(&state, &plan, server.as_ref());
            wait_for_stop(stop).await;
            logs.launcher("stopping the mesh (Ctrl-C again to kill at once)".to_owned());
            0
        }
        Err(StartFailure(message)) => {
            logs.flush().await;
            eprintln!("trellis up: {message}");
            eprintln!("trellis up: stopping what was started");
            1
        }
    };
    let kill_switch = tokio::spawn(kill_on_second_signal(state.join("run"), logs.clone()));
    running.stop(&logs).await;
    kill_switch.abort();
    let _ = std::fs::remove_file(state.join("run").join("up.json"));
    let _ = std::fs::remove_file(state.join("run").join("trellis-up.pid"));
    logs.launcher("stopped; nothing is left running".to_owned());
    logs.flush().await;
    code
}

/// What is decided before any process starts.
struct Prepared {
    plan: Plan,
    api_key: Option<String>,
}

/// Everything that can fail before a process starts: the state directory,
/// an earlier run, the build, ports, certificates, the edge's policy.
async fn prepare(
    args: &UpArgs,
    file: &MeshFile,
    root: &Path,
    state: &Path,
) -> anyhow::Result<Prepared> {
    for dir in ["logs", "run", "certs"] {
        std::fs::create_dir_all(state.join(dir))
            .with_context(|| format!("creating {}", state.join(dir).display()))?;
    }
    claim_state_dir(state)?;
    run_builds(args, file, root)?;
    let plan = Plan::new(file)?;
    let mut workloads = vec!["registry".to_owned(), "edge".to_owned(), "cli".to_owned()];
    if plan.dashboard.is_some() {
        workloads.push("dashboard".to_owned());
    }
    // One identity per service, however many entries (versions) it has.
    workloads.extend(file.service_names().into_iter().map(str::to_owned));
    crate::certs::write_dev_certs(
        &state.join("certs"),
        crate::identity::DEFAULT_TRUST_DOMAIN,
        crate::identity::DEFAULT_NAMESPACE,
        &workloads,
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        90,
    )
    .context("making certificates")?;
    let api_key = if plan.edges.iter().any(|e| e.tls) {
        Some(write_edge_policy(&state.join("edge-policy.toml"))?)
    } else {
        None
    };
    Ok(Prepared { plan, api_key })
}

/// The prefix of the mesh's database names (settled before start-up).
fn database_prefix(file: &MeshFile) -> &str {
    file.postgres
        .database_prefix
        .as_deref()
        .unwrap_or("trellis")
}

/// `trellis_<id>`, the id made once per state directory (`<state>/mesh-id`):
/// the databases of a mesh belong with its archive and certificates.
fn state_database_prefix(state: &Path) -> anyhow::Result<String> {
    let path = state.join("mesh-id");
    let id = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            let id = format!("{:06x}", rand::rng().next_u32() & 0xff_ffff);
            std::fs::write(&path, format!("{id}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        anyhow::bail!(
            "{} holds {id:?}, not a mesh id (six hex digits); remove it to make a new one (and new databases)",
            path.display()
        );
    }
    Ok(format!("trellis_{id}"))
}

/// Refuses a state directory another `trellis up` is running in, and
/// stops what an earlier run that was killed left behind.
fn claim_state_dir(state: &Path) -> anyhow::Result<()> {
    let run = state.join("run");
    let own = run.join("trellis-up.pid");
    if let Some(pid) = read_pid(&own)
        && pid != std::process::id()
        && process_alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "trellis")
    {
        anyhow::bail!(
            "trellis up is already running (pid {pid}) with the state directory {}; stop it first (Ctrl-C in its terminal, or kill -TERM {pid})",
            state.display()
        );
    }
    let mut left = Vec::new();
    for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pid")
            && path != own
            && let Some(pid) = read_pid(&path)
            && process_alive(pid)
        {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            left.push(format!(
                "{} (pid {pid})",
                path.file_stem().unwrap_or_default().to_string_lossy()
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
    if !left.is_empty() {
        eprintln!(
            "trellis up: stopped {} process(es) an earlier run left behind: {}",
            left.len(),
            left.join(", ")
        );
    }
    std::fs::write(&own, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", own.display()))?;
    Ok(())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs the `[[build]]` steps in order, their output straight to the
/// terminal (cargo shows its own progress).
fn run_builds(args: &UpArgs, file: &MeshFile, root: &Path) -> anyhow::Result<()> {
    let skip_all = args.skip_build.iter().any(|s| s == "all");
    for step in &file.build {
        if skip_all || args.skip_build.contains(&step.name) {
            continue;
        }
        let shown = step.command.join(" ");
        eprintln!("==> build {}: {shown}", step.name);
        let started = Instant::now();
        let status = std::process::Command::new(program_path(root, &step.command[0]))
            .args(&step.command[1..])
            .current_dir(root)
            .status()
            .with_context(|| format!("build step {:?} cannot run `{shown}`", step.name))?;
        if !status.success() {
            anyhow::bail!(
                "build step {:?} (`{shown}`) {}; fix it and run trellis up again",
                step.name,
                supervisor::describe(status)
            );
        }
        eprintln!(
            "==> build {}: done in {:.1}s",
            step.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A program named with a relative path is relative to the mesh file's
/// directory; a bare name is looked up on PATH.
fn program_path(root: &Path, program: &str) -> PathBuf {
    let path = Path::new(program);
    if program.contains('/') && path.is_relative() {
        root.join(path)
    } else {
        path.to_owned()
    }
}

/// A fresh API key for the TLS edge each run; only its SHA-256 is written.
fn write_edge_policy(path: &Path) -> anyhow::Result<String> {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let sha: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let policy = format!(
        "# Made by trellis up for this run: Echo is public (rate limited per\n\
         # caller); every other call, and reflection, need the API key it printed.\n\
         reflection = \"required\"\nhealth = \"public\"\n\n\
         [[api_key]]\nname = \"you\"\nsha256 = \"{sha}\"\n\n\
         [[route]]\nmatch = \"trellis.echo.v1.EchoService/Echo\"\nauth = \"public\"\nrate_per_second = 20.0\nburst = 40\n\n\
         [[route]]\nmatch = \"*\"\nauth = \"required\"\n"
    );
    std::fs::write(path, policy).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// What starting needs.
struct Launch<'a> {
    file: &'a MeshFile,
    root: &'a Path,
    state: &'a Path,
    bin: &'a Path,
    certs: PathBuf,
    supervisor: &'a Supervisor,
    logs: &'a LogSink,
    ready_timeout: Duration,
    private_postgres: bool,
    stop: watch::Receiver<bool>,
    /// What every process gets in its environment.
    base_env: Vec<(String, String)>,
    /// Where traces go, if anywhere.
    traces: Option<traces::Traces>,
}

impl Launch<'_> {
    fn identity(&self, name: &str) -> Vec<String> {
        let file = |ext: &str| {
            self.certs
                .join(format!("{name}.{ext}"))
                .display()
                .to_string()
        };
        vec![
            "--cert".to_owned(),
            file("pem"),
            "--key".to_owned(),
            file("key"),
            "--ca".to_owned(),
            self.certs.join("ca.pem").display().to_string(),
        ]
    }

    fn binary(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    fn spec(&self, name: &str, program: String, args: Vec<String>, grace: Duration) -> ProcessSpec {
        ProcessSpec {
            env: self.base_env.clone(),
            name: name.to_owned(),
            hint: format!(
                "is {program} built? (cargo build --release --workspace, or set [mesh] bin_dir in {})",
                self.file.path.display()
            ),
            program,
            args,
            cwd: self.root.to_owned(),
            stop_signal: Signal::SIGTERM,
            grace,
            user: None,
        }
    }
}

/// Starts everything in order; on failure, `running` holds what was started.
async fn start(
    cx: &Launch<'_>,
    plan: &mut Plan,
    running: &mut Running,
) -> Result<Option<postgres::Server>, StartFailure> {
    let server = if cx.file.services.iter().any(|s| s.database) {
        Some(start_postgres(cx, plan, running).await?)
    } else {
        None
    };
    let fail = |e: anyhow::Error| StartFailure(format!("{e:#}"));

    start_traces(cx, running).await?;
    let replicas: Vec<(String, SocketAddr, SocketAddr)> =
        std::iter::once(("registry".to_owned(), plan.registry, plan.registry_admin))
            .chain(
                plan.more_registries
                    .iter()
                    .enumerate()
                    .map(|(i, (listen, admin))| (format!("registry-{}", i + 2), *listen, *admin)),
            )
            .collect();
    let mut registries = Vec::new();
    for (name, listen, admin) in &replicas {
        let store = match &cx.file.registry.store {
            // Replicas share the mesh in etcd and hold nothing themselves.
            Some(store) => vec!["--store".to_owned(), store.get_ref().clone()],
            // Instances, leases and name ownership survive a restart.
            None => vec![
                "--state-dir".to_owned(),
                cx.state.join("registry").display().to_string(),
            ],
        };
        registries.push(
            cx.supervisor.spawn(
                cx.spec(
                    name,
                    cx.binary("trellis-registry"),
                    [
                        vec![
                            "--listen".to_owned(),
                            listen.to_string(),
                            "--admin".to_owned(),
                            admin.to_string(),
                            "--config-dir".to_owned(),
                            resolve(cx.root, &cx.file.mesh.config_dir)
                                .display()
                                .to_string(),
                            "--read-only".to_owned(),
                            "edge,cli,dashboard".to_owned(),
                        ],
                        store,
                        cx.identity("registry"),
                    ]
                    .concat(),
                    Duration::from_secs(7),
                ),
            ),
        );
    }
    cx.logs.launcher(match &cx.file.registry.store {
        Some(store) => format!(
            "starting the registry on {} (store {})",
            plan.registries(),
            store.get_ref()
        ),
        None => format!("starting the registry on {}", plan.registry),
    });
    let stage = running.push(Stage::Plain, registries);
    let admins: Vec<(String, SocketAddr)> = replicas
        .iter()
        .map(|(name, _, admin)| (name.clone(), *admin))
        .collect();
    // Ready: listening, and (with etcd) in step with its store.
    wait_until(cx, stage, "the registry", || {
        let admins = admins.clone();
        async move { all_ready(&admins).await }
    })
    .await?;

    let levels = levels(&cx.file.services);
    for level in levels {
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        let mut admins = Vec::new();
        for &(entry, service) in &level {
            for instance in plan.instances_of_entry(entry) {
                let app = app_spec(cx, service, instance, server.as_ref()).map_err(fail)?;
                apps.push(cx.supervisor.spawn(app));
                sidecars.push(cx.supervisor.spawn(sidecar_spec(
                    cx,
                    service,
                    instance,
                    &plan.registries(),
                )));
                admins.push((instance.name.clone(), instance.admin));
            }
        }
        let names: Vec<String> = level.iter().map(|(_, s)| s.label()).collect();
        cx.logs.launcher(format!(
            "starting {} ({} instance(s), each with its sidecar)",
            names.join(", "),
            admins.len()
        ));
        running.push(Stage::Services, apps);
        running.push(Stage::Sidecars, sidecars);
        wait_ready_admins(cx, running, &admins, &names.join(", ")).await?;
    }

    let mut edges = Vec::new();
    let mut admins = Vec::new();
    for edge in &plan.edges {
        edges.push(cx.supervisor.spawn(edge_spec(cx, edge, &plan.registries())));
        admins.push((edge.name.clone(), edge.admin));
    }
    cx.logs.launcher("starting the edge".to_owned());
    running.push(Stage::Plain, edges);
    wait_ready_admins(cx, running, &admins, "the edge").await?;

    if let Some(listen) = plan.dashboard {
        cx.logs
            .launcher(format!("starting the dashboard on http://{listen}/"));
        let spec = dashboard_spec(cx, plan, listen);
        let stage = running.push(Stage::Plain, vec![cx.supervisor.spawn(spec)]);
        let admins = vec![("dashboard".to_owned(), listen)];
        // Ready: it has read the registry once.
        wait_until(cx, stage, "the dashboard", || {
            let admins = admins.clone();
            async move { all_ready(&admins).await }
        })
        .await?;
    }
    Ok(server)
}

/// Quiet by default: warnings and errors only, unless `RUST_LOG` (which
/// every process then inherits) asks for more.
fn quiet_logs() -> Vec<(String, String)> {
    if std::env::var_os("RUST_LOG").is_some() {
        Vec::new()
    } else {
        vec![("RUST_LOG".to_owned(), "warn".to_owned())]
    }
}

/// Finds PostgreSQL, or starts the private cluster as the first stage.
async fn start_postgres(
    cx: &Launch<'_>,
    plan: &mut Plan,
    running: &mut Running,
) -> Result<postgres::Server, StartFailure> {
    let choice = if cx.private_postgres || cx.file.postgres.private {
        postgres::Choice::Private
    } else {
        match std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| cx.file.postgres.url.clone())
        {
            Some(url) => postgres::Choice::Url(url),
            None => postgres::Choice::Local,
        }
    };
    let file_path = cx.file.path.clone();
    let server = postgres::choose(choice, &cx.state.join("postgres"), || {
        plan.extra_port("a private PostgreSQL", &file_path)
            .map_err(anyhow::Error::from)
    })
    .await
    .map_err(|e| StartFailure(format!("{e:#}")))?;
    match &server {
        postgres::Server::External { url } => {
            cx.logs.launcher(format!("PostgreSQL: {url}"));
        }
        postgres::Server::Private {
            spec, url, data, ..
        } => {
            cx.logs.launcher(format!(
                "PostgreSQL: a private cluster ({}) at {url}",
                data.display()
            ));
            let url = url.clone();
            let stage = running.push(
                Stage::Plain,
                vec![cx.supervisor.spawn(spec.as_ref().clone())],
            );
            wait_until(cx, stage, "PostgreSQL", || {
                let url = url.clone();
                async move {
                    postgres::wait_ready(&url, Duration::from_millis(1))
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
            })
            .await?;
        }
    }
    Ok(server)
}

/// `[[service]]` entries (with their index) grouped by dependency level:
/// a level's entries depend only on earlier levels, so a level starts once
/// the one before is ready. What depends on a service comes after the
/// highest level of its entries: it waits for every version of it.
fn levels(services: &[ServiceSpec]) -> Vec<Vec<(usize, &ServiceSpec)>> {
    let mut level_of: HashMap<&str, usize> = HashMap::new();
    let mut levels: Vec<Vec<(usize, &ServiceSpec)>> = Vec::new();
    // Entries come in dependency order, so every entry of a dependency is
    // placed.
    for (entry, service) in services.iter().enumerate() {
        let level = service
            .depends_on
            .iter()
            .map(|d| level_of.get(d.as_str()).map_or(0, |l| l + 1))
            .max()
            .unwrap_or(0);
        let highest = level_of.entry(&service.name).or_insert(level);
        *highest = (*highest).max(level);
        if levels.len() <= level {
            levels.resize_with(level + 1, Vec::new);
        }
        levels[level].push((entry, service));
    }
    levels
}

fn app_spec(
    cx: &Launch<'_>,
    service: &ServiceSpec,
    instance: &InstancePlan,
    server: Option<&postgres::Server>,
) -> anyhow::Result<ProcessSpec> {
    let values = Placeholders::new(instance, cx.state, cx.bin);
    let at = |what: &str, e: String| {
        anyhow!(
            "{}:{}: service {:?}: {what}: {e}",
            cx.file.path.display(),
            service.line,
            service.name
        )
    };
    let mut command = Vec::with_capacity(service.command.len());
    for part in &service.command {
        command.push(values.expand(part).map_err(|e| at("command", e))?);
    }
    let mut env = cx.base_env.clone();
    env.extend([
        ("TRELLIS_LISTEN".to_owned(), instance.listen.to_string()),
        ("TRELLIS_OUTBOUND".to_owned(), instance.outbound.to_string()),
        ("TRELLIS_INSTANCE".to_owned(), instance.name.clone()),
        ("TRELLIS_SERVICE".to_owned(), service.name.clone()),
    ]);
    if let Some(admin) = instance.metrics {
        env.push(("TRELLIS_ADMIN".to_owned(), admin.to_string()));
    }
    if let (true, Some(server)) = (service.database, server) {
        let name = format!(
            "{}_{}",
            database_prefix(cx.file),
            service.name.replace('-', "_")
        );
        env.push((
            "TRELLIS_DATABASE_URL".to_owned(),
            server.database_url(&name),
        ));
    }
    for (key, value) in &service.env {
        env.push((
            key.clone(),
            values
                .expand(value)
                .map_err(|e| at(&format!("env {key}"), e))?,
        ));
    }
    let program = program_path(cx.root, &command[0]).display().to_string();
    Ok(ProcessSpec {
        name: instance.name.clone(),
        hint: format!(
            "the command of service {:?} on line {} of {} ({}); is it built or installed?",
            service.name,
            service.line,
            cx.file.path.display(),
            command.join(" ")
        ),
        program,
        args: command[1..].to_vec(),
        env,
        cwd: cx.root.to_owned(),
        stop_signal: Signal::SIGTERM,
        grace: Duration::from_secs(15),
        user: None,
    })
}

/// `--flag addr` pairs as arguments.
fn flags(pairs: &[(&str, SocketAddr)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, addr)| [(*flag).to_owned(), addr.to_string()])
        .collect()
}

fn sidecar_spec(
    cx: &Launch<'_>,
    service: &ServiceSpec,
    instance: &InstancePlan,
    registry: &str,
) -> ProcessSpec {
    cx.spec(
        &format!("{}-proxy", instance.name),
        cx.binary("mesh-proxy"),
        sidecar_args(service, instance, registry, cx.identity(&service.name)),
        Duration::from_secs(15),
    )
}

/// An instance's sidecar flags: its addresses, the labels it registers
/// (the instance name, the entry's version and zone), its identity, and
/// last the entry's own `sidecar_args`.
fn sidecar_args(
    service: &ServiceSpec,
    instance: &InstancePlan,
    registry: &str,
    identity: Vec<String>,
) -> Vec<String> {
    let mut args = flags(&[
        ("--app", instance.listen),
        ("--inbound", instance.inbound),
        ("--outbound", instance.outbound),
        ("--admin", instance.admin),
    ]);
    args.extend(["--registry".to_owned(), registry.to_owned()]);
    args.extend([
        "--metadata".to_owned(),
        format!("instance={}", instance.name),
    ]);
    if let Some(version) = &service.version {
        args.extend(["--service-version".to_owned(), version.clone()]);
    }
    if let Some(zone) = &service.zone {
        args.extend(["--zone".to_owned(), zone.clone()]);
    }
    args.extend(identity);
    args.extend(service.sidecar_args.iter().cloned());
    args
}

fn edge_spec(cx: &Launch<'_>, edge: &EdgePlan, registry: &str) -> ProcessSpec {
    let mut args = flags(&[
        ("--edge", edge.listen),
        ("--outbound", edge.outbound),
        ("--admin", edge.admin),
    ]);
    args.extend(["--registry".to_owned(), registry.to_owned()]);
    if edge.tls {
        let file = |name: &str| cx.certs.join(name).display().to_string();
        args.extend([
            "--edge-tls-cert".to_owned(),
            file("edge-server.pem"),
            "--edge-tls-key".to_owned(),
            file("edge-server.key"),
            "--edge-policy".to_owned(),
            cx.state.join("edge-policy.toml").display().to_string(),
        ]);
    }
    args.extend(cx.identity("edge"));
    cx.spec(
        &edge.name,
        cx.binary("mesh-proxy"),
        args,
        Duration::from_secs(15),
    )
}

/// `trellis dashboard`, reading the registry as `dashboard`; its console
/// calls through the TLS edge (where the API key printed in the banner
/// signs in), else the plaintext one.
fn dashboard_spec(cx: &Launch<'_>, plan: &Plan, listen: SocketAddr) -> ProcessSpec {
    let edge = match plan.edges.iter().find(|e| e.tls) {
        Some(tls) => format!("https://{}", tls.listen),
        None => format!("http://{}", plan.edges[0].listen),
    };
    cx.spec(
        "dashboard",
        cx.binary("trellis"),
        vec![
            "dashboard".to_owned(),
            "--listen".to_owned(),
            listen.to_string(),
            "--registry".to_owned(),
            plan.registries(),
            "--certs".to_owned(),
            cx.certs.display().to_string(),
            "--identity".to_owned(),
            "dashboard".to_owned(),
            "--edge".to_owned(),
            edge,
        ],
        Duration::from_secs(5),
    )
}

/// Waits until every admin port in `admins` answers `/ready` with 200.
async fn wait_ready_admins(
    cx: &Launch<'_>,
    running: &Running,
    admins: &[(String, SocketAddr)],
    what: &str,
) -> Result<(), StartFailure> {
    // The processes of the last two stages (the services and their
    // sidecars, or the edges) are the ones that may fail meanwhile.
    let watched: Vec<&Supervised> = running
        .stages
        .iter()
        .rev()
        .take(2)
        .flat_map(|(_, procs)| procs)
        .collect();
    let admins = admins.to_vec();
    wait_until_all(cx, &watched, what, move || {
        let admins = admins.clone();
        async move { all_ready(&admins).await }
    })
    .await
}

/// Whether every process of `admins` (name, admin port) answers `/ready`
/// with 200; if not, what each one that does not says.
async fn all_ready(admins: &[(String, SocketAddr)]) -> Result<(), String> {
    let mut waiting = Vec::new();
    for (name, admin) in admins {
        match http_get(*admin, "/ready").await {
            Some((200, _)) => {}
            Some((_, body)) => waiting.push(format!("{name}: {}", body.trim())),
            None => waiting.push(format!(
                "{name}: its admin port {admin} does not answer yet"
            )),
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(waiting.join("; "))
    }
}

async fn wait_until<F, Fut>(
    cx: &Launch<'_>,
    stage: &[Supervised],
    what: &str,
    probe: F,
) -> Result<(), StartFailure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let watched: Vec<&Supervised> = stage.iter().collect();
    wait_until_all(cx, &watched, what, probe).await
}

/// Starts Jaeger first when `--traces jaeger` asks for it, so that the
/// mesh's first spans have somewhere to go; says where traces go.
async fn start_traces(cx: &Launch<'_>, running: &mut Running) -> Result<(), StartFailure> {
    let Some(traces) = &cx.traces else {
        return Ok(());
    };
    if let traces::Traces::Jaeger { program, otlp, ui } = traces {
        let spec = cx.spec(
            "jaeger",
            program.display().to_string(),
            traces::jaeger_args(*otlp, *ui),
            Duration::from_secs(5),
        );
        cx.logs.launcher(format!(
            "starting Jaeger (OTLP on {otlp}, its UI on http://{ui})"
        ));
        let otlp = *otlp;
        let stage = running.push(Stage::Plain, vec![cx.supervisor.spawn(spec)]);
        wait_until(cx, stage, "Jaeger", || async move {
            tcp_open(otlp)
                .then_some(())
                .ok_or_else(|| format!("nothing listens on {otlp} yet"))
        })
        .await?;
    }
    cx.logs.launcher(format!(
        "exporting traces to {} (OTLP/gRPC)",
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|_| traces.endpoint())
    ));
    Ok(())
}

/// A port on 127.0.0.1 free now.
fn any_free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// Polls `probe` until it succeeds; fails at once if a watched process
/// exits or cannot start, or Ctrl-C arrives, and after the ready timeout.
async fn wait_until_all<F, Fut>(
    cx: &Launch<'_>,
    watched: &[&Supervised],
    what: &str,
    probe: F,
) -> Result<(), StartFailure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let mut last;
    loop {
        for p in watched {
            match p.state() {
                State::FailedToStart { reason } => {
                    return Err(StartFailure(format!(
                        "{}: {reason}\n  check: {}",
                        p.spec.name, p.spec.hint
                    )));
                }
                State::Exited { status } | State::GaveUp { status } => {
                    return Err(StartFailure(format!(
                        "{} {status} while {what} was starting. Its last lines ({}):\n{}\n  check: {}",
                        p.spec.name,
                        cx.state
                            .join("logs")
                            .join(format!("{}.log", p.spec.name))
                            .display(),
                        indent(&p.tail()),
                        p.spec.hint
                    )));
                }
                _ => {}
            }
        }
        if *cx.stop.borrow() {
            return Err(StartFailure("interrupted while starting".to_owned()));
        }
        match probe().await {
            Ok(()) => {
                cx.logs.launcher(format!(
                    "{what}: ready in {:.1}s",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            Err(why) => last = why,
        }
        if started.elapsed() > cx.ready_timeout {
            let tails: Vec<String> = watched
                .iter()
                .map(|p| format!("  {}:\n{}", p.spec.name, indent(&p.tail())))
                .collect();
            return Err(StartFailure(format!(
                "{what} was not ready within {}: {last}\nlast lines:\n{}\n  logs: {}",
                humantime::format_duration(cx.ready_timeout),
                tails.join("\n"),
                cx.state.join("logs").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn tcp_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// A plain HTTP/1.0 GET on loopback: the status and body, or `None` if
/// nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response).ok()?;
        let text = String::from_utf8_lossy(&response);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    })
    .await
    .ok()
    .flatten()
}

/// A watch that turns true on SIGINT or SIGTERM. (Once tokio handles a
/// signal its default action never returns, so a second Ctrl-C is left
/// to `kill_on_second_signal`.)
fn stop_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        let _ = tx.send(true);
    });
    rx
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// While stopping, a second Ctrl-C kills every process at once.
async fn kill_on_second_signal(run: PathBuf, logs: LogSink) {
    crate::server::shutdown_signal().await;
    logs.launcher("killing every process now".to_owned());
    for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pid")
            && path.file_stem().is_some_and(|s| s != "trellis-up")
            && let Some(pid) = read_pid(&path)
        {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// `<state>/run/up.json`: the running mesh's addresses, for `trellis
/// status` and scripts.
fn write_run_file(
    state: &Path,
    plan: &Plan,
    server: Option<&postgres::Server>,
) -> std::io::Result<()> {
    let instances: Vec<serde_json::Value> = plan.instances.iter().map(run_file_instance).collect();
    let edges: Vec<serde_json::Value> = plan
        .edges
        .iter()
        .map(|e| serde_json::json!({"name": e.name, "listen": e.listen.to_string(), "admin": e.admin.to_string(), "tls": e.tls}))
        .collect();
    let doc = serde_json::json!({
        "pid": std::process::id(),
        "registry": plan.registry.to_string(),
        "registry_admin": plan.registry_admin.to_string(),
        "registries": plan.registries(),
        "certs": state.join("certs").display().to_string(),
        "postgres": server.map(|s| s.url()),
        "instances": instances,
        "edges": edges,
        "dashboard": plan.dashboard.map(|d| format!("http://{d}/")),
    });
    let path = state.join("run").join("up.json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

/// One instance in `up.json`; `version` and `zone` are null when unset.
fn run_file_instance(i: &InstancePlan) -> serde_json::Value {
    serde_json::json!({
        "service": i.service, "instance": i.name, "version": i.version, "zone": i.zone,
        "listen": i.listen.to_string(), "inbound": i.inbound.to_string(),
        "outbound": i.outbound.to_string(), "admin": i.admin.to_string(),
        "metrics": i.metrics.map(|a| a.to_string()),
    })
}

/// What to print once the mesh is up: the edge on a line of its own, then
/// commands to paste.
fn banner(
    cx: &Launch<'_>,
    plan: &Plan,
    server: Option<&postgres::Server>,
    api_key: &Option<String>,
    took: Duration,
) -> String {
    let edge = &plan.edges[0];
    let e = format!("http://{}", edge.listen);
    let certs = cx.certs.display();
    let services = cx.file.service_names().len();
    let mut out = format!(
        "\nThe mesh is up ({} instances of {services} services, each with its sidecar) in {:.0}s.\n\n\
         edge: {}\n",
        plan.instances.len(),
        took.as_secs_f64(),
        edge.listen
    );
    if let (Some(tls), Some(key)) = (plan.edges.iter().find(|e| e.tls), api_key) {
        out.push_str(&format!(
            "edge (TLS): {}  (API key {key}; CA {certs}/ca.pem)\n",
            tls.listen
        ));
    }
    if let Some(dashboard) = plan.dashboard {
        let sign_in = if api_key.is_some() {
            "  (its console signs in with the TLS edge's API key)"
        } else {
            ""
        };
        out.push_str(&format!("dashboard: http://{dashboard}/{sign_in}\n"));
    }
    out.push_str(&format!(
        "registry: {} (mTLS; certificates in {certs})  metrics http://{}/metrics\n",
        plan.registry, plan.registry_admin
    ));
    for (listen, admin) in &plan.more_registries {
        out.push_str(&format!(
            "registry replica: {listen}  metrics http://{admin}/metrics\n"
        ));
    }
    out.push_str(&format!(
        "proxyless gRPC clients (xDS, no sidecar; see README): {} certs --dir {certs} --workload <client> --xds-bootstrap {}\n  \
         then GRPC_XDS_BOOTSTRAP={certs}/<client>.xds.json and the target xds:///<service>\n",
        trellis_command(cx.root),
        plan.registry
    ));
    if let Some(store) = &cx.file.registry.store {
        out.push_str(&format!("registry store: {}\n", store.get_ref()));
    }
    if let Some(server) = server {
        let names: Vec<String> = databases(cx.file).map(|(_, database)| database).collect();
        out.push_str(&format!(
            "databases: {} on {} (they belong to {}: remove both to start afresh)\n",
            names.join(", "),
            server.url(),
            cx.state.display()
        ));
    }
    out.push_str(&format!(
        "logs: {}/<process>.log\n",
        cx.state.join("logs").display()
    ));
    out.push_str("instances:\n");
    out.push_str(&instance_lines(plan));
    let host = edge.listen.to_string();
    let status_flags = status_flags(cx, plan);
    let trellis = trellis_command(cx.root);
    out.push_str(&format!(
        "\nWhat is running, from the registry, and its calls live (rates, success, latency):\n  {trellis} status{status_flags}\n  {trellis} top{status_flags}\n\n\
         Through the edge, with no .proto files (reflection for the whole mesh):\n\
         \x20 grpcurl -plaintext {host} list\n\
         \x20 grpcurl -plaintext {host} describe <service>\n\
         \x20 buf curl --protocol grpc --http2-prior-knowledge --list-services {e}\n\
         \x20 buf curl --protocol grpc --http2-prior-knowledge -d '<JSON>' {e}/<package.Service>/<Method>\n\
         JSON over HTTP/1.1:\n\
         \x20 curl -s -X POST -H 'content-type: application/json' -d '<JSON>' {e}/<package.Service>/<Method>\n"
    ));
    if let Some(text) = &cx.file.banner {
        out.push('\n');
        out.push_str(&banner_text(text, cx, plan, server));
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    if let (Some(tls), Some(key)) = (plan.edges.iter().find(|e| e.tls), api_key) {
        let port = tls.listen.port();
        out.push_str(&format!(
            "\nOver TLS, with the API key (reflection needs it too):\n\
             \x20 grpcurl -cacert {certs}/ca.pem -H 'x-api-key: {key}' -reflect-header 'x-api-key: {key}' localhost:{port} list\n\
             \x20 buf curl --protocol grpc --cacert {certs}/ca.pem -H 'x-api-key: {key}' --reflect-header 'x-api-key: {key}' -d '{{}}' https://localhost:{port}/telco.user.v1.UserService/ListPlans\n"
        ));
    }
    out.push_str("\nCtrl-C stops everything.\n");
    out
}

/// The instance list of the banner, a line each: its name, version and
/// zone (when the mesh has any), and its addresses.
fn instance_lines(plan: &Plan) -> String {
    let labels: Vec<String> = plan
        .instances
        .iter()
        .map(|i| {
            let mut label = Vec::new();
            if let Some(version) = &i.version {
                label.push(format!("version {version}"));
            }
            if let Some(zone) = &i.zone {
                label.push(format!("zone {zone}"));
            }
            label.join(", ")
        })
        .collect();
    let name_width = plan
        .instances
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0)
        .max(14);
    let label_width = labels.iter().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (i, label) in plan.instances.iter().zip(&labels) {
        let label = if label_width == 0 {
            String::new()
        } else {
            format!("{label:<label_width$}  ")
        };
        out.push_str(&format!(
            "  {:<name_width$} {label}service {}  sidecar inbound {}  outbound {}  admin http://{}",
            i.name, i.listen, i.inbound, i.outbound, i.admin
        ));
        if let Some(metrics) = i.metrics {
            out.push_str(&format!("  metrics http://{metrics}/metrics"));
        }
        out.push('\n');
    }
    out
}

/// Each service with a database, once however many entries it has, and
/// the database's name.
fn databases<'a>(file: &'a MeshFile) -> impl Iterator<Item = (&'a str, String)> + 'a {
    file.service_names()
        .into_iter()
        .filter(|name| file.service(name).is_some_and(|s| s.database))
        .map(|name| {
            (
                name,
                format!("{}_{}", database_prefix(file), name.replace('-', "_")),
            )
        })
}

/// How to run this `trellis` binary from the mesh file's directory:
/// `target/release/trellis`, or its full path.
fn trellis_command(root: &Path) -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "trellis".to_owned();
    };
    // A binary rebuilt while it runs shows as "path (deleted)".
    let exe = PathBuf::from(
        exe.display()
            .to_string()
            .trim_end_matches(" (deleted)")
            .to_owned(),
    );
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    match exe.strip_prefix(&root) {
        Ok(relative) => relative.display().to_string(),
        Err(_) => exe.display().to_string(),
    }
}

/// The mesh file's `[banner] text` with `${edge}`, `${edge_url}`,
/// `${edge_tls}`, `${state}`, `${certs}`, `${bin}` and `${database:<service>}`
/// filled in (the `$` keeps JSON's braces out of the way).
fn banner_text(
    text: &str,
    cx: &Launch<'_>,
    plan: &Plan,
    server: Option<&postgres::Server>,
) -> String {
    let edge = plan.edges[0].listen;
    let mut out = text
        .replace("${edge_url}", &format!("http://{edge}"))
        .replace("${edge}", &edge.to_string())
        .replace("${state}", &cx.state.display().to_string())
        .replace("${certs}", &cx.certs.display().to_string())
        .replace("${bin}", &cx.bin.display().to_string());
    if let Some(tls) = plan.edges.iter().find(|e| e.tls) {
        out = out.replace("${edge_tls}", &tls.listen.to_string());
    }
    if let Some(server) = server {
        for (service, database) in databases(cx.file) {
            out = out.replace(
                &format!("${{database:{service}}}"),
                &server.database_url(&database),
            );
        }
    }
    out
}

/// The flags `trellis status` needs when this mesh is not on the defaults.
fn status_flags(cx: &Launch<'_>, plan: &Plan) -> String {
    let mut flags = String::new();
    if plan.registry != SocketAddr::from(([127, 0, 0, 1], 7000)) || !plan.more_registries.is_empty()
    {
        flags.push_str(&format!(" --registry {}", plan.registries()));
    }
    let default_certs = cx.root.join(".trellis").join("certs");
    if cx.certs != default_certs {
        flags.push_str(&format!(" --certs {}", cx.certs.display()));
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(text: &str) -> MeshFile {
        let mut file = MeshFile::parse(Path::new("trellis.toml"), text).unwrap();
        file.use_any_free_ports();
        file
    }

    /// echo in two versions (v1 in zone a), and a client of echo listed
    /// between them.
    const CANARY: &str = "[[service]]\nname = \"echo\"\nversion = \"v1\"\nzone = \"a\"\ninstances = 2\ncommand = [\"x\"]\n\
        [[service]]\nname = \"client\"\ncommand = [\"x\"]\ndepends_on = [\"echo\"]\n\
        [[service]]\nname = \"echo\"\nversion = \"v2\"\ncommand = [\"y\"]\nsidecar_args = [\"--grpc-services\", \"a.B\"]\n";

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].as_str())
    }

    #[test]
    fn registry_replicas_take_ports_last_and_every_proxy_is_given_them_all() {
        let service = "[[service]]\nname = \"echo\"\ncommand = [\"x\"]\n";
        let one =
            Plan::unchecked(&MeshFile::parse(Path::new("trellis.toml"), service).unwrap()).unwrap();
        let text =
            format!("[registry]\nstore = \"etcd://127.0.0.1:2379\"\nreplicas = 3\n{service}");
        let file = MeshFile::parse(Path::new("trellis.toml"), &text).unwrap();
        let three = Plan::unchecked(&file).unwrap();
        // The other addresses stay where one replica had them.
        assert_eq!(three.registry, one.registry);
        assert_eq!(three.registry_admin, one.registry_admin);
        assert_eq!(three.instances[0].listen, one.instances[0].listen);
        assert_eq!(three.edges[0].admin, one.edges[0].admin);
        assert_eq!(three.more_registries.len(), 2);
        let all = three.registries();
        assert_eq!(all.split(',').count(), 3, "{all}");
        let args = sidecar_args(&file.services[0], &three.instances[0], &all, Vec::new());
        assert_eq!(flag(&args, "--registry"), Some(all.as_str()));
    }

    #[test]
    fn sidecars_register_their_entrys_version_and_zone() {
        let file = mesh(CANARY);
        let plan = Plan::new(&file).unwrap();
        let identity = vec!["--cert".to_owned(), "echo.pem".to_owned()];
        let args_of = |name: &str| {
            let instance = plan.instances.iter().find(|i| i.name == name).unwrap();
            let service = &file.services[instance.entry];
            sidecar_args(
                service,
                instance,
                &plan.registry.to_string(),
                identity.clone(),
            )
        };

        let v1 = args_of("echo-v1-2");
        assert_eq!(flag(&v1, "--service-version"), Some("v1"));
        assert_eq!(flag(&v1, "--zone"), Some("a"));
        assert_eq!(flag(&v1, "--metadata"), Some("instance=echo-v1-2"));
        assert_eq!(flag(&v1, "--cert"), Some("echo.pem"));

        let v2 = args_of("echo-v2");
        assert_eq!(flag(&v2, "--service-version"), Some("v2"));
        assert_eq!(flag(&v2, "--zone"), None);
        // The entry's own sidecar_args stay last.
        assert!(v2.ends_with(&["--grpc-services".to_owned(), "a.B".to_owned()]));

        let client = args_of("client");
        assert!(
            !client
                .iter()
                .any(|a| a == "--service-version" || a == "--zone"),
            "{client:?}"
        );
    }

    #[test]
    fn a_dependent_starts_after_every_version_of_what_it_depends_on() {
        let file = mesh(CANARY);
        let labels: Vec<Vec<String>> = levels(&file.services)
            .into_iter()
            .map(|level| level.into_iter().map(|(_, s)| s.label()).collect())
            .collect();
        assert_eq!(labels, [vec!["echo v1", "echo v2"], vec!["client"]]);

        // v2 waits for user; client, depending on echo, waits for v2.
        let file = mesh(
            "[[service]]\nname = \"user\"\ncommand = [\"x\"]\n\
             [[service]]\nname = \"echo\"\nversion = \"v1\"\ncommand = [\"x\"]\n\
             [[service]]\nname = \"echo\"\nversion = \"v2\"\ncommand = [\"x\"]\ndepends_on = [\"user\"]\n\
             [[service]]\nname = \"client\"\ncommand = [\"x\"]\ndepends_on = [\"echo\"]\n",
        );
        let labels: Vec<Vec<String>> = levels(&file.services)
            .into_iter()
            .map(|level| level.into_iter().map(|(_, s)| s.label()).collect())
            .collect();
        assert_eq!(
            labels,
            [vec!["user", "echo v1"], vec!["echo v2"], vec!["client"]]
        );
    }

    #[test]
    fn the_instance_list_and_run_file_show_versions_and_zones() {
        let file = mesh(CANARY);
        let plan = Plan::new(&file).unwrap();
        let lines = instance_lines(&plan);
        let line = |name: &str| {
            lines
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {lines}"))
                .to_owned()
        };
        assert!(line("echo-v1-1").contains(" version v1, zone a  service 127.0.0.1:"));
        assert!(line("echo-v2").contains(" version v2  "));
        assert!(!line("client").contains("version"));
        // The columns line up.
        let at = |l: String| l.find(" service 127.").unwrap();
        assert_eq!(at(line("echo-v2")), at(line("echo-v1-1")));
        assert_eq!(at(line("client")), at(line("echo-v1-1")));

        let v1 = plan
            .instances
            .iter()
            .find(|i| i.name == "echo-v1-1")
            .unwrap();
        let json = run_file_instance(v1);
        assert_eq!(json["service"], "echo");
        assert_eq!(json["version"], "v1");
        assert_eq!(json["zone"], "a");
        let client = plan.instances.iter().find(|i| i.name == "client").unwrap();
        assert!(run_file_instance(client)["version"].is_null());

        // Without versions, the list is as it was.
        let plain = Plan::new(&mesh("[[service]]\nname = \"a\"\ncommand = [\"x\"]\n")).unwrap();
        let i = &plain.instances[0];
        assert_eq!(
            instance_lines(&plain),
            format!(
                "  a              service {}  sidecar inbound {}  outbound {}  admin http://{}\n",
                i.listen, i.inbound, i.outbound, i.admin
            )
        );
        assert!(run_file_instance(i)["metrics"].is_null());

        // A service with its own admin port shows it, in both.
        let with = Plan::new(&mesh(
            "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nmetrics = true\n",
        ))
        .unwrap();
        let i = &with.instances[0];
        let metrics = i.metrics.expect("metrics = true gives an admin port");
        assert!(
            instance_lines(&with).ends_with(&format!(
                "admin http://{}  metrics http://{metrics}/metrics\n",
                i.admin
            )),
            "{}",
            instance_lines(&with)
        );
        assert_eq!(run_file_instance(i)["metrics"], metrics.to_string());
    }

    #[test]
    fn a_service_in_two_versions_has_one_database() {
        let file = mesh(
            "[postgres]\ndatabase_prefix = \"t\"\n\
             [[service]]\nname = \"bill-ing\"\nversion = \"v1\"\ncommand = [\"x\"]\ndatabase = true\n\
             [[service]]\nname = \"bill-ing\"\nversion = \"v2\"\ncommand = [\"x\"]\ndatabase = true\n\
             [[service]]\nname = \"echo\"\ncommand = [\"x\"]\n",
        );
        let all: Vec<(&str, String)> = databases(&file).collect();
        assert_eq!(all, [("bill-ing", "t_bill_ing".to_owned())]);
        assert_eq!(file.service_names(), ["bill-ing", "echo"]);
    }
}
