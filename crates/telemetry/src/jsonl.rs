//! One JSON object per log line, with Dynamo's keys.
//!
//! Each line has `time`, `level`, `target`, `file`, `line`, `message`, the event's own fields,
//! and the fields of every span in the current scope (innermost wins), plus `span_name` of the
//! innermost span. Span fields are captured when a span is created or recorded into and kept
//! in the span's extensions, so an event deep inside a request still carries `x_request_id`.
//! `trace_id` and `span_id` are the OpenTelemetry ids of the innermost span (the ones exported
//! and propagated), present whenever the OpenTelemetry layer is installed, export or not.

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use serde_json::Value;
use std::fmt;
use std::io::Write;
use std::sync::OnceLock;
use tracing::Dispatch;
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Fields recorded on a span, stored in its extensions (names are the callsite's, `'static`).
#[derive(Default)]
struct SpanFields {
    fields: Vec<(&'static str, Value)>,
    /// The span's OpenTelemetry ids once a line has needed them: they never change after.
    ids: Option<(TraceId, SpanId)>,
}

impl SpanFields {
    fn set(&mut self, name: &'static str, value: Value) {
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.fields.push((name, value)),
        }
    }
}

/// Keys every line starts with; an event or span field of the same name is left out.
const BASE_KEYS: [&str; 5] = ["time", "level", "target", "file", "line"];

pub struct JsonlLayer<W> {
    make_writer: W,
    local_tz: bool,
    /// The subscriber this layer is part of, to have the OpenTelemetry layer start a span's
    /// context when a line needs its ids (weak: the subscriber owns this layer).
    dispatch: OnceLock<WeakDispatch>,
}

impl<W> JsonlLayer<W> {
    pub fn new(make_writer: W, local_tz: bool) -> Self {
        Self {
            make_writer,
            local_tz,
            dispatch: OnceLock::new(),
        }
    }

    /// OpenTelemetry trace and span id of the innermost span the OpenTelemetry layer tracks
    /// (worked out once per span).
    fn otel_ids<S>(
        &self,
        scope: Option<tracing_subscriber::registry::Scope<'_, S>>,
    ) -> Option<(TraceId, SpanId)>
    where
        S: for<'a> LookupSpan<'a>,
    {
        for span in scope? {
            let mut ext = span.extensions_mut();
            if ext.get_mut::<OtelData>().is_none() {
                continue;
            }
            if let Some(ids) = ext.get_mut::<SpanFields>().and_then(|f| f.ids) {
                return Some(ids);
            }
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&mut ext, &dispatch)?;
            let sc = cx.span().span_context().clone();
            let ids = sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))?;
            if let Some(f) = ext.get_mut::<SpanFields>() {
                f.ids = Some(ids);
            }
            return Some(ids);
        }
        None
    }
}

/// Collects a span's fields.
struct SpanVisitor<'a>(&'a mut SpanFields);

impl Visit for SpanVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.set(field.name(), Value::from(format!("{value:?}")));
    }
}

/// A line being written: `,"key":value` pairs, each key once (the first writer wins).
struct Line {
    buf: Vec<u8>,
    keys: Vec<&'static str>,
}

impl Line {
    fn has(&self, key: &str) -> bool {
        BASE_KEYS.contains(&key) || self.keys.contains(&key)
    }

    /// Writes `key` and `value` unless `key` is already in the line.
    fn pair(&mut self, key: &'static str, value: impl serde::Serialize) {
        if self.has(key) {
            return;
        }
        self.keys.push(key);
        self.raw(key, value);
    }

    fn raw(&mut self, key: &str, value: impl serde::Serialize) {
        self.buf.push(b',');
        // Serialising a string or a JSON value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, key);
        self.buf.push(b':');
        let _ = serde_json::to_writer(&mut self.buf, &value);
    }
}

/// Writes an event's fields straight into the line.
impl Visit for Line {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.pair(field.name(), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.pair(field.name(), value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pair(field.name(), value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.pair(field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field.name(), value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field.name(), format!("{value:?}"));
    }
}

impl<S, W> Layer<S> for JsonlLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut SpanVisitor(&mut fields));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(fields) = ext.get_mut::<SpanFields>() {
            values.record(&mut SpanVisitor(fields));
        }
    }

    /// Written in place, without an intermediate map: the fixed keys, the event's fields, the
    /// ids and `span_name`, then the span fields from the innermost span out (a name already
    /// written is skipped, so the innermost value wins).
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let time = if self.local_tz {
            chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
        } else {
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        let mut line = Line {
            buf: Vec::with_capacity(768),
            keys: Vec::with_capacity(32),
        };
        line.buf.extend_from_slice(b"{\"time\":");
        let _ = serde_json::to_writer(&mut line.buf, &time);
        line.raw("level", meta.level().as_str());
        line.raw("target", meta.target());
        if let Some(file) = meta.file() {
            line.raw("file", file);
        }
        if let Some(n) = meta.line() {
            line.raw("line", n);
        }
        event.record(&mut line);
        if !line.has("message") {
            line.pair("message", "");
        }
        if let Some(scope) = ctx.event_scope(event) {
            if let Some((t, s)) = self.otel_ids(ctx.event_scope(event)) {
                line.pair("trace_id", t.to_string());
                line.pair("span_id", s.to_string());
            }
            let mut innermost = true;
            for span in scope {
                if innermost {
                    line.pair("span_name", span.name());
                    innermost = false;
                }
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &f.fields {
                        line.pair(k, v);
                    }
                }
            }
        }
        line.buf.extend_from_slice(b"}\n");
        // A log line that cannot be written has nowhere to be reported.
        let _ = self.make_writer.make_writer().write_all(&line.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn lines_carry_span_fields_and_dynamo_keys() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(JsonlLayer::new(buf.clone(), false));
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("http-request", x_request_id = "req-1", n = 1, m = 1);
            let _o = outer.enter();
            let inner = tracing::info_span!("handle_payload", n = 2, m = 2);
            let _i = inner.enter();
            tracing::info!(tokens = 7u64, n = 3, "request completed");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1);
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["message"], "request completed");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["x_request_id"], "req-1");
        assert_eq!(v["n"], 3, "the event's own field wins over its spans'");
        assert_eq!(v["m"], 2, "innermost span wins");
        assert_eq!(
            lines[0].matches("\"n\":").count(),
            1,
            "each key once: {}",
            lines[0]
        );
        assert!(lines[0].starts_with("{\"time\":"), "{}", lines[0]);
        assert_eq!(v["tokens"], 7);
        assert_eq!(v["span_name"], "handle_payload");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert!(v["file"].as_str().unwrap().ends_with("jsonl.rs"));
        assert!(
            v.get("trace_id").is_none(),
            "no OpenTelemetry layer, no ids"
        );
    }

    #[test]
    fn lines_carry_the_exported_ids_of_the_innermost_span() {
        let buf = Buf::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_context_activation(false),
            )
            .with(JsonlLayer::new(buf.clone(), false));
        let (outer_ids, inner_ids) = tracing::subscriber::with_default(subscriber, || {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let ids = |s: &tracing::Span| {
                let cx = s.context();
                let sc = cx.span().span_context().clone();
                (sc.trace_id().to_string(), sc.span_id().to_string())
            };
            let outer = tracing::info_span!("http-request");
            let _o = outer.enter();
            tracing::info!("outer");
            let inner = tracing::info_span!("client_request");
            let _i = inner.enter();
            tracing::info!("inner");
            (ids(&outer), ids(&inner))
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["trace_id"], outer_ids.0.as_str());
        assert_eq!(lines[0]["span_id"], outer_ids.1.as_str());
        assert_eq!(lines[1]["trace_id"], outer_ids.0.as_str(), "one trace");
        assert_eq!(lines[1]["span_id"], inner_ids.1.as_str());
        assert_ne!(inner_ids.1, outer_ids.1);
        assert_eq!(outer_ids.0.len(), 32);
        assert_eq!(outer_ids.1.len(), 16);
    }
}
