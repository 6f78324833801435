//! OpenTelemetry tracing: a check continues the proxy's trace (W3C `traceparent`/`tracestate`,
//! or B3, from the request's headers or from the gRPC call's metadata) and is exported over
//! OTLP/gRPC as a `sandgate.check` span with children for authentication, instantiation,
//! evaluation and the answer.
//!
//! Off unless `[tracing] otlp_endpoint` is set, and then free for checks that are not sampled.
//! The spans are built once the check has been answered, from timestamps taken along the way:
//! nothing is exported, and no context is carried, on the request path itself.

use crate::config::TracingConfig;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample};
use sandgate_runtime::bindings::sandgate::policy::types::Header;
use std::time::{Duration, Instant, SystemTime};

/// The exporter and the tracer checks record with.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// `sample_ratio`, for checks whose caller left the decision to Sandgate.
    ratio: Sampler,
}

impl Tracing {
    /// Start exporting to `config.otlp_endpoint` (from the tokio runtime this is called on).
    pub fn start(config: &TracingConfig) -> Result<Tracing, String> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("[tracing] cannot set up the OTLP exporter: {e}"))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sandgate");
        Ok(Tracing { provider, tracer, ratio: Sampler::TraceIdRatioBased(config.sample_ratio) })
    }

    /// Export what is buffered and stop.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
        }
    }

    /// Record the spans of one answered check.
    pub fn record(&self, check: &CheckTrace, end: Instant, attributes: Vec<KeyValue>, denied: bool) {
        let at = |instant: Instant| check.started + instant.saturating_duration_since(check.t0);
        let parent = match &check.parent {
            Some(parent) => Context::new().with_remote_span_context(parent.decided(&self.ratio)),
            None => Context::new(),
        };
        let root = self
            .tracer
            .span_builder("sandgate.check")
            .with_kind(SpanKind::Server)
            .with_start_time(check.started)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(root);
        let child = |name: &'static str, start: Instant, stop: Instant, attributes: Vec<KeyValue>| {
            let mut span = self
                .tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(at(start))
                .with_attributes(attributes)
                .start_with_context(&self.tracer, &cx);
            opentelemetry::trace::Span::end_with_timestamp(&mut span, at(stop));
        };
        if let Some(auth) = &check.authenticate {
            child(
                "sandgate.authenticate",
                auth.start,
                auth.end,
                vec![
                    KeyValue::new("sandgate.token_cache", auth.cache),
                    KeyValue::new("sandgate.jwks_wait", auth.jwks_wait),
                ],
            );
        }
        if let Some(eval) = &check.evaluate {
            let instantiated = eval.start + eval.instantiate;
            child("sandgate.instantiate", eval.start, instantiated, Vec::new());
            child("sandgate.evaluate", instantiated, instantiated + eval.call, Vec::new());
            child("sandgate.answer", eval.end, end, Vec::new());
        }
        let span = cx.span();
        if denied {
            span.set_status(Status::error("denied"));
        }
        span.end_with_timestamp(at(end));
    }
}

/// What a check measured along the way, for its spans.
pub struct CheckTrace {
    /// The proxy's span, if the request carried one.
    pub parent: Option<Parent>,
    /// Wall-clock time the check started.
    pub started: SystemTime,
    /// The same moment, monotonic.
    pub t0: Instant,
    /// Verifying the bearer token.
    pub authenticate: Option<AuthTrace>,
    /// Running the policy.
    pub evaluate: Option<EvalTrace>,
    /// The policy that ran: id, module digest, snapshot version.
    pub policy: Option<(String, String, u64)>,
}

/// Verifying the bearer token.
pub struct AuthTrace {
    /// When it started and ended.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// `hit`, `miss` or `off`.
    pub cache: &'static str,
    /// Whether it waited for a JWKS fetch (an unknown `kid`).
    pub jwks_wait: bool,
}

/// Running the policy.
pub struct EvalTrace {
    /// When the evaluation was asked for.
    pub start: Instant,
    /// When its answer came back.
    pub end: Instant,
    /// Creating the fresh instance.
    pub instantiate: Duration,
    /// Calling `check`.
    pub call: Duration,
}

impl CheckTrace {
    /// Start measuring a check whose request has `headers`; `metadata` (gRPC call metadata,
    /// consulted first) may hold the caller's trace context too.
    pub fn start(headers: &[Header], metadata: &[Header]) -> CheckTrace {
        let parent = parent_context(metadata).or_else(|| parent_context(headers));
        CheckTrace {
            parent,
            started: SystemTime::now(),
            t0: Instant::now(),
            authenticate: None,
            evaluate: None,
            policy: None,
        }
    }
}

fn get<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.name == name).map(|h| h.value.trim())
}

/// The caller's span, from its trace-context headers.
#[derive(Debug, Clone)]
pub struct Parent {
    /// Its ids and the caller's sampling decision.
    pub span: SpanContext,
    /// The caller left the sampling decision to Sandgate (B3 without a sampling state): the
    /// check is sampled by `sample_ratio`, as a trace Sandgate starts is.
    pub deferred: bool,
}

impl Parent {
    /// The parent span the tracer's sampler (parent-based) sees: the caller's decision, or for
    /// a deferred one, `ratio`'s on the trace id.
    fn decided(&self, ratio: &Sampler) -> SpanContext {
        if !self.deferred {
            return self.span.clone();
        }
        let trace = self.span.trace_id();
        let sampled = ratio.should_sample(None, trace, "sandgate.check", &SpanKind::Server, &[], &[]).decision
            == SamplingDecision::RecordAndSample;
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        SpanContext::new(trace, self.span.span_id(), flags, true, self.span.trace_state().clone())
    }
}

/// The caller's span from W3C Trace Context (`traceparent`, `tracestate`) or B3 (`b3`, or
/// `x-b3-traceid` with `x-b3-spanid` and `x-b3-sampled`).
pub fn parent_context(headers: &[Header]) -> Option<Parent> {
    if let Some(traceparent) = get(headers, "traceparent") {
        return w3c(traceparent, get(headers, "tracestate"));
    }
    if let Some(b3) = get(headers, "b3") {
        let mut parts = b3.split('-');
        let (trace, span) = (parts.next()?, parts.next()?);
        return b3_context(trace, span, parts.next());
    }
    let trace = get(headers, "x-b3-traceid")?;
    let span = get(headers, "x-b3-spanid")?;
    let sampled = get(headers, "x-b3-sampled").or_else(|| get(headers, "x-b3-flags").map(|_| "d"));
    b3_context(trace, span, sampled)
}

fn hex_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

fn w3c(traceparent: &str, tracestate: Option<&str>) -> Option<Parent> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later version may add fields after them.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    hex_id::<1>(version)?;
    let trace = TraceId::from_bytes(hex_id::<16>(trace)?);
    let span = SpanId::from_bytes(hex_id::<8>(span)?);
    let flags = hex_id::<1>(flags)?[0];
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    Some(Parent { span: SpanContext::new(trace, span, TraceFlags::new(flags & 1), true, state), deferred: false })
}

fn b3_context(trace: &str, span: &str, sampled: Option<&str>) -> Option<Parent> {
    let trace = match trace.len() {
        16 => format!("{:0>32}", trace),
        32 => trace.to_owned(),
        _ => return None,
    };
    let trace = TraceId::from_bytes(hex_id::<16>(&trace)?);
    let span = SpanId::from_bytes(hex_id::<8>(span)?);
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    // Absent (or not a sampling state): the caller deferred the decision to Sandgate.
    let (flags, deferred) = match sampled {
        Some("1" | "d" | "true") => (TraceFlags::SAMPLED, false),
        Some("0" | "false") => (TraceFlags::default(), false),
        _ => (TraceFlags::default(), true),
    };
    Some(Parent { span: SpanContext::new(trace, span, flags, true, TraceState::default()), deferred })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<Header> {
        pairs.iter().map(|(n, v)| Header { name: (*n).into(), value: (*v).into() }).collect()
    }

    #[test]
    fn w3c_and_b3_parents_are_read_and_malformed_ones_ignored() {
        let w3c = parent_context(&headers(&[
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "vendor=x"),
        ]))
        .map(|p| {
            (p.span.trace_id().to_string(), p.span.span_id().to_string(), p.span.is_sampled(), p.span.is_remote())
        });
        assert_eq!(w3c, Some(("4bf92f3577b34da6a3ce929d0e0e4736".into(), "00f067aa0ba902b7".into(), true, true)));
        let b3 = parent_context(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]))
            .map(|p| (p.span.trace_id().to_string(), p.span.span_id().to_string(), p.span.is_sampled()));
        assert_eq!(b3, Some(("80f198ee56343ba864fe8b2a57d3eff7".into(), "e457b5a2e4d86bd1".into(), true)));
        let b3_multi = parent_context(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]))
        .map(|p| (p.span.trace_id().to_string(), p.span.is_sampled()));
        assert_eq!(b3_multi, Some(("0000000000000000a3ce929d0e0e4736".into(), false)));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(parent_context(&headers(&[("traceparent", bad)])).is_none(), "{bad}");
        }
        // Metadata comes first (Envoy's ext_authz span), then the request's own headers.
        let from_metadata = CheckTrace::start(
            &headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]),
            &headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")]),
        );
        assert_eq!(from_metadata.parent.map(|p| p.span.span_id().to_string()), Some("1111111111111111".into()));
    }

    /// Whether the tracer's sampler (parent-based, as `Tracing::start` builds it) samples a
    /// check whose request carries `pairs`, at `ratio`.
    fn sampled(pairs: &[(&str, &str)], ratio: f64) -> bool {
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
        let parent = parent_context(&headers(pairs)).map(|p| p.decided(&Sampler::TraceIdRatioBased(ratio)));
        let Some(parent) = parent else { return false };
        let cx = Context::new().with_remote_span_context(parent.clone());
        let decision =
            sampler.should_sample(Some(&cx), parent.trace_id(), "sandgate.check", &SpanKind::Server, &[], &[]).decision;
        decision == SamplingDecision::RecordAndSample
    }

    #[test]
    fn a_caller_that_defers_sampling_is_sampled_by_the_ratio_and_one_that_decides_is_followed() {
        const TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
        const SPAN: &str = "e457b5a2e4d86bd1";
        let single = |sampled: &str| format!("{TRACE}-{SPAN}{sampled}");
        for ratio in [0.0, 1.0] {
            let by_ratio = ratio == 1.0;
            // Deferred: no sampling state, in either B3 form.
            assert_eq!(sampled(&[("b3", &single(""))], ratio), by_ratio, "b3 deferred at {ratio}");
            assert_eq!(sampled(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)], ratio), by_ratio, "{ratio}");
            // Decided by the caller, whatever the ratio.
            assert!(sampled(&[("b3", &single("-1"))], ratio), "b3 sampled at {ratio}");
            assert!(!sampled(&[("b3", &single("-0"))], ratio), "b3 not sampled at {ratio}");
            let traceparent = |flags: &str| format!("00-{TRACE}-{SPAN}-{flags}");
            assert!(sampled(&[("traceparent", &traceparent("01"))], ratio), "{ratio}");
            assert!(!sampled(&[("traceparent", &traceparent("00"))], ratio), "{ratio}");
            let decided = [("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")];
            assert!(!sampled(&decided, ratio), "{ratio}");
        }
    }
}
