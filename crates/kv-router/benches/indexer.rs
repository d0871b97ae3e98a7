//! Radix index throughput: `cargo bench -p tandem-kv-router --bench indexer`.
//! Placeholder replaced below.
fn main() {}
