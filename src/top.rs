//! `trellis top`: the mesh's traffic, live, per gRPC service and method:
//! calls per second, success rate, p50 and p99 latency.
//!
//! The instances come from the registry (the listing `trellis status`
//! uses); each sidecar registers the address of its admin port under the
//! metadata key [`ADMIN_METADATA_KEY`], and `trellis top` reads its
//! `/metrics` there (plain HTTP/1.1, all instances at once, each within
//! [`SCRAPE_TIMEOUT`]). Rates are the difference between two readings an
//! interval apart, of the inbound side of each sidecar: every call a
//! service receives, from whichever caller. An instance whose metrics
//! cannot be read is named as such, never counted as idle.

pub mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::mesh_status::{Listing, RegistryAccess, RegistryArgs, RegistryReader};
use crate::pb::trellis::registry::v1 as registry_pb;
use stats::{Counters, Scrape};

/// The instance metadata key under which a sidecar registers its admin
/// address (`host:port`, HTTP/1.1: `/metrics`, `/live`, `/ready`).
pub const ADMIN_METADATA_KEY: &str = "trellis.admin";

const PROGRAM: &str = "trellis top";
/// How long reading one instance's `/metrics` may take, connecting
/// included.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most instances read per refresh; the rest are counted, not read.
pub const MAX_INSTANCES: usize = 256;
/// Largest `/metrics` body read from one instance.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// Longest status or header line of an admin port's answer.
const MAX_HEADER_LINE: usize = 8 * 1024;
/// Most header lines in an admin port's answer.
const MAX_HEADERS: usize = 64;
/// The interval's bounds: shorter is mostly noise, longer is not "live".
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Flags of `trellis top`.
#[derive(Clone, Debug, clap::Args)]
pub struct TopArgs {
    /// The registry and the identity to ask it with.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print one table, over one interval, and exit.
    #[arg(long)]
    pub once: bool,
    /// Time between two readings, over which rates are measured.
    #[arg(long, default_value = "2s", value_parser = parse_interval, value_name = "DURATION")]
    pub interval: Duration,
    /// Only this mesh service (`usage`) or gRPC service
    /// (`telco.usage.v1.UsageService`).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// With --once: print JSON instead of a table.
    #[arg(long, requires = "once")]
    pub json: bool,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = crate::cli::parse_duration(text)?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err(format!(
            "{text:?}: the interval must be between 100ms and 1h"
        ));
    }
    Ok(d)
}

/// What `trellis top` needs.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// The registry and how to call it.
    pub access: RegistryAccess,
    /// One table, then exit.
    pub once: bool,
    /// Time between two readings.
    pub interval: Duration,
    /// A mesh service or gRPC service to show alone.
    pub service: Option<String>,
    /// JSON instead of a table (with `once`).
    pub json: bool,
    /// Redraw in place (ANSI) rather than print a table per refresh; for
    /// a terminal.
    pub redraw: bool,
}

impl TopArgs {
    /// The options these flags stand for; `redraw` when stdout is a
    /// terminal.
    pub fn options(&self) -> TopOptions {
        TopOptions {
            access: self.registry.access(),
            once: self.once,
            interval: self.interval,
            service: self.service.clone(),
            json: self.json,
            redraw: std::io::stdout().is_terminal(),
        }
    }
}

/// Runs `trellis top` on a runtime of its own, printing to stdout and
/// errors to stderr. Returns the exit status: 0 after a table (or
/// Ctrl-C), 1 when `--service` matches no registered instance, 2 on an
/// error (bad identity, registry unreachable).
pub fn main(args: TopArgs) -> i32 {
    crate::cli::on_runtime(PROGRAM, command(args))
}

/// [`main`] for a caller already on a Tokio runtime.
pub async fn command(args: TopArgs) -> i32 {
    match run(args.options(), &mut std::io::stdout()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{PROGRAM}: {e:#}");
            2
        }
    }
}

/// Shows the mesh's traffic on `out`: one table after one interval with
/// `once`, otherwise a refresh per interval until Ctrl-C. Returns the exit
/// status (see [`main`]); an error when the registry cannot be asked.
pub async fn run(options: TopOptions, out: &mut impl Write) -> anyhow::Result<i32> {
    let mut reader = RegistryReader::connect(&options.access)?;
    let listing = reader.instances().await?;
    let targets = Targets::select(&listing, options.service.as_deref());
    if let Some(name) = &options.service
        && targets.scraped.is_empty()
        && targets.not_serving == 0
    {
        let mut services: Vec<&str> = listing
            .instances
            .iter()
            .map(|i| i.service.as_str())
            .collect();
        services.dedup();
        eprintln!(
            "{PROGRAM}: no registered instance serves {name:?} (give a mesh service such as {} or one of their gRPC services)",
            if services.is_empty() {
                "`usage`; nothing is registered".to_owned()
            } else {
                services.join(", ")
            }
        );
        return Ok(1);
    }
    let style = Style {
        registry: reader.addr(),
        caller: reader.caller().to_string(),
        interval: options.interval,
        live: !options.once,
    };
    if options.once {
        let first = read_all(&targets).await;
        tokio::time::sleep(options.interval).await;
        let second = read_all(&targets).await;
        let view = View::build(&targets, &first, &second, false, None);
        let text = if options.json {
            serde_json::to_string_pretty(&style.json(&view))? + "\n"
        } else {
            style.text(&view)
        };
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(0);
    }
    // Installed before the first drawing, so a Ctrl-C right after it
    // stops us cleanly rather than killing the process.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        followed = follow(&mut reader, &options, &style, targets, out) => followed?,
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(0)
}

/// Refreshes every interval until the caller stops polling (Ctrl-C).
async fn follow(
    reader: &mut RegistryReader,
    options: &TopOptions,
    style: &Style,
    mut targets: Targets,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut screen = Screen {
        redraw: options.redraw,
        shown: false,
    };
    let mut previous = read_all(&targets).await;
    let view = View::build(&targets, &HashMap::new(), &previous, true, None);
    screen.draw(out, &style.text(&view))?;
    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // A registry that cannot be asked leaves the last instances to
        // read, and says so.
        let error = match reader.instances().await {
            Ok(listing) => {
                targets = Targets::select(&listing, options.service.as_deref());
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let current = read_all(&targets).await;
        let view = View::build(&targets, &previous, &current, true, error);
        // The replica that answered last (another, after a failover).
        let style = Style {
            registry: reader.addr(),
            ..style.clone()
        };
        screen.draw(out, &style.text(&view))?;
        previous = current;
    }
}

/// Where live tables go: redrawn in place on a terminal, one after the
/// other otherwise.
struct Screen {
    redraw: bool,
    shown: bool,
}

impl Screen {
    fn draw(&mut self, out: &mut impl Write, body: &str) -> std::io::Result<()> {
        let text = if self.redraw {
            // Home, draw over the old lines clearing each one's rest, then
            // clear whatever the old drawing had below.
            let mut screen = String::from(if self.shown {
                "\x1b[H"
            } else {
                "\x1b[H\x1b[2J"
            });
            for line in body.lines() {
                screen.push_str(line);
                screen.push_str("\x1b[K\n");
            }
            screen.push_str("\x1b[J");
            screen
        } else if self.shown {
            format!("\n{body}")
        } else {
            body.to_owned()
        };
        self.shown = true;
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

/// An instance to read.
#[derive(Debug, Clone)]
struct Target {
    service: String,
    instance_id: String,
    address: String,
    grpc_services: Vec<String>,
    /// Its admin address, or why there is none.
    admin: Result<String, String>,
}

/// The instances one refresh reads, and those it leaves out.
#[derive(Debug, Clone, Default)]
struct Targets {
    scraped: Vec<Target>,
    /// Registered but not SERVING: not read.
    not_serving: usize,
    /// Serving beyond [`MAX_INSTANCES`]: not read.
    over_limit: usize,
    /// With `--service` naming a gRPC service: only its rows.
    grpc_filter: Option<String>,
}

impl Targets {
    /// The serving instances of `listing` (of mesh service or gRPC service
    /// `filter` when given), at most [`MAX_INSTANCES`].
    fn select(listing: &Listing, filter: Option<&str>) -> Self {
        let mesh_filter =
            filter.filter(|name| listing.instances.iter().any(|i| i.service == *name));
        let grpc_filter = filter.filter(|_| mesh_filter.is_none());
        let mut targets = Targets {
            grpc_filter: grpc_filter.map(str::to_owned),
            ..Default::default()
        };
        let matching = listing
            .instances
            .iter()
            .filter(|i| match (mesh_filter, grpc_filter) {
                (Some(name), _) => i.service == name,
                (_, Some(name)) => i.grpc_services.iter().any(|g| g == name),
                _ => true,
            });
        for i in matching {
            if i.health() != registry_pb::ServingStatus::Serving {
                targets.not_serving += 1;
            } else if targets.scraped.len() >= MAX_INSTANCES {
                targets.over_limit += 1;
            } else {
                targets.scraped.push(Target::of(i));
            }
        }
        targets
    }
}

impl Target {
    fn of(i: &registry_pb::Instance) -> Self {
        let admin = match i.metadata.get(ADMIN_METADATA_KEY) {
            Some(a) if !a.is_empty() => Ok(a.clone()),
            _ => Err(format!(
                "no {ADMIN_METADATA_KEY} in its registration (a sidecar older than this trellis?)"
            )),
        };
        Self {
            service: i.service.clone(),
            instance_id: i.instance_id.clone(),
            address: i.address.clone(),
            grpc_services: i.grpc_services.clone(),
            admin,
        }
    }
}

/// One instance's counters at one moment, or why they could not be read.
type Reading = Result<(Instant, Scrape), String>;

/// Reads every target's metrics at once, by instance ID.
async fn read_all(targets: &Targets) -> HashMap<String, Reading> {
    let reads = targets.scraped.iter().map(|t| async move {
        let reading = match &t.admin {
            Ok(admin) => read(admin).await.map(|scrape| (Instant::now(), scrape)),
            Err(why) => Err(why.clone()),
        };
        (t.instance_id.clone(), reading)
    });
    futures::future::join_all(reads).await.into_iter().collect()
}

/// One instance's inbound counters, from its admin port at `admin`.
async fn read(admin: &str) -> Result<Scrape, String> {
    let text = read_text(admin).await?;
    stats::parse(&text).map_err(|e| format!("{admin}/metrics: {e}"))
}

/// One instance's `/metrics` text, from its admin port at `admin`, within
/// [`SCRAPE_TIMEOUT`]; the error names the address.
pub(crate) async fn read_text(admin: &str) -> Result<String, String> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, http_get(admin, "/metrics"))
        .await
        .map_err(|_| {
            format!(
                "{admin}/metrics did not answer within {}",
                humantime::format_duration(SCRAPE_TIMEOUT)
            )
        })?
        .map_err(|e| format!("{admin}/metrics: {e}"))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A plain HTTP/1.1 GET of `path` at `addr` (`host:port`): the body of a
/// 200 answer, at most [`MAX_BODY`] bytes.
async fn http_get(addr: &str, path: &str) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut io = BufReader::new(tcp);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    io.get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;

    let status_line = read_line(&mut io).await?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", truncate(&status_line)))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for n in 0.. {
        let line = read_line(&mut io).await?;
        if line.is_empty() {
            break;
        }
        if n >= MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} header lines"));
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    if status != 200 {
        return Err(format!(
            "HTTP {status} (is this address a mesh-proxy admin port?)"
        ));
    }
    let too_large = || {
        format!(
            "the metrics are over {} MiB, more than trellis top reads",
            MAX_BODY / (1024 * 1024)
        )
    };
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(&mut io).await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size {:?}", truncate(size)))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(too_large());
            }
            let start = body.len();
            body.resize(start + size, 0);
            io.read_exact(&mut body[start..])
                .await
                .map_err(|e| format!("reading the body: {e}"))?;
            read_line(&mut io).await?;
        }
    } else if let Some(length) = length {
        if length > MAX_BODY {
            return Err(too_large());
        }
        body.resize(length, 0);
        io.read_exact(&mut body)
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
    } else {
        (&mut io)
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        if body.len() > MAX_BODY {
            return Err(too_large());
        }
    }
    Ok(body)
}

/// One line of an HTTP head, without its line end; at most
/// [`MAX_HEADER_LINE`] bytes.
async fn read_line(io: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = Vec::new();
    io.take(MAX_HEADER_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= MAX_HEADER_LINE {
            format!("a header line is over {MAX_HEADER_LINE} bytes")
        } else {
            "the connection closed mid-answer".to_owned()
        });
    }
    let line = String::from_utf8_lossy(&line);
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn truncate(text: &str) -> String {
    text.chars().take(60).collect()
}

/// What one gRPC service (or one of its methods) did over the interval.
#[derive(Debug, Clone, Default)]
struct Traffic {
    counters: Counters,
    /// Calls per second, summed over the instances.
    rps: f64,
}

impl Traffic {
    fn add(&mut self, counters: &Counters, seconds: f64) {
        self.counters.add(counters);
        if seconds > 0.0 {
            self.rps += counters.calls() / seconds;
        }
    }
}

/// One gRPC service's row and its methods'.
#[derive(Debug, Clone, Default)]
struct ServiceRow {
    total: Traffic,
    methods: BTreeMap<String, Traffic>,
    /// Instances that serve it (by registration or by their metrics).
    known: BTreeSet<String>,
    /// Those of them read twice: the rates are theirs.
    reporting: BTreeSet<String>,
    /// Those of them read once so far.
    waiting: BTreeSet<String>,
}

/// How an instance's reading went.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Read twice: its traffic is in the table.
    Read,
    /// Read once so far; its rates come with the next refresh.
    Waiting,
    /// Its metrics could not be read, and why.
    Unreadable(String),
}

/// One refresh's table.
#[derive(Debug, Clone)]
struct View {
    /// By gRPC service.
    services: BTreeMap<String, ServiceRow>,
    /// Each target and how its reading went.
    instances: Vec<(Target, Outcome)>,
    not_serving: usize,
    over_limit: usize,
    /// Why the registry could not be asked this time, if it could not.
    error: Option<String>,
}

impl View {
    /// The traffic between the readings `before` and `after` of `targets`;
    /// `refreshing` when another reading follows (an instance read only
    /// now is then waiting for it, rather than unreadable).
    fn build(
        targets: &Targets,
        before: &HashMap<String, Reading>,
        after: &HashMap<String, Reading>,
        refreshing: bool,
        error: Option<String>,
    ) -> Self {
        let mut services: BTreeMap<String, ServiceRow> = BTreeMap::new();
        let shown = |g: &str| targets.grpc_filter.as_deref().is_none_or(|f| f == g);
        let mut instances = Vec::new();
        for t in &targets.scraped {
            for g in t.grpc_services.iter().filter(|g| shown(g)) {
                services
                    .entry(g.clone())
                    .or_default()
                    .known
                    .insert(t.instance_id.clone());
            }
            let outcome = match (before.get(&t.instance_id), after.get(&t.instance_id)) {
                (_, Some(Err(why))) => Outcome::Unreadable(why.clone()),
                // Read now, but not before: once more to go, or never.
                (Some(Err(why)), _) if !refreshing => Outcome::Unreadable(why.clone()),
                (Some(Ok((then, earlier))), Some(Ok((now, later)))) => {
                    let seconds = now.duration_since(*then).as_secs_f64();
                    let calls = stats::delta(earlier, later);
                    for g in t.grpc_services.iter().filter(|g| shown(g)) {
                        if let Some(row) = services.get_mut(g) {
                            row.reporting.insert(t.instance_id.clone());
                        }
                    }
                    for (m, counters) in calls.iter().filter(|(m, _)| shown(&m.service)) {
                        let row = services.entry(m.service.clone()).or_default();
                        row.known.insert(t.instance_id.clone());
                        row.reporting.insert(t.instance_id.clone());
                        row.total.add(counters, seconds);
                        row.methods
                            .entry(m.method.clone())
                            .or_default()
                            .add(counters, seconds);
                    }
                    Outcome::Read
                }
                _ => {
                    for g in t.grpc_services.iter().filter(|g| shown(g)) {
                        if let Some(row) = services.get_mut(g) {
                            row.waiting.insert(t.instance_id.clone());
                        }
                    }
                    Outcome::Waiting
                }
            };
            instances.push((t.clone(), outcome));
        }
        Self {
            services,
            instances,
            not_serving: targets.not_serving,
            over_limit: targets.over_limit,
            error,
        }
    }

    fn count(&self, wanted: fn(&Outcome) -> bool) -> usize {
        self.instances.iter().filter(|(_, o)| wanted(o)).count()
    }
}

/// How views are written.
#[derive(Debug, Clone)]
struct Style {
    /// The registry replica in use.
    registry: String,
    caller: String,
    interval: Duration,
    live: bool,
}

impl Style {
    /// The table for a person.
    fn text(&self, view: &View) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "registry {}  as {}  every {}",
            self.registry,
            self.caller,
            humantime::format_duration(self.interval)
        );
        if self.live {
            s.push_str("  (Ctrl-C to stop)");
        }
        s.push('\n');
        if let Some(error) = &view.error {
            let _ = writeln!(s, "! {}", error.replace('\n', "\n  "));
            s.push_str("! reading the instances it listed last\n");
        }
        s.push('\n');

        let mut rows = Vec::new();
        for (name, row) in &view.services {
            let instances = format!("{}/{}", row.reporting.len(), row.known.len());
            if row.reporting.is_empty() {
                // Nothing read: unknown, not idle.
                let why = if row.waiting.is_empty() {
                    "metrics unreadable"
                } else {
                    "first reading; rates next refresh"
                };
                rows.push(vec![
                    name.clone(),
                    "-".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    format!("{instances} ({why})"),
                ]);
                continue;
            }
            if row.methods.is_empty() {
                rows.push(vec![
                    name.clone(),
                    "-".into(),
                    "0.0".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    instances.clone(),
                ]);
            }
            if row.methods.len() > 1 {
                rows.push(traffic_row(name, "*", &row.total, &instances));
            }
            for (method, traffic) in &row.methods {
                rows.push(traffic_row(name, method, traffic, &instances));
            }
        }
        if rows.is_empty() {
            s.push_str("no serving instances to read\n");
        } else {
            table(
                &mut s,
                &[
                    "GRPC SERVICE",
                    "METHOD",
                    "RPS",
                    "SUCCESS",
                    "P50",
                    "P99",
                    "INSTANCES",
                ],
                &rows,
            );
        }

        let unread: Vec<Vec<String>> = view
            .instances
            .iter()
            .filter_map(|(t, o)| {
                let why = match o {
                    Outcome::Read => return None,
                    Outcome::Waiting => "read once; its rates come with the next refresh".into(),
                    Outcome::Unreadable(why) => format!("unreadable: {why}"),
                };
                Some(vec![
                    format!("  {}", t.service),
                    t.instance_id.clone(),
                    t.address.clone(),
                    why,
                ])
            })
            .collect();
        if !unread.is_empty() {
            s.push_str("\ninstances not in the rates\n");
            table(&mut s, &[], &unread);
        }

        s.push('\n');
        let read = view.count(|o| *o == Outcome::Read);
        let unreadable = view.count(|o| matches!(o, Outcome::Unreadable(_)));
        let _ = write!(
            s,
            "{} read of {}",
            read,
            plural(view.instances.len(), "serving instance")
        );
        if unreadable > 0 {
            let _ = write!(s, ", {unreadable} unreadable");
        }
        if view.not_serving > 0 {
            let _ = write!(s, "; {} not serving, not read", view.not_serving);
        }
        if view.over_limit > 0 {
            let _ = write!(
                s,
                "; {} more not read (at most {MAX_INSTANCES} per refresh: narrow with --service)",
                view.over_limit
            );
        }
        s.push_str("\nSUCCESS: calls ending OK, of all calls; every other status is a failure\n");
        s
    }

    /// The same for a program.
    fn json(&self, view: &View) -> serde_json::Value {
        use serde_json::json;
        let traffic = |t: &Traffic| {
            json!({
                "rps": t.rps,
                "calls": t.counters.calls(),
                "failures": t.counters.failures(),
                "success_rate": t.counters.success_rate(),
                "p50_seconds": t.counters.latency(0.5),
                "p99_seconds": t.counters.latency(0.99),
            })
        };
        let services: Vec<_> = view
            .services
            .iter()
            .map(|(name, row)| {
                let read = !row.reporting.is_empty();
                let mut value = if read { traffic(&row.total) } else { json!({}) };
                value["grpc_service"] = json!(name);
                value["instances_reporting"] = json!(row.reporting.len());
                value["instances_known"] = json!(row.known.len());
                value["methods"] = row
                    .methods
                    .iter()
                    .map(|(method, t)| {
                        let mut m = traffic(t);
                        m["method"] = json!(method);
                        m
                    })
                    .collect();
                value
            })
            .collect();
        let instances: Vec<_> = view
            .instances
            .iter()
            .map(|(t, o)| {
                let (state, error) = match o {
                    Outcome::Read => ("read", None),
                    Outcome::Waiting => ("waiting", None),
                    Outcome::Unreadable(why) => ("unreadable", Some(why)),
                };
                json!({
                    "service": t.service,
                    "instance_id": t.instance_id,
                    "address": t.address,
                    "admin": t.admin.as_ref().ok(),
                    "state": state,
                    "error": error,
                })
            })
            .collect();
        json!({
            "registry": self.registry,
            "interval_ms": u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            "services": services,
            "instances": instances,
            "not_serving": view.not_serving,
            "not_read_over_limit": view.over_limit,
        })
    }
}

/// A table row of some traffic.
fn traffic_row(service: &str, method: &str, t: &Traffic, instances: &str) -> Vec<String> {
    let latency = |q| t.counters.latency(q).map_or("-".into(), seconds);
    vec![
        service.to_owned(),
        method.to_owned(),
        format!("{:.1}", t.rps),
        success(&t.counters),
        latency(0.5),
        latency(0.99),
        instances.to_owned(),
    ]
}

/// `100%` only when nothing failed; never rounded up to it otherwise.
fn success(c: &Counters) -> String {
    match c.success_rate() {
        None => "-".into(),
        Some(_) if c.failures() == 0.0 => "100%".into(),
        Some(rate) => format!("{:.2}%", (rate * 100.0).min(99.99)),
    }
}

/// `850µs`, `1.25ms`, `1.50s`.
fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Writes rows as columns separated by two spaces; the last column is
/// not padded.
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    let head: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    let all: Vec<&Vec<String>> = std::iter::once(&head)
        .filter(|h| !h.is_empty())
        .chain(rows)
        .collect();
    let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in &all {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str, admin: Option<&str>) -> registry_pb::Instance {
        registry_pb::Instance {
            instance_id: id.into(),
            service: service.into(),
            address: format!("127.0.0.1:41{id}"),
            grpc_services: vec!["e.v1.Echo".into()],
            health: registry_pb::ServingStatus::Serving as i32,
            metadata: admin
                .map(|a| [(ADMIN_METADATA_KEY.to_owned(), a.to_owned())].into())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn reading(ok: u64, at: Instant) -> Reading {
        let text = format!(
            "trellis_proxy_requests_total{{direction=\"inbound\",service=\"e.v1.Echo\",method=\"Echo\",grpc_status=\"OK\"}} {ok}\n\
             trellis_proxy_request_duration_seconds_bucket{{direction=\"inbound\",service=\"e.v1.Echo\",method=\"Echo\",le=\"0.001\"}} {ok}\n\
             trellis_proxy_request_duration_seconds_bucket{{direction=\"inbound\",service=\"e.v1.Echo\",method=\"Echo\",le=\"+Inf\"}} {ok}\n"
        );
        Ok((at, stats::parse(&text).unwrap()))
    }

    #[test]
    fn an_unreadable_instance_is_named_and_never_counted_as_idle() {
        let listing = Listing {
            revision: 1,
            instances: vec![
                instance("echo", "1", Some("127.0.0.1:1")),
                instance("echo", "2", Some("127.0.0.1:2")),
                instance("echo", "3", None),
            ],
        };
        let targets = Targets::select(&listing, None);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let before: HashMap<_, _> = [
            ("1".to_owned(), reading(10, t0)),
            ("2".to_owned(), reading(10, t0)),
            ("3".to_owned(), Err("no trellis.admin".to_owned())),
        ]
        .into();
        let after: HashMap<_, _> = [
            ("1".to_owned(), reading(50, t1)),
            ("2".to_owned(), Err("connection refused".to_owned())),
            ("3".to_owned(), Err("no trellis.admin".to_owned())),
        ]
        .into();
        let view = View::build(&targets, &before, &after, false, None);
        let row = &view.services["e.v1.Echo"];
        assert_eq!((row.reporting.len(), row.known.len()), (1, 3));
        assert_eq!(row.total.rps, 20.0);
        let style = Style {
            registry: "127.0.0.1:7000".into(),
            caller: "cli".into(),
            interval: Duration::from_secs(2),
            live: false,
        };
        let text = style.text(&view);
        let line = text.lines().find(|l| l.contains(" Echo ")).unwrap();
        assert!(line.contains("20.0"), "{text}");
        assert!(line.contains("100%"), "{text}");
        assert!(line.contains("1/3"), "{text}");
        assert!(text.contains("unreadable: connection refused"), "{text}");
        assert!(
            text.contains("1 read of 3 serving instances, 2 unreadable"),
            "{text}"
        );

        // Read now but not before: waiting when live, unreadable once.
        let recovered: HashMap<_, _> = [("3".to_owned(), reading(5, t1))].into();
        let outcome = |refreshing| {
            View::build(&targets, &before, &recovered, refreshing, None).instances[2]
                .1
                .clone()
        };
        assert_eq!(outcome(true), Outcome::Waiting);
        assert_eq!(
            outcome(false),
            Outcome::Unreadable("no trellis.admin".into())
        );

        // Nobody read: question marks, not zeros.
        let none: HashMap<_, _> = [
            ("1".to_owned(), Err("refused".to_owned())),
            ("2".to_owned(), Err("refused".to_owned())),
            ("3".to_owned(), Err("refused".to_owned())),
        ]
        .into();
        let view = View::build(&targets, &before, &none, false, None);
        let text = style.text(&view);
        let line = text.lines().find(|l| l.starts_with("e.v1.Echo")).unwrap();
        assert!(line.contains('?') && !line.contains("0.0"), "{text}");
        assert!(line.contains("0/3 (metrics unreadable)"), "{text}");
    }

    #[test]
    fn the_service_filter_takes_a_mesh_or_a_grpc_service() {
        let mut other = instance("other", "9", Some("127.0.0.1:9"));
        other.grpc_services = vec!["o.v1.Other".into()];
        let listing = Listing {
            revision: 1,
            instances: vec![instance("echo", "1", Some("127.0.0.1:1")), other],
        };
        let by_mesh = Targets::select(&listing, Some("other"));
        assert_eq!(by_mesh.scraped.len(), 1);
        assert_eq!(by_mesh.grpc_filter, None);
        let by_grpc = Targets::select(&listing, Some("e.v1.Echo"));
        assert_eq!(by_grpc.scraped[0].instance_id, "1");
        assert_eq!(by_grpc.grpc_filter.as_deref(), Some("e.v1.Echo"));
        assert!(
            Targets::select(&listing, Some("nothing"))
                .scraped
                .is_empty()
        );
    }

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(seconds(0.00085), "850µs");
        assert_eq!(seconds(0.00125), "1.25ms");
        assert_eq!(seconds(1.5), "1.50s");
        let mut c = Counters::default();
        assert_eq!(success(&c), "-");
        c.by_status.insert("OK".into(), 99_999.0);
        assert_eq!(success(&c), "100%");
        c.by_status.insert("INTERNAL".into(), 1.0);
        assert_eq!(success(&c), "99.99%", "one failure is not rounded away");
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_interval("1ms").unwrap_err().contains("between"));
    }

    #[tokio::test]
    async fn reads_metrics_over_http_within_the_bounds() {
        use tokio::net::TcpListener;
        async fn serve_once(answer: Vec<u8>) -> String {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = tcp.read(&mut request).await;
                let _ = tcp.write_all(&answer).await;
            });
            addr
        }
        let line = "trellis_proxy_requests_total{direction=\"inbound\",service=\"s\",method=\"m\",grpc_status=\"OK\"} 3\n";
        let plain = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
            line.len()
        );
        let scrape = read(&serve_once(plain.into_bytes()).await).await.unwrap();
        assert_eq!(scrape.len(), 1);

        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{line}\r\n0\r\n\r\n",
            line.len()
        );
        assert_eq!(
            read(&serve_once(chunked.into_bytes()).await).await.unwrap(),
            scrape
        );

        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let error = read(&serve_once(huge.into_bytes()).await)
            .await
            .unwrap_err();
        assert!(error.contains("over 8 MiB"), "{error}");

        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec();
        let error = read(&serve_once(missing).await).await.unwrap_err();
        assert!(error.contains("HTTP 404"), "{error}");

        // Accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let error = read(&addr).await.unwrap_err();
        assert!(error.contains("did not answer within 1s"), "{error}");
        drop(silent);
    }
}
