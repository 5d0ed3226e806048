//! A source reconnecting to an interrupted post-copy (`Resume` instead of `Reserve`): the
//! waiting session is found in the registry and served over the new connection (`Resumed`
//! with the pages still missing), or its `PostcopyDone` is sent again if it completed; or
//! the resume is refused with the reason. A session nobody resumes can be given up
//! ([`discard_waiting`]).

use std::time::{Duration, Instant};

use super::postcopy::{self, PostcopyIn, Session, SessionStart};
use super::Destination;
use crate::migrate::link::Link;
use crate::migrate::registry::{Migration, Registry};
use crate::migrate::{MigrateError, Phase};
use crate::wire::bitmap::Bitmap;
use crate::wire::{self, messages as msg};

/// How long a resume waits for the previous connection of its session to fail.
const TAKEOVER: Duration = Duration::from_secs(10);

/// Picks up a waiting post-copy session for the source that reconnected.
pub(super) fn resume_session(
    link: &mut Link,
    to: &Destination<'_>,
    r: msg::Resume,
) -> Result<String, MigrateError> {
    let t = Instant::now();
    let key = (to.inv.datastore().to_path_buf(), r.name.clone());
    let refusal = loop {
        if let Err(why) = crate::migrate::owner::check(&key, link.peer()) {
            break why;
        }
        let mut map = to.registry.lock();
        let slot = match map.remove(&r.name) {
            Some(Migration::IncomingPostcopy(slot)) => slot,
            other => {
                if let Some(m) = other {
                    map.insert(r.name.clone(), m);
                }
                break format!("no post-copy of {} waits here", r.name);
            }
        };
        match slot {
            PostcopyIn::Waiting(s) if s.id == r.session => {
                drop(map);
                return resume_waiting(link, to, &r.name, s);
            }
            PostcopyIn::Completed(id, done) if id == r.session => {
                let again = done.clone();
                map.insert(
                    r.name.clone(),
                    Migration::IncomingPostcopy(PostcopyIn::Completed(id, done)),
                );
                drop(map);
                return resume_completed(link, &r.name, again);
            }
            slot @ (PostcopyIn::Waiting(_) | PostcopyIn::Completed(..)) => {
                map.insert(r.name.clone(), Migration::IncomingPostcopy(slot));
                break format!("the post-copy of {} here is another session", r.name);
            }
            PostcopyIn::Active(sock) => {
                // The old connection may be half-open: cut it; its thread parks the session.
                let _ = sock.shutdown(std::net::Shutdown::Both);
                map.insert(
                    r.name.clone(),
                    Migration::IncomingPostcopy(PostcopyIn::Active(sock)),
                );
            }
        }
        drop(map);
        if t.elapsed() > TAKEOVER {
            break format!(
                "the post-copy of {} is still attached to its previous connection",
                r.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    tracing::info!(vm = %r.name, reason = %refusal, "refusing to resume");
    link.send(&msg::Refused {
        reason: refusal.clone(),
    })?;
    Err(MigrateError::Refused(refusal))
}

/// A `Resume` for a session that completed: the source missed its `PostcopyDone`. Nothing
/// is missing; the same `PostcopyDone` again, then the release.
fn resume_completed(
    link: &mut Link,
    name: &str,
    done: msg::PostcopyDone,
) -> Result<String, MigrateError> {
    tracing::info!(vm = %name, "resume of a completed post-copy: sending its PostcopyDone again");
    link.send(&msg::Resumed {
        // An empty bitmap: nothing is missing.
        missing: Bitmap::empty(),
        count: 0,
        waiting: 0,
    })?;
    link.send(&done)?;
    link.reader.set_timeout(Duration::from_secs(10))?;
    let _: msg::Released = link.recv_in(Phase::Commit)?;
    Ok(name.to_string())
}

/// Serves a waiting session over the new connection.
fn resume_waiting(
    link: &mut Link,
    to: &Destination<'_>,
    name: &str,
    mut s: Session,
) -> Result<String, MigrateError> {
    let registry = to.registry;
    let list = s.mem.missing_pages();
    let missing = Bitmap::of(s.vm.ram().pages(), list.iter().copied());
    let waiting = s.mem.pending().len() as u64;
    tracing::info!(vm = %name, missing = list.len(), waiting, "resuming post-copy");
    let active = link
        .socket()
        .try_clone()
        .map(|sock| postcopy::set_slot(registry, name, PostcopyIn::Active(sock)));
    let result = match active {
        Ok(()) => postcopy::serve_session(link, &mut s, |up| {
            up.send(wire::control_frame(&msg::Resumed {
                missing,
                count: list.len() as u64,
                waiting,
            }));
            SessionStart::Continue(format!(
                "post-copy resumed: {} pages missing, {waiting} faults waiting",
                list.len()
            ))
        }),
        Err(e) => Err(e.into()),
    };
    postcopy::end_session(link, to, name, s, result)
}

/// Gives up the waiting post-copy session of VM `name` (its connection was lost): closes its
/// userfaultfd, so faults waiting on missing pages resolve to zero pages and the VM can be
/// powered off. Returns whether there was one.
pub(crate) fn discard_waiting(registry: &Registry, name: &str) -> bool {
    let s = {
        let mut map = registry.lock();
        match map.remove(name) {
            Some(Migration::IncomingPostcopy(PostcopyIn::Waiting(s))) => s,
            Some(other) => {
                map.insert(name.into(), other);
                return false;
            }
            None => return false,
        }
    };
    tracing::warn!(vm = %name, remaining = s.mem.remaining(), "discarding an interrupted post-copy session");
    s.vm.devices()
        .log_line("post-copy session discarded: the missing pages are given up");
    // The handler holds the memory too: stop it first, then the last reference closes the fd.
    drop(s);
    true
}
