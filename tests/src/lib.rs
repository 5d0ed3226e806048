//! Helpers for the end-to-end tests (`tests/`) and the benchmarks (`benches/`, whose agents
//! run the release binary: [`ClusterOpts`]).
//!
//! A [`Cluster`] is a set of `vmig agent` processes (one per host) sharing a temporary
//! folder: a hosts file with free ports, one datastore and one log per agent, and a run
//! directory for the control sockets. Every command the helpers run has a timeout, so a
//! wedged agent fails a test instead of hanging it, and dropping the cluster kills its
//! agents (their guests die with them).
//!
//! The guests are emulated by KVM and the machine may have few cores: tests that run VMs
//! hold [`Cluster::new`]'s lock (a process-wide mutex plus a file lock in the system temp
//! folder), so they run one at a time even under `cargo test`'s default parallelism.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmig::api::local::{self, LocalAgent};

/// How long a plain CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent may take to answer after its start.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits for the e2e lock before running anyway.
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// Panics with a clear message when this machine has no usable `/dev/kvm`.
pub fn require_kvm() {
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "no /dev/kvm (or no permission to open it): this end-to-end test runs real KVM VMs; \
         skip it with `cargo test -- --skip e2e`"
    );
}

/// A busy VM for `create_vm`: 256 MiB, vCPU0 rewriting a 32 MiB working set flat out
/// (dirty bitmap: a flat-out writer can jam the ring on this platform), vCPU1 the
/// self-checking counter.
pub const BUSY_VM: &[&str] = &[
    "--memory-mib",
    "256",
    "--vcpus",
    "2",
    "--workload",
    "dirty,counter",
    "--dirty-mib",
    "32",
    "--dirty-tracking",
    "bitmap",
];

/// Options of one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOpts {
    /// `--memory-mib`: guest memory the host may run.
    pub memory_mib: Option<u64>,
    /// `--io`: `uring`, `plain` or `auto`.
    pub io: Option<String>,
    /// `--insecure`: no TLS (the default is mutual TLS with the cluster's certificates).
    pub insecure: bool,
    /// `--pki-dir`: another folder than the cluster's (a certificate of the wrong host,
    /// another CA, expired...).
    pub pki_dir: Option<PathBuf>,
    /// `--control-group`.
    pub control_group: Option<String>,
    /// A fault every outgoing migration of the agent injects (`cut-postcopy`, ...): the
    /// `VMIG_INJECT_FAULT` environment variable of a binary built with `fault-injection`.
    pub fault: Option<String>,
    /// Run the agent inside this network namespace, listening on its address there.
    pub netns: Option<NetnsAddr>,
    /// More `--datastore` arguments after the agent's default one (`NAME=PATH[,shared]`), in
    /// which `{dir}` stands for the cluster's temp folder: `shared={dir}/shared,shared` is one
    /// folder both agents of a cluster see.
    pub datastores: Vec<String>,
    /// More arguments of `vmig agent` (more datastores: `--datastore fast=PATH`).
    pub args: Vec<String>,
    /// A crash point of a cold migration or storage move (`VMIG_CRASH_AT`, see
    /// `vmig::migrate::cold::crash`) of a binary built with `fault-injection`.
    pub crash_at: Option<String>,
    /// The agent's log filter (`VMIG_LOG`; default: the agent's, `info`). The benchmarks
    /// run theirs at `warn`.
    pub log: Option<String>,
}

/// How a cluster is started, beyond each agent's [`AgentOpts`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOpts {
    /// The `vmig` binary of the agents and the CLI (default: [`vmig_bin`], built with
    /// `fault-injection`; the benchmarks give the release binary, built without).
    pub bin: Option<PathBuf>,
    /// How long [`Cluster::cli`] lets a command run (default [`CLI_TIMEOUT`]; a benchmark's
    /// migration of a large VM may take longer).
    pub cli_timeout: Option<Duration>,
}

/// A network namespace and the agent's address inside it.
#[derive(Debug, Clone)]
pub struct NetnsAddr {
    /// `ip netns` name.
    pub ns: String,
    /// Address the agent listens on.
    pub ip: String,
}

/// Two network namespaces joined by a veth pair (`10.199.N.1` and `10.199.N.2`), removed on
/// drop: two hosts with a link that can be cut.
#[derive(Debug)]
pub struct NetnsPair {
    /// The two ends: namespace, interface and address.
    pub ends: [(String, String, String); 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

impl NetnsPair {
    /// Creates the pair, or says why this machine cannot (the caller skips loudly).
    pub fn new() -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = (std::process::id() * 4 + n) % 250;
        let _ = fs::create_dir_all("/run/netns");
        let ends = [0, 1].map(|i| {
            (
                format!("vmig{id}{}", ["a", "b"][i]),
                format!("vm{id}{}", ["a", "b"][i]),
                format!("10.199.{id}.{}", i + 1),
            )
        });
        let pair = NetnsPair { ends };
        for (ns, _, _) in &pair.ends {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
        }
        let [(na, ia, aa), (nb, ib, ab)] = &pair.ends;
        ip(&[
            "link", "add", ia, "netns", na, "type", "veth", "peer", "name", ib, "netns", nb,
        ])?;
        for (ns, dev, addr) in [(na, ia, aa), (nb, ib, ab)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The agent options of end `i` (0 or 1).
    pub fn agent(&self, i: usize) -> AgentOpts {
        AgentOpts {
            netns: Some(NetnsAddr {
                ns: self.ends[i].0.clone(),
                ip: self.ends[i].2.clone(),
            }),
            ..AgentOpts::default()
        }
    }

    /// Cuts the link: both ends down, packets are lost without a reset.
    pub fn cut(&self) {
        for (ns, dev, _) in &self.ends {
            ip(&["-n", ns, "link", "set", dev, "down"]).expect("cut the link");
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for (ns, _, _) in &self.ends {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl AgentOpts {
    /// An agent with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// An agent whose outgoing migrations inject `fault` (see `vmig::migrate::fault`).
    pub fn injecting(fault: &str) -> Self {
        Self {
            fault: Some(fault.into()),
            ..Self::default()
        }
    }

    /// An agent running with `--insecure` (plaintext migrations).
    pub fn insecure() -> Self {
        Self {
            insecure: true,
            ..Self::default()
        }
    }

    /// An agent whose keys and certificates are in `dir` instead of the cluster's folder.
    pub fn pki_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            pki_dir: Some(dir.into()),
            ..Self::default()
        }
    }

    /// An agent that also serves the datastore folder `{dir}/NAME`, marked shared: the same
    /// folder for every agent of the cluster given this option.
    pub fn with_shared(mut self, name: &str) -> Self {
        self.datastores
            .push(format!("{name}={{dir}}/{name},shared"));
        self
    }

    /// An agent that may run only `mib` MiB of guest memory.
    pub fn memory_mib(mib: u64) -> Self {
        Self {
            memory_mib: Some(mib),
            ..Self::default()
        }
    }
}

/// The output of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Command line, for messages.
    pub cmdline: String,
    /// Exit status (None: killed at its timeout).
    pub status: Option<ExitStatus>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Output {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Stdout and stderr together (for matching error messages).
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {} after {:.1} s\n--- stdout\n{}\n--- stderr\n{}",
            self.cmdline,
            match self.status {
                Some(s) => s.to_string(),
                None => "killed at its timeout".into(),
            },
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// A command running in the background (see [`Cluster::spawn_cli`]).
#[derive(Debug)]
pub struct Background {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    cmdline: String,
    started: Instant,
}

impl Background {
    /// Waits for it to end, killing it past `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let status = wait_timeout(&mut self.child, timeout);
        Output {
            cmdline: self.cmdline.clone(),
            status,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }

    /// SIGKILLs it (as a user's `kill -9` or a lost terminal would end it) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child` up to `timeout`; kills it past that. None if it had to be killed.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if t.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The `vmig` binary: `$VMIG_BIN`, or `target/<profile>/vmig` next to the test executable,
/// built with the `fault-injection` feature (once per test process: cargo does nothing when it
/// is up to date, and rebuilds a binary built without the feature).
pub fn vmig_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VMIG_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> → target/<profile>/vmig
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join("vmig");
        if !build_vmig(&profile_dir) && bin.is_file() {
            eprintln!(
                "warning: could not rebuild {}: testing the binary already there",
                bin.display()
            );
        }
        assert!(
            bin.is_file(),
            "no vmig binary at {}: run `cargo build -p vmig --bin vmig --features fault-injection`",
            bin.display()
        );
        bin
    })
}

/// Runs `cargo build -p vmig --bin vmig --features fault-injection` into the test's target
/// dir; false if it failed.
fn build_vmig(profile_dir: &Path) -> bool {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = profile_dir.parent().expect("target dir");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut c = Command::new(cargo);
    c.args([
        "build",
        "-p",
        "vmig",
        "--bin",
        "vmig",
        "--features",
        "fault-injection",
    ])
    .env("CARGO_TARGET_DIR", target)
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .stdin(Stdio::null());
    if release {
        c.arg("--release");
    }
    eprintln!("building the vmig binary: {c:?}");
    let mut child = c.spawn().expect("spawn cargo build");
    let ok = wait_timeout(&mut child, Duration::from_secs(900)).is_some_and(|s| s.success());
    if !ok {
        eprintln!("`cargo build -p vmig --bin vmig --features fault-injection` failed");
    }
    ok
}

/// Serializes the tests that run VMs: within this process (a mutex) and across processes
/// (an exclusive `flock` on a file in the temp folder).
pub struct E2eLock {
    _guard: MutexGuard<'static, ()>,
    file: Option<File>,
}

impl Drop for E2eLock {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            use std::os::fd::AsRawFd;
            // SAFETY: unlocks a descriptor this struct owns and keeps open until after the call.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// Takes the e2e lock (see [`E2eLock`]).
pub fn e2e_lock() -> E2eLock {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join("vmig-e2e.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ok();
    let file = file.and_then(|f| {
        use std::os::fd::AsRawFd;
        let t = Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Some(f);
            }
            if t.elapsed() > LOCK_TIMEOUT {
                eprintln!(
                    "warning: {} still locked after {:?}: running anyway",
                    path.display(),
                    LOCK_TIMEOUT
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    E2eLock {
        _guard: guard,
        file,
    }
}

/// One agent process.
#[derive(Debug)]
pub struct Agent {
    /// Host name.
    pub name: String,
    /// Migration endpoint port.
    pub port: u16,
    /// Datastore folder.
    pub datastore: PathBuf,
    /// Its stdout+stderr.
    pub log: PathBuf,
    opts: AgentOpts,
    child: Option<Child>,
}

/// Agents on the local machine, with a shared temp folder.
pub struct Cluster {
    agents: Vec<Agent>,
    /// The `vmig` binary.
    bin: PathBuf,
    /// See [`ClusterOpts::cli_timeout`].
    cli_timeout: Duration,
    run_dir: PathBuf,
    hosts: PathBuf,
    pki: PathBuf,
    dir: tempfile::TempDir,
    seq: std::sync::atomic::AtomicU32,
    _lock: E2eLock,
}

fn free_port() -> u16 {
    local::free_port().expect("a free port")
}

/// Last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Takes the e2e lock, writes a hosts file with free ports, creates a cluster CA and a
    /// certificate per host (in [`Cluster::pki_dir`]), starts one agent per host (mutual TLS
    /// unless [`AgentOpts::insecure`]) and waits until each answers on its control socket.
    pub fn new(hosts: &[(&str, AgentOpts)]) -> Self {
        Self::with(&ClusterOpts::default(), hosts)
    }

    /// [`Cluster::new`] with other cluster options (another binary, a longer CLI timeout).
    pub fn with(opts: &ClusterOpts, hosts: &[(&str, AgentOpts)]) -> Self {
        require_kvm();
        let lock = e2e_lock();
        let bin = opts.bin.clone().unwrap_or_else(|| vmig_bin().to_path_buf());
        let dir = tempfile::Builder::new()
            .prefix("vmig-e2e-")
            .tempdir()
            .expect("tempdir");
        let run_dir = dir.path().join("run");
        fs::create_dir_all(&run_dir).expect("run dir");
        let mut agents: Vec<Agent> = hosts
            .iter()
            .map(|(name, opts)| Agent {
                name: name.to_string(),
                port: free_port(),
                datastore: dir.path().join(name),
                log: dir.path().join(format!("{name}.log")),
                opts: opts.clone(),
                child: None,
            })
            .collect();
        let hosts_file = dir.path().join("hosts.toml");
        let hosts_text: String = agents
            .iter()
            .map(|a| {
                let ip = a.opts.netns.as_ref().map_or("127.0.0.1", |n| n.ip.as_str());
                format!("{} = \"{ip}:{}\"\n", a.name, a.port)
            })
            .collect();
        fs::write(&hosts_file, hosts_text).expect("hosts file");
        let pki = dir.path().join("pki");
        let names: Vec<&str> = hosts.iter().map(|(n, _)| *n).collect();
        vmig::certs::cluster(&pki, &names).expect("the cluster's certificates");
        for a in &mut agents {
            spawn_agent(&bin, a, &run_dir, &hosts_file, &pki);
        }
        let c = Self {
            agents,
            bin,
            cli_timeout: opts.cli_timeout.unwrap_or(CLI_TIMEOUT),
            run_dir,
            hosts: hosts_file,
            pki,
            dir,
            seq: Default::default(),
            _lock: lock,
        };
        for a in &c.agents {
            c.wait_agent(&a.name);
        }
        c
    }

    /// The temp folder of this cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The hosts file.
    pub fn hosts_file(&self) -> &Path {
        &self.hosts
    }

    /// The folder of the cluster's CA (`ca.key`, `ca.crt`) and the hosts' keys and
    /// certificates.
    pub fn pki_dir(&self) -> &Path {
        &self.pki
    }

    /// The folder of the control sockets (`VMIG_RUN_DIR`).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The agent of `host`.
    pub fn agent(&self, host: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == host)
            .unwrap_or_else(|| panic!("no agent {host} in this cluster"))
    }

    /// The datastore of `host`.
    pub fn datastore(&self, host: &str) -> PathBuf {
        self.agent(host).datastore.clone()
    }

    fn wait_agent(&self, host: &str) {
        let t = Instant::now();
        loop {
            let o = self.cli_timeout(&["--host", host, "vm", "list"], Duration::from_secs(5));
            if o.success() {
                return;
            }
            if t.elapsed() > AGENT_START_TIMEOUT {
                panic!(
                    "agent {host} did not answer within {AGENT_START_TIMEOUT:?}: {o}\n{}",
                    self.logs()
                );
            }
            let a = self.agent(host);
            let log = a.log.clone();
            std::thread::sleep(Duration::from_millis(100));
            if self.agent_exited(host) {
                panic!("agent {host} exited at its start:\n{}", tail(&log, 40));
            }
        }
    }

    fn agent_exited(&self, host: &str) -> bool {
        // try_wait needs &mut: peek through /proc instead.
        let a = self.agent(host);
        match &a.child {
            Some(c) => {
                let stat = fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
                // Field 3 is the state; Z = zombie (exited, not reaped).
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(true)
            }
            None => true,
        }
    }

    /// The last lines of every agent's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for a in &self.agents {
            s += &format!(
                "===== agent {} log ({}) =====\n{}\n",
                a.name,
                a.log.display(),
                tail(&a.log, 60)
            );
        }
        s
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("VMIG_RUN_DIR", &self.run_dir)
            .env_remove("VMIG_AGENT")
            .env_remove("VMIG_HOSTS")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        c
    }

    /// Starts `vmig ARGS` in the background.
    pub fn spawn_cli(&self, args: &[&str]) -> Background {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.dir.path().join(format!("cli-{n}.out"));
        let err = self.dir.path().join(format!("cli-{n}.err"));
        let child = self
            .command(args)
            .stdout(File::create(&out).expect("cli stdout"))
            .stderr(File::create(&err).expect("cli stderr"))
            .spawn()
            .expect("spawn vmig");
        Background {
            child,
            out,
            err,
            cmdline: format!("vmig {}", args.join(" ")),
            started: Instant::now(),
        }
    }

    /// Runs `vmig ARGS`, killing it past `timeout`.
    pub fn cli_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.spawn_cli(args).wait(timeout)
    }

    /// Runs `vmig ARGS` (timeout [`CLI_TIMEOUT`], or the cluster's
    /// [`ClusterOpts::cli_timeout`]).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_timeout(args, self.cli_timeout)
    }

    /// Runs `vmig ARGS`, which must succeed.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.cli(args);
        assert!(o.success(), "{o}\n{}", self.logs());
        o
    }

    /// Runs `vmig ARGS`, which must fail; returns its output.
    pub fn fails(&self, args: &[&str]) -> Output {
        let o = self.cli(args);
        assert!(
            o.status.is_some() && !o.success(),
            "expected a failure: {o}\n{}",
            self.logs()
        );
        o
    }

    /// Runs `vmig ARGS`, which must succeed and print JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let o = self.ok(args);
        serde_json::from_str(&o.stdout)
            .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}): {o}", o.cmdline))
    }

    /// `vm show NAME --json` on `host` (None when it fails, e.g. no such VM there).
    pub fn show(&self, host: &str, vm: &str) -> Option<Value> {
        let o = self.cli(&["--host", host, "vm", "show", vm, "--json"]);
        if !o.success() {
            return None;
        }
        Some(serde_json::from_str(&o.stdout).expect("vm show --json prints JSON"))
    }

    /// `vm digest NAME` on `host`: (memory digest, counter).
    pub fn digest(&self, host: &str, vm: &str) -> (String, u64) {
        let v = self.json(&["--host", host, "vm", "digest", vm]);
        (
            v["memory"].as_str().expect("digest.memory").to_string(),
            v["counter"].as_u64().expect("digest.counter"),
        )
    }

    /// SIGKILLs the agent of `host` (its VMs die with it) and reaps it.
    pub fn kill(&mut self, host: &str) {
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.name == host)
            .unwrap_or_else(|| panic!("no agent {host}"));
        if let Some(mut c) = a.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Rewrites the hosts file: `name = "127.0.0.1:port"` for each entry. Agents read it at
    /// their start: [`Cluster::restart`] the ones that must see the change.
    pub fn write_hosts(&self, entries: &[(&str, u16)]) {
        fs::write(&self.hosts, local::hosts_text(entries)).expect("hosts file");
    }

    /// Starts the agent of `host` again with other options (same port and datastore).
    pub fn restart_with(&mut self, host: &str, opts: AgentOpts) {
        self.agents
            .iter_mut()
            .find(|a| a.name == host)
            .unwrap_or_else(|| panic!("no agent {host}"))
            .opts = opts;
        self.restart(host);
    }

    /// The options `host`'s agent was started with.
    pub fn opts(&self, host: &str) -> AgentOpts {
        self.agent(host).opts.clone()
    }

    /// The process id of `host`'s agent.
    pub fn pid(&self, host: &str) -> u32 {
        self.agent(host)
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("agent {host} is not running"))
            .id()
    }

    /// Stops VM `vm` on agent `host` and deletes it (so that its vCPUs no longer compete
    /// with the next measurement for the CPUs).
    pub fn remove(&self, host: &str, vm: &str) {
        for cmd in ["stop", "destroy"] {
            self.ok(&["--host", host, "vm", cmd, vm]);
        }
    }

    /// Whether the agent of `host` has exited (killed, crashed, aborted).
    pub fn exited(&self, host: &str) -> bool {
        self.agent_exited(host)
    }

    /// Starts the agent of `host` again (after [`Cluster::kill`]), same port and datastore.
    pub fn restart(&mut self, host: &str) {
        self.kill(host);
        let bin = self.bin.clone();
        let (run_dir, hosts, pki) = (self.run_dir.clone(), self.hosts.clone(), self.pki.clone());
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.name == host)
            .expect("agent");
        spawn_agent(&bin, a, &run_dir, &hosts, &pki);
        self.wait_agent(host);
    }
}

fn spawn_agent(bin: &Path, a: &mut Agent, run_dir: &Path, hosts: &Path, pki: &Path) {
    let log = File::options()
        .create(true)
        .append(true)
        .open(&a.log)
        .expect("agent log");
    let mut c = LocalAgent {
        name: a.name.clone(),
        port: a.port,
        datastore: a.datastore.clone(),
        hosts: hosts.to_path_buf(),
        run_dir: run_dir.to_path_buf(),
        pki_dir: (!a.opts.insecure).then(|| a.opts.pki_dir.clone().unwrap_or_else(|| pki.into())),
    }
    .command(bin);
    c.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if let Some(m) = a.opts.memory_mib {
        c.args(["--memory-mib", &m.to_string()]);
    }
    if let Some(io) = &a.opts.io {
        c.args(["--io", io]);
    }
    if let Some(g) = &a.opts.control_group {
        c.args(["--control-group", g]);
    }
    if let Some(l) = &a.opts.log {
        c.env("VMIG_LOG", l);
    }
    let cluster_dir = run_dir
        .parent()
        .expect("the run folder is in the cluster's");
    for d in &a.opts.datastores {
        c.arg("--datastore")
            .arg(d.replace("{dir}", &cluster_dir.display().to_string()));
    }
    c.args(&a.opts.args);
    match &a.opts.crash_at {
        Some(p) => c.env("VMIG_CRASH_AT", p),
        None => c.env_remove("VMIG_CRASH_AT"),
    };
    match &a.opts.fault {
        Some(f) => c.env("VMIG_INJECT_FAULT", f),
        None => c.env_remove("VMIG_INJECT_FAULT"),
    };
    if let Some(n) = &a.opts.netns {
        // The same command line inside the namespace, listening on its address there.
        let local = format!("127.0.0.1:{}", a.port);
        let mut inner = Command::new("ip");
        inner.args(["netns", "exec", &n.ns]).arg(c.get_program());
        for arg in c.get_args() {
            if arg == local.as_str() {
                inner.arg(format!("{}:{}", n.ip, a.port));
            } else {
                inner.arg(arg);
            }
        }
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                inner.env(k, v);
            }
        }
        let log = File::options()
            .append(true)
            .open(&a.log)
            .expect("agent log");
        inner
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        c = inner;
    }
    a.child = Some(c.spawn().expect("spawn vmig agent"));
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        for a in &mut self.agents {
            if let Some(c) = &mut a.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if failing {
            eprintln!("{}", self.logs());
            if std::env::var_os("VMIG_KEEP").is_some() {
                let p = self.dir.path().to_path_buf();
                eprintln!("keeping {}", p.display());
                std::mem::forget(std::mem::replace(
                    &mut self.dir,
                    tempfile::tempdir().expect("tempdir"),
                ));
            }
        }
    }
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `stats` of a `vm show --json` value: (counter, counter_failures).
pub fn counter_of(show: &Value) -> (u64, u64) {
    let s = &show["stats"];
    (
        s["counter"].as_u64().unwrap_or(0),
        s["counter_failures"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Files every VM folder holds.
pub const VM_FILES: [&str; 4] = ["vm.toml", "nvram.bin", "disk.img", "vm.log"];

impl Cluster {
    /// `vm create NAME ARGS --start` on `host`.
    pub fn create_vm(&self, host: &str, vm: &str, args: &[&str]) {
        let mut a = vec!["--host", host, "vm", "create", vm];
        a.extend_from_slice(args);
        a.push("--start");
        self.ok(&a);
        let s = self.show(host, vm).expect("the new VM shows");
        assert_eq!(s["state"], "running", "{s:#}");
    }

    /// Waits until the VM's counter (on `host`) passed `above`, then checks it still grows
    /// over ~1 s with no failed self-check and the VM "running". Returns the last counter.
    pub fn assert_counting(&self, host: &str, vm: &str, above: u64) -> u64 {
        let first = wait_for(Duration::from_secs(20), || {
            let s = self.show(host, vm)?;
            let (c, _) = counter_of(&s);
            (c > above).then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "{vm} on {host}: counter did not pass {above} within 20 s: {:#}\n{}",
                self.show(host, vm).unwrap_or_default(),
                self.logs()
            )
        });
        let (c1, f1) = counter_of(&first);
        std::thread::sleep(Duration::from_secs(1));
        let second = self
            .show(host, vm)
            .unwrap_or_else(|| panic!("{vm} vanished from {host}\n{}", self.logs()));
        let (c2, f2) = counter_of(&second);
        assert_eq!(second["state"], "running", "{vm} on {host}: {second:#}");
        assert!(c2 > c1, "{vm} on {host}: counter stuck at {c1} -> {c2}");
        assert_eq!(
            (f1, f2),
            (0, 0),
            "{vm} on {host}: failed self-checks: {second:#}"
        );
        c2
    }

    /// `migrate VM TO --verify --json ARGS` from `from`; must succeed; returns the report.
    pub fn migrate(&self, from: &str, vm: &str, to: &str, args: &[&str]) -> Value {
        let o = self.migrate_raw(from, vm, to, args);
        assert!(o.success(), "migration failed: {o}\n{}", self.logs());
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}): {o}"))
    }

    /// `migrate VM TO --verify --json ARGS` from `from`, whatever the outcome.
    pub fn migrate_raw(&self, from: &str, vm: &str, to: &str, args: &[&str]) -> Output {
        self.cli_timeout(&migrate_args(from, vm, to, args), Duration::from_secs(120))
    }

    /// The same migration as [`Cluster::migrate_raw`], started in the background.
    pub fn spawn_migrate(&self, from: &str, vm: &str, to: &str, args: &[&str]) -> Background {
        self.spawn_cli(&migrate_args(from, vm, to, args))
    }

    /// Everything a successful migration must show: equal, non-empty digests; the VM gone
    /// from `from` (agent and datastore) and running on `to` with its folder; the counter
    /// going on past the pause with no failed self-check.
    pub fn assert_migrated(&self, report: &Value, vm: &str, from: &str, to: &str) {
        let v = &report["verification"];
        assert_eq!(v["memory_equal"], true, "memory digests differ: {report:#}");
        assert_eq!(v["vcpus_equal"], true, "vCPU digests differ: {report:#}");
        for (a, b) in [
            ("source_memory", "dest_memory"),
            ("source_vcpus", "dest_vcpus"),
        ] {
            let (sa, sb) = (v[a].as_str().unwrap_or(""), v[b].as_str().unwrap_or(""));
            assert!(!sa.is_empty(), "{a} empty: {report:#}");
            assert_eq!(sa, sb, "{a} vs {b}: {report:#}");
        }
        // A copied disk: its digests at the pause too.
        if report["disk"]["mode"] == "copy" {
            assert_eq!(v["disk_equal"], true, "disk digests differ: {report:#}");
            let (sa, sb) = (
                v["source_disk"].as_str().unwrap_or(""),
                v["dest_disk"].as_str().unwrap_or(""),
            );
            assert!(!sa.is_empty() && sa == sb, "disk digests: {report:#}");
        }
        assert_eq!(report["vm"], vm);
        assert!(
            self.show(from, vm).is_none(),
            "{vm} still on {from} after the migration"
        );
        let shown = self.show(to, vm).expect("the VM shows on the destination");
        let dst_dir = PathBuf::from(shown["dir"].as_str().expect("vm show: dir"));
        if report["disk"]["mode"] == "shared" {
            // One folder on the shared datastore: it stays, and names its new owner.
            let owner = fs::read_to_string(dst_dir.join(".owner")).unwrap_or_default();
            assert_eq!(owner.trim(), to, "{}: .owner", dst_dir.display());
        } else {
            let src_dir = self.datastore(from).join(vm);
            assert!(!src_dir.exists(), "{} still exists", src_dir.display());
            if shown["datastore"] == "default" {
                assert_eq!(dst_dir, self.datastore(to).join(vm), "{shown:#}");
            }
        }
        for f in VM_FILES {
            assert!(
                dst_dir.join(f).is_file(),
                "{} missing on the destination",
                dst_dir.join(f).display()
            );
        }
        assert!(
            !self.datastore(to).join(".incoming").join(vm).exists(),
            "staging folder left on {to}"
        );
        let at_pause = report["counter_at_pause"]
            .as_u64()
            .expect("report.counter_at_pause");
        let s = self.show(to, vm).expect("the VM shows on the destination");
        assert_eq!(s["state"], "running", "{s:#}");
        self.assert_counting(to, vm, at_pause);
    }

    /// After a failed migration: the VM still runs on `from` (counter growing, no failed
    /// check) and `to` kept nothing (not registered, no folder, no staging folder).
    /// (`counting`: the VM runs the counter program, check that it goes on.)
    pub fn assert_stayed(&self, vm: &str, from: &str, to: Option<&str>, counting: bool) {
        let before = self
            .show(from, vm)
            .unwrap_or_else(|| panic!("{vm} gone from {from}\n{}", self.logs()));
        assert_eq!(before["state"], "running", "{before:#}");
        if counting {
            self.assert_counting(from, vm, counter_of(&before).0);
        }
        let dir = PathBuf::from(before["dir"].as_str().expect("vm show: dir"));
        assert!(
            dir.join("vm.toml").is_file(),
            "{}: no vm.toml",
            dir.display()
        );
        if let Some(to) = to {
            self.assert_clean(vm, to);
        }
    }

    /// `host` holds nothing of `vm`. Waits a little: the destination cleans up after the
    /// source gave up.
    pub fn assert_clean(&self, vm: &str, host: &str) {
        let ds = self.datastore(host);
        let clean = wait_for(Duration::from_secs(10), || {
            let gone = !ds.join(".incoming").join(vm).exists() && !ds.join(vm).exists();
            (gone && self.show(host, vm).is_none()).then_some(())
        });
        assert!(
            clean.is_some(),
            "{host} kept something of {vm}: show={:?} folder={} staging={}\n{}",
            self.show(host, vm),
            ds.join(vm).exists(),
            ds.join(".incoming").join(vm).exists(),
            self.logs()
        );
    }
}

impl Cluster {
    /// Waits until `vm` shows as "migrating" on `host` (a migration is under way).
    pub fn wait_migrating(&self, host: &str, vm: &str, timeout: Duration) {
        let seen = wait_for(timeout, || {
            let s = self.show(host, vm)?;
            (s["state"] == "migrating").then_some(())
        });
        assert!(
            seen.is_some(),
            "{vm} on {host} never showed as migrating: {:?}\n{}",
            self.show(host, vm),
            self.logs()
        );
    }
}

/// `--host FROM migrate VM TO --verify --json ARGS`.
fn migrate_args<'a>(from: &'a str, vm: &'a str, to: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--host", from, "migrate", vm, to, "--verify", "--json"];
    a.extend_from_slice(args);
    a
}
