//! `trellis certs`: a development CA and one certificate per workload.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use trellis::identity::{IdentityPaths, Workload};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn certs(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(TRELLIS)
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn makes_a_ca_and_workload_certificates_and_keeps_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = certs(dir.path(), &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("created CA"), "{stdout}");

    for name in ["registry", "edge", "user", "usage", "settlement"] {
        let paths = IdentityPaths::in_dir(dir.path(), name);
        let workload = Workload::load(&paths).unwrap();
        assert_eq!(
            workload.id().as_str(),
            format!("spiffe://trellis.local/ns/default/sa/{name}")
        );
        let mode = std::fs::metadata(&paths.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name}.key must be private");
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0
    );

    // A second run keeps the CA, so the first run's certificates stay valid.
    let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let usage_before = IdentityPaths {
        cert: dir.path().join("usage-old.pem"),
        key: dir.path().join("usage-old.key"),
        ca: dir.path().join("ca.pem"),
    };
    std::fs::copy(dir.path().join("usage.pem"), &usage_before.cert).unwrap();
    std::fs::copy(dir.path().join("usage.key"), &usage_before.key).unwrap();
    let out = certs(
        dir.path(),
        &[
            "--workload",
            "billing-report",
            "--trust-domain",
            "trellis.local",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept existing CA"));
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    Workload::load(&usage_before).unwrap();
    let report = Workload::load(&IdentityPaths::in_dir(dir.path(), "billing-report")).unwrap();
    assert_eq!(report.id().service(), Some("billing-report"));
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = certs(dir.path(), &["--trust-domain", "Not Valid"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("trust domain"), "{stderr}");

    let out = certs(dir.path(), &["--days", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--days"));

    // A damaged CA is reported, not silently replaced.
    std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
    std::fs::write(dir.path().join("ca.key"), "garbage").unwrap();
    let out = certs(dir.path(), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ca.pem") && stderr.contains("existing CA is unusable"),
        "{stderr}"
    );
}
