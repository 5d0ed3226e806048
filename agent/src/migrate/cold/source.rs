//! The source of a cold migration, step by step: take the stopped VM out, journal the intent,
//! offer it, stream each file with its digest, journal the commit, ask for the registration,
//! journal the confirmation, then delete (or mark) the copy here and end the record.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::crash::{point, Crash};
use super::{rate_eta, ColdOptions, ColdPhase, ColdProgress, ColdReport, FileReport};
use crate::inventory::journal::{self, Journal, OpKind, Record, Step};
use crate::inventory::{ColdEnd, ColdSource, Inventory, DISK};
use crate::migrate::link::Link;
use crate::migrate::source::{handshake, stream};
use crate::migrate::{MigrateError, MigrateOptions};
use crate::storage::cold::{self as files, VmFile};
use crate::transport::Security;
use crate::wire::messages as msg;

/// Who moves what where.
#[derive(Debug)]
pub struct ColdJob<'a> {
    /// This agent's VMs.
    pub inv: &'a Arc<Inventory>,
    /// This agent's name.
    pub agent: &'a str,
    /// How to secure the connection (the agents' mutual TLS).
    pub security: &'a Security,
    /// The destination's address.
    pub dest: SocketAddr,
    /// The destination's host name.
    pub dest_name: &'a str,
    /// The VM.
    pub name: &'a str,
    /// The user's choices.
    pub opts: &'a ColdOptions,
}

/// Moves the stopped VM `job.name` to the destination. On an error before the destination
/// registered the VM, it stays here as before; if the answer to the commit was lost, the
/// destination is asked, and until it answers the VM shows as `recovering`.
pub fn migrate(
    job: &ColdJob<'_>,
    progress: &dyn Fn(ColdProgress),
) -> Result<ColdReport, MigrateError> {
    let src = job.inv.begin_cold(job.name)?;
    let mut record = None;
    let r = run(job, &src, &mut record, progress);
    match (&r, record) {
        (Ok(_), _) => {}
        // Past the commit: the destination may have registered it.
        (Err(e), Some(rec)) if rec.step >= Step::Committing => {
            tracing::warn!(vm = %job.name, cause = %e, "cold migration interrupted after the commit: asking the destination");
            let ds = job.inv.datastore_of(job.name).unwrap_or(0);
            job.inv.end_cold(job.name, ColdEnd::Failed, job.dest_name)?;
            let answer =
                super::recover::ask(job.security, job.dest, job.dest_name, job.agent, &rec);
            match answer {
                Ok(registered) => job.inv.resolve_in_doubt(ds, &rec, registered)?,
                Err(q) => {
                    tracing::warn!(vm = %job.name, cause = %q, "the destination does not answer: the VM stays marked recovering");
                    job.inv.mark_recovering(job.name, &rec);
                }
            }
        }
        (Err(_), rec) => {
            if let Some(rec) = rec {
                let _ = Journal::of(&src.datastore.path).remove(&rec.op);
            }
            job.inv.end_cold(job.name, ColdEnd::Failed, job.dest_name)?;
        }
    }
    r
}

fn run(
    job: &ColdJob<'_>,
    src: &ColdSource,
    record: &mut Option<Record>,
    progress: &dyn Fn(ColdProgress),
) -> Result<ColdReport, MigrateError> {
    let t0 = Instant::now();
    let list = files::vm_files(&src.dir)?;
    let total: u64 = list.iter().map(|f| f.size).sum();
    let report_progress = |phase, file: &str, done, bytes| {
        let (rate_mibs, eta_s) = rate_eta(bytes, total, t0.elapsed());
        progress(ColdProgress {
            phase,
            file: file.into(),
            files_done: done,
            files: list.len(),
            bytes,
            total_bytes: total,
            rate_mibs,
            eta_s,
        })
    };
    report_progress(ColdPhase::Offering, "", 0, 0);
    let journal = Journal::of(&src.datastore.path);
    let rec = record.insert(Record {
        op: journal::new_op(job.name),
        kind: OpKind::ColdOut,
        vm: job.name.into(),
        step: Step::Intent,
        peer: Some(job.dest_name.into()),
        datastore: src.datastore.name.clone(),
        target: job.opts.target_datastore.clone(),
        keep_source: job.opts.keep_source,
        copy: true,
    });
    journal.write(rec)?;
    point(Crash::SourceIntent);
    let mut link = Link::connect(
        job.security,
        job.dest,
        job.dest_name,
        &MigrateOptions::default(),
    )?;
    handshake::greet(&mut link, job.agent)?;
    link.send(&msg::ColdOffer {
        op: rec.op.clone(),
        name: job.name.into(),
        definition: src.def.to_toml(),
        source_datastore: src.datastore.name.clone(),
        source_shared: src.datastore.shared,
        target_datastore: job.opts.target_datastore.clone(),
        move_storage: job.opts.move_storage,
        files: list
            .iter()
            .map(|f| msg::ColdFile {
                name: f.name.clone(),
                size: f.size,
            })
            .collect(),
    })?;
    let accepted: msg::ColdAccepted = link.recv()?;
    rec.copy = accepted.copy;
    if !accepted.copy && job.opts.keep_source {
        let reason = "--keep-source needs --move-storage here: without it only the registration of the shared datastore's VM moves, and there is no second copy to keep".to_string();
        let _ = link.send(&msg::Abort {
            reason: reason.clone(),
        });
        return Err(MigrateError::Refused(reason));
    }
    let mut reports = Vec::new();
    let mut bytes = 0u64;
    for (i, f) in list.iter().enumerate() {
        let (digest, sent) = if accepted.copy {
            send_file(&mut link, src, f, &mut |n| {
                bytes += n;
                report_progress(ColdPhase::Copying, &f.name, i, bytes);
            })?
        } else {
            bytes += f.size;
            (files::digest_of(&src.dir.join(&f.name))?, 0)
        };
        reports.push(FileReport {
            name: f.name.clone(),
            size: f.size,
            sent_bytes: sent,
            source_digest: digest,
            dest_digest: String::new(),
            equal: false,
        });
    }
    report_progress(ColdPhase::Registering, "", list.len(), total);
    journal.step(rec, Step::Committing)?;
    point(Crash::SourceCommitting);
    link.send(&msg::ColdCommit {})?;
    link.flush()?;
    let registered: msg::ColdRegistered = link.recv()?;
    for r in &mut reports {
        r.dest_digest = registered
            .digests
            .iter()
            .find(|d| d.name == r.name)
            .map(|d| d.digest.clone())
            .unwrap_or_default();
        r.equal = r.dest_digest == r.source_digest;
    }
    journal.step(rec, Step::Confirmed)?;
    point(Crash::SourceBeforeDelete);
    let end = if job.opts.keep_source {
        ColdEnd::Kept
    } else {
        ColdEnd::Released
    };
    job.inv.end_cold(job.name, end, job.dest_name)?;
    journal.remove(&rec.op)?;
    let _ = link.send(&msg::ColdReleased {});
    let _ = link.flush();
    report_progress(ColdPhase::Done, "", list.len(), total);
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let all_equal = reports.iter().all(|r| r.equal);
    if !all_equal {
        tracing::error!(vm = %job.name, "the destination registered files whose digests differ from the source's");
    }
    Ok(ColdReport {
        vm: job.name.into(),
        from: job.agent.into(),
        to: job.dest_name.into(),
        source_datastore: src.datastore.name.clone(),
        datastore: accepted.datastore,
        copy: accepted.copy,
        keep_source: job.opts.keep_source,
        sent_bytes: reports.iter().map(|r| r.sent_bytes).sum(),
        files: reports,
        total_bytes: total,
        total_ms,
        rate_mibs: total as f64 / 1048576.0 / (total_ms / 1e3).max(1e-6),
        all_equal,
        live_disk: None,
    })
}

/// Streams one file in pieces (holes and zero chunks skipped), then its digest; returns
/// (digest, data bytes sent). `read(n)` is told of each `n` bytes read.
fn send_file(
    link: &mut Link,
    src: &ColdSource,
    f: &VmFile,
    read: &mut dyn FnMut(u64),
) -> Result<(String, u64), MigrateError> {
    let file = File::open(src.dir.join(&f.name))?;
    if file.metadata()?.len() != f.size {
        return Err(MigrateError::Disk(format!(
            "{} changed size while the VM was moving",
            f.name
        )));
    }
    let mut sent = 0u64;
    let mut pieces = 0u32;
    let mut last = 0u64;
    let mut last_report = Instant::now();
    let digest = files::read_file::<MigrateError>(&file, |off, data| {
        stream::send_chunk(link, &f.name, f.size, off, data)?;
        sent += data.len() as u64;
        pieces += 1;
        if f.name == DISK && pieces == 2 {
            link.flush()?;
            point(Crash::SourceMidFile);
        }
        if last_report.elapsed() > Duration::from_millis(100) {
            read(off + data.len() as u64 - last);
            last = off + data.len() as u64;
            last_report = Instant::now();
        }
        Ok(())
    })?;
    read(f.size - last);
    link.send(&msg::ColdFileDone {
        name: f.name.clone(),
        size: f.size,
        digest: digest.clone(),
    })?;
    Ok((digest, sent))
}
