//! Sending one request to one endpoint, and telling apart the ways that
//! can fail: never sent (safe to send elsewhere) or failed after sending.

use std::error::Error as _;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;

use crate::body::RequestBody;
use crate::endpoint::Endpoint;

/// Why an attempt produced no response.
#[derive(Debug)]
pub enum AttemptError {
    /// The request never left (no connection, or the connection refused
    /// it before reading it); it is handed back, body untouched.
    NotSent(Box<Request<RequestBody>>, String),
    /// The request was sent, then the stream or connection failed. The
    /// flag says the peer guarantees it did not process it (HTTP/2
    /// REFUSED_STREAM).
    Failed(String, bool),
}

/// The request line for `endpoint`: the caller's path on the endpoint's
/// address.
pub fn uri_for(endpoint: &Endpoint, path: &PathAndQuery) -> Uri {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.authority.clone())
        .path_and_query(path.clone())
        .build()
        .expect("scheme, authority and path make a URI")
}

/// Builds the request of one attempt.
pub fn request(uri: Uri, headers: &HeaderMap, body: RequestBody) -> Request<RequestBody> {
    let mut request = Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers.clone();
    request
}

/// Sends `request` on `endpoint`'s pooled connection.
pub async fn send(
    endpoint: &Endpoint,
    request: Request<RequestBody>,
) -> Result<Response<Incoming>, AttemptError> {
    // The attempt's deadline (outbound sets `grpc-timeout` to the time
    // left): a connection that does not come up in half of it leaves the
    // call time to go elsewhere.
    let deadline = request
        .headers()
        .get("grpc-timeout")
        .and_then(crate::grpc::parse_timeout)
        .map(|left| tokio::time::Instant::now() + left);
    let mut sender = match endpoint.sender_by(deadline).await {
        Ok(sender) => sender,
        Err(e) => return Err(AttemptError::NotSent(Box::new(request), e.to_string())),
    };
    match sender.try_send_request(request).await {
        Ok(response) => Ok(response),
        Err(mut e) => {
            if sender.is_closed() {
                endpoint.reset();
            }
            match e.take_message() {
                Some(request) => Err(AttemptError::NotSent(
                    Box::new(request),
                    format!("{}: {}", endpoint.addr, e.error()),
                )),
                None => {
                    let error = e.into_error();
                    let refused = refused_stream(&error);
                    Err(AttemptError::Failed(
                        format!("{}: {}", endpoint.addr, describe(&error)),
                        refused,
                    ))
                }
            }
        }
    }
}

/// Whether the peer refused the stream unprocessed (REFUSED_STREAM, or a
/// GOAWAY that the stream came after).
fn refused_stream(error: &hyper::Error) -> bool {
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
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
