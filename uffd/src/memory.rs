//! Guest memory registered with userfaultfd, and the page bookkeeping behind post-copy.
//!
//! Every page is in one of three states:
//! - **present**: known at registration (received in pre-copy) or placed since. Faults on it are
//!   either impossible (populated) or resolved locally (known but unpopulated: zero page).
//! - **pending**: a vCPU faulted on it and the page source was asked (or asking failed: then it
//!   waits for [`PostcopyMemory::reissue_pending`]).
//! - **missing**: neither; the background push or a fault will bring it.
//!
//! The `pending` lock orders the two sides: the fault handler checks "present" and records
//! "pending" under it, and [`PostcopyMemory::place`] marks "present" and clears "pending" under
//! it, so a fault is never requested for a page that was just placed and never left waiting
//! for a page that already arrived.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use userfaultfd::{IoctlFlags, Uffd, UffdBuilder};

use crate::bitmap::PageBitmap;
use crate::error::{PageSourceError, UffdError};
use crate::handler::FaultHandler;
use crate::stats::{Counters, FaultStats};
use crate::PAGE_SIZE;

/// What the fault handler needs from wherever pages come from. The agent implements it over
/// the migration connection.
pub trait PageSource: Send + Sync + 'static {
    /// Asks for page `index` (offset / 4096 within the region).
    ///
    /// Must not block long: the answer arrives later through [`PostcopyMemory::place`]. Called
    /// at most once per page per (re)connection, except when the caller re-issues
    /// [`PostcopyMemory::reissue_pending`]. It may be called from the handler thread and from
    /// the thread calling `reissue_pending` at the same time.
    fn request(&self, index: u64) -> Result<(), PageSourceError>;
}

/// Why a page is being placed: accounting only, placement works the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The page answers a request the fault handler made.
    Demand,
    /// The source pushed the page in the background.
    Push,
}

/// A page a vCPU is waiting for.
#[derive(Debug)]
struct Pending {
    /// When the first fault on it was read.
    since: Instant,
    /// Whether the current page source accepted a request for it.
    requested: bool,
}

/// Guest memory under post-copy: a userfaultfd registration plus what is present and pending.
///
/// Shared as `Arc` between the fault handler thread and the threads that place pages.
pub struct PostcopyMemory {
    uffd: Uffd,
    base: usize,
    len: usize,
    pages: u64,
    /// Pages whose content the destination held at registration.
    known: PageBitmap,
    /// Pages known or placed since.
    present: PageBitmap,
    /// Pages neither known nor placed.
    remaining: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    complete: Condvar,
    source: RwLock<Option<Arc<dyn PageSource>>>,
    /// Whether the last request failed (errors are logged once per outage).
    source_failing: AtomicBool,
    pub(crate) handler_running: AtomicBool,
    unregistered: AtomicBool,
    pub(crate) counters: Counters,
}

impl std::fmt::Debug for PostcopyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyMemory")
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .field("pages", &self.pages)
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

/// How often a placement is retried when the kernel answers EAGAIN (memory layout changing).
const EAGAIN_RETRIES: u32 = 10_000;

impl PostcopyMemory {
    /// Registers `[base, base + len)` with a new userfaultfd for missing-page faults.
    ///
    /// `known` has one bit per page: pages whose content the destination already holds
    /// (received in pre-copy and not dirtied since). Those still unpopulated are zero pages and
    /// are resolved locally with `UFFDIO_ZEROPAGE` on fault, without asking the source. Every
    /// other page must be missing (never touched, or dropped with `MADV_DONTNEED`): it is
    /// fetched on demand, and its content placed with [`place`](Self::place).
    ///
    /// # Safety
    /// `[base, base + len)` must be a live private anonymous mapping that stays mapped, at the
    /// same address, until this object is dropped, and no other userfaultfd may register it.
    /// The pages not in `known` must be missing (never touched, or `MADV_DONTNEED`ed): a
    /// populated one would keep its stale content, as placing it fails with `EEXIST`.
    pub unsafe fn register(
        base: *mut u8,
        len: usize,
        known: &PageBitmap,
    ) -> Result<Arc<Self>, UffdError> {
        let addr = base as usize;
        if len == 0 || (addr | len) & (PAGE_SIZE - 1) != 0 {
            return Err(UffdError::Unaligned { base: addr, len });
        }
        let pages = (len / PAGE_SIZE) as u64;
        if known.pages() != pages {
            return Err(UffdError::KnownSizeMismatch {
                bitmap: known.pages(),
                region: pages,
            });
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM touches guest memory from kernel mode (get_user_pages): those faults must
            // reach us too.
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        let ioctls = uffd
            .register(base.cast(), len)
            .map_err(UffdError::Register)?;
        for (flag, name) in [
            (IoctlFlags::COPY, "UFFDIO_COPY"),
            (IoctlFlags::ZEROPAGE, "UFFDIO_ZEROPAGE"),
            (IoctlFlags::WAKE, "UFFDIO_WAKE"),
        ] {
            if !ioctls.contains(flag) {
                // Dropping `uffd` closes it, which unregisters the range.
                return Err(UffdError::MissingIoctl(name));
            }
        }
        let present = known.clone();
        let remaining = pages - present.count_set();
        tracing::debug!(
            base = addr,
            len,
            pages,
            remaining,
            "registered for post-copy"
        );
        Ok(Arc::new(Self {
            uffd,
            base: addr,
            len,
            pages,
            known: known.clone(),
            present,
            remaining: AtomicU64::new(remaining),
            pending: Mutex::new(HashMap::new()),
            complete: Condvar::new(),
            source: RwLock::new(None),
            source_failing: AtomicBool::new(false),
            handler_running: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            counters: Counters::default(),
        }))
    }

    /// Starts the fault handler thread (`uffd-handler`), which asks `source` for missing pages.
    ///
    /// One handler runs at a time; [`FaultHandler::stop`] ends it.
    pub fn start(self: &Arc<Self>, source: Arc<dyn PageSource>) -> Result<FaultHandler, UffdError> {
        self.set_source(source);
        FaultHandler::spawn(Arc::clone(self))
    }

    /// Replaces the page source, after a reconnect.
    ///
    /// Requests made through the old source are considered lost: every pending page becomes
    /// unrequested, so the next fault on it asks the new source. Call
    /// [`reissue_pending`](Self::reissue_pending) to re-request them all now. A source that
    /// reconnects internally should be passed again (the same `Arc`) for the same effect.
    pub fn set_source(&self, source: Arc<dyn PageSource>) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = Some(source);
        for entry in self.lock_pending().values_mut() {
            entry.requested = false;
        }
    }

    /// Places page `index`: its content, or `None` for a zero page, then wakes whoever faulted
    /// on it.
    ///
    /// Returns `Ok(true)` if this call placed the page and `Ok(false)` if it was already present
    /// (known, placed before, or placed concurrently: `EEXIST`). Retries while the kernel answers
    /// `EAGAIN`. If a fault was waiting on the page, records its latency.
    ///
    /// The ioctl wakes the waiting threads just before the page is marked present: a woken
    /// thread may briefly still see it in [`pending`](Self::pending) until `place` returns.
    pub fn place(
        &self,
        index: u64,
        data: Option<&[u8]>,
        why: Placement,
    ) -> Result<bool, UffdError> {
        self.check_index(index)?;
        if let Some(data) = data {
            if data.len() != PAGE_SIZE {
                return Err(UffdError::BadLength(data.len()));
            }
        }
        if self.present.get(index) {
            Counters::bump(&self.counters.redundant_places, 1);
            return Ok(false);
        }
        let placed = match data {
            Some(data) => self.copy(index, data)?,
            None => self.zeropage(index)?,
        };
        // Count before marking present, so a `wait_complete` that returns sees every count.
        if placed {
            let (pages, bytes) = match why {
                Placement::Demand => (&self.counters.pages_demand, &self.counters.bytes_demand),
                Placement::Push => (&self.counters.pages_pushed, &self.counters.bytes_pushed),
            };
            Counters::bump(pages, 1);
            Counters::bump(bytes, data.map_or(0, |d| d.len() as u64));
        } else {
            // Someone else placed it between our check and our ioctl.
            Counters::bump(&self.counters.redundant_places, 1);
        }
        // On EEXIST the page is populated all the same: mark it, so `remaining` reaches zero.
        let newly_present = self.mark_present(index);
        if !placed && newly_present {
            tracing::debug!(page = index, "page was populated before its placement");
        }
        Ok(placed)
    }

    /// Whether page `index` is present (known at registration or placed since).
    pub fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages not present yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Every page not present yet, ascending: the background push order, or what to resume.
    pub fn missing_pages(&self) -> Vec<u64> {
        self.present.unset_pages()
    }

    /// The first page at or after `from` that is not present: a cursor for a background push
    /// that should skip what arrived meanwhile.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        self.present.next_unset(from)
    }

    /// Pages a vCPU is waiting for, ascending (requested or not yet successfully requested).
    pub fn pending(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.lock_pending().keys().copied().collect();
        pages.sort_unstable();
        pages
    }

    /// Requests every pending page the current source has not accepted a request for: pages
    /// whose request failed, and after [`set_source`](Self::set_source) every pending page.
    ///
    /// Returns how many requests the source accepted; stops at the first error (the rest stay
    /// pending for the next try).
    pub fn reissue_pending(&self) -> Result<usize, PageSourceError> {
        // Claimed under the lock (marked requested), so a fault handled meanwhile does not ask
        // for the same page again.
        let unrequested: Vec<u64> = {
            let mut pending = self.lock_pending();
            let mut pages = Vec::new();
            for (index, entry) in pending.iter_mut().filter(|(_, e)| !e.requested) {
                entry.requested = true;
                pages.push(*index);
            }
            pages.sort_unstable();
            pages
        };
        let mut sent = 0;
        for (n, &index) in unrequested.iter().enumerate() {
            if let Err(e) = self.request(index) {
                // `request` released this one; release the rest for the next try.
                let mut pending = self.lock_pending();
                for i in &unrequested[n + 1..] {
                    if let Some(entry) = pending.get_mut(i) {
                        entry.requested = false;
                    }
                }
                return Err(e);
            }
            sent += 1;
        }
        Ok(sent)
    }

    /// Waits until every page is present, or `timeout` passes. Returns whether all are present.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock_pending();
        while self.remaining() > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .complete
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// A snapshot of the fault statistics.
    pub fn stats(&self) -> FaultStats {
        self.counters.snapshot()
    }

    /// Unregisters the region from userfaultfd (idempotent; dropping does it too).
    ///
    /// Afterwards a missing page faults like ordinary anonymous memory: it reads as zeros. Only
    /// call it once [`remaining`](Self::remaining) is 0 and the fault handler is stopped.
    pub fn unregister(&self) -> Result<(), UffdError> {
        if self.unregistered.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.uffd
            .unregister(self.base as *mut libc::c_void, self.len)
            .map_err(UffdError::Unregister)
    }

    // ----- The fault handler's side -----

    /// The userfaultfd's descriptor, for the handler's `poll`.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }

    pub(crate) fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The page index of a faulting address, if it lies in the region.
    pub(crate) fn index_of(&self, addr: usize) -> Option<u64> {
        let offset = addr.checked_sub(self.base)?;
        (offset < self.len).then_some((offset / PAGE_SIZE) as u64)
    }

    /// Handles one missing-page fault on page `index`.
    pub(crate) fn on_fault(&self, index: u64) -> Result<(), UffdError> {
        Counters::bump(&self.counters.faults, 1);
        if self.known.get(index) {
            // Known and unpopulated: a zero page. EEXIST means a vCPU raced us to it.
            Counters::bump(&self.counters.zero_local, 1);
            if !self.zeropage(index)? {
                self.wake(index)?;
            }
            return Ok(());
        }
        let must_request = {
            let mut pending = self.lock_pending();
            if self.present.get(index) {
                drop(pending);
                Counters::bump(&self.counters.already_present, 1);
                return self.wake(index);
            }
            // Whoever asks for the page claims it here, under the lock (`requested`), so no
            // one else (a duplicate fault, `reissue_pending`) asks for it again.
            match pending.get_mut(&index) {
                Some(entry) => {
                    Counters::bump(&self.counters.duplicate_faults, 1);
                    !std::mem::replace(&mut entry.requested, true)
                }
                None => {
                    pending.insert(
                        index,
                        Pending {
                            since: Instant::now(),
                            requested: true,
                        },
                    );
                    true
                }
            }
        };
        if must_request {
            // The error is logged and counted in `request`; the page stays pending.
            let _ = self.request(index);
        }
        Ok(())
    }

    /// Asks the current source for `index` and records the outcome on the pending entry.
    fn request(&self, index: u64) -> Result<(), PageSourceError> {
        let source = self
            .source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(source) = source else {
            return Err(PageSourceError::Disconnected("no page source set".into()));
        };
        match source.request(index) {
            Ok(()) => {
                Counters::bump(&self.counters.requests, 1);
                if self.source_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(page = index, "page source accepts requests again");
                }
                Ok(())
            }
            Err(err) => {
                Counters::bump(&self.counters.request_errors, 1);
                // Unclaimed: the next fault on it, or `reissue_pending`, asks again.
                if let Some(entry) = self.lock_pending().get_mut(&index) {
                    entry.requested = false;
                }
                if !self.source_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        page = index,
                        cause = %err,
                        "page source refused a request; faults stay pending until re-requested"
                    );
                }
                Err(err)
            }
        }
    }

    // ----- Kernel boundary -----

    fn page_addr(&self, index: u64) -> *mut libc::c_void {
        (self.base + index as usize * PAGE_SIZE) as *mut libc::c_void
    }

    /// `UFFDIO_COPY` of one page, waking its waiters. `Ok(false)` on `EEXIST`.
    fn copy(&self, index: u64, data: &[u8]) -> Result<bool, UffdError> {
        for _ in 0..EAGAIN_RETRIES {
            // SAFETY: the destination is one page inside the registered region, which
            // `register`'s caller guarantees is a live private anonymous mapping; the ioctl only
            // fills it if it is missing (else EEXIST), so no Rust reference to guest memory is
            // invalidated. The source is a live 4096-byte slice.
            let result = unsafe {
                self.uffd
                    .copy(data.as_ptr().cast(), self.page_addr(index), PAGE_SIZE, true)
            };
            match result {
                Ok(_) => return Ok(true),
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    return Ok(false)
                }
                Err(userfaultfd::Error::PartiallyCopied(_)) => std::thread::yield_now(),
                Err(userfaultfd::Error::CopyFailed(errno)) => {
                    return Err(UffdError::Copy {
                        index,
                        cause: std::io::Error::from_raw_os_error(errno as i32),
                    })
                }
                Err(other) => {
                    return Err(UffdError::Copy {
                        index,
                        cause: std::io::Error::other(other),
                    })
                }
            }
        }
        Err(UffdError::RetriesExhausted(index))
    }

    /// `UFFDIO_ZEROPAGE` of one page, waking its waiters. `Ok(false)` on `EEXIST`.
    fn zeropage(&self, index: u64) -> Result<bool, UffdError> {
        for _ in 0..EAGAIN_RETRIES {
            // SAFETY: the range is one page inside the registered region (a live private
            // anonymous mapping, per `register`'s contract); the ioctl only maps the zero page
            // where the page is missing.
            let result = unsafe { self.uffd.zeropage(self.page_addr(index), PAGE_SIZE, true) };
            match result {
                Ok(_) => return Ok(true),
                Err(userfaultfd::Error::ZeropageFailed(errno)) => match errno as i32 {
                    libc::EEXIST => return Ok(false),
                    libc::EAGAIN => std::thread::yield_now(),
                    code => {
                        return Err(UffdError::ZeroPage {
                            index,
                            cause: std::io::Error::from_raw_os_error(code),
                        })
                    }
                },
                Err(other) => {
                    return Err(UffdError::ZeroPage {
                        index,
                        cause: std::io::Error::other(other),
                    })
                }
            }
        }
        Err(UffdError::RetriesExhausted(index))
    }

    /// `UFFDIO_WAKE` of one page: for faults on a page placed before the fault was read.
    fn wake(&self, index: u64) -> Result<(), UffdError> {
        self.uffd
            .wake(self.page_addr(index), PAGE_SIZE)
            .map_err(|source| UffdError::Wake { index, source })
    }

    // ----- Bookkeeping -----

    /// Marks `index` present after a successful placement; false if it already was.
    fn mark_present(&self, index: u64) -> bool {
        let mut pending = self.lock_pending();
        if !self.present.set(index) {
            return false;
        }
        if let Some(entry) = pending.remove(&index) {
            self.counters.latency.record(entry.since.elapsed());
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.complete.notify_all();
        }
        true
    }

    fn check_index(&self, index: u64) -> Result<(), UffdError> {
        if index < self.pages {
            Ok(())
        } else {
            Err(UffdError::OutOfRange {
                index,
                pages: self.pages,
            })
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for PostcopyMemory {
    fn drop(&mut self) {
        if let Err(err) = self.unregister() {
            tracing::warn!(cause = %err, "unregistering post-copy memory failed");
        }
    }
}
