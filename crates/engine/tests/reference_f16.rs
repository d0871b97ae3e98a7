//! f16 weights (`--dtype f16`; on the CPU f32 activations) against candle-transformers'
//! reference on the same weights in f32. Rounding every weight to f16 moves the logits a
//! little, so the documented tolerance is: each prompt's greedy tokens equal the f32
//! reference's for at least its first `AGREE` tokens, the answer still says "Paris", and a
//! batch of all prompts at once decodes exactly what each decodes alone (the batched kernels
//! and the single-row path agree at f16 too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use tandem_engine::DtypeArg;

/// Greedy tokens that must match the f32 reference before f16 rounding may change a choice.
const AGREE: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_weights_follow_the_f32_reference_within_tolerance() {
    common::reference_in_f32();
    let files = common::files();
    let prompts = common::prompts(&files);
    let tokens = 24u32;
    let engine = common::engine(DtypeArg::F16, 512, 64);
    let mut solo = Vec::new();
    for p in &prompts {
        let want = common::reference_greedy(p, tokens as usize);
        let (got, _) = common::generate(&engine, p, tokens).await;
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("f16 agrees with the f32 reference for {agree} of {tokens} tokens");
        assert!(
            agree >= AGREE,
            "f16 {:?} vs f32 {:?}",
            files.tokenizer.decode(&got, true),
            files.tokenizer.decode(&want, true)
        );
        solo.push(got);
    }
    let paris = files.tokenizer.decode(&solo[0], true).unwrap();
    assert!(paris.contains("Paris"), "{paris}");

    common::wait_idle(&engine).await;
    let batched =
        futures::future::join_all(prompts.iter().map(|p| common::generate(&engine, p, tokens)))
            .await;
    for (alone, (together, _)) in solo.iter().zip(&batched) {
        assert_eq!(alone, together, "batched f16 decode differs from solo");
    }
}
