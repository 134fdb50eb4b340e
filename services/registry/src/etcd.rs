//! A small client of etcd's v3 API: what the replicated registry needs
//! (ranges, transactions, leases, one watch), over the stubs generated from
//! etcd's own contract (`etcd-proto/`).
//!
//! It talks to one member at a time. A call that fails because the member
//! is gone (UNAVAILABLE, or the connection broke) moves on to the next
//! member; every call is tried once on each member before the error is
//! returned. A transaction may so be applied by a member that failed before
//! answering and sent again: the registry's transactions are written to
//! be safe to repeat.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// Code generated from etcd's contract. Nothing hand-written lives here.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/_etcd.rs"));
}

use pb::etcdserverpb as rpc;
use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::watch_client::WatchClient;

/// Most etcd members `--store` may name.
pub const MAX_MEMBERS: usize = 16;
/// How long one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to one member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The key prefix when `--store` names none.
pub const DEFAULT_PREFIX: &str = "/trellis";

/// Where the registry keeps the mesh: `etcd://host:port[,host:port...][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The members, `host:port` each.
    pub members: Vec<String>,
    /// Every key the registry writes starts with this (no trailing `/`).
    pub prefix: String,
}

impl StoreUrl {
    /// Parses `--store`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("etcd://").ok_or_else(|| {
            format!("{s:?}: the store must be etcd://host:port[,host:port...][/prefix] (without --store the registry keeps its state itself)")
        })?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        let mut members = Vec::new();
        for (i, m) in hosts.split(',').enumerate() {
            let m = m.trim();
            let ok = m.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
                    && !host.contains(['/', '@', '?', '#', ' '])
            });
            if !ok {
                return Err(format!("{s:?}: member {} ({m:?}) is not host:port", i + 1));
            }
            if !members.iter().any(|x| x == m) {
                members.push(m.to_owned());
            }
        }
        if members.len() > MAX_MEMBERS {
            return Err(format!(
                "{s:?}: {} members; at most {MAX_MEMBERS} may be named",
                members.len()
            ));
        }
        Ok(Self {
            members,
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.members.join(","), self.prefix)
    }
}

/// A client of one etcd cluster.
pub struct Etcd {
    members: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    /// One lease keep-alive stream, shared by every renewal: a request and
    /// its answer at a time.
    keepalive: Mutex<Option<KeepAlive>>,
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("members", &self.members)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

struct KeepAlive {
    requests: mpsc::Sender<rpc::LeaseKeepAliveRequest>,
    answers: Streaming<rpc::LeaseKeepAliveResponse>,
}

/// Whether a failed call says the member (not the request) is the trouble.
pub fn member_failed(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    ) || status.message().contains("no leader")
}

impl Etcd {
    /// A client of `members`; connects lazily.
    pub fn new(url: &StoreUrl) -> Result<Arc<Self>, String> {
        let channels = url
            .members
            .iter()
            .map(|m| {
                Endpoint::from_shared(format!("http://{m}"))
                    .map(|e| {
                        e.connect_timeout(CONNECT_TIMEOUT)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(3))
                            .keep_alive_while_idle(true)
                            .connect_lazy()
                    })
                    .map_err(|e| format!("etcd member {m}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(Self {
            members: url.members.clone(),
            channels,
            current: AtomicUsize::new(0),
            keepalive: Mutex::new(None),
        }))
    }

    /// The members, for messages.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    fn pick(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        (i, self.channels[i].clone())
    }

    /// Moves on from member `failed` (if it is still the current one).
    fn fail_over(&self, failed: usize, status: &Status) {
        let next = (failed + 1) % self.channels.len();
        if self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.channels.len() > 1
        {
            tracing::warn!(
                from = %self.members[failed],
                to = %self.members[next],
                code = ?status.code(),
                error = status.message(),
                "etcd member failed; moving to the next"
            );
        }
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        request
    }

    /// Runs an idempotent call on the current member, then on each other
    /// member while members fail.
    async fn retried<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = None;
        for _ in 0..self.channels.len() {
            let (i, channel) = self.pick();
            match call(channel).await {
                Err(status) if member_failed(&status) => {
                    self.fail_over(i, &status);
                    last = Some(status);
                }
                other => return other,
            }
        }
        Err(self.unreachable(last.expect("at least one member")))
    }

    fn unreachable(&self, status: Status) -> Status {
        Status::unavailable(format!(
            "etcd ({}) did not answer: {}",
            self.members.join(","),
            status.message()
        ))
    }

    /// A linearizable read.
    pub async fn range(&self, req: rpc::RangeRequest) -> Result<rpc::RangeResponse, Status> {
        self.retried(|c| {
            let req = req.clone();
            async move {
                KvClient::new(c)
                    .range(Self::request(req))
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// A transaction, tried on each member while members fail. A
    /// transaction that committed on a member that failed before answering
    /// may so be sent twice: callers make theirs safe to repeat (their
    /// compares fail the second time, and they check whether the first
    /// took).
    pub async fn txn(&self, req: rpc::TxnRequest) -> Result<rpc::TxnResponse, Status> {
        self.retried(|c| {
            let req = req.clone();
            async move {
                KvClient::new(c)
                    .txn(Self::request(req))
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// A new lease of `ttl` (rounded up to whole seconds, as etcd counts);
    /// returns its id and the ttl etcd granted (it may raise it).
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), Status> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let r = self
            .retried(|c| async move {
                LeaseClient::new(c)
                    .lease_grant(Self::request(rpc::LeaseGrantRequest {
                        ttl: seconds as i64,
                        id: 0,
                    }))
                    .await
                    .map(tonic::Response::into_inner)
            })
            .await?;
        if !r.error.is_empty() {
            return Err(Status::unavailable(format!(
                "etcd refused a lease: {}",
                r.error
            )));
        }
        Ok((r.id, Duration::from_secs(r.ttl.max(1) as u64)))
    }

    /// Revokes a lease (and so deletes its keys); a lease already gone is
    /// not an error.
    pub async fn revoke(&self, id: i64) -> Result<(), Status> {
        let revoked = self
            .retried(|c| async move {
                LeaseClient::new(c)
                    .lease_revoke(Self::request(rpc::LeaseRevokeRequest { id }))
                    .await
                    .map(drop)
            })
            .await;
        match revoked {
            Err(s) if s.code() == Code::NotFound || s.message().contains("lease not found") => {
                Ok(())
            }
            other => other,
        }
    }

    /// Renews lease `id`; `None` when etcd no longer knows it.
    pub async fn keep_alive(&self, id: i64) -> Result<Option<Duration>, Status> {
        let mut slot = self.keepalive.lock().await;
        let mut last = None;
        // The open stream first; then a fresh one on each member in turn.
        for _ in 0..=self.channels.len() {
            let (i, channel) = self.pick();
            let answered = tokio::time::timeout(CALL_TIMEOUT, async {
                match slot.as_mut() {
                    Some(stream) => {
                        stream
                            .requests
                            .send(rpc::LeaseKeepAliveRequest { id })
                            .await
                            .map_err(|_| Status::unavailable("lease keep-alive stream closed"))?;
                    }
                    None => {
                        // etcd answers the call only once it has a request,
                        // so the first one is queued before calling.
                        let (tx, rx) = mpsc::channel(1);
                        tx.try_send(rpc::LeaseKeepAliveRequest { id })
                            .expect("an empty channel");
                        let mut request = tonic::Request::new(ReceiverStream::new(rx));
                        request.set_timeout(Duration::from_secs(24 * 3600));
                        let answers = LeaseClient::new(channel)
                            .lease_keep_alive(request)
                            .await?
                            .into_inner();
                        *slot = Some(KeepAlive {
                            requests: tx,
                            answers,
                        });
                    }
                }
                let stream = slot.as_mut().expect("opened above");
                stream
                    .answers
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("lease keep-alive stream ended"))
            })
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("lease keep-alive unanswered")));
            match answered {
                Ok(answer) if answer.id == id => {
                    return Ok((answer.ttl > 0).then(|| Duration::from_secs(answer.ttl as u64)));
                }
                Ok(_) => {
                    // Out of step (an answer to an abandoned request): start over.
                    *slot = None;
                }
                Err(status) => {
                    *slot = None;
                    if member_failed(&status) {
                        self.fail_over(i, &status);
                    }
                    last = Some(status);
                }
            }
        }
        Err(self
            .unreachable(last.unwrap_or_else(|| Status::unavailable("lease keep-alive failed"))))
    }

    /// Opens a watch on the current member (failing over if it is down).
    /// The watch requires a leader: a member cut off from the cluster ends
    /// it instead of going quiet.
    pub async fn watch(
        &self,
        create: rpc::WatchCreateRequest,
    ) -> Result<Streaming<rpc::WatchResponse>, Status> {
        self.retried(|c| {
            let create = create.clone();
            async move {
                let first = rpc::WatchRequest {
                    request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(create)),
                };
                // The request stream stays open (held by the server side's
                // reader) until the watch ends: a stream that never yields
                // again after the create request.
                let requests = futures::stream::iter([first]).chain(futures::stream::pending());
                let mut request = tonic::Request::new(requests);
                request
                    .metadata_mut()
                    .insert("hasleader", "true".parse().expect("ascii"));
                tokio::time::timeout(CALL_TIMEOUT, WatchClient::new(c).watch(request))
                    .await
                    .map_err(|_| Status::deadline_exceeded("watch did not open"))?
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }
}

use futures::StreamExt as _;

/// The key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let u = StoreUrl::parse("etcd://127.0.0.1:2379,etcd-1.etcd:2379").unwrap();
        assert_eq!(u.members, ["127.0.0.1:2379", "etcd-1.etcd:2379"]);
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        let u = StoreUrl::parse("etcd://a:1/mesh/prod/").unwrap();
        assert_eq!(u.prefix, "/mesh/prod");
        assert_eq!(u.to_string(), "etcd://a:1/mesh/prod");
        for bad in [
            "127.0.0.1:2379",
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:1,,b:2",
            "etcd://:1",
            "etcd://a:99999",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        let many = (0..17).map(|i| format!("h{i}:1")).collect::<Vec<_>>();
        let e = StoreUrl::parse(&format!("etcd://{}", many.join(","))).unwrap_err();
        assert!(e.contains("at most 16"), "{e}");
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }
}
