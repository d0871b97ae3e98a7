//! W3C trace context (`traceparent`, `tracestate`) in and out of request headers.
//!
//! The frontend reads an inbound HTTP `traceparent` into its `http-request` span; the runtime
//! writes the calling span's context into NATS request headers and the worker makes it the
//! parent of `handle_payload`. A malformed or missing `traceparent` is ignored: the span then
//! starts a new trace.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The headers W3C trace context travels in.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The trace headers of a request, looked up once.
struct Found<'a>([Option<&'a str>; 2]);

impl Extractor for Found<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let i = TRACE_HEADERS
            .iter()
            .position(|h| h.eq_ignore_ascii_case(key))?;
        self.0[i]
    }
    fn keys(&self) -> Vec<&str> {
        TRACE_HEADERS.to_vec()
    }
}

struct Pairs<'a>(&'a mut Vec<(String, String)>);

impl Injector for Pairs<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.0.push((key.to_string(), value));
    }
}

/// Makes the remote span described by `get("traceparent")` / `get("tracestate")` the parent of
/// `span`, which must not have been entered yet. Returns the remote parent's span id (16 hex
/// digits) when the header was valid; `None` leaves `span` a root.
pub fn set_remote_parent<'a>(
    span: &tracing::Span,
    get: impl Fn(&str) -> Option<&'a str>,
) -> Option<String> {
    let found = Found(TRACE_HEADERS.map(&get));
    if !found.0[0].is_some_and(well_formed) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&found);
    let remote = cx.span().span_context().clone();
    if !remote.is_valid() {
        return None;
    }
    span.set_parent(cx).ok()?;
    Some(remote.span_id().to_string())
}

/// W3C's `traceparent` shape: `version-traceid-parentid-flags` in lower-case hex of exactly
/// 2, 32, 16 and 2 digits (the SDK's parser alone accepts short ids). Version `ff` is invalid;
/// later versions may append fields.
fn well_formed(tp: &str) -> bool {
    let parts: Vec<&str> = tp.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && (parts[0] != "00" || parts.len() == 4)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// Writes `span`'s context as `traceparent` / `tracestate` into `headers`, replacing any there.
/// Leaves `headers` alone when `span` has no OpenTelemetry context (no subscriber with the
/// OpenTelemetry layer, or the span is disabled), so headers a caller passed along survive.
pub fn inject(span: &tracing::Span, headers: &mut Vec<(String, String)>) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Pairs(headers));
}

/// Set by [`crate::init_with`] when spans are exported over OTLP.
pub(crate) static EXPORTING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported over OTLP at all (one atomic load). Check it before building
/// anything only a trace needs, such as the `Span::current()` that [`is_exported`] takes.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `span` will leave the process: export is on and its trace is sampled. Work done
/// only for a trace (child spans no log line is written in, attributes that repeat what the
/// log lines carry as fields of their own) can be skipped when it is not.
pub fn is_exported(span: &tracing::Span) -> bool {
    exporting() && span.context().span().span_context().is_sampled()
}

/// Whether the span the caller runs in will be exported; one atomic load when export is off.
pub fn current_is_exported() -> bool {
    exporting() && is_exported(&tracing::Span::current())
}

/// `span`'s trace id (32 hex digits), if it has a valid OpenTelemetry context.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn with_otel(f: impl FnOnce()) {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, f);
    }

    #[test]
    fn inbound_traceparent_becomes_the_parent_and_travels_on() {
        with_otel(|| {
            let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("http-request");
            let parent = set_remote_parent(&span, |k| match k {
                "traceparent" => Some(tp),
                "tracestate" => Some("vendor=1"),
                _ => None,
            });
            assert_eq!(parent.as_deref(), Some("00f067aa0ba902b7"));
            assert_eq!(
                trace_id(&span).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let mut headers = vec![("traceparent".to_string(), "stale".to_string())];
            inject(&span, &mut headers);
            let out: Vec<_> = headers.iter().filter(|(k, _)| k == "traceparent").collect();
            assert_eq!(out.len(), 1);
            let parts: Vec<&str> = out[0].1.split('-').collect();
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(
                parts[2], "00f067aa0ba902b7",
                "the child's own span id goes out"
            );
            assert!(headers.contains(&("tracestate".into(), "vendor=1".into())));
        });
    }

    /// The only test touching [`EXPORTING`]: no other test may race with it.
    #[test]
    fn exported_means_export_on_and_the_trace_sampled() {
        with_otel(|| {
            let child_of = |flags: &str| {
                let span = tracing::info_span!("handle_payload");
                let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
                set_remote_parent(&span, |k| (k == "traceparent").then_some(tp.as_str()));
                span
            };
            let (sampled, unsampled) = (child_of("01"), child_of("00"));
            assert!(!is_exported(&sampled), "export off: nothing is exported");
            EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(is_exported(&sampled));
            assert!(!is_exported(&unsampled));
            assert!(!is_exported(&tracing::Span::none()));
            EXPORTING.store(false, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        with_otel(|| {
            for bad in [
                "garbage",
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "",
            ] {
                let span = tracing::info_span!("http-request");
                assert_eq!(set_remote_parent(&span, |_| Some(bad)), None, "{bad}");
                let id = trace_id(&span).unwrap();
                assert_eq!(id.len(), 32);
                assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
            }
        });
    }

    #[test]
    fn without_the_layer_headers_pass_through() {
        let span = tracing::info_span!("client_request");
        let mut headers = vec![("traceparent".to_string(), "kept".to_string())];
        inject(&span, &mut headers);
        assert_eq!(
            headers,
            vec![("traceparent".to_string(), "kept".to_string())]
        );
        assert_eq!(trace_id(&span), None);
    }
}
