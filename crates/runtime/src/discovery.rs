//! etcd-backed discovery: one primary lease per process, keys registered under it, and
//! prefix watches that mirror what other processes registered.
//!
//! The lease is kept alive in the background (every TTL/3). If etcd forgets it (an etcd that
//! restarted empty, or a pause longer than the TTL), a new lease is granted and every key this
//! process registered is written again, so a process never silently vanishes from discovery.
//! The instance id stays the id of the first lease: subjects that embed it stay valid.
//!
//! Watches first read the whole prefix, then follow changes from that revision; on any error
//! they start over with a fresh read, so a restarted etcd is resynchronised, not patched. A
//! key that a resynchronisation no longer finds — but that nobody deleted while the watch ran
//! — is kept for [`RESYNC_GRACE`] before it is dropped: after an etcd that restarted empty,
//! live processes need a moment to register again, and their records must not flicker out of
//! every watcher's view (a frontend would drop a model whose workers never stopped).

use crate::error::RuntimeError;
use crate::lock;
use etcd_client::{
    Client as EtcdClient, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Root of classic Dynamo's instance keys.
pub const INSTANCE_ROOT: &str = "instances";

/// Dynamo's `Instance` record: what a served endpoint writes into etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub component: String,
    pub endpoint: String,
    pub namespace: String,
    pub instance_id: u64,
    pub transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The NATS subject the instance listens on.
    NatsTcp(String),
}

impl Instance {
    pub fn subject(&self) -> &str {
        match &self.transport {
            Transport::NatsTcp(s) => s,
        }
    }
}

/// Mirror of the keys under a prefix: key → value.
pub type KvSnapshot = BTreeMap<String, Vec<u8>>;

#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    client: EtcdClient,
    ttl: i64,
    instance_id: u64,
    lease_id: AtomicI64,
    /// Keys this process owns, re-written under a new lease when the old one is lost.
    owned: Mutex<BTreeMap<String, Vec<u8>>>,
    /// The owned keys are out of etcd on purpose ([`Discovery::withdraw`]): a new lease must
    /// not write them back.
    withdrawn: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
}

const RETRY_DELAY: Duration = Duration::from_millis(250);

/// How long a key missing after a watch's resynchronisation is still reported (see the
/// module docs): long enough for a process to notice its lost lease and register again.
pub const RESYNC_GRACE: Duration = Duration::from_secs(15);

impl Discovery {
    /// Connects, grants the primary lease and starts keeping it alive until `shutdown`.
    pub async fn connect(
        endpoints: &[String],
        ttl: i64,
        shutdown: CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let mut client = EtcdClient::connect(endpoints, Some(options)).await?;
        let lease = client.lease_grant(ttl, None).await?;
        let inner = Arc::new(Inner {
            client,
            ttl,
            instance_id: lease.id() as u64,
            lease_id: AtomicI64::new(lease.id()),
            owned: Mutex::new(BTreeMap::new()),
            withdrawn: std::sync::atomic::AtomicBool::new(false),
            shutdown,
        });
        tokio::spawn(keep_lease_alive(inner.clone()));
        Ok(Self { inner })
    }

    /// This process's instance id (the id of its first primary lease).
    pub fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    pub fn lease_id(&self) -> i64 {
        self.inner.lease_id.load(Ordering::SeqCst)
    }

    pub fn etcd(&self) -> EtcdClient {
        self.inner.client.clone()
    }

    /// Writes `key` under the primary lease if no other process holds it, and remembers it so
    /// that it is written again if the lease is ever replaced.
    pub async fn register(&self, key: &str, value: Vec<u8>) -> Result<(), RuntimeError> {
        let lease = self.lease_id();
        let mut client = self.inner.client.clone();
        let created = create_if_absent(&mut client, key, value.clone(), lease).await?;
        if !created {
            return Err(RuntimeError::KeyExists(key.to_string()));
        }
        lock(&self.inner.owned).insert(key.to_string(), value);
        Ok(())
    }

    /// Removes a key this process registered.
    pub async fn unregister(&self, key: &str) -> Result<(), RuntimeError> {
        lock(&self.inner.owned).remove(key);
        self.inner.client.clone().delete(key, None).await?;
        Ok(())
    }

    /// Takes every key this process registered out of etcd, keeping the lease and the keys'
    /// values: nobody should find this process while it cannot answer (its NATS connection
    /// is down), and [`Discovery::restore`] puts them back.
    pub async fn withdraw(&self) -> Result<(), RuntimeError> {
        self.inner.withdrawn.store(true, Ordering::SeqCst);
        let keys: Vec<String> = lock(&self.inner.owned).keys().cloned().collect();
        let mut client = self.inner.client.clone();
        for key in keys {
            client.delete(key.as_str(), None).await?;
        }
        Ok(())
    }

    /// Writes back what [`Discovery::withdraw`] took out.
    pub async fn restore(&self) -> Result<(), RuntimeError> {
        put_owned(&self.inner, self.lease_id()).await?;
        self.inner.withdrawn.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Revokes the lease, deleting every key attached to it.
    pub async fn revoke(&self) -> Result<(), RuntimeError> {
        lock(&self.inner.owned).clear();
        self.inner
            .client
            .clone()
            .lease_revoke(self.lease_id())
            .await?;
        Ok(())
    }

    /// Follows every key under `prefix`; the receiver always holds the current set. The
    /// background task ends with the runtime or when every receiver is dropped.
    pub fn watch_prefix(&self, prefix: &str) -> watch::Receiver<KvSnapshot> {
        let (tx, rx) = watch::channel(KvSnapshot::new());
        tokio::spawn(follow_prefix(
            self.inner.client.clone(),
            prefix.to_string(),
            tx,
            self.inner.shutdown.clone(),
        ));
        rx
    }
}

async fn create_if_absent(
    client: &mut EtcdClient,
    key: &str,
    value: Vec<u8>,
    lease: i64,
) -> Result<bool, RuntimeError> {
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    Ok(client.txn(txn).await?.succeeded())
}

enum LeaseOutcome {
    Lost,
    Shutdown,
}

async fn keep_lease_alive(inner: Arc<Inner>) {
    let interval = Duration::from_millis((inner.ttl as u64 * 1000 / 3).max(500));
    loop {
        let lease = inner.lease_id.load(Ordering::SeqCst);
        match keep_alive_session(&inner, lease, interval).await {
            Ok(LeaseOutcome::Shutdown) => return,
            Ok(LeaseOutcome::Lost) => {
                tracing::warn!(
                    lease = format!("{lease:x}"),
                    "etcd lease lost; re-registering under a new lease"
                );
                if !renew_lease(&inner).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd lease keep-alive interrupted; retrying");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }
}

async fn keep_alive_session(
    inner: &Inner,
    lease: i64,
    interval: Duration,
) -> Result<LeaseOutcome, RuntimeError> {
    let mut client = inner.client.clone();
    let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        // etcd-client reports a first keep-alive answer of TTL 0 this way.
        Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
            return Ok(LeaseOutcome::Lost);
        }
        Err(e) => return Err(e.into()),
    };
    loop {
        keeper.keep_alive().await?;
        let response = tokio::select! {
            _ = inner.shutdown.cancelled() => return Ok(LeaseOutcome::Shutdown),
            r = tokio::time::timeout(interval, stream.message()) => r,
        };
        match response {
            Err(_) => return Err(RuntimeError::Nats("keep-alive response timed out".into())),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(None)) => {
                return Err(RuntimeError::Nats("keep-alive stream closed".into()));
            }
            Ok(Ok(Some(r))) if r.ttl() <= 0 => return Ok(LeaseOutcome::Lost),
            Ok(Ok(Some(_))) => {}
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return Ok(LeaseOutcome::Shutdown),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Grants a new lease and writes every owned key under it; retries until it succeeds or the
/// runtime shuts down (returns false then).
async fn renew_lease(inner: &Inner) -> bool {
    loop {
        match try_renew(inner).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-register in etcd yet; retrying");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }
}

async fn try_renew(inner: &Inner) -> Result<(), RuntimeError> {
    let mut client = inner.client.clone();
    let lease = client.lease_grant(inner.ttl, None).await?.id();
    inner.lease_id.store(lease, Ordering::SeqCst);
    if inner.withdrawn.load(Ordering::SeqCst) {
        return Ok(());
    }
    put_owned(inner, lease).await?;
    tracing::info!(lease = format!("{lease:x}"), "re-registered in etcd");
    Ok(())
}

/// Writes every key this process owns under `lease`.
async fn put_owned(inner: &Inner, lease: i64) -> Result<(), RuntimeError> {
    let owned = lock(&inner.owned).clone();
    let mut client = inner.client.clone();
    for (key, value) in owned {
        // A plain put: the key may still exist from a lost lease, and it is ours either way.
        client
            .put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
    }
    Ok(())
}

async fn follow_prefix(
    client: EtcdClient,
    prefix: String,
    tx: watch::Sender<KvSnapshot>,
    shutdown: CancellationToken,
) {
    let mut first = true;
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            r = follow_once(client.clone(), &prefix, &tx, first) => r,
        };
        first = false;
        if let Err(e) = outcome {
            tracing::debug!(prefix = %prefix, error = %e, "etcd watch interrupted; resynchronising");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(RETRY_DELAY) => {}
        }
    }
}

/// One read of the prefix and the watch that follows it. On a resynchronisation (`first`
/// false), keys the last view had and the read lacks are carried for [`RESYNC_GRACE`] unless a
/// watch event settles them first.
async fn follow_once(
    mut client: EtcdClient,
    prefix: &str,
    tx: &watch::Sender<KvSnapshot>,
    first: bool,
) -> Result<(), RuntimeError> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut snapshot = KvSnapshot::new();
    for kv in resp.kvs() {
        snapshot.insert(
            String::from_utf8_lossy(kv.key()).into_owned(),
            kv.value().to_vec(),
        );
    }
    let mut carried: Vec<String> = Vec::new();
    if !first {
        for (k, v) in tx.borrow().iter() {
            if !snapshot.contains_key(k) {
                snapshot.insert(k.clone(), v.clone());
                carried.push(k.clone());
            }
        }
        if !carried.is_empty() {
            tracing::info!(
                prefix,
                keys = carried.len(),
                "etcd lost keys of live processes, kept while they register again"
            );
        }
    }
    tx.send_replace(snapshot.clone());
    let grace_over = tokio::time::sleep(RESYNC_GRACE);
    tokio::pin!(grace_over);
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    loop {
        let resp = tokio::select! {
            m = stream.message() => match m? {
                Some(resp) => resp,
                None => break,
            },
            _ = &mut grace_over, if !carried.is_empty() => {
                for k in carried.drain(..) {
                    snapshot.remove(&k);
                }
                tx.send_replace(snapshot.clone());
                continue;
            }
        };
        if resp.canceled() {
            return Err(RuntimeError::Nats(format!(
                "watch cancelled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            carried.retain(|k| *k != key);
            match event.event_type() {
                EventType::Put => {
                    snapshot.insert(key, kv.value().to_vec());
                }
                EventType::Delete => {
                    snapshot.remove(&key);
                }
            }
            changed = true;
        }
        if changed {
            tx.send_replace(snapshot.clone());
        }
    }
    Err(RuntimeError::Nats("etcd watch stream ended".into()))
}
