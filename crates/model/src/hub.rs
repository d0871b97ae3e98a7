//! Fetching a model from the Hugging Face Hub by id (`org/name`), through the `hf-hub` crate.
//!
//! [`Hub::fetch`] resolves the revision to a commit with the Hub's repo-info API, downloads the
//! files a model needs (config, tokenizer, chat template, weights as `model.safetensors` or the
//! shards listed in `model.safetensors.index.json`) at that commit, and returns the snapshot
//! directory `{cache}/models--{org}--{name}/snapshots/{commit}/` — `huggingface_hub`'s cache
//! layout, so a cache filled by Python serves tandem and the other way round. Files already in
//! the cache are not fetched again.
//!
//! Environment, as `huggingface_hub` reads it: `HF_ENDPOINT` (default https://huggingface.co),
//! `HF_TOKEN` (else the token file `huggingface-cli login` wrote), `HF_HUB_CACHE` / `HF_HOME`
//! (default `~/.cache/huggingface/hub`), `HF_HUB_OFFLINE=1` (cache only; `hf-hub` itself does not
//! read it, so this module answers from the cache without building a request).
//!
//! Progress: on a terminal, `hf-hub`'s progress bar; otherwise (a service's log) a line when a
//! file starts, one every [`Hub::log_every`] while it downloads, and one when it is done.

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError, Progress};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0:?} is not a Hub model id (expected org/name)")]
    BadId(String),
    #[error("{what}: HTTP {status}{hint}")]
    Http {
        what: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: ApiError,
    },
    #[error("{repo} at {revision} has no {file}")]
    Missing {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("{file} of {repo} is not in the cache {cache} and HF_HUB_OFFLINE is set")]
    Offline {
        repo: String,
        file: String,
        cache: PathBuf,
    },
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// True when `s` looks like a Hub id rather than a local path.
pub fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && !a.starts_with('.') && !s.ends_with(".gguf"))
}

pub struct Hub {
    api: Api,
    cache: Cache,
    offline: bool,
    bar: bool,
    /// How often a download off a terminal logs its progress.
    pub log_every: Duration,
}

impl Hub {
    /// Settings from the environment, as `huggingface_hub` reads them.
    pub fn from_env() -> Result<Self, HubError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        // hf-hub's own reading: HF_HOME or ~/.cache/huggingface, and the token file there.
        let default = Cache::from_env();
        let cache = match (env("HF_HUB_CACHE"), env("HF_HOME")) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(h)) => PathBuf::from(h).join("hub"),
            (None, None) => default.path().clone(),
        };
        let token = env("HF_TOKEN")
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| default.token());
        Self::new(
            env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            cache,
            env("HF_HUB_OFFLINE").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        )
    }

    pub fn new(
        endpoint: String,
        token: Option<String>,
        cache: PathBuf,
        offline: bool,
    ) -> Result<Self, HubError> {
        let bar = std::io::stderr().is_terminal();
        let api = ApiBuilder::from_cache(Cache::new(cache.clone()))
            .with_endpoint(endpoint.trim_end_matches('/').to_string())
            .with_token(token)
            .with_progress(bar)
            .with_user_agent("tandem", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|source| HubError::Api {
                what: "Hub client".into(),
                source,
            })?;
        Ok(Self {
            api,
            cache: Cache::new(cache),
            offline,
            bar,
            log_every: Duration::from_secs(5),
        })
    }

    /// Directory holding the model's files at `revision`, downloading what the cache lacks.
    pub async fn fetch(&self, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
        if !is_hub_id(repo) {
            return Err(HubError::BadId(repo.to_string()));
        }
        let at = Repo::with_revision(repo.into(), RepoType::Model, revision.into());
        if self.offline {
            return self.cached_snapshot(&at);
        }
        let info = self
            .api
            .repo(at.clone())
            .info()
            .await
            .map_err(|e| http_error(format!("{repo} at {revision}: repo info"), e))?;
        let listed: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let pinned = Repo::with_revision(repo.into(), RepoType::Model, info.sha.clone());
        let mut dir = None;
        for file in REQUIRED {
            if !listed.contains(file) {
                return Err(missing(&at, file));
            }
            dir = self
                .file(&pinned, file)
                .await?
                .parent()
                .map(Path::to_path_buf);
        }
        for file in OPTIONAL.into_iter().filter(|f| listed.contains(f)) {
            self.file(&pinned, file).await?;
        }
        if listed.contains(SINGLE_WEIGHTS) {
            self.file(&pinned, SINGLE_WEIGHTS).await?;
        } else if listed.contains(WEIGHTS_INDEX) {
            let index = self.file(&pinned, WEIGHTS_INDEX).await?;
            for shard in shards(&index)? {
                if !listed.contains(shard.as_str()) {
                    return Err(missing(&at, &shard));
                }
                self.file(&pinned, &shard).await?;
            }
        }
        // The next offline start finds this commit through refs/{revision}.
        let refs = self.cache.repo(at);
        refs.create_ref(&info.sha).map_err(|source| HubError::Io {
            path: self.cache.path().clone(),
            source,
        })?;
        dir.ok_or_else(|| missing(&pinned, REQUIRED[0]))
    }

    /// The snapshot `refs/{revision}` points at, when it holds every file the model needs.
    fn cached_snapshot(&self, at: &Repo) -> Result<PathBuf, HubError> {
        let cached = self.cache.repo(at.clone());
        let need = |file: &str| {
            cached.get(file).ok_or_else(|| HubError::Offline {
                repo: at.url(),
                file: file.to_string(),
                cache: self.cache.path().clone(),
            })
        };
        let config = need(REQUIRED[0])?;
        need(REQUIRED[1])?;
        if cached.get(SINGLE_WEIGHTS).is_none()
            && let Some(index) = cached.get(WEIGHTS_INDEX)
        {
            for shard in shards(&index)? {
                need(&shard)?;
            }
        }
        Ok(config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cache.path().clone()))
    }

    /// One file of the pinned commit: from the cache, else downloaded with progress.
    async fn file(&self, pinned: &Repo, file: &str) -> Result<PathBuf, HubError> {
        if let Some(path) = self.cache.repo(pinned.clone()).get(file) {
            return Ok(path);
        }
        let api = self.api.repo(pinned.clone());
        let got = if self.bar {
            api.download(file).await
        } else {
            api.download_with_progress(file, LogProgress::new(pinned.url(), self.log_every))
                .await
        };
        got.map_err(|e| http_error(format!("{} {file}", pinned.url()), e))
    }
}

fn missing(at: &Repo, file: &str) -> HubError {
    HubError::Missing {
        repo: at.url(),
        revision: at.revision().to_string(),
        file: file.to_string(),
    }
}

/// An HTTP status gets its own variant (and a hint for the ones a token fixes).
fn http_error(what: String, e: ApiError) -> HubError {
    let status = match &e {
        ApiError::RequestError(r) => r.status().map(|s| s.as_u16()),
        _ => None,
    };
    match status {
        Some(status) => HubError::Http {
            what,
            status,
            hint: match status {
                401 | 403 => " (gated or private: set HF_TOKEN)",
                404 => " (no such repo, revision or file)",
                _ => "",
            },
        },
        None => HubError::Api { what, source: e },
    }
}

/// Shard file names from `model.safetensors.index.json`'s `weight_map`, each once.
fn shards(index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: &str| HubError::Index {
        path: index.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = std::fs::read_to_string(index).map_err(|source| HubError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        return Err(bad("shard names must be plain file names"));
    }
    Ok(files)
}

/// Download progress as log lines, for runs whose stderr is a log rather than a terminal.
/// Clones share one state: `hf-hub` hands a clone to each chunk it fetches.
#[derive(Clone)]
struct LogProgress {
    repo: String,
    every: Duration,
    state: Arc<Mutex<Transfer>>,
}

struct Transfer {
    file: String,
    total: usize,
    done: usize,
    started: Instant,
    logged: Instant,
}

impl LogProgress {
    fn new(repo: String, every: Duration) -> Self {
        let now = Instant::now();
        Self {
            repo,
            every,
            state: Arc::new(Mutex::new(Transfer {
                file: String::new(),
                total: 0,
                done: 0,
                started: now,
                logged: now,
            })),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Transfer) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }
}

impl Progress for LogProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        let repo = &self.repo;
        self.with(|t| {
            t.file = filename.to_string();
            t.total = size;
            t.started = Instant::now();
            t.logged = t.started;
            tracing::info!(repo, file = %t.file, bytes = size, "downloading from the Hub");
        });
    }

    async fn update(&mut self, size: usize) {
        let (repo, every) = (&self.repo, self.every);
        self.with(|t| {
            t.done += size;
            // hf-hub reports a resumed download's start as one update; zero is not news.
            if size > 0 && t.logged.elapsed() >= every && t.done < t.total {
                t.logged = Instant::now();
                let percent = 100.0 * t.done as f64 / t.total.max(1) as f64;
                tracing::info!(
                    repo,
                    file = %t.file,
                    bytes = t.done,
                    of = t.total,
                    "downloading from the Hub: {percent:.0}%"
                );
            }
        });
    }

    async fn finish(&mut self) {
        let repo = &self.repo;
        self.with(|t| {
            let secs = t.started.elapsed().as_secs_f64();
            let mib_s = t.total as f64 / 1048576.0 / secs.max(1e-3);
            tracing::info!(
                repo,
                file = %t.file,
                bytes = t.total,
                secs = format!("{secs:.1}"),
                "downloaded from the Hub ({mib_s:.1} MiB/s)"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hub_ids_versus_paths() {
        assert!(super::is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!super::is_hub_id("models/x.gguf"));
        assert!(!super::is_hub_id("./a/b/c"));
        assert!(!super::is_hub_id("model.gguf"));
    }
}
