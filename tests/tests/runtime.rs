#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The distributed runtime against a real nats-server and etcd, with endpoint processes
//! started from the `rt-echo` binary.

use anyhow::Result;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_runtime::{DistributedRuntime, EndpointId, ErrorCode, RemoteError, RuntimeError};
use tandem_tests::{LineReader, Proc, Stack, free_port, metric_value, scrape, wait_for};

const ENDPOINT: &str = "dyn://test.echo.generate";

fn rt_echo() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rt-echo"))
}

/// Starts an `rt-echo serve` process with a system status server; returns it and its port.
fn serve(stack: &Stack, name: &str, extra_env: &[(&str, &str)]) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let port_s = port.to_string();
    let mut env = vec![
        ("DYN_SYSTEM_PORT", port_s.as_str()),
        ("DYN_SYSTEM_HOST", "127.0.0.1"),
    ];
    env.extend_from_slice(extra_env);
    let p = stack.spawn(name, rt_echo(), &["--endpoint", ENDPOINT, "serve"], &env)?;
    Ok((p, port))
}

async fn client_runtime(stack: &Stack) -> Result<(DistributedRuntime, tandem_runtime::Client)> {
    let mut cfg = stack.runtime_config();
    cfg.stream_stall_timeout_secs = 5.0;
    let drt = DistributedRuntime::connect(cfg).await?;
    let client = drt.endpoint(ENDPOINT.parse()?).client();
    Ok((drt, client))
}

fn echo_body(count: u64, delay_ms: u64, pad: usize) -> Bytes {
    Bytes::from(json!({"count": count, "delay_ms": delay_ms, "pad": pad}).to_string())
}

/// Collects a whole response: the frames' `i` values and the instance that sent them.
async fn collect(stream: &mut tandem_runtime::ResponseStream) -> Result<(Vec<u64>, String)> {
    let mut seen = Vec::new();
    let mut instance = String::new();
    while let Some(frame) = stream.next().await {
        let v: Value = serde_json::from_slice(&frame?)?;
        seen.push(v["i"].as_u64().unwrap_or(u64::MAX));
        instance = v["instance"].as_str().unwrap_or_default().to_string();
    }
    Ok((seen, instance))
}

async fn metrics_of(port: u16) -> Result<String> {
    scrape(&format!("http://127.0.0.1:{port}/metrics")).await
}

fn endpoint_labels() -> [(&'static str, &'static str); 3] {
    [
        ("dynamo_namespace", "test"),
        ("dynamo_component", "echo"),
        ("dynamo_endpoint", "generate"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_discovered_round_robin_and_streams_complete_in_order() -> Result<()> {
    let stack = Stack::start().await?;
    let (_a, _) = serve(&stack, "echo-a", &[])?;
    let (_b, _) = serve(&stack, "echo-b", &[])?;
    let (_drt, client) = client_runtime(&stack).await?;
    let instances = client
        .wait_for(Duration::from_secs(15), |v| v.len() == 2)
        .await?;

    // Dynamo's Instance records and subjects.
    for inst in &instances {
        assert_eq!(inst.namespace, "test");
        assert_eq!(inst.component, "echo");
        assert_eq!(inst.endpoint, "generate");
        assert_eq!(
            inst.subject(),
            format!("test_echo.generate-{:x}", inst.instance_id)
        );
    }
    let mut etcd = etcd_client::Client::connect([stack.etcd.url()], None).await?;
    let keys = etcd
        .get(
            "instances/test/echo/generate:",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    let mut keys: Vec<String> = keys
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    keys.sort();
    let mut expected: Vec<String> = instances
        .iter()
        .map(|i| format!("instances/test/echo/generate:{:x}", i.instance_id))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);

    let mut served_by = Vec::new();
    for _ in 0..6 {
        let mut stream = client
            .round_robin(echo_body(50, 0, 0), Default::default())
            .await?;
        let (frames, instance) = collect(&mut stream).await?;
        assert_eq!(
            frames,
            (0..50).collect::<Vec<_>>(),
            "frames complete and in order"
        );
        assert_eq!(instance, format!("{:x}", stream.instance_id()));
        served_by.push(instance);
    }
    for pair in served_by.windows(2) {
        assert_ne!(pair[0], pair[1], "round-robin alternates: {served_by:?}");
    }
    assert_eq!(served_by[0], served_by[2]);
    assert_eq!(served_by[1], served_by[3]);

    // A handler faster than NATS: what piles up goes out in batch frames, within NATS's
    // payload limit (30 frames of 100 kB would be 3 MB in one), still whole and in order.
    for (count, pad) in [(5000, 0), (30, 100_000)] {
        let mut stream = client
            .round_robin(echo_body(count, 0, pad), Default::default())
            .await?;
        let (frames, _) = collect(&mut stream).await?;
        assert_eq!(
            frames,
            (0..count).collect::<Vec<_>>(),
            "{count} frames of {pad} bytes"
        );
    }

    // Many streams at once share the process's one reply subscription: each gets exactly
    // its own frames, in order, while streams dropped half-way leave the others whole.
    let mut running = Vec::new();
    for i in 0..40u64 {
        running.push(
            client
                .round_robin(echo_body(100 + i, 1, 0), Default::default())
                .await?,
        );
    }
    let outcomes = futures::future::join_all(running.into_iter().enumerate().map(
        |(i, mut s)| async move {
            if i % 4 == 3 {
                let first = s.next().await;
                drop(s);
                return first.is_some().then_some(Vec::new());
            }
            collect(&mut s).await.ok().map(|(frames, _)| frames)
        },
    ))
    .await;
    for (i, frames) in outcomes.into_iter().enumerate() {
        let frames = frames.unwrap_or_else(|| panic!("stream {i} failed"));
        if i % 4 != 3 {
            assert_eq!(
                frames,
                (0..100 + i as u64).collect::<Vec<_>>(),
                "stream {i}"
            );
        }
    }

    // Direct routing reaches the named instance.
    let target = instances[1].instance_id;
    let mut stream = client
        .direct(target, echo_body(3, 0, 0), Default::default())
        .await?;
    let (_, instance) = collect(&mut stream).await?;
    assert_eq!(instance, format!("{target:x}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_fail_cleanly() -> Result<()> {
    let stack = Stack::start().await?;
    let (_a, _) = serve(&stack, "echo", &[])?;
    let (drt, client) = client_runtime(&stack).await?;
    client.wait_for_instances(Duration::from_secs(15)).await?;
    let max = drt.nats().server_info().max_payload;

    let huge = Bytes::from(vec![b' '; max + 1]);
    match client.round_robin(huge, Default::default()).await {
        Err(RuntimeError::PayloadTooLarge { size, max: m }) => {
            assert_eq!(size, max + 1);
            assert_eq!(m, max);
        }
        other => panic!("expected PayloadTooLarge, got {:?}", other.map(|_| ())),
    }

    // A response frame over the limit ends the stream with an error, not a truncated frame.
    let mut stream = client
        .round_robin(echo_body(2, 0, max + 10), Default::default())
        .await?;
    match stream.next().await {
        Some(Err(RuntimeError::Remote(e))) => {
            assert!(e.message.contains("not sent"), "{e}");
            assert_eq!(e.code, tandem_runtime::ErrorCode::Internal);
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    // The instance is still healthy afterwards.
    let mut stream = client
        .round_robin(echo_body(3, 0, 0), Default::default())
        .await?;
    assert_eq!(collect(&mut stream).await?.0, vec![0, 1, 2]);
    Ok(())
}

/// A raw NATS subscriber registered as an instance: lets the test send frames a real handler
/// never would (gaps, silence).
async fn fake_instance(
    stack: &Stack,
    component: &str,
) -> Result<(
    async_nats::Subscriber,
    async_nats::Client,
    DistributedRuntime,
)> {
    let drt = DistributedRuntime::connect(stack.runtime_config()).await?;
    let id = EndpointId::new("test", component, "generate")?;
    let subject = id.subject(drt.instance_id());
    let sub = drt.nats().subscribe(subject.clone()).await?;
    let record = tandem_runtime::Instance {
        component: component.into(),
        endpoint: "generate".into(),
        namespace: "test".into(),
        instance_id: drt.instance_id(),
        transport: tandem_runtime::Transport::NatsTcp(subject),
    };
    drt.discovery()
        .register(
            &id.etcd_key(drt.instance_id()),
            serde_json::to_vec(&record)?,
        )
        .await?;
    Ok((sub, drt.nats().clone(), drt))
}

/// A request through `client` whose first response item the task returns.
fn first_item(
    client: &tandem_runtime::Client,
) -> tokio::task::JoinHandle<Result<Option<Result<Bytes, RuntimeError>>>> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut s = client
            .round_robin(Bytes::from_static(b"{}"), Default::default())
            .await?;
        anyhow::Ok(s.next().await)
    })
}

/// The next request the fake instance's subscription receives.
async fn next_request(sub: &mut async_nats::Subscriber) -> Result<async_nats::Message> {
    sub.next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no request"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_stalls_refusals_foreign_messages_and_missing_responders_are_distinct_errors()
-> Result<()> {
    use tandem_runtime::transport::{FrameKind, HDR_REPLY_TO, encode_frame, header};
    let stack = Stack::start().await?;
    let (mut sub, nats, _fake) = fake_instance(&stack, "fake").await?;

    let mut cfg = stack.runtime_config();
    cfg.stream_stall_timeout_secs = 1.0;
    cfg.request_ack_timeout_secs = 1.0;
    let drt = DistributedRuntime::connect(cfg).await?;
    let client = drt
        .endpoint(EndpointId::new("test", "fake", "generate")?)
        .client();
    client.wait_for_instances(Duration::from_secs(15)).await?;

    // Gap: frames 0 then 2.
    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            let mut s = client
                .round_robin(Bytes::from_static(b"{}"), Default::default())
                .await?;
            let first = s.next().await;
            let second = s.next().await;
            anyhow::Ok((
                first.map(|r| r.map_err(|e| e.to_string())),
                second.map(|r| r.map_err(|e| e.to_string())),
            ))
        }
    });
    let msg = next_request(&mut sub).await?;
    let reply_to = header(msg.headers.as_ref(), HDR_REPLY_TO)
        .unwrap_or_default()
        .to_string();
    nats.publish(msg.reply.clone().unwrap(), Bytes::new())
        .await?;
    nats.publish(
        reply_to.clone(),
        encode_frame(FrameKind::Data, Some(0), b"a"),
    )
    .await?;
    nats.publish(
        reply_to.clone(),
        encode_frame(FrameKind::Data, Some(2), b"c"),
    )
    .await?;
    let (first, second) = pending.await??;
    assert_eq!(first, Some(Ok(Bytes::from_static(b"a"))));
    let second = second.unwrap().unwrap_err();
    assert!(second.contains("expected frame 1, got 2"), "{second}");

    // Stall: acknowledged, then silence.
    let pending = first_item(&client);
    let msg = next_request(&mut sub).await?;
    nats.publish(msg.reply.clone().unwrap(), Bytes::new())
        .await?;
    match pending.await?? {
        Some(Err(RuntimeError::StreamStalled(d))) => assert_eq!(d, Duration::from_secs(1)),
        other => panic!("expected StreamStalled, got {other:?}"),
    }

    // Refused: the instance answers the request itself with an error frame.
    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .round_robin(Bytes::from_static(b"{}"), Default::default())
                .await
                .map(|_| ())
        }
    });
    let msg = next_request(&mut sub).await?;
    let refusal = RemoteError::new(ErrorCode::Overloaded, "busy").encode();
    nats.publish(
        msg.reply.clone().unwrap(),
        encode_frame(FrameKind::Error, None, &refusal),
    )
    .await?;
    match pending.await? {
        Err(RuntimeError::Rejected(e)) => assert_eq!(e.code, ErrorCode::Overloaded),
        other => panic!("expected Rejected, got {other:?}"),
    }

    // Not a frame on the reply subject (a worker of another wire format): reported at once.
    let pending = first_item(&client);
    let msg = next_request(&mut sub).await?;
    let reply_to = header(msg.headers.as_ref(), HDR_REPLY_TO)
        .unwrap_or_default()
        .to_string();
    nats.publish(msg.reply.clone().unwrap(), Bytes::new())
        .await?;
    nats.publish(reply_to, Bytes::from_static(b"{\"token_ids\":[1]}"))
        .await?;
    match pending.await?? {
        Some(Err(RuntimeError::Decode(m))) => assert!(m.contains("not a tandem frame"), "{m}"),
        other => panic!("expected Decode, got {other:?}"),
    }

    // No responders: the subscription is gone but the record is still in etcd.
    sub.unsubscribe().await?;
    nats.flush().await?;
    // Under load the server may still route one request to the closing subscription (an
    // ack timeout); it must answer "no responders" right after.
    for attempt in 0..3 {
        match client
            .round_robin(Bytes::from_static(b"{}"), Default::default())
            .await
        {
            Err(e @ RuntimeError::NoResponders(_)) => {
                assert!(e.is_retryable());
                return Ok(());
            }
            Err(RuntimeError::AckTimeout(_)) if attempt < 2 => continue,
            other => panic!("expected NoResponders, got {:?}", other.map(|_| ())),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_leaves_discovery_within_lease_ttl() -> Result<()> {
    let stack = Stack::start().await?;
    let ttl = [("DYN_LEASE_TTL_SECS", "3")];
    let (mut a, _) = serve(&stack, "echo-a", &ttl)?;
    let (_b, _) = serve(&stack, "echo-b", &ttl)?;
    let (_drt, client) = client_runtime(&stack).await?;
    let instances = client
        .wait_for(Duration::from_secs(15), |v| v.len() == 2)
        .await?;

    // Which instance is process a? Ask each one directly until one answers from a's log.
    let mut stream = client
        .round_robin(echo_body(1, 0, 0), Default::default())
        .await?;
    let _ = collect(&mut stream).await?;
    // Log lines reach the file up to a writer batch (10 ms) after they are written.
    let a_id = wait_for(Duration::from_secs(5), "a's instance id in its log", || {
        let (ids, log) = (&instances, a.output());
        let found = ids
            .iter()
            .map(|i| i.instance_id)
            .find(|id| log.contains(&format!("{id:x}")));
        async move { found }
    })
    .await?;

    let connected = stack.nats.connections().await?;
    let killed_at = Instant::now();
    a.kill();
    // NATS drops a's subscription once it has read the closed connection (on a loaded machine
    // that can come after the next request is routed to it, which then waits for an ack).
    let nats = &stack.nats;
    wait_for(
        Duration::from_secs(5),
        "nats-server to drop a's connection",
        || async move { (nats.connections().await.ok()? < connected).then_some(()) },
    )
    .await?;
    // Until the lease expires the record is still there, and a request to it is refused at
    // once by NATS, as a distinct, retryable error.
    match client
        .direct(a_id, echo_body(1, 0, 0), Default::default())
        .await
    {
        Err(e @ RuntimeError::NoResponders(_)) => assert!(e.is_retryable()),
        Err(RuntimeError::InstanceNotFound(_)) => {} // the lease already expired
        other => panic!("expected NoResponders, got {:?}", other.map(|_| ())),
    }
    let left = client
        .wait_for(Duration::from_secs(10), |v| {
            v.iter().all(|i| i.instance_id != a_id)
        })
        .await?;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after <= Duration::from_secs(3) + Duration::from_secs(2),
        "left after {gone_after:?}"
    );
    assert_eq!(left.len(), 1);

    for _ in 0..5 {
        let mut stream = client
            .round_robin(echo_body(5, 0, 0), Default::default())
            .await?;
        assert_ne!(stream.instance_id(), a_id);
        assert_eq!(collect(&mut stream).await?.0, vec![0, 1, 2, 3, 4]);
    }
    Ok(())
}

async fn cancellations(port: u16) -> Option<(f64, f64)> {
    let text = metrics_of(port).await.ok()?;
    let labels = endpoint_labels();
    Some((
        metric_value(&text, "dynamo_component_cancellation_total", &labels)?,
        metric_value(&text, "dynamo_component_inflight_requests", &labels)?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_killing_the_caller_stops_the_handler() -> Result<()> {
    let stack = Stack::start().await?;
    let (_w, port) = serve(&stack, "echo", &[])?;
    let (_drt, client) = client_runtime(&stack).await?;
    client.wait_for_instances(Duration::from_secs(15)).await?;

    // Cancel by dropping the stream mid-way.
    let mut stream = client
        .round_robin(echo_body(10_000, 20, 0), Default::default())
        .await?;
    for _ in 0..3 {
        stream.next().await.transpose()?;
    }
    assert_eq!(
        cancellations(port).await.map(|c| c.1),
        Some(1.0),
        "one request in flight"
    );
    drop(stream);
    wait_for(
        Duration::from_secs(10),
        "the handler to stop after cancel",
        || async { (cancellations(port).await == Some((1.0, 0.0))).then_some(()) },
    )
    .await?;

    // Kill a caller process mid-stream.
    let mut cmd = Command::new(rt_echo());
    cmd.args([
        "--endpoint",
        ENDPOINT,
        "call",
        "--count",
        "10000",
        "--delay-ms",
        "20",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    for (k, v) in stack.env() {
        cmd.env(k, v);
    }
    let mut caller = cmd.spawn()?;
    let mut lines = LineReader::new(
        caller
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );
    lines.wait_line(Duration::from_secs(20), |l| l.starts_with("frame 2 "))?;
    assert_eq!(cancellations(port).await, Some((1.0, 1.0)));
    caller.kill()?;
    caller.wait()?;
    wait_for(
        Duration::from_secs(10),
        "the handler to stop after its caller died",
        || async { (cancellations(port).await == Some((2.0, 0.0))).then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_recover_after_nats_and_etcd_restarts() -> Result<()> {
    let mut stack = Stack::start().await?;
    let (w, _) = serve(&stack, "echo", &[("DYN_LEASE_TTL_SECS", "3")])?;
    let (_drt, client) = client_runtime(&stack).await?;
    let before = client.wait_for_instances(Duration::from_secs(15)).await?;
    let mut s = client
        .round_robin(echo_body(5, 0, 0), Default::default())
        .await?;
    assert_eq!(collect(&mut s).await?.0.len(), 5);

    stack.nats.restart().await?;
    // Both sides reconnect on their own; the first requests may land mid-reconnect.
    let frames = wait_for(
        Duration::from_secs(20),
        "a request to succeed after NATS restart",
        || {
            let client = client.clone();
            async move {
                let mut s = client
                    .round_robin(echo_body(5, 0, 0), Default::default())
                    .await
                    .ok()?;
                collect(&mut s).await.ok().map(|r| r.0)
            }
        },
    )
    .await?;
    assert_eq!(frames, vec![0, 1, 2, 3, 4]);
    for _ in 0..5 {
        let mut s = client
            .round_robin(echo_body(5, 0, 0), Default::default())
            .await?;
        assert_eq!(
            collect(&mut s).await?.0.len(),
            5,
            "requests keep succeeding after reconnect"
        );
    }

    // etcd restarts with no data: every lease and key is gone; the instance registers again
    // with the same id, so its subject stays valid.
    stack.etcd.restart(true).await?;
    let key = format!("instances/test/echo/generate:{:x}", before[0].instance_id);
    let mut etcd = etcd_client::Client::connect([stack.etcd.url()], None).await?;
    let fresh = etcd.get(key.as_str(), None).await?;
    assert!(fresh.kvs().is_empty(), "the restarted etcd starts empty");
    let lease = wait_for(
        Duration::from_secs(20),
        "the instance to re-register in a fresh etcd",
        || {
            let (mut etcd, key) = (etcd.clone(), key.clone());
            async move {
                let r = etcd.get(key.as_str(), None).await.ok()?;
                r.kvs().first().map(|kv| kv.lease())
            }
        },
    )
    .await
    .map_err(|e| e.context(format!("worker output:\n{}", w.output())))?;
    assert_ne!(lease, 0, "re-registered under a lease");
    let after = client
        .wait_for(Duration::from_secs(10), |v| !v.is_empty())
        .await?;
    assert_eq!(after, before);
    let mut s = client
        .round_robin(echo_body(5, 0, 0), Default::default())
        .await?;
    assert_eq!(collect(&mut s).await?.0.len(), 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_ready_and_metrics_count_requests() -> Result<()> {
    let stack = Stack::start().await?;
    let (_w, port) = serve(&stack, "echo", &[("RT_ECHO_SERVE_AFTER_MS", "1500")])?;
    let http = reqwest::Client::new();
    let health_url = format!("http://127.0.0.1:{port}/health");

    let first = wait_for(Duration::from_secs(15), "the system status server", || {
        let (http, url) = (http.clone(), health_url.clone());
        async move { http.get(&url).send().await.ok() }
    })
    .await?;
    assert_eq!(first.status().as_u16(), 503);
    let body: Value = first.json().await?;
    assert_eq!(body["status"], "notready");
    assert!(body["uptime"]["secs"].is_u64());

    let ready: Value = wait_for(Duration::from_secs(15), "/health to turn 200", || {
        let (http, url) = (http.clone(), health_url.clone());
        async move {
            let r = http.get(&url).send().await.ok()?;
            if r.status().as_u16() == 200 {
                r.json().await.ok()
            } else {
                None
            }
        }
    })
    .await?;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["endpoints"]["generate"], "ready");
    let live = http
        .get(format!("http://127.0.0.1:{port}/live"))
        .send()
        .await?;
    assert_eq!(live.status().as_u16(), 200);

    let (_drt, client) = client_runtime(&stack).await?;
    client.wait_for_instances(Duration::from_secs(15)).await?;
    let n = 7;
    let mut sent_bytes = 0;
    for k in 0..n {
        let body = echo_body(k + 1, 0, 0);
        sent_bytes += body.len();
        let mut s = client.round_robin(body, Default::default()).await?;
        collect(&mut s).await?;
    }
    let text = metrics_of(port).await?;
    let labels = endpoint_labels();
    let get = |name: &str| metric_value(&text, name, &labels);
    assert_eq!(
        get("dynamo_component_requests_total"),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(
        get("dynamo_component_request_duration_seconds_count"),
        Some(n as f64)
    );
    assert_eq!(get("dynamo_component_inflight_requests"), Some(0.0));
    assert_eq!(
        get("dynamo_component_request_bytes_total"),
        Some(sent_bytes as f64)
    );
    assert!(get("dynamo_component_response_bytes_total").unwrap_or(0.0) > 0.0);
    assert!(metric_value(&text, "dynamo_component_uptime_seconds", &[]).unwrap_or(0.0) > 0.0);
    assert_eq!(
        metric_value(&text, "dynamo_component_nats_client_connection_state", &[]),
        Some(1.0)
    );
    let missing = http
        .get(format!("http://127.0.0.1:{port}/nope"))
        .send()
        .await?;
    assert_eq!(missing.status().as_u16(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_at_once_and_exits_cleanly() -> Result<()> {
    let stack = Stack::start().await?;
    // A long lease: leaving discovery quickly can only come from revoking it.
    let (mut w, _) = serve(&stack, "echo", &[("DYN_LEASE_TTL_SECS", "60")])?;
    let (_drt, client) = client_runtime(&stack).await?;
    client.wait_for_instances(Duration::from_secs(15)).await?;
    let status = w.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status:?}");
    client
        .wait_for(Duration::from_secs(5), |v| v.is_empty())
        .await
        .map_err(|e| anyhow::anyhow!("instance still listed after SIGTERM: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_ends_its_streams_within_a_probe_interval() -> Result<()> {
    let stack = Stack::start().await?;
    let (mut a, _) = serve(&stack, "echo-a", &[])?;
    // Stall timeout 5 s; the instance probe runs after 1 s of silence (the default).
    let (_drt, client) = client_runtime(&stack).await?;
    client.wait_for_instances(Duration::from_secs(15)).await?;
    let mut stream = client
        .round_robin(echo_body(200, 100, 0), Default::default())
        .await?;
    assert!(matches!(stream.next().await, Some(Ok(_))), "first frame");
    a.kill();
    let killed_at = Instant::now();
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    match end {
        Some(Err(RuntimeError::InstanceGone(id))) => assert_eq!(id, stream.instance_id()),
        other => panic!("expected InstanceGone, got {other:?}"),
    }
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "found by the probe, not the 5 s stall timeout: {took:?}"
    );
    Ok(())
}
