//! Metrics: what `render` writes, read back by `parse_metrics`, and the
//! parser on text it did not write.

use std::collections::BTreeMap;

use tcpr_balance::metrics::{
    histogram_quantile, names, parse_metrics, try_parse_metrics, HeadErrorKind, Metrics, Sample,
    HANDOFF_SECONDS_BUCKETS,
};

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(label, value)| (label.to_string(), value.to_string()))
        .collect();
    samples
        .iter()
        .find(|sample| sample.name == name && sample.labels == wanted)
        .map(|sample| sample.value)
}

#[test]
fn every_fixed_name_has_help_and_type_even_before_any_event() {
    let text = Metrics::new().render();
    for (name, kind) in [
        (names::CONNECTIONS, "counter"),
        (names::HANDOFFS, "counter"),
        (names::FALLBACKS, "counter"),
        (names::PROXIED, "counter"),
        (names::FAILURES, "counter"),
        (names::FLOWS_ACTIVE, "gauge"),
        (names::MEMBER_UP, "gauge"),
        (names::HANDOFF_SECONDS, "histogram"),
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
    }
    assert_eq!(
        value(&parse_metrics(&text), names::FLOWS_ACTIVE, &[]),
        Some(0.0)
    );
}

#[test]
fn events_render_and_parse_back() {
    let metrics = Metrics::new();
    metrics.register_listener("web");
    metrics.register_listener("tls");
    metrics.accepted("web");
    metrics.register_member("red", "10.0.0.3:7700");
    metrics.register_member("red", "10.0.0.4:7700");
    metrics.handoff_ok("red", "10.0.0.3:7700", 0.0007);
    metrics.handoff_ok("red", "10.0.0.3:7700", 0.003);
    metrics.handoff_ok("red", "10.0.0.3:7700", 0.003);
    metrics.handoff_ok("red", "10.0.0.3:7700", 7.5);
    metrics.fallback("red", "10.0.0.3:7700");
    metrics.proxied("blue", "10.0.0.9:8080");
    metrics.failure("no_route");
    metrics.failure("no_route");
    metrics.head_error(HeadErrorKind::Timeout);
    metrics.head_error(HeadErrorKind::Malformed);
    metrics.head_error(HeadErrorKind::TooLarge);
    metrics.set_flows_active(42);
    metrics.set_member_up("red", "10.0.0.4:7700", false);
    metrics.set_member_up("red", "10.0.0.3:7700", true);

    let text = metrics.render();
    let samples = try_parse_metrics(&text).unwrap();
    assert_eq!(
        value(&samples, names::CONNECTIONS, &[("listener", "web")]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, names::CONNECTIONS, &[("listener", "tls")]),
        Some(0.0)
    );
    let red3 = [("pool", "red"), ("member", "10.0.0.3:7700")];
    let red4 = [("pool", "red"), ("member", "10.0.0.4:7700")];
    assert_eq!(value(&samples, names::HANDOFFS, &red3), Some(4.0));
    assert_eq!(
        value(&samples, names::HANDOFFS, &red4),
        Some(0.0),
        "registered members show 0"
    );
    assert_eq!(value(&samples, names::FALLBACKS, &red3), Some(1.0));
    assert_eq!(value(&samples, names::FALLBACKS, &red4), Some(0.0));
    assert_eq!(
        value(
            &samples,
            names::PROXIED,
            &[("pool", "blue"), ("member", "10.0.0.9:8080")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, names::FAILURES, &[("reason", "no_route")]),
        Some(2.0)
    );
    for reason in ["head_timeout", "head_malformed", "head_too_large"] {
        assert_eq!(
            value(&samples, names::FAILURES, &[("reason", reason)]),
            Some(1.0),
            "{reason}"
        );
    }
    assert_eq!(value(&samples, names::FLOWS_ACTIVE, &[]), Some(42.0));
    assert_eq!(value(&samples, names::MEMBER_UP, &red3), Some(1.0));
    assert_eq!(value(&samples, names::MEMBER_UP, &red4), Some(0.0));

    // The histogram: cumulative buckets, +Inf = count, sum.
    let bucket = format!("{}_bucket", names::HANDOFF_SECONDS);
    let at = |le: &str| value(&samples, &bucket, &[("pool", "red"), ("le", le)]);
    assert_eq!(at("0.0005"), Some(0.0));
    assert_eq!(at("0.001"), Some(1.0));
    assert_eq!(at("0.002"), Some(1.0));
    assert_eq!(at("0.005"), Some(3.0));
    assert_eq!(at("5"), Some(3.0));
    assert_eq!(at("+Inf"), Some(4.0));
    let buckets = samples
        .iter()
        .filter(|sample| sample.name == bucket)
        .count();
    assert_eq!(buckets, HANDOFF_SECONDS_BUCKETS.len() + 1);
    assert_eq!(
        value(
            &samples,
            &format!("{}_count", names::HANDOFF_SECONDS),
            &[("pool", "red")]
        ),
        Some(4.0)
    );
    let sum = value(
        &samples,
        &format!("{}_sum", names::HANDOFF_SECONDS),
        &[("pool", "red")],
    )
    .unwrap();
    assert!((sum - 7.5067).abs() < 1e-9, "{sum}");
}

#[test]
fn label_values_are_escaped_and_read_back() {
    let metrics = Metrics::new();
    let reason = "odd \"reason\" with \\ and\nnewline";
    metrics.failure(reason);
    let text = metrics.render();
    assert!(
        text.contains(
            r#"tcpr_balance_failures_total{reason="odd \"reason\" with \\ and\nnewline"} 1"#
        ),
        "{text}"
    );
    let samples = try_parse_metrics(&text).unwrap();
    assert_eq!(
        value(&samples, names::FAILURES, &[("reason", reason)]),
        Some(1.0)
    );
}

#[test]
fn the_parser_reads_text_it_did_not_write() {
    let text = "# HELP x A thing.\n# TYPE x counter\n\
                x 1\n\
                x_total{a=\"1\" , b = \"two\",} 2.5e3 1700000000000\n\
                  spaced{le=\"+Inf\"}   +Inf\n\
                nan_metric NaN\n\
                colon:name{} -3\n\n";
    let samples = try_parse_metrics(text).unwrap();
    assert_eq!(samples.len(), 5);
    assert_eq!(value(&samples, "x", &[]), Some(1.0));
    assert_eq!(
        value(&samples, "x_total", &[("a", "1"), ("b", "two")]),
        Some(2500.0)
    );
    assert_eq!(
        value(&samples, "spaced", &[("le", "+Inf")]),
        Some(f64::INFINITY)
    );
    assert!(value(&samples, "nan_metric", &[]).unwrap().is_nan());
    assert_eq!(value(&samples, "colon:name", &[]), Some(-3.0));
}

#[test]
fn bad_lines_are_refused_by_try_parse_and_skipped_by_parse() {
    for (line, what) in [
        ("{a=\"b\"} 1", "no metric name"),
        ("x", "no value"),
        ("x one", "bad value \"one\""),
        ("x{a=\"b} 1", "label a: unterminated value"),
        ("x{a=b} 1", "label a has no quoted value"),
        ("x{a=\"\\t\"} 1", "bad escape in label a"),
        ("x 1 2 3", "bytes after the value"),
        ("x{-a=\"b\"} 1", "bad label name \"-a\""),
    ] {
        let text = format!("good 1\n{line}\n");
        let error = try_parse_metrics(&text).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("metrics text line 2: {what}"),
            "{line}"
        );
        assert_eq!(parse_metrics(&text).len(), 1, "{line}");
    }
}

#[test]
fn quantiles_from_the_rendered_histogram() {
    let metrics = Metrics::new();
    // 90 fast handoffs (1..2 ms), 10 slow ones (20..50 ms).
    for _ in 0..90 {
        metrics.handoff_ok("red", "m", 0.0015);
    }
    for _ in 0..10 {
        metrics.handoff_ok("blue", "m", 0.03);
    }
    let samples = parse_metrics(&metrics.render());
    let all = |_: &Sample| true;
    let median = histogram_quantile(&samples, names::HANDOFF_SECONDS, 0.5, &all).unwrap();
    assert!(median > 0.001 && median <= 0.002, "{median}");
    let p99 = histogram_quantile(&samples, names::HANDOFF_SECONDS, 0.99, &all).unwrap();
    assert!(p99 > 0.02 && p99 <= 0.05, "{p99}");
    let red_only = |sample: &Sample| sample.label("pool") == Some("red");
    let red_p99 = histogram_quantile(&samples, names::HANDOFF_SECONDS, 0.99, &red_only).unwrap();
    assert!(red_p99 <= 0.002, "{red_p99}");
    assert_eq!(
        histogram_quantile(
            &parse_metrics(&Metrics::new().render()),
            names::HANDOFF_SECONDS,
            0.5,
            &all
        ),
        None
    );
}

#[test]
fn metrics_are_shared_between_threads() {
    let metrics = std::sync::Arc::new(Metrics::new());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let metrics = metrics.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    metrics.handoff_ok("red", "m", 0.001);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let samples = parse_metrics(&metrics.render());
    assert_eq!(
        value(
            &samples,
            names::HANDOFFS,
            &[("pool", "red"), ("member", "m")]
        ),
        Some(4000.0)
    );
}
