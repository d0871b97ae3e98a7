//! KV cache events on the wire, in the two formats routers read.
//!
//! - [`RouterEvent`]: Dynamo's JSON, published on NATS subject
//!   `namespace.{ns}.component.{comp}.kv_events` ([`kv_events_subject`]). `block_hash` is the
//!   engine's sequence-aware hash, `tokens_hash` the hash of the block's own tokens (the key the
//!   router's radix tree uses).
//! - vLLM's ZMQ format ([`vllm`]): a multipart message `[topic, seq as 8 big-endian bytes,
//!   msgpack KVEventBatch]`, the batch an array `[ts, [event, …]]` and each event a tagged array
//!   (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
//!   `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`), so that consumers written
//!   for vLLM (llm-d, Dynamo's relay, vLLM's own example subscriber) read it unchanged.

use serde::{Deserialize, Serialize};

/// Endpoint (beside `generate`, same component) where a worker serves its [`KvStateDump`].
pub const KV_DUMP_ENDPOINT: &str = "kv_dump";

/// NATS subject of a component's KV events (Dynamo's classic event subject).
pub fn kv_events_subject(namespace: &str, component: &str) -> String {
    format!("namespace.{namespace}.component.{component}.kv_events")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: u64,
    pub event: KvCacheEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    /// Sequential per worker from 0: a gap means lost events, a step back a restart.
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(KvCacheStoreData),
    Removed(KvCacheRemoveData),
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    pub parent_hash: Option<u64>,
    pub blocks: Vec<KvCacheStoredBlock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoredBlock {
    pub block_hash: u64,
    pub tokens_hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    pub block_hashes: Vec<u64>,
}

/// A worker's whole cached-block state, as `stored` events in parent-before-child order, and
/// the id of the last event it reflects (`None`: no event published yet). What a router asks
/// for to resynchronise after a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStateDump {
    pub worker_id: u64,
    pub last_event_id: Option<u64>,
    pub stored: Vec<KvCacheStoreData>,
}

/// vLLM's KV-event wire format over ZMQ.
pub mod vllm {
    use rmpv::Value;

    /// An event as vLLM's `KVEventBatch` carries it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum VllmEvent {
        BlockStored {
            block_hashes: Vec<u64>,
            parent_block_hash: Option<u64>,
            token_ids: Vec<u32>,
            block_size: u32,
        },
        BlockRemoved {
            block_hashes: Vec<u64>,
        },
        AllBlocksCleared,
    }

    #[derive(Debug, thiserror::Error)]
    pub enum WireError {
        #[error("malformed msgpack: {0}")]
        Msgpack(String),
        #[error("unexpected KV event batch shape: {0}")]
        Shape(&'static str),
        #[error("ZMQ message has {0} frames, expected 3 (topic, seq, payload)")]
        Frames(usize),
    }

    /// The storage tier vLLM names its main KV cache with; consumers filter on it.
    const MEDIUM: &str = "GPU";

    fn hashes(v: &[u64]) -> Value {
        Value::Array(v.iter().map(|h| Value::from(*h)).collect())
    }

    /// msgpack of a `KVEventBatch` `[ts, events]`.
    pub fn encode_batch(ts: f64, events: &[VllmEvent]) -> Vec<u8> {
        let events = events
            .iter()
            .map(|e| match e {
                VllmEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                } => Value::Array(vec![
                    Value::from("BlockStored"),
                    hashes(block_hashes),
                    parent_block_hash.map(Value::from).unwrap_or(Value::Nil),
                    Value::Array(token_ids.iter().map(|t| Value::from(*t)).collect()),
                    Value::from(*block_size),
                    Value::Nil,
                    Value::from(MEDIUM),
                ]),
                VllmEvent::BlockRemoved { block_hashes } => Value::Array(vec![
                    Value::from("BlockRemoved"),
                    hashes(block_hashes),
                    Value::from(MEDIUM),
                ]),
                VllmEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
            })
            .collect();
        let batch = Value::Array(vec![Value::F64(ts), Value::Array(events)]);
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, &batch);
        out
    }

    /// A block hash as vLLM sends it: an int, or (newer vLLM, sha256 hashing) bytes, of which
    /// the first 8 are taken big-endian.
    fn hash(v: &Value) -> Option<u64> {
        match v {
            Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)),
            Value::Binary(b) if b.len() >= 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                Some(u64::from_be_bytes(a))
            }
            _ => None,
        }
    }

    fn hash_list(v: &Value) -> Result<Vec<u64>, WireError> {
        v.as_array()
            .ok_or(WireError::Shape("block_hashes is not an array"))?
            .iter()
            .map(|h| hash(h).ok_or(WireError::Shape("block hash is neither int nor bytes")))
            .collect()
    }

    /// Decodes a `KVEventBatch` payload into its timestamp and events; unknown event kinds
    /// are skipped.
    pub fn decode_batch(payload: &[u8]) -> Result<(f64, Vec<VllmEvent>), WireError> {
        let v = rmpv::decode::read_value(&mut &payload[..])
            .map_err(|e| WireError::Msgpack(e.to_string()))?;
        let batch = v
            .as_array()
            .ok_or(WireError::Shape("batch is not an array"))?;
        let ts = batch.first().and_then(Value::as_f64).unwrap_or(0.0);
        let events = batch
            .get(1)
            .and_then(Value::as_array)
            .ok_or(WireError::Shape("batch has no event list"))?;
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let e = e
                .as_array()
                .ok_or(WireError::Shape("event is not an array"))?;
            match e.first().and_then(Value::as_str) {
                Some("BlockStored") => {
                    let field = |i: usize| e.get(i).ok_or(WireError::Shape("short BlockStored"));
                    out.push(VllmEvent::BlockStored {
                        block_hashes: hash_list(field(1)?)?,
                        parent_block_hash: match field(2)? {
                            Value::Nil => None,
                            v => Some(hash(v).ok_or(WireError::Shape("bad parent hash"))?),
                        },
                        token_ids: field(3)?
                            .as_array()
                            .ok_or(WireError::Shape("token_ids is not an array"))?
                            .iter()
                            .map(|t| t.as_u64().map(|t| t as u32))
                            .collect::<Option<_>>()
                            .ok_or(WireError::Shape("token id is not an int"))?,
                        block_size: field(4)?
                            .as_u64()
                            .ok_or(WireError::Shape("block_size is not an int"))?
                            as u32,
                    });
                }
                Some("BlockRemoved") => out.push(VllmEvent::BlockRemoved {
                    block_hashes: hash_list(
                        e.get(1).ok_or(WireError::Shape("short BlockRemoved"))?,
                    )?,
                }),
                Some("AllBlocksCleared") => out.push(VllmEvent::AllBlocksCleared),
                _ => {}
            }
        }
        Ok((ts, out))
    }

    /// The three frames of one ZMQ message.
    pub fn frames(topic: &str, seq: u64, payload: Vec<u8>) -> [Vec<u8>; 3] {
        [
            topic.as_bytes().to_vec(),
            seq.to_be_bytes().to_vec(),
            payload,
        ]
    }

    /// `(topic, seq, payload)` of a received message.
    pub fn parse_frames(frames: &[&[u8]]) -> Result<(String, u64, Vec<u8>), WireError> {
        let [topic, seq, payload] = frames else {
            return Err(WireError::Frames(frames.len()));
        };
        let seq: [u8; 8] = (*seq)
            .try_into()
            .map_err(|_| WireError::Shape("seq frame is not 8 bytes"))?;
        Ok((
            String::from_utf8_lossy(topic).into_owned(),
            u64::from_be_bytes(seq),
            payload.to_vec(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::vllm::*;
    use super::*;

    #[test]
    fn router_events_use_dynamo_json() {
        let e = RouterEvent {
            worker_id: 7,
            event: KvCacheEvent {
                event_id: 3,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    blocks: vec![KvCacheStoredBlock {
                        block_hash: u64::MAX,
                        tokens_hash: 5,
                    }],
                }),
                dp_rank: 0,
            },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"worker_id":7,"event":{"event_id":3,"data":{"stored":{"parent_hash":null,"blocks":[{"block_hash":18446744073709551615,"tokens_hash":5}]}},"dp_rank":0}}"#
        );
        let cleared: RouterEvent =
            serde_json::from_str(r#"{"worker_id":1,"event":{"event_id":0,"data":"cleared"}}"#)
                .unwrap();
        assert_eq!(cleared.event.data, KvCacheEventData::Cleared);
        let removed: RouterEvent = serde_json::from_str(
            r#"{"worker_id":1,"event":{"event_id":1,"data":{"removed":{"block_hashes":[1,2]}},"dp_rank":0}}"#,
        )
        .unwrap();
        assert_eq!(
            removed.event.data,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![1, 2]
            })
        );
        assert_eq!(
            kv_events_subject("dynamo", "backend"),
            "namespace.dynamo.component.backend.kv_events"
        );
    }

    #[test]
    fn vllm_batches_round_trip_and_match_the_msgpack_layout() {
        let events = vec![
            VllmEvent::BlockStored {
                block_hashes: vec![1, u64::MAX],
                parent_block_hash: None,
                token_ids: vec![10, 11, 12, 13],
                block_size: 2,
            },
            VllmEvent::BlockRemoved {
                block_hashes: vec![1],
            },
            VllmEvent::AllBlocksCleared,
        ];
        let bytes = encode_batch(1.5, &events);
        // fixarray(2), float64 1.5, fixarray(3), fixarray(7), fixstr "BlockStored" …
        assert_eq!(&bytes[..3], &[0x92, 0xcb, 0x3f]);
        assert_eq!(bytes[10], 0x93);
        assert_eq!(bytes[11], 0x97);
        assert_eq!(&bytes[12..24], b"\xabBlockStored");
        let (ts, back) = decode_batch(&bytes).unwrap();
        assert_eq!(ts, 1.5);
        assert_eq!(back, events);
        assert!(decode_batch(b"\xc1").is_err());
        let f = frames("kv-events", 258, vec![1]);
        let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
        assert_eq!(
            parse_frames(&refs).unwrap(),
            ("kv-events".into(), 258, vec![1])
        );
        assert!(parse_frames(&refs[..2]).is_err());
    }

    #[test]
    fn sha256_style_byte_hashes_are_accepted() {
        use rmpv::Value;
        let batch = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![Value::Array(vec![
                Value::from("BlockRemoved"),
                Value::Array(vec![Value::Binary(vec![0, 0, 0, 0, 0, 0, 1, 2, 9, 9])]),
                Value::Nil,
            ])]),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &batch).unwrap();
        let (_, ev) = decode_batch(&buf).unwrap();
        assert_eq!(
            ev,
            vec![VllmEvent::BlockRemoved {
                block_hashes: vec![258]
            }]
        );
    }
}
