//! Plots of a real migration: `migrate --plot FILE` writes the SVG of the report it prints,
//! and `report plot` draws the same from the saved `--json` report; bad input is an error
//! that says what is wrong, never a panic.

use vmig_tests::{AgentOpts, Cluster, BUSY_VM};

#[test]
fn e2e_migrate_plot_and_report_plot_draw_the_report() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    c.create_vm("hostA", "vm1", BUSY_VM);
    let svg = c.dir().join("vm1.svg");
    let svg_arg = svg.to_str().unwrap();
    let o = c.migrate_raw("hostA", "vm1", "hostB", &["--plot", svg_arg]);
    assert!(o.success(), "{o}\n{}", c.logs());
    let report: serde_json::Value = serde_json::from_str(&o.stdout).expect("the JSON report");
    c.assert_migrated(&report, "vm1", "hostA", "hostB");
    assert!(o.stderr.contains("plot: wrote"), "{o}");
    let drawn = std::fs::read_to_string(&svg).expect("the plot");
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    assert!(drawn.contains("vm1: hostA → hostB"), "{drawn}");
    assert!(drawn.contains("(a) pages per round"));

    // The saved report, drawn again: the default output is beside it.
    let saved = c.dir().join("vm1.json");
    std::fs::write(&saved, &o.stdout).unwrap();
    let p = c.ok(&["report", "plot", saved.to_str().unwrap()]);
    let again = std::fs::read_to_string(c.dir().join("vm1.svg")).expect("REPORT.svg");
    assert!(p.stdout.contains("vm1.svg"), "{p}");
    assert!(again.contains("(c) downtime"));

    // Not a report, and no file: errors that say so.
    let junk = c.dir().join("junk.json");
    std::fs::write(&junk, "{\"hello\": 1}").unwrap();
    let e = c.fails(&["report", "plot", junk.to_str().unwrap()]);
    assert!(e.stderr.contains("not a migration report"), "{e}");
    assert!(!e.stderr.contains("panicked"), "{e}");
    let e = c.fails(&["report", "plot", "/nonexistent/r.json"]);
    assert!(e.stderr.contains("cannot read the report"), "{e}");
    // A --plot into a folder that does not exist is refused before the VM moves.
    let e = c.fails(&[
        "--host",
        "hostB",
        "migrate",
        "vm1",
        "hostA",
        "--plot",
        "/nonexistent/x.svg",
    ]);
    assert!(e.stderr.contains("no folder /nonexistent"), "{e}");
    c.assert_counting("hostB", "vm1", 0);
}
