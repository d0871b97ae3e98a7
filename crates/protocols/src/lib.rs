//! Data that crosses a process boundary.
//!
//! - [`openai`]: what clients send to and get from the frontend.
//! - [`llm`]: what the frontend sends a worker after preprocessing (token ids, sampling and
//!   stop settings) and the token deltas the worker streams back — Dynamo's
//!   `PreprocessedRequest` / `LLMEngineOutput` in spirit.
//! - [`disagg`]: the prefill leg's transfer parameters and the KV data plane's messages.
//! - [`card`]: the model card a worker registers in etcd and the frontend watches.
//! - [`kv_events`]: KV block events as Dynamo's router reads them (JSON over NATS) and as
//!   vLLM publishes them (msgpack over ZMQ).

pub mod card;
pub mod disagg;
pub mod kv_events;
pub mod llm;
pub mod openai;
