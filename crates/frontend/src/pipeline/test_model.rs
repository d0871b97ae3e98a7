//! The bundled model's preprocessor for unit tests (needs `scripts/fetch-model.sh`, which
//! `scripts/test.sh` runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::OnceLock;
use tandem_model::ModelFiles;
use tandem_preprocessor::Preprocessor;

pub const CONTEXT: u32 = 8192;

pub fn preprocessor() -> &'static Preprocessor {
    static PRE: OnceLock<Preprocessor> = OnceLock::new();
    PRE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let m =
            ModelFiles::load(&path).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"));
        Preprocessor::from_json(&m.tokenizer_json().unwrap(), m.prompt.clone()).unwrap()
    })
}
