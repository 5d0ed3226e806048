//! `vmig vm …`: create, start, stop, destroy, list, show, digest and reclaim VMs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use vmig::api::{self, Request};
use vmig::dirty::DirtyTracking;
use vmig::inventory::{VmDef, VmInfo};

use super::client::{expect_ok, local_agents, names, owners_of, pick_agent};

#[derive(Debug, Subcommand)]
pub(super) enum VmCmd {
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
pub(super) struct CreateArgs {
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

pub(super) async fn vm(agent: Option<PathBuf>, host: Option<String>, cmd: VmCmd) -> Result<()> {
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
                generation: 0,
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
