//! `trellis up` with the registry replicated on etcd (`[registry] store`
//! and `replicas`): the real launcher starts two replicas on a real etcd
//! cluster, gives every sidecar and the edge both, and the mesh keeps
//! answering while a replica is SIGKILLed (and restarted by the
//! launcher) and while an etcd member is down.

mod common;

use std::time::{Duration, Instant};

use common::up::Up;
use trellis_test_support::{EchoLoad, EtcdCluster, workspace_binary};

#[tokio::test(flavor = "multi_thread")]
async fn trellis_up_runs_registry_replicas_on_etcd() {
    let mut etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let file = dir.path().join("trellis.toml");
    std::fs::write(
        &file,
        format!(
            "[mesh]\nports = \"auto\"\nconfig_dir = {:?}\n\n\
             [registry]\nlisten = \"auto\"\nstore = {:?}\nreplicas = 2\n\n\
             [edge]\nlisten = \"auto\"\n\n\
             [[service]]\nname = \"echo\"\ninstances = 2\n\
             command = [\"{{bin}}/trellis-echo\", \"--listen\", \"{{listen}}\", \"--name\", \"{{instance}}\"]\n",
            config.path(),
            etcd.store_url()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut up = Up::start(&file, &state, &[], &[], Duration::from_secs(120));
    up.wait_line("registry replica: ", Duration::from_secs(10));
    let store = up.wait_line("registry store: ", Duration::from_secs(10));
    assert!(store.contains(&etcd.store_url()), "{store}");

    // Every proxy was given both replicas; trellis status reads either.
    let run_file = state.join("run").join("up.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run_file.exists() {
        assert!(Instant::now() < deadline, "no {}", run_file.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&run_file).unwrap()).unwrap();
    let registries = run["registries"].as_str().unwrap().to_owned();
    assert_eq!(registries.split(',').count(), 2, "{run}");
    let status = std::process::Command::new(workspace_binary("trellis"))
        .args(["status", "--registry", &registries, "--certs"])
        .arg(state.join("certs"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("echo     2/2"), "{shown}");

    // Steady calls through the edge while a replica is SIGKILLed (and
    // restarted by the launcher) and an etcd member is down.
    let load = EchoLoad::start(up.edge);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = up
        .kill_and_wait_restart("registry", Duration::from_secs(20))
        .await;
    etcd.kill(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, errors) = load.stop().await;
    eprintln!("registry restarted in {restarted:?}; {ok} calls, {failed} failed");
    assert!(ok > 100, "too few calls: {ok}");
    assert_eq!(failed, 0, "{errors:?}");

    // With the etcd member still down, a SIGKILLed sidecar, restarted by
    // the launcher, registers again: the control plane takes
    // registrations.
    let instance_ids = || {
        let status = std::process::Command::new(workspace_binary("trellis"))
            .args(["status", "--json", "--registry", &registries, "--certs"])
            .arg(state.join("certs"))
            .output()
            .unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
        shown["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["instance_id"].as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let before = instance_ids();
    assert_eq!(before.len(), 2, "{before:?}");
    up.kill_and_wait_restart("echo-1-proxy", Duration::from_secs(20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = instance_ids();
        if now.iter().any(|id| !before.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo-1 did not register again: {before:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    etcd.restart(1);
    let exit = up.interrupt(Duration::from_secs(30));
    assert!(exit.success(), "{}", up.output());
}
