//! The proxy's life as one signal with a phase, and the background tasks
//! it owns.
//!
//! ```text
//! Serving ─SIGTERM→ Draining ─drain delay→ Closing{until} ─→ ClosingOutbound{until} ─→ Stopped
//! ```
//!
//! - **Serving**: every port takes calls; `/ready` may say yes.
//! - **Draining**: deregistered and not ready (the edge reports
//!   NOT_SERVING), still serving while peers learn that the instance left.
//! - **Closing**: the ports calls come in on (inbound, edge) stop
//!   accepting and ask their connections to finish (GOAWAY); calls in
//!   flight have until `until`.
//! - **ClosingOutbound**: then the outbound port, which the calls finished
//!   above may have needed to call out, by the same `until`.
//! - **Stopped**: every background task the proxy started (discovery,
//!   the admin port, the edge's health) is stopped and waited for.

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Where the proxy is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Taking calls.
    Serving,
    /// Leaving the mesh: not ready, still taking calls.
    Draining,
    /// The inbound and edge ports finish by `until`.
    Closing {
        /// The end of the grace period.
        until: Instant,
    },
    /// The outbound port finishes too, by `until`.
    ClosingOutbound {
        /// The end of the grace period.
        until: Instant,
    },
    /// Everything has stopped.
    Stopped,
}

/// Which kind of port a listener is, for when it closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Calls come in from outside the service (inbound, edge).
    Incoming,
    /// The local service's calls out.
    Outbound,
}

impl Phase {
    /// Whether the proxy takes part in the mesh as usual.
    pub fn serving(self) -> bool {
        self == Self::Serving
    }

    /// When a listener of `port` must have finished its calls; `None`
    /// while it keeps accepting.
    pub fn close_by(self, port: Port) -> Option<Instant> {
        match (self, port) {
            (Self::Serving | Self::Draining, _) | (Self::Closing { .. }, Port::Outbound) => None,
            (Self::Closing { until } | Self::ClosingOutbound { until }, _) => Some(until),
            // Already over: no time left.
            (Self::Stopped, _) => Some(Instant::now()),
        }
    }
}

/// The phase, and the tasks that run until [`Phase::Stopped`].
#[derive(Debug)]
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    tasks: JoinSet<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            phase: watch::channel(Phase::Serving).0,
            tasks: JoinSet::new(),
        }
    }
}

impl Shutdown {
    /// Follows the phase.
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Moves to `phase`.
    pub fn enter(&self, phase: Phase) {
        tracing::debug!(?phase, "shutdown phase");
        self.phase.send_replace(phase);
    }

    /// Runs `task` in the background until it ends or the proxy stops.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        // Tasks that ended are reaped as others start, so the set holds
        // only what still runs.
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(task);
    }

    /// Enters [`Phase::Stopped`]: stops every task and waits for them.
    pub async fn stop(mut self) {
        self.enter(Phase::Stopped);
        self.tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn incoming_ports_close_first_then_the_outbound_port() {
        let until = Instant::now() + Duration::from_secs(5);
        let close = |phase: Phase| {
            (
                phase.close_by(Port::Incoming),
                phase.close_by(Port::Outbound),
            )
        };
        assert_eq!(close(Phase::Serving), (None, None));
        assert_eq!(close(Phase::Draining), (None, None));
        assert_eq!(close(Phase::Closing { until }), (Some(until), None));
        assert_eq!(
            close(Phase::ClosingOutbound { until }),
            (Some(until), Some(until))
        );
        assert!(Phase::Stopped.close_by(Port::Outbound).is_some());
        assert!(Phase::Serving.serving() && !Phase::Draining.serving());
    }

    #[tokio::test]
    async fn stopping_ends_every_task_it_owns() {
        let mut shutdown = Shutdown::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        shutdown.spawn(async move {
            // Holds the sender until the task is stopped.
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        let mut phases = shutdown.phases();
        shutdown.stop().await;
        assert!(rx.await.is_err(), "the task was dropped");
        assert_eq!(*phases.borrow_and_update(), Phase::Stopped);
    }
}
