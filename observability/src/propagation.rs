//! The W3C `traceparent` carried inside signed commands (field `Command.traceparent`): the
//! agent dials out and may sit behind NAT, so trace context cannot ride on a request of the
//! coordinator's; it travels in the command, covered by its signature.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Header<'a>(&'a mut Option<String>);

impl Injector for Header<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            *self.0 = Some(value);
        }
    }
}

struct Parent<'a>(&'a str);

impl Extractor for Parent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The W3C traceparent of `span`, or empty when it is not exported.
pub fn traceparent_of(span: &tracing::Span) -> String {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return String::new();
    }
    let mut header = None;
    TraceContextPropagator::new().inject_context(&context, &mut Header(&mut header));
    header.unwrap_or_default()
}

/// Makes `span` a child of the span named by `traceparent` (ignored when empty or invalid).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&Parent(traceparent));
    if context.span().span_context().is_valid() {
        // Only fails when the span is not recorded by the OpenTelemetry layer (export off):
        // then there is no trace to join.
        let _ = span.set_parent(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_without_an_exporter_have_no_traceparent_and_bad_parents_are_ignored() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), "");
        // Neither panics nor attaches anything.
        set_parent(&span, "");
        set_parent(&span, "not-a-traceparent");
        assert_eq!(traceparent_of(&span), "");
    }
}
