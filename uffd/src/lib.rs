//! userfaultfd post-copy for vmig: the destination VM runs before all of its memory arrived.
//!
//! Guest memory (one private anonymous mapping) is registered with a userfaultfd. A vCPU that
//! touches a missing page blocks in the kernel; the fault handler thread reads the fault and
//! asks the [`PageSource`] (the migration source, over the network) for the page. When the page
//! arrives, asked for or pushed in the background, the caller hands it to
//! [`PostcopyMemory::place`], which fills it with `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` for zero
//! pages) and wakes every thread blocked on it.
//!
//! ```text
//!  vCPU ──fault──► kernel ──event──► uffd-handler ──request(index)──► PageSource (network)
//!   ▲                                                                       │
//!   └──── wake ◄── UFFDIO_COPY ◄── PostcopyMemory::place(index, data) ◄─────┘ (demand or push)
//! ```
//!
//! Pages the destination already holds (`known`) are never asked for: if still unpopulated they
//! are zero and the handler maps the zero page itself.
//!
//! # Rules for the integrator
//! - The region is one private anonymous mapping (4 KiB pages, page aligned). Before
//!   [`PostcopyMemory::register`], `MADV_DONTNEED` every page not in `known` (dirtied since it
//!   was sent). Keep the mapping alive and in place until the `PostcopyMemory` is dropped.
//! - Every thread that touches guest memory may block in the kernel until its page is placed:
//!   vCPUs, and also VMM threads emulating devices. The threads that receive pages and call
//!   [`PostcopyMemory::place`], and the [`PageSource`], must never read or write guest memory
//!   that may still be missing, or they wait for themselves.
//! - [`PageSource::request`] runs on the `uffd-handler` thread: it must hand the request off
//!   (queue, non-blocking send) and return. An `Err` keeps the page pending (the vCPU stays
//!   blocked); after a reconnect call [`PostcopyMemory::set_source`] then
//!   [`PostcopyMemory::reissue_pending`].
//! - `place` is safe from any number of threads at once, for any page, before or after a
//!   fault; placing a page twice is harmless (`Ok(false)`).
//! - Drop or [`PostcopyMemory::unregister`] only once [`PostcopyMemory::remaining`] is 0 (see
//!   [`PostcopyMemory::wait_complete`]): after that a missing page would read as zeros.

#![deny(missing_docs, missing_debug_implementations)]

mod bitmap;
mod error;
mod handler;
mod memory;
mod stats;

pub use bitmap::PageBitmap;
pub use error::{PageSourceError, UffdError};
pub use handler::FaultHandler;
pub use memory::{PageSource, Placement, PostcopyMemory};
pub use stats::{FaultStats, LatencySummary};

/// Size of a guest page: the unit of faults and placements.
pub const PAGE_SIZE: usize = 4096;
