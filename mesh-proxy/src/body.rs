//! Request and response bodies as they cross the proxy.
//!
//! Bodies stream through untouched. Two exceptions, each paid for only
//! when needed: a request that may be retried is recorded (up to a cap) so
//! it can be replayed to another endpoint, and a response is watched for
//! its end so the call's deadline and final status are enforced and
//! counted.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tonic::Code;

use crate::grpc;

/// Errors of bodies in flight.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request the proxy sends upstream.
#[derive(Debug, Default)]
pub enum RequestBody {
    /// Streamed straight from the caller.
    Direct(Incoming),
    /// Any other body (the edge's gRPC-Web and JSON callers), streamed.
    /// In a mutex only to be `Sync`: it is polled through `&mut`, which
    /// needs no lock.
    Other(Mutex<UnsyncBoxBody<Bytes, BoxError>>),
    /// Streamed from the caller and recorded, or replayed (a retry).
    Replay(ReplayBody),
    /// No body.
    #[default]
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Direct(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Self::Other(body) => {
                let body = body.get_mut().unwrap_or_else(|e| e.into_inner());
                Pin::new(body).poll_frame(cx)
            }
            Self::Replay(body) => Pin::new(body).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body) => body.is_end_stream(),
            Self::Other(body) => body.lock().is_ok_and(|b| b.is_end_stream()),
            Self::Replay(body) => body.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Direct(body) => body.size_hint(),
            Self::Other(body) => body.lock().map(|b| b.size_hint()).unwrap_or_default(),
            Self::Replay(_) => SizeHint::default(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        Self::Direct(body)
    }
}

impl From<UnsyncBoxBody<Bytes, BoxError>> for RequestBody {
    fn from(body: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        Self::Other(Mutex::new(body))
    }
}

impl RequestBody {
    /// Whether this is a caller's body not yet sent anywhere.
    pub fn is_fresh(&self) -> bool {
        matches!(self, Self::Direct(_) | Self::Other(_))
    }
}

/// What the attempts of one call share: the caller's body, and as much of
/// it as has been read and recorded.
#[derive(Debug)]
struct Recording {
    source: Option<UnsyncBoxBody<Bytes, BoxError>>,
    frames: Vec<Bytes>,
    size: usize,
    cap: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    read_any: bool,
}

/// A request body recorded as the first attempt streams it, so that a
/// retry can replay what was sent and then go on reading from the caller.
/// Recording stops (and the call can no longer be retried) once more than
/// `cap` bytes have gone through.
#[derive(Debug, Clone)]
pub struct Recorder {
    shared: Arc<Mutex<Recording>>,
}

impl Recorder {
    /// Starts recording `source`, keeping at most `cap` bytes.
    pub fn new<B>(source: B, cap: usize) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            shared: Arc::new(Mutex::new(Recording {
                source: Some(source.map_err(Into::into).boxed_unsync()),
                frames: Vec::new(),
                size: 0,
                cap,
                overflowed: false,
                trailers: None,
                ended: false,
                read_any: false,
            })),
        }
    }

    /// A body for the next attempt, which replays from the start.
    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        }
    }

    /// Whether the caller has sent its whole request.
    pub fn complete(&self) -> bool {
        self.shared.lock().expect("recording lock").ended
    }

    /// Whether another attempt could send the whole request again.
    pub fn replayable(&self) -> bool {
        let recording = self.shared.lock().expect("recording lock");
        !recording.overflowed || !recording.read_any
    }
}

/// One attempt's view of a [`Recorder`].
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Recording>>,
    pos: usize,
    trailers_sent: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn is_end_stream(&self) -> bool {
        let rec = self.shared.lock().expect("recording lock");
        rec.ended && self.pos >= rec.frames.len() && (self.trailers_sent || rec.trailers.is_none())
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // Attempts run one after another, so the lock is never contended.
        let mut rec = this.shared.lock().expect("recording lock");
        if this.pos < rec.frames.len() {
            let data = rec.frames[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if rec.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(trailers) = rec.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = rec.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                rec.ended = true;
                rec.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                rec.read_any = true;
                match frame.into_data() {
                    Ok(data) => {
                        if !rec.overflowed {
                            if rec.size + data.len() > rec.cap {
                                rec.overflowed = true;
                                rec.frames = Vec::new();
                            } else {
                                rec.size += data.len();
                                rec.frames.push(data.clone());
                                this.pos = rec.frames.len();
                            }
                        }
                        // Knowing the end now lets the last DATA frame carry
                        // END_STREAM (an empty DATA frame per call instead
                        // is what HTTP/2 flood protection counts against us).
                        if rec.source.as_ref().is_some_and(|s| s.is_end_stream()) {
                            rec.ended = true;
                            rec.source = None;
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => {
                        rec.ended = true;
                        rec.source = None;
                        this.trailers_sent = true;
                        if let Ok(trailers) = frame.into_trailers() {
                            rec.trailers = Some(trailers.clone());
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Poll::Ready(None)
                    }
                }
            }
        }
    }
}

/// Sends a request body on an HTTP/2 stream: each frame as soon as the
/// caller has sent it and the peer's flow control allows, the last DATA
/// frame carrying END_STREAM when the body knows it is the last, then any
/// trailers. Driven by whoever holds it: first the call's own task while
/// it waits for the response headers, then the response body (see
/// [`UpstreamBody`]) for a request that is still streaming; no task of
/// its own.
#[derive(Debug)]
pub struct Pump {
    body: RequestBody,
    stream: h2::SendStream<Bytes>,
    pending: Option<Bytes>,
}

impl Pump {
    /// Sends `body` on `stream`.
    pub fn new(body: RequestBody, stream: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            pending: None,
        }
    }

    /// Moves the body along; ready once all of it has gone (or the stream
    /// failed, which the response then reports).
    pub fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(data) = self.pending.as_mut() {
                if self.stream.capacity() == 0 {
                    self.stream.reserve_capacity(data.len());
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
                        Poll::Ready(Some(Ok(_))) => continue,
                    }
                }
                let n = self.stream.capacity().min(data.len());
                let chunk = data.split_to(n);
                let last = data.is_empty() && self.body.is_end_stream();
                if data.is_empty() {
                    self.pending = None;
                }
                if self.stream.send_data(chunk, last).is_err() || last {
                    return Poll::Ready(());
                }
                continue;
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::debug!(%error, "request body failed; resetting the upstream stream");
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    // An empty frame needs no flow-control capacity; the
                    // last one only carries END_STREAM.
                    Ok(data) if data.is_empty() => {
                        if self.body.is_end_stream() {
                            let _ = self.stream.send_data(data, true);
                            return Poll::Ready(());
                        }
                    }
                    Ok(data) => self.pending = Some(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = self.stream.send_trailers(trailers);
                        }
                        return Poll::Ready(());
                    }
                },
            }
        }
    }
}

/// A response body read from an HTTP/2 stream, returning flow-control
/// capacity as it is read, and moving along a request body still being
/// sent.
#[derive(Debug)]
pub struct UpstreamBody {
    recv: h2::RecvStream,
    // Boxed: only a request still streaming when its response begins has
    // one.
    pump: Option<Box<Pump>>,
    data_done: bool,
}

impl UpstreamBody {
    /// The body of `recv`; `pump` is the request body, if not sent yet.
    pub fn new(recv: h2::RecvStream, pump: Option<Pump>) -> Self {
        Self {
            recv,
            pump: pump.map(Box::new),
            data_done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if let Some(pump) = this.pump.as_mut()
            && pump.poll_send(cx).is_ready()
        {
            this.pump = None;
        }
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Called once when a call ends, with its final gRPC status.
pub trait CallObserver: Send + Sync + 'static {
    /// The call ended with `code` after `elapsed` since it began.
    fn finished(&self, code: Code, started: Instant);
}

/// Reports a call's end exactly once; a call dropped before its end (the
/// caller went away) is reported as CANCELLED.
pub struct CallEnd {
    observer: Option<Arc<dyn CallObserver>>,
    started: Instant,
}

impl std::fmt::Debug for CallEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallEnd").finish_non_exhaustive()
    }
}

impl CallEnd {
    /// Begins watching a call that started at `started`.
    pub fn new(observer: Arc<dyn CallObserver>, started: Instant) -> Self {
        Self {
            observer: Some(observer),
            started,
        }
    }

    /// Reports the end now.
    pub fn finish(&mut self, code: Code) {
        if let Some(observer) = self.observer.take() {
            observer.finished(code, self.started);
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The body of a response the proxy sends back to a caller.
#[derive(Debug, Default)]
pub struct ResponseBody {
    first: Option<Frame<Bytes>>,
    upstream: Option<UpstreamBody>,
    deadline: Option<Pin<Box<Sleep>>>,
    end: Option<CallEnd>,
    /// Layers' own ends (a circuit's outcome, a limit's place), reported
    /// with the call's; empty, it costs nothing.
    more_ends: Vec<CallEnd>,
    done: bool,
}

impl ResponseBody {
    /// An upstream response body, passed through; `first` is a frame
    /// already read from it, sent first.
    pub fn upstream(upstream: UpstreamBody, first: Option<Frame<Bytes>>) -> Self {
        Self {
            first,
            upstream: Some(upstream),
            ..Self::default()
        }
    }

    /// Ends the stream with DEADLINE_EXCEEDED at `deadline`, cancelling
    /// the upstream stream.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        self
    }

    /// Reports the call's final status to `end`.
    pub fn with_end(mut self, end: CallEnd) -> Self {
        self.end = Some(end);
        self
    }

    /// Reports the call's final status to `end` too (after the ends given
    /// before it).
    pub fn with_another_end(mut self, end: CallEnd) -> Self {
        self.more_ends.push(end);
        self
    }

    fn finish(&mut self, code: Code) {
        self.done = true;
        self.upstream = None;
        self.deadline = None;
        for end in &mut self.more_ends {
            end.finish(code);
        }
        if let Some(end) = self.end.as_mut() {
            end.finish(code);
        }
    }

    fn observe(&mut self, frame: &Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref() {
            let code = grpc::status_of(trailers).unwrap_or(Code::Unknown);
            self.finish(code);
        }
    }

    fn end_with(
        &mut self,
        code: Code,
        message: &str,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.finish(code);
        let mut trailers = HeaderMap::new();
        grpc::set_status(&mut trailers, code, message);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(frame) = this.first.take() {
            this.observe(&frame);
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(upstream) = this.upstream.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        match Pin::new(upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.observe(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                tracing::debug!(%error, "upstream response stream failed");
                this.end_with(
                    Code::Unavailable,
                    &format!("the upstream connection failed mid-response: {error}"),
                )
            }
            Poll::Ready(None) => {
                // A response must end with trailers; one that does not
                // was cut short.
                this.end_with(
                    Code::Internal,
                    "the upstream response ended without a gRPC status",
                )
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    this.end_with(
                        Code::DeadlineExceeded,
                        "deadline exceeded while the response was streaming",
                    )
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.first.is_none() && self.upstream.is_none())
    }
}

/// Reads a response body's first frame, for a proxy that must see whether
/// a response carries only a status (and so may be retried) before it
/// commits to passing it on. `None` when the body ended at once.
pub async fn first_frame<B: Body + Unpin>(
    body: &mut B,
) -> Option<Result<Frame<B::Data>, B::Error>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn source(
        chunks: &[&'static str],
        trailers: bool,
    ) -> impl Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-end", "yes".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn read_all(body: ReplayBody) -> (String, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (
            String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
            trailers,
        )
    }

    /// Sends `body` through a [`Pump`] on an in-memory HTTP/2 connection
    /// and returns what the server received: the data, and whether the
    /// stream ended.
    async fn pumped(body: RequestBody) -> (Vec<u8>, Option<HeaderMap>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (request, _respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut recv = request.into_body();
            let mut data = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.unwrap();
                let _ = recv.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            (data, recv.trailers().await.unwrap())
        });
        let (send, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::post("http://x/a.v1.S/M").body(()).unwrap();
        let (_response, stream) = send
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        let mut pump = Pump::new(body, stream);
        std::future::poll_fn(|cx| pump.poll_send(cx)).await;
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the stream ends")
            .unwrap()
    }

    #[tokio::test]
    async fn a_pump_ends_the_stream_after_an_empty_last_frame_and_sends_trailers() {
        let empty_last = StreamBody::new(futures::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::new())),
        ]));
        let body = RequestBody::from(empty_last.boxed_unsync());
        let (data, trailers) = pumped(body).await;
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());

        let (data, trailers) = pumped(RequestBody::from(
            source(&["ab", "cd"], true).boxed_unsync(),
        ))
        .await;
        assert_eq!(data, b"abcd");
        assert_eq!(trailers.unwrap()["x-end"], "yes");
    }

    #[tokio::test]
    async fn a_recorded_body_replays_whole_with_its_trailers() {
        let recorder = Recorder::new(source(&["ab", "cd", "ef"], true), 64);
        let (first, t1) = read_all(recorder.body()).await;
        assert!(recorder.replayable());
        let (second, t2) = read_all(recorder.body()).await;
        assert_eq!(first, "abcdef");
        assert_eq!(second, "abcdef");
        assert_eq!(t1.unwrap()["x-end"], "yes");
        assert_eq!(t2.unwrap()["x-end"], "yes");
    }

    #[tokio::test]
    async fn a_partly_read_body_replays_then_continues_from_the_caller() {
        let recorder = Recorder::new(source(&["ab", "cd", "ef"], false), 64);
        let mut first = recorder.body();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        let (second, trailers) = read_all(recorder.body()).await;
        assert_eq!(second, "abcdef");
        assert!(trailers.is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_passed_on_but_not_replayable() {
        let recorder = Recorder::new(source(&["abcd", "efgh"], false), 6);
        assert!(recorder.replayable(), "nothing read yet");
        let (first, _) = read_all(recorder.body()).await;
        assert_eq!(first, "abcdefgh");
        assert!(!recorder.replayable());
    }
}
