//! The OpenAI surface beyond plain text — logprobs, structured output, tool calls, reasoning
//! and the Responses API — through the official `openai` SDK against a real frontend and a
//! candle-engine worker serving the bundled model (`tests/python/openai_surface.py`).

use anyhow::Result;
use std::time::Duration;
use tandem_tests::{BUNDLED_MODEL_NAME, Served};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_structured_output_tools_reasoning_and_responses_through_the_sdk() -> Result<()> {
    let s = Served::start(
        &[
            "--dyn-tool-call-parser",
            "hermes",
            "--dyn-reasoning-parser",
            "basic",
        ],
        &[],
        Duration::from_secs(120),
    )
    .await?;
    let (ok, text) =
        tandem_tests::run_sdk_script("openai_surface.py", &s.url("/v1"), BUNDLED_MODEL_NAME)
            .await?;
    assert!(ok, "{text}\n--- frontend ---\n{}", s.frontend.output());
    for part in [
        "logprobs ok",
        "structured output ok",
        "tool calls ok",
        "reasoning ok",
        "responses ok",
    ] {
        assert!(text.contains(part), "{part} missing: {text}");
    }
    Ok(())
}
