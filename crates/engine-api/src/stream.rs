//! The channel a request's outputs travel on, from an engine's scheduler to whoever holds the
//! [`EngineStream`].
//!
//! Every choice of a request shares one [`OutputSender`]. The scheduler treats a sequence as
//! cancelled when the stream is gone (the whole request) or when its choice was stopped
//! through the stream's [`ChoiceStopper`] (one choice), and frees its blocks before the next
//! step.

use crate::EngineError;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tandem_protocols::llm::EngineOutput;
use tokio::sync::mpsc;

type Item = Result<EngineOutput, EngineError>;

/// Creates the channel of a request with `n` choices.
pub fn output_channel(n: u32) -> (OutputSender, EngineStream) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stops = ChoiceStopper(Arc::new(
        (0..n.max(1)).map(|_| AtomicBool::new(false)).collect(),
    ));
    (
        OutputSender {
            tx,
            stops: stops.clone(),
        },
        EngineStream { rx, stops },
    )
}

/// Ends single choices of a request; cheap to clone and usable while the stream is read.
#[derive(Clone, Debug)]
pub struct ChoiceStopper(Arc<Vec<AtomicBool>>);

impl ChoiceStopper {
    /// Stops choice `index`: it produces nothing more and its blocks are freed. Out-of-range
    /// indices are ignored (there is nothing to stop).
    pub fn stop(&self, index: u32) {
        if let Some(f) = self.0.get(index as usize) {
            f.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_stopped(&self, index: u32) -> bool {
        self.0
            .get(index as usize)
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// The scheduler's end of a request's channel.
#[derive(Clone, Debug)]
pub struct OutputSender {
    tx: mpsc::UnboundedSender<Item>,
    stops: ChoiceStopper,
}

impl OutputSender {
    /// Sends an output; false when nobody listens any more.
    pub fn send(&self, out: EngineOutput) -> bool {
        self.tx.send(Ok(out)).is_ok()
    }

    pub fn fail(&self, e: EngineError) {
        let _ = self.tx.send(Err(e));
    }

    /// The request is gone, or this choice was stopped.
    pub fn is_cancelled(&self, index: u32) -> bool {
        self.tx.is_closed() || self.stops.is_stopped(index)
    }
}

/// A request's outputs: every choice's steps, then the end (or one error).
pub struct EngineStream {
    rx: mpsc::UnboundedReceiver<Item>,
    stops: ChoiceStopper,
}

impl EngineStream {
    pub fn stopper(&self) -> ChoiceStopper {
        self.stops.clone()
    }
}

impl Stream for EngineStream {
    type Item = Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn stopping_a_choice_cancels_only_it_and_dropping_the_stream_cancels_all() {
        let (tx, mut rx) = output_channel(2);
        assert!(!tx.is_cancelled(0));
        rx.stopper().stop(1);
        rx.stopper().stop(7);
        assert!(!tx.is_cancelled(0) && tx.is_cancelled(1));
        tx.fail(EngineError::StepFailed("boom".into()));
        assert!(matches!(
            rx.next().await,
            Some(Err(EngineError::StepFailed(_)))
        ));
        drop(rx);
        assert!(tx.is_cancelled(0));
    }
}
