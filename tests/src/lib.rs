//! Test harness: real `nats-server` and `etcd` on free 127.0.0.1 ports, and tandem processes
//! started from their built binaries.
//!
//! Servers and processes are killed when their handles drop, so a failing test leaves nothing
//! running. Readiness is always polled (TCP accept, `/health`), never slept for. The binaries
//! come from `scripts/install-deps.sh` (`.tools/bin`).

pub mod otlp;

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A program installed by `scripts/install-deps.sh`.
pub fn tool(name: &str) -> Result<PathBuf> {
    let p = repo_root().join(".tools/bin").join(name);
    if !p.exists() {
        bail!("{} missing: run scripts/install-deps.sh", p.display());
    }
    Ok(p)
}

/// Runs `tests/python/{script}` with the test venv's Python (`scripts/test.sh` creates it)
/// against an OpenAI base URL and model; returns whether it succeeded and what it printed.
pub async fn run_sdk_script(script: &str, base_url: &str, model: &str) -> Result<(bool, String)> {
    let python = repo_root().join(".venv/bin/python");
    if !python.exists() {
        bail!("{} missing: scripts/test.sh creates it", python.display());
    }
    let out = tokio::process::Command::new(python)
        .arg(repo_root().join("tests/python").join(script))
        .args(["--base-url", base_url, "--model", model])
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// A port nothing listens on right now, that no other test of this process was given, and
/// that lies below the kernel's ephemeral range. (A port found by binding `:0` is an ephemeral
/// one: released, it can become the source port of any outgoing connection — a NATS or etcd
/// client's — before the process under test binds it, which failed a worker with "Address
/// already in use" in a full-suite run.)
pub fn free_port() -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const STRIDE: u32 = 16;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.clamp(12_000, 65_535));
    let span = high - low;
    // Different processes (test binaries run one after another, CI jobs side by side) start
    // at different places. Ports go out 16 apart: the scripts under test number a few more
    // from the one they are given (scripts/disagg.sh: system ports base, base + 1, …).
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span / STRIDE {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = low + (start + n * STRIDE) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    bail!("no free port between {low} and {high}")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A child process, killed (SIGKILL) when dropped; its output goes to a log file.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let child = cmd
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("{} is not running", self.name)
        };
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real `nats-server` on 127.0.0.1.
pub struct Nats {
    pub port: u16,
    /// Its monitoring endpoint (`/varz`).
    monitor_port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Nats {
    pub async fn start(dir: &Path) -> Result<Self> {
        let mut n = Self {
            port: free_port()?,
            monitor_port: free_port()?,
            dir: dir.to_path_buf(),
            proc: None,
        };
        n.launch().await?;
        Ok(n)
    }

    async fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(tool("nats-server")?);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        cmd.args(["-m", &self.monitor_port.to_string()]);
        self.proc = Some(Proc::spawn("nats-server", &mut cmd, &self.dir)?);
        let (port, monitor) = (self.port, self.monitor_port);
        wait_for(
            Duration::from_secs(10),
            "nats-server to accept",
            || async move { (port_open(port) && port_open(monitor)).then_some(()) },
        )
        .await
    }

    /// Client connections the server holds now (`connections` of its `/varz`).
    pub async fn connections(&self) -> Result<u64> {
        let url = format!("http://127.0.0.1:{}/varz", self.monitor_port);
        let varz: serde_json::Value = reqwest::get(url).await?.json().await?;
        varz["connections"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no connections in /varz: {varz}"))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills the server and starts a new one on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch().await
    }

    /// As [`Nats::restart`], with the server gone for `down` in between.
    pub async fn restart_after(&mut self, down: Duration) -> Result<()> {
        self.stop();
        tokio::time::sleep(down).await;
        self.launch().await
    }
}

/// A real single-member `etcd` on 127.0.0.1 with its data in a temporary directory.
pub struct Etcd {
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    data: PathBuf,
    proc: Option<Proc>,
}

impl Etcd {
    pub async fn start(dir: &Path) -> Result<Self> {
        let mut e = Self {
            port: free_port()?,
            peer_port: free_port()?,
            dir: dir.to_path_buf(),
            data: dir.join("etcd-data"),
            proc: None,
        };
        e.launch().await?;
        Ok(e)
    }

    async fn launch(&mut self) -> Result<()> {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(tool("etcd")?);
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--log-level", "warn"]);
        self.proc = Some(Proc::spawn("etcd", &mut cmd, &self.dir)?);
        let health = format!("{}/health", self.url());
        let http = reqwest::Client::new();
        // Generous: a test binary starts one etcd per test, all at once, on two cores.
        wait_for(Duration::from_secs(60), "etcd to report healthy", || {
            let (http, health) = (http.clone(), health.clone());
            async move {
                let r = http.get(&health).send().await.ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                (v["health"] == "true").then_some(())
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills etcd and starts it again on the same ports; with `wipe`, with no data at all
    /// (every lease and key forgotten).
    pub async fn restart(&mut self, wipe: bool) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        if wipe {
            std::fs::remove_dir_all(&self.data).ok();
        }
        self.launch().await
    }
}

/// NATS + etcd + a temporary directory for logs, torn down together.
pub struct Stack {
    pub nats: Nats,
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir()?;
        let nats = Nats::start(dir.path()).await?;
        let etcd = Etcd::start(dir.path()).await?;
        Ok(Self { nats, etcd, dir })
    }

    /// The environment every tandem process of this stack needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NATS_SERVER".into(), self.nats.url()),
            ("ETCD_ENDPOINTS".into(), self.etcd.url()),
            ("DYN_LOG".into(), "info".into()),
        ]
    }

    /// A runtime configuration for an in-test process of this stack.
    pub fn runtime_config(&self) -> tandem_runtime::RuntimeConfig {
        tandem_runtime::RuntimeConfig {
            nats_server: self.nats.url(),
            etcd_endpoints: vec![self.etcd.url()],
            ..Default::default()
        }
    }

    /// Starts `program` with this stack's environment plus `env`, logging to the stack's dir.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(name, &mut cmd, self.dir.path())
    }

    /// Starts a `worker` on the bundled model (`args` come after `--model-path`) with its
    /// system status server on a free 127.0.0.1 port, which is returned.
    pub fn spawn_worker(
        &self,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(Proc, u16)> {
        let system = free_port()?;
        let model = bundled_model()?.to_string_lossy().into_owned();
        let mut all_args = vec!["--model-path", model.as_str()];
        all_args.extend_from_slice(args);
        let port = system.to_string();
        let mut all_env = vec![
            ("DYN_SYSTEM_PORT", port.as_str()),
            ("DYN_SYSTEM_HOST", "127.0.0.1"),
        ];
        all_env.extend_from_slice(env);
        let proc = self.spawn(name, &workspace_bin("worker")?, &all_args, &all_env)?;
        Ok((proc, system))
    }

    /// Starts the `frontend` on a free 127.0.0.1 port, which is returned.
    pub fn spawn_frontend(
        &self,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(Proc, u16)> {
        let http = free_port()?;
        let port = http.to_string();
        let mut all_args = vec!["--http-host", "127.0.0.1", "--http-port", port.as_str()];
        all_args.extend_from_slice(args);
        let proc = self.spawn(name, &workspace_bin("frontend")?, &all_args, env)?;
        Ok((proc, http))
    }
}

/// Worker arguments for a fast mocker engine (10× Dynamo's speed, 16-token blocks), then
/// `extra`.
pub fn mocker_args(extra: &[&str]) -> Vec<String> {
    [
        "--engine",
        "mocker",
        "--speedup-ratio",
        "10",
        "--block-size",
        "16",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Worker arguments for the mocker at 0.6× Dynamo's speed (~10 ms a decode step at low KV
/// usage, so a 300-token answer takes ~3 s) with 16-token blocks: slow enough for a test to
/// act while requests run.
pub fn slow_mocker_args() -> Vec<String> {
    [
        "--engine",
        "mocker",
        "--speedup-ratio",
        "0.6",
        "--block-size",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Reads a child's stdout line by line on a thread, so a test can wait for a line.
pub struct LineReader {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl LineReader {
    pub fn new(stdout: std::process::ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line satisfying `pred`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!("no matching line within {timeout:?}; saw {:?}", self.seen),
            }
        }
    }
}

/// Fetches a Prometheus text page.
pub async fn scrape(url: &str) -> Result<String> {
    Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
}

/// The value of the series `name{labels}` (labels given as a subset, in any order); `None` when
/// no such series exists.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_part) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all_match = labels
                .iter()
                .all(|(k, v)| label_part.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if all_match { value.parse().ok() } else { None }
        })
}

/// A binary of this workspace, built by `cargo build --workspace --bins` (scripts/test.sh).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("unexpected test binary location {}", exe.display()))?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} missing: run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    Ok(p)
}

/// The bundled model (scripts/fetch-model.sh).
pub fn bundled_model() -> Result<PathBuf> {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        bail!("{} missing: run scripts/fetch-model.sh", p.display());
    }
    Ok(p)
}

/// A whole local deployment: NATS, etcd, one `worker` (system status on its own port) and the
/// `frontend`, with the bundled model listed on `/v1/models`.
pub struct Served {
    pub stack: Stack,
    pub worker: Proc,
    pub frontend: Proc,
    pub http: u16,
    pub system: u16,
}

impl Served {
    /// Starts everything; `worker_args` come after `--model-path` (the bundled model), and
    /// the model must be listed within `timeout`.
    pub async fn start(
        worker_args: &[&str],
        worker_env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Self> {
        Self::start_with(worker_args, worker_env, &[], timeout).await
    }

    /// As [`Served::start`], with extra environment for the frontend too.
    pub async fn start_with(
        worker_args: &[&str],
        worker_env: &[(&str, &str)],
        frontend_env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Self> {
        let stack = Stack::start().await?;
        let (worker, system) = stack.spawn_worker("worker", worker_args, worker_env)?;
        let (frontend, http) = stack.spawn_frontend("frontend", &[], frontend_env)?;
        let s = Self {
            stack,
            worker,
            frontend,
            http,
            system,
        };
        let client = reqwest::Client::new();
        let models_url = s.url("/v1/models");
        wait_for(timeout, "the model to be listed", || {
            let (c, u) = (client.clone(), models_url.clone());
            async move {
                let v: serde_json::Value = c.get(&u).send().await.ok()?.json().await.ok()?;
                (v["data"][0]["id"] == BUNDLED_MODEL_NAME).then_some(())
            }
        })
        .await
        .map_err(|e| e.context(s.worker.output()))?;
        Ok(s)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// The worker's system status server (metrics, health).
    pub fn system_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.system)
    }
}

/// NATS, etcd, several workers (each with its own system status port) and one frontend, all
/// serving the bundled model; for routing tests.
pub struct Cluster {
    pub stack: Stack,
    pub workers: Vec<Proc>,
    /// System status port of each worker, by position.
    pub systems: Vec<u16>,
    pub frontend: Proc,
    pub http: u16,
}

/// A worker to start: its name (log file), arguments after `--model-path`, environment.
type WorkerSpec = (String, Vec<String>, Vec<(String, String)>);

impl Cluster {
    /// Starts `n` workers with `worker_args(i)` (after `--model-path`) and a frontend with
    /// `frontend_args`; returns once the frontend lists the model with all `n` workers.
    pub async fn start(
        n: usize,
        worker_args: impl Fn(usize) -> Vec<String>,
        frontend_args: &[&str],
        timeout: Duration,
    ) -> Result<Self> {
        let workers = (0..n).map(|i| (format!("worker{i}"), worker_args(i), vec![]));
        let c = Self::spawn(workers.collect(), frontend_args, &[]).await?;
        c.wait_workers(n, timeout).await?;
        Ok(c)
    }

    /// Starts a stack, the workers (each with a 2 s lease) and the frontend; waits for
    /// nothing.
    async fn spawn(
        workers: Vec<WorkerSpec>,
        frontend_args: &[&str],
        frontend_env: &[(&str, &str)],
    ) -> Result<Self> {
        let stack = Stack::start().await?;
        let (mut procs, mut systems) = (Vec::new(), Vec::new());
        for (name, args, env) in workers {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut all_env = vec![("DYN_LEASE_TTL_SECS", "2")];
            all_env.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let (worker, system) = stack.spawn_worker(&name, &args, &all_env)?;
            procs.push(worker);
            systems.push(system);
        }
        let (frontend, http) = stack.spawn_frontend("frontend", frontend_args, frontend_env)?;
        Ok(Self {
            stack,
            workers: procs,
            systems,
            frontend,
            http,
        })
    }

    /// Starts a disaggregated deployment: `decode` decode workers (positions `0..decode`)
    /// and `prefill` prefill workers after them, each with `worker_args(is_prefill, i)` after
    /// its role flag, and a frontend with `frontend_args`; returns once the frontend uses
    /// them all.
    pub async fn start_disagg(
        prefill: usize,
        decode: usize,
        worker_args: impl Fn(bool, usize) -> Vec<String>,
        frontend_args: &[&str],
        timeout: Duration,
    ) -> Result<Self> {
        Self::start_disagg_env(prefill, decode, worker_args, frontend_args, &[], timeout).await
    }

    /// As [`Cluster::start_disagg`], with `env` for every process and each role exporting
    /// traces under its own service name, as `scripts/disagg.sh` does (`dynamo-frontend`,
    /// `dynamo-worker-prefill`, `dynamo-worker-decode`).
    pub async fn start_disagg_env(
        prefill: usize,
        decode: usize,
        worker_args: impl Fn(bool, usize) -> Vec<String>,
        frontend_args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Self> {
        let own: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let roles = (0..decode).map(|i| (false, i));
        let workers = roles
            .chain((0..prefill).map(|i| (true, i)))
            .map(|(is_prefill, i)| {
                let role = if is_prefill { "prefill" } else { "decode" };
                let mut args = vec![format!("--is-{role}-worker")];
                args.extend(worker_args(is_prefill, i));
                let mut env = vec![("OTEL_SERVICE_NAME".into(), format!("dynamo-worker-{role}"))];
                env.extend(own.iter().cloned());
                (format!("{role}{i}"), args, env)
            });
        let mut frontend_env = vec![("OTEL_SERVICE_NAME", "dynamo-frontend")];
        frontend_env.extend_from_slice(env);
        let c = Self::spawn(workers.collect(), frontend_args, &frontend_env).await?;
        c.wait_workers(decode, timeout).await?;
        c.wait_gauge("dynamo_frontend_model_prefill_workers", prefill, timeout)
            .await?;
        Ok(c)
    }

    /// Waits until the frontend counts `n` workers for the bundled model.
    pub async fn wait_workers(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_gauge("dynamo_frontend_model_workers", n, timeout)
            .await
    }

    /// Waits until the frontend's per-model gauge `name` reads `n` for the bundled model.
    pub async fn wait_gauge(&self, name: &str, n: usize, timeout: Duration) -> Result<()> {
        let url = self.url("/metrics");
        wait_for(timeout, &format!("{name} = {n}"), || {
            let url = url.clone();
            async move {
                let text = scrape(&url).await.ok()?;
                (metric_value(&text, name, &[("model", BUNDLED_MODEL_NAME)]) == Some(n as f64))
                    .then_some(())
            }
        })
        .await
        .map_err(|e| {
            let logs: Vec<String> = self.workers.iter().map(Proc::output).collect();
            e.context(format!(
                "frontend: {}\nworkers: {logs:?}",
                self.frontend.output()
            ))
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// Worker `i`'s metric `name` (the first series matching `labels`; 0 when absent).
    pub async fn worker_metric(
        &self,
        i: usize,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<f64> {
        let text = scrape(&format!("http://127.0.0.1:{}/metrics", self.systems[i])).await?;
        Ok(metric_value(&text, name, labels).unwrap_or(0.0))
    }

    /// Generate requests worker `i` has served so far.
    pub async fn served(&self, i: usize) -> Result<f64> {
        let text = scrape(&format!("http://127.0.0.1:{}/metrics", self.systems[i])).await?;
        Ok(metric_value(
            &text,
            "dynamo_component_requests_total",
            &[("dynamo_endpoint", "generate")],
        )
        .unwrap_or(0.0))
    }

    /// Generate requests served by every worker, by position.
    pub async fn served_all(&self) -> Result<Vec<f64>> {
        let mut v = Vec::new();
        for i in 0..self.workers.len() {
            v.push(self.served(i).await?);
        }
        Ok(v)
    }

    /// The instance id (`worker_id` label) of worker `i`.
    pub async fn worker_id(&self, i: usize) -> Result<u64> {
        let text = scrape(&format!("http://127.0.0.1:{}/metrics", self.systems[i])).await?;
        text.lines()
            .find_map(|l| {
                let rest = l.split("worker_id=\"").nth(1)?;
                rest.split('"').next()?.parse().ok()
            })
            .context("worker_id label on the worker's metrics")
    }
}

/// JSONL lines of a process's output whose `x_request_id` is `xid`.
pub fn log_lines(output: &str, xid: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["x_request_id"] == xid)
        .collect()
}

/// The name the bundled model is served under.
pub const BUNDLED_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_label_subsets() {
        let text = "# HELP x\nfoo_total{a=\"1\",b=\"2\"} 3\nfoo_total{a=\"9\",b=\"2\"} 4\nbar 5\n";
        assert_eq!(
            metric_value(text, "foo_total", &[("b", "2"), ("a", "9")]),
            Some(4.0)
        );
        assert_eq!(metric_value(text, "foo_total", &[("a", "7")]), None);
        assert_eq!(metric_value(text, "bar", &[]), Some(5.0));
    }
}
