//! Calling side of an endpoint (the egress).
//!
//! A [`Client`] follows the endpoint's instances in etcd and sends each request to one of them
//! ([`RouterMode`]). The response arrives as a [`ResponseStream`]: a background task reads the
//! per-request reply subject, checks frame order, answers the handler's liveness pings and
//! forwards payloads. Dropping the stream before it ends cancels the request on the instance.

use crate::discovery::{Instance, KvSnapshot};
use crate::endpoint::{EndpointId, request_headers};
use crate::error::{RemoteError, RuntimeError};
use crate::transport::{self, FrameKind};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use rand::Rng;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How a client picks the instance for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterMode {
    RoundRobin,
    Random,
    Direct(u64),
}

impl FromStr for RouterMode {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" | "round_robin" => Ok(Self::RoundRobin),
            "random" => Ok(Self::Random),
            other => other
                .strip_prefix("direct:")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .map(Self::Direct)
                .ok_or_else(|| RuntimeError::InvalidRouterMode(s.to_string())),
        }
    }
}

/// Per-request settings.
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// Request id; a random one when unset.
    pub id: Option<String>,
    /// Headers to carry to the handler; only trace headers (`traceparent`, `tracestate`,
    /// `x-request-id`) are passed on.
    pub headers: Vec<(String, String)>,
}

pub(crate) struct ClientSettings {
    pub ack_timeout: Duration,
    pub stall_timeout: Duration,
    /// After this long without a frame the instance itself is probed.
    pub probe_interval: Duration,
}

#[derive(Clone)]
pub struct Client {
    endpoint: EndpointId,
    nats: async_nats::Client,
    instances: watch::Receiver<Vec<Instance>>,
    next: Arc<AtomicUsize>,
    settings: Arc<ClientSettings>,
}

impl Client {
    pub(crate) fn new(
        endpoint: EndpointId,
        nats: async_nats::Client,
        mut keys: watch::Receiver<KvSnapshot>,
        settings: ClientSettings,
    ) -> Self {
        let (tx, rx) = watch::channel(Vec::new());
        // Parses the raw etcd mirror into instances; ends when the client is dropped.
        tokio::spawn(async move {
            loop {
                let parsed = parse_instances(&keys.borrow_and_update());
                tx.send_if_modified(|cur| {
                    let changed = *cur != parsed;
                    *cur = parsed;
                    changed
                });
                tokio::select! {
                    _ = tx.closed() => return,
                    r = keys.changed() => if r.is_err() { return },
                }
            }
        });
        Self {
            endpoint,
            nats,
            instances: rx,
            next: Arc::new(AtomicUsize::new(0)),
            settings: Arc::new(settings),
        }
    }

    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// Instances serving the endpoint now, ordered by instance id.
    pub fn instances(&self) -> Vec<Instance> {
        self.instances.borrow().clone()
    }

    pub fn instance_ids(&self) -> Vec<u64> {
        self.instances
            .borrow()
            .iter()
            .map(|i| i.instance_id)
            .collect()
    }

    /// A receiver that changes whenever the instance list does.
    pub fn instance_watch(&self) -> watch::Receiver<Vec<Instance>> {
        self.instances.clone()
    }

    /// Waits until `pred` holds for the instance list, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Instance]) -> bool,
    ) -> Result<Vec<Instance>, RuntimeError> {
        let mut rx = self.instances.clone();
        let wait = rx.wait_for(|v| pred(v));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(v)) => Ok(v.clone()),
            _ => Err(RuntimeError::NoInstances(self.endpoint.to_string())),
        }
    }

    /// Waits until at least one instance serves the endpoint.
    pub async fn wait_for_instances(
        &self,
        timeout: Duration,
    ) -> Result<Vec<Instance>, RuntimeError> {
        self.wait_for(timeout, |v| !v.is_empty()).await
    }

    /// The instance `mode` would pick, leaving out those `skip` names unless that leaves
    /// none (a caller avoiding failed instances still gets one to try). Round-robin and
    /// random count among the instances left.
    pub fn pick_id(
        &self,
        mode: RouterMode,
        skip: impl Fn(u64) -> bool,
    ) -> Result<u64, RuntimeError> {
        if let RouterMode::Direct(id) = mode {
            return self.pick(mode).map(|_| id);
        }
        let ids = self.instance_ids();
        let kept: Vec<u64> = ids.iter().copied().filter(|id| !skip(*id)).collect();
        let from = if kept.is_empty() { &ids } else { &kept };
        if from.is_empty() {
            return Err(RuntimeError::NoInstances(self.endpoint.to_string()));
        }
        let i = match mode {
            RouterMode::Random => rand::rng().random_range(0..from.len()),
            _ => self.next.fetch_add(1, Ordering::Relaxed) % from.len(),
        };
        Ok(from[i])
    }

    fn pick(&self, mode: RouterMode) -> Result<Instance, RuntimeError> {
        let instances = self.instances.borrow();
        // A named instance that left is that instance's failure (another may serve the
        // request), even when it was the last one.
        if instances.is_empty() && !matches!(mode, RouterMode::Direct(_)) {
            return Err(RuntimeError::NoInstances(self.endpoint.to_string()));
        }
        let chosen = match mode {
            RouterMode::RoundRobin => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % instances.len();
                &instances[i]
            }
            RouterMode::Random => &instances[rand::rng().random_range(0..instances.len())],
            RouterMode::Direct(id) => instances
                .iter()
                .find(|i| i.instance_id == id)
                .ok_or(RuntimeError::InstanceNotFound(id))?,
        };
        Ok(chosen.clone())
    }

    pub async fn round_robin(
        &self,
        body: Bytes,
        opts: RequestOptions,
    ) -> Result<ResponseStream, RuntimeError> {
        self.generate(RouterMode::RoundRobin, body, opts).await
    }

    pub async fn random(
        &self,
        body: Bytes,
        opts: RequestOptions,
    ) -> Result<ResponseStream, RuntimeError> {
        self.generate(RouterMode::Random, body, opts).await
    }

    pub async fn direct(
        &self,
        instance_id: u64,
        body: Bytes,
        opts: RequestOptions,
    ) -> Result<ResponseStream, RuntimeError> {
        self.generate(RouterMode::Direct(instance_id), body, opts)
            .await
    }

    /// Sends `body` to the instance `mode` picks and returns its response stream once the
    /// instance has acknowledged the request.
    pub async fn generate(
        &self,
        mode: RouterMode,
        body: Bytes,
        opts: RequestOptions,
    ) -> Result<ResponseStream, RuntimeError> {
        let instance = self.pick(mode)?;
        let id = opts
            .id
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        // Child of the caller's current span (the frontend's `http-request`); its context is
        // what the instance's `handle_payload` span gets as parent.
        let span = tracing::info_span!(
            "client_request",
            otel.kind = "client",
            operation = %self.endpoint.name,
            endpoint = %self.endpoint,
            request_id = %id,
            instance_id = instance.instance_id,
            x_request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let mut headers = opts.headers;
        if let Some((_, x)) = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        {
            span.record("x_request_id", x.as_str());
        }
        if let Some(t) = tandem_telemetry::propagation::trace_id(&span) {
            span.record("trace_id", t);
        }
        tandem_telemetry::propagation::inject(&span, &mut headers);
        self.send(instance, id, body, headers, span.clone())
            .instrument(span)
            .await
    }

    async fn send(
        &self,
        instance: Instance,
        id: String,
        body: Bytes,
        extra_headers: Vec<(String, String)>,
        span: tracing::Span,
    ) -> Result<ResponseStream, RuntimeError> {
        let reply_to = self.nats.new_inbox();
        // Subscribe before sending: NATS keeps one connection's commands in order, so the
        // subscription exists before the handler can publish its first frame.
        let sub = self
            .nats
            .subscribe(reply_to.clone())
            .await
            .map_err(|e| RuntimeError::Nats(e.to_string()))?;
        let headers = request_headers(&id, &reply_to, &extra_headers);
        let size = body.len();
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(self.settings.ack_timeout));
        let ack = self
            .nats
            .send_request(instance.subject().to_string(), request)
            .await
            .map_err(|e| {
                use async_nats::client::RequestErrorKind as K;
                match e.kind() {
                    K::NoResponders => RuntimeError::NoResponders(instance.subject().to_string()),
                    K::TimedOut => RuntimeError::AckTimeout(self.settings.ack_timeout),
                    K::MaxPayloadExceeded => RuntimeError::PayloadTooLarge {
                        size,
                        max: self.nats.server_info().max_payload,
                    },
                    _ => RuntimeError::Nats(e.to_string()),
                }
            })?;
        if let Some(refusal) =
            transport::decode_frame(ack.payload).filter(|f| f.kind == FrameKind::Error)
        {
            return Err(RuntimeError::Rejected(RemoteError::decode(
                &refusal.payload,
            )));
        }

        let (tx, rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let finished = Arc::new(AtomicBool::new(false));
        // Not instrumented: entering the span for every frame costs time on every token.
        tokio::spawn(read_frames(
            self.nats.clone(),
            sub,
            tx,
            stop.clone(),
            finished.clone(),
            Watch {
                instance_id: instance.instance_id,
                request_id: id.clone(),
                stall: self.settings.stall_timeout,
                probe: self.settings.probe_interval,
            },
        ));
        Ok(ResponseStream {
            _span: span,
            rx,
            stop,
            finished,
            nats: self.nats.clone(),
            request_id: id,
            instance_id: instance.instance_id,
        })
    }
}

fn parse_instances(keys: &KvSnapshot) -> Vec<Instance> {
    let mut v: Vec<Instance> = keys
        .iter()
        .filter_map(|(k, raw)| match serde_json::from_slice::<Instance>(raw) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "ignoring malformed instance record");
                None
            }
        })
        .collect();
    v.sort_by_key(|i| i.instance_id);
    v
}

/// How a response stream watches its instance.
struct Watch {
    instance_id: u64,
    request_id: String,
    /// Nothing at all for this long: the stream has stalled.
    stall: Duration,
    /// Nothing for this long: ask whether the instance is still connected.
    probe: Duration,
}

/// How long frames that arrived before a probe's answer may take to be read.
const LATE_FRAMES: Duration = Duration::from_millis(100);

/// What a probe of the instance serving a request found.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The request still runs there (or the probe proved nothing: a timeout, NATS down).
    Running,
    /// The instance is up but no longer runs the request.
    Lost,
    /// Nobody listens on the instance's subject any more: its connection is gone.
    Gone,
}

/// Probes `instance_id` on its cancel subject about `request_id`.
async fn probe(
    nats: &async_nats::Client,
    instance_id: u64,
    request_id: &str,
    timeout: Duration,
) -> Probe {
    let mut h = async_nats::HeaderMap::new();
    h.insert(transport::HDR_KIND, transport::PING);
    h.insert(transport::HDR_REQUEST_ID, request_id);
    let request = async_nats::Request::new()
        .headers(h)
        .payload(Bytes::new())
        .timeout(Some(timeout));
    match nats
        .send_request(transport::cancel_subject(instance_id), request)
        .await
    {
        Ok(m) if m.payload.as_ref() == transport::NOT_RUNNING => Probe::Lost,
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Probe::Gone,
        _ => Probe::Running,
    }
}

async fn read_frames(
    nats: async_nats::Client,
    mut sub: async_nats::Subscriber,
    tx: mpsc::Sender<Result<Bytes, RuntimeError>>,
    stop: CancellationToken,
    finished: Arc<AtomicBool>,
    watch: Watch,
) {
    let mut expected = 0u64;
    let mut last_frame = tokio::time::Instant::now();
    let terminal: Result<(), RuntimeError> = loop {
        let quiet_for = watch.probe.min(watch.stall);
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            m = tokio::time::timeout(quiet_for, sub.next()) => m,
        };
        let msg = match msg {
            Err(_) if last_frame.elapsed() >= watch.stall => {
                break Err(RuntimeError::StreamStalled(watch.stall));
            }
            // Quiet (a long prefill, a queue): a live handler pings every probe interval, so
            // this is rare; a killed one is found here instead of after the stall timeout.
            Err(_) => {
                let verdict =
                    match probe(&nats, watch.instance_id, &watch.request_id, watch.probe).await {
                        Probe::Running => continue,
                        Probe::Lost => RuntimeError::RequestLost(watch.instance_id),
                        Probe::Gone => RuntimeError::InstanceGone(watch.instance_id),
                    };
                // What the instance sent before its answer arrived before it too (one
                // connection, in order), but on this subscription: a busy caller may not have
                // read its last frames yet. Only an empty subscription confirms the verdict.
                match tokio::time::timeout(LATE_FRAMES, sub.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(RuntimeError::Disconnected),
                    Err(_) => break Err(verdict),
                }
            }
            Ok(None) => break Err(RuntimeError::Disconnected),
            Ok(Some(m)) => m,
        };
        last_frame = tokio::time::Instant::now();
        // Only the handler publishes to this inbox: anything else is a handler speaking
        // another wire format (a worker of another tandem version), reported, not waited on.
        let Some(frame) = transport::decode_frame(msg.payload) else {
            break Err(RuntimeError::Decode(
                "the worker's response is not a tandem frame (frontend and worker of different \
                 versions?)"
                    .into(),
            ));
        };
        match frame.kind {
            FrameKind::Ping => {
                if let Some(reply) = msg.reply {
                    let _ = nats.publish(reply, Bytes::new()).await;
                }
            }
            FrameKind::Error => {
                break Err(RuntimeError::Remote(RemoteError::decode(&frame.payload)));
            }
            FrameKind::Data | FrameKind::Batch | FrameKind::Final => {
                let seq = frame.seq.unwrap_or(u64::MAX);
                if seq != expected {
                    break Err(RuntimeError::StreamGap { expected, got: seq });
                }
                expected += 1;
                let payloads = match frame.kind {
                    FrameKind::Final => break Ok(()),
                    FrameKind::Batch => match transport::decode_batch(frame.payload) {
                        Some(items) => items,
                        None => break Err(RuntimeError::Decode("malformed batch frame".into())),
                    },
                    _ => vec![frame.payload],
                };
                for p in payloads {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    finished.store(true, Ordering::SeqCst);
    if let Err(e) = terminal {
        let _ = tx.send(Err(e)).await;
    }
}

/// The response of one request: payloads in order, then the end of the stream, or one error.
/// Dropping it early cancels the request on the instance.
pub struct ResponseStream {
    /// `client_request` ends when the caller is done with the response.
    _span: tracing::Span,
    rx: mpsc::Receiver<Result<Bytes, RuntimeError>>,
    stop: CancellationToken,
    finished: Arc<AtomicBool>,
    nats: async_nats::Client,
    request_id: String,
    instance_id: u64,
}

impl ResponseStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The instance serving this request.
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// Sends a control message to the request's handler (see [`crate::transport`]); false when
    /// the request has already ended. Delivery is best effort, like cancellation.
    pub async fn control(&self, payload: Bytes) -> bool {
        if self.finished.load(Ordering::SeqCst) {
            return false;
        }
        let mut h = async_nats::HeaderMap::new();
        h.insert(transport::HDR_REQUEST_ID, self.request_id.as_str());
        h.insert(transport::HDR_KIND, transport::CONTROL);
        self.nats
            .publish_with_headers(transport::cancel_subject(self.instance_id), h, payload)
            .await
            .is_ok()
    }

    /// Stops the request on the instance and ends this stream.
    pub async fn cancel(&mut self) {
        if !self.finished.swap(true, Ordering::SeqCst) {
            send_cancel(&self.nats, self.instance_id, &self.request_id).await;
        }
        self.stop.cancel();
        self.rx.close();
    }
}

async fn send_cancel(nats: &async_nats::Client, instance_id: u64, request_id: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(transport::HDR_REQUEST_ID, request_id);
    if let Err(e) = nats
        .publish_with_headers(transport::cancel_subject(instance_id), h, Bytes::new())
        .await
    {
        tracing::debug!(error = %e, "cancel not sent; the instance's caller probe will notice");
    }
}

impl Stream for ResponseStream {
    type Item = Result<Bytes, RuntimeError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.stop.cancel();
        if !self.finished.swap(true, Ordering::SeqCst) {
            let nats = self.nats.clone();
            let id = std::mem::take(&mut self.request_id);
            let instance = self.instance_id;
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { send_cancel(&nats, instance, &id).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_modes_parse() {
        assert_eq!(
            "round-robin".parse::<RouterMode>().unwrap(),
            RouterMode::RoundRobin
        );
        assert_eq!("random".parse::<RouterMode>().unwrap(), RouterMode::Random);
        assert_eq!(
            "direct:ff".parse::<RouterMode>().unwrap(),
            RouterMode::Direct(255)
        );
        assert!("kv-ish".parse::<RouterMode>().is_err());
    }

    #[test]
    fn instances_parse_dynamo_records_and_skip_garbage() {
        let mut keys = KvSnapshot::new();
        keys.insert(
            "instances/dynamo/backend/generate:2".into(),
            br#"{"component":"backend","endpoint":"generate","namespace":"dynamo","instance_id":2,"transport":{"nats_tcp":"dynamo_backend.generate-2"}}"#.to_vec(),
        );
        keys.insert(
            "instances/dynamo/backend/generate:1".into(),
            b"not json".to_vec(),
        );
        let v = parse_instances(&keys);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject(), "dynamo_backend.generate-2");
    }
}
