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
/// Longest a control frame may be.
const MAX_FRAME: u32 = 1 << 20;
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
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => c,
            };
            match conn {
                Ok((stream, peer)) => {
                    let (transfer, holds, metrics) =
                        (transfer.clone(), holds.clone(), metrics.clone());
                    tokio::spawn(async move {
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
