//! Stage 2 on the destination: `Reserve` → memory and the name reserved in the inventory, the
//! VM built (not running) → `Reserved`; or `Refused` with the reason. A `Resume` instead of
//! `Reserve` is a source reconnecting to an interrupted post-copy.

use super::Destination;
use crate::inventory::{Reservation, VmDef};
use crate::migrate::link::{not_allowed, Link};
use crate::migrate::registry::IncomingGuard;
use crate::migrate::{MigrateError, Phase};
use crate::vm::{Vm, VmSpec};
use crate::wire::{messages as msg, Kind};

/// A VM on its way in: reserved and built, not running.
pub(super) struct Arrival<'r> {
    /// Its definition.
    pub(super) def: VmDef,
    /// Memory, name and staging folder, given back on drop unless committed.
    pub(super) reservation: Reservation,
    /// The VM, its memory filling.
    pub(super) vm: Vm,
    /// The source agent's name.
    pub(super) source: String,
    /// Whether the source will ask for digests.
    pub(super) verify: bool,
    /// Its entry in the registry.
    pub(super) _entry: IncomingGuard<'r>,
}

/// What the source asked for after the hello.
pub(super) enum Next<'r> {
    /// A new VM.
    Arrival(Box<Arrival<'r>>),
    /// The resumption of a post-copy session.
    Resume(msg::Resume),
    /// A cold migration of a stopped VM.
    Cold(msg::ColdOffer),
    /// A recovering source's question about a cold migration.
    ColdQuery(msg::ColdQuery),
    /// Another agent asks which ownership generations this one holds.
    OwnerQuery(msg::OwnerQuery),
    /// A source that rolled a post-copy back: fence the copy here.
    Fence(msg::Fence),
}

/// Reserves room for the VM the source announces (or hands a `Resume` on).
pub(super) fn reserve<'r>(
    link: &mut Link,
    to: &Destination<'r>,
    source: String,
) -> Result<Next<'r>, MigrateError> {
    let f = link.next()?;
    let reserve: msg::Reserve = match f.kind() {
        Kind::Resume => return Ok(Next::Resume(f.decode()?)),
        Kind::ColdOffer => return Ok(Next::Cold(f.decode()?)),
        Kind::ColdQuery => return Ok(Next::ColdQuery(f.decode()?)),
        Kind::OwnerQuery => return Ok(Next::OwnerQuery(f.decode()?)),
        Kind::Fence => return Ok(Next::Fence(f.decode()?)),
        Kind::Reserve => f.decode()?,
        _ => return Err(not_allowed(Phase::Reservation, &f)),
    };
    let spec = VmSpec::from(reserve.spec);
    let def = match VmDef::parse(&reserve.definition) {
        Ok(d) if d.name == reserve.name && d.spec() == spec => d,
        Ok(_) => {
            return Err(MigrateError::Peer(
                "the definition does not match the reservation".into(),
            ))
        }
        Err(e) => return Err(MigrateError::Peer(e.to_string())),
    };
    let refuse = |link: &mut Link, reason: String| -> MigrateError {
        tracing::info!(vm = %def.name, %reason, "refusing the reservation");
        match link.send(&msg::Refused {
            reason: reason.clone(),
        }) {
            Ok(()) => MigrateError::Refused(reason),
            Err(e) => e,
        }
    };
    let target = reserve.target_datastore.as_deref();
    let reservation = match &reserve.storage {
        msg::StorageRequest::Copy => to.inv.reserve(&def, target),
        msg::StorageRequest::Shared {
            datastore,
            probe,
            or_copy,
        } => match to.inv.reserve_in_place(&def, datastore, probe) {
            Err(e) if *or_copy => {
                tracing::info!(vm = %def.name, reason = %e, "shared storage not possible here: the disk will be copied");
                to.inv.reserve(&def, target)
            }
            r => r,
        },
    };
    let reservation = match reservation {
        Ok(r) => r,
        Err(e) => return Err(refuse(link, e.to_string())),
    };
    let shared = reservation.is_shared();
    let entry = match to.registry.begin_incoming(&def.name) {
        Ok(g) => g,
        Err(e) => return Err(refuse(link, e.to_string())),
    };
    let vm = Vm::create(&def.spec(), &def.name, Box::new(std::io::sink()))?;
    link.send(&msg::Reserved {
        memory: def.memory_bytes(),
        shared,
    })?;
    tracing::info!(vm = %def.name, from = %source, shared, "reserved; receiving");
    Ok(Next::Arrival(Box::new(Arrival {
        def,
        reservation,
        vm,
        source,
        verify: reserve.verify,
        _entry: entry,
    })))
}
