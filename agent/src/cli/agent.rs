//! `vmig agent` (run the host agent) and `vmig agents` (list the agents running here).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use vmig::api::client::call;
use vmig::api::{self, Reply, Request};
use vmig::transport::IoPath;

use super::client::local_agents;

#[derive(Debug, Args)]
pub(super) struct AgentArgs {
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

#[derive(Debug, Args)]
pub(super) struct AgentsArgs {
    /// Wait up to this many seconds for every HOST named to answer.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=3600))]
    wait: Option<u64>,
    /// Hosts that must be running (default: every socket found).
    hosts: Vec<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(super) async fn agent(a: AgentArgs) -> Result<()> {
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

pub(super) async fn agents(a: AgentsArgs) -> Result<()> {
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
