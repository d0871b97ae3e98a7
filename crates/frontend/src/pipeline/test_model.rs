//! The bundled model's preprocessor for unit tests (needs `scripts/fetch-model.sh`, which
//! `scripts/test.sh` runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::OnceLock;
use tandem_model::ModelFiles;
use tandem_preprocessor::Preprocessor;

pub const CONTEXT: u32 = 8192;

/// The bundled model's grammar compiler.
pub fn guides() -> &'static tandem_structured::Guides {
    static G: OnceLock<tandem_structured::Guides> = OnceLock::new();
    G.get_or_init(|| {
        let pre = preprocessor();
        tandem_structured::Guides::new(pre.tokenizer().clone(), pre.eos_token_ids().to_vec())
    })
}

/// A view of the bundled model, as `prepare` sees it.
pub fn view() -> crate::pipeline::prepare::ModelView<'static> {
    crate::pipeline::prepare::ModelView {
        name: "m",
        preprocessor: preprocessor(),
        context_length: CONTEXT,
        guides: guides(),
        tool_parser: None,
    }
}

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
