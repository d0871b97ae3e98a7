//! KV data-plane bandwidth next to plain loopback TCP, measured the same way.
//!
//! For prompts of 1k, 8k and 32k tokens in the bundled model's f32 layout (SmolLM2-135M: 30
//! layers × 3 KV heads × 64 × 16-token blocks = 720 KiB a block), a prefill side holds the
//! prompt's blocks in memory and serves them on the real data plane (`data_plane::start`,
//! hold, claim, header, chunked reads, release); a decode side `fetch`es them into one buffer
//! per block. The baseline writes the same bytes in the same 4 MiB chunks over one loopback TCP
//! connection and reads them into the same per-block buffers, with no protocol. Each case runs
//! `ROUNDS` times, alternating, and the medians are printed as a Markdown table.
//!
//! Run: `scripts/bench-kv-transfer.sh` (or `cargo run --release -p tandem-worker --example
//! kv_transfer_bench`).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_protocols::disagg::{DisaggregatedParams, KvLayout};
use tandem_runtime::EndpointId;
use tandem_worker::TransferMetrics;
use tandem_worker::disagg::{data_plane, holds::Holds, memory::MemoryBlocks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUNDS: usize = 5;

fn layout() -> KvLayout {
    KvLayout {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        dtype: "f32".into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One fetch of `n` held blocks over the data plane; seconds.
async fn data_plane_once(
    endpoint: &tandem_protocols::disagg::DataPlaneEndpoint,
    holds: &Holds,
    n: u32,
    id: u64,
    metrics: &TransferMetrics,
) -> anyhow::Result<f64> {
    holds.hold(id, (0..n).collect());
    let params = DisaggregatedParams {
        endpoint: endpoint.clone(),
        transfer_id: id,
        block_ids: (0..n).collect(),
        layout: layout(),
        ..Default::default()
    };
    let t = Instant::now();
    let blocks = data_plane::fetch(&params, 0, &layout(), 0, metrics)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(blocks.len() == n as usize);
    Ok(secs)
}

/// The same bytes over plain loopback TCP in the same chunks, into the same buffers; seconds.
async fn tcp_once(source: Arc<Vec<Vec<u8>>>) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let block_bytes = source[0].len();
    let per_chunk = (data_plane::CHUNK_BYTES / block_bytes).max(1);
    let sender = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        for chunk in source.chunks(per_chunk) {
            let mut buf = Vec::with_capacity(chunk.len() * block_bytes);
            for b in chunk {
                buf.extend_from_slice(b);
            }
            s.write_all(&buf).await?;
        }
        s.flush().await?;
        anyhow::Ok(())
    });
    let n = {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut blocks = Vec::new();
        loop {
            let mut b = vec![0u8; block_bytes];
            match s.read_exact(&mut b).await {
                Ok(_) => blocks.push(b),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        (t.elapsed().as_secs_f64(), blocks.len())
    };
    sender.await??;
    Ok(n.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let l = layout();
    let block_bytes = l.block_bytes();
    let ep = EndpointId::new("bench", "prefill", "generate")?;
    let metrics = TransferMetrics::new(&ep)?;
    println!(
        "| prompt tokens | blocks | MiB | data plane GB/s | loopback TCP GB/s | data plane / TCP |"
    );
    println!("|---|---|---|---|---|---|");
    let mut next_id = 0;
    for tokens in [1024u32, 8192, 32768] {
        let n = tokens / l.block_size;
        let source: Vec<Vec<u8>> = (0..n)
            .map(|id| (0..block_bytes).map(|i| (i as u32 ^ id) as u8).collect())
            .collect();
        let blocks = source.iter().cloned().enumerate();
        let transfer = Arc::new(MemoryBlocks::new(
            l.clone(),
            blocks.map(|(i, b)| (i as u32, b)).collect(),
        ));
        let source = Arc::new(source);
        let holds = Holds::new(transfer.clone(), Duration::from_secs(60), metrics.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let endpoint = data_plane::start(
            "127.0.0.1",
            0,
            transfer,
            holds.clone(),
            metrics.clone(),
            stop.clone(),
        )
        .await?;
        let (mut dp, mut tcp) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            next_id += 1;
            dp.push(data_plane_once(&endpoint, &holds, n, next_id, &metrics).await?);
            tcp.push(tcp_once(source.clone()).await?);
        }
        stop.cancel();
        let bytes = n as f64 * block_bytes as f64;
        let (dp, tcp) = (bytes / median(dp) / 1e9, bytes / median(tcp) / 1e9);
        println!(
            "| {tokens} | {n} | {:.0} | {dp:.2} | {tcp:.2} | {:.0} % |",
            bytes / (1 << 20) as f64,
            100.0 * dp / tcp
        );
    }
    Ok(())
}
