//! Many watchers, and watchers that stop reading: the registry keeps
//! serving the others, and a slow watcher is resynced with a fresh snapshot
//! rather than queueing without bound.

use std::time::Duration;

use tokio_stream::StreamExt;
use trellis::SpiffeId;
use trellis::pb::trellis::registry::v1 as pb;
use trellis_registry::registry::{Registry, WATCH_BUFFER};

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
    let registry = Registry::new([]);
    let usage = SpiffeId::for_service("trellis.local", "default", "usage").unwrap();
    let changes = 3 * WATCH_BUFFER;

    let mut slow = registry.watch(Vec::new());
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let mut stream = registry.watch(vec!["usage".into()]);
            tokio::spawn(async move {
                let mut upserts = 0;
                while let Some(event) = stream.next().await {
                    let event = event.unwrap();
                    assert!(!event.resync, "a reader that keeps up is never resynced");
                    if event.kind() == pb::WatchEventKind::Upsert {
                        upserts += 1;
                        if upserts == changes {
                            return upserts;
                        }
                    }
                }
                upserts
            })
        })
        .collect();

    for i in 0..changes {
        registry.register(&usage, request(i)).unwrap();
        if i % 16 == 0 {
            // Pace the writer like real registrations arrive, so readers
            // that do read can keep up.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("readers finish")
            .unwrap();
        assert_eq!(seen, changes);
    }

    // The slow watcher now reads: its first snapshot, a few changes that were
    // buffered, then a resync snapshot holding everything.
    let first = slow.next().await.unwrap().unwrap();
    assert_eq!(first.kind(), pb::WatchEventKind::Snapshot);
    assert!(!first.resync);
    let mut buffered = 0;
    let resync = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("the slow watcher is served")
            .unwrap()
            .unwrap();
        if event.resync {
            break event;
        }
        buffered += 1;
    };
    assert!(
        buffered < 64,
        "{buffered} changes were queued for a watcher that did not read"
    );
    assert_eq!(resync.kind(), pb::WatchEventKind::Snapshot);
    assert_eq!(resync.instances.len(), changes);
}
