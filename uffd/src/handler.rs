//! The fault handler thread: reads missing-page faults from the userfaultfd and resolves them
//! (zero page, wake) or asks the page source, until told to stop.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use userfaultfd::{Event, EventBuffer};

use crate::error::UffdError;
use crate::memory::PostcopyMemory;

/// Fault events read per `read(2)`.
const EVENT_BATCH: usize = 64;

/// The running fault handler thread. [`stop`](Self::stop) (or dropping it) ends the thread
/// without needing a fault to arrive.
#[derive(Debug)]
pub struct FaultHandler {
    stop: File,
    thread: Option<JoinHandle<Result<(), UffdError>>>,
}

impl FaultHandler {
    pub(crate) fn spawn(memory: Arc<PostcopyMemory>) -> Result<Self, UffdError> {
        if memory.handler_running.swap(true, Ordering::AcqRel) {
            return Err(UffdError::AlreadyStarted);
        }
        let running = Arc::clone(&memory);
        let spawned = new_eventfd().and_then(|stop| {
            let stop_for_thread = stop.try_clone().map_err(UffdError::EventFd)?;
            let thread = std::thread::Builder::new()
                .name("uffd-handler".into())
                .spawn(move || {
                    tracing::debug!("uffd fault handler started");
                    let result = run(&memory, &stop_for_thread);
                    if let Err(err) = &result {
                        tracing::error!(cause = %err, "uffd fault handler failed");
                    }
                    memory.handler_running.store(false, Ordering::Release);
                    result
                })
                .map_err(UffdError::Spawn)?;
            Ok(Self {
                stop,
                thread: Some(thread),
            })
        });
        if spawned.is_err() {
            running.handler_running.store(false, Ordering::Release);
        }
        spawned
    }

    /// Stops the handler thread and waits for it; returns the error that ended it early, if any.
    ///
    /// Faults not read yet stay queued in the userfaultfd, and faults read but not answered stay
    /// pending: a handler started later picks both up.
    pub fn stop(mut self) -> Result<(), UffdError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), UffdError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        (&self.stop)
            .write_all(&1u64.to_ne_bytes())
            .map_err(UffdError::EventFd)?;
        thread.join().map_err(|_| UffdError::HandlerPanicked)?
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        if let Err(err) = self.stop_and_join() {
            tracing::warn!(cause = %err, "uffd fault handler ended with an error");
        }
    }
}

fn new_eventfd() -> Result<File, UffdError> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::EventFd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The handler loop: wait for faults or the stop signal, drain and handle faults.
fn run(memory: &PostcopyMemory, stop: &File) -> Result<(), UffdError> {
    let mut events = EventBuffer::new(EVENT_BATCH);
    loop {
        let (faults_ready, stop_ready) = wait(memory.raw_fd(), stop.as_raw_fd())?;
        if stop_ready {
            tracing::debug!("uffd fault handler stopped");
            return Ok(());
        }
        if !faults_ready {
            continue;
        }
        loop {
            let mut read = 0;
            for event in memory
                .uffd()
                .read_events(&mut events)
                .map_err(UffdError::ReadEvents)?
            {
                read += 1;
                handle(memory, event.map_err(UffdError::ReadEvents)?);
            }
            if read == 0 {
                break;
            }
        }
    }
}

/// Blocks until the userfaultfd or the stop eventfd is readable; says which.
fn wait(uffd: i32, stop: i32) -> Result<(bool, bool), UffdError> {
    let mut fds = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd and its length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(UffdError::Poll(err));
        }
    }
    let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    if fds[0].revents & bad != 0 {
        return Err(UffdError::Poll(io::Error::other(format!(
            "userfaultfd poll revents {:#x}",
            fds[0].revents
        ))));
    }
    Ok((
        fds[0].revents & libc::POLLIN != 0,
        fds[1].revents & libc::POLLIN != 0,
    ))
}

fn handle(memory: &PostcopyMemory, event: Event) {
    match event {
        Event::Pagefault { addr, .. } => match memory.index_of(addr as usize) {
            Some(index) => {
                if let Err(err) = memory.on_fault(index) {
                    tracing::error!(page = index, cause = %err, "resolving a fault failed");
                }
            }
            None => tracing::warn!(addr = addr as usize, "fault outside the registered region"),
        },
        other => tracing::debug!(event = ?other, "ignoring userfaultfd event"),
    }
}
