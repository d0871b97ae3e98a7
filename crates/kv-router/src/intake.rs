//! Feeding a [`KvRouter`] from the running system.
//!
//! [`spawn`] starts, for one model's generate endpoint:
//! - a discovery watcher: a worker whose instance leaves etcd leaves the index;
//! - the event source: NATS subject `namespace.{ns}.component.{comp}.kv_events` (Dynamo's JSON
//!   `RouterEvent`s), or one ZMQ SUB socket per worker at the endpoint the worker advertises in
//!   its model card (vLLM's wire format). Nothing in approximate mode.
//!
//! Events of one source are applied by one task, in order. When the router reports a gap, a
//! restart or a worker seen for the first time mid-stream, the task asks that worker's
//! `kv_dump` endpoint for its whole block state and rebuilds the worker's part of the index
//! from it before reading on, so no event is applied out of order.

use crate::router::{Intake, KvRouter};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tandem_kv::local_block_hash;
use tandem_protocols::card::{MDC_ROOT, ModelEntry};
use tandem_protocols::kv_events::vllm::{self, VllmEvent};
use tandem_protocols::kv_events::{
    KV_DUMP_ENDPOINT, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlock,
    KvStateDump, RouterEvent, kv_events_subject,
};
use tandem_runtime::{Client, DistributedRuntime, EndpointId, RequestOptions, RouterMode};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv};

/// Where the router reads KV events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventSource {
    #[default]
    Nats,
    Zmq,
}

impl std::str::FromStr for EventSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nats" => Ok(Self::Nats),
            "zmq" => Ok(Self::Zmq),
            other => Err(format!("unknown KV event source {other:?} (nats or zmq)")),
        }
    }
}

/// Starts the tasks feeding `router` for the workers of `generate`; they stop with `stop`.
pub fn spawn(
    drt: &DistributedRuntime,
    router: Arc<KvRouter>,
    generate: &EndpointId,
    source: EventSource,
    stop: CancellationToken,
) -> Result<(), tandem_runtime::RuntimeError> {
    let client = drt.endpoint(generate.clone()).client();
    let dump = drt
        .endpoint(EndpointId::new(
            &generate.namespace,
            &generate.component,
            KV_DUMP_ENDPOINT,
        )?)
        .client();
    tokio::spawn(watch_instances(
        client,
        router.clone(),
        dump.clone(),
        stop.clone(),
    ));
    if !router.config().use_kv_events {
        return Ok(());
    }
    match source {
        EventSource::Nats => {
            let subject = kv_events_subject(&generate.namespace, &generate.component);
            tokio::spawn(nats_intake(drt.nats().clone(), subject, router, dump, stop));
        }
        EventSource::Zmq => {
            let prefix = format!(
                "{MDC_ROOT}/{}/{}/{}/",
                generate.namespace, generate.component, generate.name
            );
            let cards = drt.discovery().watch_prefix(&prefix);
            tokio::spawn(zmq_intake(cards, router, dump, stop));
        }
    }
    Ok(())
}

/// Follows the workers: one that leaves leaves the index; one that appears has its current
/// block state fetched, so a router that starts (or restarts) next to busy workers knows their
/// caches at once instead of after their next events.
async fn watch_instances(
    client: Client,
    router: Arc<KvRouter>,
    dump: Client,
    stop: CancellationToken,
) {
    let mut rx = client.instance_watch();
    let mut known: HashSet<u64> = HashSet::new();
    loop {
        let now: HashSet<u64> = rx
            .borrow_and_update()
            .iter()
            .map(|i| i.instance_id)
            .collect();
        for gone in known.difference(&now) {
            tracing::info!(worker_id = gone, "worker left; removed from the kv index");
            router.remove_worker(*gone);
        }
        if router.config().use_kv_events {
            for new in now.difference(&known) {
                let (router, dump, id) = (router.clone(), dump.clone(), *new);
                tokio::spawn(async move {
                    // The dump endpoint is registered beside generate; it may lag a moment.
                    let ready = dump
                        .wait_for(Duration::from_secs(10), |v| {
                            v.iter().any(|i| i.instance_id == id)
                        })
                        .await;
                    if ready.is_ok()
                        && let Some(state) = fetch_dump(&dump, id).await
                    {
                        router.apply_dump(&state, crate::router::ResyncReason::Joined);
                    }
                });
            }
        }
        known = now;
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Fetches a worker's block state; `None` (logged) when it cannot be had.
async fn fetch_dump(dump: &Client, worker_id: u64) -> Option<KvStateDump> {
    let mut stream = match dump
        .generate(
            RouterMode::Direct(worker_id),
            bytes::Bytes::new(),
            RequestOptions::default(),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(worker_id, error = %e, "kv state of worker not fetched");
            return None;
        }
    };
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => body.extend_from_slice(&b),
            Err(e) => {
                tracing::warn!(worker_id, error = %e, "kv state of worker not fetched");
                return None;
            }
        }
    }
    match serde_json::from_slice(&body) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(worker_id, error = %e, "malformed kv state from worker");
            None
        }
    }
}

/// Applies one event; on a resync request fetches the worker's state and then re-offers the
/// event (stale if the state already covers it).
async fn intake(
    router: &KvRouter,
    dump: &Client,
    worker_id: u64,
    event_id: u64,
    data: &KvCacheEventData,
) {
    if let Intake::Resync(reason) = router.apply_event(worker_id, event_id, data) {
        tracing::info!(
            worker_id,
            event_id,
            reason = reason.as_str(),
            "kv events out of sequence; resynchronising"
        );
        // Without the state, the best is a clean slate for this worker, continuing from this
        // event.
        let state = fetch_dump(dump, worker_id)
            .await
            .unwrap_or_else(|| KvStateDump {
                worker_id,
                last_event_id: event_id.checked_sub(1),
                stored: Vec::new(),
            });
        router.apply_dump(&state, reason);
        // Stale when the state already covers this event.
        let _ = router.apply_event(worker_id, event_id, data);
    }
}

async fn nats_intake(
    nats: async_nats::Client,
    subject: String,
    router: Arc<KvRouter>,
    dump: Client,
    stop: CancellationToken,
) {
    let mut sub = match nats.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "kv events not subscribed; routing without them");
            return;
        }
    };
    tracing::info!(%subject, "kv router reading events from NATS");
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        match serde_json::from_slice::<RouterEvent>(&msg.payload) {
            Ok(ev) => {
                intake(
                    &router,
                    &dump,
                    ev.worker_id,
                    ev.event.event_id,
                    &ev.event.data,
                )
                .await
            }
            Err(e) => tracing::warn!(error = %e, "ignoring malformed kv event"),
        }
    }
}

/// Converts a vLLM event to Dynamo's form: the router keys its tree on hashes of the blocks'
/// tokens, which vLLM sends along.
pub fn from_vllm(e: VllmEvent, block_size: usize) -> KvCacheEventData {
    match e {
        VllmEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size: bs,
        } => {
            let bs = if bs > 0 { bs as usize } else { block_size };
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent_block_hash,
                blocks: block_hashes
                    .iter()
                    .zip(token_ids.chunks_exact(bs.max(1)))
                    .map(|(h, toks)| KvCacheStoredBlock {
                        block_hash: *h,
                        tokens_hash: local_block_hash(toks),
                    })
                    .collect(),
            })
        }
        VllmEvent::BlockRemoved { block_hashes } => {
            KvCacheEventData::Removed(KvCacheRemoveData { block_hashes })
        }
        VllmEvent::AllBlocksCleared => KvCacheEventData::Cleared,
    }
}

async fn zmq_intake(
    mut cards: tokio::sync::watch::Receiver<BTreeMap<String, Vec<u8>>>,
    router: Arc<KvRouter>,
    dump: Client,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, u64, Vec<u8>)>(1024);
    let mut subs: HashMap<u64, (String, CancellationToken)> = HashMap::new();
    loop {
        // Follow the cards: one subscriber per worker that advertises a ZMQ endpoint.
        let mut wanted: HashMap<u64, String> = HashMap::new();
        for raw in cards.borrow_and_update().values() {
            if let Ok(entry) = serde_json::from_slice::<ModelEntry>(raw)
                && let Some(z) = entry.card_json.runtime_config.kv_events_zmq
            {
                wanted.insert(entry.instance_id, z.endpoint);
            }
        }
        subs.retain(|id, (ep, token)| {
            let keep = wanted.get(id) == Some(ep);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (id, ep) in wanted {
            if subs.contains_key(&id) {
                continue;
            }
            let token = stop.child_token();
            tokio::spawn(zmq_subscriber(id, ep.clone(), tx.clone(), token.clone()));
            subs.insert(id, (ep, token));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = cards.changed() => if r.is_err() { return },
            m = rx.recv() => {
                let Some((worker_id, seq, payload)) = m else { return };
                match vllm::decode_batch(&payload) {
                    Ok((_, events)) => {
                        // One event per message keeps seq equal to the event id.
                        for e in events {
                            let data = from_vllm(e, router.block_size());
                            intake(&router, &dump, worker_id, seq, &data).await;
                        }
                    }
                    Err(e) => tracing::warn!(worker_id, error = %e, "ignoring malformed zmq kv event"),
                }
            }
        }
    }
}

async fn zmq_subscriber(
    worker_id: u64,
    endpoint: String,
    tx: tokio::sync::mpsc::Sender<(u64, u64, Vec<u8>)>,
    stop: CancellationToken,
) {
    let mut sock = zeromq::SubSocket::new();
    // The publisher may not be reachable yet; keep trying until it is or the worker goes.
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.connect(&endpoint) => r,
        };
        match connected {
            Ok(()) => break,
            Err(e) => {
                tracing::debug!(worker_id, %endpoint, error = %e, "zmq connect failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    if let Err(e) = sock.subscribe("").await {
        tracing::warn!(worker_id, %endpoint, error = %e, "zmq subscribe failed");
        return;
    }
    tracing::info!(worker_id, %endpoint, "kv router reading events from ZMQ");
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = sock.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(worker_id, error = %e, "zmq receive failed");
                return;
            }
        };
        let frames: Vec<&[u8]> = msg.iter().map(|b| b.as_ref()).collect();
        match vllm::parse_frames(&frames) {
            Ok((_, seq, payload)) => {
                if tx.send((worker_id, seq, payload)).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(worker_id, error = %e, "ignoring malformed zmq message"),
        }
    }
}
