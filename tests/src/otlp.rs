//! An OTLP collector inside the test process: the real protocols — opentelemetry-proto's tonic
//! services for traces and logs on one port (gRPC), and `/v1/traces` + `/v1/logs` taking
//! protobuf bodies on another (HTTP) — keeping every span and log record for assertions.

use anyhow::Result;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attributes rendered as strings (ints and doubles in decimal).
    pub attributes: HashMap<String, String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// One received log record, flattened.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub service: String,
    pub body: String,
    pub severity: String,
    /// Empty when the record was written outside any span.
    pub trace_id: String,
    pub span_id: String,
    pub attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Span>>>, Arc<Mutex<Vec<LogRecord>>>);

fn render(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|k| (k.key.clone(), render(&k.value)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn service_of(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .map(|r| attrs(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

impl Store {
    fn add_spans(&self, request: ExportTraceServiceRequest) {
        let mut out = Vec::new();
        for rs in request.resource_spans {
            let service = service_of(rs.resource.as_ref());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: attrs(&s.attributes),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(out);
        }
    }

    fn add_logs(&self, request: ExportLogsServiceRequest) {
        let mut out = Vec::new();
        for rl in request.resource_logs {
            let service = service_of(rl.resource.as_ref());
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    out.push(LogRecord {
                        service: service.clone(),
                        body: render(&r.body),
                        severity: r.severity_text.clone(),
                        trace_id: hex(&r.trace_id),
                        span_id: hex(&r.span_id),
                        attributes: attrs(&r.attributes),
                    });
                }
            }
        }
        if let Ok(mut logs) = self.1.lock() {
            logs.extend(out);
        }
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add_spans(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.add_logs(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The HTTP/protobuf receiver: `/v1/traces` and `/v1/logs`.
fn http_app(store: Store) -> axum::Router {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    async fn traces(State(s): State<Store>, body: Bytes) -> StatusCode {
        match ExportTraceServiceRequest::decode(body) {
            Ok(r) => {
                s.add_spans(r);
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    async fn logs(State(s): State<Store>, body: Bytes) -> StatusCode {
        match ExportLogsServiceRequest::decode(body) {
            Ok(r) => {
                s.add_logs(r);
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    axum::Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/logs", post(logs))
        .with_state(store)
}

/// A running collector; stops when dropped.
pub struct Collector {
    /// gRPC (traces and logs).
    pub port: u16,
    /// HTTP/protobuf (`/v1/traces`, `/v1/logs`).
    pub http_port: u16,
    store: Store,
    stop: CancellationToken,
}

impl Collector {
    /// Listens on free 127.0.0.1 ports.
    pub async fn start() -> Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// gRPC on `addr`, HTTP on a free port.
    pub async fn start_on(addr: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let store = Store::default();
        let stop = CancellationToken::new();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .add_service(LogsServiceServer::new(store.clone()))
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        tokio::spawn(server);
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_port = http.local_addr()?.port();
        let app = http_app(store.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(http, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
        });
        Ok(Self {
            port,
            http_port,
            store,
            stop,
        })
    }

    /// The gRPC endpoint, for `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `_LOGS_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The HTTP base, for `OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn logs(&self) -> Vec<LogRecord> {
        self.store.1.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
