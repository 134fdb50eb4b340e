//! Innermost on the inbound side: the local service, over plaintext h2c
//! on its pooled connection. The proxy's own response headers are removed
//! from whatever the service answers (only this proxy may tell the
//! caller's proxy that a call was never processed). A service that cannot
//! be reached, or whose stream fails, is reported as UNAVAILABLE, marked
//! unprocessed when the service never saw the call, so that the caller's
//! side may send it to another instance whatever the method.

use std::sync::Arc;

use http::HeaderValue;
use tonic::Code;

use super::authorize::Authorized;
use super::endpoint::{self, Unsent};
use super::{Answer, Handle};
use crate::body::ResponseBody;
use crate::endpoint::Endpoint;
use crate::grpc;

/// The app layer: the end of the inbound stack.
#[derive(Debug)]
pub struct App {
    app: Arc<Endpoint>,
}

impl App {
    /// Sends calls to the local service at `app`.
    pub fn new(app: Arc<Endpoint>) -> Self {
        Self { app }
    }
}

impl Handle<Authorized> for App {
    type Answer = Answer;

    async fn handle(&self, authorized: Authorized) -> Answer {
        let Authorized { call, service, .. } = authorized;
        let sent = endpoint::send(
            &self.app,
            call.method.path(),
            call.headers,
            call.body,
            call.deadline,
        )
        .await;
        match sent {
            Ok(mut response) => {
                for name in grpc::PROXY_RESPONSE_HEADERS {
                    response.headers_mut().remove(name);
                }
                if grpc::status_of(response.headers()).is_some() {
                    return response.map(|_| ResponseBody::default());
                }
                response.map(|body| ResponseBody::upstream(body, None))
            }
            Err(Unsent::NotSent(why, _, _)) => {
                tracing::warn!(%service, app = %self.app.addr, reason = %why, "local service unreachable");
                unprocessed(grpc::status_response(
                    Code::Unavailable,
                    &format!("{service} is not reachable behind its sidecar: {why}"),
                ))
            }
            Err(Unsent::Reset(reset)) => {
                let refused = reset.refused;
                let answer = grpc::status_response(
                    Code::Unavailable,
                    &format!("{service} failed mid-call: {reset}"),
                );
                if refused { unprocessed(answer) } else { answer }
            }
        }
    }
}

/// Marks an answer as given before the service saw the call.
fn unprocessed(mut answer: Answer) -> Answer {
    answer
        .headers_mut()
        .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
    answer
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;
    use crate::endpoint::Transport;
    use crate::layer::testing::{call, closed_addr, server, status};

    fn authorized() -> Authorized {
        Authorized {
            call: call(&[("content-type", "application/grpc")]),
            service: "echo".into(),
            policy: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_service_cannot_set_the_proxys_own_headers() {
        let addr = server(|| {
            let mut r = http::Response::new(Full::new(Bytes::new()).boxed());
            grpc::set_status(r.headers_mut(), Code::Unavailable, "");
            r.headers_mut()
                .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
            r.headers_mut()
                .insert(grpc::CALLER_HEADER, HeaderValue::from_static("spiffe://x"));
            r
        })
        .await;
        let app = App::new(Endpoint::new(addr, Transport::H2c));
        let answer = app.handle(authorized()).await;
        assert_eq!(status(&answer), Some(Code::Unavailable));
        for name in grpc::PROXY_RESPONSE_HEADERS {
            assert!(!answer.headers().contains_key(name), "{name}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_service_is_unavailable_and_unprocessed() {
        let addr = closed_addr().await;
        let app = App::new(Endpoint::new(addr, Transport::H2c));
        let answer = app.handle(authorized()).await;
        assert_eq!(status(&answer), Some(Code::Unavailable));
        assert!(
            grpc::message_of(answer.headers()).contains("echo is not reachable behind its sidecar")
        );
        assert_eq!(answer.headers()[grpc::UNPROCESSED_HEADER], "true");
    }
}
