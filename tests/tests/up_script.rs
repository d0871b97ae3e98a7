//! `scripts/up.sh` as CI can run it (`--once`, not interactive): the step lines a newcomer sees
//! come in order, each with its time, and the chat completion is answered by the real stack
//! (NATS, etcd, a candle worker on the bundled model, the frontend), on free ports, with the
//! debug build's binaries.

use anyhow::Result;
use tandem_tests::{free_port, repo_root};

#[test]
fn up_sh_prints_its_steps_in_order_and_answers_a_chat_completion() -> Result<()> {
    let run = tempfile::tempdir()?;
    let ports: Vec<String> = (0..5)
        .map(|_| free_port().map(|p| p.to_string()))
        .collect::<Result<_>>()?;
    let out = std::process::Command::new("bash")
        .current_dir(repo_root())
        .args(["scripts/up.sh", "--once", "--no-build"])
        .env("TANDEM_RUN_DIR", run.path())
        .env("HTTP_PORT", &ports[0])
        .env("DYN_SYSTEM_PORT", &ports[1])
        .env("NATS_PORT", &ports[2])
        .env("ETCD_PORT", &ports[3])
        .env("ETCD_PEER_PORT", &ports[4])
        // JetStream without the fixed monitoring port of the default.
        .env("NATS_ARGS", "-js")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/up.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("[up +") && l.ends_with("..."))
        .collect();
    let expected = [
        "tools",
        "model",
        "NATS and etcd",
        "worker: loading",
        "frontend on",
        "chat completion",
    ];
    assert_eq!(steps.len(), expected.len(), "step lines:\n{stdout}");
    for (line, name) in steps.iter().zip(expected) {
        assert!(line.contains(&format!("] {name}")), "{line} is not {name}");
    }
    let timed = stdout.lines().filter(|l| l.contains("  done in ")).count();
    assert_eq!(timed, expected.len(), "a time for every step:\n{stdout}");
    let answer = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no answer printed:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(answer)?;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!text.is_empty(), "an empty answer: {answer}");
    Ok(())
}
