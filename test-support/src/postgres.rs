//! A fresh, real PostgreSQL database for every test.
//!
//! The server is found once per test binary, in this order:
//! 1. `DATABASE_URL`, when set (any database on that server; it is used only
//!    to create and drop the per-test databases);
//! 2. a server on 127.0.0.1:5432 (trust auth, as the current user or `postgres`);
//! 3. a private cluster started from the PostgreSQL binaries on the machine
//!    (`initdb`, `postgres`), run as the `postgres` user when the tests run
//!    as root, and stopped when the test process exits.
//!
//! Each [`TestDb`] is its own `CREATE DATABASE`, dropped when the value is
//! dropped, so tests never share a database.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::Rng;
use tokio_postgres::{Config, NoTls};

/// A database created for one test and dropped after it.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    config: Config,
    admin: Config,
}

impl TestDb {
    /// Creates a new, empty database on the test server.
    pub async fn new() -> anyhow::Result<Self> {
        let admin = server()?.clone();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "trellis_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::rng().random::<u32>()
        );
        let client = connect(&admin).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating test database {name}"))?;
        let mut config = admin.clone();
        config.dbname(&name);
        Ok(Self {
            name,
            config,
            admin,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection settings for this database.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A `postgres://` URL for this database, for child processes.
    pub fn url(&self) -> String {
        config_url(&self.config)
    }

    /// Opens a connection to this database.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.config).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; do the async work on a thread
        // with its own small runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = connect(&admin).await.ok()?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("note: test database {} was not dropped", self.name);
        }
    }
}

async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", config_url(config)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Renders the parts of a config that matter here as a URL.
pub fn config_url(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// The test server as `postgres://user@host:port` (no database), for a
/// process that creates its own databases on it (`trellis up`).
pub fn server_url() -> anyhow::Result<String> {
    let url = config_url(server()?);
    Ok(url[..url.rfind('/').expect("a URL has a path")].to_owned())
}

/// The admin connection settings of the test server, found once per process.
fn server() -> anyhow::Result<&'static Config> {
    static SERVER: OnceLock<Result<Config, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| find_server().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("no PostgreSQL for tests: {e}"))
}

fn find_server() -> anyhow::Result<Config> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let config: Config = url
            .parse()
            .with_context(|| format!("DATABASE_URL {url:?} does not parse"))?;
        block_on_probe(&config).with_context(|| format!("DATABASE_URL {url:?}"))?;
        return Ok(config);
    }
    let mut users = vec![current_user()];
    users.push("postgres".into());
    for user in users {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(5432)
            .user(&user)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        if block_on_probe(&config).is_ok() {
            return Ok(config);
        }
    }
    start_private_cluster().context(
        "no server at DATABASE_URL or 127.0.0.1:5432, and a private cluster could not be started",
    )
}

fn block_on_probe(config: &Config) -> anyhow::Result<()> {
    let config = config.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = connect(&config).await?;
            client.simple_query("SELECT 1").await?;
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow!("probe thread panicked"))?
}

fn current_user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn pg_bindir() -> anyhow::Result<PathBuf> {
    trellis::up::postgres::bindir()
        .map_err(|e| anyhow!("{e} (install PostgreSQL or set DATABASE_URL)"))
}

/// Runs `program` as the `postgres` user when we are root (PostgreSQL
/// refuses to run as root), else as ourselves.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Creates a cluster's data directory (`DIR/data`, trust auth, user
/// `postgres`) in a new directory named with `prefix`, owned by `postgres`
/// when we are root: (PostgreSQL's bin directory, the directory).
fn init_cluster(prefix: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let bindir = pg_bindir()?;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?.keep();
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()?;
        if !status.success() {
            bail!("chown of {} to postgres failed", dir.display());
        }
    }
    let out = as_postgres(&bindir.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(dir.join("data"))
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((bindir, dir))
}

/// Starts a private PostgreSQL cluster for this test process (the fallback
/// when no server is reachable) and returns its admin connection settings.
/// It is stopped and its files removed once the process exits.
pub fn start_private_cluster() -> anyhow::Result<Config> {
    let (bindir, dir) = init_cluster("trellis-pg-")?;
    let data = dir.join("data");
    let port = crate::process::free_port();
    // A watchdog shell stops the cluster and removes its files once this
    // test process has exited, however it exits.
    let script = format!(
        "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 >{dir}/log 2>&1 & \
         pg=$!; while [ -d /proc/{parent} ]; do sleep 1; done; kill -INT $pg; wait $pg; rm -rf {dir}",
        postgres = bindir.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting postgres")?;
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match block_on_probe(&config) {
            Ok(()) => return Ok(config),
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                bail!("private cluster did not come up: {e:#}\n{log}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A PostgreSQL cluster of a test's own, which the test may stop and start
/// again (a database outage) without touching anyone else's server.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
}

impl PgCluster {
    /// Creates and starts a cluster on a free port (trust auth, user
    /// `postgres`).
    pub fn start() -> anyhow::Result<Self> {
        let (bindir, dir) = init_cluster("trellis-pgc-")?;
        let cluster = Self {
            dir,
            bindir,
            port: crate::process::free_port(),
        };
        cluster.up()?;
        Ok(cluster)
    }

    /// A `postgres://` URL for database `name` (services create it).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server (after [`PgCluster::stop`]) on the same port and
    /// waits until it accepts connections. Commits are synchronous: a
    /// crash loses nothing acknowledged (fsync stays off; the tests kill
    /// the server, not the machine).
    pub fn up(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        let out = as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &options, "-w", "-t", "30", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running pg_ctl start")?;
        if !out.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            bail!("pg_ctl start failed:\n{log}");
        }
        Ok(())
    }

    /// Stops the server at once (`immediate`: connections are cut, as in
    /// a crash), keeping its data.
    pub fn stop(&self) {
        let _ = as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
