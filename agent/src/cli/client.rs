//! Finding the agent to talk to and the replies every command expects.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use vmig::api::client::call;
use vmig::api::{self, Reply, Request};
use vmig::inventory::VmInfo;

/// Every agent socket in the run directory.
pub(super) fn local_agents() -> Vec<PathBuf> {
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
pub(super) async fn pick_agent(
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
pub(super) async fn owners_of(all: &[PathBuf], name: &str) -> Vec<PathBuf> {
    let mut owners = Vec::new();
    for a in all {
        if let Ok(Reply::Ok(_)) = call(a, &Request::Show { name: name.into() }).await {
            owners.push(a.clone());
        }
    }
    owners
}

pub(super) fn names(socks: &[PathBuf]) -> String {
    socks
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) async fn expect_ok(path: &Path, req: Request) -> Result<serde_json::Value> {
    match call(path, &req).await? {
        Reply::Ok(v) => Ok(v),
        Reply::Error(e) => Err(anyhow!(e)),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Reads a VM's info from an agent.
pub async fn show(a: &Path, name: &str) -> Result<VmInfo> {
    let v = expect_ok(a, Request::Show { name: name.into() })
        .await
        .with_context(|| format!("show {name}"))?;
    Ok(serde_json::from_value(v)?)
}
