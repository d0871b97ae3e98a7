#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Infrastructure restarts under load, as a client sees them: nats-server restarted, and etcd
//! restarted without its data, while requests run through a real `frontend`
//! (`--migration-limit`) and two `worker`s. Each test prints what it measured (errors,
//! recovery time) as well as asserting on it.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tandem_tests::{BUNDLED_MODEL_NAME, Cluster, metric_value, scrape, slow_mocker_args, wait_for};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// One test at a time: each restarts infrastructure against timing-sensitive reconnects, and
/// three clusters at once on a two-core machine would measure the machine, not tandem.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One unary chat; the completion tokens, or the error as text.
async fn chat(url: String, max_tokens: u32) -> Result<u64, String> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
    });
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {v}"));
    }
    v["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| format!("no usage: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_under_load_loses_no_request_in_flight() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(
        2,
        |_| slow_mocker_args(),
        &["--migration-limit", "3"],
        Duration::from_secs(60),
    )
    .await?;
    let url = c.url("/v1/chat/completions");
    // ~2 s answers, running when NATS goes away for 2 s.
    let in_flight: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(url.clone(), 200)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let down = Instant::now();
    c.stack.nats.restart_after(Duration::from_secs(2)).await?;
    let back = Instant::now();
    // New requests: the first success after NATS answers again.
    let recovered = loop {
        match chat(url.clone(), 5).await {
            Ok(5) => break back.elapsed(),
            Ok(n) => anyhow::bail!("short answer: {n} tokens"),
            Err(_) if back.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => anyhow::bail!("no recovery within 30 s: {e}"),
        }
    };
    let mut errors = Vec::new();
    for t in in_flight {
        match t.await? {
            Ok(200) => {}
            other => errors.push(other),
        }
    }
    let moved = metric_value(
        &scrape(&c.url("/metrics")).await?,
        "dynamo_frontend_model_migration_total",
        &[],
    )
    .unwrap_or(0.0);
    println!(
        "NATS restart: down for {:?}; in-flight errors {}/8 ({moved} migrations); first new request answered {:?} after NATS was back",
        back - down,
        errors.len(),
        recovered
    );
    if !errors.is_empty() {
        println!("frontend:\n{}", c.frontend.output());
        for (i, w) in c.workers.iter().enumerate() {
            println!("worker {i}:\n{}", w.output());
        }
    }
    assert!(errors.is_empty(), "in flight: {errors:?}");
    assert!(
        recovered < Duration::from_secs(5),
        "recovery took {recovered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_etcd_restart_without_its_data_under_load_fails_no_request() -> Result<()> {
    let _serial = SERIAL.lock().await;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::start(
        2,
        |_| slow_mocker_args(),
        &["--migration-limit", "3"],
        Duration::from_secs(60),
    )
    .await?;
    let url = c.url("/v1/chat/completions");
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Result<u64, String>>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, results) = (url.clone(), stop.clone(), results.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let r = chat(url.clone(), 30).await;
                    results.lock().unwrap().push(r);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // etcd comes back empty: every lease and record is gone until the workers notice.
    c.stack.etcd.restart(true).await?;
    let back = Instant::now();
    let etcd = etcd_client::Client::connect([c.stack.etcd.url()], None).await?;
    let prefix = "instances/dynamo/backend/generate:";
    wait_for(
        Duration::from_secs(30),
        "both workers registered again",
        || {
            let mut etcd = etcd.clone();
            async move {
                let r = etcd
                    .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
                    .ok()?;
                (r.kvs().len() == 2).then_some(())
            }
        },
    )
    .await?;
    let registered = back.elapsed();
    // Load goes on a little past the re-registration.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for t in clients {
        t.await?;
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    let errors: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(30))).collect();
    println!(
        "etcd restart (wiped): {} requests, {} errors; workers registered again {:?} after etcd was back",
        results.len(),
        errors.len(),
        registered
    );
    if !errors.is_empty() {
        let log = c.frontend.output();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("request "))
            .rev()
            .take(30)
            .collect();
        anyhow::bail!(
            "{} errors, first {:?}; frontend log (newest first):\n{}",
            errors.len(),
            errors[0],
            tail.join("\n")
        );
    }
    assert!(results.len() >= 8, "load ran throughout: {}", results.len());
    Ok(())
}

/// A TCP proxy to 127.0.0.1:`upstream` on a port of its own that can cut every connection
/// and refuse new ones, then accept again: a process behind it loses NATS and nothing else.
struct Proxy {
    port: u16,
    upstream: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Result<Self> {
        let mut p = Self {
            port: tandem_tests::free_port()?,
            upstream,
            task: None,
        };
        p.resume().await?;
        Ok(p)
    }

    async fn resume(&mut self) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task: every connection goes with it.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
        Ok(())
    }

    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_from_nats_leaves_discovery_until_it_is_back() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = tandem_tests::Stack::start().await?;
    let mut proxy = Proxy::start(stack.nats.port).await?;
    let via_proxy = format!("nats://127.0.0.1:{}", proxy.port);
    let args = slow_mocker_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ttl = ("DYN_LEASE_TTL_SECS", "2");
    let (_cut, _) =
        stack.spawn_worker("cut", &args, &[("NATS_SERVER", via_proxy.as_str()), ttl])?;
    let (_kept, _) = stack.spawn_worker("kept", &args, &[ttl])?;
    // No migration: the frontend must simply stop choosing the unreachable worker.
    let (frontend, http) = stack.spawn_frontend("frontend", &[], &[])?;
    let metrics = format!("http://127.0.0.1:{http}/metrics");
    let workers = |n: f64| {
        let metrics = metrics.clone();
        move || {
            let metrics = metrics.clone();
            async move {
                let text = scrape(&metrics).await.ok()?;
                (metric_value(&text, "dynamo_frontend_model_workers", &[("model", MODEL)])
                    == Some(n))
                .then_some(())
            }
        }
    };
    wait_for(Duration::from_secs(60), "two workers", workers(2.0)).await?;

    proxy.cut();
    let cut_at = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the cut-off worker withdrawn",
        workers(1.0),
    )
    .await?;
    let withdrawn = cut_at.elapsed();
    let url = format!("http://127.0.0.1:{http}/v1/chat/completions");
    for i in 0..10 {
        let r = chat(url.clone(), 5).await;
        assert_eq!(
            r,
            Ok(5),
            "request {i}: {}",
            frontend
                .output()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    proxy.resume().await?;
    let resumed_at = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the worker back in discovery",
        workers(2.0),
    )
    .await?;
    println!(
        "NATS cut off from one worker: withdrawn from discovery after {withdrawn:?}, 10/10 requests answered meanwhile, back {:?} after NATS was reachable again",
        resumed_at.elapsed()
    );
    Ok(())
}
