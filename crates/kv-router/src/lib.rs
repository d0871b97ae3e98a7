//! KV-aware routing (`frontend --router-mode kv`): send each request to the worker that
//! already holds most of its prefix, without overloading it.
//!
//! Data flow: workers publish block events → [`intake`] (NATS JSON or ZMQ msgpack, with gap
//! detection and resync from the worker's `kv_dump` endpoint) → [`indexer::RadixTree`] (which
//! worker holds which prefix). A request's tokens → block hashes → overlap per worker →
//! [`router::KvRouter::route`] adds the load the router already sent each worker
//! ([`sequences`]) and picks the cheapest; the returned guard keeps the request's load
//! registered until the request ends.

pub mod args;
pub mod indexer;
pub mod intake;
pub mod metrics;
pub mod router;
pub mod sequences;

pub use args::KvRouterArgs;
pub use intake::EventSource;
pub use metrics::RouterMetrics;
pub use router::{Candidate, Decision, KvRouter, KvRouterConfig};
pub use sequences::LoadGuard;
pub use tandem_protocols::kv_events::KV_DUMP_ENDPOINT;
