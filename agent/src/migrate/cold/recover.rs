//! Recovery of cold migrations out whose outcome is in doubt: the source journaled the commit
//! but never read the destination's confirmation (either side died, or the connection). The
//! source asks the destination on a new connection whether the VM of that operation is
//! registered there; the question aborts an operation the destination has not registered, so
//! a "no" is final. The VM shows as `recovering` here until the answer comes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::crash::{point, Crash};
use crate::inventory::journal::Record;
use crate::inventory::Inventory;
use crate::migrate::link::Link;
use crate::migrate::source::handshake;
use crate::migrate::{MigrateError, MigrateOptions};
use crate::transport::Security;
use crate::wire::messages as msg;

/// Asks the agent `dest_name` at `dest` whether the VM of `rec` is registered there.
pub fn ask(
    security: &Security,
    dest: SocketAddr,
    dest_name: &str,
    agent: &str,
    rec: &Record,
) -> Result<bool, MigrateError> {
    let mut link = Link::connect(security, dest, dest_name, &MigrateOptions::default())?;
    handshake::greet(&mut link, agent)?;
    link.send(&msg::ColdQuery {
        op: rec.op.clone(),
        name: rec.vm.clone(),
    })?;
    let a: msg::ColdAnswer = link.recv()?;
    Ok(a.registered)
}

/// Resolves every in-doubt migration out of `inv` whose destination answers; returns how
/// many are still in doubt. `resolve` gives a host's address.
pub fn resolve_all(
    inv: &Arc<Inventory>,
    security: &Security,
    resolve: &dyn Fn(&str) -> Option<SocketAddr>,
) -> usize {
    let mut left = 0;
    for (ds, rec) in inv.in_doubt() {
        let peer = rec.peer.clone().unwrap_or_default();
        let Some(addr) = resolve(&peer) else {
            tracing::warn!(vm = %rec.vm, %peer, "cannot resolve an in-doubt cold migration: its destination is not in the hosts file");
            left += 1;
            continue;
        };
        match ask(security, addr, &peer, inv.agent(), &rec) {
            Ok(registered) => {
                point(Crash::SourceAnswered);
                if let Err(e) = inv.resolve_in_doubt(ds, &rec, registered) {
                    tracing::error!(vm = %rec.vm, cause = %e, "cannot finish an in-doubt cold migration");
                    left += 1;
                }
            }
            Err(e) => {
                tracing::info!(vm = %rec.vm, %peer, cause = %e, "in-doubt cold migration: the destination does not answer yet");
                left += 1;
            }
        }
    }
    left
}

/// How a resolver finds a host's address.
pub type Resolve = Box<dyn Fn(&str) -> Option<SocketAddr> + Send>;

/// Runs [`resolve_all`] on a thread of its own for as long as the agent runs: every second
/// while anything is in doubt (the agent started with records in doubt, or a migration out
/// lost its commit's answer and its destination did not answer the question at once), and
/// otherwise asleep until [`Inventory::mark_recovering`] wakes it.
pub fn spawn_resolver(inv: Arc<Inventory>, security: Security, resolve: Resolve) {
    let _ = std::thread::Builder::new()
        .name("cold-recover".into())
        .spawn(move || loop {
            let seen = inv.doubt_count();
            if resolve_all(&inv, &security, &*resolve) > 0 {
                std::thread::sleep(Duration::from_secs(1));
            } else {
                inv.wait_for_doubt(seen);
            }
        });
}
