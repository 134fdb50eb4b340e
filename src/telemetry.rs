//! Structured logging through `tracing`.
//!
//! Quiet by default (warnings, plus each binary's start-up and shutdown
//! lines); `RUST_LOG` takes any `tracing_subscriber` filter for more detail.
//! `TRELLIS_LOG_FORMAT=json` switches to one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr. `default_filter`
/// applies when `RUST_LOG` is unset, e.g. `"warn,trellis_registry=info"`.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    let result = if std::env::var("TRELLIS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}
