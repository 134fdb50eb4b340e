//! Both sides: when the call must be over. The deadline is the sooner of
//! the route's timeout (outbound) and the caller's `grpc-timeout`, counted
//! from when the proxy received the call. It bounds everything inside this
//! layer (every attempt and backoff: the layers inside read it from the
//! call) and, once a response streams, the rest of the response: when it
//! passes, the caller gets DEADLINE_EXCEEDED and the upstream stream is
//! reset, so the callee sees the cancellation.

use std::time::Duration;

use tonic::Code;

use super::{Answer, CarriesCall, Handle, within};
use crate::grpc;

/// A request whose deadline this layer can fix.
pub trait Deadlined: CarriesCall {
    /// How long the call may take, from when it was received.
    fn timeout(&self) -> Option<Duration>;
    /// What the message needs to name the call, kept while it runs
    /// (cheap: no message is written unless the deadline passes).
    type Names: Send;
    /// Takes what names the call.
    fn names(&self) -> Self::Names;
    /// The message of a call that ran out of time here.
    fn expired(names: &Self::Names) -> String;
}

/// The deadline layer.
#[derive(Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S> Deadline<S> {
    /// Enforces deadlines around `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, R> Handle<R> for Deadline<S>
where
    S: Handle<R, Answer = Answer>,
    R: Deadlined,
{
    type Answer = Answer;

    async fn handle(&self, mut request: R) -> Answer {
        let deadline = request.timeout().map(|t| request.call().started + t);
        request.call_mut().deadline = deadline;
        let names = deadline.map(|_| request.names());
        match within(deadline, self.inner.handle(request)).await {
            Some(answer) if deadline.is_none() || grpc::status_of(answer.headers()).is_some() => {
                answer
            }
            Some(answer) => answer.map(|body| body.with_deadline(deadline)),
            // Dropping the inner future resets the stream of an attempt in
            // flight: the callee sees the cancellation.
            None => grpc::status_response(
                Code::DeadlineExceeded,
                &R::expired(&names.expect("a deadline passed, so there was one")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::layer::testing::{call, status};
    use crate::layer::{Call, Handle};

    struct Timed(Call, Option<Duration>);

    impl CarriesCall for Timed {
        fn call(&self) -> &Call {
            &self.0
        }
        fn call_mut(&mut self) -> &mut Call {
            &mut self.0
        }
    }

    impl Deadlined for Timed {
        fn timeout(&self) -> Option<Duration> {
            self.1
        }
        type Names = ();
        fn names(&self) {}
        fn expired((): &()) -> String {
            "too slow".into()
        }
    }

    /// Answers OK after `delay`, noting the deadline it was given.
    struct Slow {
        delay: Duration,
        saw: std::sync::Mutex<Option<Option<tokio::time::Instant>>>,
    }

    impl Handle<Timed> for Arc<Slow> {
        type Answer = Answer;
        async fn handle(&self, request: Timed) -> Answer {
            *self.saw.lock().unwrap() = Some(request.0.deadline);
            tokio::time::sleep(self.delay).await;
            grpc::status_response(Code::Ok, "")
        }
    }

    fn slow(ms: u64) -> Arc<Slow> {
        Arc::new(Slow {
            delay: Duration::from_millis(ms),
            saw: Default::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_over_its_deadline_ends_with_deadline_exceeded() {
        let inner = slow(500);
        let layer = Deadline::new(inner.clone());
        let started = tokio::time::Instant::now();
        let answer = layer
            .handle(Timed(call(&[]), Some(Duration::from_millis(200))))
            .await;
        assert_eq!(status(&answer), Some(Code::DeadlineExceeded));
        assert_eq!(grpc::message_of(answer.headers()), "too slow");
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        let given = inner.saw.lock().unwrap().unwrap().unwrap();
        assert_eq!(
            given - started,
            Duration::from_millis(200),
            "inner layers see it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_time_or_without_a_deadline_is_untouched() {
        let layer = Deadline::new(slow(100));
        let answer = layer
            .handle(Timed(call(&[]), Some(Duration::from_millis(200))))
            .await;
        assert_eq!(status(&answer), Some(Code::Ok));
        let inner = slow(10_000);
        let layer = Deadline::new(inner.clone());
        let answer = layer.handle(Timed(call(&[]), None)).await;
        assert_eq!(status(&answer), Some(Code::Ok));
        assert_eq!(*inner.saw.lock().unwrap(), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_when_the_call_arrived() {
        let inner = slow(150);
        let layer = Deadline::new(inner);
        let c = call(&[]);
        tokio::time::advance(Duration::from_millis(100)).await;
        let answer = layer
            .handle(Timed(c, Some(Duration::from_millis(200))))
            .await;
        assert_eq!(
            status(&answer),
            Some(Code::DeadlineExceeded),
            "100 ms were already gone"
        );
    }
}
