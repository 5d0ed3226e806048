//! The agent daemon: owns the host's VMs, serves the control socket to the CLI and the
//! migration endpoint to other agents.

mod control;
mod hosts;
mod locks;
mod outgoing;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::guard::{self, Slots};
use crate::inventory::Inventory;
use crate::migrate;
use crate::migrate::registry::Registry;
use crate::transport::tls::{TlsConfig, TlsError};
use crate::transport::{IoPath, Security};
use control::control;
pub use hosts::read_hosts;
use locks::AgentLocks;

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
    /// Set once the start's ownership check is done (see [`Agent::wait_fenced`]).
    fence_checked: (Mutex<bool>, std::sync::Condvar),
}

impl Agent {
    /// Waits (a bounded time) for the ownership check of the agent's start, so that nothing
    /// lists or starts a stale copy before it is known to be fenced.
    fn wait_fenced(&self) {
        let (m, cv) = &self.fence_checked;
        let g = m.lock().expect("fence flag");
        let _ = cv
            .wait_timeout_while(g, std::time::Duration::from_secs(20), |done| !*done)
            .expect("fence flag");
    }
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
    // The BPF probes' first attach (beside a migration's round 1) should not parse the
    // kernel's BTF: parse it now, at low priority, while nothing migrates.
    let _ = std::thread::Builder::new()
        .name("btf-warm-up".into())
        .spawn(|| {
            crate::migrate::probe::lower_priority();
            vmig_ebpf::warm_up();
        });
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
        fence_checked: (Mutex::new(false), std::sync::Condvar::new()),
    });
    {
        // Which of this host's VMs another host holds at a higher generation: fenced. On a
        // thread: the peers' own questions must find this agent answering meanwhile.
        let a = agent.clone();
        let _ = std::thread::Builder::new()
            .name("fence-check".into())
            .spawn(move || {
                let fenced = migrate::fence::check(&a.inv, &a.security, &hosts::peers(&a), None);
                for vm in fenced {
                    a.inv
                        .note_recovered(format!("{vm}: fenced (another host holds a newer copy)"));
                }
                let (m, cv) = &a.fence_checked;
                *m.lock().expect("fence flag") = true;
                cv.notify_all();
            });
    }
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
