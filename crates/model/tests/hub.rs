#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Hub downloads against a local HTTP server that serves a model directory the way the Hub's
//! `resolve` API does (no network here). Needs the bundled model (scripts/fetch-model.sh).

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tandem_model::ModelFiles;
use tandem_model::hub::Hub;

struct Served {
    root: PathBuf,
    hits: AtomicUsize,
}

async fn resolve(
    State(s): State<Arc<Served>>,
    headers: HeaderMap,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
) -> Result<Vec<u8>, StatusCode> {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer secret") {
        return Err(StatusCode::UNAUTHORIZED);
    }
    if org != "test-org" || name != "smol" || rev != "main" {
        return Err(StatusCode::NOT_FOUND);
    }
    std::fs::read(s.root.join(file)).map_err(|_| StatusCode::NOT_FOUND)
}

#[tokio::test]
async fn downloads_into_the_cache_then_works_offline() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = ModelFiles::load(&gguf).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"));
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("tokenizer.json"),
        g.tokenizer_json().unwrap(),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("tokenizer_config.json"),
        json!({"chat_template": g.prompt.chat_template, "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("config.json"),
        json!({"max_position_embeddings": 8192, "eos_token_id": 2}).to_string(),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("model.safetensors.index.json"),
        json!({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("model-00001-of-00002.safetensors"),
        b"shard one",
    )
    .unwrap();
    std::fs::write(
        repo.path().join("model-00002-of-00002.safetensors"),
        b"shard two",
    )
    .unwrap();

    let served = Arc::new(Served {
        root: repo.path().to_path_buf(),
        hits: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let cache = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let hub = Hub::new(
        endpoint.clone(),
        Some("secret".into()),
        cache.path().to_path_buf(),
        false,
    );
    let dir = hub.fetch("test-org/smol", "main").await.unwrap();
    assert_eq!(
        dir,
        cache.path().join("models--test-org--smol/snapshots/main")
    );
    assert_eq!(
        std::fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        b"shard two"
    );
    assert!(
        !dir.join("generation_config.json").exists(),
        "optional files the Hub lacks are skipped"
    );
    let m = ModelFiles::load(&dir).unwrap();
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.prompt.eos_token_ids, vec![2]);

    // Without the token the Hub refuses, and the error says so.
    let anon = Hub::new(
        endpoint,
        None,
        tempfile::tempdir().unwrap().path().to_path_buf(),
        false,
    );
    let err = anon.fetch("test-org/smol", "main").await.unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err}");

    // Offline, from the cache only: no request reaches the server.
    server.abort();
    let before = served.hits.load(Ordering::SeqCst);
    let offline = Hub::new(
        "http://127.0.0.1:9".into(),
        None,
        cache.path().to_path_buf(),
        true,
    );
    assert_eq!(offline.fetch("test-org/smol", "main").await.unwrap(), dir);
    assert_eq!(served.hits.load(Ordering::SeqCst), before);
    let missing = offline.fetch("test-org/other", "main").await.unwrap_err();
    assert!(missing.to_string().contains("HF_HUB_OFFLINE"), "{missing}");
}
