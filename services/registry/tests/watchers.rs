//! Many watchers, and watchers that stop reading: the registry keeps
//! serving the others, and a slow watcher is resynced with a fresh snapshot
//! rather than queueing without bound.

use std::time::Duration;

use tokio_stream::StreamExt;
use trellis::SpiffeId;
use trellis::pb::trellis::registry::v1 as pb;
use trellis_registry::quota::Quotas;
use trellis_registry::registry::{MeshScope, Registry, WATCH_BUFFER};

fn request(i: usize) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: "usage".into(),
        address: format!("127.0.0.1:{}", 10_000 + i),
        grpc_services: vec!["telco.usage.v1.UsageService".into()],
        health: pb::ServingStatus::Serving as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_resynced_and_others_keep_up() {
    let scope = MeshScope {
        trust_domain: "trellis.local".into(),
        namespace: "default".into(),
    };
    let registry = Registry::new(scope, [], Quotas::UNLIMITED);
    let usage = SpiffeId::for_service("trellis.local", "default", "usage").unwrap();
    let changes = 3 * WATCH_BUFFER;

    let mut slow = registry.watch(&usage, Vec::new()).unwrap();
    // Readers that do read converge on the full set of instances, whether
    // by applying every change or, if they fell behind, from a resync.
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let mut stream = registry.watch(&usage, vec!["usage".into()]).unwrap();
            tokio::spawn(async move {
                let mut view = std::collections::HashSet::new();
                while let Some(event) = stream.next().await {
                    let event = event.unwrap();
                    if event.kind() == pb::WatchEventKind::Snapshot {
                        view.clear();
                    }
                    for instance in event.instances {
                        view.insert(instance.instance_id);
                    }
                    if view.len() == changes {
                        return view.len();
                    }
                }
                view.len()
            })
        })
        .collect();

    for i in 0..changes {
        registry.register(&usage, request(i)).unwrap();
        if i % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("readers finish")
            .unwrap();
        assert_eq!(seen, changes);
    }

    // The slow watcher now reads. It was sent a few buffered changes and
    // resync snapshots, never the thousands of changes it missed, and it
    // still ends up with the full set.
    let first = slow.next().await.unwrap().unwrap();
    assert_eq!(first.kind(), pb::WatchEventKind::Snapshot);
    assert!(!first.resync);
    let mut view = std::collections::HashSet::new();
    let (mut events, mut resyncs) = (0, 0);
    while view.len() < changes {
        let event = tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("the slow watcher is served")
            .unwrap()
            .unwrap();
        events += 1;
        if event.resync {
            resyncs += 1;
            view.clear();
        }
        for instance in event.instances {
            view.insert(instance.instance_id);
        }
    }
    assert!(resyncs >= 1);
    assert!(
        events < 100,
        "{events} events queued for a watcher that did not read ({changes} changes)"
    );
}
