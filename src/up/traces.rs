//! `trellis up --traces`: where the mesh's spans go.
//!
//! `--traces http://host:4317` points every process at a collector that
//! already runs (Jaeger, the OpenTelemetry Collector, Tempo: anything
//! that takes OTLP over gRPC). `--traces jaeger` starts Jaeger's
//! all-in-one binary, if it is installed, as the mesh's first process
//! (OTLP on 127.0.0.1:4317, its UI on 127.0.0.1:16686; free ports with
//! `--any-ports`) and points the mesh at it. Either way each process gets
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, unless the variable is already set for
//! `trellis up` itself, which then wins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Jaeger's all-in-one program, looked for on `PATH`.
pub const JAEGER: &str = "jaeger-all-in-one";

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Traces {
    /// A collector that runs already.
    Collector(String),
    /// Jaeger, started by `trellis up`.
    Jaeger {
        /// The program.
        program: PathBuf,
        /// Its OTLP/gRPC listener.
        otlp: SocketAddr,
        /// Its web UI.
        ui: SocketAddr,
    },
}

impl Traces {
    /// Reads `--traces`: `jaeger`, or a collector's `http(s)://` URL.
    /// `ports` gives the two ports Jaeger takes (OTLP, UI).
    pub fn parse(
        value: &str,
        path: Option<&std::ffi::OsStr>,
        ports: (u16, u16),
    ) -> Result<Self, String> {
        let value = value.trim();
        if value == "jaeger" {
            let Some(program) = find_program(JAEGER, path) else {
                return Err(format!(
                    "--traces jaeger: {JAEGER} is not on PATH; install Jaeger (its all-in-one \
                     binary), or run any OTLP collector and give its address: \
                     --traces http://127.0.0.1:4317"
                ));
            };
            return Ok(Self::Jaeger {
                program,
                otlp: SocketAddr::from(([127, 0, 0, 1], ports.0)),
                ui: SocketAddr::from(([127, 0, 0, 1], ports.1)),
            });
        }
        let url = value
            .strip_prefix("http://")
            .or_else(|| value.strip_prefix("https://"));
        match url {
            Some(rest) if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
                Ok(Self::Collector(value.to_owned()))
            }
            _ => Err(format!(
                "--traces {value:?}: give `jaeger` (to start Jaeger's all-in-one binary) or a \
                 collector's OTLP/gRPC address such as http://127.0.0.1:4317"
            )),
        }
    }

    /// The OTLP endpoint the mesh's processes export to.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Collector(url) => url.clone(),
            Self::Jaeger { otlp, .. } => format!("http://{otlp}"),
        }
    }

    /// What every process of the mesh gets in its environment (nothing if
    /// `trellis up` itself was given the variable: it is inherited).
    pub fn env(&self) -> Vec<(String, String)> {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
            return Vec::new();
        }
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), self.endpoint())]
    }
}

/// Jaeger all-in-one's flags (v1): OTLP/gRPC and the UI on loopback only.
pub fn jaeger_args(otlp: SocketAddr, ui: SocketAddr) -> Vec<String> {
    vec![
        "--collector.otlp.enabled=true".to_owned(),
        format!("--collector.otlp.grpc.host-port={otlp}"),
        format!("--query.http-server.host-port={ui}"),
    ]
}

/// `name` in one of `path`'s directories, if there as a file.
fn find_program(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_file(candidate))
}

fn is_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collector_url_is_taken_as_it_is() {
        let traces = Traces::parse("http://127.0.0.1:4317", None, (1, 2)).unwrap();
        assert_eq!(traces.endpoint(), "http://127.0.0.1:4317");
    }

    #[test]
    fn anything_else_is_refused_with_what_would_do() {
        for bad in ["", "jaegr", "127.0.0.1:4317", "http://", "http://a b"] {
            let e = Traces::parse(bad, None, (1, 2)).unwrap_err();
            assert!(e.contains("http://127.0.0.1:4317"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn jaeger_is_found_on_path_or_its_absence_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        let missing = Traces::parse("jaeger", Some(&path), (4317, 16686)).unwrap_err();
        assert!(missing.contains("not on PATH"), "{missing}");
        std::fs::write(dir.path().join(JAEGER), "").unwrap();
        let found = Traces::parse("jaeger", Some(&path), (4317, 16686)).unwrap();
        assert_eq!(found.endpoint(), "http://127.0.0.1:4317");
        let Traces::Jaeger { otlp, ui, .. } = found else {
            panic!("{found:?}")
        };
        assert_eq!(
            jaeger_args(otlp, ui),
            [
                "--collector.otlp.enabled=true",
                "--collector.otlp.grpc.host-port=127.0.0.1:4317",
                "--query.http-server.host-port=127.0.0.1:16686",
            ]
        );
    }
}
