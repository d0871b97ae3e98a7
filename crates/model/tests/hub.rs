#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Hub downloads through `hf-hub` against a local HTTP server that answers the way the Hub does
//! (no network here): the repo-info API (`/api/models/{repo}/revision/{rev}` → commit and file
//! list) and `resolve` with byte ranges, `ETag` and `X-Repo-Commit`. Needs the bundled model
//! (scripts/fetch-model.sh) for a real tokenizer and chat template.

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_model::ModelFiles;
use tandem_model::hub::Hub;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Served {
    root: PathBuf,
    hits: AtomicUsize,
}

impl Served {
    fn check(
        &self,
        headers: &HeaderMap,
        org: &str,
        name: &str,
        rev: &str,
    ) -> Result<(), StatusCode> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer secret") {
            return Err(StatusCode::UNAUTHORIZED);
        }
        if org != "test-org" || name != "smol" || (rev != "main" && rev != COMMIT) {
            return Err(StatusCode::NOT_FOUND);
        }
        Ok(())
    }
}

async fn info(
    State(s): State<Arc<Served>>,
    headers: HeaderMap,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
) -> Result<Response, StatusCode> {
    s.check(&headers, &org, &name, &rev)?;
    let siblings: Vec<_> = std::fs::read_dir(&s.root)
        .unwrap()
        .map(|e| json!({"rfilename": e.unwrap().file_name().to_string_lossy()}))
        .collect();
    Ok(axum::Json(json!({"sha": COMMIT, "siblings": siblings})).into_response())
}

async fn resolve(
    State(s): State<Arc<Served>>,
    headers: HeaderMap,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
) -> Result<Response, StatusCode> {
    s.check(&headers, &org, &name, &rev)?;
    let body = std::fs::read(s.root.join(&file)).map_err(|_| StatusCode::NOT_FOUND)?;
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    let last = body.len() - 1;
    let (from, to) = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
        .map(|(a, b)| {
            (
                a.parse::<usize>().unwrap(),
                b.parse::<usize>().unwrap().min(last),
            )
        })
        .unwrap_or((0, last));
    Ok((
        StatusCode::PARTIAL_CONTENT,
        [
            (
                header::CONTENT_RANGE,
                format!("bytes {from}-{to}/{}", body.len()),
            ),
            (header::ETAG, format!("\"{:016x}\"", h.finish())),
            (
                header::HeaderName::from_static("x-repo-commit"),
                COMMIT.to_string(),
            ),
        ],
        body[from..=to].to_vec(),
    )
        .into_response())
}

/// Log lines written while the test runs, as the worker's log would hold them.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn downloads_into_the_cache_with_progress_lines_then_works_offline() {
    let log = Log::default();
    let writer = log.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = ModelFiles::load(&gguf).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"));
    let repo = tempfile::tempdir().unwrap();
    let write = |name: &str, data: &[u8]| std::fs::write(repo.path().join(name), data).unwrap();
    write("tokenizer.json", g.tokenizer_json().unwrap().as_bytes());
    write(
        "tokenizer_config.json",
        json!({"chat_template": g.prompt.chat_template, "eos_token": "<|im_end|>"})
            .to_string()
            .as_bytes(),
    );
    write(
        "config.json",
        json!({"max_position_embeddings": 8192, "eos_token_id": 2})
            .to_string()
            .as_bytes(),
    );
    write(
        "model.safetensors.index.json",
        json!({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}).to_string().as_bytes(),
    );
    // Big enough to arrive in many pieces, so progress is reported while it downloads.
    let big: Vec<u8> = (0..4 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    write("model-00001-of-00002.safetensors", &big);
    write("model-00002-of-00002.safetensors", b"shard two");
    write("README.md", b"not part of a model");

    let served = Arc::new(Served {
        root: repo.path().to_path_buf(),
        hits: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(info))
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let cache = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let mut hub = Hub::new(
        endpoint.clone(),
        Some("secret".into()),
        cache.path().to_path_buf(),
        false,
    )
    .unwrap();
    hub.log_every = Duration::ZERO;
    let dir = hub.fetch("test-org/smol", "main").await.unwrap();
    let repo_dir = cache.path().join("models--test-org--smol");
    assert_eq!(dir, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(
        std::fs::read(dir.join("model-00001-of-00002.safetensors")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        b"shard two"
    );
    assert!(
        !dir.join("generation_config.json").exists() && !dir.join("README.md").exists(),
        "only the files a model needs, and only those the repo has"
    );
    let m = ModelFiles::load(&dir).unwrap();
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.prompt.eos_token_ids, vec![2]);

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    for file in [
        "config.json",
        "tokenizer.json",
        "model-00001-of-00002.safetensors",
    ] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("file={file}")))
            .collect();
        assert!(
            lines
                .first()
                .is_some_and(|l| l.contains("downloading from the Hub") && l.contains("bytes=")),
            "a line when {file} starts:\n{text}"
        );
        assert!(
            lines
                .last()
                .is_some_and(|l| l.contains("downloaded from the Hub") && l.contains("MiB/s")),
            "a line when {file} is done:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("file=model-00001-of-00002.safetensors")
                && l.contains("%")
                && !l.contains("downloading from the Hub: 0%")),
        "progress while the big shard downloads:\n{text}"
    );

    // A second start with everything cached asks the Hub only which commit `main` is.
    let before = served.hits.load(Ordering::SeqCst);
    assert_eq!(hub.fetch("test-org/smol", "main").await.unwrap(), dir);
    assert_eq!(served.hits.load(Ordering::SeqCst), before + 1);

    // Without the token the Hub refuses, and the error says so.
    let anon = Hub::new(
        endpoint.clone(),
        None,
        tempfile::tempdir().unwrap().path().to_path_buf(),
        false,
    )
    .unwrap();
    let err = anon.fetch("test-org/smol", "main").await.unwrap_err();
    assert!(
        err.to_string().contains("HTTP 401") && err.to_string().contains("HF_TOKEN"),
        "{err}"
    );
    let hub_404 = Hub::new(
        endpoint,
        Some("secret".into()),
        cache.path().to_path_buf(),
        false,
    )
    .unwrap();
    let err = hub_404.fetch("test-org/other", "main").await.unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");

    // Offline, from the cache only: no request reaches the server.
    server.abort();
    let before = served.hits.load(Ordering::SeqCst);
    let offline = Hub::new(
        "http://127.0.0.1:9".into(),
        None,
        cache.path().to_path_buf(),
        true,
    )
    .unwrap();
    assert_eq!(offline.fetch("test-org/smol", "main").await.unwrap(), dir);
    assert_eq!(served.hits.load(Ordering::SeqCst), before);
    let missing = offline.fetch("test-org/other", "main").await.unwrap_err();
    assert!(missing.to_string().contains("HF_HUB_OFFLINE"), "{missing}");
}
