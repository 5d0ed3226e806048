//! The control API between the CLI and its local agent: JSON lines over a Unix socket.
//! One request per connection; the agent answers with one reply line, or for `migrate` with
//! progress lines and then the report or an error.

pub mod client;
mod cold;
pub mod guard;
pub mod local;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::inventory::VmDef;
use crate::migrate::cold::{ColdOptions, ColdProgress, ColdReport};
use crate::migrate::{MigrateOptions, Progress, Report};

/// A request from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Who are you?
    Ping,
    /// Create a VM folder.
    Create {
        /// Definition.
        def: VmDef,
        /// Datastore to create it on (None: the default).
        #[serde(default)]
        datastore: Option<String>,
    },
    /// The agent's datastores.
    Datastores,
    /// Boot a VM.
    Start {
        /// VM.
        name: String,
    },
    /// Power a VM off.
    Stop {
        /// VM.
        name: String,
    },
    /// Delete a stopped VM.
    Destroy {
        /// VM.
        name: String,
    },
    /// All VMs.
    List,
    /// One VM.
    Show {
        /// VM.
        name: String,
    },
    /// Pause a running VM, hash its memory, resume it.
    Digest {
        /// VM.
        name: String,
    },
    /// Migrate a running VM live.
    Migrate {
        /// VM.
        name: String,
        /// Destination host name (hosts file) or address.
        dest: String,
        /// Knobs.
        opts: MigrateOptions,
    },
    /// Finish a post-copy migration out that lost its connection (progress, then the report).
    Resume {
        /// VM.
        name: String,
        /// Overrides the reconnect window the migration was started with.
        resume_window_s: Option<u64>,
    },
    /// Give up a post-copy migration out that lost its connection: run the VM here again
    /// from the switch point (the destination must be known lost).
    Rollback {
        /// VM.
        name: String,
    },
    /// Move a stopped VM to another host (progress, then a cold report).
    MigrateCold {
        /// VM.
        name: String,
        /// Destination host name (hosts file) or address.
        dest: String,
        /// What moves where.
        opts: ColdOptions,
    },
    /// Move a VM's files to another datastore of this host (progress, then a cold report).
    StorageMove {
        /// VM.
        name: String,
        /// Target datastore.
        to: String,
    },
    /// Take back the copy a `--keep-source` cold migration left (once the host it moved to
    /// no longer has the VM).
    Reclaim {
        /// VM.
        name: String,
    },
    /// What the agent's start recovered.
    Recovered,
    /// The live state of the VM's migration (or the last one's outcome).
    Status {
        /// VM.
        name: String,
    },
    /// Cancel a migration in progress.
    Cancel {
        /// VM.
        name: String,
    },
}

/// A reply line from the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Success, with a JSON value.
    Ok(serde_json::Value),
    /// Migration progress.
    Progress(Box<Progress>),
    /// Migration done.
    Report(Box<Report>),
    /// Cold migration or storage move progress.
    ColdProgress(Box<ColdProgress>),
    /// Cold migration or storage move done.
    ColdReport(Box<ColdReport>),
    /// Failure, with the reason.
    Error(String),
}

/// The answer to `Ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Host name of the agent.
    pub name: String,
    /// Migration endpoint.
    pub listen: String,
    /// Datastore.
    pub datastore: String,
    /// Process id.
    pub pid: u32,
    /// Dirty tracking the host's KVM offers by default.
    pub dirty_ring: bool,
}

/// Answer to `Digest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DigestInfo {
    /// Memory digest taken while paused.
    pub memory: String,
    /// Counter at that moment.
    pub counter: u64,
}

/// Where agents put their control sockets: `$VMIG_RUN_DIR`, else `/run/vmig`.
pub fn run_dir() -> std::path::PathBuf {
    std::env::var_os("VMIG_RUN_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/run/vmig".into())
}

/// The control socket of the agent of host `name`.
pub fn socket_of(name: &str) -> std::path::PathBuf {
    run_dir().join(format!("{name}.sock"))
}
