//! Command-line interface: the commands and their dispatch; each command's arguments and
//! handler are in its own module.

mod agent;
mod certs;
mod client;
mod cold;
mod datastore;
mod demo;
mod migrate;
mod plot;
mod trace;
mod vm;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use vmig::api::Request;

use client::{expect_ok, pick_agent, show};
use migrate::run_migration;

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
    Agent(agent::AgentArgs),
    /// List the agents running on this machine (their control sockets), and whether they answer.
    Agents(agent::AgentsArgs),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// The agent's datastores.
    #[command(subcommand)]
    Datastore(datastore::DatastoreCmd),
    /// Move a VM's storage between datastores of its host.
    #[command(subcommand)]
    Storage(cold::StorageCmd),
    /// Migrate a running VM live to another host.
    Migrate(migrate::MigrateArgs),
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

/// Runs a command.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(a) => agent::agent(a).await,
        Cmd::Agents(a) => agent::agents(a).await,
        Cmd::Vm(v) => vm::vm(cli.agent, cli.host, v).await,
        Cmd::Datastore(d) => datastore::datastores(cli.agent, cli.host, d).await,
        Cmd::Storage(cold::StorageCmd::Move(m)) => {
            let a = pick_agent(cli.agent, cli.host, Some(&m.name)).await?;
            let req = Request::StorageMove {
                name: m.name.clone(),
                to: m.to.clone(),
            };
            cold::run(&a, &m.name, req, m.json).await.map(|_| ())
        }
        Cmd::Migrate(m) => migrate::migrate(cli.agent, cli.host, m).await,
        Cmd::Demo(d) => demo::run(d).await,
        Cmd::Trace(t) => trace::run(cli.agent, cli.host, t).await,
        Cmd::Certs(c) => certs::run(c),
        Cmd::Report(r) => plot::run(r),
    }
}
