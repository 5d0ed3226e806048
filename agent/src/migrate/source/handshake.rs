//! Stage 1, pre-migration: `Hello` → `Welcome`. The source offers the protocol versions it
//! speaks, its page size and CPU features; the destination answers with the version both
//! speak, or an error. The exchange also measures the round trip.

use std::time::{Duration, Instant};

use super::Run;
use crate::guest::layout::PAGE_SIZE;
use crate::migrate::link::Link;
use crate::migrate::{cpu_digest, MigrateError};
use crate::wire::{self, messages as msg};

/// Says hello; returns the round trip it took.
pub(super) fn hello(run: &mut Run<'_>) -> Result<Duration, MigrateError> {
    let t = Instant::now();
    let welcome = greet(&mut run.link, run.out.agent)?;
    let rtt = t.elapsed();
    tracing::info!(dest = %welcome.agent, version = welcome.version, rtt_us = rtt.as_micros() as u64, "destination accepted the protocol");
    Ok(rtt)
}

/// Sends the hello of agent `agent` on `link` and checks the answer (also on a reconnection,
/// and for a cold migration).
pub(in crate::migrate) fn greet(
    link: &mut Link,
    agent: &str,
) -> Result<msg::Welcome, MigrateError> {
    let versions = wire::supported_versions();
    link.send(&msg::Hello {
        min_version: *versions.start(),
        max_version: *versions.end(),
        agent: agent.into(),
        page_size: PAGE_SIZE as u32,
        cpu: cpu_digest(),
    })?;
    let welcome: msg::Welcome = link.recv()?;
    if !versions.contains(&welcome.version) {
        return Err(wire::WireError::Version {
            got: welcome.version,
        }
        .into());
    }
    Ok(welcome)
}
