//! Guest programs the VMM boots: small 64-bit long-mode programs encoded here in Rust.
//!
//! Every vCPU starts in long mode at the entry of its own program with `rsi` pointing at its
//! parameter page. The programs talk to the VMM through port I/O only:
//! - `idle`: prints its banner, then `hlt` in a loop;
//! - `dirty`: writes the pass number into every page of its working set, pass after pass, and
//!   reports each batch on [`PORT_DIRTY_BATCH`] so the VMM can hold it to a chosen rate;
//! - `noise`: `dirty` over a working set the VMM fills with pseudo-random bytes at boot, so
//!   its pages do not compress (the pass number overwrites only each page's first 8 bytes);
//! - `counter`: increments a counter kept twice in memory, checks both copies agree before each
//!   step (so a page lost or torn by a migration is caught by the guest itself), and reports
//!   progress on [`PORT_COUNTER`], or a failed check on [`PORT_COUNTER_FAIL`];
//! - `disk`: drives the virtio-blk disk (virtio-mmio) and writes every block of its region,
//!   pass after pass, each stamped with its block number and the pass (generation); reads
//!   each back and checks the stamp, and before overwriting a block checks it still holds
//!   the previous pass's stamp (so a write lost by a migration is caught by the guest);
//!   reports each block on [`PORT_DISK`], or a failure on [`PORT_DISK_FAIL`].

mod asm;
mod disk;
pub mod layout;

use serde::{Deserialize, Serialize};

use asm::Asm;

/// Serial console data port (COM1).
pub const PORT_SERIAL: u16 = 0x3f8;
/// `dirty` reports one finished batch of pages here.
pub const PORT_DIRTY_BATCH: u16 = 0x510;
/// `counter` reports its low 32 bits here every [`COUNTER_REPORT_EVERY`] steps.
pub const PORT_COUNTER: u16 = 0x511;
/// `counter` writes here when its self-check fails.
pub const PORT_COUNTER_FAIL: u16 = 0x512;
/// `disk` reports each block it wrote and read back here.
pub const PORT_DISK: u16 = 0x513;
/// `disk` writes here (the block number) when a check or a request fails.
pub const PORT_DISK_FAIL: u16 = 0x514;
/// The counter reports once every this many increments.
pub const COUNTER_REPORT_EVERY: u64 = 1024;

/// Offsets inside a vCPU's parameter page.
pub mod param {
    /// Guest-physical base of the `dirty` working set.
    pub const WS_BASE: u8 = 0x08;
    /// Number of 4 KiB pages in the working set.
    pub const WS_PAGES: u8 = 0x10;
    /// Pages written between two reports on the batch port.
    pub const BATCH: u8 = 0x18;
    /// Pass number of `dirty` (written into every page).
    pub const PASS: u8 = 0x20;
    /// The counter of `counter`.
    pub const COUNTER: u8 = 0x28;
    /// Its check copy.
    pub const COUNTER_CHECK: u8 = 0x30;
    /// Guest-physical base of the virtio-mmio disk's registers (for `disk`).
    pub const DISK_MMIO: u8 = 0x38;
    /// First block (4 KiB) of the `disk` region.
    pub const DISK_FIRST: u8 = 0x40;
    /// One past its last block.
    pub const DISK_END: u8 = 0x48;
    /// Generation (pass) of `disk`: written into every block of this pass.
    pub const DISK_GEN: u8 = 0x50;
    /// The block `disk` is at.
    pub const DISK_BLOCK: u8 = 0x58;
    /// NUL-terminated banner printed on the serial console at start.
    pub const BANNER: u32 = 0x100;
}

/// What one vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Program {
    /// A `hlt` loop.
    Idle,
    /// Writes every page of a working set, pass after pass.
    Dirty,
    /// A self-checking counter.
    Counter,
    /// Writes every page of its working set once, then idles (`hlt`).
    Fill,
    /// Writes and checks blocks of the virtio-blk disk.
    Disk,
    /// `Dirty` over a working set of random bytes (incompressible pages).
    Noise,
}

impl Program {
    /// All programs, in the order of their code in guest memory.
    pub const ALL: [Program; 6] = [
        Program::Idle,
        Program::Dirty,
        Program::Counter,
        Program::Fill,
        Program::Disk,
        Program::Noise,
    ];

    /// The name used in VM definitions.
    pub fn name(self) -> &'static str {
        match self {
            Program::Idle => "idle",
            Program::Dirty => "dirty",
            Program::Counter => "counter",
            Program::Fill => "fill",
            Program::Disk => "disk",
            Program::Noise => "noise",
        }
    }

    /// Parses a name from a VM definition.
    pub fn parse(s: &str) -> Option<Program> {
        Program::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Whether the program writes a working set (and needs one in guest memory).
    pub fn uses_working_set(self) -> bool {
        matches!(self, Program::Dirty | Program::Fill | Program::Noise)
    }

    /// Guest-physical address of the program's entry point.
    pub fn entry(self) -> u64 {
        layout::CODE + 0x400 * (self as u64)
    }

    /// The program's machine code.
    pub fn code(self) -> Vec<u8> {
        let mut a = Asm::default();
        print_banner(&mut a);
        match self {
            Program::Idle => {
                a.label("idle");
                a.hlt();
                a.jmp("idle");
            }
            Program::Dirty | Program::Noise => dirty(&mut a),
            Program::Counter => counter(&mut a),
            Program::Fill => fill(&mut a),
            Program::Disk => disk::disk(&mut a),
        }
        a.finish()
    }
}

/// Prints the NUL-terminated banner of the parameter page on the serial port.
fn print_banner(a: &mut Asm) {
    a.lea_rbx_rsi(param::BANNER);
    a.mov_edx_imm(PORT_SERIAL as u32);
    a.label("print");
    a.mov_al_at_rbx();
    a.test_al_al();
    a.jz("printed");
    a.out_dx_al();
    a.inc_rbx();
    a.jmp("print");
    a.label("printed");
}

/// Starts a pass over the working set: rdi = its base, rcx = its pages, rax = PASS + 1
/// (stored back), the value every page of this pass gets.
fn begin_pass(a: &mut Asm) {
    a.load_rdi(param::WS_BASE);
    a.load_rcx(param::WS_PAGES);
    a.load_rax(param::PASS);
    a.inc_rax();
    a.store_rax(param::PASS);
}

fn dirty(a: &mut Asm) {
    a.load_r8(param::BATCH);
    a.label("pass");
    begin_pass(a);
    a.label("page");
    a.store_rax_at_rdi();
    a.add_rdi_page();
    a.dec_r8();
    a.jnz("no_report");
    a.load_r8(param::BATCH);
    a.mov_edx_imm(PORT_DIRTY_BATCH as u32);
    a.out_dx_eax();
    a.label("no_report");
    a.dec_rcx();
    a.jnz("page");
    a.jmp("pass");
}

fn fill(a: &mut Asm) {
    begin_pass(a);
    a.label("page");
    a.store_rax_at_rdi();
    a.add_rdi_page();
    a.dec_rcx();
    a.jnz("page");
    a.load_r8(param::WS_PAGES);
    a.mov_edx_imm(PORT_DIRTY_BATCH as u32);
    a.out_dx_eax();
    a.label("done");
    a.hlt();
    a.jmp("done");
}

fn counter(a: &mut Asm) {
    a.load_rax(param::COUNTER);
    a.label("step");
    a.load_rbx(param::COUNTER_CHECK);
    a.cmp_rax_rbx();
    a.jnz("fail");
    a.inc_rax();
    a.store_rax(param::COUNTER);
    a.store_rax(param::COUNTER_CHECK);
    a.test_eax_imm((COUNTER_REPORT_EVERY - 1) as u32);
    a.jnz("step");
    a.mov_edx_imm(PORT_COUNTER as u32);
    a.out_dx_eax();
    a.jmp("step");
    a.label("fail");
    a.mov_edx_imm(PORT_COUNTER_FAIL as u32);
    a.out_dx_eax();
    a.hlt();
    a.jmp("fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_fit_their_slots_and_resolve_labels() {
        for p in Program::ALL {
            let code = p.code();
            assert!(!code.is_empty());
            assert!(code.len() <= 0x400, "{} is {} bytes", p.name(), code.len());
        }
    }

    #[test]
    fn idle_ends_with_hlt_and_a_jump_back() {
        let code = Program::Idle.code();
        let n = code.len();
        assert_eq!(&code[n - 3..], &[0xf4, 0xeb, 0xfd]);
    }
}
