//! JSON over HTTP for callers that do not speak gRPC.
//!
//! `POST /<package.Service>/<Method>` with a JSON body (the proto3 JSON
//! mapping) becomes a gRPC call built from the registered contract, sent
//! into the mesh like any other call. A unary answer comes back as one
//! JSON object; a server stream as newline-delimited JSON, one
//! `{"result": …}` line per message and, if the stream fails part way,
//! a last `{"error": …}` line (the grpc-gateway convention). Errors are
//! `{"code": 5, "status": "NOT_FOUND", "message": "…"}` with a fitting
//! HTTP status.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use prost_reflect::{DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions};
use tonic::Code;

use crate::body::{BoxError, ResponseBody};
use crate::grpc;

/// The body of every JSON answer.
pub type JsonBody = UnsyncBoxBody<Bytes, BoxError>;

/// Whether `headers` announce a JSON body.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
}

/// The HTTP status that stands for a gRPC code (as grpc-gateway maps them).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_value(code: Code, message: &str) -> serde_json::Value {
    serde_json::json!({
        "code": code as i32,
        "status": grpc::code_name(code),
        "message": message,
    })
}

/// A JSON error answer.
pub fn error(code: Code, message: &str) -> Response<JsonBody> {
    json_response(http_status(code), &error_value(code, message))
}

/// `value` as one JSON line, with `status`.
fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<JsonBody> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn full(bytes: Bytes) -> JsonBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Headers of the JSON request that must not travel on the gRPC call.
const NOT_FORWARDED: [header::HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::HOST,
    header::CONNECTION,
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// A JSON request turned into a gRPC one.
pub struct Transcoded {
    /// The gRPC request, ready for the outbound path.
    pub request: Request<JsonBody>,
    /// How to read the answer.
    pub output: MessageDescriptor,
    /// Whether the method streams its answer.
    pub server_streaming: bool,
}

impl std::fmt::Debug for Transcoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcoded")
            .field("path", self.request.uri())
            .finish_non_exhaustive()
    }
}

/// Reads the JSON body of `request` (at most `limit` bytes) and encodes it
/// as the input message of `method`.
pub async fn transcode<B>(
    request: Request<B>,
    method: &MethodDescriptor,
    limit: usize,
) -> Result<Transcoded, Response<JsonBody>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let full_name = format!("{}/{}", method.parent_service().full_name(), method.name());
    if method.is_client_streaming() {
        return Err(error(
            Code::Unimplemented,
            &format!("{full_name} streams its requests; call it with gRPC, not JSON"),
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                Code::ResourceExhausted,
                &format!("the JSON body is larger than the edge's limit of {limit} bytes"),
            ));
        }
        Err(e) => {
            return Err(error(
                Code::Cancelled,
                &format!("the request body could not be read: {e}"),
            ));
        }
    };
    let input = method.input();
    let message = if bytes.iter().all(u8::is_ascii_whitespace) {
        DynamicMessage::new(input.clone())
    } else {
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match DynamicMessage::deserialize(input.clone(), &mut de).and_then(|m| {
            de.end()?;
            Ok(m)
        }) {
            Ok(m) => m,
            Err(e) => {
                return Err(error(
                    Code::InvalidArgument,
                    &format!("the body is not a valid {} in JSON: {e}", input.full_name()),
                ));
            }
        }
    };
    let encoded = prost::Message::encode_to_vec(&message);
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.put_slice(&encoded);

    let mut headers = parts.headers;
    for name in &NOT_FORWARDED {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let mut grpc_request = Request::new(full(frame.freeze()));
    *grpc_request.method_mut() = http::Method::POST;
    *grpc_request.uri_mut() = parts.uri;
    *grpc_request.version_mut() = http::Version::HTTP_2;
    *grpc_request.headers_mut() = headers;
    Ok(Transcoded {
        request: grpc_request,
        output: method.output(),
        server_streaming: method.is_server_streaming(),
    })
}

/// Turns the gRPC answer to a transcoded call back into JSON, reading no
/// message larger than `limit` bytes: a message's length prefix is the
/// backend's word, and must not decide how much the edge buffers.
pub async fn answer(
    response: Response<ResponseBody>,
    output: MessageDescriptor,
    server_streaming: bool,
    limit: usize,
) -> Response<JsonBody> {
    let (parts, body) = response.into_parts();
    if let Some(code) = grpc::status_of(&parts.headers)
        && code != Code::Ok
    {
        // Trailers-only: the headers are the trailers.
        let mut answer = error(code, &grpc::message_of(&parts.headers));
        copy_metadata(&parts.headers, "grpc-trailer-", answer.headers_mut());
        return answer;
    }
    let mut reader = Reader {
        body,
        output,
        buffer: BytesMut::new(),
        messages: VecDeque::new(),
        status: None,
        trailers: None,
        done: false,
        limit,
    };
    if server_streaming {
        let mut response = Response::new(
            NdJson {
                reader,
                finished: false,
            }
            .boxed_unsync(),
        );
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        return response;
    }
    let mut first: Option<serde_json::Value> = None;
    let mut answer = loop {
        match std::future::poll_fn(|cx| reader.poll_next(cx)).await {
            Some(Item::Message(m)) => {
                if first.is_some() {
                    return error(
                        Code::Internal,
                        "the service answered a unary call with more than one message",
                    );
                }
                first = Some(m);
            }
            Some(Item::End(Code::Ok, _)) | None => {
                break match first.take() {
                    Some(value) => json_response(StatusCode::OK, &value),
                    None => error(Code::Internal, "the service answered with no message"),
                };
            }
            Some(Item::End(code, message)) => break error(code, &message),
        }
    };
    // The service's own metadata, as grpc-gateway passes it on: response
    // headers as `grpc-metadata-<name>`, trailers as `grpc-trailer-<name>`
    // (a unary answer is whole before it is sent, so both fit in headers).
    let headers = answer.headers_mut();
    copy_metadata(&parts.headers, "grpc-metadata-", headers);
    if let Some(trailers) = &reader.trailers {
        copy_metadata(trailers, "grpc-trailer-", headers);
    }
    answer
}

/// Most metadata entries passed on from one answer.
const MAX_METADATA: usize = 64;

/// Copies the application's metadata in `from` into `to`, each name
/// prefixed; gRPC's and HTTP's own headers stay behind.
fn copy_metadata(from: &HeaderMap, prefix: &str, to: &mut HeaderMap) {
    const RESERVED: [&str; 12] = [
        "content-type",
        "content-length",
        "te",
        "trailer",
        "transfer-encoding",
        "connection",
        "date",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "grpc-encoding",
        "grpc-accept-encoding",
    ];
    for (name, value) in from
        .iter()
        .filter(|(name, _)| !RESERVED.contains(&name.as_str()))
        .take(MAX_METADATA)
    {
        if let Ok(name) = header::HeaderName::from_bytes(format!("{prefix}{name}").as_bytes()) {
            to.append(name, value.clone());
        }
    }
}

enum Item {
    Message(serde_json::Value),
    End(Code, String),
}

/// Reads gRPC messages out of a response body, as JSON values.
struct Reader {
    body: ResponseBody,
    output: MessageDescriptor,
    buffer: BytesMut,
    messages: VecDeque<serde_json::Value>,
    status: Option<(Code, String)>,
    /// The answer's trailers, once read.
    trailers: Option<HeaderMap>,
    done: bool,
    /// Largest message read, in bytes.
    limit: usize,
}

impl Reader {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        loop {
            if let Some(m) = self.messages.pop_front() {
                return Poll::Ready(Some(Item::Message(m)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if let Some((code, message)) = self.status.take() {
                self.done = true;
                return Poll::Ready(Some(Item::End(code, message)));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.status = Some((
                        Code::Internal,
                        "the service's answer ended without a gRPC status".into(),
                    ));
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.buffer.extend_from_slice(&data);
                        if let Err(why) = self.split() {
                            self.status = Some((Code::Internal, why));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let code = grpc::status_of(&trailers).unwrap_or(Code::Unknown);
                            self.status = Some((code, grpc::message_of(&trailers)));
                            self.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }

    /// Moves every whole message in the buffer to `messages`.
    fn split(&mut self) -> Result<(), String> {
        while self.buffer.len() >= 5 {
            if self.buffer[0] != 0 {
                return Err("the service sent a compressed message; the edge's JSON path reads only uncompressed ones".into());
            }
            let len = u32::from_be_bytes([
                self.buffer[1],
                self.buffer[2],
                self.buffer[3],
                self.buffer[4],
            ]) as usize;
            if len > self.limit {
                return Err(format!(
                    "the service's answer is larger than the edge's JSON limit of {} bytes (a message of {len} bytes)",
                    self.limit
                ));
            }
            if self.buffer.len() < 5 + len {
                break;
            }
            self.buffer.advance(5);
            let bytes = self.buffer.split_to(len).freeze();
            let message = DynamicMessage::decode(self.output.clone(), bytes).map_err(|e| {
                format!(
                    "the service's answer is not a valid {}: {e}",
                    self.output.full_name()
                )
            })?;
            let value = message
                .serialize_with_options(
                    serde_json::value::Serializer,
                    &SerializeOptions::new().skip_default_fields(true),
                )
                .map_err(|e| format!("the answer does not convert to JSON: {e}"))?;
            self.messages.push_back(value);
        }
        Ok(())
    }
}

/// A server stream as newline-delimited JSON.
struct NdJson {
    reader: Reader,
    finished: bool,
}

impl Body for NdJson {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        let line = match this.reader.poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) | Poll::Ready(Some(Item::End(Code::Ok, _))) => {
                this.finished = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Item::Message(m))) => serde_json::json!({ "result": m }),
            Poll::Ready(Some(Item::End(code, message))) => {
                this.finished = true;
                serde_json::json!({ "error": error_value(code, &message) })
            }
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_fitting_http_statuses() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn only_json_content_types_are_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        assert!(!is_json(&h));
    }
}
