//! The bundled model's files for unit tests, loaded once (needs `scripts/fetch-model.sh`,
//! which `scripts/test.sh` runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use tandem_model::ModelFiles;

pub fn files() -> &'static ModelFiles {
    static FILES: OnceLock<ModelFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        ModelFiles::load(&path).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"))
    })
}
