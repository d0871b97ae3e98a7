//! The worker streams one request is being answered from.
//!
//! Usually one: the whole request on one worker. After a mid-stream migration of a request
//! with `n` > 1 each unfinished choice continues on its own one-choice stream, so a request
//! may have several. [`Legs`] polls them all and gives each output its choice's index in the
//! request; a leg that fails or ends is reported once and removed by its owner.

use super::route::Route;
use futures::StreamExt;
use std::task::Poll;
use tandem_protocols::llm::EngineOutput;
use tandem_runtime::{RuntimeError, TypedStream};

/// One worker stream and the request's choices it carries.
pub struct Leg {
    pub stream: TypedStream<EngineOutput>,
    /// The request's choice index for each of this stream's own indices.
    pub choices: Vec<u32>,
    pub route: Route,
}

pub enum LegEvent {
    /// An output, its `index` already the request's choice index.
    Output(EngineOutput),
    Failed(RuntimeError),
    /// The stream ended (its final frame).
    Ended,
}

#[derive(Default)]
pub struct Legs {
    legs: Vec<Leg>,
    /// Where the next poll starts, so that one busy leg cannot starve the others.
    start: usize,
}

impl Legs {
    pub fn push(&mut self, leg: Leg) {
        self.legs.push(leg);
    }

    pub fn is_empty(&self) -> bool {
        self.legs.is_empty()
    }

    /// Takes leg `i` out (after it failed or ended).
    pub fn remove(&mut self, i: usize) -> Leg {
        self.legs.swap_remove(i)
    }

    /// The choices leg `i` carries.
    pub fn choices_of(&self, i: usize) -> &[u32] {
        &self.legs[i].choices
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Leg {
        &mut self.legs[i]
    }

    /// The leg carrying `choice`, and the choice's index in that leg's stream.
    pub fn find(&self, choice: u32) -> Option<(&Leg, u32)> {
        self.legs.iter().find_map(|leg| {
            let at = leg.choices.iter().position(|c| *c == choice)?;
            Some((leg, at as u32))
        })
    }

    /// The next event of any leg, with the leg's position; `None` when no leg is left. The
    /// position is valid until the next call to `push` or `remove`.
    pub async fn next(&mut self) -> Option<(usize, LegEvent)> {
        std::future::poll_fn(|cx| {
            let n = self.legs.len();
            if n == 0 {
                return Poll::Ready(None);
            }
            for k in 0..n {
                let i = (self.start + k) % n;
                let leg = &mut self.legs[i];
                let event = match leg.stream.poll_next_unpin(cx) {
                    Poll::Pending => continue,
                    Poll::Ready(Some(Ok(mut out))) => {
                        // An index the leg does not carry matches no choice downstream.
                        out.index = leg
                            .choices
                            .get(out.index as usize)
                            .copied()
                            .unwrap_or(u32::MAX);
                        LegEvent::Output(out)
                    }
                    Poll::Ready(Some(Err(e))) => LegEvent::Failed(e),
                    Poll::Ready(None) => LegEvent::Ended,
                };
                self.start = i + 1;
                return Poll::Ready(Some((i, event)));
            }
            Poll::Pending
        })
        .await
    }
}
