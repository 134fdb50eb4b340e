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

fn kubernetes(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(TRELLIS)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["certs", "--kubernetes", "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

/// The Secrets parse as YAML, one per identity, each with the CA, the
/// certificate and its key as PEM (a usable identity, the key matching the
/// certificate); the CA stays in --dir and its key is in no Secret.
#[test]
fn kubernetes_secrets_carry_each_identity_and_never_the_ca_key() {
    use yaml_rust2::YamlLoader;
    let dir = tempfile::tempdir().unwrap();
    let out = kubernetes(
        dir.path(),
        &[
            "--workload",
            "registry,usage",
            "--namespace",
            "billing",
            "--server-name",
            "edge.example.com",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("created CA"), "{stderr}");
    let docs: Vec<_> = YamlLoader::load_from_str(&stdout)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["identity-registry", "identity-usage", "edge-server-tls"]
    );
    let ca_key = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();
    assert!(
        !stdout.contains(ca_key.trim()),
        "the CA key must stay in --dir"
    );
    for (doc, workload) in docs.iter().zip(["registry", "usage"]) {
        assert_eq!(doc["kind"].as_str(), Some("Secret"));
        assert_eq!(doc["metadata"]["namespace"].as_str(), Some("billing"));
        assert_eq!(doc["type"].as_str(), Some("Opaque"));
        let files = tempfile::tempdir().unwrap();
        for (key, begin) in [
            ("ca.pem".to_owned(), "-----BEGIN CERTIFICATE-----"),
            (format!("{workload}.pem"), "-----BEGIN CERTIFICATE-----"),
            (format!("{workload}.key"), "-----BEGIN PRIVATE KEY-----"),
        ] {
            let pem = doc["stringData"][key.as_str()].as_str().unwrap();
            assert!(
                pem.starts_with(begin) && pem.trim_end().ends_with("-----"),
                "{key}: {pem}"
            );
            std::fs::write(files.path().join(&key), pem).unwrap();
        }
        // The namespace is the SPIFFE ID's too.
        let loaded = Workload::load(&IdentityPaths::in_dir(files.path(), workload)).unwrap();
        assert_eq!(
            loaded.id().as_str(),
            format!("spiffe://trellis.local/ns/billing/sa/{workload}")
        );
        assert_eq!(
            doc["stringData"]["ca.pem"].as_str().unwrap(),
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
        );
        // No workload key is left in --dir: the Secrets are its only copy.
        assert!(!dir.path().join(format!("{workload}.key")).exists());
    }
    let tls = &docs[2];
    assert_eq!(tls["type"].as_str(), Some("kubernetes.io/tls"));
    assert!(
        tls["stringData"]["tls.crt"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        tls["stringData"]["tls.key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    // Again with --output: the same CA (kept), a private file, nothing on stdout.
    let file = dir.path().join("secrets.yaml");
    let out = kubernetes(
        dir.path(),
        &["--workload", "usage", "--output", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept existing CA"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o077,
        0
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    // Default namespace with --kubernetes: deploy/kubernetes's.
    assert_eq!(doc["metadata"]["namespace"].as_str(), Some("trellis"));
    assert_eq!(
        doc["stringData"]["ca.pem"].as_str().unwrap(),
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
    );
}

/// Without --workload, the identities of the mesh file: the registry, the
/// edge and every service.
#[test]
fn kubernetes_secrets_default_to_the_mesh_files_services() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.toml");
    std::fs::write(
        &mesh,
        "[[service]]\nname = \"billing\"\ncommand = [\"x\"]\n[[service]]\nname = \"reports\"\ncommand = [\"y\"]\n",
    )
    .unwrap();
    let out = kubernetes(dir.path(), &["--mesh-file", mesh.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  name: "))
        .collect();
    assert_eq!(
        names,
        [
            "identity-registry",
            "identity-edge",
            "identity-billing",
            "identity-reports"
        ]
    );
}

#[test]
fn kubernetes_bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let fails = |extra: &[&str], expected: &str| {
        let out = kubernetes(dir.path(), extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} passed");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{extra:?} wrote Secrets");
    };
    fails(
        &["--namespace", "Billing"],
        "namespace \"Billing\" cannot name a Kubernetes object",
    );
    fails(
        &["--workload", "billing_report"],
        "workload \"billing_report\" cannot name a Kubernetes object",
    );
    fails(
        &["--mesh-file", "/nonexistent/trellis.toml"],
        "--kubernetes takes its services from --mesh-file",
    );
    let out = Command::new(TRELLIS)
        .args(["certs", "--output", "x.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kubernetes"));
}

#[test]
fn a_proxyless_client_gets_a_bootstrap_file_naming_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out = certs(
        dir.path(),
        &[
            "--workload",
            "registry,billing-report",
            "--xds-bootstrap",
            "127.0.0.1:7000",
            "--zone",
            "eu-1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("billing-report.xds.json"), "{stdout}");
    let text = std::fs::read_to_string(dir.path().join("billing-report.xds.json")).unwrap();
    let b: serde_json::Value = serde_json::from_str(&text).unwrap();
    let server = &b["xds_servers"][0];
    assert_eq!(server["server_uri"], "127.0.0.1:7000");
    assert_eq!(server["channel_creds"][0]["type"], "tls");
    assert_eq!(
        b["node"]["id"],
        "spiffe://trellis.local/ns/default/sa/billing-report"
    );
    assert_eq!(b["node"]["locality"]["zone"], "eu-1");
    let provider = &b["certificate_providers"]["trellis"];
    assert_eq!(provider["plugin_name"], "file_watcher");
    // Absolute paths to files that are there, the key private.
    for field in [
        "certificate_file",
        "private_key_file",
        "ca_certificate_file",
    ] {
        let path = std::path::PathBuf::from(provider["config"][field].as_str().unwrap());
        assert!(path.is_absolute() && path.exists(), "{field}: {path:?}");
        assert_eq!(
            provider["config"][field],
            server["channel_creds"][0]["config"][field]
        );
    }
    // The registry's certificate names the hosts xDS clients dial and
    // check, besides its SPIFFE ID, which still reads as before.
    let registry = IdentityPaths::in_dir(dir.path(), "registry");
    assert_eq!(
        Workload::load(&registry).unwrap().id().as_str(),
        "spiffe://trellis.local/ns/default/sa/registry"
    );
    let pem = std::fs::read(&registry.cert).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = der.parse_x509().unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect();
    for host in ["DNSName(localhost)", "IPAddress(7f:00:00:01)"] {
        assert!(
            names.iter().any(|n| n.contains(host)),
            "{host} in {names:?}"
        );
    }
}
