//! A running VM's disk moved to another image on the same host (Storage vMotion's job,
//! `vmig storage move vm1 --to DATASTORE`): the live disk mirror of a migration, local instead
//! of over the network, then the device switches to the new image at a pause of a few
//! milliseconds.
//!
//! 1. The device's written-block log starts, then the image is copied in chunks (holes and
//!    all-zero chunks skipped, the copy sparse, written by a [`ImageWriter`] that bypasses the
//!    page cache, so the sync at the pause finds little to do).
//! 2. Rounds copy the blocks the guest wrote meanwhile, until a round leaves at most
//!    [`SWITCH_BLOCKS`] blocks (or [`MAX_ROUNDS`] passed); both images are synced, and one more
//!    round copies what the guest wrote during the syncs.
//! 3. The pause: the vCPUs stop, the device drains, the last written blocks are copied, the new
//!    image is `fdatasync`ed and the device switches to it
//!    ([`crate::vm::virtio::VirtioBlk::switch_to`]); the vCPUs run again. Any failure before
//!    the switch resumes the VM on its old image and removes the copy; the old image is never
//!    written by the move.
//! 4. The proof, outside the pause: the copy keeps a per-block digest of what it wrote (the new
//!    image as it was at the switch); the old image, which nothing writes after the switch, is
//!    hashed once the VM runs again, and the two must be equal.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::storage::{self, BlockDigest, ImageWriter, DISK_BLOCK};
use crate::vm::Vm;

/// A round leaving at most this many written blocks ends the rounds: the pause copies them.
pub const SWITCH_BLOCKS: usize = 32;
/// Rounds before the pause comes anyway.
pub const MAX_ROUNDS: u32 = 30;
/// Chunk of the first pass.
const CHUNK: usize = 1 << 20;

/// Errors of a live disk move.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The VM has no disk.
    #[error("the VM has no disk to move")]
    NoDisk,
    /// Reading the old image or writing the new one.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why it failed.
        cause: std::io::Error,
    },
    /// The images differ at the switch: the VM runs on the new image, the old one is kept.
    #[error("the new image differs from the old one at the switch: {old} vs {new}; the VM runs on the new image, the old one is kept")]
    Mismatch {
        /// Digest of the old image.
        old: String,
        /// Digest of the new image.
        new: String,
    },
    /// The device could not switch.
    #[error("the disk could not switch to the new image: {0}")]
    Switch(String),
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// What a live disk move did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveMoveReport {
    /// Image size, bytes.
    pub image_bytes: u64,
    /// Bytes copied by the first pass (data only).
    pub copied_bytes: u64,
    /// First pass, ms.
    pub copy_ms: f64,
    /// First pass rate, MiB/s.
    pub copy_mibs: f64,
    /// Rounds after the first pass.
    pub rounds: u32,
    /// Blocks copied again in the rounds.
    pub resent_blocks: u64,
    /// Of them, blocks copied with the VM paused.
    pub blocks_at_pause: u64,
    /// The pause: from the vCPUs' stop to their run, ms.
    pub pause_ms: f64,
    /// Both images `fdatasync`ed just before the pause (the guest running), ms.
    #[serde(default)]
    pub presync_ms: f64,
    /// Hashing the old image after the switch (the VM running), ms.
    pub verify_ms: f64,
    /// Digest of both images at the switch (per-block BLAKE3; equal, or the move failed).
    pub digest: String,
    /// The whole move, ms.
    pub total_ms: f64,
}

/// Copies the running `vm`'s disk image `old` to `new` (created; it must not exist) and
/// switches the device to it. On success the old image is left for the caller to delete; on
/// error before the switch the VM runs on `old` and `new` is removed (a [`MoveError::Mismatch`]
/// comes after the switch: both stay).
pub fn move_disk(
    vm: &Vm,
    old: &Path,
    new: &Path,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<LiveMoveReport, MoveError> {
    let blk = vm.devices().blk().ok_or(MoveError::NoDisk)?;
    let t0 = Instant::now();
    blk.start_block_log(DISK_BLOCK);
    let mut copy = Copy::open(old, new)?;
    let result = (|| {
        let mut report = LiveMoveReport {
            image_bytes: copy.size,
            ..Default::default()
        };
        let t = Instant::now();
        report.copied_bytes = copy.first_pass(cancel, progress)?;
        report.copy_ms = t.elapsed().as_secs_f64() * 1e3;
        report.copy_mibs = report.copied_bytes as f64 / 1048576.0 / t.elapsed().as_secs_f64();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(MoveError::Cancelled);
            }
            let copied = copy.written(blk, &mut report)?;
            report.rounds += 1;
            if copied <= SWITCH_BLOCKS as u64 || report.rounds >= MAX_ROUNDS {
                break;
            }
        }
        // Both images made durable while the guest runs, so that the pause's two
        // `fdatasync`s (the copy's, and the old image's at the switch) only have the last
        // blocks' writes to flush, not every write of the copy or the guest so far.
        let t = Instant::now();
        copy.sync()?;
        copy.sync_old()?;
        report.presync_ms = t.elapsed().as_secs_f64() * 1e3;
        // What the guest wrote during the syncs, copied while it runs: the pause then holds
        // only what it writes in this short round.
        copy.written(blk, &mut report)?;
        // The pause.
        let t_pause = Instant::now();
        let _ = vm.pause().took();
        let switched = (|| {
            blk.drain();
            report.blocks_at_pause = copy.written(blk, &mut report)?;
            copy.sync()?;
            blk.switch_to(new)
                .map_err(|e| MoveError::Switch(e.to_string()))
        })();
        blk.stop_block_log();
        vm.resume();
        report.pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        switched.map(|()| report)
    })();
    let result = result.and_then(|mut r| {
        // The old image is frozen from the switch on: its digest against the copy's.
        let t = Instant::now();
        let old_digest = copy.digest_old()?;
        r.verify_ms = t.elapsed().as_secs_f64() * 1e3;
        let new_digest = copy.digest.digest();
        if old_digest != new_digest {
            return Err(MoveError::Mismatch {
                old: old_digest,
                new: new_digest,
            });
        }
        r.digest = new_digest;
        Ok(r)
    });
    match result {
        Ok(mut r) => {
            r.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            tracing::info!(from = %old.display(), to = %new.display(), pause_ms = r.pause_ms, rounds = r.rounds, "disk moved live");
            Ok(r)
        }
        Err(e @ MoveError::Mismatch { .. }) => {
            tracing::error!(error = %e, "live disk move: the images differ");
            Err(e)
        }
        Err(e) => {
            blk.stop_block_log();
            drop(copy);
            let _ = std::fs::remove_file(new);
            tracing::warn!(error = %e, "live disk move failed: the VM stays on its image");
            Err(e)
        }
    }
}

/// The two images of a move.
struct Copy<'a> {
    old_path: &'a Path,
    new_path: &'a Path,
    old: File,
    new: ImageWriter,
    size: u64,
    /// What was written into the new image, block by block.
    digest: BlockDigest,
}

impl<'a> Copy<'a> {
    fn open(old_path: &'a Path, new_path: &'a Path) -> Result<Self, MoveError> {
        let io = |what, path: &Path| {
            let path = path.display().to_string();
            move |cause| MoveError::Io { what, path, cause }
        };
        let old = File::open(old_path).map_err(io("cannot open", old_path))?;
        let size = old.metadata().map_err(io("cannot stat", old_path))?.len();
        let new = ImageWriter::create_new(new_path, size).map_err(io("cannot create", new_path))?;
        Ok(Self {
            old_path,
            new_path,
            old,
            new,
            size,
            digest: BlockDigest::new(size, DISK_BLOCK),
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), MoveError> {
        let err = |what, cause| MoveError::Io {
            what,
            path: self.new_path.display().to_string(),
            cause,
        };
        self.digest
            .update(offset, data)
            .map_err(|e| err("cannot hash", std::io::Error::other(e.to_string())))?;
        self.new
            .write(offset, data)
            .map_err(|e| err("cannot write", e))
    }

    /// Copies every chunk holding data; `progress(n)` is told of each `n` more bytes of the
    /// image the pass has covered (holes and zero chunks included, so that it ends at the
    /// image's size).
    fn first_pass(
        &mut self,
        cancel: &AtomicBool,
        progress: &dyn Fn(u64),
    ) -> Result<u64, MoveError> {
        let old = self.old.try_clone().map_err(|cause| MoveError::Io {
            what: "cannot reopen",
            path: self.old_path.display().to_string(),
            cause,
        })?;
        let mut sent = 0u64;
        // How far into the image the pass is: holes and zero chunks count as covered.
        let mut covered = 0u64;
        let read = storage::for_each_aligned_data_chunk(&old, CHUNK, DISK_BLOCK, |off, chunk| {
            if cancel.load(Ordering::Relaxed) {
                return Err(Pass::Move(MoveError::Cancelled));
            }
            self.write(off, chunk).map_err(Pass::Move)?;
            sent += chunk.len() as u64;
            let end = off + chunk.len() as u64;
            progress(end - covered);
            covered = end;
            Ok(())
        });
        match read {
            Ok(_) => {
                progress(self.size.saturating_sub(covered));
                Ok(sent)
            }
            Err(Pass::Move(e)) => Err(e),
            Err(Pass::Read(cause)) => Err(MoveError::Io {
                what: "cannot read",
                path: self.old_path.display().to_string(),
                cause,
            }),
        }
    }

    /// Copies the blocks the guest wrote since the last call (the device's block log), counted
    /// in `report.resent_blocks`; returns how many.
    fn written(
        &mut self,
        blk: &crate::vm::virtio::blk::VirtioBlk,
        report: &mut LiveMoveReport,
    ) -> Result<u64, MoveError> {
        let blocks = blk.take_written_blocks();
        self.blocks(&blocks)?;
        report.resent_blocks += blocks.len() as u64;
        Ok(blocks.len() as u64)
    }

    /// Copies whole blocks (the image's last may be short).
    fn blocks(&mut self, blocks: &[u64]) -> Result<(), MoveError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; DISK_BLOCK as usize];
        for &b in blocks {
            let off = b * DISK_BLOCK;
            if off >= self.size {
                continue;
            }
            let n = (self.size - off).min(DISK_BLOCK) as usize;
            self.old
                .read_exact_at(&mut buf[..n], off)
                .map_err(|cause| MoveError::Io {
                    what: "cannot read",
                    path: self.old_path.display().to_string(),
                    cause,
                })?;
            self.write(off, &buf[..n])?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), MoveError> {
        self.new.sync().map_err(|cause| MoveError::Io {
            what: "cannot sync",
            path: self.new_path.display().to_string(),
            cause,
        })
    }

    fn sync_old(&self) -> Result<(), MoveError> {
        self.old.sync_data().map_err(|cause| MoveError::Io {
            what: "cannot sync",
            path: self.old_path.display().to_string(),
            cause,
        })
    }

    fn digest_old(&self) -> Result<String, MoveError> {
        BlockDigest::of_file(&self.old, DISK_BLOCK).map_err(|cause| MoveError::Io {
            what: "cannot hash",
            path: self.old_path.display().to_string(),
            cause,
        })
    }
}

/// Why a pass stopped.
enum Pass {
    Read(std::io::Error),
    Move(MoveError),
}

impl From<std::io::Error> for Pass {
    fn from(e: std::io::Error) -> Self {
        Pass::Read(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, VmDef};
    use std::time::Duration;

    /// The pause copied what the guest wrote in the last short round, never a share of the
    /// image worth naming: at most a sixteenth of it (what it holds is set by the guest's
    /// write rate over that round, so no fixed count is a bar that cannot flake).
    fn pause_holds_a_few_blocks(r: &LiveMoveReport) -> bool {
        r.blocks_at_pause * DISK_BLOCK * 16 <= r.image_bytes
    }

    #[test]
    fn a_writing_guests_disk_moves_live_with_a_short_pause_and_no_lost_write() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        }
        let _serial = super::super::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("a"), 1 << 30).unwrap();
        inv.create(VmDef {
            name: "vm1".into(),
            memory_mib: 32,
            vcpus: 2,
            workload: vec!["disk".into(), "counter".into()],
            dirty_mib: 1,
            dirty_rate: 0,
            dirty_tracking: crate::dirty::DirtyTracking::Bitmap,
            disk_mib: 4,
            disk_rate: 0,
            disk_region_mib: 0,
            generation: 0,
        })
        .unwrap();
        inv.start("vm1").unwrap();
        let (_, vm) = inv.running("vm1").unwrap();
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !f() {
                assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait("a pass of the guest's disk", &|| {
            vm.stats().disk_generation >= 2
        });
        let old = inv.dir("vm1").join(crate::inventory::DISK);
        let new = dir.path().join("moved.img");
        let covered = std::cell::Cell::new(0u64);
        let r = move_disk(&vm, &old, &new, &AtomicBool::new(false), &|n| {
            covered.set(covered.get() + n)
        })
        .unwrap();
        println!("{r:?}");
        assert_eq!(r.image_bytes, 4 << 20);
        assert_eq!(
            covered.get(),
            4 << 20,
            "the first pass's progress ends at the image's size"
        );
        assert!(r.copied_bytes > 0 && r.rounds >= 1, "{r:?}");
        // The pause copies only the last round's few blocks, never the image (its time is a
        // bench's figure, `cargo xtask bench disk`, not a test's bar).
        assert!(pause_holds_a_few_blocks(&r), "{r:?}");
        assert!(r.pause_ms > 0.0 && r.pause_ms < r.total_ms, "{r:?}");
        let blk = vm.devices().blk().unwrap();
        assert_eq!(blk.path(), new);
        // The old image is frozen at the pause; the guest writes the new one and its checks
        // (each block read back against the stamp of its last pass) go on with no failure.
        let frozen = BlockDigest::of_file(&File::open(&old).unwrap(), DISK_BLOCK).unwrap();
        assert_eq!(frozen, r.digest);
        let seen = vm.stats().disk_blocks_verified;
        wait("a whole pass more on the new image", &|| {
            let s = vm.stats();
            assert_eq!(s.disk_failures, 0, "a disk write was lost: {s:?}");
            s.disk_blocks_verified >= seen + 1024 + 8
        });
        let now = BlockDigest::of_file(&File::open(&old).unwrap(), DISK_BLOCK).unwrap();
        assert_eq!(now, frozen, "the old image was written after the switch");
        let c = vm.stats().counter;
        wait("the counter goes on", &|| vm.stats().counter > c);
    }

    #[test]
    fn a_move_onto_an_existing_file_fails_and_the_vm_stays_on_its_image() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        }
        let _serial = super::super::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("a"), 1 << 30).unwrap();
        inv.create(VmDef {
            name: "vm1".into(),
            memory_mib: 16,
            vcpus: 1,
            workload: vec!["disk".into()],
            dirty_mib: 1,
            dirty_rate: 0,
            dirty_tracking: crate::dirty::DirtyTracking::Bitmap,
            disk_mib: 1,
            disk_rate: 0,
            disk_region_mib: 0,
            generation: 0,
        })
        .unwrap();
        inv.start("vm1").unwrap();
        let (_, vm) = inv.running("vm1").unwrap();
        let old = inv.dir("vm1").join(crate::inventory::DISK);
        let new = dir.path().join("there.img");
        std::fs::write(&new, b"someone's file").unwrap();
        let e = move_disk(&vm, &old, &new, &AtomicBool::new(false), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert_eq!(vm.devices().blk().unwrap().path(), old);
        let s = vm.stats().disk_blocks_verified;
        let t = Instant::now();
        while vm.stats().disk_blocks_verified <= s + 16 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the guest's disk stopped"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(vm.stats().disk_failures, 0);
    }
}
