//! Who owns a post-copy session on the destination: the authenticated peer (its host name,
//! from its TLS certificate) that started it. A session id read off a stream is not a
//! credential: `Resume` is accepted only from the owner.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// Owners of the post-copy sessions of this process, by datastore and VM name (None: the
/// session started over a plaintext `--insecure` connection).
static OWNERS: Mutex<BTreeMap<(PathBuf, String), Option<String>>> = Mutex::new(BTreeMap::new());

/// Records that the session of `key` was started by `peer`.
pub(crate) fn record(key: &(PathBuf, String), peer: Option<&str>) {
    OWNERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.clone(), peer.map(str::to_owned));
}

/// Whether `peer` may resume the session of `key`: the peer that started it (a session
/// started in plaintext can be resumed only in plaintext, and the reverse); the refusal's
/// reason otherwise. No session recorded: nothing to protect (the caller refuses anyway).
pub(crate) fn check(key: &(PathBuf, String), peer: Option<&str>) -> Result<(), String> {
    match OWNERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
    {
        Some(owner) if owner.as_deref() != peer => Err(format!(
            "the post-copy of {} belongs to {}: {} may not resume it",
            key.1,
            owner
                .as_deref()
                .unwrap_or("a plaintext (--insecure) source"),
            peer.unwrap_or("a plaintext (--insecure) source"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_peer_that_started_a_session_may_resume_it() {
        let key = (PathBuf::from("/ds-owner-test"), "vm1".to_string());
        assert!(
            check(&key, Some("hostX")).is_ok(),
            "no session: nothing to protect"
        );
        record(&key, Some("hostA"));
        assert!(check(&key, Some("hostA")).is_ok());
        let why = check(&key, Some("hostX")).unwrap_err();
        assert!(
            why.contains("belongs to hostA") && why.contains("hostX"),
            "{why}"
        );
        assert!(
            check(&key, None).is_err(),
            "plaintext may not resume a TLS session"
        );
    }
}
