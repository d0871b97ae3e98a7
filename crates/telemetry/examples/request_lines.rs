//! What a request's log lines cost, measured in-process with the real subscriber
//! ([`tandem_telemetry::init`], so `DYN_LOG`, `DYN_LOGGING_JSONL` and `OTEL_*` apply as they do
//! to the binaries).
//!
//! One iteration is the frontend's side of a request as far as logging goes: an `http-request`
//! span with the frontend's fields, the GenAI attributes recorded on it, and — in the "lines"
//! blocks only — its two request lines ("request accepted", "request completed" with the
//! completion's fields). Blocks with and without the lines alternate; the difference of their
//! process CPU time (every thread, the log writer's included) per iteration is the cost of two
//! lines. Run with stderr to a file, as a service's log would be:
//!
//! ```text
//! cargo run --release -p tandem-telemetry --example request_lines 2>/tmp/lines.log
//! ```
//!
//! Prints one JSON object: CPU µs per iteration with and without lines (medians of the
//! rounds) and µs per line. `ROUNDS` (default 10) and `ITERATIONS` per block (default 100000).

use std::time::Instant;

const ON: &str = "request_lines::on";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = env_or("ROUNDS", 10);
    let iterations: usize = env_or("ITERATIONS", 100_000);
    let _guard = tandem_telemetry::init("request_lines")?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..rounds {
        // Alternate which goes first, so drift over the run does not favour either.
        for lines in [round % 2 == 0, round % 2 == 1] {
            let cpu = cpu_seconds()?;
            let wall = Instant::now();
            for i in 0..iterations {
                request(i, lines);
            }
            let per = (cpu_seconds()? - cpu) / iterations as f64 * 1e6;
            eprintln!(
                "round {round} lines={lines}: {per:.3} µs CPU, wall {:?}",
                wall.elapsed()
            );
            if lines {
                with.push(per);
            } else {
                without.push(per);
            }
        }
    }
    let (w, wo) = (median(&mut with), median(&mut without));
    println!(
        "{{\"rounds\": {rounds}, \"iterations\": {iterations}, \"cpu_us_with_lines\": {w:.3}, \
         \"cpu_us_without_lines\": {wo:.3}, \"cpu_us_per_line\": {:.3}}}",
        (w - wo) / 2.0
    );
    Ok(())
}

/// The frontend's logging for one request; the lines only when `lines`.
fn request(i: usize, lines: bool) {
    let span = tracing::info_span!(
        "http-request",
        otel.kind = "server",
        method = "POST",
        uri = "/v1/chat/completions",
        version = "HTTP/1.1",
        x_request_id = %format_args!("bench-{i}"),
        trace_id = tracing::field::Empty,
        request_id = tracing::field::Empty,
        model = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
    );
    if let Some(t) = tandem_telemetry::propagation::trace_id(&span) {
        span.record("trace_id", t);
    }
    if lines {
        tracing::info!(target: ON, parent: &span, "request accepted");
    }
    span.record("request_id", "0123456789abcdef0123456789abcdef");
    span.record("model", "SmolLM2-135M-Instruct");
    span.record("gen_ai.request.model", "SmolLM2-135M-Instruct");
    span.record("gen_ai.usage.input_tokens", 31u64);
    span.record("gen_ai.usage.output_tokens", 16u64);
    if lines {
        tracing::info!(
            target: ON,
            parent: &span,
            model = "SmolLM2-135M-Instruct",
            endpoint = "chat_completions",
            status = 200u64,
            outcome = "success",
            input_tokens = 31u64,
            output_tokens = 16u64,
            ttft_ms = 0.912,
            elapsed_ms = 1u64,
            "request completed"
        );
    }
}

/// This process's CPU time (user + system, every thread) in seconds.
fn cpu_seconds() -> Result<f64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name: state is field 3, utime 14 and stime 15 (clock ticks).
    let rest = stat.rsplit_once(')').ok_or("unexpected /proc/self/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
