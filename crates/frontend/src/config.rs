//! The frontend's flags (Dynamo's names and environment variables), checked when parsed: an
//! unknown `--router-mode` or a bad port stops the frontend at start-up, naming the flag.

use crate::admission::AdmissionConfig;
use crate::http::auth::ApiKey;
use crate::models::Routing;
use crate::pipeline::balance::{LoadPolicy, Sessions};
use crate::pipeline::migrate::Inhibited;
use std::sync::Arc;
use tandem_kv_router::KvRouterArgs;
use tandem_runtime::RouterMode;

/// `--router-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterModeArg {
    #[value(alias = "round_robin")]
    RoundRobin,
    Random,
    /// To the worker with the most of the prompt cached, weighed against its load.
    Kv,
    /// The less loaded of two workers drawn at random (requests in flight).
    PowerOfTwo,
    /// The worker with the fewest requests in flight.
    LeastLoaded,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FrontendArgs {
    #[arg(
        help_heading = "HTTP",
        long = "http-host",
        env = "DYN_HTTP_HOST",
        default_value = "0.0.0.0"
    )]
    pub http_host: String,
    #[arg(
        help_heading = "HTTP",
        long = "http-port",
        env = "DYN_HTTP_PORT",
        default_value_t = 8000
    )]
    pub http_port: u16,
    /// How requests are spread over workers.
    #[arg(
        help_heading = "Routing",
        long = "router-mode",
        env = "DYN_ROUTER_MODE",
        value_enum,
        default_value = "round-robin"
    )]
    pub router_mode: RouterModeArg,
    #[command(flatten, next_help_heading = "KV router (--router-mode kv)")]
    pub kv_router: KvRouterArgs,
    /// With prefill workers registered, a request whose prefill leg fails (or that finds no
    /// prefill worker) gets 503 instead of being prefilled on its decode worker.
    #[arg(
        help_heading = "Disaggregation",
        long = "enforce-disagg",
        env = "DYN_ENFORCE_DISAGG"
    )]
    pub enforce_disagg: bool,
    /// Conditional disaggregation: a prompt whose uncached part (prompt minus the blocks the
    /// KV router finds on the best prefill worker) has at most this many tokens is prefilled
    /// on its decode worker. 0 (default): every prompt goes to a prefill worker.
    #[arg(
        help_heading = "Disaggregation",
        long = "max-local-prefill-length",
        env = "DYN_MAX_LOCAL_PREFILL_LENGTH",
        default_value_t = 0
    )]
    pub max_local_prefill_length: u32,
    /// How many times a choice may move to another worker when its worker fails (before or
    /// during its stream). Unset: each model's value from its workers' cards (their own
    /// `--migration-limit`, default 0 = off).
    #[arg(
        help_heading = "Migration, admission and deadlines",
        long = "migration-limit",
        env = "DYN_MIGRATION_LIMIT"
    )]
    pub migration_limit: Option<u32>,
    /// Seconds a worker that failed a request is left out of routing (0: never).
    #[arg(help_heading = "Routing", 
        long = "inhibited-duration-secs",
        env = "DYN_RUNTIME_INHIBITED_DURATION_SECS",
        default_value_t = 5.0,
        value_parser = non_negative_secs
    )]
    pub inhibited_duration_secs: f64,
    /// Seconds a session (`X-Dynamo-Session-ID` header) stays bound to the worker its last
    /// request went to; its requests go there while that worker serves the model. 0: off.
    #[arg(help_heading = "Routing", 
        long = "router-session-affinity-ttl-secs",
        env = "DYN_ROUTER_SESSION_AFFINITY_TTL_SECS",
        default_value_t = 300.0,
        value_parser = non_negative_secs
    )]
    pub session_affinity_ttl_secs: f64,
    /// Seconds a generation request may take, from its arrival to its last token; past it the
    /// client gets 504 and the worker stops the request (its blocks are freed). Unset: none.
    #[arg(help_heading = "Migration, admission and deadlines", 
        long = "request-timeout-secs",
        env = "DYN_REQUEST_TIMEOUT_SECS",
        value_parser = positive_secs
    )]
    pub request_timeout_secs: Option<f64>,
    /// Generation requests running at once; beyond it they queue (`--queue-size`). Unset: no
    /// limit.
    #[arg(help_heading = "Migration, admission and deadlines", 
        long = "max-concurrent-requests",
        env = "DYN_MAX_CONCURRENT_REQUESTS",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_concurrent_requests: Option<u32>,
    /// Requests that may wait for a turn under `--max-concurrent-requests`; more get 503.
    #[arg(
        help_heading = "Migration, admission and deadlines",
        long = "queue-size",
        env = "DYN_QUEUE_SIZE",
        default_value_t = 100
    )]
    pub queue_size: u32,
    /// Seconds a queued request waits for its turn before it gets 503.
    #[arg(help_heading = "Migration, admission and deadlines", 
        long = "queue-timeout-secs",
        env = "DYN_QUEUE_TIMEOUT_SECS",
        default_value_t = 60.0,
        value_parser = non_negative_secs
    )]
    pub queue_timeout_secs: f64,
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    #[arg(help_heading = "HTTP", long = "api-key", env = "DYN_API_KEY")]
    pub api_key: Option<ApiKey>,
    /// With `--api-key`, require it on `/metrics` too.
    #[arg(
        help_heading = "HTTP",
        long = "protect-metrics",
        env = "DYN_PROTECT_METRICS",
        requires = "api_key"
    )]
    pub protect_metrics: bool,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "expected seconds above 0, at most 86400, got {s:?}"
        )),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("expected seconds between 0 and 86400, got {s:?}")),
    }
}

/// What the execution of every request shares.
#[derive(Clone)]
pub struct ExecPolicy {
    pub disagg: DisaggConfig,
    /// `--migration-limit`, when given.
    pub migration_limit: Option<u32>,
    /// `--request-timeout-secs`.
    pub request_timeout: Option<std::time::Duration>,
    /// How long a request may wait while every worker is over `--busy-threshold`
    /// (`--queue-timeout-secs`).
    pub busy_wait: std::time::Duration,
    /// Workers that failed recently.
    pub avoid: Arc<Inhibited>,
    /// Where each `X-Dynamo-Session-ID` goes (`--router-session-affinity-ttl-secs` > 0).
    pub sessions: Option<Arc<Sessions>>,
}

impl ExecPolicy {
    /// The migration limit for a model whose cards say `card_limit`.
    pub fn migration_limit(&self, card_limit: u32) -> u32 {
        self.migration_limit.unwrap_or(card_limit)
    }
}

impl Default for ExecPolicy {
    fn default() -> Self {
        Self {
            disagg: DisaggConfig::default(),
            migration_limit: None,
            request_timeout: None,
            busy_wait: std::time::Duration::ZERO,
            avoid: Arc::new(Inhibited::new(std::time::Duration::ZERO)),
            sessions: None,
        }
    }
}

/// How requests use prefill workers when a model has them.
#[derive(Debug, Clone, Copy, Default)]
pub struct DisaggConfig {
    pub enforce: bool,
    pub max_local_prefill_length: u32,
}

impl FrontendArgs {
    pub fn admission(&self) -> AdmissionConfig {
        AdmissionConfig {
            max_concurrent: self.max_concurrent_requests.map(|n| n as usize),
            queue_size: self.queue_size as usize,
            queue_timeout: std::time::Duration::from_secs_f64(self.queue_timeout_secs),
        }
    }

    /// How requests are executed: disaggregation, migration, and the (empty) set of failed
    /// workers they share.
    pub fn exec_policy(&self) -> ExecPolicy {
        ExecPolicy {
            disagg: self.disagg(),
            migration_limit: self.migration_limit,
            request_timeout: self
                .request_timeout_secs
                .map(std::time::Duration::from_secs_f64),
            busy_wait: std::time::Duration::from_secs_f64(self.queue_timeout_secs),
            avoid: Arc::new(Inhibited::new(std::time::Duration::from_secs_f64(
                self.inhibited_duration_secs,
            ))),
            sessions: (self.session_affinity_ttl_secs > 0.0).then(|| {
                Arc::new(Sessions::new(std::time::Duration::from_secs_f64(
                    self.session_affinity_ttl_secs,
                )))
            }),
        }
    }

    pub fn disagg(&self) -> DisaggConfig {
        DisaggConfig {
            enforce: self.enforce_disagg,
            max_local_prefill_length: self.max_local_prefill_length,
        }
    }

    pub fn routing(&self) -> Routing {
        match self.router_mode {
            RouterModeArg::RoundRobin => Routing::Basic(RouterMode::RoundRobin),
            RouterModeArg::Random => Routing::Basic(RouterMode::Random),
            RouterModeArg::Kv => Routing::Kv(Arc::new(self.kv_router.clone())),
            RouterModeArg::PowerOfTwo => Routing::Load(LoadPolicy::PowerOfTwo),
            RouterModeArg::LeastLoaded => Routing::Load(LoadPolicy::LeastLoaded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        f: FrontendArgs,
    }

    #[test]
    fn router_modes_and_bad_values() {
        let kv = Cli::try_parse_from(["x", "--router-mode", "kv"]).unwrap();
        assert!(matches!(kv.f.routing(), Routing::Kv(_)));
        let rr = Cli::try_parse_from(["x"]).unwrap();
        assert!(matches!(
            rr.f.routing(),
            Routing::Basic(RouterMode::RoundRobin)
        ));
        for (flag, value) in [
            ("--router-mode", "kv-ish"),
            ("--http-port", "70000"),
            ("--kv-cache-block-size", "0"),
            ("--router-temperature", "-1"),
            ("--busy-threshold", "1.5"),
            ("--kv-overlap-score-weight", "nan"),
            ("--router-ttl-secs", "-5"),
            ("--migration-limit", "-1"),
            ("--inhibited-duration-secs", "-1"),
            ("--max-concurrent-requests", "0"),
            ("--queue-timeout-secs", "inf"),
            ("--api-key", " "),
            ("--request-timeout-secs", "0"),
        ] {
            let arg = format!("{flag}={value}");
            let err = Cli::try_parse_from(["x", arg.as_str()])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(flag), "{flag}={value}: {err}");
        }
    }
}
