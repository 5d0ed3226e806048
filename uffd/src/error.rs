//! Errors: one variant per failing operation, each carrying its cause.

use std::io;

/// Why a [`PageSource`](crate::PageSource) could not take a request.
///
/// The fault stays pending: the vCPU that faulted stays blocked until the page is placed, and
/// [`PostcopyMemory::pending`](crate::PostcopyMemory::pending) lists it for a re-request.
#[derive(Debug, thiserror::Error)]
pub enum PageSourceError {
    /// The connection to the migration source is down.
    #[error("page source disconnected: {0}")]
    Disconnected(String),
    /// Any other failure, with its cause.
    #[error("page source failed: {0}")]
    Other(String),
}

/// Errors of the userfaultfd post-copy machinery.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The region handed to `register` is not page aligned, or empty.
    #[error("region {base:#x}+{len:#x} is not a non-empty, page-aligned range")]
    Unaligned {
        /// Start address of the region.
        base: usize,
        /// Length of the region in bytes.
        len: usize,
    },
    /// The `known` bitmap does not have one bit per page of the region.
    #[error("known bitmap has {bitmap} pages, the region has {region}")]
    KnownSizeMismatch {
        /// Pages in the bitmap.
        bitmap: u64,
        /// Pages in the region.
        region: u64,
    },
    /// Creating the userfaultfd object failed (no `/dev/userfaultfd`, no permission, old kernel).
    #[error("creating the userfaultfd object failed: {0}")]
    Create(#[source] userfaultfd::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER failed: {0}")]
    Register(#[source] userfaultfd::Error),
    /// The kernel does not offer an ioctl post-copy needs on this range.
    #[error("the registered range lacks the {0} ioctl")]
    MissingIoctl(&'static str),
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER failed: {0}")]
    Unregister(#[source] userfaultfd::Error),
    /// A page index outside the region.
    #[error("page {index} is outside the region of {pages} pages")]
    OutOfRange {
        /// The offending page index.
        index: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// Page content of the wrong length was handed to `place`.
    #[error("page content is {0} bytes, expected 4096")]
    BadLength(usize),
    /// `UFFDIO_COPY` failed.
    #[error("UFFDIO_COPY of page {index} failed: {cause}")]
    Copy {
        /// The page being placed.
        index: u64,
        /// The kernel's answer.
        #[source]
        cause: io::Error,
    },
    /// `UFFDIO_ZEROPAGE` failed.
    #[error("UFFDIO_ZEROPAGE of page {index} failed: {cause}")]
    ZeroPage {
        /// The page being placed.
        index: u64,
        /// The kernel's answer.
        #[source]
        cause: io::Error,
    },
    /// `UFFDIO_WAKE` failed.
    #[error("UFFDIO_WAKE of page {index} failed: {source}")]
    Wake {
        /// The page whose waiters were to be woken.
        index: u64,
        /// The kernel's answer.
        #[source]
        source: userfaultfd::Error,
    },
    /// The kernel kept answering EAGAIN to a placement.
    #[error("placing page {0} kept failing with EAGAIN")]
    RetriesExhausted(u64),
    /// Reading fault events from the userfaultfd failed.
    #[error("reading userfaultfd events failed: {0}")]
    ReadEvents(#[source] userfaultfd::Error),
    /// `poll` on the userfaultfd and the stop eventfd failed.
    #[error("poll failed: {0}")]
    Poll(#[source] io::Error),
    /// Creating or signalling the stop eventfd failed.
    #[error("stop eventfd failed: {0}")]
    EventFd(#[source] io::Error),
    /// A fault handler is already running for this memory.
    #[error("a fault handler is already running")]
    AlreadyStarted,
    /// Spawning the handler thread failed.
    #[error("spawning the fault handler thread failed: {0}")]
    Spawn(#[source] io::Error),
    /// The handler thread panicked.
    #[error("the fault handler thread panicked")]
    HandlerPanicked,
}
