//! Model files: where a model's tokenizer, chat template and limits come from.
//!
//! [`ModelFiles::load`] takes either a GGUF file or an HF-style directory (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, optionally `generation_config.json`) and yields
//! one [`ModelFiles`]: a `tokenizers` tokenizer, the prompt format for the model card, the
//! context length. A GGUF file carries its tokenizer as `tokenizer.ggml.*` metadata; [`gguf`]
//! rebuilds the equivalent byte-level BPE tokenizer from it.

pub mod gguf;
pub mod hf;
pub mod hub;

use std::path::{Path, PathBuf};
use tandem_protocols::card::PromptFormat;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ModelError {
    pub(crate) fn invalid(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// Where the weights live, as the engine needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

pub struct ModelFiles {
    /// A default served name: the file stem or directory name.
    pub name: String,
    pub architecture: String,
    pub context_length: u32,
    pub tokenizer: Tokenizer,
    pub prompt: PromptFormat,
    pub weights: WeightsSource,
}

impl ModelFiles {
    /// Loads from a `.gguf` file or an HF-style directory.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            hf::load_dir(path)
        } else {
            gguf::load(path)
        }
    }

    /// The tokenizer as `tokenizer.json` text, for frontends on other machines.
    pub fn tokenizer_json(&self) -> Result<String, ModelError> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| ModelError::Invalid {
                path: PathBuf::from("tokenizer.json"),
                reason: e.to_string(),
            })
    }
}
