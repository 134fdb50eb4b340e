//! Innermost on the outbound side: one attempt on one endpoint, over its
//! pooled HTTP/2 connection (mTLS to a peer sidecar, h2c to a static
//! upstream), telling apart the ways it can go:
//!
//! - never sent (no connection, or the connection refused the request
//!   before reading it): the request is handed back, body untouched, and
//!   may go anywhere else;
//! - sent, then the stream or connection failed (HTTP/2 REFUSED_STREAM
//!   says the peer did not process it);
//! - an answer that is not gRPC (a non-200 HTTP status);
//! - a gRPC answer, with its final status when that is known at once: in
//!   the headers (trailers-only), or, when the attempt may still be
//!   retried, in trailers that arrive as the body's first frame.

use std::sync::Arc;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body::Frame;
use tokio::time::Instant;
use tonic::Code;

use super::Handle;
use crate::body::{Pump, Recorder, RequestBody, UpstreamBody, first_frame};
use crate::endpoint::{ConnectError, Endpoint};
use crate::grpc;
use crate::retry::{self, Pushback};

/// One attempt, for one endpoint.
#[derive(Debug)]
pub struct Dispatch {
    /// Where to send it.
    pub endpoint: Arc<Endpoint>,
    /// The method's path.
    pub path: PathAndQuery,
    /// The request headers (with `grpc-timeout` set to the time left).
    pub headers: HeaderMap,
    /// The request body.
    pub body: RequestBody,
    /// When the call must be over.
    pub deadline: Option<Instant>,
    /// Set when the attempt may still be retried: then a response with no
    /// status in its headers has its first frame read, once the caller has
    /// sent everything, to see a status that follows at once in trailers.
    pub peek: Option<Recorder>,
}

/// Why a request never left.
#[derive(Debug, thiserror::Error)]
pub enum NotSent {
    /// No connection could be had.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection refused the request before reading it (it was
    /// closing, or going away).
    #[error("{addr}: {source}")]
    Refused {
        /// The endpoint.
        addr: std::net::SocketAddr,
        /// What HTTP/2 said.
        source: h2::Error,
    },
}

/// A stream or connection that failed after the request was sent.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {}", describe(.source))]
pub struct Reset {
    /// The endpoint.
    pub addr: std::net::SocketAddr,
    /// What failed.
    pub source: h2::Error,
    /// The peer says it did not process the request (REFUSED_STREAM).
    pub refused: bool,
}

/// A gRPC status that ends a call, as a proxy needs to judge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinalStatus {
    /// The gRPC status.
    pub code: Code,
    /// What the server said about retrying.
    pub pushback: Pushback,
    /// The callee's sidecar says the call never reached the service.
    pub unprocessed: bool,
}

/// A gRPC (HTTP 200) response.
#[derive(Debug)]
pub struct Answered {
    /// Status line and headers.
    pub parts: http::response::Parts,
    /// The rest of the body.
    pub body: UpstreamBody,
    /// A frame already read from the body, to be sent on first.
    pub first: Option<Frame<Bytes>>,
    /// The call's final status, if known already.
    pub status: Option<FinalStatus>,
}

/// How one attempt went.
#[derive(Debug)]
pub enum Attempted {
    /// A gRPC response.
    Answered(Answered),
    /// An HTTP response that is not gRPC (a proxy or load balancer in the
    /// way), with its HTTP status.
    NotGrpc(StatusCode),
    /// The request never left; its headers and body are handed back.
    NotSent {
        /// Why.
        error: NotSent,
        /// The request's headers (none when HTTP/2 had taken them).
        headers: Option<HeaderMap>,
        /// The request's body, untouched.
        body: RequestBody,
    },
    /// Sent, then failed.
    Reset(Reset),
}

/// The endpoint layer: the end of the outbound stack.
#[derive(Debug, Default)]
pub struct ToEndpoint;

impl Handle<Dispatch> for ToEndpoint {
    type Answer = Attempted;

    async fn handle(&self, dispatch: Dispatch) -> Attempted {
        let Dispatch {
            endpoint,
            path,
            headers,
            body,
            deadline,
            peek,
        } = dispatch;
        let response = match send(&endpoint, &path, headers, body, deadline).await {
            Ok(response) => response,
            Err(Unsent::NotSent(error, headers, body)) => {
                return Attempted::NotSent {
                    error,
                    headers,
                    body,
                };
            }
            Err(Unsent::Reset(reset)) => return Attempted::Reset(reset),
        };
        let (parts, mut body) = response.into_parts();
        if parts.status != StatusCode::OK {
            return Attempted::NotGrpc(parts.status);
        }
        if let Some(code) = grpc::status_of(&parts.headers) {
            let status = FinalStatus {
                code,
                pushback: retry::pushback(&parts.headers),
                unprocessed: parts.headers.contains_key(grpc::UNPROCESSED_HEADER),
            };
            return Attempted::Answered(Answered {
                parts,
                body,
                first: None,
                status: Some(status),
            });
        }
        // Only once the caller has sent everything: a streaming caller may
        // be waiting for these very headers before it sends more.
        let mut first = None;
        let mut status = None;
        if peek.is_some_and(|r| r.replayable() && r.complete()) {
            let frame = super::within(deadline, first_frame(&mut body))
                .await
                .flatten();
            if let Some(Ok(frame)) = frame {
                if let Some(trailers) = frame.trailers_ref() {
                    status = Some(FinalStatus {
                        code: grpc::status_of(trailers).unwrap_or(Code::Unknown),
                        pushback: retry::pushback(trailers),
                        unprocessed: false,
                    });
                }
                first = Some(frame);
            }
        }
        Attempted::Answered(Answered {
            parts,
            body,
            first,
            status,
        })
    }
}

/// Why [`send`] has no response.
#[derive(Debug)]
pub enum Unsent {
    /// Never left: the body back, and the headers unless the request had
    /// already been handed to HTTP/2 when the connection refused it.
    NotSent(NotSent, Option<HeaderMap>, RequestBody),
    /// Sent, then failed.
    Reset(Reset),
}

/// Headers that belong to one HTTP/1.1 connection (an edge caller's) and
/// must not be sent on an HTTP/2 stream (RFC 9113, 8.2.2).
const CONNECTION_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Sends one request on `endpoint`'s pooled connection, from the caller's
/// own task: the request body is sent while the response headers are
/// awaited, and whatever of it is left once they arrive goes on with the
/// response body. Waiting for a connection is bounded by `deadline` (see
/// [`Endpoint::sender_by`]).
pub async fn send(
    endpoint: &Endpoint,
    path: &PathAndQuery,
    mut headers: HeaderMap,
    body: RequestBody,
    deadline: Option<Instant>,
) -> Result<Response<UpstreamBody>, Unsent> {
    let sender = match endpoint.sender_by(deadline).await {
        Ok(sender) => sender,
        Err(e) => return Err(Unsent::NotSent(e.into(), Some(headers), body)),
    };
    let mut sender = match sender.ready().await {
        Ok(sender) => sender,
        Err(source) => {
            endpoint.reset();
            let refused = NotSent::Refused {
                addr: endpoint.addr,
                source,
            };
            return Err(Unsent::NotSent(refused, Some(headers), body));
        }
    };
    for name in CONNECTION_HEADERS {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|te| te != "trailers")
    {
        headers.remove(http::header::TE);
    }
    let mut request = Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.authority.clone())
        .path_and_query(path.clone())
        .build()
        .expect("scheme, authority and path make a URI");
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    let end_of_stream = body.is_end_stream();
    let (response, stream) = match sender.send_request(request, end_of_stream) {
        Ok(sent) => sent,
        Err(source) => {
            // The connection went away between `ready` and now (GOAWAY):
            // nothing was sent.
            endpoint.reset();
            let refused = NotSent::Refused {
                addr: endpoint.addr,
                source,
            };
            return Err(Unsent::NotSent(refused, None, body));
        }
    };
    let mut pump = (!end_of_stream).then(|| Pump::new(body, stream));
    let mut response = std::pin::pin!(response);
    let answer = std::future::poll_fn(|cx| {
        if let Some(p) = pump.as_mut()
            && p.poll_send(cx).is_ready()
        {
            pump = None;
        }
        response.as_mut().poll(cx)
    })
    .await;
    match answer {
        Ok(response) => Ok(response.map(|recv| UpstreamBody::new(recv, pump))),
        Err(source) => Err(Unsent::Reset(Reset {
            addr: endpoint.addr,
            refused: source.reason() == Some(h2::Reason::REFUSED_STREAM),
            source,
        })),
    }
}

/// An error with its causes, for a person.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::endpoint::Transport;

    use crate::layer::testing::{TestBody, closed_addr, server};

    fn trailers(code: Code) -> HeaderMap {
        let mut t = HeaderMap::new();
        grpc::set_status(&mut t, code, "");
        t
    }

    fn dispatch(addr: std::net::SocketAddr, peek: Option<Recorder>) -> Dispatch {
        Dispatch {
            endpoint: Endpoint::new(addr, Transport::H2c),
            path: PathAndQuery::from_static("/a.v1.S/M"),
            headers: HeaderMap::from_iter([(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            )]),
            body: RequestBody::Empty,
            deadline: None,
            peek,
        }
    }

    /// A recorder whose caller has sent everything.
    async fn complete_recorder() -> Recorder {
        let recorder = Recorder::new(Full::new(Bytes::from_static(b"x")), 64);
        recorder.body().collect().await.unwrap();
        assert!(recorder.complete());
        recorder
    }

    #[tokio::test]
    async fn a_request_that_cannot_connect_comes_back_whole() {
        // Bound, then closed: nothing listens there.
        let addr = closed_addr().await;
        let mut d = dispatch(addr, None);
        d.headers
            .insert("x-keep", http::HeaderValue::from_static("me"));
        match ToEndpoint.handle(d).await {
            Attempted::NotSent { error, headers, .. } => {
                assert!(matches!(error, NotSent::Connect(_)), "{error}");
                assert_eq!(headers.unwrap()["x-keep"], "me");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_that_is_not_grpc_is_told_apart() {
        let addr = server(|| {
            Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        })
        .await;
        let attempted = ToEndpoint.handle(dispatch(addr, None)).await;
        assert!(
            matches!(attempted, Attempted::NotGrpc(StatusCode::BAD_GATEWAY)),
            "{attempted:?}"
        );
    }

    #[tokio::test]
    async fn a_trailers_only_status_is_read_from_the_headers() {
        let addr = server(|| {
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.headers_mut() = trailers(Code::Unavailable);
            r.headers_mut().insert(
                grpc::UNPROCESSED_HEADER,
                http::HeaderValue::from_static("true"),
            );
            r
        })
        .await;
        let Attempted::Answered(a) = ToEndpoint.handle(dispatch(addr, None)).await else {
            panic!("a gRPC answer");
        };
        let status = a.status.expect("known at once");
        assert_eq!(status.code, Code::Unavailable);
        assert!(status.unprocessed);
    }

    #[tokio::test]
    async fn a_status_in_the_first_frame_is_seen_only_when_it_may_be_retried() {
        fn trailers_after_headers() -> Response<TestBody> {
            let frames = futures::stream::iter([Ok::<_, Infallible>(Frame::trailers(trailers(
                Code::Unavailable,
            )))]);
            Response::new(StreamBody::new(frames).boxed())
        }
        let addr = server(trailers_after_headers).await;
        let Attempted::Answered(peeked) = ToEndpoint
            .handle(dispatch(addr, Some(complete_recorder().await)))
            .await
        else {
            panic!("a gRPC answer");
        };
        assert_eq!(peeked.status.map(|s| s.code), Some(Code::Unavailable));
        assert!(peeked.first.is_some(), "the frame read is kept to pass on");

        let Attempted::Answered(streamed) = ToEndpoint.handle(dispatch(addr, None)).await else {
            panic!("a gRPC answer");
        };
        assert_eq!(streamed.status, None, "not read: passed on as it streams");
        assert!(streamed.first.is_none());
    }
}
