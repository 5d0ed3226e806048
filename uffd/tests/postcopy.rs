//! Post-copy against the real userfaultfd: vCPU-like threads fault on guest memory while a test
//! page source answers from a "source" copy of the memory.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmig_uffd::{
    PageBitmap, PageSource, PageSourceError, Placement, PostcopyMemory, UffdError, PAGE_SIZE,
};

/// A private anonymous mapping, as the VMM maps guest memory.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the tests synchronise access through userfaultfd.
unsafe impl Send for Mapping {}
// SAFETY: as above; the tests only read and write through raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap failed");
        Self {
            base: base.cast(),
            len,
        }
    }

    fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    fn page_ptr(&self, index: u64) -> *mut u8 {
        assert!(index < self.pages());
        // SAFETY: the offset stays inside the mapping (checked above).
        unsafe { self.base.add(index as usize * PAGE_SIZE) }
    }

    /// Reads a whole page, faulting it in if missing.
    fn read_page(&self, index: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE_SIZE];
        // SAFETY: the page lies inside the live mapping; `out` is a distinct buffer of one page.
        unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(index), out.as_mut_ptr(), PAGE_SIZE) };
        out
    }

    /// Writes one byte with a write fault as the first touch.
    fn write_byte(&self, index: u64, offset: usize, value: u8) {
        assert!(offset < PAGE_SIZE);
        // SAFETY: the byte lies inside the live mapping.
        unsafe { self.page_ptr(index).add(offset).write_volatile(value) };
    }

    fn fill_page(&self, index: u64, data: &[u8]) {
        // SAFETY: the page lies inside the live mapping; `data` is one page long.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.page_ptr(index), PAGE_SIZE) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The content of page `index` on the migration source: pages with `index % 16 == 7` are zero,
/// the rest a pattern unique to the page.
fn source_page(index: u64) -> Vec<u8> {
    if index % 16 == 7 {
        return vec![0; PAGE_SIZE];
    }
    (0..PAGE_SIZE / 8)
        .flat_map(|word| (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ word as u64).to_le_bytes())
        .collect()
}

/// Registers `map`, or prints why userfaultfd is unavailable and returns `None`.
fn register(map: &Mapping, known: &PageBitmap) -> Option<Arc<PostcopyMemory>> {
    // SAFETY: `map` is a private anonymous mapping that outlives the returned object in every
    // test (the memory is dropped before the mapping), and its unknown pages are untouched.
    match unsafe { PostcopyMemory::register(map.base, map.len, known) } {
        Ok(memory) => Some(memory),
        Err(UffdError::Create(err)) => {
            eprintln!("SKIPPED: userfaultfd is unavailable on this host: {err}");
            None
        }
        Err(err) => panic!("register failed: {err}"),
    }
}

/// A page source that forwards requests to a responder thread and counts them per page.
struct TestSource {
    requests: Vec<AtomicU32>,
    fail: AtomicBool,
    to_responder: Mutex<Sender<u64>>,
}

impl TestSource {
    fn new(pages: u64) -> (Arc<Self>, Receiver<u64>) {
        let (tx, rx) = mpsc::channel();
        let source = Arc::new(Self {
            requests: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            fail: AtomicBool::new(false),
            to_responder: Mutex::new(tx),
        });
        (source, rx)
    }

    fn requested(&self, index: u64) -> u32 {
        self.requests[index as usize].load(Ordering::SeqCst)
    }
}

impl PageSource for TestSource {
    fn request(&self, index: u64) -> Result<(), PageSourceError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(PageSourceError::Disconnected("test outage".into()));
        }
        self.requests[index as usize].fetch_add(1, Ordering::SeqCst);
        self.to_responder
            .lock()
            .unwrap()
            .send(index)
            .map_err(|e| PageSourceError::Other(e.to_string()))
    }
}

/// Answers requests by placing the source's content, until `done` is set.
fn spawn_responder(
    memory: Arc<PostcopyMemory>,
    requests: Receiver<u64>,
    done: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            match requests.recv_timeout(Duration::from_millis(10)) {
                Ok(index) => {
                    let page = source_page(index);
                    let data = page.iter().any(|b| *b != 0).then_some(page.as_slice());
                    memory.place(index, data, Placement::Demand).unwrap();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })
}

/// Known pages: every 4th. Of those, `index % 8 == 0` are filled before registration and
/// `index % 8 == 4` are left unpopulated (known zero; the source has zeros there too).
fn known_every_fourth(map: &Mapping) -> PageBitmap {
    let known = PageBitmap::new(map.pages());
    for index in (0..map.pages()).step_by(4) {
        known.set(index);
        if index % 8 == 0 {
            map.fill_page(index, &source_page(index));
        }
    }
    known
}

fn source_page_known_aware(index: u64) -> Vec<u8> {
    if index % 8 == 4 {
        vec![0; PAGE_SIZE]
    } else {
        source_page(index)
    }
}

#[test]
fn concurrent_faults_read_source_contents_and_request_each_page_once() {
    let map = Arc::new(Mapping::new(64 << 20));
    let pages = map.pages();
    let known = known_every_fourth(&map);
    let Some(memory) = register(&map, &known) else {
        return;
    };
    let (source, requests) = TestSource::new(pages);
    let done = Arc::new(AtomicBool::new(false));
    let responder = spawn_responder(memory.clone(), requests, done.clone());
    let handler = memory.start(source.clone()).unwrap();

    // Four "vCPUs" walk all pages from different starting points, so several fault on the same
    // page at once; two of them touch each page first with a write of its final value.
    let vcpus: Vec<_> = (0..4u64)
        .map(|vcpu| {
            let map = map.clone();
            thread::spawn(move || {
                for step in 0..pages {
                    let index = (step + vcpu * pages / 8) % pages;
                    let expected = source_page_known_aware(index);
                    if vcpu % 2 == 0 {
                        map.write_byte(index, 100, expected[100]);
                    }
                    assert_eq!(map.read_page(index), expected, "page {index}");
                }
            })
        })
        .collect();
    for vcpu in vcpus {
        vcpu.join().unwrap();
    }

    let unknown = pages - known.count_set();
    let known_zero = pages / 8;
    for index in 0..pages {
        let times = source.requested(index);
        if known.get(index) {
            assert_eq!(times, 0, "known page {index} reached the source");
        } else {
            assert_eq!(times, 1, "page {index} requested {times} times");
        }
    }
    assert!(memory.wait_complete(Duration::from_secs(10)));
    assert_eq!(memory.remaining(), 0);
    assert!(memory.pending().is_empty());
    let stats = memory.stats();
    assert_eq!(stats.requests, unknown);
    assert_eq!(stats.request_errors, 0);
    assert_eq!(stats.pages_demand, unknown);
    assert_eq!(stats.pages_pushed, 0);
    let zero_unknown = (0..pages).filter(|i| !known.get(*i) && i % 16 == 7).count() as u64;
    assert_eq!(
        stats.bytes_demand,
        (unknown - zero_unknown) * PAGE_SIZE as u64
    );
    assert!(stats.zero_local >= known_zero, "{stats:?}");
    assert_eq!(
        stats.faults,
        stats.requests + stats.duplicate_faults + stats.already_present + stats.zero_local,
        "{stats:?}"
    );
    assert_eq!(stats.latency.count, unknown);
    assert!(stats.latency.p50_us <= stats.latency.p99_us);
    assert!(stats.latency.p99_us <= stats.latency.max_us);
    eprintln!("stats: {stats:?}");

    handler.stop().unwrap();
    done.store(true, Ordering::SeqCst);
    responder.join().unwrap();
}

#[test]
fn background_push_during_faults_completes_and_accounts_every_page() {
    let map = Arc::new(Mapping::new(64 << 20));
    let pages = map.pages();
    let known = PageBitmap::new(pages);
    let Some(memory) = register(&map, &known) else {
        return;
    };
    let (source, requests) = TestSource::new(pages);
    let done = Arc::new(AtomicBool::new(false));
    let responder = spawn_responder(memory.clone(), requests, done.clone());
    let handler = memory.start(source.clone()).unwrap();

    let pusher = {
        let memory = memory.clone();
        thread::spawn(move || {
            let mut cursor = memory.next_missing(0);
            while let Some(index) = cursor {
                let page = source_page(index);
                let data = page.iter().any(|b| *b != 0).then_some(page.as_slice());
                memory.place(index, data, Placement::Push).unwrap();
                cursor = memory.next_missing(index + 1);
            }
        })
    };
    // The vCPUs walk from the far end, against the push order.
    let vcpus: Vec<_> = (0..2u64)
        .map(|vcpu| {
            let map = map.clone();
            thread::spawn(move || {
                for index in (0..pages).rev().skip(vcpu as usize * 17) {
                    assert_eq!(map.read_page(index), source_page(index), "page {index}");
                }
            })
        })
        .collect();
    for vcpu in vcpus {
        vcpu.join().unwrap();
    }
    pusher.join().unwrap();

    assert!(memory.wait_complete(Duration::from_secs(30)));
    assert!(memory.missing_pages().is_empty());
    let stats = memory.stats();
    assert_eq!(stats.pages_demand + stats.pages_pushed, pages, "{stats:?}");
    assert!(stats.pages_pushed > 0, "{stats:?}");
    for index in 0..pages {
        assert!(source.requested(index) <= 1, "page {index} requested twice");
    }
    eprintln!("stats: {stats:?}");

    handler.stop().unwrap();
    done.store(true, Ordering::SeqCst);
    responder.join().unwrap();
}

#[test]
fn failing_source_keeps_the_fault_pending_until_reissued_after_reconnect() {
    let map = Arc::new(Mapping::new(16 << 20));
    let pages = map.pages();
    let known = PageBitmap::new(pages);
    let Some(memory) = register(&map, &known) else {
        return;
    };
    let (broken, _dropped_requests) = TestSource::new(pages);
    broken.fail.store(true, Ordering::SeqCst);
    let handler = memory.start(broken.clone()).unwrap();

    let finished = Arc::new(AtomicBool::new(false));
    let vcpu = {
        let (map, finished) = (map.clone(), finished.clone());
        thread::spawn(move || {
            let page = map.read_page(5);
            finished.store(true, Ordering::SeqCst);
            page
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while memory.stats().request_errors == 0 {
        assert!(
            Instant::now() < deadline,
            "the fault never reached the source"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(memory.pending(), vec![5]);
    thread::sleep(Duration::from_millis(100));
    assert!(
        !finished.load(Ordering::SeqCst),
        "the vCPU ran on a missing page"
    );
    // Re-requesting while still down fails and keeps the page pending.
    assert!(memory.reissue_pending().is_err());
    assert_eq!(memory.pending(), vec![5]);

    // Reconnect: a new source, then re-request what is pending.
    let (source, requests) = TestSource::new(pages);
    let done = Arc::new(AtomicBool::new(false));
    let responder = spawn_responder(memory.clone(), requests, done.clone());
    memory.set_source(source.clone());
    assert_eq!(memory.reissue_pending().unwrap(), 1);

    assert_eq!(vcpu.join().unwrap(), source_page(5));
    assert_eq!(source.requested(5), 1);
    // The vCPU wakes inside `place`, just before the page is marked present.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !memory.pending().is_empty() {
        assert!(Instant::now() < deadline, "page 5 never left pending");
        thread::sleep(Duration::from_millis(1));
    }
    assert!(memory.is_present(5));
    let stats = memory.stats();
    assert_eq!(stats.request_errors, 2, "{stats:?}");
    assert_eq!(stats.latency.count, 1);
    assert!(stats.latency.max_us >= 100_000, "{stats:?}");

    handler.stop().unwrap();
    done.store(true, Ordering::SeqCst);
    responder.join().unwrap();
}

#[test]
fn handler_stops_cleanly_without_faults_and_can_restart() {
    let map = Mapping::new(16 << 20);
    let known = PageBitmap::new(map.pages());
    let Some(memory) = register(&map, &known) else {
        return;
    };
    let (source, _requests) = TestSource::new(map.pages());
    let handler = memory.start(source.clone()).unwrap();
    assert!(matches!(
        memory.start(source.clone()),
        Err(UffdError::AlreadyStarted)
    ));
    thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    handler.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));

    let again = memory.start(source).unwrap();
    drop(again);
    assert_eq!(memory.stats().faults, 0);
}

#[test]
fn place_rejects_bad_arguments_and_reports_pages_already_present() {
    let map = Mapping::new(16 << 20);
    let pages = map.pages();
    let known = PageBitmap::new(pages);
    known.set(3);
    let Some(memory) = register(&map, &known) else {
        return;
    };
    assert_eq!(memory.remaining(), pages - 1);
    assert!(matches!(
        memory.place(pages, None, Placement::Push),
        Err(UffdError::OutOfRange { .. })
    ));
    assert!(matches!(
        memory.place(0, Some(&[1u8; 100]), Placement::Push),
        Err(UffdError::BadLength(100))
    ));
    // A known page is present: placing it is a no-op.
    assert!(!memory
        .place(3, Some(&source_page(3)), Placement::Push)
        .unwrap());
    // Placing before any fault needs no handler; the second placement is redundant.
    assert!(memory
        .place(1, Some(&source_page(1)), Placement::Push)
        .unwrap());
    assert!(!memory.place(1, None, Placement::Push).unwrap());
    assert!(memory.place(2, None, Placement::Demand).unwrap());
    assert_eq!(map.read_page(1), source_page(1));
    assert_eq!(map.read_page(2), vec![0; PAGE_SIZE]);
    assert_eq!(memory.missing_pages().first(), Some(&0));
    assert_eq!(memory.next_missing(1), Some(4));
    assert_eq!(memory.remaining(), pages - 3);
    let stats = memory.stats();
    assert_eq!(stats.redundant_places, 2);
    assert_eq!(
        (stats.pages_pushed, stats.bytes_pushed),
        (1, PAGE_SIZE as u64)
    );
    assert_eq!((stats.pages_demand, stats.bytes_demand), (1, 0));
    assert!(!memory.wait_complete(Duration::from_millis(10)));
}

#[test]
fn register_rejects_unaligned_regions_and_mismatched_known_sets() {
    let map = Mapping::new(1 << 20);
    let known = PageBitmap::new(map.pages());
    // SAFETY: the ranges lie inside a live private anonymous mapping; registration fails
    // before touching them.
    let unaligned = unsafe { PostcopyMemory::register(map.base.add(1), PAGE_SIZE, &known) };
    assert!(matches!(unaligned, Err(UffdError::Unaligned { .. })));
    let short = PageBitmap::new(map.pages() - 1);
    // SAFETY: as above.
    let mismatched = unsafe { PostcopyMemory::register(map.base, map.len, &short) };
    assert!(matches!(
        mismatched,
        Err(UffdError::KnownSizeMismatch { .. })
    ));
}

#[test]
fn fault_queued_while_no_handler_runs_is_served_by_the_next_handler() {
    let map = Arc::new(Mapping::new(16 << 20));
    let pages = map.pages();
    let known = PageBitmap::new(pages);
    let Some(memory) = register(&map, &known) else {
        return;
    };
    let (source, requests) = TestSource::new(pages);
    memory.start(source.clone()).unwrap().stop().unwrap();

    let vcpu = {
        let map = map.clone();
        thread::spawn(move || map.read_page(42))
    };
    thread::sleep(Duration::from_millis(50));
    assert_eq!(source.requested(42), 0);

    let done = Arc::new(AtomicBool::new(false));
    let responder = spawn_responder(memory.clone(), requests, done.clone());
    let handler = memory.start(source.clone()).unwrap();
    assert_eq!(vcpu.join().unwrap(), source_page(42));
    assert_eq!(source.requested(42), 1);

    handler.stop().unwrap();
    done.store(true, Ordering::SeqCst);
    responder.join().unwrap();
}

#[test]
fn completed_memory_unregisters_and_behaves_as_plain_memory() {
    let map = Mapping::new(16 << 20);
    let known = PageBitmap::new(map.pages());
    let Some(memory) = register(&map, &known) else {
        return;
    };
    for index in 0..map.pages() {
        let page = source_page(index);
        let data = page.iter().any(|b| *b != 0).then_some(page.as_slice());
        assert!(memory.place(index, data, Placement::Push).unwrap());
    }
    assert!(memory.wait_complete(Duration::ZERO));
    memory.unregister().unwrap();
    memory.unregister().unwrap();
    map.write_byte(9, 0, 0xAB);
    let mut expected = source_page(9);
    expected[0] = 0xAB;
    assert_eq!(map.read_page(9), expected);
    assert_eq!(memory.stats().pages_pushed, map.pages());
}
