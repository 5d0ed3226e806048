//! `vmig trace VM`: attaches the vmig-ebpf probes to one VM (its VMM process, vCPU threads and
//! guest memory) and shows what the kernel sees, live: per-second rates of dirty-ring pushes,
//! distinct dirty pages, ring-full exits, KVM faults and exits, VMM faults on guest memory and
//! their userfaultfd resolution; the busiest 2 MiB guest regions; and post-copy fault latency.
//!
//! `--events` prints the individual events instead (`--json`: one JSON object per line).
//!
//! This file holds the arguments and the loop that attaches, polls and prints; everything
//! that can be computed without a kernel is a pure function, unit-tested in `tests.rs`: the
//! figures (deltas, rates, region grouping, percentiles) in `stats.rs`, the rendering (table,
//! JSON, event lines) in `render.rs`.

mod render;
mod stats;
#[cfg(test)]
mod tests;

use render::*;
use stats::*;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;
use vmig_ebpf::{exit_reason_name, Counters, Event, EventStream, VmFilter, VmProbes};

use vmig::inventory::{VmInfo, VmState};

/// Guest-physical region size used to group faults and dirty pushes.
const REGION_SHIFT: u32 = 21; // 2 MiB
const PAGE_SHIFT: u32 = 12;
/// Events handled per wake-up before looking at the timers again.
const EVENT_BATCH: usize = 4096;

/// Options of `vmig trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// VM to trace (must be running on a local agent).
    name: String,
    /// Refresh period of the table, ms.
    #[arg(long, default_value_t = 1000)]
    interval: u64,
    /// Print individual events, one line each, instead of the table.
    #[arg(long)]
    events: bool,
    /// JSON lines: one object per event with --events, else one object per interval.
    #[arg(long)]
    json: bool,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Rows of the exit-reason and guest-region tables.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Counters only: attach without the event ring (cheapest; no regions or latencies).
    #[arg(long, conflicts_with = "events")]
    counters_only: bool,
    /// Wait for the VM to be running (e.g. while it is arriving by migration).
    #[arg(long)]
    wait: bool,
}

/// The part of `VmInfo` the probes are filtered on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    pid: u32,
    /// Index = vCPU; 0 = thread not started yet.
    tids: Vec<u32>,
    mem_start: u64,
    mem_len: u64,
}

impl Target {
    fn of(info: &VmInfo) -> Option<Target> {
        let pid = info.pid?;
        let (mem_start, mem_len) = info.memory_range?;
        if info.vcpu_tids.is_empty() {
            return None;
        }
        Some(Target {
            pid,
            tids: info
                .vcpu_tids
                .iter()
                .map(|&t| u32::try_from(t).unwrap_or(0))
                .collect(),
            mem_start,
            mem_len,
        })
    }
}

/// How the VM's identity moved between two looks at it.
#[derive(Debug, PartialEq, Eq)]
enum TidChange {
    Same,
    /// Threads that started since (vCPU index, tid): add them to the filter.
    Started(Vec<(u32, u32)>),
    /// A running thread was replaced or the process/memory changed: this is another VM instance.
    Replaced(String),
}

fn compare_targets(old: &Target, new: &Target) -> TidChange {
    if old.pid != new.pid {
        return TidChange::Replaced(format!("VMM pid {} -> {}", old.pid, new.pid));
    }
    if (old.mem_start, old.mem_len) != (new.mem_start, new.mem_len) {
        return TidChange::Replaced("guest memory mapping changed".into());
    }
    if old.tids.len() != new.tids.len() {
        return TidChange::Replaced(format!(
            "vCPU count {} -> {}",
            old.tids.len(),
            new.tids.len()
        ));
    }
    let mut started = Vec::new();
    for (i, (&o, &n)) in old.tids.iter().zip(&new.tids).enumerate() {
        if o == n {
            continue;
        }
        if o == 0 {
            started.push((i as u32, n));
        } else {
            return TidChange::Replaced(format!("vCPU {i} thread {o} -> {n}"));
        }
    }
    if started.is_empty() {
        TidChange::Same
    } else {
        TidChange::Started(started)
    }
}

// ---------------------------------------------------------------------------------------------
// Pure computations.

/// Per-second rate of `delta` over `elapsed` (0 for an empty interval).
const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing if no tracefs is mounted (the library never mounts it).
fn ensure_tracefs() {
    let mounted = [TRACEFS, "/sys/kernel/debug/tracing"]
        .iter()
        .any(|p| Path::new(p).join("events").is_dir());
    if mounted {
        return;
    }
    match std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
    {
        Ok(s) if s.success() => eprintln!("mounted tracefs at {TRACEFS}"),
        // available() then reports NoTracefs with the command to run.
        _ => {}
    }
}

/// BPF program fds this process holds (`anon_inode:bpf-prog`): counts what dropping releases.
fn bpf_prog_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().contains("bpf-prog"))
                .count()
        })
        .unwrap_or(0)
}

fn host_name(sock: &Path) -> String {
    sock.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| sock.display().to_string())
}

/// Output sink: stdout, ending quietly when the reader goes away (`| head`).
struct Out {
    w: std::io::BufWriter<std::io::Stdout>,
    closed: bool,
}

impl Out {
    fn new() -> Self {
        Out {
            w: std::io::BufWriter::with_capacity(1 << 16, std::io::stdout()),
            closed: false,
        }
    }
    fn line(&mut self, s: &str) {
        if !self.closed && writeln!(self.w, "{s}").is_err() {
            self.closed = true;
        }
    }
    fn raw(&mut self, s: &str) {
        if !self.closed && self.w.write_all(s.as_bytes()).is_err() {
            self.closed = true;
        }
    }
    fn flush(&mut self) {
        if !self.closed && self.w.flush().is_err() {
            self.closed = true;
        }
    }
}

/// Why tracing stopped.
enum Stop {
    Duration,
    CtrlC,
    Gone(String),
    OutputClosed,
}

/// Runs `vmig trace`.
pub async fn run(agent: Option<PathBuf>, host: Option<String>, a: TraceArgs) -> Result<()> {
    if a.interval == 0 {
        bail!("--interval must be > 0 ms");
    }
    let sock = super::pick_agent(agent, host, Some(&a.name)).await?;
    let host = host_name(&sock);
    // With --wait, a VM that is not there yet (arriving by migration) or not running is
    // polled for until it runs.
    let (info, target) = loop {
        match super::show(&sock, &a.name).await {
            Ok(i) => match Target::of(&i) {
                Some(t) => break (i, t),
                None if !a.wait => bail!(
                    "{} is {} on {host}: no VMM process or vCPU threads to trace (--wait waits for it)",
                    a.name,
                    i.state
                ),
                None => {}
            },
            Err(e) if !a.wait => return Err(e),
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::signal::ctrl_c() => bail!("interrupted while waiting for {} to run on {host}", a.name),
        }
    };

    ensure_tracefs();
    vmig_ebpf::available()
        .map_err(|e| anyhow!(e))
        .context("kernel-assisted tracing unavailable")?;
    let fds_before = bpf_prog_fds();
    let filter = VmFilter {
        pid: target.pid,
        vcpu_tids: target.tids.clone(),
        mem_start: target.mem_start,
        mem_len: target.mem_len,
    };
    let mut probes = VmProbes::attach(&filter, !a.counters_only)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("attaching the BPF probes to {}", a.name))?;
    // A tid of 0 is a vCPU thread not started yet: attach registered it harmlessly; it is
    // replaced below when it appears. Forget it so that tid 0 (idle) never matches.
    for &t in &target.tids {
        if t == 0 {
            probes.remove_vcpu_tid(0).map_err(|e| anyhow!(e))?;
        }
    }
    let programs = bpf_prog_fds().saturating_sub(fds_before);
    let stream = if a.counters_only {
        None
    } else {
        Some(probes.event_stream().map_err(|e| anyhow!(e))?)
    };
    let json_mode = a.json;
    if !a.events && !json_mode {
        eprintln!(
            "attached {programs} BPF programs to {} on {host} (pid {}, vCPU tids {:?}); Ctrl-C detaches",
            a.name, target.pid, target.tids
        );
    }

    let mut tracer = Tracer {
        args: &a,
        sock: &sock,
        host,
        target,
        state: info.state,
        dirty_mode: info
            .stats
            .as_ref()
            .map(|s| s.dirty_mode.clone())
            .unwrap_or_default(),
        guest_written: info.stats.as_ref().map(|s| s.dirty_pages_written),
        probes,
        stream,
        out: Out::new(),
        tty: std::io::stdout().is_terminal(),
    };
    let started = Instant::now();
    let result = tracer.run_loop(started).await;
    let traced = started.elapsed();
    let total = tracer.probes.counters().ok();
    let Tracer {
        probes,
        stream,
        mut out,
        ..
    } = tracer;
    let fds_attached = bpf_prog_fds();
    drop(stream);
    drop(probes);
    // What dropping the probes released, counted from this process's fds.
    let released = fds_attached.saturating_sub(bpf_prog_fds());
    let stop = result?;
    if let Stop::Gone(why) = &stop {
        out.line(&format!("{}: {why}; detaching", a.name));
    }
    let mut lines = Vec::new();
    if let Some(t) = &total {
        lines.push(summary_line(&a.name, traced, t));
    }
    lines.push(format!("detached: {released} programs released"));
    for l in lines {
        if json_mode || matches!(stop, Stop::OutputClosed) {
            eprintln!("{l}");
        } else {
            out.line(&l);
        }
    }
    out.flush();
    Ok(())
}

struct Tracer<'a> {
    args: &'a TraceArgs,
    sock: &'a Path,
    host: String,
    target: Target,
    state: VmState,
    dirty_mode: String,
    guest_written: Option<u64>,
    probes: VmProbes,
    stream: Option<EventStream>,
    out: Out,
    tty: bool,
}

/// Per-interval accumulation of events.
#[derive(Default)]
struct Window {
    regions: HashMap<u64, RegionCounts>,
    latencies: Vec<u64>,
    events: u64,
}

impl Tracer<'_> {
    async fn run_loop(&mut self, started: Instant) -> Result<Stop> {
        let interval = Duration::from_millis(self.args.interval);
        let deadline = self
            .args
            .duration
            .map(|s| tokio::time::Instant::from_std(started) + Duration::from_secs_f64(s.max(0.0)));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // In --events mode the VM is re-checked every second, independently of --interval.
        let mut check = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut prev = self.probes.counters().map_err(|e| anyhow!(e))?;
        self.probes.start_dirty_window().map_err(|e| anyhow!(e))?;
        let mut last = Instant::now();
        let mut win = Window::default();
        let mut base_ns: Option<u64> = None;
        let mut stream = self.stream.take();
        // Baseline of the guest's own report, taken now rather than before attaching.
        if let Err(stop) = self.recheck().await {
            return Ok(stop);
        }

        let stop = loop {
            let sleep_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let next_event = async {
                match stream.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut ctrl_c => break Stop::CtrlC,
                _ = sleep_deadline => {
                    if !self.args.events && last.elapsed() >= interval / 4 {
                        if let Err(stop) = self.tick(&mut prev, &mut last, &mut win, started, stream.as_mut()).await {
                            break stop;
                        }
                    }
                    break Stop::Duration;
                }
                _ = ticker.tick(), if !self.args.events => {
                    if let Err(stop) = self.tick(&mut prev, &mut last, &mut win, started, stream.as_mut()).await {
                        break stop;
                    }
                }
                _ = check.tick(), if self.args.events => {
                    if let Err(stop) = self.recheck().await {
                        break stop;
                    }
                    self.out.flush();
                }
                ev = next_event => {
                    let Some(first) = ev else {
                        break Stop::Gone("the BPF event ring failed".into());
                    };
                    let s = stream.as_mut().expect("stream");
                    let mut batch = vec![first];
                    while batch.len() < EVENT_BATCH {
                        match s.try_next() {
                            Some(e) => batch.push(e),
                            None => break,
                        }
                    }
                    for e in &batch {
                        self.handle_event(e, &mut win, &mut base_ns);
                    }
                    if self.args.events {
                        self.out.flush();
                    }
                }
            }
            if self.out.closed {
                break Stop::OutputClosed;
            }
        };
        self.stream = stream;
        Ok(stop)
    }

    fn handle_event(&mut self, e: &Event, win: &mut Window, base_ns: &mut Option<u64>) {
        let (start, len) = (self.target.mem_start, self.target.mem_len);
        if self.args.events {
            if self.args.json {
                self.out.line(&event_json(e, start, len).to_string());
            } else {
                let ts = event_ts(e);
                let base = *base_ns.get_or_insert(ts);
                self.out.line(&event_line(e, base, start, len));
            }
            return;
        }
        win.events += 1;
        add_region(&mut win.regions, e, start, len);
        if let Event::UserFaultResolved { latency_ns, .. } = *e {
            win.latencies.push(latency_ns);
        }
    }

    /// Looks at the VM again: `Err` when it is gone or is another instance now.
    async fn recheck(&mut self) -> std::result::Result<Option<u64>, Stop> {
        let info = match super::show(self.sock, &self.args.name).await {
            Ok(i) => i,
            Err(e) => {
                return Err(Stop::Gone(format!(
                    "no longer on {} ({:#}): migrated away or destroyed",
                    self.host, e
                )))
            }
        };
        let Some(new) = Target::of(&info) else {
            return Err(Stop::Gone(format!(
                "now {} on {}: its vCPU threads are gone",
                info.state, self.host
            )));
        };
        match compare_targets(&self.target, &new) {
            TidChange::Same => {}
            TidChange::Started(v) => {
                for (vcpu, tid) in v {
                    self.probes
                        .add_vcpu_tid(tid, vcpu)
                        .map_err(|e| Stop::Gone(format!("cannot add vCPU {vcpu} thread: {e}")))?;
                }
                self.target = new;
            }
            TidChange::Replaced(why) => {
                return Err(Stop::Gone(format!(
                    "vCPU threads changed ({why}): the VM was restarted or migrated"
                )))
            }
        }
        if info.state != self.state {
            self.state = info.state;
        }
        let written = info.stats.as_ref().map(|s| s.dirty_pages_written);
        let grew = match (self.guest_written, written) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        self.guest_written = written;
        Ok(grew)
    }

    async fn tick(
        &mut self,
        prev: &mut Counters,
        last: &mut Instant,
        win: &mut Window,
        started: Instant,
        stream: Option<&mut EventStream>,
    ) -> std::result::Result<(), Stop> {
        // Events already queued belong to this interval.
        if let Some(s) = stream {
            let mut base = None;
            while let Some(e) = s.try_next() {
                self.handle_event(&e, win, &mut base);
            }
        }
        let cur = self
            .probes
            .counters()
            .map_err(|e| Stop::Gone(format!("reading the BPF counters failed: {e}")))?;
        let now = Instant::now();
        // New window for distinct dirty pages right after reading the counter.
        let _ = self.probes.start_dirty_window();
        let elapsed = now - *last;
        *last = now;
        let delta = counter_delta(prev, &cur);
        *prev = cur.clone();
        // A VM that is gone still gets its last interval shown, then the reason.
        let check = self.recheck().await;
        let guest_written = check.as_ref().ok().copied().flatten();
        let w = std::mem::take(win);
        let mut lat = w.latencies;
        let snap = Snapshot {
            vm: self.args.name.clone(),
            host: self.host.clone(),
            state: self.state,
            dirty_mode: self.dirty_mode.clone(),
            target: self.target.clone(),
            since_attach: now - started,
            elapsed,
            delta,
            total: cur,
            guest_written,
            regions: top_regions(&w.regions, self.args.top),
            latency: percentiles(&mut lat),
            events_read: self.stream_present().then_some(w.events),
            top: self.args.top,
        };
        if self.args.json {
            self.out.line(&snapshot_json(&snap).to_string());
        } else if self.tty {
            self.out.raw("\x1b[2J\x1b[H");
            self.out.raw(&render_table(&snap));
        } else {
            self.out.raw(&render_table(&snap));
            self.out.line("");
        }
        self.out.flush();
        check.map(|_| ())
    }

    fn stream_present(&self) -> bool {
        !self.args.counters_only
    }
}

fn event_ts(e: &Event) -> u64 {
    match *e {
        Event::KvmPageFault { ts_ns, .. }
        | Event::DirtyRingPush { ts_ns, .. }
        | Event::DirtyRingFull { ts_ns, .. }
        | Event::DirtyRingReset { ts_ns, .. }
        | Event::UserFault { ts_ns, .. }
        | Event::UserFaultResolved { ts_ns, .. } => ts_ns,
    }
}
