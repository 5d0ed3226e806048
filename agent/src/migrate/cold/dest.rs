//! The destination of a cold migration, step by step: check the offer (definition, name,
//! datastore, space) and refuse with a reason before anything moves; journal the intent;
//! write each file into the staging folder, comparing its digest; on `ColdCommit` sync the
//! files and the folder, register the VM by renaming the folder into the datastore, journal
//! it, confirm; end the record when the source let its copy go.

use std::collections::HashMap;

use super::crash::{point, Crash};
use crate::inventory::datastore::{self, sync_dir};
use crate::inventory::journal::{self, Journal, OpKind, Record, Step};
use crate::inventory::{Inventory, VmDef, DEFINITION, DISK};
use crate::migrate::dest::Destination;
use crate::migrate::link::{not_allowed, Link};
use crate::migrate::{MigrateError, Phase};
use crate::storage::cold::{self as files, FileSink};
use crate::wire::{messages as msg, Frame, Kind};

/// Receives the VM offered in `offer` from agent `source`; returns its name.
pub(in crate::migrate) fn receive(
    link: &mut Link,
    to: &Destination<'_>,
    source: &str,
    offer: msg::ColdOffer,
) -> Result<String, MigrateError> {
    let inv = to.inv;
    let plan = match check(inv, source, &offer) {
        Ok(p) => p,
        Err(reason) => return Err(refuse(link, &offer.name, reason)),
    };
    let bytes = if plan.copy {
        offer.files.iter().map(|f| f.size).sum()
    } else {
        0
    };
    let reservation = match inv.reserve_cold(&plan.def, plan.ds, bytes, &offer.op) {
        Ok(r) => r,
        Err(e) => {
            inv.forget_cold_in(&offer.op);
            return Err(refuse(link, &offer.name, e.to_string()));
        }
    };
    let store = inv.datastores()[plan.ds].clone();
    let journal = Journal::of(&store.path);
    let mut rec = Record {
        op: offer.op.clone(),
        kind: OpKind::ColdIn,
        vm: offer.name.clone(),
        step: Step::Intent,
        peer: Some(source.into()),
        datastore: store.name.clone(),
        target: None,
        keep_source: false,
        copy: plan.copy,
    };
    let result = (|| {
        journal.write(&rec)?;
        point(Crash::DestIntent);
        link.send(&msg::ColdAccepted {
            datastore: store.name.clone(),
            copy: plan.copy,
        })?;
        let staging = reservation.staging.clone();
        let digests = if plan.copy {
            let d = receive_files(link, &staging, &offer.files)?;
            for f in &offer.files {
                std::fs::File::open(staging.join(&f.name))?.sync_all()?;
            }
            if store.shared {
                datastore::set_owner(&staging, inv.agent())?;
            }
            journal::mark_op(&staging, &offer.op)?;
            sync_dir(&staging)?;
            point(Crash::DestSynced);
            journal.step(&mut rec, Step::Synced)?;
            d
        } else {
            let _: msg::ColdCommit = link.recv_in(Phase::Reservation)?;
            let dir = store.path.join(&offer.name);
            offer
                .files
                .iter()
                .map(|f| Ok((f.name.clone(), files::digest_of(&dir.join(&f.name))?)))
                .collect::<Result<Vec<_>, std::io::Error>>()?
        };
        point(Crash::DestBeforeRegister);
        Ok::<_, MigrateError>(digests)
    })();
    let digests = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = journal.remove(&rec.op);
            inv.forget_cold_in(&offer.op);
            return Err(e);
        }
    };
    // The commit point: from here the VM is this agent's.
    let dir = match inv.register_cold(reservation, plan.def, plan.ds, &offer.op, plan.copy) {
        Ok(d) => d,
        Err(e) => {
            let _ = journal.remove(&rec.op);
            inv.forget_cold_in(&offer.op);
            return Err(e.into());
        }
    };
    tracing::info!(vm = %offer.name, from = %source, dir = %dir.display(), "cold migration registered");
    journal.step(&mut rec, Step::Registered)?;
    point(Crash::DestRegistered);
    link.send(&msg::ColdRegistered {
        digests: digests
            .into_iter()
            .map(|(name, digest)| msg::ColdDigest { name, digest })
            .collect(),
    })?;
    link.flush()?;
    // The source deletes its copy and says so; the VM is registered here either way.
    match link.recv::<msg::ColdReleased>() {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(vm = %offer.name, cause = %e, "no release from the source (it finishes on its restart)")
        }
    }
    let _ = journal.remove(&rec.op);
    inv.forget_cold_in(&offer.op);
    Ok(offer.name)
}

/// Where an offered VM goes.
struct Plan {
    def: VmDef,
    ds: usize,
    copy: bool,
}

/// The pre-checks: a valid definition naming the VM, plain and distinct file names with the
/// definition among them, a datastore, and (registration only) the shared folder in place.
fn check(inv: &Inventory, source: &str, offer: &msg::ColdOffer) -> Result<Plan, String> {
    let def = VmDef::parse(&offer.definition).map_err(|e| e.to_string())?;
    if def.name != offer.name {
        return Err(format!(
            "the definition names {:?}, the offer {:?}",
            def.name, offer.name
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &offer.files {
        if !files::is_vm_file(&f.name) || !seen.insert(f.name.as_str()) {
            return Err(format!("bad file list: {:?}", f.name));
        }
    }
    if !seen.contains(DEFINITION) {
        return Err("the file list lacks the definition".into());
    }
    let stores = inv.datastores();
    let same_shared = stores
        .iter()
        .position(|d| d.shared && offer.source_shared && d.name == offer.source_datastore);
    let ds = match offer.target_datastore.as_deref() {
        Some(n) => inv.datastore_index(Some(n)).map_err(|e| e.to_string())?,
        None => same_shared.unwrap_or(0),
    };
    let on_shared = same_shared == Some(ds);
    let dir = stores[ds].path.join(&offer.name);
    if on_shared && !offer.move_storage {
        if datastore::owner_of(&dir).as_deref() != Some(source) {
            return Err(format!(
                "the shared datastore {:?} here has no folder of {:?} owned by {source} ({}): is it the same folder on both hosts?",
                stores[ds].name,
                offer.name,
                dir.display()
            ));
        }
        return Ok(Plan {
            def,
            ds,
            copy: false,
        });
    }
    if on_shared {
        return Err(format!(
            "{:?} is on the shared datastore {:?} both hosts see: without --move-storage only its registration moves; with it, choose another --target-datastore",
            offer.name, stores[ds].name
        ));
    }
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    Ok(Plan {
        def,
        ds,
        copy: true,
    })
}

fn refuse(link: &mut Link, vm: &str, reason: String) -> MigrateError {
    tracing::info!(%vm, %reason, "refusing the cold migration");
    match link.send(&msg::Refused {
        reason: reason.clone(),
    }) {
        Ok(()) => MigrateError::Refused(reason),
        Err(e) => e,
    }
}

/// Writes the offered files from `FileChunk` frames until `ColdCommit`, checking each file's
/// digest at its `ColdFileDone`; returns (name, digest) of each.
fn receive_files(
    link: &mut Link,
    staging: &std::path::Path,
    offered: &[msg::ColdFile],
) -> Result<Vec<(String, String)>, MigrateError> {
    let mut sinks: HashMap<String, FileSink> = HashMap::new();
    for f in offered {
        sinks.insert(
            f.name.clone(),
            FileSink::create(staging, &f.name, f.size).map_err(disk)?,
        );
    }
    let mut done: Vec<(String, String)> = Vec::new();
    let mut disk_pieces = 0u32;
    loop {
        let f: Frame = link.next()?;
        match f.kind() {
            Kind::FileChunk => {
                let c: msg::FileChunk = f.decode()?;
                let sink = sinks
                    .get_mut(&c.name)
                    .ok_or_else(|| peer(format!("a piece of {:?}, not offered", c.name)))?;
                if done.iter().any(|(n, _)| *n == c.name) {
                    return Err(peer(format!("a piece of {:?} after its end", c.name)));
                }
                sink.write(c.offset, f.data()).map_err(disk)?;
                if c.name == DISK {
                    disk_pieces += 1;
                    if disk_pieces == 2 {
                        point(Crash::DestMidFile);
                    }
                }
            }
            Kind::ColdFileDone => {
                let d: msg::ColdFileDone = f.decode()?;
                let sink = sinks
                    .get(&d.name)
                    .ok_or_else(|| peer(format!("the end of {:?}, not offered", d.name)))?;
                let got = sink.digest();
                if got != d.digest {
                    return Err(MigrateError::Verify(format!(
                        "{}: digest {got} here, {} on the source",
                        d.name, d.digest
                    )));
                }
                done.push((d.name, got));
            }
            Kind::ColdCommit => {
                // Every piece written and synced before the files are registered.
                for sink in sinks.values_mut() {
                    sink.sync().map_err(disk)?;
                }
                break;
            }
            _ => return Err(not_allowed(Phase::Reservation, &f)),
        }
    }
    if done.len() != offered.len() {
        return Err(peer(format!(
            "commit after {} of {} files",
            done.len(),
            offered.len()
        )));
    }
    Ok(done)
}

fn disk(e: files::SinkError) -> MigrateError {
    MigrateError::Disk(e.to_string())
}

fn peer(why: String) -> MigrateError {
    MigrateError::Peer(why)
}
