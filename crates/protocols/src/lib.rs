//! Data that crosses a process boundary.
//!
//! - [`openai`]: what clients send to and get from the frontend.
//! - [`llm`]: what the frontend sends a worker after preprocessing (token ids, sampling and
//!   stop settings) and the token deltas the worker streams back — Dynamo's
//!   `PreprocessedRequest` / `LLMEngineOutput` in spirit.
//! - [`card`]: the model card a worker registers in etcd and the frontend watches.

pub mod card;
pub mod llm;
pub mod openai;
