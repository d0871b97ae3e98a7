//! Serving side of an endpoint (the ingress).
//!
//! [`serve`] subscribes to the instance subject in queue group `q`. For each request it
//! acknowledges at once, then runs the [`Handler`] in its own task and publishes what the
//! handler streams as numbered frames to the caller's reply subject. The request's
//! [`RequestContext`] is cancelled when the caller cancels, or when a liveness probe finds the
//! caller gone (NATS answers "no responders" once its connection has closed); the response
//! stream is then dropped, which is how a handler stops. A caller can also send *control*
//! messages to its request while it runs (e.g. "stop choice 1"); the handler reads them from
//! [`RequestContext::take_controls`].
//!
//! Handlers fail with a [`RemoteError`] (a class and a message), which travels to the caller
//! in the error frame. [`crate::typed`] puts serde on both ends so handlers and callers deal
//! in request and response types, not bytes.

use crate::error::{ErrorCode, RemoteError, RuntimeError};
use crate::lock;
use crate::metrics::EndpointMetrics;
use crate::transport::{self, FrameKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Most payloads one response frame carries.
const MAX_BATCH: usize = 64;
/// Most bytes one batched frame carries (NATS refuses messages over its max payload, 1 MiB
/// by default); a payload that would go past it starts the next frame.
const MAX_BATCH_BYTES: usize = 128 * 1024;

/// `dyn://{namespace}.{component}.{endpoint}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointId {
    pub namespace: String,
    pub component: String,
    pub name: String,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl EndpointId {
    pub fn new(namespace: &str, component: &str, name: &str) -> Result<Self, RuntimeError> {
        let id = Self {
            namespace: namespace.to_string(),
            component: component.to_string(),
            name: name.to_string(),
        };
        if [namespace, component, name]
            .iter()
            .all(|s| valid_segment(s))
        {
            Ok(id)
        } else {
            Err(RuntimeError::InvalidEndpointPath(id.to_string()))
        }
    }

    /// NATS service name: Dynamo's slug of `{namespace}|{component}`.
    pub fn service_name(&self) -> String {
        format!("{}_{}", self.namespace, self.component)
    }

    /// The subject one instance of this endpoint listens on.
    pub fn subject(&self, instance_id: u64) -> String {
        format!("{}.{}-{instance_id:x}", self.service_name(), self.name)
    }

    /// Prefix of every instance key of this endpoint.
    pub fn etcd_prefix(&self) -> String {
        format!(
            "{}/{}/{}/{}:",
            crate::discovery::INSTANCE_ROOT,
            self.namespace,
            self.component,
            self.name
        )
    }

    pub fn etcd_key(&self, instance_id: u64) -> String {
        format!("{}{instance_id:x}", self.etcd_prefix())
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dyn://{}.{}.{}",
            self.namespace, self.component, self.name
        )
    }
}

impl FromStr for EndpointId {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RuntimeError::InvalidEndpointPath(s.to_string());
        let rest = s.strip_prefix("dyn://").unwrap_or(s);
        let mut parts = rest.split('.');
        let (Some(ns), Some(comp), Some(ep), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Self::new(ns, comp, ep).map_err(|_| bad())
    }
}

type ControlReceiver = tokio::sync::mpsc::UnboundedReceiver<Bytes>;

/// What a handler gets besides the request body.
#[derive(Clone)]
pub struct RequestContext {
    id: String,
    headers: Arc<Vec<(String, String)>>,
    cancel: CancellationToken,
    controls: Arc<Mutex<Option<ControlReceiver>>>,
}

impl RequestContext {
    pub fn new(id: String, headers: Vec<(String, String)>) -> Self {
        Self::with_controls(id, headers, None)
    }

    fn with_controls(
        id: String,
        headers: Vec<(String, String)>,
        controls: Option<ControlReceiver>,
    ) -> Self {
        Self {
            id,
            headers: Arc::new(headers),
            cancel: CancellationToken::new(),
            controls: Arc::new(Mutex::new(controls)),
        }
    }

    /// The caller's control messages for this request, in order; `None` after the first call.
    /// The receiver ends when the request does.
    pub fn take_controls(&self) -> Option<ControlReceiver> {
        lock(&self.controls).take()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Trace and request-id headers the caller sent (`traceparent`, `tracestate`,
    /// `x-request-id`).
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_stopped(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the caller cancelled or went away.
    pub async fn stopped(&self) {
        self.cancel.cancelled().await
    }

    pub fn stop(&self) {
        self.cancel.cancel()
    }
}

/// The stream of response payloads a handler produces; an `Err` item ends it with an error
/// frame.
pub type HandlerStream = BoxStream<'static, Result<Bytes, RemoteError>>;

/// Serves requests of one endpoint. Implemented for any
/// `Fn(Bytes, RequestContext) -> Future<Output = Result<HandlerStream, RemoteError>>`.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Bytes,
        ctx: RequestContext,
    ) -> BoxFuture<'static, Result<HandlerStream, RemoteError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Bytes, RequestContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HandlerStream, RemoteError>> + Send + 'static,
{
    fn handle(
        &self,
        request: Bytes,
        ctx: RequestContext,
    ) -> BoxFuture<'static, Result<HandlerStream, RemoteError>> {
        Box::pin(self(request, ctx))
    }
}

struct Inflight {
    cancel: CancellationToken,
    controls: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

/// In-flight requests of this process by request id, so cancellations and control messages
/// can find them.
#[derive(Default)]
pub struct InflightRegistry {
    map: Mutex<HashMap<String, Inflight>>,
}

impl InflightRegistry {
    fn insert(&self, id: &str, cancel: CancellationToken) -> ControlReceiver {
        let (controls, rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.map).insert(id.to_string(), Inflight { cancel, controls });
        rx
    }
    fn remove(&self, id: &str) {
        lock(&self.map).remove(id);
    }
    /// Cancels the request if it is still running here.
    pub fn cancel(&self, id: &str) -> bool {
        match lock(&self.map).get(id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }
    /// Hands a control message to the request if it is still running here.
    pub fn control(&self, id: &str, payload: Bytes) -> bool {
        match lock(&self.map).get(id) {
            Some(r) => r.controls.send(payload).is_ok(),
            None => false,
        }
    }
    /// Whether the request runs here.
    pub fn contains(&self, id: &str) -> bool {
        lock(&self.map).contains_key(id)
    }
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) struct Ingress {
    pub endpoint: EndpointId,
    pub instance_id: u64,
    pub nats: async_nats::Client,
    pub handler: Arc<dyn Handler>,
    pub metrics: EndpointMetrics,
    pub inflight: Arc<InflightRegistry>,
    pub probe_interval: Duration,
    /// Cancelled when a shutdown's grace period is over: the requests still running end with
    /// an `unavailable` error frame, which a caller may take elsewhere.
    pub handover: CancellationToken,
    pub tasks: TaskTracker,
}

impl Ingress {
    /// Receives requests until `stop`, then waits for the ones in flight.
    pub async fn run(self: Arc<Self>, mut sub: async_nats::Subscriber, stop: CancellationToken) {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let this = self.clone();
            self.tasks
                .spawn(async move { this.handle_message(msg).await });
        }
        let _ = sub.unsubscribe().await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs one request inside its `handle_payload` span, whose parent is the caller's span
    /// when the request carries a valid `traceparent`.
    async fn handle_message(&self, msg: async_nats::Message) {
        let headers = msg.headers.as_ref();
        let span = tracing::info_span!(
            "handle_payload",
            otel.kind = "server",
            component = %self.endpoint.component,
            endpoint = %self.endpoint.name,
            namespace = %self.endpoint.namespace,
            instance_id = self.instance_id,
            request_id = tracing::field::Empty,
            x_request_id = tracing::field::Empty,
            x_dynamo_request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            parent_id = tracing::field::Empty,
            // Left for the handler to fill (OpenTelemetry's GenAI conventions, for LLM workers).
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.request.max_tokens = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
        );
        if let Some(parent) = tandem_telemetry::propagation::set_remote_parent(&span, |k| {
            transport::header(headers, k)
        }) {
            span.record("parent_id", parent);
        }
        if let Some(t) = tandem_telemetry::propagation::trace_id(&span) {
            span.record("trace_id", t);
        }
        for (field, header) in [
            ("request_id", transport::HDR_REQUEST_ID),
            ("x_request_id", "x-request-id"),
            ("x_dynamo_request_id", "x-dynamo-request-id"),
        ] {
            if let Some(v) = transport::header(headers, header) {
                span.record(field, v);
            }
        }
        self.handle_in_span(msg).instrument(span).await
    }

    async fn handle_in_span(&self, msg: async_nats::Message) {
        let started = Instant::now();
        let m = &self.metrics;
        m.requests.inc();
        m.request_bytes.inc_by(msg.payload.len() as u64);
        m.inflight.inc();
        let _inflight = scopeguard(|| m.inflight.dec());

        let headers = msg.headers.as_ref();
        let (Some(id), Some(reply_to)) = (
            transport::header(headers, transport::HDR_REQUEST_ID),
            transport::header(headers, transport::HDR_REPLY_TO),
        ) else {
            m.errors.invalid_message.inc();
            if let Some(reply) = msg.reply {
                let error = RemoteError::new(
                    ErrorCode::InvalidRequest,
                    "request lacks tandem-request-id or tandem-reply-to",
                );
                let frame = transport::encode_frame(FrameKind::Error, None, &error.encode());
                let _ = self.nats.publish(reply, frame).await;
            }
            return;
        };
        let id = id.to_string();
        let reply_to = reply_to.to_string();
        let passthrough: Vec<(String, String)> = transport::PASSTHROUGH_HEADERS
            .iter()
            .filter_map(|name| {
                transport::header(headers, name).map(|v| (name.to_string(), v.to_string()))
            })
            .collect();

        if let Some(ack) = msg.reply {
            let _ = self.nats.publish(ack, Bytes::new()).await;
        }

        let cancel = CancellationToken::new();
        let controls = self.inflight.insert(&id, cancel.clone());
        let mut ctx = RequestContext::with_controls(id.clone(), passthrough, Some(controls));
        ctx.cancel = cancel;
        let _registered = scopeguard(|| self.inflight.remove(&id));
        let probe = tokio::spawn(
            probe_caller(
                self.nats.clone(),
                reply_to.clone(),
                ctx.clone(),
                self.probe_interval,
            )
            .in_current_span(),
        );
        let _probe = scopeguard(|| probe.abort());

        tracing::debug!("request received");
        let outcome = self.stream_response(msg.payload, &ctx, &reply_to).await;
        if let Outcome::Cancelled = outcome {
            m.cancellations.inc();
        }
        let elapsed = started.elapsed();
        m.duration.observe(elapsed.as_secs_f64());
        tracing::debug!(
            outcome = outcome.as_str(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request completed"
        );
    }

    async fn stream_response(&self, body: Bytes, ctx: &RequestContext, reply_to: &str) -> Outcome {
        let m = &self.metrics;
        let stream = tokio::select! {
            _ = ctx.stopped() => return Outcome::Cancelled,
            _ = self.handover.cancelled() => return self.hand_over(reply_to).await,
            s = self.handler.handle(body, ctx.clone()) => s,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                m.errors.generate.inc();
                self.publish_error(reply_to, &e).await;
                return Outcome::Failed;
            }
        };
        let mut seq = 0u64;
        // What ended a batch early (the stream's end or its error), handled next.
        let mut pending = None;
        loop {
            let item = match pending.take() {
                Some(item) => item,
                None => tokio::select! {
                    _ = ctx.stopped() => return Outcome::Cancelled,
                    _ = self.handover.cancelled() => return self.hand_over(reply_to).await,
                    item = stream.next() => item,
                },
            };
            match item {
                Some(Ok(first)) => {
                    // Whatever else the handler has ready goes in the same frame.
                    let mut bytes = first.len();
                    let mut ready = vec![first];
                    let mut end = None;
                    while ready.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        match stream.next().now_or_never() {
                            Some(Some(Ok(p))) if bytes + p.len() + 4 <= MAX_BATCH_BYTES => {
                                bytes += p.len() + 4;
                                ready.push(p);
                            }
                            Some(other) => {
                                end = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let frame = if ready.len() == 1 {
                        transport::encode_frame(FrameKind::Data, Some(seq), &ready[0])
                    } else {
                        transport::encode_batch(seq, &ready)
                    };
                    let len = frame.len();
                    match self.nats.publish(reply_to.to_string(), frame).await {
                        Ok(()) => m.response_bytes.inc_by(len as u64),
                        Err(e) => {
                            m.errors.publish_response.inc();
                            let e = RemoteError::internal(format!("response frame not sent: {e}"));
                            self.publish_error(reply_to, &e).await;
                            return Outcome::Failed;
                        }
                    }
                    seq += 1;
                    pending = end;
                }
                Some(Err(e)) => {
                    m.errors.response_stream.inc();
                    self.publish_error(reply_to, &e).await;
                    return Outcome::Failed;
                }
                None => break,
            }
        }
        let frame = transport::encode_frame(FrameKind::Final, Some(seq), &[]);
        if self
            .nats
            .publish(reply_to.to_string(), frame)
            .await
            .is_err()
        {
            m.errors.publish_final.inc();
            return Outcome::Failed;
        }
        Outcome::Done
    }

    /// Ends a request this instance will not finish (it is shutting down): the caller gets
    /// `unavailable`, which it may retry elsewhere; dropping the handler's stream frees what
    /// the request held here.
    async fn hand_over(&self, reply_to: &str) -> Outcome {
        let e = RemoteError::new(
            ErrorCode::Unavailable,
            "the worker is shutting down; the request was not finished here",
        );
        self.publish_error(reply_to, &e).await;
        Outcome::Failed
    }

    async fn publish_error(&self, reply_to: &str, error: &RemoteError) {
        let frame = transport::encode_frame(FrameKind::Error, None, &error.encode());
        if self
            .nats
            .publish(reply_to.to_string(), frame)
            .await
            .is_err()
        {
            self.metrics.errors.publish_final.inc();
        }
    }
}

enum Outcome {
    Done,
    Failed,
    Cancelled,
}

impl Outcome {
    fn as_str(&self) -> &'static str {
        match self {
            Self::Done => "success",
            Self::Failed => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Asks the caller's reply subject every `interval` whether anyone still listens. NATS
/// answers "no responders" at once when the caller's subscription is gone (dropped stream,
/// killed process), and the request is stopped. Timeouts and connection errors prove
/// nothing (a busy caller, a NATS restart) and are ignored.
async fn probe_caller(
    nats: async_nats::Client,
    reply_to: String,
    ctx: RequestContext,
    interval: Duration,
) {
    loop {
        tokio::select! {
            _ = ctx.stopped() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let request = async_nats::Request::new()
            .payload(transport::encode_frame(FrameKind::Ping, None, &[]))
            .timeout(Some(interval));
        match nats.send_request(reply_to.clone(), request).await {
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                tracing::debug!(
                    request_id = ctx.id(),
                    "caller is gone; stopping the request"
                );
                ctx.stop();
                return;
            }
            _ => {}
        }
    }
}

/// Runs `f` when dropped: bookkeeping that must happen on every exit path.
struct ScopeGuard<F: FnOnce()>(Option<F>);
impl<F: FnOnce()> Drop for ScopeGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}
fn scopeguard<F: FnOnce()>(f: F) -> ScopeGuard<F> {
    ScopeGuard(Some(f))
}

/// Headers to pass through from a caller's list into a NATS header map.
pub(crate) fn request_headers(id: &str, reply_to: &str, extra: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(transport::HDR_REQUEST_ID, id);
    h.insert(transport::HDR_REPLY_TO, reply_to);
    for (k, v) in extra {
        if transport::PASSTHROUGH_HEADERS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(k))
        {
            h.insert(k.to_ascii_lowercase().as_str(), v.as_str());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths_parse_and_render_like_dynamo() {
        let id: EndpointId = "dyn://dynamo.backend.generate".parse().unwrap();
        assert_eq!(id.to_string(), "dyn://dynamo.backend.generate");
        assert_eq!(
            id.subject(0x694d98147d54be25),
            "dynamo_backend.generate-694d98147d54be25"
        );
        assert_eq!(
            id.etcd_key(0x694d985d0f41c9a4),
            "instances/dynamo/backend/generate:694d985d0f41c9a4"
        );
        let bare: EndpointId = "ns.prefill.generate".parse().unwrap();
        assert_eq!(bare.component, "prefill");
        for bad in [
            "dyn://a.b",
            "dyn://a.b.c.d",
            "dyn://a..c",
            "dyn://a b.c.d",
            "",
        ] {
            assert!(bad.parse::<EndpointId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_trace_headers_pass_through() {
        let h = request_headers(
            "r1",
            "_INBOX.x",
            &[
                ("traceparent".into(), "00-abc-def-01".into()),
                ("X-Request-Id".into(), "test-1".into()),
                ("authorization".into(), "secret".into()),
            ],
        );
        assert_eq!(h.get("traceparent").unwrap().as_str(), "00-abc-def-01");
        assert_eq!(h.get("x-request-id").unwrap().as_str(), "test-1");
        assert!(h.get("authorization").is_none());
        assert_eq!(h.get(transport::HDR_REQUEST_ID).unwrap().as_str(), "r1");
    }
}
