//! Real-KVM tests of the virtio-blk disk: the `disk` guest driving it, and a driver written
//! here (through the same MMIO entry points the vCPU exits use) for the requests no sane guest
//! program sends: past the end, outside guest memory, unsupported.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;

use crate::dirty::DirtyTracking;
use crate::guest::layout::{self, PAGE_SIZE};
use crate::guest::{param, Program};
use crate::vm::{Vm, VmSpec};

const BLOCK: u64 = layout::disk::BLOCK;

fn spec(programs: Vec<Program>, first: u64, blocks: u64) -> VmSpec {
    VmSpec {
        memory: 64 << 20,
        programs,
        dirty_bytes: 1 << 20,
        dirty_rate: 0,
        dirty_tracking: DirtyTracking::Auto,
        disk_rate: 0,
        disk_first_block: first,
        disk_blocks: blocks,
    }
}

fn image(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The stamp (block number, generation) in the first 16 bytes of block `b` of the image,
/// and whether the rest of the block is zero.
fn stamp(file: &std::fs::File, b: u64) -> (u64, u64, bool) {
    let mut buf = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut buf, b * BLOCK).unwrap();
    let n = u64::from_le_bytes(buf[0..8].try_into().unwrap());
    let g = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    (n, g, buf[16..].iter().all(|&x| x == 0))
}

fn param_of(vm: &Vm, vcpu: u32, off: u8) -> u64 {
    vm.ram()
        .read_u64(layout::params(vcpu) + off as u64)
        .unwrap()
}

/// Copies every non-zero page of `from` into `to` (both paused).
fn copy_memory(from: &Vm, to: &Vm) {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for i in 0..from.ram().pages() {
        if !from.ram().is_zero_page(i) {
            from.ram().read_page(i, &mut page).unwrap();
            to.ram().write(i * PAGE_SIZE, &page).unwrap();
        }
    }
}

#[test]
fn guest_writes_land_in_the_image_at_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    // Blocks 16..80 of the 256 in the image.
    let vm = Vm::create(
        &spec(vec![Program::Disk], 16, 64),
        "d",
        Box::new(std::io::sink()),
    )
    .unwrap();
    vm.attach_disk(&path, "d").unwrap();
    vm.boot("d").unwrap();
    vm.resume();
    wait_for("three passes over the region", 60, || {
        let s = vm.stats();
        assert_eq!(s.disk_failures, 0, "the guest's check failed");
        s.disk_generation >= 3
    });
    vm.pause();
    let s = vm.stats();
    assert!(s.disk_blocks_verified >= 2 * 64, "{s:?}");
    let generation = param_of(&vm, 0, param::DISK_GEN);
    let at = param_of(&vm, 0, param::DISK_BLOCK);
    let file = std::fs::File::open(&path).unwrap();
    for b in 0..256 {
        let (n, g, rest_zero) = stamp(&file, b);
        if !(16..80).contains(&b) {
            assert_eq!(
                (n, g, rest_zero),
                (0, 0, true),
                "block {b} outside the region"
            );
            continue;
        }
        assert_eq!(n, b, "block {b} holds block {n}'s stamp");
        assert!(rest_zero, "block {b}: bytes after the stamp");
        // Blocks before the guest's position are of this pass; after it, of the last one;
        // the block it is at is either.
        let want: &[u64] = match b.cmp(&at) {
            std::cmp::Ordering::Less => &[generation],
            std::cmp::Ordering::Greater => &[generation - 1],
            std::cmp::Ordering::Equal => &[generation - 1, generation],
        };
        assert!(
            want.contains(&g),
            "block {b}: generation {g}, want {want:?} (at {at})"
        );
    }
    let blk = vm.devices().blk().unwrap();
    assert!(
        blk.counters()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_eq!(
        blk.counters()
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        blk.driver_features(),
        1 << VIRTIO_F_VERSION_1,
        "the guest accepts VERSION_1 only"
    );
}

/// The saved state is taken with a request possibly in flight (the pause drains it); a
/// fresh VM restored from it on the same image goes on, and the guest's own checks (the read
/// back, and each block still holding the previous pass's stamp) keep passing.
#[test]
fn save_restore_in_the_middle_of_disk_io_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    let s = spec(vec![Program::Disk, Program::Counter], 0, 32);
    let mut vm = Vm::create(&s, "a", Box::new(std::io::sink())).unwrap();
    vm.attach_disk(&path, "a").unwrap();
    vm.boot("a").unwrap();
    vm.resume();
    wait_for("the first pass", 60, || vm.stats().disk_generation >= 2);
    for hop in 0..4 {
        // Pause at some point of the guest's I/O; a different one each hop.
        std::thread::sleep(Duration::from_millis(7 + 13 * hop));
        vm.pause();
        let before = vm.stats();
        assert_eq!(before.disk_failures, 0);
        let state = vm.paused().expect("paused").save().unwrap();
        let blk = state.devices.blk.expect("the disk state is saved");
        assert_eq!(
            blk.mmio.queue.next_avail, blk.mmio.queue.next_used,
            "drained"
        );
        assert!(blk.mmio.queue.ready);
        let next = Vm::create(&s, "b", Box::new(std::io::sink())).unwrap();
        next.attach_disk(&path, "b").unwrap();
        copy_memory(&vm, &next);
        next.restore(&state, Box::new(std::io::sink())).unwrap();
        drop(vm);
        next.resume();
        // A whole pass on the new VM: every block checked against its previous stamp.
        wait_for("a pass after the restore", 60, || {
            let st = next.stats();
            assert_eq!(st.disk_failures, 0, "hop {hop}: a write was lost");
            st.disk_blocks_verified >= 40
        });
        vm = next;
    }
    vm.pause();
    let generation = param_of(&vm, 0, param::DISK_GEN);
    let file = std::fs::File::open(&path).unwrap();
    for b in 0..32 {
        let (n, g, _) = stamp(&file, b);
        assert_eq!(n, b);
        assert!(
            g + 1 >= generation && g <= generation,
            "block {b}: {g} vs {generation}"
        );
    }
}

/// A driver in the test: queue at 2 MiB, request `i` uses descriptors 3i..3i+2 and a
/// buffer page pair at 2 MiB + 64 KiB + 8 KiB·i (header and status, then the data block).
struct Driver<'a> {
    vm: &'a Vm,
    size: u16,
    avail: u16,
}

const Q: u64 = 2 << 20;

impl<'a> Driver<'a> {
    fn w(&self, reg: u32, v: u32) {
        self.vm
            .devices()
            .mmio_write(layout::VIRTIO_MMIO + reg as u64, &v.to_le_bytes());
    }

    fn r(&self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.vm
            .devices()
            .mmio_read(layout::VIRTIO_MMIO + reg as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Probes and sets the device up with a queue of `size`.
    fn init(vm: &'a Vm, size: u16) -> Self {
        let d = Driver { vm, size, avail: 0 };
        assert_eq!(d.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.r(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK_U32);
        d.w(VIRTIO_MMIO_STATUS, 0);
        d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        d.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        d.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = d.r(VIRTIO_MMIO_DEVICE_FEATURES);
        assert!(low & (1 << VIRTIO_BLK_F_FLUSH) != 0, "flush offered");
        d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        d.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        d.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        d.w(VIRTIO_MMIO_STATUS, s);
        assert_eq!(d.r(VIRTIO_MMIO_STATUS), s, "features accepted");
        d.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX) >= size as u32);
        d.w(VIRTIO_MMIO_QUEUE_NUM, size as u32);
        d.w(VIRTIO_MMIO_QUEUE_DESC_LOW, Q as u32);
        d.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (Q + 0x1000) as u32);
        d.w(VIRTIO_MMIO_QUEUE_USED_LOW, (Q + 0x2000) as u32);
        d.w(VIRTIO_MMIO_QUEUE_READY, 1);
        d.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(d.r(VIRTIO_MMIO_STATUS), s | VIRTIO_CONFIG_S_DRIVER_OK);
        d
    }

    fn buf(i: u16) -> u64 {
        Q + 0x10000 + 0x2000 * i as u64
    }

    fn desc(&self, n: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.vm.ram().write(Q + 16 * n as u64, &d).unwrap();
    }

    /// Puts request `i` in the available ring (no notify): `kind` at `sector`, with a data
    /// buffer of `len` bytes at `data` (default: its own block), device-writable for reads.
    fn queue(&mut self, i: u16, kind: u32, sector: u64, len: u32, data: Option<u64>) {
        let ram = self.vm.ram();
        let b = Self::buf(i);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write(b, &h).unwrap();
        ram.write(b + 0x10, &[0xee]).unwrap();
        let write = if kind == VIRTIO_BLK_T_OUT {
            0
        } else {
            VRING_DESC_F_WRITE_U32
        };
        let head = 3 * i;
        self.desc(head, b, 16, VRING_DESC_F_NEXT_U32, head + 1);
        self.desc(
            head + 1,
            data.unwrap_or(b + 0x1000),
            len,
            VRING_DESC_F_NEXT_U32 | write,
            head + 2,
        );
        self.desc(head + 2, b + 0x10, 1, VRING_DESC_F_WRITE_U32, 0);
        let slot = Q + 0x1000 + 4 + 2 * (self.avail % self.size) as u64;
        ram.write(slot, &head.to_le_bytes()).unwrap();
        self.avail = self.avail.wrapping_add(1);
        ram.write(Q + 0x1000 + 2, &self.avail.to_le_bytes())
            .unwrap();
    }

    fn notify(&self) {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.vm.ram().read(Q + 0x2000 + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Notifies and waits until every queued request is used.
    fn run(&self) {
        self.notify();
        wait_for("requests completed", 10, || self.used_idx() == self.avail);
    }

    fn status(&self, i: u16) -> u8 {
        let mut b = [0u8; 1];
        self.vm.ram().read(Self::buf(i) + 0x10, &mut b).unwrap();
        b[0]
    }

    fn data(&self, i: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.vm.ram().read(Self::buf(i) + 0x1000, &mut b).unwrap();
        b
    }
}

const VIRTIO_ID_BLOCK_U32: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
const VRING_DESC_F_NEXT_U32: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
const VRING_DESC_F_WRITE_U32: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

fn idle_vm_with_disk(dir: &Path, bytes: u64) -> (Vm, std::path::PathBuf) {
    let path = image(dir, bytes);
    let vm = Vm::create(
        &spec(vec![Program::Idle], 0, 0),
        "t",
        Box::new(std::io::sink()),
    )
    .unwrap();
    vm.attach_disk(&path, "serial-t").unwrap();
    (vm, path)
}

#[test]
fn requests_are_served_and_bounds_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, path) = idle_vm_with_disk(dir.path(), 64 << 10); // 128 sectors
    let mut d = Driver::init(&vm, 32);
    let last = 128 - 8;
    vm.ram()
        .write(Driver::buf(0) + 0x1000, &[0xab; 4096])
        .unwrap();
    d.queue(0, VIRTIO_BLK_T_OUT, last, 4096, None);
    // Straddles the end by one sector; and a sector number that overflows.
    vm.ram()
        .write(Driver::buf(1) + 0x1000, &[0xcd; 4096])
        .unwrap();
    d.queue(1, VIRTIO_BLK_T_OUT, last + 1, 4096, None);
    d.queue(2, VIRTIO_BLK_T_IN, u64::MAX - 3, 4096, None);
    // Not a whole number of sectors.
    d.queue(3, VIRTIO_BLK_T_IN, 0, 100, None);
    // A data buffer outside guest memory.
    d.queue(4, VIRTIO_BLK_T_IN, 0, 4096, Some(vm.ram().size() - 100));
    d.queue(5, VIRTIO_BLK_T_GET_ID, 0, 20, None);
    d.queue(6, VIRTIO_BLK_T_FLUSH, 0, 0, None);
    d.queue(7, 0x77, 0, 512, None);
    d.queue(8, VIRTIO_BLK_T_IN, last, 4096, None);
    d.run();
    assert_eq!(d.status(0), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.status(1), VIRTIO_BLK_S_IOERR as u8, "past the end");
    assert_eq!(d.status(2), VIRTIO_BLK_S_IOERR as u8, "overflowing sector");
    assert_eq!(d.status(3), VIRTIO_BLK_S_IOERR as u8, "partial sector");
    assert_eq!(d.status(4), 0xee, "no status written for a bad buffer");
    assert_eq!(d.status(5), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&d.data(5, 20)[..8], b"serial-t");
    assert_eq!(d.status(6), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.status(7), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(d.status(8), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.data(8, 4096), vec![0xab; 4096], "read back the write");
    // The file: the last block written, nothing of the refused write anywhere.
    let img = std::fs::read(&path).unwrap();
    assert_eq!(img.len(), 64 << 10, "the image did not grow");
    assert!(img[..(last * 512) as usize].iter().all(|&b| b == 0));
    assert!(img[(last * 512) as usize..].iter().all(|&b| b == 0xab));
    let c = vm.devices().blk().unwrap().counters();
    assert_eq!(c.flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The used ring names each request with the bytes written into its buffers.
    let mut used = [0u8; 8];
    vm.ram().read(Q + 0x2000 + 4 + 8 * 8, &mut used).unwrap();
    assert_eq!(u32::from_le_bytes(used[0..4].try_into().unwrap()), 24);
    assert_eq!(u32::from_le_bytes(used[4..8].try_into().unwrap()), 4097);
}

#[test]
fn features_without_version_1_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = idle_vm_with_disk(dir.path(), 64 << 10);
    let d = Driver {
        vm: &vm,
        size: 8,
        avail: 0,
    };
    d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    d.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    d.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        d.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0,
        "a legacy driver is refused"
    );
    // Capacity in the config space, in sectors.
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG), 128);
}

/// Requests queued and notified, then the VM paused: every one is complete in the used
/// ring and in the file when the state is saved. Requests queued and not yet notified stay in
/// the available ring: a fresh VM restored from the state serves them on the next notify.
#[test]
fn save_restore_with_queued_requests_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let (a, path) = idle_vm_with_disk(dir.path(), 1 << 20);
    let mut d = Driver::init(&a, 128);
    for i in 0..24u16 {
        let fill = vec![i as u8 + 1; 4096];
        a.ram().write(Driver::buf(i) + 0x1000, &fill).unwrap();
        d.queue(i, VIRTIO_BLK_T_OUT, 8 * i as u64, 4096, None);
    }
    d.notify();
    a.pause();
    let st = a.paused().expect("paused").save().unwrap();
    let q = st.devices.blk.unwrap().mmio.queue;
    assert_eq!(
        (q.next_avail, q.next_used),
        (24, 24),
        "all taken and completed"
    );
    assert_eq!(d.used_idx(), 24);
    let file = std::fs::File::open(&path).unwrap();
    for i in 0..24u64 {
        let mut b = vec![0u8; 4096];
        file.read_exact_at(&mut b, i * 4096).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "block {i}");
    }
    // Eight more, queued but not notified, then save again and restore elsewhere.
    for i in 24..32u16 {
        a.ram()
            .write(Driver::buf(i) + 0x1000, &vec![i as u8 + 1; 4096])
            .unwrap();
        d.queue(i, VIRTIO_BLK_T_OUT, 8 * i as u64, 4096, None);
    }
    let st = a.paused().expect("paused").save().unwrap();
    let b = Vm::create(
        &spec(vec![Program::Idle], 0, 0),
        "b",
        Box::new(std::io::sink()),
    )
    .unwrap();
    b.attach_disk(&path, "serial-b").unwrap();
    copy_memory(&a, &b);
    b.restore(&st, Box::new(std::io::sink())).unwrap();
    assert_eq!(
        b.paused().expect("paused").save().unwrap().devices.blk,
        st.devices.blk,
        "the state round-trips"
    );
    drop(a);
    let mut d = Driver {
        vm: &b,
        size: 128,
        avail: 32,
    };
    d.run();
    for i in 24..32 {
        assert_eq!(d.status(i), VIRTIO_BLK_S_OK as u8);
    }
    let img = std::fs::read(&path).unwrap();
    let want: Vec<u8> = (0..32u8)
        .flat_map(|i| std::iter::repeat_n(i + 1, 4096))
        .chain(std::iter::repeat_n(0, (1 << 20) - 32 * 4096))
        .collect();
    assert_eq!(
        blake3::hash(&img),
        blake3::hash(&want),
        "every block of both batches is in the image"
    );
    // One more request on the restored queue reads back a block of the first batch.
    d.queue(40, VIRTIO_BLK_T_IN, 8 * 3, 4096, None);
    d.run();
    assert_eq!(d.data(40, 4096), vec![4; 4096]);
}

/// A saved state whose guest uses its disk cannot be restored into a VM without one.
#[test]
fn restore_of_a_disk_in_use_needs_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = idle_vm_with_disk(dir.path(), 64 << 10);
    let _d = Driver::init(&a, 8);
    a.pause();
    let st = a.paused().expect("paused").save().unwrap();
    let b = Vm::create(
        &spec(vec![Program::Idle], 0, 0),
        "b",
        Box::new(std::io::sink()),
    )
    .unwrap();
    let e = b.restore(&st, Box::new(std::io::sink())).unwrap_err();
    assert!(
        matches!(e, crate::vm::VmError::Disk(super::blk::BlkError::NoDisk)),
        "{e}"
    );
}

/// The written-block log marks what the guest writes (and nothing it reads), once per block
/// however often it is written, from `start_block_log` until `stop_block_log`.
#[test]
fn written_blocks_are_logged_for_a_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = idle_vm_with_disk(dir.path(), 1 << 20);
    let mut d = Driver::init(&vm, 32);
    let blk = vm.devices().blk().unwrap();
    d.queue(0, VIRTIO_BLK_T_OUT, 8, 4096, None);
    d.run();
    assert!(
        blk.take_written_blocks().is_empty(),
        "no log before the start"
    );
    blk.start_block_log(4096);
    d.queue(1, VIRTIO_BLK_T_OUT, 3 * 8, 4096, None);
    d.queue(2, VIRTIO_BLK_T_OUT, 7 * 8, 4096, None);
    d.queue(3, VIRTIO_BLK_T_OUT, 7 * 8, 4096, None);
    // 4 KiB from the last sector of block 99 into block 100.
    d.queue(4, VIRTIO_BLK_T_OUT, 100 * 8 - 1, 4096, None);
    d.queue(5, VIRTIO_BLK_T_IN, 50 * 8, 4096, None);
    d.queue(6, VIRTIO_BLK_T_OUT, (1 << 20) / 512, 4096, None); // past the end: refused
    d.run();
    assert_eq!(blk.take_written_blocks(), vec![3, 7, 99, 100]);
    assert!(blk.take_written_blocks().is_empty(), "a take clears");
    blk.stop_block_log();
    d.queue(7, VIRTIO_BLK_T_OUT, 9 * 8, 4096, None);
    d.run();
    assert!(
        blk.take_written_blocks().is_empty(),
        "no log after the stop"
    );
}

/// A released image is flushed and closed (no descriptor of this process names it), requests
/// meanwhile fail cleanly, and a reacquired image (at its new path if it moved) serves them
/// again.
#[test]
fn a_released_image_is_closed_and_can_be_reacquired() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, path) = idle_vm_with_disk(dir.path(), 64 << 10);
    let mut d = Driver::init(&vm, 32);
    let blk = vm.devices().blk().unwrap();
    let open_fds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l == &path)
            .count()
    };
    assert_eq!(open_fds(), 1);
    vm.ram()
        .write(Driver::buf(0) + 0x1000, &[0x5a; 4096])
        .unwrap();
    d.queue(0, VIRTIO_BLK_T_OUT, 0, 4096, None);
    d.run();
    blk.release().unwrap();
    assert!(!blk.is_open());
    assert_eq!(open_fds(), 0, "the image is closed");
    assert!(std::fs::read(&path).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0x5a));
    d.queue(1, VIRTIO_BLK_T_IN, 0, 4096, None);
    d.run();
    assert_eq!(d.status(1), VIRTIO_BLK_S_IOERR as u8);
    // The image moved meanwhile (a folder renamed): the reopen follows it.
    let moved = dir.path().join("moved.img");
    std::fs::rename(&path, &moved).unwrap();
    blk.moved_to(&moved);
    blk.reacquire().unwrap();
    assert_eq!(blk.path(), moved);
    d.queue(2, VIRTIO_BLK_T_IN, 0, 4096, None);
    d.run();
    assert_eq!(d.status(2), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.data(2, 4096), vec![0x5a; 4096]);
}
