//! The agent daemon: owns the host's VMs, serves the control socket to the CLI and the
//! migration endpoint to other agents.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use super::guard::{self, Slots};
use super::{AgentInfo, DigestInfo, Reply, Request};
use crate::inventory::Inventory;
use crate::migrate::{self, Cancel, MigrateOptions};
use crate::transport::tls::{TlsConfig, TlsError};
use crate::transport::{IoPath, Security};

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A socket could not be bound.
    #[error("cannot listen on {what}: {cause}")]
    Bind {
        /// Which.
        what: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// The hosts file is unreadable or malformed.
    #[error("hosts file {path}: {cause}")]
    Hosts {
        /// File.
        path: PathBuf,
        /// Cause.
        cause: String,
    },
    /// The datastore.
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    /// The agent's keys and certificates (mutual TLS).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The control socket's protection.
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
}

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name.
    pub name: String,
    /// Datastore folder.
    pub datastore: PathBuf,
    /// Migration endpoint.
    pub listen: SocketAddr,
    /// Control socket.
    pub control: PathBuf,
    /// Hosts file (name = "addr:port").
    pub hosts: Option<PathBuf>,
    /// Guest memory this host may run, MiB (default: MemAvailable).
    pub memory_mib: Option<u64>,
    /// I/O path of incoming migrations.
    pub io: IoPath,
    /// Folder of the CA certificate and this host's key and certificate (mutual TLS).
    pub pki_dir: PathBuf,
    /// Plaintext, unauthenticated migrations (`--insecure`; every agent must agree).
    pub insecure: bool,
    /// A group whose members may drive the agent through the control socket, besides root.
    pub control_group: Option<String>,
}

struct Agent {
    cfg: AgentConfig,
    inv: Arc<Inventory>,
    hosts: HashMap<String, String>,
    migrations: Mutex<HashMap<String, Arc<Cancel>>>,
    /// Mutual TLS with the other agents, or `--insecure`.
    security: Security,
    /// Incoming migration connections being served (capped).
    incoming: Slots,
    /// Gid admitted on the control socket besides root.
    control_gid: Option<u32>,
    /// Post-copy migrations out that lost their connection: the VM is paused here with its
    /// memory until `migrate --resume` (or `--rollback`).
    parked: Mutex<HashMap<String, Box<migrate::source::Parked>>>,
}

/// Reads a hosts file: `hostB = "127.0.0.1:7402"` lines (TOML).
pub fn read_hosts(path: &Path) -> Result<HashMap<String, String>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|e| AgentError::Hosts {
        path: path.into(),
        cause: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| AgentError::Hosts {
        path: path.into(),
        cause: e.to_string(),
    })
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb << 10)
        .unwrap_or(1 << 30)
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let capacity = cfg
        .memory_mib
        .map(|m| m << 20)
        .unwrap_or_else(mem_available);
    let inv = Inventory::open(&cfg.datastore, capacity)?;
    // Computed now, not inside the first migration's round-trip measurement.
    let cpu = migrate::cpu_digest();
    tracing::debug!(%cpu, "CPU feature digest");
    let hosts = match &cfg.hosts {
        Some(p) => read_hosts(p)?,
        None => HashMap::new(),
    };
    let security = if cfg.insecure {
        warn!("INSECURE: --insecure is set: migrations to and from this agent are neither authenticated nor encrypted; anyone who reaches {} can push a VM here or read the memory of the VMs that move", cfg.listen);
        Security::Insecure
    } else {
        let tls = TlsConfig::load(&cfg.name, &cfg.pki_dir, &hosts)?;
        info!(pki = %cfg.pki_dir.display(), suites = ?tls.suites(), "mutual TLS with the agents of the hosts file");
        Security::Tls(Arc::new(tls))
    };
    if security.is_tls() && cfg.io == IoPath::Uring {
        return Err(TlsError::Config(
            "--io uring receives plaintext only: it needs --insecure (no kernel TLS here)".into(),
        )
        .into());
    }
    let control_gid = cfg
        .control_group
        .as_deref()
        .map(guard::group_id)
        .transpose()?;
    let tcp = TcpListener::bind(cfg.listen)
        .await
        .map_err(|cause| AgentError::Bind {
            what: cfg.listen.to_string(),
            cause,
        })?;
    if let Some(dir) = cfg.control.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&cfg.control);
    let unix = UnixListener::bind(&cfg.control).map_err(|cause| AgentError::Bind {
        what: cfg.control.display().to_string(),
        cause,
    })?;
    guard::protect_socket(&cfg.control, control_gid)?;
    info!(name = %cfg.name, listen = %cfg.listen, control = %cfg.control.display(), capacity_mib = capacity >> 20, "agent ready");
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        inv,
        hosts,
        migrations: Mutex::new(HashMap::new()),
        parked: Mutex::new(HashMap::new()),
        security,
        incoming: Slots::new(guard::MAX_INCOMING),
        control_gid,
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = unix.accept() => match r {
                Ok((s, _)) => { tokio::spawn(control(agent.clone(), s)); }
                Err(e) => warn!(cause = %e, "control accept failed"),
            },
            r = tcp.accept() => match r {
                Ok((s, peer)) => incoming(agent.clone(), s, peer),
                Err(e) => warn!(cause = %e, "migration accept failed"),
            },
        }
    }
    let _ = std::fs::remove_file(&cfg.control);
    for vm in agent.inv.list() {
        if vm.state != "stopped" {
            let _ = agent.inv.stop(&vm.def.name);
        }
    }
    info!("agent stopped");
    Ok(())
}

fn incoming(agent: Arc<Agent>, s: tokio::net::TcpStream, peer: SocketAddr) {
    let std = match s
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|_| s))
    {
        Ok(s) => s,
        Err(e) => return warn!(cause = %e, "cannot take the migration socket"),
    };
    let Some(slot) = agent.incoming.take() else {
        return warn!(%peer, limit = guard::MAX_INCOMING, "refusing an incoming migration connection: too many open");
    };
    let _ = std::thread::Builder::new()
        .name("migrate-in".into())
        .spawn(move || {
            let _slot = slot;
            let ch = match agent.security.accept(std) {
                Ok(ch) => ch,
                Err(e) => {
                    return warn!(%peer, cause = %e, "refused an incoming migration connection")
                }
            };
            info!(%peer, from = ch.peer().unwrap_or("(insecure)"), "incoming migration");
            match migrate::dest::receive(ch, agent.inv.clone(), &agent.cfg.name, agent.cfg.io) {
                Ok(name) => info!(vm = %name, %peer, "incoming migration committed"),
                Err(e) => warn!(%peer, cause = %e, "incoming migration failed"),
            }
        });
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("replies serialize");
    line.push(b'\n');
    w.write_all(&line).await
}

#[instrument(skip_all)]
async fn control(agent: Arc<Agent>, s: UnixStream) {
    let admitted = guard::admit(&s, agent.control_gid);
    let (r, mut w) = s.into_split();
    if let Err(why) = admitted {
        warn!(%why, "control connection refused");
        let _ = send(&mut w, &Reply::Error(why)).await;
        return;
    }
    let mut lines = BufReader::new(r.take(guard::MAX_CONTROL_LINE)).lines();
    let first = tokio::time::timeout(guard::CONTROL_REQUEST_TIMEOUT, lines.next_line()).await;
    let Ok(Ok(Some(line))) = first else {
        return;
    };
    if line.len() as u64 >= guard::MAX_CONTROL_LINE - 1 {
        let why = format!("request longer than {} bytes", guard::MAX_CONTROL_LINE);
        let _ = send(&mut w, &Reply::Error(why)).await;
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(&mut w, &Reply::Error(format!("bad request: {e}"))).await;
            return;
        }
    };
    if let Request::Migrate { name, dest, opts } = req {
        migrate_out(agent, name, Job::Migrate { dest, opts }, lines, w).await;
        return;
    }
    if let Request::Resume {
        name,
        resume_window_s,
    } = req
    {
        migrate_out(agent, name, Job::Resume(resume_window_s), lines, w).await;
        return;
    }
    let a = agent.clone();
    let reply = tokio::task::spawn_blocking(move || handle(&a, req))
        .await
        .unwrap_or_else(|e| Reply::Error(format!("agent task failed: {e}")));
    let _ = send(&mut w, &reply).await;
}

fn ok<T: serde::Serialize>(v: T) -> Reply {
    Reply::Ok(serde_json::to_value(v).expect("serializes"))
}

fn handle(agent: &Agent, req: Request) -> Reply {
    let inv = &agent.inv;
    let r = match req {
        Request::Ping => {
            return ok(AgentInfo {
                name: agent.cfg.name.clone(),
                listen: agent.cfg.listen.to_string(),
                datastore: agent.cfg.datastore.display().to_string(),
                pid: std::process::id(),
                dirty_ring: kvm_ioctls::Kvm::new()
                    .map(|k| k.check_extension(kvm_ioctls::Cap::DirtyLogRing))
                    .unwrap_or(false),
            })
        }
        Request::Create { def } => inv.create(def).map(ok),
        Request::Start { name } => inv.start(&name).map(ok),
        Request::Stop { name } => {
            // A VM that arrived in post-copy and lost its source waits on its faults: powering
            // it off gives its missing pages up (the source still holds the VM).
            if migrate::dest::discard_parked(inv.datastore(), &name) {
                warn!(vm = %name, "stopping a VM whose post-copy was interrupted: its missing pages are given up here");
            }
            inv.stop(&name).map(ok)
        }
        Request::Destroy { name } => inv.destroy(&name).map(|_| ok(name)),
        Request::List => Ok(ok(inv.list())),
        Request::Show { name } => inv.info(&name).map(ok),
        // Holding the VM's migration slot keeps a migration from pausing (and this from
        // resuming) it concurrently.
        Request::Digest { name } => inv
            .begin_migration(&name)
            .map_err(|e| match e {
                crate::inventory::InventoryError::State { name, state, .. } => {
                    crate::inventory::InventoryError::State {
                        name,
                        state,
                        op: "take a digest now",
                    }
                }
                e => e,
            })
            .map(|(_, vm)| {
                vm.pause();
                let memory = vm.ram().digest();
                let counter = vm.stats().counter;
                vm.resume();
                inv.end_migration(&name, false);
                match memory {
                    Ok(memory) => ok(DigestInfo { memory, counter }),
                    Err(e) => Reply::Error(e.to_string()),
                }
            }),
        Request::Cancel { name } => {
            return match agent.migrations.lock().expect("migrations").get(&name) {
                Some(c) => {
                    c.cancel();
                    ok(format!("cancelling the migration of {name}"))
                }
                None => Reply::Error(format!("no migration of {name:?} in progress")),
            }
        }
        Request::Rollback { name } => {
            let Some(parked) = agent.parked.lock().expect("parked").remove(&name) else {
                return Reply::Error(format!(
                    "no interrupted post-copy of {name:?} here: nothing to roll back"
                ));
            };
            return match inv.running(&name) {
                Ok((def, vm)) => {
                    let dir = inv.dir(&name);
                    let out = migrate::source::Outgoing {
                        vm: &vm,
                        def: &def,
                        dir: &dir,
                        agent: &agent.cfg.name,
                        security: &agent.security,
                    };
                    let dest = parked.dest_name().to_string();
                    migrate::source::rollback(&out, parked);
                    inv.end_migration(&name, false);
                    ok(format!(
                        "{name} runs here again from the post-copy switch point; what it did on {dest} since is lost"
                    ))
                }
                Err(e) => {
                    agent.parked.lock().expect("parked").insert(name, parked);
                    Reply::Error(e.to_string())
                }
            };
        }
        Request::Migrate { .. } | Request::Resume { .. } => {
            unreachable!("handled by migrate_out")
        }
    };
    r.unwrap_or_else(|e| Reply::Error(e.to_string()))
}

fn resolve(agent: &Agent, dest: &str) -> Result<SocketAddr, String> {
    let addr = agent.hosts.get(dest).map(String::as_str).unwrap_or(dest);
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            let known: Vec<&String> = agent.hosts.keys().collect();
            format!("unknown destination {dest:?}: not in the hosts file (known: {known:?}) and not an address")
        })
}

/// A migration out to run: a new one, or the resumption of an interrupted post-copy.
enum Job {
    Migrate {
        dest: String,
        opts: MigrateOptions,
    },
    /// With the reconnect window to use, if overridden.
    Resume(Option<u64>),
}

/// A job ready to run: the destination resolved, or the parked post-copy taken.
enum Work {
    Migrate {
        addr: SocketAddr,
        dest: String,
        opts: MigrateOptions,
    },
    Resume(Box<migrate::source::Parked>),
}

async fn migrate_out(
    agent: Arc<Agent>,
    name: String,
    job: Job,
    mut lines: tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) {
    // What the worker runs: a fresh migration (with the destination's address), or a parked
    // post-copy.
    let start = match job {
        Job::Migrate { dest, opts } => resolve(&agent, &dest).and_then(|addr| {
            let (def, vm) = agent
                .inv
                .begin_migration(&name)
                .map_err(|e| e.to_string())?;
            Ok((def, vm, Work::Migrate { addr, dest, opts }))
        }),
        Job::Resume(window) => {
            let mut parked_map = agent.parked.lock().expect("parked");
            match parked_map.remove(&name) {
                None => Err(format!(
                    "no interrupted post-copy of {name:?} here: nothing to resume"
                )),
                Some(mut parked) => match agent.inv.running(&name) {
                    Ok((def, vm)) => {
                        if let Some(w) = window {
                            parked.set_resume_window(w);
                        }
                        Ok((def, vm, Work::Resume(parked)))
                    }
                    Err(e) => {
                        // Kept for another try: the pages are still the only copy.
                        parked_map.insert(name.clone(), parked);
                        Err(e.to_string())
                    }
                },
            }
        }
    };
    let (def, vm, work) = match start {
        Ok(x) => x,
        Err(e) => {
            let _ = send(&mut w, &Reply::Error(e)).await;
            return;
        }
    };
    let cancel = Arc::new(Cancel::default());
    agent
        .migrations
        .lock()
        .expect("migrations")
        .insert(name.clone(), cancel.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let a = agent.clone();
    let c = cancel.clone();
    let n = name.clone();
    let worker = std::thread::Builder::new().name(format!("migrate-{name}")).spawn(move || {
        let dir = a.inv.dir(&n);
        let out = migrate::source::Outgoing {
            vm: &vm,
            def: &def,
            dir: &dir,
            agent: &a.cfg.name,
            security: &a.security,
        };
        let ptx = tx.clone();
        let progress = move |p| {
            let _ = ptx.send(Reply::Progress(Box::new(p)));
        };
        let result = match work {
            Work::Migrate { addr, dest, opts } => {
                migrate::source::migrate(&out, addr, &dest, &opts, &c, &progress)
            }
            Work::Resume(parked) => migrate::source::resume(&out, parked, &progress),
        };
        drop(vm);
        let reply = match result {
            Ok(report) => {
                a.inv.end_migration(&n, true);
                info!(vm = %n, downtime_ms = report.downtime_ms, total_ms = report.total_ms, "migrated");
                Reply::Report(Box::new(report))
            }
            Err(e @ migrate::MigrateError::PostcopyInterrupted { .. }) => {
                let why = e.to_string();
                warn!(vm = %n, cause = %why, "post-copy parked");
                if let migrate::MigrateError::PostcopyInterrupted { parked, .. } = e {
                    // The VM stays paused and migrating here until resumed or rolled back.
                    a.parked.lock().expect("parked").insert(n.clone(), parked);
                }
                Reply::Error(why)
            }
            Err(e) => {
                let unknown = matches!(e, migrate::MigrateError::CommitUnknown(_));
                if !unknown {
                    a.inv.end_migration(&n, false);
                }
                warn!(vm = %n, cause = %e, "migration failed");
                Reply::Error(e.to_string())
            }
        };
        a.migrations.lock().expect("migrations").remove(&n);
        let _ = tx.send(reply);
    });
    if let Err(e) = worker {
        agent.inv.end_migration(&name, false);
        agent.migrations.lock().expect("migrations").remove(&name);
        let _ = send(
            &mut w,
            &Reply::Error(format!("cannot start the migration: {e}")),
        )
        .await;
        return;
    }
    // Relay progress; if the CLI goes away (Ctrl-C), cancel.
    let mut client_gone = false;
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { break };
                let last = !matches!(r, Reply::Progress(_));
                if !client_gone && send(&mut w, &r).await.is_err() {
                    client_gone = true;
                    cancel.cancel();
                }
                if last { break; }
            }
            l = lines.next_line(), if !client_gone => {
                if matches!(l, Ok(None) | Err(_)) {
                    client_gone = true;
                    info!(vm = %name, "CLI disconnected: cancelling the migration");
                    cancel.cancel();
                }
            }
        }
    }
}
