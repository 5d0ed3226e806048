//! `vmig datastore list`: the agents' datastores.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use vmig::api::{self, Request};

use super::client::{expect_ok, local_agents, pick_agent};

#[derive(Debug, Subcommand)]
pub(super) enum DatastoreCmd {
    /// List the agent's datastores: name, folder, shared or not, free space, VMs.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn datastores(
    agent: Option<PathBuf>,
    host: Option<String>,
    cmd: DatastoreCmd,
) -> Result<()> {
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
