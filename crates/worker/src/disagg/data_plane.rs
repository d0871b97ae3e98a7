//! The KV data plane: a direct TCP connection from a decode worker to a prefill worker.
//!
//! One connection per transfer. The decode worker sends a [`FetchRequest`] (transfer id, the
//! first block it lacks, its layout); the prefill worker answers with a [`FetchHeader`] and,
//! unless it refuses, the blocks' raw bytes back to back. Frames are a little-endian `u32`
//! length and JSON. Whatever happens on the connection — sent in full, refused, cut — the
//! prefill worker then frees the held blocks: a transfer is fetched once, and a decode
//! worker that could not use it computes the prompt itself.
//!
//! The sender reads blocks in chunks of about [`CHUNK_BYTES`] on a blocking thread while the
//! previous chunk is written, so memory stays bounded by a few chunks whatever the prompt's
//! size; the receiver keeps the blocks it fetched (they are the request's, until the engine
//! writes them into its pool at admission).

use super::holds::Holds;
use crate::metrics::TransferMetrics;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_engine_api::KvTransfer;
use tandem_protocols::disagg::{
    DataPlaneEndpoint, DisaggregatedParams, FetchError, FetchHeader, FetchRequest, KvLayout,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Blocks are read and written in chunks of about this many bytes.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Longest a control frame may be (a request or header is a few hundred bytes).
const MAX_FRAME: u32 = 64 << 10;
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// How long either side waits for the other's next frame or chunk.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a transfer failed, as the `reason` label of `dynamo_component_kv_transfer_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferFailure {
    #[error("the prefill worker refused: {}", .0.as_str())]
    Refused(FetchError),
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Io(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("the transfer does not describe this request's prompt: {0}")]
    PromptMismatch(String),
    #[error("{bytes} bytes would exceed the {budget}-byte budget for fetched KV")]
    OverBudget { bytes: u64, budget: u64 },
}

impl TransferFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused(e) => e.as_str(),
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Io(_) => "io",
            Self::Protocol(_) => "protocol",
            Self::PromptMismatch(_) => "prompt_mismatch",
            Self::OverBudget { .. } => "over_budget",
        }
    }
}

impl From<std::io::Error> for TransferFailure {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

async fn timed<T>(
    f: impl Future<Output = Result<T, TransferFailure>>,
) -> Result<T, TransferFailure> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or(Err(TransferFailure::Timeout))
}

async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> Result<(), TransferFailure> {
    let body = serde_json::to_vec(value).map_err(|e| TransferFailure::Protocol(e.to_string()))?;
    w.write_all(&(body.len() as u32).to_le_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, TransferFailure> {
    let len = r.read_u32_le().await?;
    if len > MAX_FRAME {
        return Err(TransferFailure::Protocol(format!("frame of {len} bytes")));
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| TransferFailure::Protocol(e.to_string()))
}

/// Binds the data plane on `host:port` (0: any free port) and serves fetches until `stop`.
/// Returns the address to advertise.
pub async fn start(
    host: &str,
    port: u16,
    transfer: Arc<dyn KvTransfer>,
    holds: Holds,
    metrics: TransferMetrics,
    stop: CancellationToken,
) -> std::io::Result<DataPlaneEndpoint> {
    let listener = TcpListener::bind((host, port)).await?;
    let port = listener.local_addr()?.port();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => c,
            };
            match conn {
                Ok((stream, peer)) => {
                    let (transfer, holds, metrics) =
                        (transfer.clone(), holds.clone(), metrics.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) = send(stream, transfer, holds, &metrics).await {
                            metrics.failed(e.reason());
                            tracing::warn!(%peer, error = %e, "KV transfer to a decode worker failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "KV data plane accept failed"),
            }
        }
    });
    Ok(DataPlaneEndpoint {
        host: host.to_string(),
        port,
    })
}

/// Prefill side of one connection.
async fn send(
    mut stream: TcpStream,
    transfer: Arc<dyn KvTransfer>,
    holds: Holds,
    metrics: &TransferMetrics,
) -> Result<(), TransferFailure> {
    stream.set_nodelay(true)?;
    let request: FetchRequest = timed(read_frame(&mut stream)).await?;
    let started = Instant::now();
    let Some(blocks) = holds.claim(request.transfer_id) else {
        return refuse(&mut stream, FetchError::UnknownTransfer).await;
    };
    // Fetched once: whatever follows, the blocks go back to the pool.
    let _release = ReleaseOnDrop(transfer.clone(), request.transfer_id);
    let layout = transfer.layout();
    if let Some(why) = layout.mismatch(&request.layout) {
        tracing::warn!(%why, "refusing a KV fetch");
        return refuse(&mut stream, FetchError::LayoutMismatch).await;
    }
    let Some(wanted) = blocks.get(request.first_block as usize..) else {
        return refuse(&mut stream, FetchError::BadRange).await;
    };
    let block_bytes = layout.block_bytes();
    let header = FetchHeader {
        error: None,
        blocks: wanted.len() as u32,
        block_bytes: block_bytes as u64,
    };
    timed(write_frame(&mut stream, &header)).await?;
    // Reader thread → bounded channel → socket.
    let per_chunk = (CHUNK_BYTES / block_bytes.max(1)).max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(2);
    let ids = wanted.to_vec();
    let reader = transfer.clone();
    tokio::task::spawn_blocking(move || {
        for chunk in ids.chunks(per_chunk) {
            let mut buf = Vec::with_capacity(chunk.len() * block_bytes);
            let read = chunk
                .iter()
                .try_for_each(|&id| reader.read_block(id, &mut buf))
                .map(|()| buf)
                .map_err(|e| e.to_string());
            if tx.blocking_send(read).is_err() {
                return;
            }
        }
    });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| {
            tracing::error!(error = %e, "reading a held block failed");
            TransferFailure::Refused(FetchError::ReadFailed)
        })?;
        timed(async { Ok(stream.write_all(&chunk).await?) }).await?;
        sent += chunk.len() as u64;
    }
    stream.flush().await?;
    let simulated = wanted.len() as u64 * transfer.simulated_block_bytes();
    metrics.sent(sent + simulated, wanted.len() as u64, started.elapsed());
    tracing::debug!(
        transfer_id = request.transfer_id,
        blocks = wanted.len(),
        bytes = sent,
        "KV blocks sent"
    );
    Ok(())
}

async fn refuse(stream: &mut TcpStream, error: FetchError) -> Result<(), TransferFailure> {
    let header = FetchHeader {
        error: Some(error),
        blocks: 0,
        block_bytes: 0,
    };
    timed(write_frame(stream, &header)).await?;
    Err(TransferFailure::Refused(error))
}

struct ReleaseOnDrop(Arc<dyn KvTransfer>, u64);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Decode side: fetches blocks `first_block..` of the transfer `params` describes. Fetching
/// from the end (`first_block` = all blocks) moves nothing and only frees them. Each block
/// counts `simulated_block_bytes` more in the metrics (the mocker's modelled size).
pub async fn fetch(
    params: &DisaggregatedParams,
    first_block: usize,
    layout: &KvLayout,
    simulated_block_bytes: u64,
    metrics: &TransferMetrics,
) -> Result<Vec<Vec<u8>>, TransferFailure> {
    let started = Instant::now();
    let addr = format!("{}:{}", params.endpoint.host, params.endpoint.port);
    let mut stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| TransferFailure::Timeout)?
        .map_err(|e| TransferFailure::Connect(format!("{addr}: {e}")))?;
    stream.set_nodelay(true)?;
    let request = FetchRequest {
        transfer_id: params.transfer_id,
        first_block: first_block as u32,
        layout: layout.clone(),
    };
    timed(write_frame(&mut stream, &request)).await?;
    let header: FetchHeader = timed(read_frame(&mut stream)).await?;
    if let Some(e) = header.error {
        return Err(TransferFailure::Refused(e));
    }
    let expected = params.block_ids.len().saturating_sub(first_block);
    let block_bytes = layout.block_bytes();
    if header.blocks as usize != expected || header.block_bytes != block_bytes as u64 {
        return Err(TransferFailure::Protocol(format!(
            "{} blocks of {} bytes offered, {expected} of {block_bytes} expected",
            header.blocks, header.block_bytes
        )));
    }
    let mut blocks = Vec::with_capacity(expected);
    for _ in 0..expected {
        let mut block = vec![0u8; block_bytes];
        timed(async { Ok(stream.read_exact(&mut block).await.map(|_| ())?) }).await?;
        blocks.push(block);
    }
    metrics.received(
        (expected * block_bytes) as u64 + expected as u64 * simulated_block_bytes,
        expected as u64,
        started.elapsed(),
    );
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::super::memory::MemoryBlocks;
    use super::*;
    use tandem_runtime::EndpointId;

    fn layout() -> KvLayout {
        // 2 × 4 layers × 16 tokens × 4 heads × 64 × 4 bytes = 128 KiB a block.
        KvLayout {
            num_layers: 4,
            num_kv_heads: 4,
            head_dim: 64,
            block_size: 16,
            dtype: "f32".into(),
        }
    }

    fn block(id: u32, bytes: usize) -> Vec<u8> {
        (0..bytes)
            .map(|i| (i as u32 ^ id.wrapping_mul(31)) as u8)
            .collect()
    }

    struct Setup {
        transfer: Arc<MemoryBlocks>,
        holds: Holds,
        metrics: TransferMetrics,
        endpoint: DataPlaneEndpoint,
        _stop: tokio_util::sync::DropGuard,
    }

    async fn setup(n_blocks: u32, timeout: Duration) -> Setup {
        let l = layout();
        let blocks = (100..100 + n_blocks)
            .map(|id| (id, block(id, l.block_bytes())))
            .collect();
        let transfer = Arc::new(MemoryBlocks::new(l, blocks));
        let ep = EndpointId::new("test", "prefill", "generate").unwrap();
        let metrics = TransferMetrics::new(&ep).unwrap();
        let holds = Holds::new(transfer.clone(), timeout, metrics.clone());
        let stop = CancellationToken::new();
        let endpoint = start(
            "127.0.0.1",
            0,
            transfer.clone(),
            holds.clone(),
            metrics.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        Setup {
            transfer,
            holds,
            metrics,
            endpoint,
            _stop: stop.drop_guard(),
        }
    }

    fn params(s: &Setup, transfer_id: u64, n_blocks: u32) -> DisaggregatedParams {
        DisaggregatedParams {
            endpoint: s.endpoint.clone(),
            transfer_id,
            block_ids: (100..100 + n_blocks).collect(),
            layout: layout(),
            ..Default::default()
        }
    }

    async fn released(s: &Setup, transfer_id: u64) {
        for _ in 0..200 {
            if s.transfer.released().contains(&transfer_id) {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("transfer {transfer_id} was not released");
    }

    #[tokio::test]
    async fn a_fetch_streams_the_held_blocks_in_chunks_and_frees_them() {
        // 40 blocks of 128 KiB: more than one 4 MiB chunk.
        let s = setup(40, Duration::from_secs(30)).await;
        s.holds.hold(7, (100..140).collect());
        let receiver =
            TransferMetrics::new(&EndpointId::new("test", "backend", "generate").unwrap()).unwrap();
        let got = fetch(&params(&s, 7, 40), 3, &layout(), 0, &receiver)
            .await
            .unwrap();
        assert_eq!(got.len(), 37, "blocks from the first uncached one");
        for (i, b) in got.iter().enumerate() {
            assert_eq!(
                *b,
                block(103 + i as u32, layout().block_bytes()),
                "block {i}"
            );
        }
        released(&s, 7).await;
        assert!(s.holds.is_empty());
        // Fetched once: a second fetch finds nothing.
        let again = fetch(&params(&s, 7, 40), 0, &layout(), 0, &receiver).await;
        assert_eq!(
            again,
            Err(TransferFailure::Refused(FetchError::UnknownTransfer))
        );
        assert_eq!(
            receiver.failures("unknown_transfer"),
            0,
            "the caller counts its own"
        );
        assert_eq!(s.metrics.failures("unknown_transfer"), 1);
    }

    #[tokio::test]
    async fn a_layout_mismatch_is_refused_and_frees_the_blocks() {
        let s = setup(4, Duration::from_secs(30)).await;
        s.holds.hold(9, (100..104).collect());
        let mut other = layout();
        other.dtype = "bf16".into();
        let r = fetch(&params(&s, 9, 4), 0, &other, 0, &s.metrics).await;
        assert_eq!(r, Err(TransferFailure::Refused(FetchError::LayoutMismatch)));
        released(&s, 9).await;
    }

    #[tokio::test]
    async fn a_range_past_the_blocks_is_refused() {
        let s = setup(4, Duration::from_secs(30)).await;
        s.holds.hold(11, (100..104).collect());
        let r = fetch(&params(&s, 11, 4), 5, &layout(), 0, &s.metrics).await;
        assert_eq!(r, Err(TransferFailure::Refused(FetchError::BadRange)));
        released(&s, 11).await;
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_failure() {
        let s = setup(1, Duration::from_secs(30)).await;
        let mut p = params(&s, 1, 1);
        p.endpoint.port = free_port();
        let r = fetch(&p, 0, &layout(), 0, &s.metrics).await;
        assert!(matches!(r, Err(TransferFailure::Connect(_))), "{r:?}");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn a_released_hold_is_freed_once_and_cannot_be_fetched() {
        let s = setup(2, Duration::from_secs(30)).await;
        s.holds.hold(13, vec![100, 101]);
        assert!(s.holds.release(13));
        assert!(!s.holds.release(13));
        assert_eq!(s.transfer.released(), vec![13]);
        let r = fetch(&params(&s, 13, 2), 0, &layout(), 0, &s.metrics).await;
        assert_eq!(
            r,
            Err(TransferFailure::Refused(FetchError::UnknownTransfer))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn blocks_nobody_fetches_are_freed_when_the_hold_expires() {
        let s = setup(2, Duration::from_secs(30)).await;
        s.holds.hold(5, vec![100, 101]);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(s.transfer.released().is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.transfer.released(), vec![5]);
        assert_eq!(s.metrics.failures("expired"), 1);
        assert_eq!(s.holds.claim(5), None);
    }
}
