//! Clients in other languages generated from `proto/`: the Python stubs
//! `scripts/gen-clients` writes (with `buf generate` and buf.gen.yaml) run
//! the billing scenario through the edge against the real mesh.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use trellis_test_support::repo_root;

const SERVICES: [&str; 3] = [
    "telco.user.v1.UserService",
    "telco.usage.v1.UsageService",
    "telco.settlement.v1.SettlementService",
];

/// Runs a command to its end off the async runtime.
async fn run(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn generated(dir: &Path, module: &str) -> bool {
    dir.join(module).is_file()
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_python_stubs_run_the_billing_scenario_through_the_edge() {
    let root = repo_root();
    let stubs = tempfile::tempdir().unwrap();
    let mut gen_clients = Command::new(root.join("scripts/gen-clients"));
    gen_clients.arg("python").arg("--out").arg(stubs.path());
    let out = run(gen_clients).await;
    assert!(
        out.status.success(),
        "scripts/gen-clients failed: {}",
        text(&out)
    );
    for module in [
        "telco/user/v1/user_pb2.py",
        "telco/user/v1/user_pb2_grpc.py",
        "telco/usage/v1/usage_pb2_grpc.py",
        "telco/settlement/v1/settlement_pb2_grpc.py",
    ] {
        assert!(
            generated(stubs.path(), module),
            "scripts/gen-clients wrote no {module}: {}",
            text(&out)
        );
    }

    let fx = start_billing(&SERVICES).await;
    let mesh = &fx.mesh;

    // The virtualenv scripts/gen-clients made sure of (grpcio is in it).
    let mut client = Command::new(root.join("target/pytools/bin/python"));
    client
        .arg(root.join("e2e/tests/python/generated_billing_client.py"))
        .arg(mesh.edge.to_string())
        .arg("--stubs")
        .arg(stubs.path())
        .arg("--msisdn")
        .arg("+4930555000111");
    let out = run(client).await;
    assert!(
        out.status.success(),
        "the generated Python client failed: {}",
        text(&out)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the client printed no JSON ({e}): {}", text(&out)));
    assert_eq!(answer["plan"], "basic", "{answer}");
    assert_eq!(
        answer["total_cents"], answer["expected_total_cents"],
        "{answer}"
    );
    assert!(answer["total_cents"].as_i64().unwrap() > 0, "{answer}");
    assert_eq!(answer["invalid_argument"]["code"], "INVALID_ARGUMENT");
}
