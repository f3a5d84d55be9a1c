//! Prometheus metrics of the gateway, in the text exposition format at `/metrics`.
//!
//! Written by hand: a handful of counters and histograms updated once per request
//! (never per chunk) under one short lock; a metrics crate plus exporter would add
//! more dependencies than this file has lines.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the generation-speed histogram, in output tokens per second.
const TPS_BUCKETS: [u64; 10] = [5, 10, 20, 35, 50, 75, 100, 150, 250, 500];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum_us: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum_us += u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    }
}

/// One model's counters on one upstream.
#[derive(Default)]
struct Series {
    requests: BTreeMap<u16, u64>,
    tokens: BTreeMap<(ciyuan_core::Modality, ciyuan_core::Direction), u64>,
    partial: u64,
    flagged: u64,
}

/// One upstream's series and histograms.
#[derive(Default)]
struct Upstream {
    models: BTreeMap<String, Series>,
    ttft: Histogram,
    latency: Histogram,
    tps: ([u64; TPS_BUCKETS.len()], u64, u64),
}

/// Keyed by upstream, then model: looked up by `&str`, so recording a request
/// allocates nothing once its upstream and model have been seen.
#[derive(Default)]
struct Inner {
    upstreams: BTreeMap<String, Upstream>,
    /// Model labels given out so far, across upstreams.
    models: std::collections::HashSet<String>,
    /// Token counts (Anthropic's `count_tokens`) by upstream and status: passed to a
    /// provider, never billed, so they show here and nowhere in the ledger.
    count_tokens: BTreeMap<(String, u16), u64>,
    /// Stored Responses' calls (`get`, `delete`, `input_items`, `cancel`) passed to a
    /// provider, by upstream, call and status; never billed either.
    retrievals: BTreeMap<(String, &'static str, u16), u64>,
}

/// The model label of requests for models beyond the first `max_models` seen.
pub const OTHER_MODEL: &str = "other";

/// One finished request, as the metrics see it.
pub struct Observation<'a> {
    /// The provider's configured name.
    pub upstream: &'a str,
    /// The model asked for.
    pub model: &'a str,
    /// The status the client got.
    pub status: u16,
    /// Time to first token, if one came.
    pub ttft: Option<Duration>,
    /// Total time.
    pub latency: Duration,
    /// Tokens recorded, by `modality.direction`.
    pub tokens: &'a ciyuan_core::TokenMap,
    /// Whether the measurement is partial.
    pub partial: bool,
    /// Whether the recount disagreed beyond tolerance.
    pub flagged: bool,
    /// Output tokens per second, when measurable.
    pub output_tokens_per_sec: Option<u64>,
}

/// The gateway's metrics.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Distinct model labels kept; requests for further models count as `other`.
    max_models: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(DEFAULT_MAX_MODELS)
    }
}

/// Distinct model labels kept by default.
pub const DEFAULT_MAX_MODELS: usize = 200;

impl Metrics {
    /// Metrics keeping at most `max_models` distinct model labels: model names are the
    /// clients' to choose, and every label is a series kept for good.
    pub fn new(max_models: usize) -> Metrics {
        Metrics {
            inner: Mutex::default(),
            max_models,
        }
    }

    /// Records one finished request.
    pub fn observe(&self, o: &Observation<'_>) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let model = if m.models.contains(o.model) {
            o.model
        } else if m.models.len() < self.max_models {
            m.models.insert(o.model.to_string());
            o.model
        } else {
            OTHER_MODEL
        };
        if !m.upstreams.contains_key(o.upstream) {
            m.upstreams
                .insert(o.upstream.to_string(), Upstream::default());
        }
        let Some(u) = m.upstreams.get_mut(o.upstream) else {
            return;
        };
        if !u.models.contains_key(model) {
            u.models.insert(model.to_string(), Series::default());
        }
        if let Some(series) = u.models.get_mut(model) {
            *series.requests.entry(o.status).or_default() += 1;
            for t in o.tokens.iter() {
                // Counts are what providers report: absurd ones must not stop the
                // recording (a panic here lost the request's ledger entry in debug
                // builds; release builds wrapped). The counter stays at its ceiling.
                let counter = series.tokens.entry((t.modality, t.direction)).or_default();
                *counter = counter.saturating_add(u64::try_from(t.count).unwrap_or(0));
            }
            series.partial += u64::from(o.partial);
            series.flagged += u64::from(o.flagged);
        }
        if let Some(t) = o.ttft {
            u.ttft.observe(t);
        }
        u.latency.observe(o.latency);
        if let Some(tps) = o.output_tokens_per_sec {
            for (i, b) in TPS_BUCKETS.iter().enumerate() {
                if tps <= *b {
                    u.tps.0[i] += 1;
                }
            }
            u.tps.1 += 1;
            u.tps.2 = u.tps.2.saturating_add(tps);
        }
    }

    /// Records one token count asked of `upstream` and the status the client got.
    /// Upstreams are the configured providers, so the series are bounded.
    pub fn observe_count_tokens(&self, upstream: &str, status: u16) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.count_tokens
            .entry((upstream.to_string(), status))
            .or_insert(0) += 1;
    }

    /// Records one stored-Response call (`call`) passed to `upstream` and the status
    /// the client got. Upstreams and calls are bounded sets, so the series are.
    pub fn observe_retrieval(&self, upstream: &str, call: &'static str, status: u16) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.retrievals
            .entry((upstream.to_string(), call, status))
            .or_insert(0) += 1;
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let esc = escape;
        let _ = writeln!(
            out,
            "# HELP ciyuan_gateway_count_tokens_total Token counts (count_tokens) passed to a provider, by upstream and status; never billed.\n# TYPE ciyuan_gateway_count_tokens_total counter"
        );
        for ((u, s), n) in &m.count_tokens {
            let _ = writeln!(
                out,
                "ciyuan_gateway_count_tokens_total{{upstream=\"{}\",status=\"{s}\"}} {n}",
                esc(u)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ciyuan_gateway_response_retrievals_total Calls on stored Responses (get, delete, input_items, cancel) passed to a provider, by upstream, call and status; never billed.\n# TYPE ciyuan_gateway_response_retrievals_total counter"
        );
        for ((u, call, s), n) in &m.retrievals {
            let _ = writeln!(
                out,
                "ciyuan_gateway_response_retrievals_total{{upstream=\"{}\",call=\"{call}\",status=\"{s}\"}} {n}",
                esc(u)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ciyuan_gateway_requests_total Gateway requests by upstream, model and status.\n# TYPE ciyuan_gateway_requests_total counter"
        );
        let each = |f: &mut dyn FnMut(&str, &str, &Series)| {
            for (u, up) in &m.upstreams {
                for (model, series) in &up.models {
                    f(&esc(u), &esc(model), series);
                }
            }
        };
        each(&mut |u, model, series| {
            for (s, n) in &series.requests {
                let _ = writeln!(
                    out,
                    "ciyuan_gateway_requests_total{{upstream=\"{u}\",model=\"{model}\",status=\"{s}\"}} {n}"
                );
            }
        });
        let _ = writeln!(
            out,
            "# HELP ciyuan_gateway_tokens_total Tokens metered by the gateway.\n# TYPE ciyuan_gateway_tokens_total counter"
        );
        each(&mut |u, model, series| {
            for ((md, d), n) in &series.tokens {
                let _ = writeln!(
                    out,
                    "ciyuan_gateway_tokens_total{{upstream=\"{u}\",model=\"{model}\",token=\"{md}.{d}\"}} {n}"
                );
            }
        });
        for (name, help, pick) in [
            (
                "ciyuan_gateway_partial_total",
                "Requests metered partially (cut, disconnected, no usage).",
                (|s: &Series| s.partial) as fn(&Series) -> u64,
            ),
            (
                "ciyuan_gateway_recount_flagged_total",
                "Requests whose recount disagreed with the provider beyond tolerance.",
                |s: &Series| s.flagged,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            each(&mut |u, model, series| {
                let n = pick(series);
                if n > 0 {
                    let _ = writeln!(out, "{name}{{upstream=\"{u}\",model=\"{model}\"}} {n}");
                }
            });
        }
        for (name, help, pick) in [
            (
                "ciyuan_gateway_ttft_seconds",
                "Time to first token.",
                (|u: &Upstream| &u.ttft) as fn(&Upstream) -> &Histogram,
            ),
            (
                "ciyuan_gateway_latency_seconds",
                "Total request latency.",
                |u: &Upstream| &u.latency,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (u, up) in &m.upstreams {
                let h = pick(up);
                if h.count == 0 {
                    continue;
                }
                let u = esc(u);
                for (b, c) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(out, "{name}_bucket{{upstream=\"{u}\",le=\"{b}\"}} {c}");
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{upstream=\"{u}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "{name}_sum{{upstream=\"{u}\"}} {}.{:06}",
                    h.sum_us / 1_000_000,
                    h.sum_us % 1_000_000
                );
                let _ = writeln!(out, "{name}_count{{upstream=\"{u}\"}} {}", h.count);
            }
        }
        let name = "ciyuan_gateway_output_tokens_per_second";
        let _ = writeln!(
            out,
            "# HELP {name} Output tokens per second after the first token.\n# TYPE {name} histogram"
        );
        for (u, up) in &m.upstreams {
            let (counts, count, sum) = &up.tps;
            if *count == 0 {
                continue;
            }
            let u = esc(u);
            for (b, c) in TPS_BUCKETS.iter().zip(counts) {
                let _ = writeln!(out, "{name}_bucket{{upstream=\"{u}\",le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{upstream=\"{u}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{upstream=\"{u}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{upstream=\"{u}\"}} {count}");
        }
        out
    }
}

/// A label value as Prometheus' text format writes it: backslash, double quote and
/// line feed escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciyuan_core::{Direction, Modality, TokenMap};

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        let mut tokens = TokenMap::new();
        tokens.add(Modality::Text, Direction::Input, 19).unwrap();
        for ms in [3, 40] {
            m.observe(&Observation {
                upstream: "sim",
                model: "gpt-4o",
                status: 200,
                ttft: Some(Duration::from_millis(ms)),
                latency: Duration::from_millis(ms * 2),
                tokens: &tokens,
                partial: ms == 40,
                flagged: false,
                output_tokens_per_sec: Some(ms),
            });
        }
        let text = m.render();
        assert!(text.contains(
            "ciyuan_gateway_requests_total{upstream=\"sim\",model=\"gpt-4o\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "ciyuan_gateway_tokens_total{upstream=\"sim\",model=\"gpt-4o\",token=\"text.input\"} 38"
        ));
        assert!(
            text.contains("ciyuan_gateway_ttft_seconds_bucket{upstream=\"sim\",le=\"0.005\"} 1")
        );
        assert!(
            text.contains("ciyuan_gateway_ttft_seconds_bucket{upstream=\"sim\",le=\"0.05\"} 2")
        );
        assert!(text.contains("ciyuan_gateway_latency_seconds_sum{upstream=\"sim\"} 0.086000"));
        assert!(text.contains("ciyuan_gateway_partial_total{upstream=\"sim\",model=\"gpt-4o\"} 1"));
        assert!(text.contains(
            "ciyuan_gateway_output_tokens_per_second_bucket{upstream=\"sim\",le=\"5\"} 1"
        ));
        assert!(text.contains("ciyuan_gateway_output_tokens_per_second_count{upstream=\"sim\"} 2"));
    }

    fn observe(m: &Metrics, model: &str) {
        m.observe(&Observation {
            upstream: "sim",
            model,
            status: 200,
            ttft: None,
            latency: Duration::from_millis(1),
            tokens: &TokenMap::new(),
            partial: false,
            flagged: false,
            output_tokens_per_sec: None,
        });
    }

    #[test]
    fn token_counts_are_counted_by_upstream_and_status() {
        let m = Metrics::default();
        m.observe_count_tokens("sim-anthropic", 200);
        m.observe_count_tokens("sim-anthropic", 200);
        m.observe_count_tokens("sim-anthropic", 504);
        let text = m.render();
        assert!(text.contains(
            "ciyuan_gateway_count_tokens_total{upstream=\"sim-anthropic\",status=\"200\"} 2\n"
        ));
        assert!(text.contains(
            "ciyuan_gateway_count_tokens_total{upstream=\"sim-anthropic\",status=\"504\"} 1\n"
        ));
        // Counted apart: no request series, no tokens.
        assert!(!text.contains("ciyuan_gateway_requests_total{"));
    }

    #[test]
    fn retrievals_are_counted_by_upstream_call_and_status() {
        let m = Metrics::default();
        m.observe_retrieval("sim-openai", "get", 200);
        m.observe_retrieval("sim-openai", "get", 200);
        m.observe_retrieval("sim-openai", "cancel", 400);
        let text = m.render();
        assert!(text.contains(
            "ciyuan_gateway_response_retrievals_total{upstream=\"sim-openai\",call=\"get\",status=\"200\"} 2\n"
        ), "{text}");
        assert!(text.contains(
            "ciyuan_gateway_response_retrievals_total{upstream=\"sim-openai\",call=\"cancel\",status=\"400\"} 1\n"
        ), "{text}");
        assert!(!text.contains("ciyuan_gateway_requests_total{"));
    }

    #[test]
    fn regression_model_labels_are_bounded_with_an_other_label() {
        let m = Metrics::new(3);
        for i in 0..50 {
            observe(&m, &format!("model-{i}"));
        }
        observe(&m, "model-1");
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("ciyuan_gateway_requests_total{"))
            .count();
        assert_eq!(series, 4, "three models and `other`:\n{text}");
        assert!(text.contains(
            "ciyuan_gateway_requests_total{upstream=\"sim\",model=\"other\",status=\"200\"} 47"
        ));
        assert!(text.contains("model=\"model-1\",status=\"200\"} 2"));
    }

    #[test]
    fn label_values_are_escaped_per_the_text_format() {
        let m = Metrics::default();
        observe(&m, "a\"b\\c\nd");
        let text = m.render();
        assert!(text.contains("model=\"a\\\"b\\\\c\\nd\""), "{text}");
        assert!(
            text.lines().all(|l| !l.starts_with('d')),
            "no raw line feed"
        );
    }
}
