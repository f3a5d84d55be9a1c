//! Metering: what a relayed answer showed, what a request consumed (the provider's
//! count compared with Ciyuan's recount, or Ciyuan's count standing in), and the
//! entry that records it, priced, settled against budgets and wallets, and handed to
//! the recorder.

use super::*;

/// What a relayed answer has shown so far.
pub(super) struct Meter {
    pub(super) shown: Shown,
    /// What the stream's dialect carries between events.
    pub(super) stream: StreamState,
    /// The stream reached its proper end (`[DONE]`, `message_stop`).
    pub(super) complete: bool,
    pub(super) failure: Option<&'static str>,
    pub(super) ttft: Option<Duration>,
    /// The provider accepted the request (2xx) and answered: it consumed tokens,
    /// whether or not its count reaches us.
    pub(super) billable: bool,
}

impl Meter {
    pub(super) fn new(endpoint: Endpoint, failure: Option<&'static str>) -> Meter {
        Meter {
            shown: Shown::default(),
            stream: StreamState::new(endpoint),
            complete: false,
            failure,
            ttft: None,
            billable: false,
        }
    }

    /// Reads one event of a stream; returns whether to pass it on to the client.
    pub(super) fn event(&mut self, event: &[u8], strip_usage: bool, started: Instant) -> bool {
        let Some(data) = sse::data(event) else {
            return true;
        };
        let before = self.shown.text.len() + self.shown.reasoning.len();
        let mut forward = true;
        match self.stream.read_event(&data, &mut self.shown) {
            Some(read) => {
                if read.step == protocol::Step::Done {
                    self.complete = true;
                }
                if strip_usage && read.usage_only {
                    forward = false;
                }
            }
            None => self.unreadable(&data),
        }
        if self.ttft.is_none() && self.shown.text.len() + self.shown.reasoning.len() > before {
            self.ttft = Some(started.elapsed());
        }
        forward
    }

    /// An event the chunk readers cannot take (a field of an unexpected type, not
    /// JSON) still reached the client: its data is metered as delivered text, so a
    /// broken provider's output is never free when its count does not come. (When the
    /// count does come, it is what is billed; the recount then counts these bytes.)
    pub(super) fn unreadable(&mut self, data: &str) {
        if !data.trim().is_empty() {
            self.shown.text.push_str(data);
        }
    }

    /// Whether the provider's final count has come.
    pub(super) fn counted(&self) -> bool {
        match &self.shown.reported {
            Some(r) => r.complete,
            None => self.stream.is_final(),
        }
    }

    /// The provider's count so far: a whole answer's, an OpenAI stream's usage chunk,
    /// or what an Anthropic stream's events added up to.
    pub(super) fn take_reported(&mut self) -> Option<protocol::Reported> {
        self.shown.reported.take().or_else(|| self.stream.count())
    }
}

/// Records a request that consumed nothing (refused, failed upstream before an
/// answer, or answered with nothing usable): no tokens, but its status and latency
/// count for service quality.
pub(super) fn finish_failed(app: &Arc<App>, call: Call, status: StatusCode, why: &'static str) {
    let meter = Meter::new(call.endpoint, Some(why));
    let call = Call {
        endpoint: call.endpoint,
        caller: call.caller,
        info: RequestInfo {
            model: call.info.model,
            stream: call.info.stream,
            ..RequestInfo::default()
        },
        provider: call.provider,
        request_id: call.request_id,
        started: call.started,
        at: call.at,
        reservation: call.reservation,
        hold: call.hold,
        shared: call.shared,
        session: call.session,
        tags: call.tags,
        upstream_request_id: call.upstream_request_id,
        encoding: call.encoding,
        input_estimate: None,
    };
    finish(app, call, meter, status.as_u16(), None);
}

/// The provider's id of a request from its answer's headers: OpenAI's
/// `x-request-id`, Anthropic's `request-id`; `None` when neither is recordable.
pub(super) fn provider_request_id(headers: &HeaderMap) -> Option<String> {
    ["x-request-id", "request-id"]
        .iter()
        .filter_map(|h| headers.get(*h))
        .find_map(|v| v.to_str().ok().and_then(protocol::recordable))
        .map(str::to_owned)
}

/// Tokens allowed per tool call in the answer beyond its arguments: the provider also
/// counts the call's name and framing, whose format it does not publish.
pub(super) const TOOL_CALL_ALLOWANCE: u64 = 24;

/// The tokens to record for a request, and how they were found.
pub(super) struct Measured {
    pub(super) tokens: TokenMap,
    pub(super) recount: Option<Box<Recount>>,
    /// The tokens are Ciyuan's count (no final count came from the provider).
    pub(super) estimated: bool,
    /// What the recount could not count exactly (its tolerance was widened for it).
    pub(super) uncounted: Vec<String>,
}

/// What a request consumed: the provider's final count when it came (compared with
/// Ciyuan's own count where Ciyuan has the model's tokenizer), else Ciyuan's count of
/// the prompt and of everything delivered, with `estimator` for models whose tokenizer
/// Ciyuan does not have, and never less than what the provider reported so far.
pub(super) fn measure(config: &GatewayConfig, call: &Call, meter: &mut Meter) -> Measured {
    let mut m = Measured {
        tokens: TokenMap::new(),
        recount: None,
        estimated: false,
        uncounted: Vec::new(),
    };
    if !meter.billable {
        return m;
    }
    meter.stream.end(&mut meter.shown);
    let exact = call.encoding.is_some();
    let enc = call.encoding.unwrap_or(ESTIMATOR);
    let ours = recount(enc, call, &meter.shown);
    if ours.is_none() {
        tracing::error!(request = %call.request_id, encoding = enc.name(), "the recount failed: its vocabulary did not load");
    }
    let reported = meter.take_reported();
    let shown = &meter.shown;
    let thinking_in_output = call.endpoint.dialect().thinking_in_output();
    match (reported, ours) {
        (Some(r), ours) if r.complete => {
            m.tokens = r.tokens;
            let Some(ours) = ours.filter(|_| exact) else {
                return m;
            };
            // A tolerance past the count itself allows everything: saturating is exact.
            let tolerance = |provider: u64| {
                (provider.saturating_mul(config.recount_tolerance_percent) / 100)
                    .max(config.recount_tolerance_tokens)
            };
            // The provider counts reasoning inside the output unless it reports it apart.
            let our_output = if r.reasoning == 0 {
                ours.output + ours.reasoning
            } else {
                ours.output
            };
            let mut input_allowed = Some(tolerance(r.input));
            if call.info.has_media {
                m.uncounted.push("media".into());
                input_allowed = None;
            }
            if ours.tools > 0 {
                // Tool definitions reach the model in a format the provider does not
                // publish; their JSON is counted, and may differ by as much again.
                m.uncounted.push("tools".into());
                input_allowed = input_allowed.map(|a| a.saturating_add(ours.tools));
            }
            let mut output_allowed =
                (!r.audio_output && meter.complete).then(|| tolerance(r.output));
            if shown.tool_calls > 0 {
                m.uncounted.push("tool_calls".into());
                output_allowed = output_allowed.map(|a| {
                    a.saturating_add(TOOL_CALL_ALLOWANCE.saturating_mul(shown.tool_calls))
                });
            }
            if shown.redacted {
                m.uncounted.push("redacted_thinking".into());
                output_allowed = None;
            }
            let off = |provider: u64, ours: u64, allowed: Option<u64>| {
                allowed.is_some_and(|a| provider.abs_diff(ours) > a)
            };
            let flagged = off(r.input, ours.input, input_allowed)
                || off(r.output, our_output, output_allowed);
            m.recount = Some(Box::new(Recount {
                encoding: enc.name().to_string(),
                input: ours.input,
                output: our_output,
                flagged,
            }));
        }
        (interim, ours) => {
            // No final count: Ciyuan's count of what was asked and delivered stands in.
            m.estimated = true;
            let Some(ours) = ours else {
                if let Some(r) = interim {
                    m.tokens = r.tokens;
                }
                return m;
            };
            let (output, reasoning) = if thinking_in_output {
                (ours.output + ours.reasoning, 0)
            } else {
                (ours.output, ours.reasoning)
            };
            let mut output = output;
            match &interim {
                Some(r) => {
                    // The provider's input figures are exact; its output so far is a floor.
                    for t in r.tokens.iter() {
                        if t.direction != Direction::Output && t.direction != Direction::Reasoning {
                            add_tokens(
                                &mut m.tokens,
                                t.modality,
                                t.direction,
                                t.count.unsigned_abs(),
                            );
                        }
                    }
                    output = output.max(r.output);
                }
                None => add_tokens(&mut m.tokens, Modality::Text, Direction::Input, ours.input),
            }
            add_tokens(&mut m.tokens, Modality::Text, Direction::Output, output);
            add_tokens(
                &mut m.tokens,
                Modality::Text,
                Direction::Reasoning,
                reasoning,
            );
            m.recount = Some(Box::new(Recount {
                encoding: enc.name().to_string(),
                input: ours.input,
                output,
                flagged: false,
            }));
        }
    }
    m
}

/// Adds a count Ciyuan measured (bounded by the body and answer sizes) to its key.
pub(super) fn add_tokens(t: &mut TokenMap, m: Modality, d: Direction, n: u64) {
    if n == 0 {
        return;
    }
    let added = i64::try_from(n).ok().map(|n| t.add(m, d, n));
    assert!(
        matches!(added, Some(Some(()))),
        "a count of delivered text fits a token map"
    );
}

/// Counts, compares and records, off the request's path (`record_call`, spawned).
pub(super) fn finish(
    app: &Arc<App>,
    call: Call,
    meter: Meter,
    status: u16,
    ttft: Option<Duration>,
) {
    // A relay dropped while the runtime shuts down has nowhere to record from.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(request = %call.request_id, "gateway usage not recorded: stopping");
        return;
    };
    let finishing = Finishing::new(app, call, meter, status, ttft);
    // Boxed as the request's own future is (`handle`): moved as a pointer.
    rt.spawn(Box::pin(async move {
        // The request's thread runs this task before the connection's own, which was
        // woken after it was spawned: the answer would wait for the recount, rating and
        // settling of its own usage. Yielding once lets the answer go out first.
        tokio::task::yield_now().await;
        finishing.run().await;
    }));
}

/// A request's metering, made ready when it ends and run once its answer is handed
/// over: by a task of its own ([`finish`]), or, for a whole answer, by the request's
/// own task after it passed the answer to the connection (`handle`), which spares a
/// second task per request. Counted in `finishing` from when it is made, so a clean
/// stop waits for it.
pub(super) struct Finishing {
    app: Arc<App>,
    call: Call,
    meter: Meter,
    ended: Ended,
}

impl Finishing {
    /// Boxed where it is made: a request's metering (its call and meter, a kilobyte)
    /// then moves as a pointer from the forwarding to the task that runs it, and
    /// `run`'s future holds the pointer, not the kilobyte (every future that holds a
    /// value is copied whole when made and moved: `memmove` was the largest single
    /// item of the gateway's CPU).
    pub(super) fn new(
        app: &Arc<App>,
        call: Call,
        meter: Meter,
        status: u16,
        ttft: Option<Duration>,
    ) -> Box<Finishing> {
        let latency = call.started.elapsed();
        // A response the provider keeps can be retrieved at once, before its entry is
        // appended and projected (see `retrieve`).
        if call.endpoint == Endpoint::Responses
            && (200..300).contains(&status)
            && let Some(id) = &meter.shown.served.id
        {
            let upstream = &app.gateway.config.providers[call.provider].name;
            let mut recent = match app.gateway.recent_responses.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            recent.keep(id, &call.caller.key.account, upstream);
        }
        app.gateway
            .finishing
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Box::new(Finishing {
            app: app.clone(),
            call,
            meter,
            ended: Ended {
                status,
                ttft,
                latency,
            },
        })
    }

    /// Counts, compares and records (`record_call`).
    pub(super) async fn run(mut self: Box<Self>) {
        let Finishing {
            app,
            call,
            meter,
            ended,
        } = &mut *self;
        record_call(app, call, meter, ended).await;
        app.gateway
            .finishing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How a request ended, as the relay saw it.
struct Ended {
    status: u16,
    ttft: Option<Duration>,
    latency: Duration,
}

/// A request's ending, in order: measured and observed in `/metrics`, its entry made
/// and priced, budgets, wallet and holds across nodes settled, then recorded.
async fn record_call(app: &Arc<App>, call: &mut Call, meter: &mut Meter, ended: &Ended) {
    let gw = &app.gateway;
    let billable = meter.billable;
    let measured = measure(&gw.config, call, meter);
    let partial = billable && (meter.failure.is_some() || measured.estimated);
    let provider = &gw.config.providers[call.provider];
    let output_tokens_per_sec = generation_speed(call, &measured.tokens, ended);
    gw.metrics.observe(&metrics::Observation {
        upstream: &provider.name,
        model: &call.info.model,
        status: ended.status,
        ttft: ended.ttft,
        latency: ended.latency,
        tokens: &measured.tokens,
        partial,
        flagged: measured.recount.as_ref().is_some_and(|r| r.flagged),
        output_tokens_per_sec,
    });
    let mut entry = usage_entry(
        call,
        meter,
        &provider.name,
        measured,
        ended,
        partial,
        output_tokens_per_sec,
    );
    // Priced as it is appended, on the count the provider's setting names, under
    // the rules in force until the entry holds its place in the ledger.
    let rules = app.rules_gate.clone().read_owned().await;
    let (price_incident, tiers) = app
        .rate_gateway_entry(&mut entry, provider.rate_basis)
        .await;
    let EntryBody::Usage(usage) = &entry.body else {
        unreachable!("a gateway entry is a usage entry")
    };
    let (settled, charge, settles) = settle_engines(app, call, usage, billable);
    // The rarer awaits are boxed when taken: inline, each one's future would widen
    // this one's, which is made and moved on every request.
    if let Some(settled) = settled
        && settled.raises_incidents()
    {
        Box::pin(crate::budgets::incidents(app, settled, None)).await;
    }
    let posting = charge.map(|(node, p)| Entry::new(Timestamp::now(), node, EntryBody::Posting(p)));
    match tiers {
        // A tiered entry holds the tier counters' lock: appended now, not after the
        // recorder's linger, and the lock released once it holds its place.
        Some(tiers) => {
            Box::pin(app.record_gateway_now(entry, posting, rules, tiers, settles)).await
        }
        // With its payment, in one message: both are appended together (also when
        // the recorder is behind), so they hold their places side by side when the
        // rules guard goes, and other nodes count the request's holds until they
        // have applied both.
        None => app.record_gateway(entry, posting, Some(rules), settles),
    }
    if let Some(incident) = price_incident {
        Box::pin(app.raise_price_incidents(vec![incident])).await;
    }
}

/// Generation speed: output over the time after the first token (for whole answers,
/// over the whole latency: the first token's time is unknown).
fn generation_speed(call: &Call, tokens: &TokenMap, ended: &Ended) -> Option<u64> {
    let output: u64 = tokens
        .iter()
        .filter(|t| matches!(t.direction, Direction::Output | Direction::Reasoning))
        .map(|t| t.count.unsigned_abs())
        .sum();
    let generating = match (call.info.stream, ended.ttft) {
        (true, Some(t)) => ended.latency.saturating_sub(t),
        _ => ended.latency,
    };
    (output > 0 && !generating.is_zero()).then(|| {
        u64::try_from(u128::from(output) * 1_000_000 / generating.as_micros().max(1))
            .unwrap_or(u64::MAX)
    })
}

/// The request's usage entry: what it consumed, how it went (`quality`), and who the
/// engine counted it on (key, session), so other nodes count it there too.
fn usage_entry(
    call: &mut Call,
    meter: &mut Meter,
    upstream: &str,
    measured: Measured,
    ended: &Ended,
    partial: bool,
    output_tokens_per_sec: Option<u64>,
) -> Entry {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Entry::new(
        call.at,
        call.caller.key.account.clone(),
        EntryBody::Usage(Usage {
            service: call.endpoint.service().to_string(),
            model: Some(std::mem::take(&mut call.info.model)),
            tokens: measured.tokens,
            source: Some(ciyuan_core::GATEWAY_SOURCE.into()),
            event_id: Some(std::mem::take(&mut call.request_id)),
            definition: Some(call.endpoint.definition().into()),
            partial,
            quality: Some(Box::new(Quality {
                upstream: upstream.to_string(),
                status: ended.status,
                stream: call.info.stream,
                ttft_us: ended.ttft.map(micros),
                latency_us: micros(ended.latency),
                output_tokens_per_sec,
                failure: meter.failure.map(str::to_string),
                estimated: measured.estimated,
                uncounted: measured.uncounted,
                served_model: meter.shown.served.model.take(),
                system_fingerprint: meter.shown.served.fingerprint.take(),
                // Only the Responses API keeps answers to be retrieved by their id.
                response_id: (call.endpoint.dialect() == super::protocol::Dialect::Responses)
                    .then(|| meter.shown.served.id.clone())
                    .flatten(),
                // The header names the request where the provider sends one; else the
                // answer's id does.
                provider_request_id: call
                    .upstream_request_id
                    .take()
                    .or_else(|| meter.shown.served.id.take()),
            })),
            recount: measured.recount,
            tier: call.info.service_tier,
            key: Some(call.caller.key.key_id.clone()),
            session: call.session.clone(),
            tags: std::mem::take(&mut call.tags),
            ..Usage::default()
        }),
    )
}

/// Settles the reservation to what was consumed (or releases it: nothing was),
/// charges the wallet (the `consume` posting to append beside the entry, its memo
/// naming the request) and names the request's hold across nodes as counted here, as
/// one step for the node's admissions (`holds::CountedHere`). What the budgets
/// settled, the wallet's posting, and what the holds across nodes count once the
/// entry is appended (the usage entry's index is what other nodes follow to).
fn settle_engines(
    app: &Arc<App>,
    call: &mut Call,
    usage: &Usage,
    billable: bool,
) -> (
    Option<ciyuan_budget::Settled>,
    Option<(ciyuan_core::AccountPath, ciyuan_core::Posting)>,
    Option<crate::holds::Settling>,
) {
    let cost = usage
        .rating
        .as_ref()
        .filter(|_| billable)
        .map(|r| ciyuan_core::Money {
            amount: r.amount,
            currency: r.currency,
        });
    let _gate = call.shared.as_ref().map(|_| app.counting_gate());
    let settled = match call.reservation {
        Some(r) if billable => {
            let tokens = &usage.tokens;
            Some(
                match app.budget.settle_cost(r, tokens, cost, Timestamp::now()) {
                    Ok(settled) => settled,
                    // Expired before the request ended: count what it used anyway.
                    Err(_) => app.budget.record_cost(
                        &call.caller.key.account,
                        &call.caller.key.key_id,
                        call.session.as_deref(),
                        tokens,
                        cost,
                        call.at,
                    ),
                },
            )
        }
        Some(r) => {
            app.budget.release(r);
            None
        }
        None => None,
    };
    let charge = app.settle_hold(
        call.hold.take(),
        &call.caller.key.account,
        cost,
        usage.event_id.as_deref(),
    );
    let settles = match call.shared.take() {
        Some(shared) if billable => Some(shared.settling(app, &usage.tokens, cost)),
        other => {
            app.release_across_nodes(other);
            None
        }
    };
    (settled, charge, settles)
}

/// The estimator for models whose tokenizer Ciyuan does not have (admission reserves
/// with it too).
pub(super) const ESTIMATOR: Encoding = Encoding::O200kBase;

/// Ciyuan's own count of a request.
pub(super) struct Counted {
    /// The prompt, tool definitions included.
    pub(super) input: u64,
    /// Of which tool definitions.
    pub(super) tools: u64,
    /// Answer text delivered (tool call arguments included).
    pub(super) output: u64,
    /// Reasoning text delivered.
    pub(super) reasoning: u64,
}

/// Ciyuan's own count of the prompt and of the answer text delivered.
pub(super) fn recount(enc: Encoding, call: &Call, shown: &Shown) -> Option<Counted> {
    let (input, tools) = match call.input_estimate {
        Some(e) if e.encoding == enc => (e.input, e.tools),
        _ => count_input(enc, &call.info)?,
    };
    let (output, reasoning) = if call.endpoint == Endpoint::Embeddings {
        (0, 0)
    } else {
        (
            enc.count(&shown.text).ok()? as u64,
            enc.count(&shown.reasoning).ok()? as u64,
        )
    };
    Some(Counted {
        input,
        tools,
        output,
        reasoning,
    })
}

/// The prompt's tokens as Ciyuan counts them, and how many of them are tool
/// definitions.
pub(super) fn count_input(enc: Encoding, info: &RequestInfo) -> Option<(u64, u64)> {
    let input = if !info.messages.is_empty() {
        let msgs: Vec<ChatMessage<'_>> = info
            .messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role,
                content,
                name: None,
            })
            .collect();
        estimate_chat(enc, &msgs).ok()?
    } else {
        let mut n = 0;
        for p in &info.prompts {
            n += enc.count(p).ok()?;
        }
        n
    };
    let tools = if info.tools_text.is_empty() {
        0
    } else {
        enc.count(&info.tools_text).ok()?
    };
    Some(((input + tools) as u64, tools as u64))
}
