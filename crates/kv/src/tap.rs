//! Hands an engine's block events to whoever publishes them.
//!
//! The engine's scheduler drains its pool's events after every step into its [`EventTap`];
//! the worker takes the receiving end once with [`EventTap::subscribe`]. Until then events are
//! dropped, so an engine nobody listens to accumulates nothing; after it, nothing is dropped
//! (the channel is unbounded: a lost event would leave the router's index wrong).

use crate::pool::BlockEvent;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

#[derive(Clone, Default)]
pub struct EventTap(Arc<Mutex<Option<mpsc::UnboundedSender<BlockEvent>>>>);

impl EventTap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts delivering events to the returned receiver (a later call replaces it).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<BlockEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Delivers `events` in order, or drops them when nobody subscribed (or the receiver went).
    pub fn send_all(&self, events: Vec<BlockEvent>) {
        if events.is_empty() {
            return;
        }
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = slot.as_ref() {
            for e in events {
                if tx.send(e).is_err() {
                    *slot = None;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flow_only_after_subscribing() {
        let tap = EventTap::new();
        tap.send_all(vec![BlockEvent::Cleared]);
        let mut rx = tap.subscribe();
        assert!(
            rx.try_recv().is_err(),
            "events before subscribing are dropped"
        );
        tap.send_all(vec![
            BlockEvent::Cleared,
            BlockEvent::Removed { hashes: vec![1] },
        ]);
        assert_eq!(rx.try_recv().unwrap(), BlockEvent::Cleared);
        assert_eq!(
            rx.try_recv().unwrap(),
            BlockEvent::Removed { hashes: vec![1] }
        );
        drop(rx);
        tap.send_all(vec![BlockEvent::Cleared]);
        assert!(
            tap.0.lock().unwrap().is_none(),
            "a dropped receiver unplugs the tap"
        );
    }
}
