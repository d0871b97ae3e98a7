//! Publishing the engine's KV block events for routers.
//!
//! Every event the engine's pool records gets the next event id (from 0) and goes out as
//! Dynamo's `RouterEvent` JSON on `namespace.{ns}.component.{comp}.kv_events`, and, with
//! `--kv-events-config '{"publisher":"zmq",…}'`, also on a ZMQ PUB socket in vLLM's format
//! (topic, id as sequence number, msgpack batch of one event). The publisher keeps a mirror of
//! the blocks it announced; the `kv_dump` endpoint serves that mirror with the id of the last
//! event it reflects, which is how a router that missed events resynchronises.

use crate::WorkerError;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tandem_engine_api::Engine;
use tandem_kv::BlockEvent;
use tandem_protocols::card::ZmqEventsEndpoint;
use tandem_protocols::kv_events::vllm::{self, VllmEvent};
use tandem_protocols::kv_events::{
    KV_DUMP_ENDPOINT, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlock, KvStateDump, RouterEvent, kv_events_subject,
};
use tandem_runtime::{DistributedRuntime, EndpointId, RequestContext};
use zeromq::{Socket, SocketSend};

/// vLLM's `--kv-events-config` JSON (the fields tandem uses; others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct KvEventsConfig {
    #[serde(default)]
    pub enable_kv_cache_events: bool,
    #[serde(default)]
    pub publisher: Option<String>,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub topic: String,
}

fn default_endpoint() -> String {
    "tcp://*:5557".to_string()
}

impl std::str::FromStr for KvEventsConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let c: Self =
            serde_json::from_str(s).map_err(|e| format!("invalid --kv-events-config: {e}"))?;
        match c.publisher.as_deref() {
            None | Some("null") | Some("zmq") => Ok(c),
            Some(other) => Err(format!(
                "unsupported KV event publisher {other:?} (zmq or null)"
            )),
        }
    }
}

impl KvEventsConfig {
    fn wants_zmq(&self) -> bool {
        self.enable_kv_cache_events && self.publisher.as_deref() == Some("zmq")
    }
}

/// A block the publisher announced: its parent and its tokens' hash.
#[derive(Clone, Copy)]
struct Announced {
    parent: Option<u64>,
    local: u64,
}

#[derive(Default)]
struct Mirror {
    last_event_id: Option<u64>,
    blocks: HashMap<u64, Announced>,
}

impl Mirror {
    fn apply(&mut self, e: &BlockEvent) {
        match e {
            BlockEvent::Stored {
                parent_hash,
                blocks,
                ..
            } => {
                let mut parent = *parent_hash;
                for b in blocks {
                    self.blocks.insert(
                        b.sequence,
                        Announced {
                            parent,
                            local: b.local,
                        },
                    );
                    parent = Some(b.sequence);
                }
            }
            BlockEvent::Removed { hashes } => {
                for h in hashes {
                    self.blocks.remove(h);
                }
            }
            BlockEvent::Cleared => self.blocks.clear(),
        }
    }

    /// Every announced block as `stored` events, parents before children.
    fn dump(&self, worker_id: u64) -> KvStateDump {
        let mut children: HashMap<Option<u64>, Vec<u64>> = HashMap::new();
        for (h, a) in &self.blocks {
            // A block whose parent is gone is announced as a root of its own chain.
            let parent = a.parent.filter(|p| self.blocks.contains_key(p));
            children.entry(parent).or_default().push(*h);
        }
        let mut stored = Vec::new();
        let mut queue: Vec<Option<u64>> = vec![None];
        while let Some(parent) = queue.pop() {
            let Some(kids) = children.remove(&parent) else {
                continue;
            };
            let blocks: Vec<KvCacheStoredBlock> = kids
                .iter()
                .map(|h| KvCacheStoredBlock {
                    block_hash: *h,
                    tokens_hash: self.blocks[h].local,
                })
                .collect();
            // One event per parent: siblings share the parent but are not a chain.
            for b in blocks {
                stored.push(KvCacheStoreData {
                    parent_hash: parent,
                    blocks: vec![b],
                });
            }
            queue.extend(kids.into_iter().map(Some));
        }
        KvStateDump {
            worker_id,
            last_event_id: self.last_event_id,
            stored,
        }
    }
}

fn to_router_data(e: &BlockEvent) -> KvCacheEventData {
    match e {
        BlockEvent::Stored {
            parent_hash,
            blocks,
            ..
        } => KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: *parent_hash,
            blocks: blocks
                .iter()
                .map(|b| KvCacheStoredBlock {
                    block_hash: b.sequence,
                    tokens_hash: b.local,
                })
                .collect(),
        }),
        BlockEvent::Removed { hashes } => KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: hashes.clone(),
        }),
        BlockEvent::Cleared => KvCacheEventData::Cleared,
    }
}

fn to_vllm(e: &BlockEvent, block_size: u32) -> VllmEvent {
    match e {
        BlockEvent::Stored {
            parent_hash,
            blocks,
            tokens,
        } => VllmEvent::BlockStored {
            block_hashes: blocks.iter().map(|b| b.sequence).collect(),
            parent_block_hash: *parent_hash,
            token_ids: tokens.clone(),
            block_size,
        },
        BlockEvent::Removed { hashes } => VllmEvent::BlockRemoved {
            block_hashes: hashes.clone(),
        },
        BlockEvent::Cleared => VllmEvent::AllBlocksCleared,
    }
}

/// The address to give routers for a bound ZMQ endpoint: a wildcard host is replaced by this
/// machine's name, which other machines can resolve.
fn advertised(bound: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    bound.replace("0.0.0.0", &host)
}

/// Starts publishing `engine`'s events for the component of `generate` and serves `kv_dump`.
/// Returns the ZMQ endpoint to advertise, when one was bound.
pub async fn start(
    drt: &DistributedRuntime,
    engine: &Arc<dyn Engine>,
    generate: &EndpointId,
    zmq: Option<&KvEventsConfig>,
) -> Result<Option<ZmqEventsEndpoint>, WorkerError> {
    let worker_id = drt.instance_id();
    let block_size = engine.block_size();
    let mut events = engine.subscribe_kv_events();
    let mirror = Arc::new(Mutex::new(Mirror::default()));

    let mut socket = None;
    let mut advertise = None;
    if let Some(cfg) = zmq.filter(|c| c.wants_zmq()) {
        let mut s = zeromq::PubSocket::new();
        // `*` is ZMQ's "every interface"; a given host is bound as given.
        let addr = cfg.endpoint.replace("tcp://*:", "tcp://0.0.0.0:");
        let bound = s
            .bind(&addr)
            .await
            .map_err(|e| WorkerError::KvEvents(format!("binding {}: {e}", cfg.endpoint)))?;
        let bound = bound.to_string();
        tracing::info!(endpoint = %bound, topic = %cfg.topic, "publishing kv events over ZMQ");
        advertise = Some(ZmqEventsEndpoint {
            endpoint: advertised(&bound),
            topic: cfg.topic.clone(),
        });
        socket = Some((s, cfg.topic.clone()));
    }

    let dump_mirror = mirror.clone();
    drt.endpoint(EndpointId::new(
        &generate.namespace,
        &generate.component,
        KV_DUMP_ENDPOINT,
    )?)
    .serve(move |_body: Bytes, _ctx: RequestContext| {
        let mirror = dump_mirror.clone();
        async move {
            let dump = mirror
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dump(worker_id);
            let json = serde_json::to_vec(&dump)
                .map_err(|e| tandem_runtime::RemoteError::internal(e.to_string()))?;
            Ok(futures::stream::iter([Ok(Bytes::from(json))]).boxed())
        }
    })
    .await?;

    let nats = drt.nats().clone();
    let subject = kv_events_subject(&generate.namespace, &generate.component);
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Some(e) = events.recv().await {
            let event_id = next_id;
            next_id += 1;
            {
                let mut m = mirror.lock().unwrap_or_else(|p| p.into_inner());
                m.apply(&e);
                m.last_event_id = Some(event_id);
            }
            let ev = RouterEvent {
                worker_id,
                event: KvCacheEvent {
                    event_id,
                    data: to_router_data(&e),
                    dp_rank: 0,
                },
            };
            match serde_json::to_vec(&ev) {
                Ok(json) => {
                    if let Err(err) = nats.publish(subject.clone(), json.into()).await {
                        tracing::warn!(error = %err, "kv event not published on NATS");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "kv event not serialised"),
            }
            if let Some((sock, topic)) = socket.as_mut() {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                let payload = vllm::encode_batch(ts, &[to_vllm(&e, block_size)]);
                let frames: Vec<Bytes> = vllm::frames(topic, event_id, payload)
                    .into_iter()
                    .map(Bytes::from)
                    .collect();
                match zeromq::ZmqMessage::try_from(frames) {
                    Ok(msg) => {
                        if let Err(err) = sock.send(msg).await {
                            tracing::warn!(error = %err, "kv event not published on ZMQ");
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "kv event not framed"),
                }
            }
        }
    });
    Ok(advertise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_kv::sequence_hashes;

    #[test]
    fn the_mirror_dumps_parents_before_children() {
        let toks: Vec<u32> = (0..12).collect();
        let h = sequence_hashes(&toks, 4);
        let mut m = Mirror::default();
        m.apply(&BlockEvent::Stored {
            parent_hash: None,
            blocks: h.clone(),
            tokens: toks.clone(),
        });
        let mut other: Vec<u32> = (0..4).collect();
        other.extend(50..54);
        let h2 = sequence_hashes(&other, 4);
        m.apply(&BlockEvent::Stored {
            parent_hash: Some(h2[0].sequence),
            blocks: vec![h2[1]],
            tokens: other[4..].to_vec(),
        });
        m.apply(&BlockEvent::Removed {
            hashes: vec![h[2].sequence],
        });
        m.last_event_id = Some(2);
        let d = m.dump(9);
        assert_eq!(d.last_event_id, Some(2));
        assert_eq!(d.stored.len(), 3);
        // Replaying the dump into a fresh index must succeed event by event.
        let mut seen = std::collections::HashSet::new();
        for s in &d.stored {
            if let Some(p) = s.parent_hash {
                assert!(seen.contains(&p), "parent first");
            }
            seen.extend(s.blocks.iter().map(|b| b.block_hash));
        }
        assert!(seen.contains(&h2[1].sequence) && !seen.contains(&h[2].sequence));
        m.apply(&BlockEvent::Cleared);
        assert!(m.dump(9).stored.is_empty());
    }

    #[test]
    fn kv_events_config_parses_vllm_json() {
        let c: KvEventsConfig = r#"{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:20082","enable_kv_cache_events":true}"#.parse().unwrap();
        assert!(c.wants_zmq());
        assert_eq!(c.endpoint, "tcp://*:20082");
        let off: KvEventsConfig = r#"{"enable_kv_cache_events":false}"#.parse().unwrap();
        assert!(!off.wants_zmq());
        assert!("{".parse::<KvEventsConfig>().is_err());
        assert!(r#"{"publisher":"kafka"}"#.parse::<KvEventsConfig>().is_err());
    }
}
