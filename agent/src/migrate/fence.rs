//! Fencing stale copies between agents (see [`crate::inventory::generation`]): an agent asks
//! the other hosts of its hosts file which generation they hold of its VMs (`OwnerQuery` →
//! `OwnerAnswer`, over the authenticated agent-to-agent channel) when it starts and before
//! `vm start`; a local copy older than a peer's is fenced. A rollback on a source tells the
//! destination at once (`Fence` → `FenceAnswer`) when it answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::dest::Destination;
use super::link::Link;
use super::source::handshake;
use super::{MigrateError, MigrateOptions};
use crate::inventory::{generation, Inventory};
use crate::transport::Security;
use crate::wire::messages as msg;

/// How long a peer has to answer a question.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The other agents: host name and address.
pub type Peers = Vec<(String, SocketAddr)>;

/// What a host holds: (VM, generation) of each VM asked about that it has.
type Held = Vec<(String, u64)>;

fn connect(
    security: &Security,
    addr: SocketAddr,
    peer: &str,
    agent: &str,
) -> Result<Link, MigrateError> {
    let mut link = Link::connect(security, addr, peer, &MigrateOptions::default())?;
    link.reader.set_timeout(ANSWER_TIMEOUT)?;
    handshake::greet(&mut link, agent)?;
    Ok(link)
}

/// Asks `peer` which generation it holds of each of `names` (the ones it holds).
pub fn ask(
    security: &Security,
    addr: SocketAddr,
    peer: &str,
    agent: &str,
    names: &[String],
) -> Result<Held, MigrateError> {
    let mut link = connect(security, addr, peer, agent)?;
    link.send(&msg::OwnerQuery {
        names: names.to_vec(),
    })?;
    let a: msg::OwnerAnswer = link.recv()?;
    Ok(a.vms.into_iter().map(|e| (e.name, e.generation)).collect())
}

/// Tells `peer` that this agent holds `name` at `generation` now (after a rollback): its
/// copy is fenced. Returns its answer: fenced, or why not.
pub fn tell(
    security: &Security,
    addr: SocketAddr,
    peer: &str,
    agent: &str,
    name: &str,
    generation: u64,
) -> Result<Result<(), String>, MigrateError> {
    let mut link = connect(security, addr, peer, agent)?;
    link.send(&msg::Fence {
        name: name.into(),
        generation,
    })?;
    let a: msg::FenceAnswer = link.recv()?;
    Ok(if a.fenced { Ok(()) } else { Err(a.reason) })
}

/// Asks every peer about this host's VMs (all, or only `only`) and fences the stale copies.
/// A peer that does not answer fences nothing (logged). The copy of a post-copy that never
/// completed here is fenced if its source holds the VM still or again; if its source does
/// not answer, that is logged loudly; if it answers without the VM, the copy is this host's.
/// Returns the names fenced.
pub fn check(
    inv: &Inventory,
    security: &Security,
    peers: &Peers,
    only: Option<&str>,
) -> Vec<String> {
    let local = inv.local_copies(only);
    let names: Vec<String> = local
        .iter()
        .filter(|c| c.fenceable)
        .map(|c| c.name.clone())
        .collect();
    if names.is_empty() || peers.is_empty() {
        for c in local.iter().filter(|c| c.postcopy_from.is_some()) {
            tracing::error!(vm = %c.name, source = ?c.postcopy_from, "this copy arrived in a post-copy that never completed and no peer can be asked about it: do not start it before checking that its source no longer runs it");
        }
        return Vec::new();
    }
    let me = inv.agent();
    // Every peer at once: one that does not answer costs its timeout once.
    let answers: Vec<(String, Result<Held, MigrateError>)> = std::thread::scope(|s| {
        let hs: Vec<_> = peers
            .iter()
            .filter(|(p, _)| p != me)
            .map(|(p, addr)| {
                let names = &names;
                (
                    p.clone(),
                    s.spawn(move || ask(security, *addr, p, me, names)),
                )
            })
            .collect();
        hs.into_iter()
            .map(|(p, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(MigrateError::Peer("the question's thread panicked".into()))
                });
                (p, r)
            })
            .collect()
    });
    // Per VM: each peer that answered, and what it holds.
    let mut held: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    let mut silent: Vec<&str> = Vec::new();
    for (p, r) in &answers {
        match r {
            Ok(vms) => {
                for (n, g) in vms {
                    held.entry(n.as_str()).or_default().push((p.as_str(), *g));
                }
            }
            Err(e) => {
                tracing::info!(peer = %p, cause = %e, "a peer did not answer the ownership question: it fences nothing now");
                silent.push(p.as_str());
            }
        }
    }
    let mut fenced = Vec::new();
    for c in local.iter().filter(|c| c.fenceable) {
        let peers_copies = held.get(c.name.as_str()).cloned().unwrap_or_default();
        let newest = peers_copies.iter().max_by_key(|(_, g)| *g).copied();
        let mut result = None;
        if let Some((p, g)) = newest.filter(|(_, g)| generation::is_stale(c.generation, *g)) {
            result = Some(inv.fence(&c.name, p, g, false));
        } else if let Some(src) = &c.postcopy_from {
            let answered = answers.iter().any(|(p, r)| p == src && r.is_ok());
            let at_source = peers_copies.iter().find(|(p, _)| p == src);
            match (answered, at_source) {
                (false, _) => tracing::error!(vm = %c.name, source = %src,
                    "SUSPECT COPY: it arrived here in a post-copy that never completed, and its source {src} does not answer: it may still hold or run the VM; do not start this copy before checking {src}"),
                (true, Some((_, g))) => {
                    tracing::error!(vm = %c.name, source = %src, theirs = g, ours = c.generation,
                        "the source of a post-copy that never completed here still holds the VM: this copy is fenced");
                    result = Some(inv.fence(&c.name, src, *g, true));
                }
                (true, None) => {
                    tracing::info!(vm = %c.name, source = %src, "the source of this copy's post-copy no longer holds the VM: this copy is the VM");
                    inv.postcopy_in_done(&c.name);
                }
            }
        }
        match result {
            Some(Ok(true)) => fenced.push(c.name.clone()),
            Some(Ok(false)) | None => {}
            Some(Err(e)) => {
                tracing::error!(vm = %c.name, cause = %e, "cannot record the fence of a stale copy")
            }
        }
    }
    if !silent.is_empty() {
        tracing::info!(silent = ?silent, checked = names.len(), "ownership check done without every peer");
    }
    fenced
}

/// Destination side: the generations this host holds of the names asked.
pub(super) fn answer(
    link: &mut Link,
    to: &Destination<'_>,
    q: msg::OwnerQuery,
) -> Result<String, MigrateError> {
    let vms = to
        .inv
        .generations(&q.names)
        .into_iter()
        .map(|(name, generation)| msg::OwnerEntry { name, generation })
        .collect();
    link.send(&msg::OwnerAnswer { vms })?;
    Ok(format!("(ownership query: {})", q.names.join(", ")))
}

/// Destination side: `source` took `f.name` back at `f.generation` (a rollback). A copy
/// running here (the post-copy from that source, interrupted) is powered off first: only the
/// peer that started its post-copy may ask that.
pub(super) fn fenced_by(
    link: &mut Link,
    to: &Destination<'_>,
    source: &str,
    f: msg::Fence,
) -> Result<String, MigrateError> {
    let result = fence_here(link, to, source, &f);
    match &result {
        Ok(()) => {
            tracing::warn!(vm = %f.name, holder = %source, generation = f.generation, "the VM's source took it back: this copy is fenced")
        }
        Err(why) => tracing::info!(vm = %f.name, holder = %source, %why, "not fenced"),
    }
    let (fenced, reason) = match result {
        Ok(()) => (true, String::new()),
        Err(why) => (false, why),
    };
    link.send(&msg::FenceAnswer { fenced, reason })?;
    Ok(f.name)
}

fn fence_here(
    link: &Link,
    to: &Destination<'_>,
    source: &str,
    f: &msg::Fence,
) -> Result<(), String> {
    let Some(copy) = to.inv.local_copies(Some(&f.name)).pop() else {
        return Err(format!("no VM named {:?} here", f.name));
    };
    if !generation::is_stale(copy.generation, f.generation) {
        return Err(format!(
            "this host's copy of {} is at generation {}, not older than {}",
            f.name, copy.generation, f.generation
        ));
    }
    if to.inv.running(&f.name).is_ok() {
        let key = (to.inv.datastore().to_path_buf(), f.name.clone());
        if copy.postcopy_from.as_deref() != Some(source) {
            return Err(format!(
                "{} runs here and did not come from {source} in a post-copy: stop it first",
                f.name
            ));
        }
        crate::migrate::owner::check(&key, link.peer())?;
        if to.registry.discard_postcopy_in(&f.name) {
            tracing::warn!(vm = %f.name, "discarding the interrupted post-copy of a VM its source took back");
        }
        to.inv.stop(&f.name).map_err(|e| e.to_string())?;
    }
    match to.inv.fence(&f.name, source, f.generation, false) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "{} cannot be fenced now (migrating or marked)",
            f.name
        )),
        Err(e) => Err(e.to_string()),
    }
}
