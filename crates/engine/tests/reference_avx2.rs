//! The f32 reference check with the kernels kept to their AVX2 forms (`--cpu-kernels avx2`),
//! which CPUs without AVX-512 run: on an AVX-512 CPU `reference_f32.rs` exercises the AVX-512
//! forms instead (prompt GEMM, 16-lane attention and tiles). On an AVX2-only CPU this repeats it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use tandem_engine::DtypeArg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avx2_kernels_match_the_reference_in_f32() {
    common::reference_in_f32();
    #[allow(unsafe_code)]
    // SAFETY: set before the binary's only test starts anything that reads the environment.
    unsafe {
        std::env::set_var("TANDEM_CPU_KERNELS", "avx2")
    };
    common::check_against_reference(DtypeArg::F32, 24).await;
}
