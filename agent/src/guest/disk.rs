//! `disk`: a minimal virtio-blk driver over virtio-mmio, and a self-checking block writer.
//!
//! Registers: rsi = parameter page, rbx = the device's registers, rbp = the driver area
//! ([`layout::disk::AREA`]). One request is in flight at a time, always the same
//! three-descriptor chain (header → one 4 KiB block → status byte) at descriptor 0, so every
//! available-ring slot holds 0 (guest memory starts zeroed) and a request is: fill the header,
//! set the data descriptor's direction, bump the available index, notify, poll the used index,
//! check the status byte.
//!
//! Each pass (generation g) goes over blocks [DISK_FIRST, DISK_END): when g > 1, read the block
//! and check it holds (block, g - 1); write (block, g) in its first 16 bytes; wipe the buffer's
//! stamp; read the block back and check it holds (block, g); report on [`PORT_DISK`]. Each pass
//! ends with a flush. Any failed check or request status goes to [`PORT_DISK_FAIL`] and stops.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as WRITE};

use super::asm::Asm;
use super::layout::disk::{AREA, AVAIL, BLOCK, DATA, DESC, HEADER, QUEUE_SIZE, STATUS, USED};
use super::{param, PORT_DISK, PORT_DISK_FAIL};

/// Offset of the available ring's `idx`.
const AVAIL_IDX: u32 = AVAIL + 2;
/// Offset of the used ring's `idx`.
const USED_IDX: u32 = USED + 2;
/// Offset of descriptor 1's `flags` (the data buffer's direction).
const DATA_FLAGS: u32 = DESC + 16 + 12;

pub(super) fn disk(a: &mut Asm) {
    a.load_rbx(param::DISK_MMIO);
    a.mov_ebp_imm(AREA as u32);
    init_device(a);
    a.label("pass");
    a.load_rcx(param::DISK_GEN);
    a.inc_rcx();
    a.store_rcx(param::DISK_GEN);
    a.load_rax(param::DISK_FIRST);
    a.store_rax(param::DISK_BLOCK);
    a.label("block");
    // A block of the previous pass must still hold that pass's stamp.
    a.load_rcx(param::DISK_GEN);
    a.dec_rcx();
    a.jz("fresh");
    a.mov_eax_imm(VIRTIO_BLK_T_IN);
    a.mov_ecx_imm(NEXT | WRITE);
    a.call("request");
    a.load_rax(param::DISK_BLOCK);
    a.load_rcx(param::DISK_GEN);
    a.dec_rcx();
    a.call("check");
    a.label("fresh");
    a.load_rax(param::DISK_BLOCK);
    a.store_rax_rbp(DATA);
    a.load_rcx(param::DISK_GEN);
    a.store_rcx_rbp(DATA + 8);
    a.mov_eax_imm(VIRTIO_BLK_T_OUT);
    a.mov_ecx_imm(NEXT);
    a.call("request");
    // Wipe the stamp: a read that brings nothing back cannot pass.
    a.mov_rax_imm_sx(-1);
    a.store_rax_rbp(DATA);
    a.mov_eax_imm(VIRTIO_BLK_T_IN);
    a.mov_ecx_imm(NEXT | WRITE);
    a.call("request");
    a.load_rax(param::DISK_BLOCK);
    a.load_rcx(param::DISK_GEN);
    a.call("check");
    a.mov_edx_imm(PORT_DISK as u32);
    a.out_dx_eax();
    a.load_rax(param::DISK_BLOCK);
    a.inc_rax();
    a.store_rax(param::DISK_BLOCK);
    a.cmp_rax_param(param::DISK_END);
    a.jnz_near("block");
    // The data descriptor rides along with the flush; the device ignores it.
    a.mov_eax_imm(VIRTIO_BLK_T_FLUSH);
    a.mov_ecx_imm(NEXT);
    a.call("request");
    a.jmp_near("pass");

    request(a);

    // check: rax = the block, rcx = the generation the buffer must hold.
    a.label("check");
    a.cmp_rax_rbp(DATA);
    a.jnz_near("fail");
    a.cmp_rcx_rbp(DATA + 8);
    a.jnz_near("fail");
    a.ret();

    a.label("fail");
    a.load_rax(param::DISK_BLOCK);
    a.mov_edx_imm(PORT_DISK_FAIL as u32);
    a.out_dx_eax();
    a.label("stop");
    a.hlt();
    a.jmp("stop");
}

/// Reset, handshake, features (VERSION_1 only), the queue, DRIVER_OK.
fn init_device(a: &mut Asm) {
    let mmio = |a: &mut Asm, reg: u32, v: u32| a.store32_rbx_imm(reg, v);
    mmio(a, VIRTIO_MMIO_STATUS, 0);
    mmio(a, VIRTIO_MMIO_STATUS, ACK);
    mmio(a, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    mmio(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio(
        a,
        VIRTIO_MMIO_DRIVER_FEATURES,
        1 << (VIRTIO_F_VERSION_1 - 32),
    );
    mmio(a, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio(a, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    mmio(a, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    a.load_eax_rbx(VIRTIO_MMIO_STATUS);
    a.test_eax_imm(FEATURES_OK);
    a.jz_near("fail");
    // The chain: header (device-readable) → block → status (device-writable).
    descriptor(a, 0, HEADER, 16, NEXT, 1);
    descriptor(a, 1, DATA, BLOCK as u32, NEXT, 2);
    descriptor(a, 2, STATUS, 1, WRITE, 0);
    mmio(a, VIRTIO_MMIO_QUEUE_SEL, 0);
    mmio(a, VIRTIO_MMIO_QUEUE_NUM, QUEUE_SIZE as u32);
    mmio(a, VIRTIO_MMIO_QUEUE_DESC_LOW, AREA as u32 + DESC);
    mmio(a, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    mmio(a, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AREA as u32 + AVAIL);
    mmio(a, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    mmio(a, VIRTIO_MMIO_QUEUE_USED_LOW, AREA as u32 + USED);
    mmio(a, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    mmio(a, VIRTIO_MMIO_QUEUE_READY, 1);
    mmio(
        a,
        VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

/// Writes descriptor `i`: a buffer at `AREA + off` of `len` bytes.
fn descriptor(a: &mut Asm, i: u32, off: u32, len: u32, flags: u32, next: u16) {
    a.mov_rax_imm64(AREA + off as u64);
    a.store_rax_rbp(DESC + 16 * i);
    a.mov_rax_imm64(len as u64 | (flags as u64) << 32 | (next as u64) << 48);
    a.store_rax_rbp(DESC + 16 * i + 8);
}

/// request: eax = request type, cx = flags of the data descriptor; the sector is the
/// current block's. Returns when the device has completed it with status OK.
fn request(a: &mut Asm) {
    a.label("request");
    a.store_eax_rbp(HEADER);
    a.store_cx_rbp(DATA_FLAGS);
    a.load_rdx(param::DISK_BLOCK);
    a.shl_rdx((BLOCK / 512).trailing_zeros() as u8);
    a.store_rdx_rbp(HEADER + 8);
    a.store8_rbp_imm(STATUS, 0xff);
    a.inc16_rbp(AVAIL_IDX);
    a.store32_rbx_imm(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    a.label("wait");
    a.load16_eax_rbp(USED_IDX);
    a.cmp_ax_rbp(AVAIL_IDX);
    a.jnz("wait");
    a.cmp8_rbp_imm(STATUS, 0);
    a.jnz_near("fail");
    a.ret();
}
