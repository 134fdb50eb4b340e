//! The PostgreSQL server the billing services keep their data in:
//! `DATABASE_URL` (or `[postgres] url`), else 127.0.0.1:5432, else a private
//! cluster under the state directory, made and started with the PostgreSQL
//! binaries on this machine. Which one was chosen is said at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::Signal;

use super::supervisor::ProcessSpec;

/// Where the databases live.
#[derive(Debug)]
pub enum Server {
    /// A server that is already running.
    External {
        /// `postgres://user@host:port`, no database.
        url: String,
    },
    /// A cluster `trellis up` runs itself.
    Private {
        /// `postgres://postgres@127.0.0.1:port`.
        url: String,
        /// Its process.
        spec: Box<ProcessSpec>,
        /// Its address.
        addr: SocketAddr,
        /// Its data directory.
        data: PathBuf,
    },
}

impl Server {
    /// The server's URL, without a database.
    pub fn url(&self) -> &str {
        match self {
            Self::External { url } | Self::Private { url, .. } => url,
        }
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        with_database(self.url(), name)
    }
}

/// Which server to use.
#[derive(Debug, Clone)]
pub enum Choice {
    /// This one (DATABASE_URL or the mesh file's).
    Url(String),
    /// 127.0.0.1:5432 if it answers, else a private cluster.
    Local,
    /// Always the private cluster.
    Private,
}

/// Picks the server as `choice` says; a private cluster lives in `dir`
/// and listens on `port()`.
pub async fn choose(
    choice: Choice,
    dir: &Path,
    port: impl FnOnce() -> anyhow::Result<SocketAddr>,
) -> anyhow::Result<Server> {
    if let Choice::Private = choice {
        let bindir = bindir().map_err(|e| {
            anyhow!(
                "{e}: a private PostgreSQL needs the PostgreSQL server binaries \
                 (Debian/Ubuntu: apt-get install postgresql)"
            )
        })?;
        return private(&bindir, dir, port()?);
    }
    if let Choice::Url(url) = choice {
        let server = strip_database(&url);
        probe(&with_database(&server, "postgres"))
            .await
            .with_context(|| {
                format!(
                    "PostgreSQL at {server} (from DATABASE_URL or [postgres] url) cannot be used"
                )
            })?;
        return Ok(Server::External { url: server });
    }
    if tokio::net::TcpStream::connect("127.0.0.1:5432")
        .await
        .is_ok()
    {
        // As this machine's user (trust or peer set-ups), else as postgres.
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name);
        let mut last = None;
        for user in me.into_iter().chain(["postgres".to_owned()]) {
            let local = format!("postgres://{user}@127.0.0.1:5432");
            match probe(&with_database(&local, "postgres")).await {
                Ok(()) => return Ok(Server::External { url: local }),
                Err(e) => last = Some((local, e)),
            }
        }
        let (local, e) = last.expect("at least one user was tried");
        return Err(e.context(format!(
            "a PostgreSQL server listens on 127.0.0.1:5432 but {local} cannot be used; \
             set DATABASE_URL=postgres://user:password@host:port to one that can"
        )));
    }
    let bindir = bindir().map_err(|e| {
        anyhow!(
            "{e}: no PostgreSQL server on 127.0.0.1:5432 and DATABASE_URL is not set. \
             Install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) and trellis up \
             runs a private cluster under {}, or set DATABASE_URL=postgres://user@host:port",
            dir.display()
        )
    })?;
    let addr = port()?;
    private(&bindir, dir, addr)
}

/// Makes the private cluster's data directory if needed and describes
/// its server process.
fn private(bindir: &Path, dir: &Path, addr: SocketAddr) -> anyhow::Result<Server> {
    let data = dir.join("data");
    let owner = if nix::unistd::geteuid().is_root() {
        // PostgreSQL refuses to run as root.
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| {
                anyhow!("running as root, a private PostgreSQL needs the user `postgres` (the Debian package creates it)")
            })?;
        Some(user)
    } else {
        None
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(user) = &owner {
        reachable_by(dir, user)?;
        nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
            .with_context(|| format!("giving {} to the postgres user", dir.display()))?;
    }
    if !data.join("PG_VERSION").exists() {
        let mut initdb = std::process::Command::new(bindir.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(&data);
        if let Some(user) = &owner {
            use std::os::unix::process::CommandExt;
            initdb.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb {} failed: {}",
                data.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let spec = ProcessSpec {
        name: "postgres".to_owned(),
        program: bindir.join("postgres").display().to_string(),
        args: vec![
            "-D".to_owned(),
            data.display().to_string(),
            "-p".to_owned(),
            addr.port().to_string(),
            "-k".to_owned(),
            dir.display().to_string(),
            "-c".to_owned(),
            format!("listen_addresses={}", addr.ip()),
            "-c".to_owned(),
            "max_connections=200".to_owned(),
        ],
        env: Vec::new(),
        cwd: dir.to_owned(),
        // Fast shutdown: roll back open transactions, write a checkpoint.
        stop_signal: Signal::SIGINT,
        grace: Duration::from_secs(30),
        hint: format!(
            "the private PostgreSQL cluster in {} (remove the directory to start afresh)",
            data.display()
        ),
        user: owner.map(|u| (u.uid.as_raw(), u.gid.as_raw())),
    };
    Ok(Server::Private {
        url: format!("postgres://postgres@{addr}"),
        spec: Box::new(spec),
        addr,
        data,
    })
}

/// Checks that `user` can reach `dir`: every directory above it must let
/// others through (or be theirs), or initdb fails with a bare
/// "permission denied".
fn reachable_by(dir: &Path, user: &nix::unistd::User) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .with_context(|| format!("reading {}", ancestor.display()))?;
        if meta.mode() & 0o001 == 0 && meta.uid() != user.uid.as_raw() {
            bail!(
                "the private PostgreSQL runs as the user {} (it refuses root), which cannot reach {}: \
                 {} lets no other user through (chmod o+x {} would), or put the state directory elsewhere (--state-dir)",
                user.name,
                dir.display(),
                ancestor.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// Waits until the server answers a query, or `timeout` passes.
pub async fn wait_ready(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe(&with_database(url, "postgres")).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn probe(url: &str) -> anyhow::Result<()> {
    let mut config = crate::db::parse_url(url)?;
    config.connect_timeout(Duration::from_secs(5));
    let client = crate::db::connect(&config).await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// The directory of `initdb` and `postgres`: `pg_config --bindir`, else the
/// newest under /usr/lib/postgresql.
pub fn bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| anyhow!("no PostgreSQL binaries (initdb, postgres) found"))
}

/// `postgres://u@h:p/db?x=y` → `postgres://u@h:p?x=y`.
fn strip_database(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base.to_owned(),
    }
}

/// `postgres://u@h:p?x=y` + `db` → `postgres://u@h:p/db?x=y`.
fn with_database(server: &str, name: &str) -> String {
    match server.split_once('?') {
        Some((base, query)) => format!("{base}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_credentials_and_options() {
        assert_eq!(
            strip_database("postgres://a:b@h:5433/x?sslmode=disable"),
            "postgres://a:b@h:5433?sslmode=disable"
        );
        assert_eq!(
            strip_database("postgres://root@127.0.0.1:5432"),
            "postgres://root@127.0.0.1:5432"
        );
        assert_eq!(
            strip_database("postgres://root@127.0.0.1:5432/"),
            "postgres://root@127.0.0.1:5432"
        );
        let server = Server::External {
            url: "postgres://a@h:1?sslmode=disable".to_owned(),
        };
        assert_eq!(
            server.database_url("t_user"),
            "postgres://a@h:1/t_user?sslmode=disable"
        );
    }
}
