//! Event delivery through the mesh, seen from a subscriber this test
//! controls: the real user service (two instances on one database, each
//! behind its own sidecar) publishes; a subscriber served by this test
//! behind its own real sidecar, under settlement's identity, answers as
//! the test tells it. Shows: events of one key in sequence; a stuck key
//! does not delay another's; a poison event is parked, listed and
//! replayed; one producer instance dispatches at a time and another takes
//! over when it dies.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tonic::{Request, Response, Status};
use trellis::pb::telco::settlement::v1::settlement_events_service_server::{
    SettlementEventsService, SettlementEventsServiceServer,
};
use trellis::pb::telco::user::v1 as user;
use trellis::pb::trellis::events::v1::{
    DeliverRequest, DeliverResponse, GetOutboxStatusRequest, ListParkedEventsRequest,
    ReplayParkedEventsRequest,
};
use trellis_test_support::{
    ChildGuard, ProxyOptions, RunningProxy, TestDb, TestPki, free_port, spawn_proxy,
    spawn_registry, wait_for_tcp, workspace_binary,
};

use user::user_outbox_service_client::UserOutboxServiceClient;
use user::user_service_client::UserServiceClient;

const SUBSCRIBER: &str = "telco.settlement.v1.SettlementEventsService";

/// What the subscriber is told to do, and what it saw.
#[derive(Default)]
struct State {
    stuck: HashSet<String>,
    poison: HashSet<(String, u64)>,
    seen: HashSet<String>,
    /// Sequences applied, per key, in the order applied.
    applied: HashMap<String, Vec<u64>>,
    refusals: usize,
}

#[derive(Clone, Default)]
struct Subscriber(Arc<Mutex<State>>);

#[tonic::async_trait]
impl SettlementEventsService for Subscriber {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let event = trellis::events::accept(request.get_ref())?.clone();
        let mut state = self.0.lock().unwrap();
        if state.stuck.contains(&event.key) {
            state.refusals += 1;
            return Err(Status::unavailable("this key is stuck"));
        }
        if state.poison.contains(&(event.key.clone(), event.sequence)) {
            return Err(Status::invalid_argument("poison"));
        }
        if !state.seen.insert(event.id.clone()) {
            return Ok(Response::new(DeliverResponse { duplicate: true }));
        }
        state
            .applied
            .entry(event.key.clone())
            .or_default()
            .push(event.sequence);
        Ok(Response::new(DeliverResponse { duplicate: false }))
    }
}

struct UserInstance {
    addr: SocketAddr,
    process: ChildGuard,
    _proxy: RunningProxy,
}

fn spawn_user(pki: &TestPki, registry: SocketAddr, db: &str, name: &str) -> UserInstance {
    let identity = pki.issue("user", name);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(workspace_binary("trellis-user"));
    cmd.args(["--listen", &addr.to_string()])
        .args(["--outbound", &outbound.to_string()])
        .args(["--database-url", db])
        .env("RUST_LOG", "info,trellis=debug");
    let process = ChildGuard::spawn(name, cmd).unwrap();
    let mut options = ProxyOptions::new(&identity, Some(addr), Some(registry));
    options.outbound = Some(outbound);
    let proxy = spawn_proxy(&workspace_binary("mesh-proxy"), name, options);
    UserInstance {
        addr,
        process,
        _proxy: proxy,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_in_sequence_per_key_around_stuck_and_poison_keys() {
    let db = TestDb::new().await.unwrap();
    let pki = TestPki::new("trellis.local");
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("user.toml"),
        format!(
            "[settings.subscribers]\n\"user.created\" = [\"{SUBSCRIBER}\"]\n\"subscription.changed\" = [\"{SUBSCRIBER}\"]\n"
        ),
    )
    .unwrap();
    let registry = spawn_registry(
        workspace_binary("trellis-registry").to_str().unwrap(),
        &pki.issue("registry", "registry"),
        config.path(),
    );

    // The subscriber: served here, behind a real sidecar as settlement.
    let state = Subscriber::default();
    let sub_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (router, _health) = trellis::server::router_serving(&[SUBSCRIBER]);
    let router = router.add_service(SettlementEventsServiceServer::new(state.clone()));
    let listener = tokio::net::TcpListener::bind(sub_addr).await.unwrap();
    tokio::spawn(router.serve_with_incoming(tokio_stream_incoming(listener)));
    let settlement_identity = pki.issue("settlement", "settlement");
    let _sub_proxy = tokio::task::spawn_blocking({
        let registry = registry.addr;
        move || {
            spawn_proxy(
                &workspace_binary("mesh-proxy"),
                "settlement",
                ProxyOptions::new(&settlement_identity, Some(sub_addr), Some(registry)),
            )
        }
    })
    .await
    .unwrap();

    let (pki_ref, reg, url) = (&pki, registry.addr, db.url());
    let mut first = spawn_user(pki_ref, reg, &url, "user-1");
    let second = spawn_user(pki_ref, reg, &url, "user-2");
    assert!(wait_for_tcp(first.addr, Duration::from_secs(10)));
    let mut users = UserServiceClient::new(channel(first.addr));
    let new_user = |i| new_user_at(first.addr, i);
    let (a, b, c) = (new_user(1).await, new_user(2).await, new_user(3).await);
    // Every key's user.created (sequence 1) arrives first.
    eventually("user.created delivered", Duration::from_secs(20), || {
        let state = state.clone();
        let keys = [a.clone(), b.clone(), c.clone()];
        async move {
            let s = state.0.lock().unwrap();
            keys.iter()
                .all(|k| s.applied.get(k).is_some_and(|v| v == &[1]))
                .then_some(())
                .ok_or_else(|| format!("{:?}", s.applied))
        }
    })
    .await;

    // A is stuck; C's third event (its second plan change) is poison.
    {
        let mut s = state.0.lock().unwrap();
        s.stuck.insert(a.clone());
        s.poison.insert((c.clone(), 3));
    }
    let plans = ["basic", "plus", "max", "basic", "plus"];
    for key in [&a, &b, &c] {
        for plan in plans {
            users
                .subscribe(user::SubscribeRequest {
                    user_id: key.clone(),
                    plan_id: plan.into(),
                    effective_at: None,
                })
                .await
                .unwrap();
        }
    }
    let all: Vec<u64> = (1..=6).collect();
    // B flows while A is stuck.
    wait_applied(&state, &b, &all, "B's events applied while A is stuck", 10).await;
    // C flows past its poison event.
    wait_applied(
        &state,
        &c,
        &[1, 2, 4, 5, 6],
        "C's events after the poison one applied",
        10,
    )
    .await;
    {
        let s = state.0.lock().unwrap();
        assert_eq!(s.applied[&a], [1], "nothing of A's past the stuck point");
        assert!(s.refusals > 0);
    }

    // The operator sees the stuck line and the parked event.
    let mut outbox = UserOutboxServiceClient::new(channel(first.addr));
    // (Delivered rows go once their answers are back: wait for that.)
    let (status, line) = eventually(
        "A's five changes wait, one parked",
        Duration::from_secs(10),
        || {
            let mut outbox = outbox.clone();
            async move {
                let status = outbox
                    .get_outbox_status(GetOutboxStatusRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let line = status
                    .subscribers
                    .iter()
                    .find(|s| s.subscriber == SUBSCRIBER)
                    .cloned()
                    .ok_or_else(|| format!("the subscriber is not listed: {status:?}"))?;
                if line.pending == 5 && line.parked == 1 {
                    Ok((status, line))
                } else {
                    Err(format!("{status:?}"))
                }
            }
        },
    )
    .await;
    assert!(line.last_error.contains("Unavailable"), "{status:?}");
    assert!(line.delivered > 0 || !status.dispatching);
    let parked = outbox
        .list_parked_events(ListParkedEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parked.events.len(), 1);
    let event = parked.events[0].event.clone().unwrap();
    assert_eq!((event.key.as_str(), event.sequence), (c.as_str(), 3));
    assert!(parked.events[0].last_error.contains("poison"));
    let err = outbox
        .list_parked_events(ListParkedEventsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A unsticks: all its events, in sequence.
    state.0.lock().unwrap().stuck.clear();
    wait_applied(&state, &a, &all, "A's events applied in sequence", 40).await;

    // The poison is fixed; the operator replays the parked event.
    state.0.lock().unwrap().poison.clear();
    let replayed = outbox
        .replay_parked_events(ReplayParkedEventsRequest {
            subscriber: SUBSCRIBER.into(),
            event_ids: vec![event.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    wait_applied(
        &state,
        &c,
        &[1, 2, 4, 5, 6, 3],
        "the replayed event applied",
        10,
    )
    .await;

    // One instance dispatches; when it dies the other takes over.
    let dispatching = |addr: SocketAddr| async move {
        UserOutboxServiceClient::new(channel(addr))
            .get_outbox_status(GetOutboxStatusRequest {})
            .await
            .map(|r| r.into_inner().dispatching)
            .unwrap_or(false)
    };
    let (one, two) = (
        dispatching(first.addr).await,
        dispatching(second.addr).await,
    );
    assert!(one ^ two, "exactly one instance dispatches: {one} {two}");
    let (leader, follower) = if one {
        (&mut first, &second)
    } else {
        (&mut { second }, &first)
    };
    leader.process.kill();
    let follower_addr = follower.addr;
    eventually(
        "the other instance takes over",
        Duration::from_secs(15),
        || async move {
            dispatching(follower_addr)
                .await
                .then_some(())
                .ok_or_else(|| "not dispatching".to_owned())
        },
    )
    .await;
    let d = new_user_at(follower_addr, 9).await;
    eventually(
        "events flow from the survivor",
        Duration::from_secs(10),
        || {
            let state = state.clone();
            let d = d.clone();
            async move {
                let s = state.0.lock().unwrap();
                (s.applied.get(&d) == Some(&vec![1]))
                    .then_some(())
                    .ok_or_else(|| format!("{:?}", s.applied.get(&d)))
            }
        },
    )
    .await;
}

/// Waits until the subscriber has applied exactly `expected` for `key`.
async fn wait_applied(state: &Subscriber, key: &str, expected: &[u64], what: &str, secs: u64) {
    eventually(what, Duration::from_secs(secs), || {
        let state = state.clone();
        async move {
            let s = state.0.lock().unwrap();
            (s.applied.get(key).map(Vec::as_slice) == Some(expected))
                .then_some(())
                .ok_or_else(|| format!("{:?}", s.applied))
        }
    })
    .await;
}

async fn new_user_at(addr: SocketAddr, i: u32) -> String {
    UserServiceClient::new(channel(addr))
        .create_user(user::CreateUserRequest {
            msisdn: format!("+3361234{i:04}"),
            name: format!("User {i}"),
            email: format!("u{i}@example.com"),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(tcp, _)| tcp);
        Some((accepted, listener))
    })
}
