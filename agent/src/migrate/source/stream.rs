//! Sending guest pages and the VM's files: page frames straight from guest memory, files in
//! checksummed pieces.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::stop_and_copy;
use crate::guest::layout::PAGE_SIZE;
use crate::migrate::link::Link;
use crate::migrate::report::ProgressPhase;
use crate::migrate::{Cancel, MigrateError, Progress, RoundStats};
use crate::vm::memory::PageRef;
use crate::vm::Vm;
use crate::wire;
use crate::wire::messages as msg;
use crate::wire::pages::{self, PageFrameBuilder, PageFrameKind};

/// File pieces are sent in chunks of this size; all-zero chunks are skipped (sparse disks).
const FILE_CHUNK: usize = 1 << 20;

/// How a list of pages goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batch<'p> {
    /// Pre-copy or push pages, or answers to page requests.
    pub(super) kind: PageFrameKind,
    /// Whether the vCPUs are paused (then the data is checksummed too).
    pub(super) paused: bool,
    /// The round the pages belong to (0 in post-copy).
    pub(super) round: u32,
    /// Round 1: the pages the host ever touched; the others are zero without reading them.
    pub(super) populated: Option<&'p [bool]>,
    /// Stop at the first frame boundary past this (a pre-copy round cut short by
    /// `--timeout`): the pages sent are the first `stats.pages` of the list.
    pub(super) deadline: Option<Instant>,
}

/// Sends the given pages in frames of up to 256, straight from guest memory (until
/// `batch.deadline`, if any).
pub(super) fn send_pages(
    link: &mut Link,
    vm: &Vm,
    list: &[u64],
    batch: Batch<'_>,
    progress: &dyn Fn(Progress),
    cancel: &Cancel,
) -> Result<RoundStats, MigrateError> {
    let Batch {
        kind,
        paused,
        round,
        populated,
        deadline,
    } = batch;
    let ram = vm.ram();
    let before = link.writer.bytes_sent();
    let mut stats = RoundStats {
        round,
        ..Default::default()
    };
    // Data checksummed only with the vCPUs held paused, the proof kept for the whole list.
    let held = if paused {
        Some(stop_and_copy::held(vm)?)
    } else {
        None
    };
    let mut frame = PageFrameBuilder::new(kind);
    let mut data: Vec<PageRef<'_>> = Vec::with_capacity(pages::MAX_PAGES);
    let mut last_progress = Instant::now();
    for chunk in list.chunks(pages::MAX_PAGES) {
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        data.clear();
        for &p in chunk {
            let page = ram.page(p)?;
            let zero = populated.is_some_and(|pop| !pop[p as usize]) || page.is_zero();
            frame.push(p, zero);
            if !zero {
                data.push(page);
            }
        }
        // A vCPU waits for demand pages: no wait for the bandwidth limit.
        let urgent = kind == PageFrameKind::Demand;
        // Under `--compress`: the contents copied out and compressed, unless it does not pay.
        let compressed = match link.compressor.as_mut() {
            Some(c) if !data.is_empty() => {
                let contents = c.contents();
                for page in &data {
                    let at = contents.len();
                    contents.resize(at + PAGE_SIZE as usize, 0);
                    ram.read_page(page.index(), &mut contents[at..])?;
                }
                c.frame(&mut frame, paused)
            }
            _ => None,
        };
        if let Some(bytes) = compressed {
            link.send_compressed(bytes, chunk.len(), urgent)?;
        } else {
            let head = match &held {
                Some(held) => frame.head_checked(data.iter().map(|&p| held.page(p))),
                None => frame.head(),
            };
            // SAFETY: the pages are guest memory of `vm`, which the caller holds for the whole
            // migration, past the flush below.
            unsafe { link.send_pages(head, chunk.len(), &data, urgent) }?;
        }
        stats.pages += chunk.len() as u64;
        stats.zero_pages += (chunk.len() - data.len()) as u64;
        if last_progress.elapsed() > Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(Progress::new(
                if paused {
                    ProgressPhase::StopAndCopy
                } else {
                    ProgressPhase::PreCopy
                },
                round,
                stats.pages,
                list.len() as u64,
            ));
        }
    }
    link.flush()?;
    stats.bytes = link.writer.bytes_sent() - before;
    Ok(stats)
}

/// Sends one file of the VM folder in chunks, skipping holes and all-zero chunks; a file
/// that cannot be read fails the migration.
pub(super) fn send_file(link: &mut Link, dir: &Path, name: &str) -> Result<(), MigrateError> {
    let file = fs::File::open(dir.join(name))?;
    let size = file.metadata()?.len();
    let mut sent_any = false;
    crate::storage::for_each_data_chunk(&file, FILE_CHUNK, |offset, chunk| {
        sent_any = true;
        send_chunk(link, name, size, offset, chunk)
    })?;
    if !sent_any {
        send_chunk(link, name, size, 0, &[])?;
    }
    Ok(())
}

/// Sends one piece of file `name` of `size` bytes, at `offset`.
pub(in crate::migrate) fn send_chunk(
    link: &mut Link,
    name: &str,
    size: u64,
    offset: u64,
    chunk: &[u8],
) -> Result<(), MigrateError> {
    let piece = msg::FileChunk {
        name: name.into(),
        size,
        offset,
    };
    Ok(link.writer.send_bytes(wire::data_frame(&piece, chunk))?)
}
