//! Command-line interface.

mod certs;
mod cold;
mod demo;
mod plot;
mod trace;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use vmig::api::client::{call, Call};
use vmig::api::{self, Reply, Request};
use vmig::dirty::DirtyTracking;
use vmig::inventory::{VmDef, VmInfo};
use vmig::migrate::{
    defaults, validate, MigrateOptions, NoConverge, PostcopyPolicy, ProgressPhase, Report,
    StorageMode,
};
use vmig::transport::IoPath;

/// vmig: live migration of KVM virtual machines between host agents.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Control socket of the agent to talk to (default: found from --host or the VM name).
    #[arg(long, global = true, env = "VMIG_AGENT")]
    agent: Option<PathBuf>,
    /// Host whose agent to talk to (its socket is $VMIG_RUN_DIR/HOST.sock).
    #[arg(long, global = true)]
    host: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the host agent (the VMM of this host's VMs and its migration endpoint).
    Agent(AgentArgs),
    /// List the agents running on this machine (their control sockets), and whether they answer.
    Agents(AgentsArgs),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The agent's datastores.
    #[command(subcommand)]
    Datastore(DatastoreCmd),
    /// Move a VM's storage between datastores of its host.
    #[command(subcommand)]
    Storage(cold::StorageCmd),
    /// Migrate a running VM live to another host.
    Migrate(MigrateArgs),
    /// Start two local agents, migrate a busy VM between them, print the report and the proof.
    Demo(demo::DemoArgs),
    /// Attach the eBPF probes to a VM and show its dirty rate, faults and exits live.
    Trace(trace::TraceArgs),
    /// Create the cluster's CA and the hosts' keys and certificates (mutual TLS between agents).
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Saved migration reports: `vmig report plot REPORT.json` draws one as an SVG.
    #[command(subcommand)]
    Report(plot::ReportCmd),
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Host name.
    #[arg(long)]
    name: String,
    /// A datastore (one folder per VM): PATH (named `default`), NAME=PATH, or
    /// NAME=PATH,shared (a folder other hosts' agents see too); repeatable, the first is the
    /// default.
    #[arg(long, required = true, value_parser = parse_datastore)]
    datastore: Vec<vmig::inventory::Datastore>,
    /// Migration endpoint.
    #[arg(long, default_value = "127.0.0.1:7401")]
    listen: SocketAddr,
    /// Control socket (default $VMIG_RUN_DIR/NAME.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Hosts file: `hostB = "127.0.0.1:7402"` lines.
    #[arg(long, env = "VMIG_HOSTS")]
    hosts: Option<PathBuf>,
    /// Guest memory this host may run, MiB (default: MemAvailable).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// I/O path for incoming migrations.
    #[arg(long, value_enum, default_value_t = IoPath::Auto)]
    io: IoPath,
    /// Folder of `ca.crt`, `NAME.crt` and `NAME.key` (see `vmig certs`) [default:
    /// $VMIG_PKI_DIR, else /etc/vmig/pki].
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Migrate in plaintext, unauthenticated: anyone who reaches --listen can push a VM in or
    /// read the memory of a moving VM. Every agent of the cluster must agree.
    #[arg(long)]
    insecure: bool,
    /// A group (name or gid) whose members may use the control socket, besides root.
    #[arg(long)]
    control_group: Option<String>,
}

fn parse_datastore(s: &str) -> Result<vmig::inventory::Datastore, String> {
    vmig::inventory::Datastore::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum DatastoreCmd {
    /// List the agent's datastores: name, folder, shared or not, free space, VMs.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct AgentsArgs {
    /// Wait up to this many seconds for every HOST named to answer.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=3600))]
    wait: Option<u64>,
    /// Hosts that must be running (default: every socket found).
    hosts: Vec<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create a VM folder (definition, NVRAM, log, disk).
    Create(CreateArgs),
    /// Boot a VM.
    Start { name: String },
    /// Power a VM off.
    Stop { name: String },
    /// Delete a stopped VM and its folder.
    Destroy { name: String },
    /// List VMs.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM (definition, state, counters).
    Show {
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Pause a VM briefly and print a digest of its memory.
    Digest { name: String },
    /// Take back the copy `migrate --offline --keep-source` left here (refused while the host
    /// it moved to still has the VM).
    Reclaim { name: String },
}

#[derive(Debug, Args)]
struct CreateArgs {
    name: String,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// vCPUs (1-4).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Program per vCPU, comma-separated (idle, dirty, counter); the last repeats.
    #[arg(long, value_delimiter = ',', default_value = "counter")]
    workload: Vec<String>,
    /// Working set of each dirty vCPU, MiB.
    #[arg(long, default_value_t = 16)]
    dirty_mib: u64,
    /// Pages per second per dirty vCPU (0 = flat out).
    #[arg(long, default_value_t = 0)]
    dirty_rate: u64,
    /// Dirty-tracking mechanism.
    #[arg(long, value_enum, default_value_t = DirtyTracking::Auto)]
    dirty_tracking: DirtyTracking,
    /// Disk size, MiB.
    #[arg(long, default_value_t = 16)]
    disk_mib: u64,
    /// Blocks (4 KiB) per second the disk vCPU writes and reads back (0 = flat out).
    #[arg(long, default_value_t = 0)]
    disk_rate: u64,
    /// Region the disk vCPU writes, MiB from the disk's start (0 = the whole disk).
    #[arg(long, default_value_t = 0)]
    disk_region_mib: u64,
    /// Boot it right away.
    #[arg(long)]
    start: bool,
    /// Datastore to create it on (default: the agent's first).
    #[arg(long)]
    datastore: Option<String>,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// VM to move.
    name: String,
    /// Destination host (a name from the hosts file, or ADDR:PORT).
    #[arg(required_unless_present_any = ["cancel", "resume", "rollback", "status"])]
    dest: Option<String>,
    /// Show the live state of NAME's migration (phase, round, elapsed, remaining, dirty rate,
    /// bandwidth, expected downtime, ETA); with --json, the fields of QEMU's query-migrate.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "rollback", "dest"])]
    status: bool,
    /// Cancel the migration of NAME in progress.
    #[arg(long)]
    cancel: bool,
    /// Finish the interrupted post-copy migration of NAME (it lost its connection): reconnect
    /// to its destination and send the pages it still lacks.
    #[arg(long, conflicts_with_all = ["cancel", "rollback", "dest"])]
    resume: bool,
    /// Give up the interrupted post-copy migration of NAME and run it here again from the
    /// switch point. Only when the destination is lost for good: what the VM did there is lost.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "dest"])]
    rollback: bool,
    /// Seconds to keep reconnecting when the connection drops during post-copy, before the
    /// migration is parked for --resume (0: park at once) [default: 30; with --resume: as the
    /// migration was started].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    resume_window: Option<u64>,
    /// Largest acceptable downtime, ms.
    #[arg(long, default_value_t = defaults::MAX_DOWNTIME_MS, value_parser = validate::parse::max_downtime)]
    max_downtime: f64,
    /// Most pre-copy rounds before stop-and-copy is forced.
    #[arg(long, default_value_t = defaults::MAX_ROUNDS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_rounds: u32,
    /// Bandwidth cap, MiB/s.
    #[arg(long, value_parser = validate::parse::bandwidth)]
    bandwidth: Option<f64>,
    /// Whole-migration timeout, seconds.
    #[arg(long, default_value_t = defaults::TIMEOUT_S, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    timeout: u64,
    /// Dirty tracking: ring, bitmap, or auto (what the VM was built with).
    #[arg(long, value_enum, default_value_t = defaults::DIRTY_TRACKING)]
    dirty_tracking: DirtyTracking,
    /// io_uring or plain sockets.
    #[arg(long, value_enum, default_value_t = defaults::IO)]
    io: IoPath,
    /// Compare memory and vCPU digests of both sides before committing.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// After a successful migration, draw its report as an SVG into FILE (as `vmig report
    /// plot` does).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Post-copy: never (pre-copy only), auto (switch when pre-copy cannot converge), always
    /// (one pre-copy round, then post-copy).
    #[arg(long, value_enum, default_value_t = defaults::POSTCOPY)]
    postcopy: PostcopyPolicy,
    /// With --postcopy never, when pre-copy cannot converge: force (stop and copy anyway),
    /// throttle (auto-converge: slow the vCPUs down), abort (stay on the source).
    #[arg(long, value_enum, default_value_t = defaults::ON_NO_CONVERGE)]
    on_no_converge: NoConverge,
    /// Pre-copy is hopeless when dirty rate × page size / bandwidth stays at or above this
    /// for 2 rounds (or the dirty set stops shrinking by 10 % over 2 rounds).
    #[arg(long, default_value_t = defaults::CONVERGE_THRESHOLD, value_parser = validate::parse::converge_threshold)]
    converge_threshold: f64,
    /// Rounds before the convergence judgement starts.
    #[arg(long, default_value_t = defaults::MIN_ROUNDS, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    min_rounds: u32,
    /// Do not judge non-convergence after round 1 from the kernel-measured dirty rate (BPF
    /// probes on the dirty rings); wait for --min-rounds rounds of the dirty log instead.
    #[arg(long)]
    no_kernel_judge: bool,
    /// Cold migration: move the stopped VM (its definition, NVRAM, logs and, unless it stays
    /// on a datastore both hosts share, its disk), register it on DEST, then delete it here.
    #[arg(long, conflicts_with_all = ["cancel", "resume", "rollback", "status"])]
    offline: bool,
    /// With --offline: copy the files even when both hosts share the VM's datastore.
    #[arg(long, requires = "offline")]
    move_storage: bool,
    /// With --offline: copy instead of move; the copy here stays, marked `moved` (it cannot
    /// start until `vmig vm reclaim`).
    #[arg(long, requires = "offline")]
    keep_source: bool,
    /// Hot-page holdback: a page dirty again within this many rounds is held back until
    /// stop-and-copy instead of being sent again (0: off).
    #[arg(long, default_value_t = defaults::HOLDBACK_ROUNDS, value_parser = clap::value_parser!(u32).range(0..=1000))]
    holdback_rounds: u32,
    /// How the disk goes: `copy` mirrors it live into the destination's datastore; `shared`
    /// leaves it on a datastore both hosts see (the destination opens it in place); `auto` is
    /// shared when the VM's datastore is shared with the destination, a copy otherwise.
    #[arg(long, value_enum, default_value_t = defaults::STORAGE)]
    storage: StorageMode,
    /// The destination's datastore to put the VM on (its default one if not given), live or
    /// --offline.
    #[arg(long)]
    target_datastore: Option<String>,
}

/// Runs a command.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(a) => agent(a).await,
        Cmd::Agents(a) => agents(a).await,
        Cmd::Vm(v) => vm(cli.agent, cli.host, v).await,
        Cmd::Datastore(d) => datastores(cli.agent, cli.host, d).await,
        Cmd::Storage(cold::StorageCmd::Move(m)) => {
            let a = pick_agent(cli.agent, cli.host, Some(&m.name)).await?;
            let req = Request::StorageMove {
                name: m.name.clone(),
                to: m.to.clone(),
            };
            cold::run(&a, &m.name, req, m.json).await.map(|_| ())
        }
        Cmd::Migrate(m) => migrate(cli.agent, cli.host, m).await,
        Cmd::Demo(d) => demo::run(d).await,
        Cmd::Trace(t) => trace::run(cli.agent, cli.host, t).await,
        Cmd::Certs(c) => certs::run(c),
        Cmd::Report(r) => plot::run(r),
    }
}

async fn agent(a: AgentArgs) -> Result<()> {
    let control = a.control.unwrap_or_else(|| api::socket_of(&a.name));
    vmig::inventory::Datastore::check_all(&a.datastore)?;
    let cfg = api::server::AgentConfig {
        name: a.name,
        datastores: a.datastore,
        listen: a.listen,
        control,
        hosts: a.hosts,
        memory_mib: a.memory_mib,
        io: a.io,
        pki_dir: a.pki_dir.unwrap_or_else(vmig::certs::default_dir),
        insecure: a.insecure,
        control_group: a.control_group,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        s.cancel();
    });
    api::server::run(cfg, shutdown).await?;
    Ok(())
}

async fn agents(a: AgentsArgs) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(a.wait.unwrap_or(0));
    loop {
        let socks: Vec<PathBuf> = if a.hosts.is_empty() {
            local_agents()
        } else {
            a.hosts.iter().map(|h| api::socket_of(h)).collect()
        };
        let mut rows = Vec::new();
        for s in &socks {
            let host = s
                .file_stem()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_default();
            let info = match call(s, &Request::Ping).await {
                Ok(Reply::Ok(v)) => {
                    serde_json::from_value::<api::AgentInfo>(v).map_err(|e| e.to_string())
                }
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(e) => Err(format!("{e:#}")),
            };
            rows.push((host, info));
        }
        let all_up = !rows.is_empty() && rows.iter().all(|(_, i)| i.is_ok());
        if all_up || std::time::Instant::now() >= deadline {
            if a.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(h, i)| match i {
                        Ok(info) => serde_json::json!({"host": h, "up": true, "agent": info}),
                        Err(e) => serde_json::json!({"host": h, "up": false, "error": e}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<10} {:<8} {:<22} {:<8} DATASTORE",
                    "HOST", "PID", "LISTEN", "STATE"
                );
                for (h, i) in &rows {
                    match i {
                        Ok(info) => println!(
                            "{:<10} {:<8} {:<22} {:<8} {}",
                            h, info.pid, info.listen, "up", info.datastore
                        ),
                        Err(e) => println!("{h:<10} {:<8} {:<22} {:<8} {e}", "-", "-", "down"),
                    }
                }
            }
            if rows.is_empty() {
                bail!(
                    "no agent is running (no socket in {})",
                    api::run_dir().display()
                );
            }
            if !all_up {
                bail!("not every agent answered");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every agent socket in the run directory.
fn local_agents() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(api::run_dir())
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The agent to talk to: --agent, --host, the one owning `vm`, or the only one.
async fn pick_agent(
    agent: Option<PathBuf>,
    host: Option<String>,
    vm: Option<&str>,
) -> Result<PathBuf> {
    if let Some(a) = agent {
        return Ok(a);
    }
    if let Some(h) = host {
        return Ok(api::socket_of(&h));
    }
    let all = local_agents();
    if let Some(name) = vm {
        let owners = owners_of(&all, name).await;
        match owners.as_slice() {
            [one] => return Ok(one.clone()),
            [] => {}
            many => bail!(
                "a VM named {name:?} is on several hosts ({}): choose one with --host",
                names(many)
            ),
        }
    }
    match all.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no agent is running (no socket in {}); start one with `vmig agent`",
            api::run_dir().display()
        ),
        many => match vm {
            Some(name) => bail!(
                "no local agent has a VM named {name:?} (agents: {})",
                names(many)
            ),
            None => bail!(
                "several agents run here ({}): choose one with --host",
                names(many)
            ),
        },
    }
}

/// The agents among `all` that have a VM named `name`.
async fn owners_of(all: &[PathBuf], name: &str) -> Vec<PathBuf> {
    let mut owners = Vec::new();
    for a in all {
        if let Ok(Reply::Ok(_)) = call(a, &Request::Show { name: name.into() }).await {
            owners.push(a.clone());
        }
    }
    owners
}

fn names(socks: &[PathBuf]) -> String {
    socks
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn expect_ok(path: &Path, req: Request) -> Result<serde_json::Value> {
    match call(path, &req).await? {
        Reply::Ok(v) => Ok(v),
        Reply::Error(e) => Err(anyhow!(e)),
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn vm(agent: Option<PathBuf>, host: Option<String>, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Create(c) => {
            let a = pick_agent(agent, host, None).await?;
            // A VM name is unique across the hosts here: `vm start NAME` must not have to guess.
            let elsewhere: Vec<PathBuf> = owners_of(&local_agents(), &c.name)
                .await
                .into_iter()
                .filter(|o| *o != a)
                .collect();
            if !elsewhere.is_empty() {
                bail!(
                    "a VM named {:?} already exists on {}: VM names are unique across hosts",
                    c.name,
                    names(&elsewhere)
                );
            }
            let def = VmDef {
                name: c.name.clone(),
                memory_mib: c.memory_mib,
                vcpus: c.vcpus,
                workload: c.workload,
                dirty_mib: c.dirty_mib,
                dirty_rate: c.dirty_rate,
                dirty_tracking: c.dirty_tracking,
                disk_mib: c.disk_mib,
                disk_rate: c.disk_rate,
                disk_region_mib: c.disk_region_mib,
            };
            expect_ok(
                &a,
                Request::Create {
                    def,
                    datastore: c.datastore,
                },
            )
            .await?;
            println!("created {}", c.name);
            if c.start {
                expect_ok(
                    &a,
                    Request::Start {
                        name: c.name.clone(),
                    },
                )
                .await?;
                println!("started {}", c.name);
            }
        }
        VmCmd::Start { name } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            expect_ok(&a, Request::Start { name: name.clone() }).await?;
            println!("started {name}");
        }
        VmCmd::Stop { name } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            expect_ok(&a, Request::Stop { name: name.clone() }).await?;
            println!("stopped {name}");
        }
        VmCmd::Destroy { name } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            expect_ok(&a, Request::Destroy { name: name.clone() }).await?;
            println!("destroyed {name}");
        }
        VmCmd::List { json } => {
            let agents = match (agent, host) {
                (None, None) => local_agents(),
                (a, h) => vec![pick_agent(a, h, None).await?],
            };
            if agents.is_empty() {
                bail!(
                    "no agent is running (no socket in {}); start one with `vmig agent`",
                    api::run_dir().display()
                );
            }
            // Every agent that answers is listed; those that do not are named on stderr.
            let mut all = Vec::new();
            let mut silent = Vec::new();
            for a in &agents {
                let host = a
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match expect_ok(a, Request::List).await.and_then(|v| {
                    serde_json::from_value::<Vec<VmInfo>>(v).map_err(anyhow::Error::from)
                }) {
                    Ok(vms) => all.extend(vms.into_iter().map(|i| (host.clone(), i))),
                    Err(e) => silent.push(format!("{host} ({}): {e:#}", a.display())),
                }
            }
            for s in &silent {
                eprintln!("warning: no answer from agent {s}");
            }
            let mut recovered = Vec::new();
            for a in &agents {
                let host = a
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Ok(v) = expect_ok(a, Request::Recovered).await {
                    let notes: Vec<String> = serde_json::from_value(v).unwrap_or_default();
                    recovered.extend(notes.into_iter().map(|n| format!("{host}: {n}")));
                }
            }
            if silent.len() == agents.len() {
                bail!("no agent answered");
            }
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(h, i)| serde_json::json!({"host": h, "vm": i}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<10} {:<16} {:<10} {:>8} {:>5}  workload",
                    "HOST", "NAME", "STATE", "MEMORY", "VCPUS"
                );
                for (h, i) in all {
                    println!(
                        "{:<10} {:<16} {:<10} {:>5}MiB {:>5}  {}",
                        h,
                        i.def.name,
                        i.state,
                        i.def.memory_mib,
                        i.def.vcpus,
                        i.def.workload.join(",")
                    );
                    if let Some(n) = &i.note {
                        println!("{:<10} {:<16} ^ {n}", "", "");
                    }
                }
                if !recovered.is_empty() {
                    println!("recovered at the agents' start:");
                    for r in &recovered {
                        println!("  {r}");
                    }
                }
            }
        }
        VmCmd::Show { name, json } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            let v = expect_ok(&a, Request::Show { name }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let i: VmInfo = serde_json::from_value(v)?;
                println!("{}", toml::to_string(&i.def)?.trim_end());
                println!("state = \"{}\"\ndir = {:?}", i.state, i.dir);
                if let Some(s) = i.stats {
                    println!(
                        "counter = {} ({} reports, {} failed checks)",
                        s.counter, s.counter_reports, s.counter_failures
                    );
                    println!(
                        "dirty_pages_written = {}\nvcpus = {:?}\ndirty_mode = {:?}",
                        s.dirty_pages_written, s.vcpus, s.dirty_mode
                    );
                    println!(
                        "disk = {} blocks checked, generation {}, {} failed checks ({} requests)",
                        s.disk_blocks_verified, s.disk_generation, s.disk_failures, s.disk_requests
                    );
                }
            }
        }
        VmCmd::Reclaim { name } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            let v = expect_ok(&a, Request::Reclaim { name }).await?;
            println!("{}", v.as_str().unwrap_or("reclaimed"));
        }
        VmCmd::Digest { name } => {
            let a = pick_agent(agent, host, Some(&name)).await?;
            let v = expect_ok(&a, Request::Digest { name }).await?;
            println!("{}", serde_json::to_string(&v)?);
        }
    }
    Ok(())
}

async fn datastores(agent: Option<PathBuf>, host: Option<String>, cmd: DatastoreCmd) -> Result<()> {
    let DatastoreCmd::List { json } = cmd;
    let agents = match (agent, host) {
        (None, None) => local_agents(),
        (a, h) => vec![pick_agent(a, h, None).await?],
    };
    if agents.is_empty() {
        bail!(
            "no agent is running (no socket in {})",
            api::run_dir().display()
        );
    }
    let mut rows = Vec::new();
    for a in &agents {
        let host = a
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let v = expect_ok(a, Request::Datastores).await?;
        let list: Vec<vmig::inventory::DatastoreInfo> = serde_json::from_value(v)?;
        rows.extend(list.into_iter().map(|d| (host.clone(), d)));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(h, d)| serde_json::json!({"host": h, "datastore": d}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<12} {:<7} {:>10} {:>10}  {:<30} VMS",
        "HOST", "NAME", "SHARED", "FREE", "TOTAL", "PATH"
    );
    let gib = |b: Option<u64>| {
        b.map_or("?".into(), |b| {
            format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64)
        })
    };
    for (h, d) in rows {
        println!(
            "{:<10} {:<12} {:<7} {:>10} {:>10}  {:<30} {}",
            h,
            d.name,
            if d.shared { "yes" } else { "no" },
            gib(d.free_bytes),
            gib(d.total_bytes),
            d.path.display(),
            d.vms.join(",")
        );
    }
    Ok(())
}

async fn migrate(agent: Option<PathBuf>, host: Option<String>, m: MigrateArgs) -> Result<()> {
    let json = m.json;
    let r = migrate_inner(agent, host, m).await;
    if json {
        if let Err(e) = &r {
            // A failure is a JSON object too, for scripts; the exit status still says it.
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"error": format!("{e:#}")}))?
            );
        }
    }
    r
}

async fn migrate_inner(agent: Option<PathBuf>, host: Option<String>, m: MigrateArgs) -> Result<()> {
    if m.status {
        // The source of the migration: --host, else every local agent that tracks one.
        let candidates = match (agent, host) {
            (None, None) => local_agents(),
            (a, h) => vec![pick_agent(a, h, None).await?],
        };
        let mut last_err = None;
        for a in candidates {
            match expect_ok(
                &a,
                Request::Status {
                    name: m.name.clone(),
                },
            )
            .await
            {
                Ok(v) => {
                    if m.json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        let st: vmig::migrate::status::MigrationStatus = serde_json::from_value(v)?;
                        print!("{}", st.render());
                    }
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        return Err(last_err.unwrap_or_else(|| anyhow!("no agent is running")));
    }
    let a = pick_agent(agent, host, Some(&m.name)).await?;
    if m.cancel {
        let v = expect_ok(&a, Request::Cancel { name: m.name }).await?;
        println!("{}", v.as_str().unwrap_or("cancelling"));
        return Ok(());
    }
    if m.rollback {
        let v = expect_ok(&a, Request::Rollback { name: m.name }).await?;
        println!("{}", v.as_str().unwrap_or("rolled back"));
        return Ok(());
    }
    if m.offline {
        let req = Request::MigrateCold {
            name: m.name.clone(),
            dest: m.dest.clone().unwrap_or_default(),
            opts: vmig::migrate::cold::ColdOptions {
                move_storage: m.move_storage,
                target_datastore: m.target_datastore.clone(),
                keep_source: m.keep_source,
            },
        };
        cold::run(&a, &m.name, req, m.json).await?;
        return Ok(());
    }
    let req = if m.resume {
        Request::Resume {
            name: m.name.clone(),
            resume_window_s: m.resume_window,
        }
    } else {
        Request::Migrate {
            name: m.name.clone(),
            dest: m.dest.clone().unwrap_or_default(),
            opts: migrate_options(&m),
        }
    };
    if let Some(p) = &m.plot {
        plot::check_target(p)?;
    }
    let report = run_migration(&a, &m.name, req, !m.json).await?;
    if m.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if let Some(p) = &m.plot {
        plot::after_migration(&report, p, m.max_downtime);
    }
    Ok(())
}

fn migrate_options(m: &MigrateArgs) -> MigrateOptions {
    MigrateOptions {
        max_downtime_ms: m.max_downtime,
        max_rounds: m.max_rounds,
        bandwidth_mibs: m.bandwidth,
        timeout_s: m.timeout,
        dirty_tracking: m.dirty_tracking,
        io: m.io,
        verify: m.verify,
        postcopy: m.postcopy,
        on_no_converge: m.on_no_converge,
        converge_threshold: m.converge_threshold,
        min_rounds: m.min_rounds,
        kernel_judge: !m.no_kernel_judge,
        resume_window_s: m.resume_window.unwrap_or(defaults::RESUME_WINDOW_S),
        holdback_rounds: m.holdback_rounds,
        storage: m.storage,
        target_datastore: m.target_datastore.clone(),
    }
}

/// Runs a migration (`Migrate` or `Resume` request) through the agent at `a`, with a progress
/// bar, cancelling on Ctrl-C.
pub async fn run_migration(a: &Path, name: &str, req: Request, bar: bool) -> Result<Report> {
    let mut c = Call::start(a, &req).await?;
    let pb = if bar {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    let style = |unit: &str| {
        ProgressStyle::with_template(&format!(
            "{{prefix:>18}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} elapsed, pass ETA {{eta}} {{msg}}"
        ))
        .expect("template")
        .progress_chars("=> ")
    };
    let pages = style("pages");
    pb.set_style(pages.clone());
    let mut on_disk = false;
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut cancelled = false;
    loop {
        let reply = tokio::select! {
            r = c.next() => r?,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                // The agent says what a cancel can do now: before commitment the VM stays
                // here; in post-copy it already runs on the destination and cannot come back.
                match call(a, &Request::Cancel { name: name.into() }).await {
                    Ok(Reply::Ok(v)) => {
                        cancelled = true;
                        pb.println(format!("Ctrl-C: {}", v.as_str().unwrap_or("cancelling")));
                    }
                    Ok(Reply::Error(e)) => pb.println(format!("Ctrl-C: {e}")),
                    Ok(other) => pb.println(format!("Ctrl-C: unexpected reply {other:?}")),
                    Err(e) => pb.println(format!("Ctrl-C: cannot reach the agent: {e}")),
                }
                continue;
            }
        };
        match reply {
            Reply::Progress(p) => {
                let prefix = match p.phase {
                    ProgressPhase::PreCopy => format!("pre-copy round {}", p.round),
                    other => other.to_string(),
                };
                pb.set_prefix(prefix);
                if p.phase == ProgressPhase::DiskCopy {
                    // MiB of the image, not pages.
                    if !on_disk {
                        on_disk = true;
                        pb.set_style(style("MiB of the disk image"));
                    }
                    pb.set_length(p.total >> 20);
                    pb.set_position(p.sent >> 20);
                    continue;
                }
                if on_disk {
                    on_disk = false;
                    pb.set_style(pages.clone());
                }
                pb.set_length(p.total);
                pb.set_position(p.sent);
                if let Some(d) = &p.decision {
                    pb.println(format!("controller: {d}"));
                }
                if p.phase == ProgressPhase::PostCopy && p.last.is_none() {
                    pb.set_message(format!(
                        "| {} pages remaining, {:.0} faults/s",
                        p.remaining, p.faults_per_s
                    ));
                }
                if let Some(l) = p.last {
                    let msg = format!(
                        "| round {}: {} dirty, {:.0} pages/s dirtied, {:.0} MiB/s, predicted downtime {:.1} ms",
                        l.round,
                        l.dirty_pages,
                        l.dirty_rate,
                        l.bandwidth / 1048576.0,
                        l.predicted_downtime_ms
                    );
                    pb.println(msg.trim_start_matches("| "));
                    pb.set_message(msg);
                }
            }
            Reply::Report(r) => {
                pb.finish_and_clear();
                return Ok(*r);
            }
            Reply::Error(e) => {
                pb.finish_and_clear();
                bail!("migration of {name} failed: {e}");
            }
            Reply::Ok(v) => bail!("unexpected reply {v}"),
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

/// Reads a VM's info from an agent.
pub async fn show(a: &Path, name: &str) -> Result<VmInfo> {
    let v = expect_ok(a, Request::Show { name: name.into() })
        .await
        .with_context(|| format!("show {name}"))?;
    Ok(serde_json::from_value(v)?)
}
