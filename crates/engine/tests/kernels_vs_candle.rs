//! tandem's quantized CPU kernels against candle's own quantized matmul on the same blocks:
//! equal to the last bit, for single rows and batches (what lets the quantized reference test
//! demand identical greedy tokens).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::sync::Arc;

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 700.0)
        .collect()
}

fn check(
    dtype: GgmlDType,
    ours: impl Fn(&[u8], usize, usize) -> Option<Box<dyn Fn(&[f32], usize) -> Vec<f32>>>,
) {
    let (n, k) = (40, 256);
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let Some(kernel) = ours(&q.data().unwrap(), n, k) else {
        eprintln!("{dtype:?}: no kernel on this CPU");
        return;
    };
    let candle = QMatMul::QTensor(Arc::new(q));
    for m in [1, 3, 8] {
        let x = values(m * k, m + 2);
        let want = candle
            .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = kernel(&x, m);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{dtype:?} m={m}");
    }
}

#[test]
fn q4_1_kernel_equals_candle_bit_for_bit() {
    check(GgmlDType::Q4_1, |b, n, k| {
        let w = tandem_kernels::Q4_1Weights::from_ggml(b, n, k).unwrap();
        Some(Box::new(move |x, m| w.matmul(x, m)))
    });
}

#[test]
fn q8_0_kernel_equals_candle_bit_for_bit() {
    check(GgmlDType::Q8_0, |b, n, k| {
        let w = tandem_kernels::Q8_0Weights::from_ggml(b, n, k).ok()?;
        Some(Box::new(move |x, m| w.matmul(x, m)))
    });
}
