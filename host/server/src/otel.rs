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
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use sandgate_runtime::bindings::sandgate::policy::types::Header;
use std::time::{Duration, Instant, SystemTime};

/// The exporter and the tracer checks record with.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
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
        let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(config.sample_ratio),
        ));
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sandgate");
        Ok(Tracing { provider, tracer })
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
            Some(span_context) => Context::new().with_remote_span_context(span_context.clone()),
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
    pub parent: Option<SpanContext>,
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

/// The caller's span from W3C Trace Context (`traceparent`, `tracestate`) or B3 (`b3`, or
/// `x-b3-traceid` with `x-b3-spanid` and `x-b3-sampled`).
pub fn parent_context(headers: &[Header]) -> Option<SpanContext> {
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

fn w3c(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
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
    Some(SpanContext::new(trace, span, TraceFlags::new(flags & 1), true, state))
}

fn b3_context(trace: &str, span: &str, sampled: Option<&str>) -> Option<SpanContext> {
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
    // Absent: the caller deferred the decision; sampled here by the ratio, as a root would be.
    let flags = match sampled {
        Some("1" | "d" | "true") => TraceFlags::SAMPLED,
        _ => TraceFlags::default(),
    };
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
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
        .map(|c| (c.trace_id().to_string(), c.span_id().to_string(), c.is_sampled(), c.is_remote()));
        assert_eq!(w3c, Some(("4bf92f3577b34da6a3ce929d0e0e4736".into(), "00f067aa0ba902b7".into(), true, true)));
        let b3 = parent_context(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]))
            .map(|c| (c.trace_id().to_string(), c.span_id().to_string(), c.is_sampled()));
        assert_eq!(b3, Some(("80f198ee56343ba864fe8b2a57d3eff7".into(), "e457b5a2e4d86bd1".into(), true)));
        let b3_multi = parent_context(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]))
        .map(|c| (c.trace_id().to_string(), c.is_sampled()));
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
        assert_eq!(from_metadata.parent.map(|c| c.span_id().to_string()), Some("1111111111111111".into()));
    }
}
