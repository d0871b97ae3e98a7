//! The per-process runtime and the namespace → component → endpoint handles built from it.

use crate::client::{Client, ClientSettings};
use crate::config::RuntimeConfig;
use crate::discovery::{Discovery, Instance, Transport};
use crate::endpoint::{EndpointId, Handler, InflightRegistry, Ingress};
use crate::error::RuntimeError;
use crate::lock;
use crate::metrics::RuntimeMetrics;
use crate::system_status::{self, HealthState};
use crate::transport;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long requests being handed over get to send their last frame.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct DistributedRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: RuntimeConfig,
    nats: async_nats::Client,
    discovery: Discovery,
    metrics: Arc<RuntimeMetrics>,
    health: Arc<HealthState>,
    inflight: Arc<InflightRegistry>,
    /// Stops background tasks: lease keep-alive, watches, the status server.
    background: CancellationToken,
    /// Stops the endpoints' request loops.
    endpoints_stop: CancellationToken,
    /// Hands the requests still running after the grace period back to their callers.
    handover: CancellationToken,
    endpoint_tasks: TaskTracker,
    system_addr: Mutex<Option<SocketAddr>>,
}

impl DistributedRuntime {
    /// Connects to NATS and etcd, takes the primary lease, starts listening for cancellations
    /// and, when configured, the system status server.
    pub async fn connect(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let (connected_tx, connected) = watch::channel(true);
        let nats = connect_nats(&config.nats_server, connected_tx).await?;
        let background = CancellationToken::new();
        let discovery = Discovery::connect(
            &config.etcd_endpoints,
            config.lease_ttl(),
            background.clone(),
        )
        .await?;
        let instance_id = discovery.instance_id();
        let metrics = Arc::new(RuntimeMetrics::new(instance_id));
        let health = Arc::new(HealthState::new(
            config.required_endpoints(),
            config.starting_health_status == crate::config::HealthStatus::Ready,
        ));
        let inflight = Arc::new(InflightRegistry::default());

        let mut cancels = nats
            .subscribe(transport::cancel_subject(instance_id))
            .await
            .map_err(|e| RuntimeError::Nats(e.to_string()))?;
        let registry = inflight.clone();
        let stop = background.clone();
        let nats_for_cancels = nats.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = cancels.next() => match m { Some(m) => m, None => return },
                };
                let headers = msg.headers.as_ref();
                if transport::header(headers, transport::HDR_KIND) == Some(transport::PING) {
                    if let Some(reply) = msg.reply {
                        let running = transport::header(headers, transport::HDR_REQUEST_ID)
                            .is_none_or(|id| registry.contains(id));
                        let answer = if running {
                            transport::RUNNING
                        } else {
                            transport::NOT_RUNNING
                        };
                        let _ = nats_for_cancels
                            .publish(reply, bytes::Bytes::from_static(answer))
                            .await;
                    }
                    continue;
                }
                let Some(id) = transport::header(headers, transport::HDR_REQUEST_ID) else {
                    continue;
                };
                if transport::header(headers, transport::HDR_KIND) == Some(transport::CONTROL) {
                    registry.control(id, msg.payload);
                } else {
                    registry.cancel(id);
                }
            }
        });

        let drt = Self {
            inner: Arc::new(Inner {
                nats,
                discovery,
                metrics,
                health,
                inflight,
                background,
                endpoints_stop: CancellationToken::new(),
                handover: CancellationToken::new(),
                endpoint_tasks: TaskTracker::new(),
                system_addr: Mutex::new(None),
                config,
            }),
        };
        tokio::spawn(withdraw_while_disconnected(
            connected,
            drt.inner.discovery.clone(),
            drt.inner.health.clone(),
            drt.inner.background.clone(),
        ));
        if let Some(port) = drt.inner.config.system_port() {
            let config = &drt.inner.config;
            let addr = system_status::start(
                &config.system_host,
                port,
                (&config.system_health_path, &config.system_live_path),
                drt.inner.health.clone(),
                drt.inner.metrics.clone(),
                drt.inner.nats.clone(),
                drt.inner.background.clone(),
            )
            .await?;
            *lock(&drt.inner.system_addr) = Some(addr);
        }
        tracing::info!(
            instance_id = format!("{instance_id:x}"),
            "runtime connected"
        );
        Ok(drt)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub fn instance_id(&self) -> u64 {
        self.inner.discovery.instance_id()
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    pub fn discovery(&self) -> &Discovery {
        &self.inner.discovery
    }

    pub fn metrics(&self) -> &Arc<RuntimeMetrics> {
        &self.inner.metrics
    }

    pub fn health(&self) -> &Arc<HealthState> {
        &self.inner.health
    }

    /// Requests being handled by this process right now.
    pub fn inflight_requests(&self) -> usize {
        self.inner.inflight.len()
    }

    /// Where the system status server listens, when enabled.
    pub fn system_address(&self) -> Option<SocketAddr> {
        *lock(&self.inner.system_addr)
    }

    /// Cancelled when the runtime shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.background.clone()
    }

    pub fn namespace(&self, name: &str) -> Namespace {
        Namespace {
            drt: self.clone(),
            name: name.to_string(),
        }
    }

    /// The namespace from the configuration (`--namespace` / `DYN_NAMESPACE`).
    pub fn default_namespace(&self) -> Namespace {
        self.namespace(&self.inner.config.namespace.clone())
    }

    pub fn endpoint(&self, id: EndpointId) -> Endpoint {
        Endpoint {
            drt: self.clone(),
            id,
        }
    }

    /// Graceful stop: withdraws from discovery and readiness first so no new work arrives,
    /// lets in-flight requests finish (bounded), then stops background tasks.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.health.set_all(false);
        // Each step is bounded: a process must stop even when etcd or NATS is already gone.
        match tokio::time::timeout(Duration::from_secs(2), inner.discovery.revoke()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not revoke etcd lease; keys expire with its TTL")
            }
            Err(_) => tracing::warn!("etcd did not answer; keys expire with the lease TTL"),
        }
        inner.endpoints_stop.cancel();
        inner.endpoint_tasks.close();
        let grace = inner.config.graceful_shutdown_timeout();
        if tokio::time::timeout(grace, inner.endpoint_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                inflight = inner.inflight.len(),
                grace_secs = grace.as_secs_f64(),
                "shutdown: handing the requests still running back to their callers"
            );
            inner.handover.cancel();
            if tokio::time::timeout(HANDOVER_TIMEOUT, inner.endpoint_tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    inflight = inner.inflight.len(),
                    "shutdown: in-flight requests did not end in time"
                );
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.nats.flush()).await;
        inner.background.cancel();
    }
}

/// How long a lost NATS connection may last before this process takes itself out of
/// discovery (a reconnect usually takes well under a second).
pub const WITHDRAW_AFTER: Duration = Duration::from_secs(2);

/// A process whose NATS connection is down cannot answer requests, but its lease (on etcd,
/// another connection) keeps its records alive, so callers would keep choosing it. After
/// [`WITHDRAW_AFTER`] without NATS its records leave etcd and its endpoints report not ready;
/// once NATS is back they return.
async fn withdraw_while_disconnected(
    mut connected: watch::Receiver<bool>,
    discovery: Discovery,
    health: Arc<HealthState>,
    stop: CancellationToken,
) {
    loop {
        // Wait for a disconnection that lasts.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = connected.wait_for(|c| !*c) => if r.is_err() { return },
        }
        let back = tokio::time::timeout(WITHDRAW_AFTER, connected.wait_for(|c| *c))
            .await
            .is_ok();
        if back {
            continue;
        }
        tracing::warn!(
            "NATS unreachable for {WITHDRAW_AFTER:?}: withdrawing from discovery until it is back"
        );
        health.set_all(false);
        if let Err(e) = discovery.withdraw().await {
            tracing::warn!(error = %e, "could not withdraw from etcd");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = connected.wait_for(|c| *c) => if r.is_err() { return },
        }
        // Until etcd takes the records back, keep trying: the process is reachable again.
        loop {
            match discovery.restore().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-register in etcd; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
        health.set_all(true);
        tracing::info!("NATS is back: registered in discovery again");
    }
}

async fn connect_nats(
    servers: &str,
    connected: watch::Sender<bool>,
) -> Result<async_nats::Client, RuntimeError> {
    let connected = Arc::new(connected);
    let fail = |reason: String| RuntimeError::NatsConnect {
        url: servers.to_string(),
        reason,
    };
    let addrs = servers
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None)
        // Reconnect quickly: a restarted NATS should cost requests a second, not a minute.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).clamp(50, 1000))
        })
        .event_callback(move |event| {
            let connected = connected.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        connected.send_replace(false);
                        tracing::warn!("NATS disconnected; reconnecting")
                    }
                    async_nats::Event::Connected => {
                        connected.send_replace(true);
                        tracing::info!("NATS connected")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        })
        .connect(addrs)
        .await
        .map_err(|e| fail(e.to_string()))
}

#[derive(Clone)]
pub struct Namespace {
    drt: DistributedRuntime,
    name: String,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn component(&self, name: &str) -> Component {
        Component {
            drt: self.drt.clone(),
            namespace: self.name.clone(),
            name: name.to_string(),
        }
    }
}

#[derive(Clone)]
pub struct Component {
    drt: DistributedRuntime,
    namespace: String,
    name: String,
}

impl Component {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoint(&self, name: &str) -> Result<Endpoint, RuntimeError> {
        Ok(Endpoint {
            drt: self.drt.clone(),
            id: EndpointId::new(&self.namespace, &self.name, name)?,
        })
    }
}

#[derive(Clone)]
pub struct Endpoint {
    drt: DistributedRuntime,
    id: EndpointId,
}

impl Endpoint {
    pub fn id(&self) -> &EndpointId {
        &self.id
    }

    /// Starts serving this endpoint with `handler`: subscribes, registers the instance in
    /// etcd, marks the endpoint ready. Returns once it is serving; requests are handled in the
    /// background until the runtime shuts down.
    pub async fn serve(&self, handler: impl Handler) -> Result<(), RuntimeError> {
        let inner = &self.drt.inner;
        let instance_id = inner.discovery.instance_id();
        let health = inner.health.clone();
        let name = self.id.name.clone();
        health.declare(&name);

        let subject = self.id.subject(instance_id);
        let sub = inner
            .nats
            .queue_subscribe(subject.clone(), transport::QUEUE_GROUP.to_string())
            .await
            .map_err(|e| RuntimeError::Nats(e.to_string()))?;
        let ingress = Arc::new(Ingress {
            endpoint: self.id.clone(),
            instance_id,
            nats: inner.nats.clone(),
            handler: Arc::new(handler),
            metrics: inner
                .metrics
                .endpoint(&self.id.namespace, &self.id.component, &self.id.name),
            inflight: inner.inflight.clone(),
            probe_interval: inner.config.probe_interval(),
            handover: inner.handover.clone(),
            tasks: TaskTracker::new(),
        });
        let stop = inner.endpoints_stop.clone();
        let ready = health.clone();
        let ready_name = name.clone();
        inner.endpoint_tasks.spawn(async move {
            ingress.run(sub, stop).await;
            ready.set(&ready_name, false);
        });

        let record = Instance {
            component: self.id.component.clone(),
            endpoint: self.id.name.clone(),
            namespace: self.id.namespace.clone(),
            instance_id,
            transport: Transport::NatsTcp(subject.clone()),
        };
        inner
            .discovery
            .register(&self.id.etcd_key(instance_id), serde_json::to_vec(&record)?)
            .await?;
        health.set(&name, true);
        tracing::info!(endpoint = %self.id, %subject, "serving endpoint");
        Ok(())
    }

    /// A client that follows this endpoint's instances.
    pub fn client(&self) -> Client {
        let inner = &self.drt.inner;
        Client::new(
            self.id.clone(),
            inner.nats.clone(),
            inner.discovery.watch_prefix(&self.id.etcd_prefix()),
            ClientSettings {
                ack_timeout: inner.config.ack_timeout(),
                stall_timeout: inner.config.stall_timeout(),
                probe_interval: inner.config.probe_interval(),
            },
        )
    }
}
