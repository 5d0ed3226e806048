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
use crate::migrate::registry::{Registry, RegistryError};
use crate::migrate::source::Outcome;
use crate::migrate::{self, MigrateOptions};
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
    /// Another agent runs with this name or on this datastore.
    #[error("cannot lock {what} ({path}): {cause}")]
    Locked {
        /// What the lock protects.
        what: &'static str,
        /// Lock file.
        path: PathBuf,
        /// Why it could not be taken (the holder's pid).
        cause: String,
    },
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
    /// Datastores; the first is the default.
    pub datastores: Vec<crate::inventory::Datastore>,
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
    /// Every migration of this agent, in and out.
    migrations: Registry,
    /// The live status of each VM's migration out, kept after it ends (`migrate --status`).
    status: Mutex<HashMap<String, Arc<Mutex<migrate::status::Tracker>>>>,
    /// Mutual TLS with the other agents, or `--insecure`.
    security: Security,
    /// Incoming migration connections being served (capped).
    incoming: Slots,
    /// Gid admitted on the control socket besides root.
    control_gid: Option<u32>,
}

/// Reads a hosts file: `hostB = "127.0.0.1:7402"` lines (TOML). Every entry must be an
/// address with a port: a mistake is reported now, not at the first migration.
pub fn read_hosts(path: &Path) -> Result<HashMap<String, String>, AgentError> {
    let err = |cause: String| AgentError::Hosts {
        path: path.into(),
        cause,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let hosts: HashMap<String, String> = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    for (name, addr) in &hosts {
        check_host_entry(name, addr).map_err(err)?;
    }
    Ok(hosts)
}

/// One hosts-file entry: a host name, and `ADDRESS:PORT` (`[v6]:PORT` for IPv6).
fn check_host_entry(name: &str, addr: &str) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(format!(
            "host name {name:?}: use letters, digits, '-', '_' or '.'"
        ));
    }
    let bad = |why: &str| {
        format!("{name} = {addr:?}: {why} (write \"ADDRESS:PORT\", e.g. \"10.0.0.2:7401\")")
    };
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return match a.port() {
            0 => Err(bad("the port must be a number from 1 to 65535")),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    if host.is_empty() || host.contains(':') {
        return Err(bad("not an address with a port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port must be a number from 1 to 65535")),
    }
}

/// Files an agent holds locked while it runs, so that a second agent with the same name or
/// the same datastore refuses to start instead of taking the first one's VMs over.
struct AgentLocks {
    _files: Vec<std::fs::File>,
}

impl AgentLocks {
    fn take(cfg: &AgentConfig) -> Result<Self, AgentError> {
        let mut control_lock = cfg.control.clone().into_os_string();
        control_lock.push(".lock");
        // A shared datastore is seen by other agents on purpose: its VM folders' `.owner`
        // files say whose each is, and it takes no lock.
        let files = std::iter::once((
            PathBuf::from(control_lock),
            "the agent name (control socket)",
        ))
        .chain(
            cfg.datastores
                .iter()
                .filter(|d| !d.shared)
                .map(|d| (d.path.join(".agent.lock"), "the datastore")),
        )
        .map(|(path, what)| lock_file(&path, what))
        .collect::<Result<_, _>>()?;
        Ok(Self { _files: files })
    }
}

fn lock_file(path: &Path, what: &'static str) -> Result<std::fs::File, AgentError> {
    use std::io::{Read, Seek, Write};
    let fail = |cause: String| AgentError::Locked {
        what,
        path: path.into(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(fail(format!("held by another agent ({})", holder.trim())));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(fail(e.to_string())),
    }
    let me = format!("pid {}", std::process::id());
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| f.write_all(me.as_bytes()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(f)
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
    let hosts = match &cfg.hosts {
        Some(p) => read_hosts(p)?,
        None => HashMap::new(),
    };
    let _locks = AgentLocks::take(&cfg)?;
    let inv = Inventory::open_many(&cfg.name, cfg.datastores.clone(), capacity)?;
    // Computed now, not inside the first migration's round-trip measurement.
    let cpu = migrate::cpu_digest();
    tracing::debug!(%cpu, "CPU feature digest");
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
    {
        let hosts = hosts.clone();
        crate::migrate::cold::recover::spawn_resolver(
            inv.clone(),
            security.clone(),
            Box::new(move |h| hosts.get(h).and_then(|a| a.to_socket_addrs().ok()?.next())),
        );
    }
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        inv,
        hosts,
        migrations: Registry::default(),
        status: Mutex::new(HashMap::new()),
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
        if vm.state != crate::inventory::VmState::Stopped {
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
            let to = migrate::dest::Destination {
                inv: &agent.inv,
                registry: &agent.migrations,
                agent: &agent.cfg.name,
                io: agent.cfg.io,
            };
            match migrate::dest::receive(ch, &to) {
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
    if let Request::MigrateCold { name, dest, opts } = req {
        let work = match resolve(&agent, &dest) {
            Ok(addr) => super::cold::ColdWork::Migrate { dest, addr, opts },
            Err(e) => {
                let _ = send(&mut w, &Reply::Error(e)).await;
                return;
            }
        };
        let (inv, sec, me) = (
            agent.inv.clone(),
            agent.security.clone(),
            agent.cfg.name.clone(),
        );
        super::cold::serve(inv, sec, me, name, work, w).await;
        return;
    }
    if let Request::StorageMove { name, to } = req {
        let (inv, sec, me) = (
            agent.inv.clone(),
            agent.security.clone(),
            agent.cfg.name.clone(),
        );
        super::cold::serve(inv, sec, me, name, super::cold::ColdWork::Move { to }, w).await;
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
                datastore: inv.datastore().display().to_string(),
                pid: std::process::id(),
                dirty_ring: kvm_ioctls::Kvm::new()
                    .map(|k| k.check_extension(kvm_ioctls::Cap::DirtyLogRing))
                    .unwrap_or(false),
            })
        }
        Request::Create { def, datastore } => inv.create_on(def, datastore.as_deref()).map(ok),
        Request::Datastores => Ok(ok(inv.datastore_infos())),
        Request::Recovered => Ok(ok(inv.recovered())),
        Request::Reclaim { name } => {
            return match super::cold::reclaim(inv, &agent.security, &|h| resolve(agent, h), &name)
            {
                Ok(m) => ok(m),
                Err(e) => Reply::Error(e),
            }
        }
        Request::Start { name } => inv.start(&name).map(ok),
        Request::Stop { name } => {
            // A VM that arrived in post-copy and lost its source waits on its faults: powering
            // it off gives its missing pages up (the source still holds the VM).
            if agent.migrations.discard_postcopy_in(&name) {
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
        Request::Status { name } => {
            return match agent.status.lock().expect("status").get(&name) {
                Some(t) => ok(t.lock().expect("tracker").snapshot()),
                None => Reply::Error(format!(
                    "no migration of {name:?} from this host since the agent started"
                )),
            }
        }
        Request::Cancel { name } => {
            return match agent.migrations.cancel(&name) {
                Ok(()) => ok(format!(
                    "cancelling the migration of {name}: the VM stays on this host"
                )),
                Err(RegistryError::Cancel(migrate::MigrateError::NotAllowed { .. })) => {
                    Reply::Error(format!(
                        "the migration of {name} is past its commit point (the VM runs on the destination, in post-copy): it cannot be cancelled; it completes, or parks if the connection is lost (then `vmig migrate --rollback {name}` gives it up)"
                    ))
                }
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::Rollback { name } => {
            let parked = match agent.migrations.take_parked(&name) {
                Ok(p) => p,
                Err(e) => return Reply::Error(e.to_string()),
            };
            return match inv.running(&name) {
                Ok((def, vm)) => {
                    let dir = inv.dir(&name);
                    let shared = inv.shared_datastore_of(&name);
                    let out = migrate::source::Outgoing {
                        vm: &vm,
                        def: &def,
                        dir: &dir,
                        agent: &agent.cfg.name,
                        security: &agent.security,
                        shared_datastore: shared.as_deref(),
                    };
                    let dest = parked.dest_name().to_string();
                    migrate::source::rollback(&out, parked);
                    inv.end_migration(&name, false);
                    ok(format!(
                        "{name} runs here again from the post-copy switch point; what it did on {dest} since is lost"
                    ))
                }
                Err(e) => {
                    agent.migrations.park(&name, parked);
                    Reply::Error(e.to_string())
                }
            };
        }
        Request::Migrate { .. }
        | Request::Resume { .. }
        | Request::MigrateCold { .. }
        | Request::StorageMove { .. } => {
            unreachable!("handled by migrate_out and cold::serve")
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

/// Starts a fresh migration out of `name`: the VM's migration slot in the inventory, then its
/// entry in the registry.
fn begin_outgoing(
    agent: &Agent,
    name: &str,
) -> Result<
    (
        crate::inventory::VmDef,
        Arc<crate::vm::Vm>,
        Arc<migrate::Cancel>,
    ),
    String,
> {
    let (def, vm) = agent.inv.begin_migration(name).map_err(|e| e.to_string())?;
    match agent.migrations.begin_outgoing(name) {
        Ok(cancel) => Ok((def, vm, cancel)),
        Err(e) => {
            agent.inv.end_migration(name, false);
            Err(e.to_string())
        }
    }
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
        Job::Migrate { dest, opts } => opts
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|_| resolve(&agent, &dest))
            .and_then(|addr| {
                let (def, vm, cancel) = begin_outgoing(&agent, &name)?;
                Ok((def, vm, cancel, Work::Migrate { addr, dest, opts }))
            }),
        Job::Resume(window) => match agent.migrations.resume_parked(&name) {
            Err(e) => Err(e.to_string()),
            Ok((mut parked, cancel)) => match agent.inv.running(&name) {
                Ok((def, vm)) => {
                    if let Some(w) = window {
                        parked.set_resume_window(w);
                    }
                    Ok((def, vm, cancel, Work::Resume(parked)))
                }
                Err(e) => {
                    // Kept for another try: the pages are still the only copy.
                    agent.migrations.park(&name, parked);
                    Err(e.to_string())
                }
            },
        },
    };
    let (def, vm, cancel, work) = match start {
        Ok(x) => x,
        Err(e) => {
            let _ = send(&mut w, &Reply::Error(e)).await;
            return;
        }
    };
    let dest_name = match &work {
        Work::Migrate { dest, .. } => dest.clone(),
        Work::Resume(p) => p.dest_name().to_string(),
    };
    let tracker = Arc::new(Mutex::new(migrate::status::Tracker::new(
        &name,
        &dest_name,
        vm.ram().size(),
    )));
    agent
        .status
        .lock()
        .expect("status")
        .insert(name.clone(), tracker.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let a = agent.clone();
    let c = cancel.clone();
    let n = name.clone();
    let worker = std::thread::Builder::new().name(format!("migrate-{name}")).spawn(move || {
        let dir = a.inv.dir(&n);
        let shared = a.inv.shared_datastore_of(&n);
        let out = migrate::source::Outgoing {
            vm: &vm,
            def: &def,
            dir: &dir,
            agent: &a.cfg.name,
            security: &a.security,
            shared_datastore: shared.as_deref(),
        };
        let ptx = tx.clone();
        let t = tracker.clone();
        let progress = move |p: migrate::Progress| {
            t.lock().expect("tracker").update(&p);
            let _ = ptx.send(Reply::Progress(Box::new(p)));
        };
        // `migrate` turns its own panics into errors; this catches what escapes a resume (past
        // Go: the VM stays paused here, never resumed) so the registry is still cleaned up.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match work {
            Work::Migrate { addr, dest, opts } => {
                migrate::source::migrate(&out, addr, &dest, &opts, &c, &progress)
            }
            Work::Resume(parked) => migrate::source::resume(&out, parked, &c, &progress),
        }))
        .unwrap_or_else(|p| {
            Err(migrate::MigrateError::CommitUnknown(format!(
                "internal error: {}",
                migrate::source::panic_message(&p)
            )))
        });
        drop(vm);
        match &result {
            Ok(Outcome::Committed(r)) => tracker.lock().expect("tracker").complete(r),
            Ok(Outcome::Parked(p)) => tracker.lock().expect("tracker").fail(&p.to_string()),
            Err(e) => tracker.lock().expect("tracker").fail(&e.to_string()),
        }
        let reply = match result {
            Ok(Outcome::Committed(report)) => {
                a.migrations.end_outgoing(&n);
                a.inv.end_migration(&n, true);
                info!(vm = %n, downtime_ms = report.downtime_ms, total_ms = report.total_ms, "migrated");
                Reply::Report(report)
            }
            Ok(Outcome::Parked(parked)) => {
                let why = parked.to_string();
                warn!(vm = %n, cause = %why, "post-copy parked");
                // The VM stays paused and migrating here until resumed or rolled back.
                a.migrations.park(&n, parked);
                Reply::Error(why)
            }
            Err(e) => {
                a.migrations.end_outgoing(&n);
                let unknown = matches!(e, migrate::MigrateError::CommitUnknown(_));
                if !unknown {
                    a.inv.end_migration(&n, false);
                }
                warn!(vm = %n, cause = %e, "migration failed");
                Reply::Error(e.to_string())
            }
        };
        let _ = tx.send(reply);
    });
    if let Err(e) = worker {
        agent.inv.end_migration(&name, false);
        agent.migrations.end_outgoing(&name);
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
                    cancel_on_disconnect(&name, &cancel);
                }
                if last { break; }
            }
            l = lines.next_line(), if !client_gone => {
                if matches!(l, Ok(None) | Err(_)) {
                    client_gone = true;
                    info!(vm = %name, "CLI disconnected: cancelling the migration");
                    cancel_on_disconnect(&name, &cancel);
                }
            }
        }
    }
}

/// The CLI went away: cancel the migration, unless it is past `Go` (then it goes on).
fn cancel_on_disconnect(name: &str, cancel: &migrate::Cancel) {
    if let Err(e) = cancel.cancel() {
        info!(vm = %name, reason = %e, "the migration goes on");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_entries_need_an_address_with_a_port() {
        for ok in ["127.0.0.1:7402", "[::1]:7402", "hostb.example:7401"] {
            check_host_entry("hostB", ok).unwrap();
        }
        for (bad, why) in [
            ("10.0.0.2", "no port"),
            ("10.0.0.2:0", "from 1 to 65535"),
            ("10.0.0.2:http", "from 1 to 65535"),
            (":7401", "not an address"),
        ] {
            let e = check_host_entry("hostB", bad).unwrap_err();
            assert!(e.contains(why) && e.contains("ADDRESS:PORT"), "{bad}: {e}");
        }
        assert!(check_host_entry("host B", "127.0.0.1:1").is_err());
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let _held = lock_file(&p, "the datastore").unwrap();
        let e = lock_file(&p, "the datastore").unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "holder not named: {e}"
        );
        drop(_held);
        lock_file(&p, "the datastore").unwrap();
    }
}
