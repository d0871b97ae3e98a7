//! A Llama-family decoder that keeps its keys and values in a paged cache it does not own.
//!
//! One [`Model::forward`] computes a whole scheduler step: the new tokens of every sequence
//! in the batch are packed into one `[tokens, hidden]` matrix, so every projection and MLP
//! runs once for all of them. Per layer, the new keys and values are scattered into their
//! slots of the [`KvCache`] (slot = block id × block size + offset), then each sequence
//! attends over the slots of its block table: on the CPU with f32 activations through
//! [`tandem_kernels::attention::paged_attention`], which reads them in place (decode rows, and
//! prompt rows each over its context up to itself); otherwise with the
//! contexts gathered (decode rows grouped by context length, prompt rows one sequence at a
//! time with a causal mask) and candle's ops. Only the last row of each sequence reaches the
//! output head.
//!
//! With gathered attention and candle's matmuls (`--dtype quantized`, or `--attention-backend
//! gather` on a CPU without AVX-512) the arithmetic follows candle-transformers' Llama models
//! op for op (same RoPE table, scaling, masking and softmax), which is what lets the tests
//! demand identical greedy tokens; tandem's kernels sum in other orders, and the tests hold
//! them to the reference's greedy tokens (f32) or a documented tolerance (f16).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::LoadError as EngineError;
use crate::config::ModelConfig;

/// Query rows attended at once in a prefill.
const PREFILL_QUERY_CHUNK: usize = 1024;

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// GGUF blocks kept quantized; candle's quantized matmul, f32 activations.
    Quantized,
    /// Dequantized (or loaded) to this dtype; activations and KV cache in it too.
    Dense(DType),
    /// Matmul weights and embeddings in this (half) dtype, activations and KV cache in f32:
    /// half the bytes to read per token, while candle's elementwise ops — scalar for f16 on
    /// the CPU — run in f32. What `--dtype f16` means on the CPU.
    HalfWeights(DType),
}

impl WeightFormat {
    pub fn activation_dtype(self) -> DType {
        match self {
            Self::Quantized | Self::HalfWeights(_) => DType::F32,
            Self::Dense(d) => d,
        }
    }

    /// The dtype matmul weights and embeddings are held in.
    fn weight_dtype(self) -> DType {
        match self {
            Self::Quantized => DType::F32,
            Self::Dense(d) | Self::HalfWeights(d) => d,
        }
    }
}

struct Linear {
    w: Weights,
    b: Option<Tensor>,
}

/// A projection's weights, as the kernel that reads them wants them.
enum Weights {
    /// candle's matmul (dense, or quantized formats without a kernel of ours).
    Candle(QMatMul),
    /// GGUF Q4_1 blocks on the CPU, repacked at load for [`tandem_kernels::Q4_1Weights`]
    /// (same arithmetic as candle's Q4_1 matmul, so the same tokens).
    Q4_1(tandem_kernels::Q4_1Weights),
    /// GGUF Q8_0 blocks on an AVX2 CPU, for [`tandem_kernels::Q8_0Weights`] (candle's AVX2
    /// arithmetic, bit for bit, without its second thread pool).
    Q8_0(tandem_kernels::Q8_0Weights),
}

impl From<QMatMul> for Weights {
    fn from(w: QMatMul) -> Self {
        Self::Candle(w)
    }
}

/// Runs `step` on this rayon worker while every other worker of the pool stays awake taking
/// its parallel work, instead of going to sleep between two kernels and being woken by a
/// futex for the next (a decode step is a few hundred parallel products of tens of µs each,
/// with serial work between them longer than rayon's spin before sleeping: 74 context
/// switches a token measured at batch 1, Q4_1 on 2 threads). The helpers spin only while the
/// step runs, one per worker (each in that worker's own broadcast queue), at most one fewer
/// than the cores; the step waits up to a millisecond for them to start, and a helper that
/// starts later returns at once (it may be nested in the step's own work). A panicking step
/// still stops them. Q4_1 `--cpu-kernels avx2`, alternating: b1 92–94 → 110–111 tok/s, b8
/// 179–183 → 216, b16 197–201 → 224–225.
fn with_helpers_awake<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    /// How long the step waits for the helpers to start (a sleeping worker's wake-up).
    const START_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
    /// Sets the flag when dropped: the helpers stop even if the step panics.
    struct SetOnDrop<'a>(&'a AtomicBool);
    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    // No more spinning threads than cores: with more threads than that (a pool sized by hand)
    // the spinners would take turns on the cores with the step itself (8 threads on 2 cores:
    // b1 62 tok/s with seven helpers, 112 with one).
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let helpers = rayon::current_num_threads().min(cores).saturating_sub(1);
    let Some(me) = rayon::current_thread_index().filter(|_| helpers > 0) else {
        return step();
    };
    let (started, stepping, done) = (
        AtomicUsize::new(0),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    rayon::scope(|s| {
        // One helper per worker, in that worker's own queue (a helper spawned into the
        // stepping thread's deque would be taken by the first worker awake, then the next
        // nested inside it, and so on: one worker awake, not all).
        s.spawn_broadcast(|_, ctx| {
            // Run after the step began, this job may be nested in the step's own work that
            // this worker is waiting on (a join), which could not finish under a spinning
            // helper. Before the step began, this worker was not inside its work.
            if ctx.index() == me || stepping.load(SeqCst) {
                return;
            }
            if started.fetch_add(1, SeqCst) >= helpers {
                return;
            }
            #[cfg(test)]
            tests::HELPERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ctx.index());
            let mut idle = 0u32;
            while !done.load(SeqCst) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle = 0;
                    continue;
                }
                // Not straight back to the step's deque: each look is a read of the
                // lines the stepping thread writes as it pushes work.
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
                idle += 1;
                // With more threads than cores, let whoever is runnable have the core
                // (8 threads on 2 cores: b1 58 tok/s without this).
                if idle.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        });
        let deadline = std::time::Instant::now() + START_WAIT;
        while started.load(SeqCst) < helpers && std::time::Instant::now() < deadline {
            // A helper may need this core to start (more threads than cores).
            std::thread::yield_now();
        }
        stepping.store(true, SeqCst);
        let _stop = SetOnDrop(&done);
        step()
    })
}

/// A tensor's elements as f32, row-major: what the kernels take.
fn f32_elements(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// `f` on the elements of a contiguous CPU tensor, read in place; `None` for other storage.
fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<Option<R>> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<T>()?[start..end])))
}

/// `x · wᵀ` through one of our quantized kernels; `x` is `[rows, k]` f32.
fn kernel_matmul(
    x: &Tensor,
    n: usize,
    matmul: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let (m, _) = x.dims2()?;
    Tensor::from_vec(matmul(&f32_elements(x)?, m), (m, n), x.device())
}

/// Row counts for which [`tandem_kernels::matmul_small_m`] beats candle's f32 matmul (inside
/// the engine's pool). With the register-tiled kernels (3 weight rows × 4 batch rows; AVX2 or
/// AVX-512) it is ahead through decode batches: at 16 rows 188–192 tok/s against candle's
/// GEMM 154–156; at a 480-token prefill the two are even, so prompts take the GEMM (or, on
/// AVX-512 CPUs, [`tandem_kernels::tall`]).
const SMALL_M_F32: std::ops::RangeInclusive<usize> = 1..=64;
/// The same with the portable kernel (CPUs without AVX2; one weight row at a time, measured
/// before the tiles: ahead at 8 rows, even at 12, behind at 16).
const SMALL_M_F32_PORTABLE: std::ops::RangeInclusive<usize> = 1..=11;
/// The same for f16 weights, where candle's path must first widen the whole matrix (at 16
/// rows: kernel 172–193 tok/s, widening + GEMM 91–94).
const SMALL_M_F16: std::ops::RangeInclusive<usize> = 1..=64;

/// `x · wᵀ` on the CPU with f32 or f16 weights and activations through one of our kernels (the
/// result in the activations' dtype), or `None` when candle's matmul applies: the small-batch
/// kernel for the rows of a decode batch in `SMALL_M_*` (any product of so few rows on CPUs
/// with `tall`); [`tandem_kernels::tall`] for every other product on AVX-512 CPUs, where
/// candle's GEMM runs 8-lane AVX2 (480-token prompt,
/// alternating on an AVX-512 Xeon: f32 439–449 → 521–527 tok/s, f16 412–424 → 519–548;
/// docs/benchmarks.md, change 13).
fn cpu_matmul(x: &Tensor, w: &Tensor, decode_batch: bool) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let dtype = w.dtype();
    let rows = if dtype == DType::F16 {
        SMALL_M_F16
    } else if tandem_kernels::tiled() {
        SMALL_M_F32
    } else {
        SMALL_M_F32_PORTABLE
    };
    // Off a decode batch the small kernel still beats `tall` for a few rows (a short prompt,
    // the output head after a prefill), where `tall` would pad them to a panel of 32; on
    // CPUs without `tall` those stay on candle's GEMM, as its reference model computes them.
    let tall = tandem_kernels::tall::available();
    let small = rows.contains(&m) && (decode_batch || tall);
    if !(small || tall)
        || !x.device().is_cpu()
        || !matches!(
            (x.dtype(), dtype),
            (DType::F32 | DType::F16, DType::F32 | DType::F16)
        )
    {
        return Ok(None);
    }
    let (n, wk) = w.dims2()?;
    if wk != k {
        return Ok(None);
    }
    let rows = f32_elements(x)?;
    let y = match (dtype, small) {
        (DType::F16, true) => with_cpu_slice(w, |w: &[half::f16]| {
            Some(tandem_kernels::matmul_small_m_f16(&rows, w, m, k, n))
        })?,
        (_, true) => with_cpu_slice(w, |w: &[f32]| {
            Some(tandem_kernels::matmul_small_m(&rows, w, m, k, n))
        })?,
        (DType::F16, false) => with_cpu_slice(w, |w: &[half::f16]| {
            tandem_kernels::tall::matmul(&rows, tandem_kernels::WeightRows::F16(w), m, k, n)
        })?,
        (_, false) => with_cpu_slice(w, |w: &[f32]| {
            tandem_kernels::tall::matmul(&rows, tandem_kernels::WeightRows::F32(w), m, k, n)
        })?,
    };
    y.flatten()
        .map(|y| Tensor::from_vec(y, (m, n), x.device())?.to_dtype(x.dtype()))
        .transpose()
}

/// An f16 CPU tensor as f32, converted eight values at a time (candle's own cast converts
/// one value per call, ~15 % of an f16 prefill).
fn widen_f16(w: &Tensor) -> candle_core::Result<Tensor> {
    let widened = with_cpu_slice(w, |src: &[half::f16]| {
        let mut out = vec![0f32; src.len()];
        tandem_kernels::f16_to_f32(src, &mut out);
        out
    })?;
    match widened {
        Some(out) => Tensor::from_vec(out, w.shape(), w.device()),
        None => w.to_dtype(DType::F32),
    }
}

impl Linear {
    /// `decode_batch`: the rows are one new token each of different sequences. Only then
    /// does the small-batch kernel run; prefills take candle's matmul, or
    /// [`tandem_kernels::tall`] on AVX-512 CPUs (the reference tests hold either way).
    fn forward_step(&self, x: &Tensor, decode_batch: bool) -> candle_core::Result<Tensor> {
        let y = match &self.w {
            Weights::Q4_1(w) => kernel_matmul(x, w.rows(), |x, m| w.matmul(x, m))?,
            Weights::Q8_0(w) => kernel_matmul(x, w.rows(), |x, m| w.matmul(x, m))?,
            Weights::Candle(QMatMul::Tensor(w)) => {
                let small = cpu_matmul(x, w, decode_batch)?;
                match small {
                    Some(y) => y,
                    // candle's f16 matmul on the CPU runs at a third of its f32 speed (and
                    // takes no f32 rows, which `HalfWeights` activations are); many rows pay
                    // for widening the weights once per call.
                    None if w.dtype() == DType::F16 && w.device().is_cpu() => x
                        .to_dtype(DType::F32)?
                        .matmul(&widen_f16(w)?.t()?)?
                        .to_dtype(x.dtype())?,
                    None => QMatMul::Tensor(w.clone()).forward(x)?,
                }
            }
            Weights::Candle(w) => w.forward(x)?,
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Projections that read the same input — q, k and v; gate and up — run as one product where
/// the weights allow it (Q4_1 blocks of equal width, or dense CPU matrices of one dtype,
/// stacked at load): the activations are quantized or packed once and the cores meet once
/// instead of once per projection, and each output's arithmetic is unchanged. Otherwise one
/// product each, as before.
enum Projections {
    Stacked { all: Linear, widths: Vec<usize> },
    Apart(Vec<Linear>),
}

impl Projections {
    /// `dense`: whether dense CPU parts are stacked too (Q4_1 parts always are).
    fn new(parts: Vec<Linear>, dense: bool) -> candle_core::Result<Self> {
        let b = match parts
            .iter()
            .map(|p| p.b.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None if parts.iter().all(|p| p.b.is_none()) => None,
            None => return Ok(Self::Apart(parts)),
        };
        let stacked = match Self::stack_q4_1(&parts) {
            Some(stacked) => Some(stacked),
            None if dense => Self::stack_dense(&parts)?,
            None => None,
        };
        Ok(match stacked {
            Some((w, widths)) => Self::Stacked {
                all: Linear { w, b },
                widths,
            },
            None => Self::Apart(parts),
        })
    }

    /// Q4_1 parts as one set of blocks, and each part's rows.
    fn stack_q4_1(parts: &[Linear]) -> Option<(Weights, Vec<usize>)> {
        let q4: Vec<&tandem_kernels::Q4_1Weights> = parts
            .iter()
            .map(|p| match &p.w {
                Weights::Q4_1(w) => Some(w),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let widths = q4.iter().map(|w| w.rows()).collect();
        tandem_kernels::Q4_1Weights::stack(&q4).map(|w| (Weights::Q4_1(w), widths))
    }

    /// Dense CPU parts of one dtype and width as one matrix (rows stacked, the parts
    /// dropped), and each part's rows: one call into the kernels instead of one per part.
    /// For q, k and v: two thread-pool rounds fewer per layer at a single stream (f32 and f16
    /// single-stream decode +2–5 % in engine_bench, alternating, both ISAs). Every output's
    /// sum is the same (the kernels sum each output alone).
    fn stack_dense(parts: &[Linear]) -> candle_core::Result<Option<(Weights, Vec<usize>)>> {
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match &p.w {
                Weights::Candle(QMatMul::Tensor(w)) if w.device().is_cpu() => Some(w),
                _ => None,
            })
            .collect();
        let Some(dense) = dense else {
            return Ok(None);
        };
        let Some(first) = dense.first() else {
            return Ok(None);
        };
        let (dtype, k) = (first.dtype(), first.dims2()?.1);
        let mut widths = Vec::with_capacity(dense.len());
        for w in &dense {
            let (n, wk) = w.dims2()?;
            if w.dtype() != dtype || wk != k {
                return Ok(None);
            }
            widths.push(n);
        }
        let all = Tensor::cat(&dense, 0)?;
        Ok(Some((Weights::Candle(QMatMul::Tensor(all)), widths)))
    }

    /// Each projection of `x`, in the order given to [`Self::new`].
    fn forward_step(&self, x: &Tensor, decode_batch: bool) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Apart(parts) => parts
                .iter()
                .map(|p| p.forward_step(x, decode_batch))
                .collect(),
            Self::Stacked { all, widths } => {
                let y = all.forward_step(x, decode_batch)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        at += w;
                        y.narrow(1, at - w, w)
                    })
                    .collect()
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Projections,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// gate and up.
    gate_up: Projections,
    down: Linear,
}

/// Per-layer key and value tensors of `[slots, kv_heads × head_dim]`. Clones share the
/// tensors (the KV transfer reads held blocks while the scheduler runs).
#[derive(Clone)]
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCache {
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let shape = (
            num_blocks * block_size,
            config.num_kv_heads * config.head_dim,
        );
        let mut k = Vec::with_capacity(config.num_layers);
        let mut v = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self {
            k,
            v,
            block_size,
            num_blocks,
        })
    }

    /// Appends block `id` in the transfer wire format: for every layer its keys, then its
    /// values, `block_size` rows each, in the cache's dtype.
    pub fn read_block(&self, id: u32, out: &mut Vec<u8>) -> candle_core::Result<()> {
        let start = id as usize * self.block_size;
        for (k, v) in self.k.iter().zip(&self.v) {
            for t in [k, v] {
                append_raw(&t.narrow(0, start, self.block_size)?.flatten_all()?, out)?;
            }
        }
        Ok(())
    }

    /// Writes block `id` from the transfer wire format ([`Self::read_block`]'s).
    pub fn write_block(&self, id: u32, data: &[u8]) -> candle_core::Result<()> {
        let Some(first) = self.k.first() else {
            return Ok(());
        };
        let (dtype, device) = (first.dtype(), first.device());
        let kv_dim = first.dim(1)?;
        let part = self.block_size * kv_dim * dtype.size_in_bytes();
        if data.len() != 2 * self.k.len() * part {
            candle_core::bail!(
                "block of {} bytes, expected {}",
                data.len(),
                2 * self.k.len() * part
            );
        }
        let start = id as usize * self.block_size;
        let mut parts = data.chunks_exact(part);
        for (k, v) in self.k.iter().zip(&self.v) {
            for t in [k, v] {
                let bytes = parts.next().unwrap_or_default();
                let src =
                    Tensor::from_raw_buffer(bytes, dtype, &[self.block_size, kv_dim], device)?;
                t.slice_set(&src, 0, start)?;
            }
        }
        Ok(())
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn block_bytes(config: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * config.num_layers
            * block_size
            * config.num_kv_heads
            * config.head_dim
            * dtype.size_in_bytes()
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct StepSeq {
    /// Tokens to compute now (one for a decode, the uncached prompt for a prefill).
    pub tokens: Vec<u32>,
    /// Position of the first of them: everything before is already in the cache.
    pub start: usize,
    /// Blocks covering positions `0..start + tokens.len()`.
    pub block_table: Vec<u32>,
}

pub struct Model {
    pub config: ModelConfig,
    pub format: WeightFormat,
    pub device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    /// CPU only: the threads the step's kernels run on. The whole step runs inside it, so a
    /// kernel's parallel loop starts on a worker that joins in, instead of handing every
    /// matmul from the scheduler's thread to the pool and sleeping until it is done.
    pool: Option<rayon::ThreadPool>,
    /// Every row attends through [`tandem_kernels::attention`] where it applies (CPU, f32
    /// cache; a prompt row over its context up to itself); otherwise, or when false, through
    /// gathered contexts and candle's ops.
    pub paged_attention: bool,
}

/// Where tensors come from while loading.
enum Source {
    Gguf {
        content: gguf_file::Content,
        file: std::fs::File,
    },
    Safetensors(HashMap<String, Tensor>),
}

struct Loader {
    source: Source,
    format: WeightFormat,
    device: Device,
}

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(e.to_string())
}

impl Loader {
    fn qtensor(&mut self, gguf: &str) -> Result<Option<QTensor>, EngineError> {
        match &mut self.source {
            Source::Gguf { content, file } => {
                if !content.tensor_infos.contains_key(gguf) {
                    return Ok(None);
                }
                content
                    .tensor(file, gguf, &self.device)
                    .map(Some)
                    .map_err(load_err)
            }
            Source::Safetensors(_) => Ok(None),
        }
    }

    /// A tensor by its GGUF or HF name, dequantized to `dtype`.
    fn dense(&mut self, gguf: &str, hf: &str, dtype: DType) -> Result<Option<Tensor>, EngineError> {
        let t = match &mut self.source {
            Source::Gguf { .. } => match self.qtensor(gguf)? {
                Some(q) => Some(q.dequantize(&self.device).map_err(load_err)?),
                None => None,
            },
            Source::Safetensors(map) => map.remove(hf),
        };
        t.map(|t| t.to_dtype(dtype).map_err(load_err)).transpose()
    }

    fn require(&mut self, gguf: &str, hf: &str, dtype: DType) -> Result<Tensor, EngineError> {
        self.dense(gguf, hf, dtype)?
            .ok_or_else(|| EngineError::Load(format!("weight {gguf} / {hf} missing")))
    }

    fn matmul(&mut self, gguf: &str, hf: &str) -> Result<Option<Weights>, EngineError> {
        match (self.format, &self.source) {
            (WeightFormat::Quantized, Source::Gguf { .. }) => {
                let Some(q) = self.qtensor(gguf)? else {
                    return Ok(None);
                };
                // Unquantized GGUF tensors go through a plain matmul, as candle does.
                Ok(Some(match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        QMatMul::Tensor(q.dequantize(&self.device).map_err(load_err)?).into()
                    }
                    GgmlDType::Q4_1 if self.device.is_cpu() => {
                        let (n, k) = q.shape().dims2().map_err(load_err)?;
                        let bytes = q.data().map_err(load_err)?;
                        Weights::Q4_1(
                            tandem_kernels::Q4_1Weights::from_ggml(&bytes, n, k)
                                .map_err(|e| load_err(format!("{gguf}: {e}")))?,
                        )
                    }
                    GgmlDType::Q8_0 if self.device.is_cpu() => {
                        let (n, k) = q.shape().dims2().map_err(load_err)?;
                        let bytes = q.data().map_err(load_err)?;
                        match tandem_kernels::Q8_0Weights::from_ggml(&bytes, n, k) {
                            Ok(w) => Weights::Q8_0(w),
                            // No AVX2: candle's own path.
                            Err(tandem_kernels::BlockError::NoAvx2) => {
                                drop(bytes);
                                QMatMul::QTensor(Arc::new(q)).into()
                            }
                            Err(e) => return Err(load_err(format!("{gguf}: {e}"))),
                        }
                    }
                    _ => QMatMul::QTensor(Arc::new(q)).into(),
                }))
            }
            (WeightFormat::Quantized, Source::Safetensors(_)) => {
                let Some(w) = self.dense(gguf, hf, DType::F32)? else {
                    return Ok(None);
                };
                // Safetensors hold no quantized blocks: quantize to Q8_0 where rows allow.
                let cols = w.dims().last().copied().unwrap_or(0);
                if cols % GgmlDType::Q8_0.block_size() == 0 {
                    let q = QTensor::quantize(&w, GgmlDType::Q8_0).map_err(load_err)?;
                    Ok(Some(QMatMul::QTensor(Arc::new(q)).into()))
                } else {
                    Ok(Some(QMatMul::Tensor(w).into()))
                }
            }
            (WeightFormat::Dense(dtype) | WeightFormat::HalfWeights(dtype), _) => Ok(self
                .dense(gguf, hf, dtype)?
                .map(|t| QMatMul::Tensor(t).into())),
        }
    }

    fn linear(&mut self, gguf: &str, hf: &str, bias: bool) -> Result<Linear, EngineError> {
        let w = self
            .matmul(&format!("{gguf}.weight"), &format!("{hf}.weight"))?
            .ok_or_else(|| {
                EngineError::Load(format!("weight {gguf}.weight / {hf}.weight missing"))
            })?;
        let b = if bias {
            Some(self.require(
                &format!("{gguf}.bias"),
                &format!("{hf}.bias"),
                self.format.activation_dtype(),
            )?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl Model {
    /// Loads a GGUF file.
    pub fn from_gguf(
        path: &Path,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut file =
            std::fs::File::open(path).map_err(|e| load_err(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file).map_err(load_err)?;
        let config = ModelConfig::from_gguf(&content)?;
        let loader = Loader {
            source: Source::Gguf { content, file },
            format,
            device: device.clone(),
        };
        Self::load(config, loader)
    }

    /// Loads an HF directory: `config.json` and one or more `*.safetensors` files.
    pub fn from_hf_dir(
        dir: &Path,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let config = ModelConfig::from_hf_dir(dir)?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| load_err(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(load_err(format!(
                "no .safetensors files in {}",
                dir.display()
            )));
        }
        let mut map = HashMap::new();
        for f in files {
            map.extend(candle_core::safetensors::load(&f, device).map_err(load_err)?);
        }
        let loader = Loader {
            source: Source::Safetensors(map),
            format,
            device: device.clone(),
        };
        Self::load(config, loader)
    }

    fn load(config: ModelConfig, mut ld: Loader) -> Result<Self, EngineError> {
        let act = ld.format.activation_dtype();
        let device = ld.device.clone();
        let embed = ld.require(
            "token_embd.weight",
            "model.embed_tokens.weight",
            ld.format.weight_dtype(),
        )?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let g = format!("blk.{i}");
            let h = format!("model.layers.{i}");
            let bias = config.qkv_bias;
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(ld.require(
                        &format!("{g}.attn_q_norm.weight"),
                        &format!("{h}.self_attn.q_norm.weight"),
                        act,
                    )?),
                    Some(ld.require(
                        &format!("{g}.attn_k_norm.weight"),
                        &format!("{h}.self_attn.k_norm.weight"),
                        act,
                    )?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: ld.require(
                    &format!("{g}.attn_norm.weight"),
                    &format!("{h}.input_layernorm.weight"),
                    act,
                )?,
                qkv: Projections::new(
                    vec![
                        ld.linear(
                            &format!("{g}.attn_q"),
                            &format!("{h}.self_attn.q_proj"),
                            bias,
                        )?,
                        ld.linear(
                            &format!("{g}.attn_k"),
                            &format!("{h}.self_attn.k_proj"),
                            bias,
                        )?,
                        ld.linear(
                            &format!("{g}.attn_v"),
                            &format!("{h}.self_attn.v_proj"),
                            bias,
                        )?,
                    ],
                    true,
                )
                .map_err(load_err)?,
                o: ld.linear(
                    &format!("{g}.attn_output"),
                    &format!("{h}.self_attn.o_proj"),
                    config.o_bias,
                )?,
                q_norm,
                k_norm,
                ffn_norm: ld.require(
                    &format!("{g}.ffn_norm.weight"),
                    &format!("{h}.post_attention_layernorm.weight"),
                    act,
                )?,
                gate_up: Projections::new(
                    vec![
                        ld.linear(
                            &format!("{g}.ffn_gate"),
                            &format!("{h}.mlp.gate_proj"),
                            false,
                        )?,
                        ld.linear(&format!("{g}.ffn_up"), &format!("{h}.mlp.up_proj"), false)?,
                    ],
                    // Dense gate and up stay apart: stacked (3072 × 576 in SmolLM2) they
                    // gained nothing on AVX-512 (each is already large) and cost the AVX2
                    // f16 kernel at 8 streams ~8 % (engine_bench, alternating).
                    false,
                )
                .map_err(load_err)?,
                down: ld.linear(
                    &format!("{g}.ffn_down"),
                    &format!("{h}.mlp.down_proj"),
                    false,
                )?,
            });
        }
        let norm = ld.require("output_norm.weight", "model.norm.weight", act)?;
        let lm_head = match ld.matmul("output.weight", "lm_head.weight")? {
            Some(w) => Linear { w, b: None },
            // Tied: dense formats share the embedding's storage; quantized ones keep the
            // GGUF blocks of the embedding for the output matmul, as llama.cpp does.
            None => Linear {
                w: match ld.format {
                    WeightFormat::Dense(_) | WeightFormat::HalfWeights(_) => {
                        QMatMul::Tensor(embed.clone()).into()
                    }
                    WeightFormat::Quantized => ld
                        .matmul("token_embd.weight", "model.embed_tokens.weight")?
                        .unwrap_or_else(|| QMatMul::Tensor(embed.clone()).into()),
                },
                b: None,
            },
        };
        let (cos, sin) = rope_table(&config, &mut ld)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &device)
            .and_then(|t| t.to_dtype(act))
            .map_err(load_err)?;
        Ok(Self {
            format: ld.format,
            config,
            device,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            neg_inf,
            paged_attention: true,
            pool: if ld.device.is_cpu() {
                Some(
                    rayon::ThreadPoolBuilder::new()
                        .thread_name(|i| format!("engine-cpu-{i}"))
                        .build()
                        .map_err(load_err)?,
                )
            } else {
                None
            },
        })
    }

    /// Runs one step; returns the logits (f32) of the last new token of every sequence.
    pub fn forward(&self, seqs: &[StepSeq], cache: &KvCache) -> candle_core::Result<Vec<Vec<f32>>> {
        // Only decode steps: their products are short and many. With prompt rows the products
        // are long, and a helper looking for work all the time cost f32 prefills ~12 %
        // (480 tokens: 706–762 → 636–675 tok/s).
        let decode_only = seqs.iter().all(|s| s.tokens.len() == 1);
        match &self.pool {
            Some(pool) if decode_only => {
                pool.install(|| with_helpers_awake(|| self.step(seqs, cache)))
            }
            Some(pool) => pool.install(|| self.step(seqs, cache)),
            None => self.step(seqs, cache),
        }
    }

    fn step(&self, seqs: &[StepSeq], cache: &KvCache) -> candle_core::Result<Vec<Vec<f32>>> {
        let dev = &self.device;
        let c = &self.config;
        let bs = cache.block_size;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let kv_dim = nkv * hd;
        let slot = |s: &StepSeq, p: usize| s.block_table[p / bs] * bs as u32 + (p % bs) as u32;

        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut last_rows = Vec::with_capacity(seqs.len());
        for s in seqs {
            for (i, &t) in s.tokens.iter().enumerate() {
                ids.push(t);
                positions.push((s.start + i) as u32);
                slots.push(slot(s, s.start + i));
            }
            last_rows.push(ids.len() as u32 - 1);
        }
        let n_tokens = ids.len();
        // Decode rows come first (the scheduler orders them so): they are attended together.
        let n_decode = seqs.iter().take_while(|s| s.tokens.len() == 1).count();
        let decode_only = n_decode == seqs.len();

        let ids = Tensor::from_vec(ids, n_tokens, dev)?;
        let positions = Tensor::from_vec(positions, n_tokens, dev)?;
        let write_idx = Tensor::from_vec(slots, (n_tokens, 1), dev)?
            .broadcast_as((n_tokens, kv_dim))?
            .contiguous()?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;

        let paged = self.paged_attention
            && dev.is_cpu()
            && cache.k.first().is_some_and(|k| k.dtype() == DType::F32);
        // With the paged kernel (decode and prompt rows alike; docs/benchmarks.md, change 15),
        // each sequence's slots in position order; a row attends over a prefix of its
        // sequence's (a decode row the whole context, a prompt row the context up to its own
        // position: the causal mask).
        let seq_slots: Vec<Vec<u32>> = if paged {
            seqs.iter()
                .map(|s| (0..s.start + s.tokens.len()).map(|p| slot(s, p)).collect())
                .collect()
        } else {
            Vec::new()
        };
        let paged_slots: Vec<&[u32]> = seqs
            .iter()
            .zip(&seq_slots)
            .flat_map(|(s, all)| (0..s.tokens.len()).map(move |i| &all[..=s.start + i]))
            .collect();
        // Decode rows grouped by context length: a group attends as one batched matmul with
        // no padding, which keeps every row's arithmetic identical to a solo run (padding
        // would move elements between SIMD lanes and the scalar tail of the reductions).
        let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in seqs[..if paged { 0 } else { n_decode }].iter().enumerate() {
            let len = s.start + 1;
            match groups.iter_mut().find(|(l, _)| *l == len) {
                Some((_, rows)) => rows.push(i as u32),
                None => groups.push((len, vec![i as u32])),
            }
        }
        let mut decode_ctx = Vec::with_capacity(groups.len());
        let mut order = Vec::with_capacity(n_decode);
        for (len, rows) in &groups {
            let gather = head_rows(
                rows.iter()
                    .map(|&r| (0..*len).map(|p| slot(&seqs[r as usize], p)).collect()),
                nh,
                nkv,
            );
            order.extend(rows.iter().copied());
            decode_ctx.push((
                Tensor::from_vec(rows.clone(), rows.len(), dev)?,
                rows.len(),
                Tensor::from_vec(gather, rows.len() * nh * len, dev)?,
                *len,
            ));
        }
        // Where each decode row ended up after grouping, to put the rows back in order.
        let unpermute = if groups.len() > 1 {
            let mut inv = vec![0u32; n_decode];
            for (at, &row) in order.iter().enumerate() {
                inv[row as usize] = at as u32;
            }
            Some(Tensor::from_vec(inv, n_decode, dev)?)
        } else {
            None
        };
        // Contexts and causal masks of the prefill rows (for candle's ops).
        let mut prefill_ctx = Vec::new();
        for s in &seqs[if paged { seqs.len() } else { n_decode }..] {
            let t = s.tokens.len();
            let ctx = s.start + t;
            let gather = head_rows(
                std::iter::once((0..ctx).map(|p| slot(s, p)).collect()),
                nh,
                nkv,
            );
            let mask: Vec<u8> = (0..t)
                .flat_map(|i| (0..ctx).map(move |j| u8::from(j > s.start + i)))
                .collect();
            prefill_ctx.push((
                Tensor::from_vec(gather, nh * ctx, dev)?,
                ctx,
                (t > 1)
                    .then(|| Tensor::from_vec(mask, (t, ctx), dev))
                    .transpose()?,
            ));
        }

        let scale = (hd as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .to_dtype(self.format.activation_dtype())?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?;
            let [q, k, v]: [Tensor; 3] = layer
                .qkv
                .forward_step(&h, decode_only)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("q, k and v: three projections".into()))?;
            let q = q.reshape((n_tokens, nh, hd))?;
            let k = k.reshape((n_tokens, nkv, hd))?;
            let v = v.contiguous()?;
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (
                    rms_norm(&q.contiguous()?, qn, c.rms_norm_eps)?,
                    rms_norm(&k.contiguous()?, kn, c.rms_norm_eps)?,
                ),
                _ => (q, k),
            };
            // [1, heads, tokens, head_dim] for the RoPE kernels.
            let q = self.rope(&q.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, &cos, &sin)?;
            let k = self.rope(&k.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, &cos, &sin)?;
            let k_rows = k.squeeze(0)?.transpose(0, 1)?.reshape((n_tokens, kv_dim))?;
            cache.k[l].scatter_set(&write_idx, &k_rows, 0)?;
            cache.v[l].scatter_set(&write_idx, &v, 0)?;

            let q = q.squeeze(0)?; // [nh, tokens, hd]
            let mut outs = Vec::with_capacity(1 + prefill_ctx.len());
            if !paged_slots.is_empty() {
                outs.push(self.paged(&q, &paged_slots, cache, l)?);
            }
            let mut decoded = Vec::with_capacity(decode_ctx.len());
            for (rows, g, gather, len) in &decode_ctx {
                let qd = q
                    .index_select(rows, 1)?
                    .transpose(0, 1)?
                    .unsqueeze(2)?
                    .contiguous()?;
                let kd = self.gather(&cache.k[l], gather, *g, *len)?;
                let vd = self.gather(&cache.v[l], gather, *g, *len)?;
                let att = (qd.matmul(&kd.t()?)? / scale)?;
                let att = softmax_last_dim(&att)?;
                let y = att.matmul(&vd)?; // [g, nh, 1, hd]
                decoded.push(y.reshape((*g, nh * hd))?);
            }
            if !decoded.is_empty() {
                let y = if decoded.len() == 1 {
                    decoded.remove(0)
                } else {
                    Tensor::cat(&decoded, 0)?
                };
                outs.push(match &unpermute {
                    Some(inv) => y.index_select(inv, 0)?,
                    None => y,
                });
            }
            let mut row = n_decode;
            for (s, (gather, ctx, mask)) in seqs[n_decode..].iter().zip(&prefill_ctx) {
                let t = s.tokens.len();
                let ks = self.gather(&cache.k[l], gather, 1, *ctx)?;
                let vs = self.gather(&cache.v[l], gather, 1, *ctx)?;
                // Long prompts attend in slices of query rows, which bounds the score matrix
                // (heads × rows × context) instead of letting it grow with the square of the
                // prompt.
                let mut at = 0;
                while at < t {
                    let rows = (t - at).min(PREFILL_QUERY_CHUNK);
                    let qs = q.narrow(1, row + at, rows)?.unsqueeze(0)?.contiguous()?;
                    let att = (qs.matmul(&ks.t()?)? / scale)?;
                    let att = match mask {
                        Some(m) => {
                            let m = m.narrow(0, at, rows)?;
                            m.broadcast_as(att.shape())?
                                .where_cond(&self.neg_inf.broadcast_as(att.shape())?, &att)?
                        }
                        None => att,
                    };
                    let att = softmax_last_dim(&att)?;
                    let y = att.matmul(&vs)?; // [1, nh, rows, hd]
                    outs.push(y.squeeze(0)?.transpose(0, 1)?.reshape((rows, nh * hd))?);
                    at += rows;
                }
                row += t;
            }
            let y = if outs.len() == 1 {
                outs.remove(0)
            } else {
                Tensor::cat(&outs, 0)?
            };
            let x1 = (layer.o.forward_step(&y, decode_only)? + residual)?;
            let h = rms_norm(&x1, &layer.ffn_norm, c.rms_norm_eps)?;
            let [gate, up]: [Tensor; 2] =
                layer
                    .gate_up
                    .forward_step(&h, decode_only)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("gate and up: two projections".into()))?;
            let mlp = layer
                .down
                .forward_step(&(silu(&gate)? * up)?, decode_only)?;
            x = (mlp + &x1)?;
        }
        let last = Tensor::from_vec(last_rows, seqs.len(), dev)?;
        let x = x.index_select(&last, 0)?;
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        let logits = self
            .lm_head
            .forward_step(&x, decode_only)?
            .to_dtype(DType::F32)?;
        logits.to_vec2::<f32>()
    }

    /// The attention output `[rows, heads × head_dim]` of every row of the step (`slots[r]`:
    /// row `r`'s context), read in place from layer `l`'s cache (already holding this step's
    /// keys and values).
    fn paged(
        &self,
        q: &Tensor,
        slots: &[&[u32]],
        cache: &KvCache,
        l: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let rows = slots.len();
        let q = f32_elements(&q.narrow(1, 0, rows)?.transpose(0, 1)?)?;
        let heads = tandem_kernels::attention::Heads {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let y = with_cpu_slice(&cache.k[l], |k: &[f32]| {
            with_cpu_slice(&cache.v[l], |v: &[f32]| {
                let kv = tandem_kernels::attention::PagedKv { k, v };
                tandem_kernels::attention::paged_attention(&q, slots, kv, heads)
            })
        })?
        .transpose()?
        .flatten();
        let Some(y) = y else {
            candle_core::bail!("paged attention needs a contiguous CPU cache");
        };
        Tensor::from_vec(y, (rows, c.num_heads * c.head_dim), &self.device)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }

    /// `[batch, heads, len, head_dim]` keys or values gathered from the cache in one pass,
    /// the KV heads repeated for grouped-query attention: `rows` (from [`head_rows`]) are
    /// rows of the cache seen as `[slots × kv_heads, head_dim]`. (A gather, a transpose and
    /// one copy per repeat moved each value three times: ~15 % of a quantized decode step at
    /// 8 streams.)
    fn gather(
        &self,
        cache: &Tensor,
        rows: &Tensor,
        batch: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (slots, _) = cache.dims2()?;
        cache
            .reshape((slots * c.num_kv_heads, c.head_dim))?
            .index_select(rows, 0)?
            .reshape((batch, c.num_heads, len, c.head_dim))
    }
}

/// For each context (its cache slots in position order), for each query head, for each
/// position: the row of the cache seen as `[slots × kv_heads, head_dim]` that holds the key
/// (or value) of that head's KV head there.
fn head_rows(contexts: impl Iterator<Item = Vec<u32>>, heads: usize, kv_heads: usize) -> Vec<u32> {
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "{heads} query heads do not group over {kv_heads} KV heads"
    );
    let n_rep = heads / kv_heads;
    let mut out = Vec::new();
    for ctx in contexts {
        for h in 0..heads {
            let kv = (h / n_rep) as u32;
            out.extend(ctx.iter().map(|&s| s * kv_heads as u32 + kv));
        }
    }
    out
}

/// cos / sin of position × frequency for every position the model supports, computed the
/// way candle's Llama models do (so the tables are bit-identical).
fn rope_table(config: &ModelConfig, ld: &mut Loader) -> Result<(Tensor, Tensor), EngineError> {
    let mut freqs = config.inv_freqs();
    // llama.cpp stores Llama 3.1's scaling as per-frequency divisors.
    if let Some(f) = ld.dense("rope_freqs.weight", "", DType::F32)? {
        let f = f.to_vec1::<f32>().map_err(load_err)?;
        for (x, d) in freqs.iter_mut().zip(f) {
            *x /= d;
        }
    }
    let act = ld.format.activation_dtype();
    let dev = &ld.device;
    let n = config.max_position;
    let build = || -> candle_core::Result<(Tensor, Tensor)> {
        let theta = Tensor::new(freqs.as_slice(), dev)?;
        let idx = Tensor::arange(0, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?
            .matmul(&theta.reshape((1, theta.elem_count()))?)?;
        Ok((idx.cos()?.to_dtype(act)?, idx.sin()?.to_dtype(act)?))
    };
    build().map_err(load_err)
}

// The transfer wire format is little-endian; tensors are copied in native order.
const _: () = assert!(cfg!(target_endian = "little"));

/// Appends a 1-D tensor's elements as raw bytes.
fn append_raw(t: &Tensor, out: &mut Vec<u8>) -> candle_core::Result<()> {
    match t.dtype() {
        DType::F32 => out.extend_from_slice(bytemuck::cast_slice(&t.to_vec1::<f32>()?)),
        DType::F16 => out.extend_from_slice(bytemuck::cast_slice(&t.to_vec1::<half::f16>()?)),
        DType::BF16 => out.extend_from_slice(bytemuck::cast_slice(&t.to_vec1::<half::bf16>()?)),
        other => candle_core::bail!("no transfer format for {other:?} KV"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The workers whose helper spun in the last [`with_helpers_awake`] (one test uses it).
    pub(super) static HELPERS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

    /// Parallel work nested two deep inside the step completes with the helpers spinning, at
    /// every pool size (a helper job picked up by a worker waiting inside the step's own work
    /// must not spin), and a step that panics stops its helpers and passes the panic on.
    #[test]
    fn a_step_with_helpers_awake_finishes_sums_right_and_panics_through() {
        use rayon::prelude::*;
        let work = |round: u64| {
            (0..8u64)
                .into_par_iter()
                .map(|i| {
                    (0..64u64)
                        .into_par_iter()
                        .map(|j| (0..50u64).map(|x| x * i + j + round).sum::<u64>())
                        .sum::<u64>()
                })
                .sum::<u64>()
        };
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for round in 0..50u64 {
                HELPERS.lock().unwrap().clear();
                let (me, got) = pool.install(|| {
                    (
                        rayon::current_thread_index().unwrap(),
                        with_helpers_awake(|| work(round)),
                    )
                });
                let mut helpers = HELPERS.lock().unwrap().clone();
                assert!(!helpers.contains(&me), "the stepping worker spun");
                helpers.sort_unstable();
                helpers.dedup();
                assert_eq!(
                    helpers.len(),
                    HELPERS.lock().unwrap().len(),
                    "two helpers on one worker"
                );
                let want: u64 = (0..8u64)
                    .map(|i| {
                        (0..64u64)
                            .map(|j| (0..50u64).map(|x| x * i + j + round).sum::<u64>())
                            .sum::<u64>()
                    })
                    .sum();
                assert_eq!(got, want, "{threads} threads, round {round}");
            }
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_helpers_awake(|| -> u64 { panic!("step failed") }))
            }));
            assert!(panicked.is_err(), "{threads} threads");
            // The pool is still usable afterwards.
            assert_eq!(pool.install(|| with_helpers_awake(|| work(0))), work(0));
        }
    }

    /// f16 weights with f32 rows (`--dtype f16` on the CPU), for decode batches on both sides
    /// of the small-batch kernel's range and for prefills: the result is f32 and right.
    #[test]
    fn f16_weights_take_f32_rows_at_every_batch_size() {
        let (k, n) = (24, 5);
        let w32: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0)
            .collect();
        let w = Tensor::from_vec(w32.clone(), (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let lin = Linear {
            w: QMatMul::Tensor(w).into(),
            b: None,
        };
        for (m, decode) in [(1, true), (8, true), (70, true), (70, false)] {
            let xs: Vec<f32> = (0..m * k)
                .map(|i| ((i * 5 % 13) as f32 - 6.0) / 9.0)
                .collect();
            let x = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
            let y = lin.forward_step(&x, decode).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            let y = y.to_vec2::<f32>().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| xs[i * k + c] * w32[j * k + c]).sum();
                    assert!((y[i][j] - want).abs() < 1e-4, "m={m} [{i},{j}]");
                }
            }
        }
    }
}
