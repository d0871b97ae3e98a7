//! The frontend's flags (Dynamo's names and environment variables), checked when parsed: an
//! unknown `--router-mode` or a bad port stops the frontend at start-up, naming the flag.

use crate::models::Routing;
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
}

#[derive(clap::Args, Debug, Clone)]
pub struct FrontendArgs {
    #[arg(long = "http-host", env = "DYN_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    #[arg(long = "http-port", env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// How requests are spread over workers.
    #[arg(
        long = "router-mode",
        env = "DYN_ROUTER_MODE",
        value_enum,
        default_value = "round-robin"
    )]
    pub router_mode: RouterModeArg,
    #[command(flatten)]
    pub kv_router: KvRouterArgs,
    /// With prefill workers registered, a request whose prefill leg fails (or that finds no
    /// prefill worker) gets 503 instead of being prefilled on its decode worker.
    #[arg(long = "enforce-disagg", env = "DYN_ENFORCE_DISAGG")]
    pub enforce_disagg: bool,
    /// Conditional disaggregation: a prompt whose uncached part (prompt minus the blocks the
    /// KV router finds on the best prefill worker) has at most this many tokens is prefilled
    /// on its decode worker. 0 (default): every prompt goes to a prefill worker.
    #[arg(
        long = "max-local-prefill-length",
        env = "DYN_MAX_LOCAL_PREFILL_LENGTH",
        default_value_t = 0
    )]
    pub max_local_prefill_length: u32,
}

/// How requests use prefill workers when a model has them.
#[derive(Debug, Clone, Copy, Default)]
pub struct DisaggConfig {
    pub enforce: bool,
    pub max_local_prefill_length: u32,
}

impl FrontendArgs {
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
