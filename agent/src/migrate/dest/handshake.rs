//! Stage 1 on the destination: the source's `Hello` must share a protocol version with this
//! agent, use its page size and offer the same CPU features; then `Welcome` with the version
//! both speak.

use crate::guest::layout::PAGE_SIZE;
use crate::migrate::link::Link;
use crate::migrate::{cpu_digest, MigrateError, Phase};
use crate::wire::{self, messages as msg, WireError};

/// Checks the hello and welcomes the source; returns the source agent's name.
pub(super) fn welcome(link: &mut Link, agent: &str) -> Result<String, MigrateError> {
    let hello: msg::Hello = link.recv_in(Phase::Handshake)?;
    if let Some(peer) = link.peer().filter(|p| *p != hello.agent) {
        return Err(MigrateError::Peer(format!(
            "the source says it is {:?} but its certificate names {peer}",
            hello.agent
        )));
    }
    let Some(version) = wire::negotiate(
        wire::supported_versions(),
        hello.min_version..=hello.max_version,
    ) else {
        return Err(WireError::NoCommonVersion {
            low: hello.min_version,
            high: hello.max_version,
        }
        .into());
    };
    if hello.page_size != PAGE_SIZE as u32 {
        return Err(MigrateError::Peer(format!(
            "page size {} is not supported",
            hello.page_size
        )));
    }
    let cpu = cpu_digest();
    if hello.cpu != cpu {
        return Err(MigrateError::Verify(format!(
            "incompatible CPU features: source {} destination {cpu}",
            hello.cpu
        )));
    }
    link.send(&msg::Welcome {
        version,
        agent: agent.into(),
    })?;
    Ok(hello.agent)
}
