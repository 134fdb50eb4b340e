//! One log stream: every process's lines in one terminal, each prefixed by
//! its component and instance (coloured on a terminal), in the order they
//! arrive. Lines go through a bounded queue to one writer thread, so a slow
//! terminal slows the processes' output rather than growing memory.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// Lines waiting for the terminal.
const QUEUE: usize = 4096;
/// Widest prefix; longer names are not padded further.
const MAX_WIDTH: usize = 18;
const COLOURS: [&str; 6] = ["36", "32", "33", "35", "34", "31"];

#[derive(Debug)]
struct Line {
    name: Arc<str>,
    colour: Option<&'static str>,
    text: String,
    /// Answered once every line before this one is written.
    flushed: Option<std::sync::mpsc::Sender<()>>,
}

/// Where lines go.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Line>,
    colour: bool,
    next_colour: Arc<AtomicUsize>,
}

/// One process's handle on the stream.
#[derive(Debug, Clone)]
pub struct Source {
    name: Arc<str>,
    colour: Option<&'static str>,
    tx: mpsc::Sender<Line>,
}

impl LogSink {
    /// A stream to stdout with names padded to `width`, coloured when
    /// stdout is a terminal; the writer thread ends once every handle is
    /// dropped.
    pub fn stdout(width: usize) -> Self {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let (tx, mut rx) = mpsc::channel::<Line>(QUEUE);
        std::thread::Builder::new()
            .name("trellis-up-logs".to_owned())
            .spawn(move || {
                let mut width = width.clamp(7, MAX_WIDTH);
                while let Some(line) = rx.blocking_recv() {
                    if let Some(done) = line.flushed {
                        let _ = done.send(());
                        continue;
                    }
                    width = width.max(line.name.len().min(MAX_WIDTH));
                    let mut out = std::io::stdout().lock();
                    let _ = match line.colour {
                        Some(c) => {
                            writeln!(out, "\x1b[{c}m{:>width$} |\x1b[0m {}", line.name, line.text)
                        }
                        None => writeln!(out, "{:>width$} | {}", line.name, line.text),
                    };
                    let _ = out.flush();
                }
            })
            .expect("starting the log writer thread");
        Self {
            tx,
            colour,
            next_colour: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A handle for the process called `name`.
    pub fn source(&self, name: &str) -> Source {
        let colour = self
            .colour
            .then(|| COLOURS[self.next_colour.fetch_add(1, Ordering::Relaxed) % COLOURS.len()]);
        Source {
            name: name.into(),
            colour,
            tx: self.tx.clone(),
        }
    }

    /// A line from `trellis up` itself.
    pub fn launcher(&self, text: String) {
        let colour = self.colour.then_some("1");
        for part in text.lines() {
            let line = Line {
                name: "trellis".into(),
                colour,
                text: part.to_owned(),
                flushed: None,
            };
            if let Err(mpsc::error::TrySendError::Full(line)) = self.tx.try_send(line) {
                // The queue is full of the processes' lines; this one
                // matters more than keeping order.
                eprintln!("trellis | {}", line.text);
            }
        }
    }
}

impl LogSink {
    /// Waits (up to a second) until every line queued so far is written.
    pub async fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        let line = Line {
            name: "".into(),
            colour: None,
            text: String::new(),
            flushed: Some(done),
        };
        if self.tx.send(line).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || {
                wait.recv_timeout(std::time::Duration::from_secs(1))
            })
            .await;
        }
    }
}

impl Source {
    /// Queues one line, waiting while the terminal is behind.
    pub async fn line(&self, text: String) {
        let _ = self
            .tx
            .send(Line {
                name: self.name.clone(),
                colour: self.colour,
                text,
                flushed: None,
            })
            .await;
    }
}
