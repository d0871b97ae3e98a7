//! Fetching a model from the Hugging Face Hub by id (`org/name`), for users who are online.
//!
//! Uses the Hub's plain HTTP API — `GET {endpoint}/{repo}/resolve/{revision}/{file}` with an
//! optional bearer token — and keeps files in the Hub cache layout under
//! `{cache}/models--{org}--{name}/snapshots/{revision}/`, so a second start needs no network.
//! Environment, as `huggingface_hub` reads it: `HF_ENDPOINT` (default https://huggingface.co),
//! `HF_TOKEN`, `HF_HUB_CACHE` / `HF_HOME` (default `~/.cache/huggingface/hub`),
//! `HF_HUB_OFFLINE=1` (cache only). Weights come as `model.safetensors` or as the shards listed
//! in `model.safetensors.index.json`.

use futures::StreamExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0:?} is not a Hub model id (expected org/name)")]
    BadId(String),
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file} is not in the cache and HF_HUB_OFFLINE is set")]
    Offline { file: String },
    #[error("invalid model.safetensors.index.json: {0}")]
    Index(String),
}

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    pub cache: PathBuf,
    pub offline: bool,
    http: reqwest::Client,
}

/// True when `s` looks like a Hub id rather than a local path.
pub fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && !a.starts_with('.') && !s.ends_with(".gguf"))
}

impl Hub {
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        Self::new(
            env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")),
            cache,
            env("HF_HUB_OFFLINE").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        )
    }

    pub fn new(endpoint: String, token: Option<String>, cache: PathBuf, offline: bool) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache,
            offline,
            http: reqwest::Client::new(),
        }
    }

    /// Directory holding the model's files, downloading what the cache lacks.
    pub async fn fetch(&self, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
        if !is_hub_id(repo) {
            return Err(HubError::BadId(repo.to_string()));
        }
        let dir = self
            .cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(revision);
        for f in REQUIRED {
            self.file(repo, revision, &dir, f, true).await?;
        }
        for f in OPTIONAL {
            self.file(repo, revision, &dir, f, false).await?;
        }
        if !self
            .file(repo, revision, &dir, "model.safetensors", false)
            .await?
            && self
                .file(repo, revision, &dir, "model.safetensors.index.json", false)
                .await?
        {
            for shard in shards(&dir.join("model.safetensors.index.json"))? {
                self.file(repo, revision, &dir, &shard, true).await?;
            }
        }
        Ok(dir)
    }

    /// Ensures `dir/name` exists; false when the Hub has no such (optional) file.
    async fn file(
        &self,
        repo: &str,
        rev: &str,
        dir: &Path,
        name: &str,
        required: bool,
    ) -> Result<bool, HubError> {
        let dest = dir.join(name);
        if dest.exists() {
            return Ok(true);
        }
        if self.offline {
            return if required {
                Err(HubError::Offline {
                    file: name.to_string(),
                })
            } else {
                Ok(false)
            };
        }
        let url = format!("{}/{repo}/resolve/{rev}/{name}", self.endpoint);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let net = |e: reqwest::Error| HubError::Network {
            url: url.clone(),
            reason: e.to_string(),
        };
        let resp = req.send().await.map_err(net)?;
        let status = resp.status().as_u16();
        if status == 404 && !required {
            return Ok(false);
        }
        if !resp.status().is_success() {
            return Err(HubError::Http { url, status });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HubError::Io { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        let part = dir.join(format!("{name}.part"));
        let mut out = tokio::fs::File::create(&part).await.map_err(io(&part))?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            out.write_all(&chunk.map_err(net)?)
                .await
                .map_err(io(&part))?;
        }
        out.flush().await.map_err(io(&part))?;
        tokio::fs::rename(&part, &dest).await.map_err(io(&dest))?;
        tracing::info!(%url, "downloaded");
        Ok(true)
    }
}

fn shards(index: &Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|source| HubError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| HubError::Index(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HubError::Index("no weight_map".into()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        return Err(HubError::Index(
            "shard names must be plain file names".into(),
        ));
    }
    Ok(files)
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
