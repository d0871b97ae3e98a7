//! The candle engine: tandem's real inference engine.
//!
//! [`CandleEngine::start`] loads a [`Model`] (GGUF quantized or dequantized, or HF
//! safetensors), allocates the paged [`KvCache`] and runs the [`scheduler`] on its own thread.
//! Requests arrive through [`Engine::generate`] as sequences (one per choice); the scheduler
//! batches their prefills and decodes step by step, samples, and streams tokens back through
//! each request's channel. Dropping that stream is the cancellation signal: the scheduler
//! notices the closed channel before its next step and frees the sequence's blocks.
//!
//! For disaggregated serving the engine's [`KvTransfer`] reads held blocks straight from the
//! cache tensors (the worker's data plane sends them) and the scheduler writes imported
//! blocks at admission; on CUDA both go through host memory today.

pub mod config;
pub mod model;
pub mod scheduler;

use candle_core::{DType, Device};
use std::sync::{Arc, Mutex};
use tandem_engine_api::{
    BatchingArgs, CacheIndex, Disagg, Engine, EngineError, EngineStats, EngineStream, Intake,
    KvTransfer,
};
use tandem_kv::{BlockEvent, EventTap};
use tandem_model::WeightsSource;
use tandem_protocols::card::ModelRuntimeConfig;
use tandem_protocols::disagg::KvLayout;
use tandem_protocols::llm::PreprocessedRequest;
use tokio::sync::mpsc;

pub use model::{KvCache, Model, StepSeq, WeightFormat};
pub use tandem_structured::Guides;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading model: {0}")]
    Load(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("device {0}")]
    Device(String),
}

/// `--dtype`: how weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// f16 weights with f32 activations on CPU (the same greedy answers as f32 from the
    /// bundled file at half the weight memory, and the fastest single-stream decode of the
    /// formats that answer well; see the README), bf16 on CUDA.
    Auto,
    F32,
    F16,
    Bf16,
    /// Keep GGUF blocks quantized (safetensors are quantized to Q8_0 on load).
    Quantized,
}

/// Flags of the candle engine (the batching flags it shares with the mocker are in
/// [`BatchingArgs`]).
#[derive(clap::Args, Debug, Clone)]
pub struct CandleArgs {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = device_name)]
    pub device: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// Fraction of free memory (RAM on CPU, device memory on CUDA, measured after the weights
    /// are loaded) given to the KV cache when `--kv-cache-blocks` is not set.
    #[arg(long = "kv-cache-memory-fraction", value_parser = memory_fraction)]
    pub kv_cache_memory_fraction: Option<f64>,
    /// How decode and prompt rows attend on the CPU with f32 activations: `paged` reads keys
    /// and values in place from the cache blocks (tandem's kernel; a prompt row over its
    /// context up to itself); `gather` copies each context into a tensor and uses candle's
    /// ops, as candle's reference model does; `auto`: paged, except with `--dtype quantized`,
    /// whose 8-bit activations turn another summation order into other tokens (gather keeps
    /// it equal to the reference bit for bit). GPUs use candle's ops.
    #[arg(long, value_enum, default_value = "auto")]
    pub attention_backend: AttentionBackend,
    /// The widest instruction set tandem's CPU kernels use: `auto`, the CPU's best; `avx2`
    /// keeps them off their AVX-512 forms, as on a CPU without AVX-512 (to compare the paths
    /// on one machine).
    #[arg(long, value_enum, default_value = "auto", env = "TANDEM_CPU_KERNELS")]
    pub cpu_kernels: CpuKernels,
}

/// `--cpu-kernels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CpuKernels {
    #[default]
    Auto,
    Avx2,
}

impl CpuKernels {
    /// `TANDEM_CPU_KERNELS` read as the worker's `--cpu-kernels` reads it (unset: `auto`), for
    /// programs that build [`CandleArgs`] themselves (benchmarks, tests).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("TANDEM_CPU_KERNELS") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => <Self as clap::ValueEnum>::from_str(&v, false)
                .map_err(|e| format!("TANDEM_CPU_KERNELS={v}: {e}")),
        }
    }
}

/// `--attention-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttentionBackend {
    #[default]
    Auto,
    Paged,
    Gather,
}

impl Default for CandleArgs {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: DtypeArg::Auto,
            kv_cache_memory_fraction: None,
            attention_backend: AttentionBackend::Auto,
            cpu_kernels: CpuKernels::Auto,
        }
    }
}

fn device_name(s: &str) -> Result<String, String> {
    let cuda_n = s
        .strip_prefix("cuda:")
        .is_some_and(|n| n.parse::<usize>().is_ok());
    if s == "cpu" || s == "cuda" || cuda_n {
        Ok(s.to_string())
    } else {
        Err("expected cpu, cuda or cuda:N".into())
    }
}

fn memory_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        Ok(f) => Err(format!("{f} is not in (0, 1]")),
        Err(e) => Err(e.to_string()),
    }
}

pub fn parse_device(s: &str) -> Result<Device, LoadError> {
    let err = |e: candle_core::Error| LoadError::Device(format!("{s}: {e}"));
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(err),
        _ => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::new_cuda(n).map_err(err),
            None => Err(LoadError::Device(format!(
                "{s}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// Default block size of the candle engine (vLLM's and Dynamo's).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

pub struct CandleEngine {
    tx: mpsc::UnboundedSender<Intake<tandem_sampling::Sampler>>,
    transfer: Arc<CandleTransfer>,
    stats: Arc<Mutex<EngineStats>>,
    events: EventTap,
    runtime: ModelRuntimeConfig,
    block_size: usize,
    vocab_size: usize,
    /// Compiles requests' grammars; `None` refuses structured output.
    guides: Option<Arc<Guides>>,
}

impl CandleEngine {
    /// Loads the weights and starts the scheduler thread. Blocking: call it from a blocking
    /// context. `max_model_len` caps prompt plus output.
    pub fn start(
        weights: &WeightsSource,
        args: &CandleArgs,
        batching: &BatchingArgs,
        max_model_len: usize,
    ) -> Result<Arc<Self>, LoadError> {
        Self::start_with(weights, args, batching, max_model_len, None)
    }

    /// [`Self::start`] with the model's [`Guides`], for structured output.
    pub fn start_with(
        weights: &WeightsSource,
        args: &CandleArgs,
        batching: &BatchingArgs,
        max_model_len: usize,
        guides: Option<Arc<Guides>>,
    ) -> Result<Arc<Self>, LoadError> {
        // The CLI checks these when parsing; arguments built in code are checked here.
        if batching.block_size == Some(0) || batching.max_num_seqs == 0 {
            return Err(LoadError::Load(
                "block size and max-num-seqs must be at least 1".into(),
            ));
        }
        let loading = std::time::Instant::now();
        let device = parse_device(&args.device)?;
        tandem_kernels::limit_to_avx2(args.cpu_kernels == CpuKernels::Avx2);
        let format = match (args.dtype, device.is_cpu()) {
            (DtypeArg::F32, _) => WeightFormat::Dense(DType::F32),
            (DtypeArg::Auto, false) | (DtypeArg::Bf16, _) => WeightFormat::Dense(DType::BF16),
            (DtypeArg::Auto | DtypeArg::F16, true) => WeightFormat::HalfWeights(DType::F16),
            (DtypeArg::F16, false) => WeightFormat::Dense(DType::F16),
            (DtypeArg::Quantized, _) => WeightFormat::Quantized,
        };
        let (mut model, file) = match weights {
            WeightsSource::Gguf(p) => (Model::from_gguf(p, format, &device)?, p),
            WeightsSource::HfDir(d) => (Model::from_hf_dir(d, format, &device)?, d),
        };
        model.paged_attention = match args.attention_backend {
            AttentionBackend::Paged => true,
            AttentionBackend::Gather => false,
            AttentionBackend::Auto => format != WeightFormat::Quantized,
        };
        let block_size = batching.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        let max_model_len = max_model_len.min(model.config.max_position).max(1);
        let dtype = format.activation_dtype();
        let per_block = KvCache::block_bytes(&model.config, block_size, dtype);
        let useful = batching.max_num_seqs * max_model_len.div_ceil(block_size);
        let num_blocks = match batching.num_blocks {
            Some(n) => n,
            None => {
                let fraction = args.kv_cache_memory_fraction.unwrap_or(if device.is_cpu() {
                    0.1
                } else {
                    0.8
                });
                let free = free_memory(&device)?;
                ((free as f64 * fraction) as usize / per_block.max(1)).min(useful)
            }
        };
        if num_blocks == 0 {
            return Err(LoadError::Load(
                "no memory left for a single KV block".into(),
            ));
        }
        let cache = KvCache::new(&model.config, num_blocks, block_size, dtype, &device)
            .map_err(|e| LoadError::Load(format!("allocating the KV cache: {e}")))?;
        // One token through every layer now, so that a dtype or device the backend cannot run
        // fails at start-up with its reason instead of failing every request. It writes only
        // slot 0 of block 0, which holds nothing yet.
        let probe = StepSeq {
            tokens: vec![0],
            start: 0,
            block_table: vec![0],
        };
        model.forward(&[probe], &cache).map_err(|e| {
            LoadError::Unsupported(format!("{format:?} weights on {}: {e}", args.device))
        })?;
        tracing::info!(
            file = %file.display(),
            architecture = %model.config.architecture,
            format = ?format,
            device = %args.device,
            num_blocks,
            block_size,
            kv_cache_bytes = num_blocks * per_block,
            kv_cache_mib = (num_blocks * per_block) >> 20,
            load_ms = loading.elapsed().as_millis() as u64,
            "candle engine ready"
        );
        let vocab_size = model.config.vocab_size;
        let runtime = ModelRuntimeConfig {
            total_kv_blocks: num_blocks as u64,
            max_num_seqs: batching.max_num_seqs as u64,
            max_num_batched_tokens: batching.max_num_batched_tokens as u64,
            data_parallel_size: 1,
            ..Default::default()
        };
        let stats = Arc::new(Mutex::new(EngineStats {
            total_blocks: num_blocks as u64,
            ..Default::default()
        }));
        let events = EventTap::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let layout = KvLayout {
            num_layers: model.config.num_layers as u32,
            num_kv_heads: model.config.num_kv_heads as u32,
            head_dim: model.config.head_dim as u32,
            block_size: block_size as u32,
            dtype: match dtype {
                DType::F16 => "f16",
                DType::BF16 => "bf16",
                _ => "f32",
            }
            .into(),
        };
        let sched = scheduler::Scheduler::new(
            model,
            cache.clone(),
            batching,
            max_model_len,
            stats.clone(),
            events.clone(),
        );
        let transfer = Arc::new(CandleTransfer {
            cache,
            tx: tx.clone(),
            index: sched.cache_index(),
            layout,
        });
        std::thread::Builder::new()
            .name("candle-engine".into())
            .spawn(move || sched.run(rx))
            .map_err(|e| LoadError::Load(format!("starting the engine thread: {e}")))?;
        Ok(Arc::new(Self {
            tx,
            transfer,
            stats,
            events,
            runtime,
            block_size,
            vocab_size,
            guides,
        }))
    }

    /// Block events (stored / removed / cleared) as the prefix cache changes, from now on.
    pub fn subscribe_events(&self) -> tokio::sync::mpsc::UnboundedReceiver<BlockEvent> {
        self.events.subscribe()
    }
}

impl Engine for CandleEngine {
    fn generate_leg(
        &self,
        request: PreprocessedRequest,
        disagg: Disagg,
    ) -> Result<EngineStream, EngineError> {
        tandem_engine_api::check_leg(&request.token_ids, &disagg, self.vocab_size)?;
        let (out, stream) = tandem_engine_api::output_channel(request.sampling.n);
        for seq in scheduler::sequences(&request, disagg, &out, self.guides.as_deref())? {
            self.tx
                .send(Intake::Seq(Box::new(seq)))
                .map_err(|_| EngineError::Stopped)?;
        }
        Ok(stream)
    }

    fn kv_transfer(&self) -> Arc<dyn KvTransfer> {
        self.transfer.clone()
    }

    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_config(&self) -> ModelRuntimeConfig {
        self.runtime.clone()
    }

    fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    fn subscribe_kv_events(&self) -> mpsc::UnboundedReceiver<BlockEvent> {
        self.events.subscribe()
    }
}

/// Block transfers of the candle engine: held blocks are read from the cache tensors on the
/// caller's thread (they are the transfer's until released, so nothing writes them).
struct CandleTransfer {
    cache: KvCache,
    tx: mpsc::UnboundedSender<Intake<tandem_sampling::Sampler>>,
    index: CacheIndex,
    layout: KvLayout,
}

impl KvTransfer for CandleTransfer {
    fn layout(&self) -> KvLayout {
        self.layout.clone()
    }

    fn read_block(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EngineError> {
        if id as usize >= self.cache.num_blocks {
            return Err(EngineError::Invalid(format!("no block {id}")));
        }
        self.cache
            .read_block(id, out)
            .map_err(|e| EngineError::StepFailed(format!("reading block {id}: {e}")))
    }

    fn cached_prefix(&self, hashes: &[u64]) -> usize {
        self.index.cached_prefix(hashes)
    }

    fn release(&self, transfer_id: u64) {
        // A stopped engine has freed everything already.
        let _ = self.tx.send(Intake::Release(transfer_id));
    }
}

/// Bytes free for the KV cache now.
fn free_memory(device: &Device) -> Result<usize, LoadError> {
    match device {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| LoadError::Device(format!("reading /proc/meminfo: {e}")))?;
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| LoadError::Device("no MemAvailable in /proc/meminfo".into()))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .map(|(free, _total)| free)
            .map_err(|e| LoadError::Device(format!("querying CUDA memory: {e:?}"))),
        _ => Err(LoadError::Device(
            "set --kv-cache-blocks: free memory of this device is unknown".into(),
        )),
    }
}
