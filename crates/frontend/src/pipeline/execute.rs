//! Stage 3, the request plane: the prepared request goes to the routed worker and its outputs
//! come back through `postprocess` as [`GenEvent`]s.
//!
//! The stream runs inside the request's `http-request` span (the worker call joins the trace)
//! and keeps the request's metrics ([`RequestGuard`]): every way it can end — all choices
//! finished, a worker error (with its class), the client gone — is counted once. A choice that
//! a stop string ended is stopped on the worker at once with a `stop_choice` control message.

use super::legs::{Leg, LegEvent, Legs};
use super::migrate::{MigrationType, resumed};
use super::postprocess::{GenEvent, Postprocessor, TokenLogprobs};
use super::prefill::prefill;
use super::prepare::Prepared;
use super::route::{route, wait_while_busy};
use crate::config::ExecPolicy;
use crate::error::ApiError;
use crate::metrics::{FrontendMetrics, RequestGuard};
use crate::models::ServedModel;
use crate::trace::RequestIds;
use async_stream::stream;
use futures::{Stream, StreamExt};
use std::sync::Arc;
use std::time::Instant;
use tandem_protocols::llm::{GenerateControl, PreprocessedRequest};
use tandem_protocols::openai::{FunctionCall, ToolCall, ToolCallDelta};
use tandem_runtime::{RequestOptions, RuntimeError};
use tracing::Instrument;

/// Counts a client that went away before its response was complete.
struct DisconnectGuard<'a> {
    metrics: &'a FrontendMetrics,
    done: bool,
}

impl Drop for DisconnectGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.disconnected.inc();
        }
    }
}

/// One request: its first leg (after the prefill leg, when the model has prefill workers),
/// then the outputs of every leg it has (see [`super::legs`]), migrating the choices of a
/// leg whose worker failed while they have migrations left. Call it inside the request's
/// `http-request` span; the per-token loop does not enter the span (entering costs time on
/// every token and the loop logs nothing).
pub fn generate(
    metrics: Arc<FrontendMetrics>,
    model: Arc<ServedModel>,
    exec: ExecPolicy,
    mut p: Prepared,
    endpoint: &'static str,
    ids: RequestIds,
    request_id: String,
) -> impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static {
    let span = tracing::Span::current();
    span.record("request_id", request_id.as_str());
    span.record("model", model.name.as_str());
    if tandem_telemetry::propagation::is_exported(&span) {
        record_gen_ai_request(&span, &model.name, endpoint, &p);
    }
    stream! {
        let mut guard = RequestGuard::new(&metrics, &model.name, endpoint, p.stream, span.clone());
        let prompt_tokens = p.request.token_ids.len();
        guard.input_tokens(prompt_tokens);
        let mut disconnect = DisconnectGuard { metrics: &metrics, done: false };
        let n = p.n();
        // Reasoning is split from the answer in chat responses only (completions return text).
        let guided = p.request.sampling.guided_decoding.is_some();
        let reasoning = (endpoint != "completions")
            .then(|| model.reasoning_parser())
            .flatten()
            .map(|r| if guided { r.under_grammar() } else { r });
        let mut post = Postprocessor::with_reasoning(&model.preprocessor, n, &p.stops, prompt_tokens, reasoning)
            .with_tools(p.tools.as_ref());
        if p.request.output_options.logprobs.is_some() {
            post = post.with_logprobs(&model.preprocessor);
        }
        let mut finish_reasons: Vec<String> = Vec::new();
        let opts = RequestOptions { id: Some(request_id), headers: ids.headers() };
        let mut mover = Mover {
            metrics: &metrics,
            model: &model,
            exec: &exec,
            span: &span,
            opts: &opts,
            // A request pinned to a worker (`nvext.backend_instance_id`) stays there.
            left: vec![
                if p.worker.is_some() { 0 } else { exec.migration_limit(model.card.migration_limit) };
                n as usize
            ],
            generated: vec![Vec::new(); n as usize],
        };
        let deadline = exec.request_timeout.map(|t| (tokio::time::Instant::now() + t, t));
        let mut legs = Legs::default();
        match within(deadline, mover.first_leg(&mut p)).await.and_then(|r| r) {
            Ok(leg) => legs.push(leg),
            Err(e) => {
                guard.fail(&e);
                disconnect.done = true;
                yield Err(e);
                return;
            }
        }
        loop {
            let (i, event) = match within(deadline, legs.next()).await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                // Returning drops the legs: each worker is told to stop and frees its blocks.
                Err(e) => {
                    guard.fail(&e);
                    disconnect.done = true;
                    yield Err(e);
                    return;
                }
            };
            let failure = match event {
                LegEvent::Output(out) => {
                    legs.get_mut(i).route.prefill_done();
                    mover.record(out.index, &out.token_ids);
                    let step = post.push(out);
                    guard.tokens(step.tokens, prompt_tokens);
                    // When it was the last open choice, ending the streams below cancels it.
                    if let Some(choice) = step.stop_choice.filter(|_| !post.all_finished())
                        && let Some((leg, index)) = legs.find(choice)
                        && !leg.stream.control(&GenerateControl::StopChoice { index }).await
                    {
                        tracing::debug!(choice, "stop_choice not sent: the request has ended");
                    }
                    for ev in step.events {
                        if let GenEvent::Finish { reason, .. } = &ev {
                            finish_reasons.push(reason.to_string());
                        }
                        yield Ok(ev);
                    }
                    if post.all_finished() {
                        break;
                    }
                    continue;
                }
                LegEvent::Failed(e) => e,
                // Its choices all finished (or a stopped one's last output is moot).
                LegEvent::Ended if legs_choices_done(&legs, i, &post) => {
                    legs.remove(i);
                    continue;
                }
                LegEvent::Ended => {
                    let e = ApiError::internal("worker stream ended before every choice finished");
                    guard.fail(&e);
                    disconnect.done = true;
                    yield Err(e);
                    return;
                }
            };
            let leg = legs.remove(i);
            let open: Vec<u32> = leg.choices.iter().copied().filter(|c| !post.finished(*c)).collect();
            if open.is_empty() {
                // Failed after its choices had all finished: nothing is lost.
                continue;
            }
            match mover.take_over(&p, &leg, open, failure).await {
                Ok(new_legs) => new_legs.into_iter().for_each(|l| legs.push(l)),
                Err(e) => {
                    guard.fail(&e);
                    disconnect.done = true;
                    yield Err(e);
                    return;
                }
            }
        }
        if !post.all_finished() {
            let e = ApiError::internal("worker stream ended before every choice finished");
            guard.fail(&e);
            disconnect.done = true;
            yield Err(e);
            return;
        }
        if tandem_telemetry::propagation::is_exported(&span) {
            span.record(
                "gen_ai.response.finish_reasons",
                serde_json::to_string(&finish_reasons).unwrap_or_default().as_str(),
            );
        }
        guard.ok();
        disconnect.done = true;
        yield Ok(GenEvent::Usage(post.usage()));
    }
}

/// `work`, or a 504 once `deadline` (`--request-timeout-secs`) has passed.
async fn within<T>(
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
    work: impl Future<Output = T>,
) -> Result<T, ApiError> {
    match deadline {
        None => Ok(work.await),
        Some((at, limit)) => tokio::time::timeout_at(at, work)
            .await
            .map_err(|_| ApiError::timeout(limit)),
    }
}

fn legs_choices_done(legs: &Legs, i: usize, post: &Postprocessor<'_>) -> bool {
    legs.choices_of(i).iter().all(|c| post.finished(*c))
}

/// How long a request being moved waits for some worker to exist.
const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a leg did not start.
enum Failed {
    /// No worker to send it to: the client's answer.
    Route(ApiError),
    /// The call to `worker` failed.
    Call(RuntimeError, u64),
}

/// Starts legs and moves choices between workers; what one request knows for that.
struct Mover<'a> {
    metrics: &'a FrontendMetrics,
    model: &'a ServedModel,
    exec: &'a ExecPolicy,
    span: &'a tracing::Span,
    opts: &'a RequestOptions,
    /// Migrations left, per choice.
    left: Vec<u32>,
    /// Tokens produced so far, per choice that may still move.
    generated: Vec<Vec<u32>>,
}

impl Mover<'_> {
    /// Keeps a choice's new tokens, which a migration would resume from; a choice that can
    /// no longer move (the default limit of 0) keeps none.
    fn record(&mut self, choice: u32, tokens: &[u32]) {
        let i = choice as usize;
        if self.left.get(i).is_some_and(|l| *l > 0) {
            self.generated[i].extend_from_slice(tokens);
        }
    }

    /// The request's first leg: the prefill leg when the model has prefill workers, then the
    /// whole request on one worker — on another while the call fails in a way another worker
    /// may not (`new_request` migrations).
    async fn first_leg(&mut self, p: &mut Prepared) -> Result<Leg, ApiError> {
        let prefilled = prefill(
            self.model,
            self.exec.disagg,
            &self.exec.avoid,
            p,
            self.opts.clone(),
            self.span,
            self.metrics,
        )
        .await?;
        let (result, mut held) = prefilled.unzip();
        p.request.prefill_result = result;
        let choices: Vec<u32> = (0..p.n()).collect();
        let mut failed_at = None;
        loop {
            let started = self
                .start(p, &p.request, choices.clone(), failed_at.is_some())
                .await;
            // The decode worker has it: the held blocks are its to fetch. Otherwise `held`
            // drops below and frees them on the prefill worker.
            if started.is_ok()
                && let Some(h) = held.take()
            {
                h.handed_over();
            }
            match started {
                Ok(leg) => {
                    self.observe(MigrationType::NewRequest, failed_at, "success");
                    return Ok(leg);
                }
                Err(Failed::Route(e)) => {
                    self.observe(MigrationType::NewRequest, failed_at, "failure");
                    return Err(e);
                }
                Err(Failed::Call(e, worker)) => {
                    // A retry computes the prompt on its new worker.
                    held = None;
                    p.request.prefill_result = None;
                    self.before_retry(MigrationType::NewRequest, &choices, e, worker, failed_at)?;
                    failed_at.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Routes and calls one leg carrying `choices`.
    /// Routes and calls one leg carrying `choices`. A request being moved (`moving`) that
    /// finds no worker at all waits up to [`MOVE_WAIT`] for one to appear (workers that lost
    /// NATS withdraw from discovery and come back with it) instead of failing at once.
    async fn start(
        &self,
        p: &Prepared,
        request: &PreprocessedRequest,
        choices: Vec<u32>,
        moving: bool,
    ) -> Result<Leg, Failed> {
        if p.worker.is_none()
            && !wait_while_busy(self.model, &self.exec.avoid, self.exec.busy_wait).await
        {
            return Err(Failed::Route(ApiError::overloaded(format!(
                "every worker is over --busy-threshold and none freed up within {:?}",
                self.exec.busy_wait
            ))));
        }
        let pick = || {
            route(
                self.model,
                p,
                &request.token_ids,
                self.span,
                &self.exec.avoid,
                self.exec.sessions.as_deref(),
            )
        };
        let route = match pick() {
            Err(e) if moving && e.class == tandem_runtime::ErrorCode::Unavailable => {
                let _ = self.model.client.wait_for_instances(MOVE_WAIT).await;
                pick()
            }
            other => other,
        }
        .map_err(Failed::Route)?;
        let worker = route.worker();
        let mut opts = self.opts.clone();
        // One choice of several on its own stream: an id of its own, so that two choices of
        // one request on one worker do not share their cancellations.
        if let [choice] = choices[..]
            && self.generated.len() > 1
        {
            opts.id = opts.id.map(|id| format!("{id}-choice{choice}"));
        }
        match self
            .model
            .client
            .call(route.mode(), request, opts)
            .instrument(self.span.clone())
            .await
        {
            Ok(stream) => Ok(Leg {
                stream,
                choices,
                route,
            }),
            Err(e) => Err(Failed::Call(e, worker)),
        }
    }

    /// `leg` failed with `failure` while `open` of its choices were unfinished: each goes on
    /// from its tokens on another worker (`ongoing_request`), or the failure is the answer.
    async fn take_over(
        &mut self,
        p: &Prepared,
        leg: &Leg,
        open: Vec<u32>,
        failure: RuntimeError,
    ) -> Result<Vec<Leg>, ApiError> {
        let failed_at = Instant::now();
        self.before_retry(
            MigrationType::OngoingRequest,
            &open,
            failure,
            leg.route.worker(),
            None,
        )?;
        // The whole request again when nothing was produced and it is still whole; else one
        // leg per choice, each from its own tokens.
        let whole = open.len() == leg.choices.len() && open.len() == self.generated.len();
        let groups: Vec<Vec<u32>> =
            if whole && open.iter().all(|c| self.generated[*c as usize].is_empty()) {
                vec![open]
            } else {
                open.into_iter().map(|c| vec![c]).collect()
            };
        let mut legs = Vec::new();
        for choices in groups {
            let request = if choices.len() == 1 {
                resumed(&p.request, &self.generated[choices[0] as usize])
            } else {
                let mut r = p.request.clone();
                r.prefill_result = None;
                r
            };
            let first_failure = Some(failed_at);
            loop {
                match self.start(p, &request, choices.clone(), true).await {
                    Ok(leg) => {
                        self.observe(MigrationType::OngoingRequest, first_failure, "success");
                        legs.push(leg);
                        break;
                    }
                    Err(Failed::Route(e)) => {
                        self.observe(MigrationType::OngoingRequest, first_failure, "failure");
                        return Err(e);
                    }
                    Err(Failed::Call(e, worker)) => {
                        self.before_retry(
                            MigrationType::NewRequest,
                            &choices,
                            e,
                            worker,
                            first_failure,
                        )?;
                    }
                }
            }
        }
        Ok(legs)
    }

    /// Decides whether `choices` may move after `e`, the failure of `worker`: counts the
    /// migration and marks the span, or gives the client its error. `failing_since`: when
    /// the migration under way (if any) began.
    fn before_retry(
        &mut self,
        kind: MigrationType,
        choices: &[u32],
        e: RuntimeError,
        worker: u64,
        failing_since: Option<Instant>,
    ) -> Result<(), ApiError> {
        if !e.is_retryable() {
            self.observe(kind, failing_since, "failure");
            return Err(ApiError::from(e));
        }
        self.exec.avoid.add(worker);
        if choices.iter().any(|c| self.left[*c as usize] == 0) {
            self.observe(kind, failing_since, "failure");
            tracing::warn!(
                parent: self.span,
                worker_id = worker,
                error = %e,
                "worker failed; no migrations left (--migration-limit)"
            );
            return Err(ApiError::from(e));
        }
        for c in choices {
            self.left[*c as usize] -= 1;
        }
        let model = self.model.name.as_str();
        self.metrics
            .migrations
            .with_label_values(&[model, kind.label()])
            .inc();
        tracing::warn!(
            parent: self.span,
            migration_type = kind.label(),
            worker_id = worker,
            ?choices,
            tokens_done = choices.iter().map(|c| self.generated[*c as usize].len()).sum::<usize>(),
            error = %e,
            "worker failed; moving the request to another worker"
        );
        Ok(())
    }

    /// Observes a migration's duration, when there was one.
    fn observe(&self, kind: MigrationType, since: Option<Instant>, outcome: &str) {
        if let Some(since) = since {
            self.metrics
                .migration_duration
                .with_label_values(&[self.model.name.as_str(), kind.label(), outcome])
                .observe(since.elapsed().as_secs_f64());
        }
    }
}

/// The GenAI semantic-convention attributes known before the worker is called; for an
/// exported trace only (they repeat Dynamo's fields for trace UIs, and every recorded field
/// is formatted by each tracing layer).
fn record_gen_ai_request(span: &tracing::Span, model: &str, endpoint: &str, p: &Prepared) {
    let operation = if endpoint != "completions" {
        "chat"
    } else {
        "text_completion"
    };
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", model);
    if let Some(m) = p.request.stop.max_tokens {
        span.record("gen_ai.request.max_tokens", u64::from(m));
    }
    if let Some(t) = p.request.sampling.temperature {
        span.record("gen_ai.request.temperature", f64::from(t));
    }
}

/// A whole generation, for a unary response.
pub struct Collected {
    pub texts: Vec<String>,
    /// Per choice, the reasoning split from its answer (chat with a reasoning parser).
    pub reasoning: Vec<Option<String>>,
    pub reasons: Vec<Option<String>>,
    /// Per choice, its tool calls, whole.
    pub tool_calls: Vec<Vec<ToolCall>>,
    /// Per choice, its tokens' logprobs (when the request asked for them).
    pub logprobs: Vec<Option<Vec<TokenLogprobs>>>,
    pub usage: tandem_protocols::openai::Usage,
}

/// Gathers a whole generation for a unary response: text, reasoning, tool calls, logprobs
/// and finish reason per choice, usage. `logprobs`: the request asked for them.
pub async fn collect(
    events: impl Stream<Item = Result<GenEvent, ApiError>>,
    n: u32,
    logprobs: bool,
) -> Result<Collected, ApiError> {
    let n = n as usize;
    let mut c = Collected {
        texts: vec![String::new(); n],
        reasoning: vec![None; n],
        reasons: vec![None; n],
        tool_calls: vec![Vec::new(); n],
        logprobs: vec![logprobs.then(Vec::new); n],
        usage: Default::default(),
    };
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match ev? {
            GenEvent::Text { index, text } => c.texts[index as usize].push_str(&text),
            GenEvent::Reasoning { index, text } => c.reasoning[index as usize]
                .get_or_insert_with(String::new)
                .push_str(&text),
            GenEvent::ToolCall { index, call } => add_call(&mut c.tool_calls[index as usize], call),
            GenEvent::Logprobs { index, tokens } => {
                if let Some(l) = &mut c.logprobs[index as usize] {
                    l.extend(tokens);
                }
            }
            GenEvent::Finish { index, reason } => c.reasons[index as usize] = Some(reason.into()),
            GenEvent::Usage(u) => c.usage = u,
        }
    }
    Ok(c)
}

/// Assembles a streamed tool call: a new index starts a call, later pieces add arguments.
fn add_call(calls: &mut Vec<ToolCall>, d: ToolCallDelta) {
    let i = d.index as usize;
    if i >= calls.len() {
        calls.push(ToolCall {
            id: d.id.unwrap_or_default(),
            kind: d.kind.unwrap_or_else(|| "function".into()),
            function: FunctionCall {
                name: d.function.name.unwrap_or_default(),
                arguments: String::new(),
            },
        });
    }
    if let (Some(call), Some(args)) = (calls.last_mut(), d.function.arguments) {
        call.function.arguments.push_str(&args);
    }
}
