//! Runs the mesh's processes and keeps them running.
//!
//! Each process is a task of its own: it starts the program in a process
//! group of its own (so the terminal's Ctrl-C reaches `trellis up` alone,
//! and the stop order stays ours), copies every line it prints into the
//! shared log stream and its own file, and, once the mesh is up, restarts
//! it with backoff when it exits without being asked to. One that keeps
//! crashing is given up on and reported; nothing else is touched.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::logs::{LogSink, Source};

/// Lines kept per process for failure reports.
const TAIL_LINES: usize = 20;
/// Longest line kept from a process; the rest of it is cut.
const MAX_LINE: usize = 16 * 1024;
/// First delay before a restart; doubles per quick crash.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest delay between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A run this long counts as healthy: the next crash starts the backoff
/// (and the count towards giving up) from the beginning.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Quick crashes in a row after which a process is given up on.
const GIVE_UP_AFTER: u32 = 5;

/// How to run one process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Its name in the log stream and in reports (`usage-1`, `usage-1-proxy`).
    pub name: String,
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Added to the environment `trellis up` itself runs in.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The signal that asks it to stop (it then drains).
    pub stop_signal: Signal,
    /// How long it may take to stop before it is killed.
    pub grace: Duration,
    /// What to check when it cannot start (e.g. the mesh file line).
    pub hint: String,
    /// Run as this user and group (uid, gid) rather than ours.
    pub user: Option<(u32, u32)>,
}

/// Where a process stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Being started.
    Starting,
    /// Running as `pid`.
    Running {
        /// Its process ID.
        pid: u32,
    },
    /// Exited on its own; `restart` says whether it will be started again.
    Exited {
        /// How it ended.
        status: String,
    },
    /// Could not be started at all (no such program, say).
    FailedToStart {
        /// Why.
        reason: String,
    },
    /// Crashed too often; left stopped.
    GaveUp {
        /// How it ended the last time.
        status: String,
    },
    /// Stopped because `trellis up` asked.
    Stopped,
}

/// A process being supervised.
#[derive(Debug)]
pub struct Supervised {
    /// Its spec.
    pub spec: ProcessSpec,
    state: watch::Receiver<State>,
    stop: mpsc::Sender<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Its state now.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Its last lines of output, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Asks it to stop (its stop signal, then SIGKILL after its grace) and
    /// waits until it has.
    pub async fn stop(self) {
        self.request_stop();
        self.stopped().await;
    }

    /// Asks it to stop without waiting.
    pub fn request_stop(&self) {
        let _ = self.stop.try_send(());
    }

    /// Waits until it has stopped (after [`Self::request_stop`]).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }

    /// Waits for its state to change.
    pub async fn changed(&mut self) {
        let _ = self.state.changed().await;
    }
}

/// What all processes share: the log stream, where pid files go, and
/// whether exits are restarted yet (not while the mesh is starting: then
/// an exit fails the start).
#[derive(Debug, Clone)]
pub struct Supervisor {
    logs: LogSink,
    log_dir: PathBuf,
    run_dir: PathBuf,
    restarting: Arc<AtomicBool>,
}

impl Supervisor {
    /// A supervisor writing per-process logs to `log_dir` and pid files to
    /// `run_dir`.
    pub fn new(logs: LogSink, log_dir: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            logs,
            log_dir,
            run_dir,
            restarting: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on, a process that exits is restarted.
    pub fn start_restarting(&self) {
        self.restarting.store(true, Ordering::SeqCst);
    }

    /// Starts `spec` and supervises it.
    pub fn spawn(&self, spec: ProcessSpec) -> Supervised {
        let (state_tx, state) = watch::channel(State::Starting);
        let (stop, stop_rx) = mpsc::channel(1);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let task = tokio::spawn(run(
            spec.clone(),
            self.clone(),
            state_tx,
            stop_rx,
            tail.clone(),
        ));
        Supervised {
            spec,
            state,
            stop,
            tail,
            task,
        }
    }

    fn say(&self, line: String) {
        self.logs.launcher(line);
    }
}

/// The life of one supervised process.
async fn run(
    spec: ProcessSpec,
    sup: Supervisor,
    state: watch::Sender<State>,
    mut stop: mpsc::Receiver<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let source = sup.logs.source(&spec.name);
    let log_path = sup.log_dir.join(format!("{}.log", spec.name));
    let pid_path = sup.run_dir.join(format!("{}.pid", spec.name));
    let mut quick_crashes = 0u32;
    let mut first = true;
    loop {
        let mut child = match start(&spec, &log_path, first, &source, &tail).await {
            Ok(child) => child,
            Err(reason) => {
                let _ = state.send(State::FailedToStart { reason });
                return;
            }
        };
        first = false;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(&pid_path, format!("{pid}\n"));
        let _ = state.send(State::Running { pid });
        let started = Instant::now();

        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.recv() => {
                terminate(&spec, &mut child, pid).await;
                let _ = std::fs::remove_file(&pid_path);
                let _ = state.send(State::Stopped);
                return;
            }
        };
        // Whatever it left in its group goes with it.
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = std::fs::remove_file(&pid_path);
        let status = match status {
            Ok(s) => describe(s),
            Err(e) => format!("could not be waited for: {e}"),
        };
        if !sup.restarting.load(Ordering::SeqCst) {
            let _ = state.send(State::Exited { status });
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            quick_crashes = 0;
        }
        quick_crashes += 1;
        if quick_crashes >= GIVE_UP_AFTER {
            let lines = tail
                .lock()
                .expect("tail lock")
                .iter()
                .cloned()
                .collect::<Vec<_>>();
            sup.say(format!(
                "{} {status} again: {quick_crashes} times in a row within {}s of starting; given up on it (the rest of the mesh keeps running). Its last lines:\n{}",
                spec.name,
                STABLE_AFTER.as_secs(),
                indent(&lines)
            ));
            tracing::error!(process = %spec.name, %status, "given up after repeated crashes");
            let _ = state.send(State::GaveUp { status });
            return;
        }
        let backoff = (FIRST_BACKOFF * 2u32.pow(quick_crashes - 1)).min(MAX_BACKOFF);
        sup.say(format!(
            "{} {status}; restarting in {} (restart {quick_crashes} of at most {})",
            spec.name,
            humantime::format_duration(backoff),
            GIVE_UP_AFTER - 1
        ));
        tracing::warn!(process = %spec.name, %status, ?backoff, "restarting");
        let _ = state.send(State::Exited { status });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.recv() => {
                let _ = state.send(State::Stopped);
                return;
            }
        }
    }
}

/// Starts the program with its output copied to the stream and its file.
async fn start(
    spec: &ProcessSpec,
    log_path: &std::path::Path,
    truncate: bool,
    source: &Source,
    tail: &Arc<Mutex<VecDeque<String>>>,
) -> Result<Child, String> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!truncate)
        .truncate(truncate)
        .open(log_path)
        .await
        .map_err(|e| format!("cannot open its log file {}: {e}", log_path.display()))?;
    let file = Arc::new(tokio::sync::Mutex::new(file));
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = spec.user {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            "no such program".to_owned()
        } else {
            e.to_string()
        };
        format!("cannot run {}: {what}", spec.program)
    })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, source.clone(), file.clone(), tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, source.clone(), file, tail.clone()));
    }
    Ok(child)
}

/// Copies lines from a process's output to the stream, its file and its
/// tail, cutting lines longer than [`MAX_LINE`].
async fn pump(
    out: impl AsyncRead + Unpin,
    source: Source,
    file: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line_bounded(&mut reader, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        {
            let mut f = file.lock().await;
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
        {
            let mut t = tail.lock().expect("tail lock");
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.clone());
        }
        source.line(line).await;
    }
}

/// Reads up to a newline, keeping at most [`MAX_LINE`] bytes of it.
async fn read_line_bounded(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        reader.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

/// Asks the process group to stop, then kills it after the grace period.
async fn terminate(spec: &ProcessSpec, child: &mut Child, pid: u32) {
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, spec.stop_signal);
    if tokio::time::timeout(spec.grace, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(process = %spec.name, grace = ?spec.grace, "did not stop in time; killing it");
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // Anything it started and left behind.
    let _ = killpg(group, Signal::SIGKILL);
}

/// `exited with status 1`, `was killed by SIGKILL`.
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("signal {sig}"));
        format!("was killed by {name}")
    } else {
        "exited".to_owned()
    }
}

/// Lines indented for a report.
pub fn indent(lines: &[String]) -> String {
    if lines.is_empty() {
        return "    (it printed nothing)".to_owned();
    }
    lines
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
