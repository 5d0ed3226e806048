//! Plots of real reports (saved from `vmig demo --json` and `vmig migrate --json`), and of
//! reports that are empty, odd or not reports at all.

use super::*;
use crate::migrate::{PostcopyStats, RoundStats};

/// `vmig demo --json --dirty-rate 4000`: the report under `report`, 3 rounds, converged.
const DEMO: &str = include_str!("../../tests/fixtures/demo-precopy.json");
/// `vmig migrate --postcopy auto --bandwidth 40 --verify --json`: a bare report, 2 rounds,
/// the switch to post-copy after round 1.
const POSTCOPY: &str = include_str!("../../tests/fixtures/migrate-postcopy.json");

fn svg_of(json: &str) -> (Report, String) {
    let r = parse_report(json).expect("a report");
    let svg = render_svg(&r, &PlotOptions::default()).expect("a plot");
    (r, svg)
}

/// Elements `<tag ...>` whose attributes include `attr`.
fn elements<'a>(svg: &'a str, tag: &str, attr: &str) -> Vec<&'a str> {
    svg.split('<')
        .filter(|e| e.starts_with(tag) && e.contains(attr))
        .collect()
}

/// The texts of the `<text>` elements, trimmed, entities decoded.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|e| e.split_once('>')?.1.split('<').next())
        .map(|t| {
            t.trim()
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&apos;", "'")
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
        })
        .collect()
}

/// Whether one of `texts` is `s`.
fn holds(texts: &[String], s: &str) -> bool {
    texts.iter().any(|t| t == s)
}

/// A document of balanced tags: every element opened is closed, the root is `<svg>`.
fn well_formed(svg: &str) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
    assert!(svg.trim_end().ends_with("</svg>"));
    let mut open = Vec::new();
    for tag in svg.split('<').skip(1) {
        let head = tag.split('>').next().unwrap();
        let name = head
            .trim_start_matches('/')
            .split([' ', '/'])
            .next()
            .unwrap();
        if head.starts_with('/') {
            assert_eq!(open.pop(), Some(name), "closing {name}");
        } else if !head.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "left open: {open:?}");
    assert!(
        !svg.contains("NaN") && !svg.contains("inf"),
        "no bad numbers"
    );
}

#[test]
fn a_demo_report_plots_its_rounds_switch_and_downtime() {
    let (r, svg) = svg_of(DEMO);
    well_formed(&svg);
    assert_eq!(r.rounds.len(), 3);
    let t = texts(&svg);
    let has = |s: &str| t.iter().any(|x| x.contains(s));
    assert!(
        has("vm1: hostA → hostB, pre-copy, total 1.20 s, downtime 285 ms"),
        "{t:?}"
    );
    for s in [
        "(a) pages per round",
        "(b) link bandwidth and guest dirty rate",
        "(c) downtime: predicted after each round, and actual",
        "pages (4 KiB, log scale)",
        "MiB/s",
        "ms (log scale)",
        "round",
        "stop-and-copy pass",
        "pre-copy stopped (converged)",
        "actual downtime 285 ms",
        // Read from the converged stop reason: the report has no --max-downtime field.
        "--max-downtime 50.0 ms",
    ] {
        assert!(has(s), "{s} in {t:?}");
    }
    assert!(!has("(d) post-copy"));
    // One bar of pages sent per round (and the legend's swatch), in its colour.
    assert_eq!(elements(&svg, "rect", "fill=\"#1F77B4\"").len(), 3 + 1);
    // Dirty at the end of each pre-copy round; none after the stop-and-copy pass.
    assert_eq!(elements(&svg, "rect", "fill=\"#FF7F0E\"").len(), 2 + 1);
    for x in &r.rounds {
        assert!(holds(&t, &x.pages.to_string()), "round {}", x.round);
    }
    // The bandwidth line: a point per round.
    let bw = elements(&svg, "polyline", "stroke=\"#2CA02C\" stroke-width=\"2\"");
    let points = |e: &str| {
        let p = e
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        p.split_whitespace().count()
    };
    assert_eq!(bw.iter().map(|e| points(e)).max(), Some(3), "{bw:?}");
    // Round labels 1..3 on each of the three panels.
    assert_eq!(t.iter().filter(|x| *x == "3").count(), 3);
}

#[test]
fn a_postcopy_report_plots_its_postcopy_panel() {
    let (r, svg) = svg_of(POSTCOPY);
    well_formed(&svg);
    let pc = r.postcopy.clone().unwrap();
    let t = texts(&svg);
    let has = |s: &str| t.iter().any(|x| x.contains(s));
    assert!(has("vm1: hostA → hostB, post-copy"), "{t:?}");
    assert!(has("post-copy switch"));
    assert!(has("(d) post-copy: pages"));
    assert!(has(&format!(
        "fault latency over {} faulted pages",
        pc.latency_count
    )));
    for v in [pc.pages_missing, pc.pages_demand, pc.pages_pushed] {
        assert!(holds(&t, &v.to_string()), "{v} in {t:?}");
    }
    for us in [pc.latency_p50_us, pc.latency_p99_us, pc.latency_max_us] {
        assert!(has(&format!("{us} µs")), "{us} µs");
    }
    // Taller than a pre-copy plot: the post-copy panel is below the rounds.
    let (_, pre) = svg_of(DEMO);
    let height = |s: &str| {
        s.split("height=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert!(height(&svg) > height(&pre) + POSTCOPY_PANEL / 2);
}

#[test]
fn the_given_max_downtime_is_drawn() {
    let r = parse_report(POSTCOPY).unwrap();
    let opts = PlotOptions {
        max_downtime_ms: Some(120.0),
    };
    let svg = render_svg(&r, &opts).unwrap();
    assert!(holds(&texts(&svg), "--max-downtime 120 ms"));
    // Not converged: the stop reason names no bound, and none is drawn without one.
    let (_, svg) = svg_of(POSTCOPY);
    assert!(!svg.contains("--max-downtime"));
}

#[test]
fn a_report_without_rounds_is_an_error() {
    let r = Report {
        vm: "empty".into(),
        ..Default::default()
    };
    let e = render_svg(&r, &PlotOptions::default()).unwrap_err();
    assert!(matches!(e, PlotError::NoRounds(_)));
    assert_eq!(
        e.to_string(),
        "the report of empty has no rounds: nothing to plot"
    );
}

#[test]
fn odd_figures_plot_without_panicking() {
    // One round of zeros and non-numbers, a post-copy with nothing in it.
    let r = Report {
        vm: "odd".into(),
        mode: Mode::PostCopy,
        total_ms: f64::NAN,
        downtime_ms: 0.0,
        rounds: vec![RoundStats {
            round: 1,
            bandwidth: f64::INFINITY,
            dirty_rate: -1.0,
            predicted_downtime_ms: f64::NAN,
            ..Default::default()
        }],
        postcopy: Some(PostcopyStats::default()),
        ..Default::default()
    };
    let svg = render_svg(&r, &PlotOptions::default()).unwrap();
    well_formed(&svg);
    assert!(svg.contains("(d) post-copy"));
}

#[test]
fn many_rounds_thin_the_labels() {
    let rounds = (1..=60u32)
        .map(|i| RoundStats {
            round: i,
            pages: 100_000 / i as u64,
            dirty_pages: 90_000 / i as u64,
            bandwidth: 100.0 * 1048576.0,
            dirty_rate: 20_000.0,
            predicted_downtime_ms: 5000.0 / i as f64,
            ..Default::default()
        })
        .collect();
    let r = Report {
        vm: "long".into(),
        rounds,
        downtime_ms: 80.0,
        ..Default::default()
    };
    let svg = render_svg(&r, &PlotOptions::default()).unwrap();
    well_formed(&svg);
    let t = texts(&svg);
    // Every third round labelled (20 labels a panel), no figures over the bars.
    assert!(holds(&t, "58") && !holds(&t, "57") && !holds(&t, "59"));
    assert!(!holds(&t, "100000"));
    assert_eq!(elements(&svg, "rect", "fill=\"#1F77B4\"").len(), 60 + 1);
}

#[test]
fn reports_are_read_bare_or_under_report() {
    let bare = parse_report(POSTCOPY).unwrap();
    assert_eq!(bare.mode, Mode::PostCopy);
    let wrapped = parse_report(DEMO).unwrap();
    assert_eq!(wrapped.rounds.len(), 3);
}

#[test]
fn what_is_not_a_report_says_so() {
    let not = |s: &str| match parse_report(s) {
        Err(PlotError::NotAReport(m)) => m,
        other => panic!("{s}: {other:?}"),
    };
    assert!(not("").starts_with("not JSON"));
    assert!(not("[1, 2]").contains("not a JSON object"));
    assert!(not(r#"{"vm": "x"}"#).contains("no `rounds`"));
    assert!(not(r#"{"rounds": []}"#).contains("missing field"));
    assert!(not(r#"{"report": {"rounds": "many"}}"#).contains("invalid type"));
    match parse_report(r#"{"error": "migration of vm1 failed: refused"}"#) {
        Err(PlotError::Failed(m)) => assert_eq!(m, "migration of vm1 failed: refused"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_bound_is_read_from_a_converged_reason_only() {
    let c = "converged: predicted downtime 15.50 ms <= 50 ms with 201 dirty pages at 87 MiB/s";
    assert_eq!(bound_in(c), Some(50.0));
    assert_eq!(bound_in("max rounds (30) reached <= 50 ms"), None);
    assert_eq!(bound_in("converged: no figures"), None);
}

#[test]
fn log_axes_tick_at_decades_or_finer() {
    assert_eq!(
        Ticked::log(0.5..400_000.0).ticks,
        [1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
    );
    assert_eq!(
        Ticked::log(5.0..600.0).ticks,
        [5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
    );
    assert_eq!(tick_label(100_000.0), "100k");
    assert_eq!(tick_label(2000.0), "2000");
    assert_eq!(tick_label(0.5), "0.5");
}

#[test]
fn header_lines_wrap() {
    let long = "word ".repeat(100);
    let lines = wrap(&long, 40);
    assert!(lines.iter().all(|l| l.len() <= 40));
    assert_eq!(lines.concat().matches("word").count(), 100);
}
