//! A tiny x86-64 encoder: just the instructions the guest programs use, with labels for
//! short (rel8) and near (rel32) jumps and calls.

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    /// (position of the displacement, label, whether it is a rel32)
    fixups: Vec<(usize, &'static str, bool)>,
}

impl Asm {
    pub fn label(&mut self, name: &'static str) {
        let old = self.labels.insert(name, self.code.len());
        assert!(old.is_none(), "label {name} defined twice");
    }

    pub fn finish(mut self) -> Vec<u8> {
        for (at, name, near) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("undefined label {name}"));
            if near {
                let rel = (target as isize - (at as isize + 4)) as i32;
                self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
            } else {
                let rel = target as isize - (at as isize + 1);
                let rel = i8::try_from(rel).unwrap_or_else(|_| panic!("jump to {name} too far"));
                self.code[at] = rel as u8;
            }
        }
        self.code
    }

    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    fn jump(&mut self, opcode: u8, label: &'static str) {
        self.bytes(&[opcode, 0]);
        self.fixups.push((self.code.len() - 1, label, false));
    }

    fn jump_near(&mut self, opcode: &[u8], label: &'static str) {
        self.bytes(opcode);
        self.bytes(&[0; 4]);
        self.fixups.push((self.code.len() - 4, label, true));
    }

    /// An instruction `opcode` with a ModRM of `[base + disp32]` and register field `reg`
    /// (`base` is rbx or rbp: neither needs a SIB byte).
    fn at_disp32(&mut self, opcode: &[u8], reg: u8, base: u8, disp: u32) {
        self.bytes(opcode);
        self.bytes(&[0x80 | (reg << 3) | base]);
        self.bytes(&disp.to_le_bytes());
    }

    pub fn jmp(&mut self, label: &'static str) {
        self.jump(0xeb, label);
    }
    pub fn jnz(&mut self, label: &'static str) {
        self.jump(0x75, label);
    }
    pub fn jz(&mut self, label: &'static str) {
        self.jump(0x74, label);
    }
    pub fn hlt(&mut self) {
        self.bytes(&[0xf4]);
    }
    /// `mov rax, [rsi + off]`
    pub fn load_rax(&mut self, off: u8) {
        self.bytes(&[0x48, 0x8b, 0x46, off]);
    }
    /// `mov rbx, [rsi + off]`
    pub fn load_rbx(&mut self, off: u8) {
        self.bytes(&[0x48, 0x8b, 0x5e, off]);
    }
    /// `mov rcx, [rsi + off]`
    pub fn load_rcx(&mut self, off: u8) {
        self.bytes(&[0x48, 0x8b, 0x4e, off]);
    }
    /// `mov rdi, [rsi + off]`
    pub fn load_rdi(&mut self, off: u8) {
        self.bytes(&[0x48, 0x8b, 0x7e, off]);
    }
    /// `mov r8, [rsi + off]`
    pub fn load_r8(&mut self, off: u8) {
        self.bytes(&[0x4c, 0x8b, 0x46, off]);
    }
    /// `mov [rsi + off], rax`
    pub fn store_rax(&mut self, off: u8) {
        self.bytes(&[0x48, 0x89, 0x46, off]);
    }
    /// `mov [rdi], rax`
    pub fn store_rax_at_rdi(&mut self) {
        self.bytes(&[0x48, 0x89, 0x07]);
    }
    /// `add rdi, 0x1000`
    pub fn add_rdi_page(&mut self) {
        self.bytes(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]);
    }
    pub fn inc_rax(&mut self) {
        self.bytes(&[0x48, 0xff, 0xc0]);
    }
    pub fn inc_rbx(&mut self) {
        self.bytes(&[0x48, 0xff, 0xc3]);
    }
    pub fn dec_rcx(&mut self) {
        self.bytes(&[0x48, 0xff, 0xc9]);
    }
    pub fn dec_r8(&mut self) {
        self.bytes(&[0x49, 0xff, 0xc8]);
    }
    /// `cmp rax, rbx`
    pub fn cmp_rax_rbx(&mut self) {
        self.bytes(&[0x48, 0x39, 0xd8]);
    }
    /// `test eax, imm32`
    pub fn test_eax_imm(&mut self, imm: u32) {
        self.bytes(&[0xa9]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov edx, imm32`
    pub fn mov_edx_imm(&mut self, imm: u32) {
        self.bytes(&[0xba]);
        self.bytes(&imm.to_le_bytes());
    }
    pub fn out_dx_eax(&mut self) {
        self.bytes(&[0xef]);
    }
    pub fn out_dx_al(&mut self) {
        self.bytes(&[0xee]);
    }
    /// `lea rbx, [rsi + disp32]`
    pub fn lea_rbx_rsi(&mut self, disp: u32) {
        self.bytes(&[0x48, 0x8d, 0x9e]);
        self.bytes(&disp.to_le_bytes());
    }
    /// `mov al, [rbx]`
    pub fn mov_al_at_rbx(&mut self) {
        self.bytes(&[0x8a, 0x03]);
    }
    pub fn test_al_al(&mut self) {
        self.bytes(&[0x84, 0xc0]);
    }

    /// `call rel32`
    pub fn call(&mut self, label: &'static str) {
        self.jump_near(&[0xe8], label);
    }
    pub fn ret(&mut self) {
        self.bytes(&[0xc3]);
    }
    /// `jmp rel32`
    pub fn jmp_near(&mut self, label: &'static str) {
        self.jump_near(&[0xe9], label);
    }
    /// `jnz rel32`
    pub fn jnz_near(&mut self, label: &'static str) {
        self.jump_near(&[0x0f, 0x85], label);
    }
    /// `jz rel32`
    pub fn jz_near(&mut self, label: &'static str) {
        self.jump_near(&[0x0f, 0x84], label);
    }
    /// `mov eax, imm32`
    pub fn mov_eax_imm(&mut self, imm: u32) {
        self.bytes(&[0xb8]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov ecx, imm32`
    pub fn mov_ecx_imm(&mut self, imm: u32) {
        self.bytes(&[0xb9]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov ebp, imm32` (zero-extends into rbp)
    pub fn mov_ebp_imm(&mut self, imm: u32) {
        self.bytes(&[0xbd]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov rax, imm64`
    pub fn mov_rax_imm64(&mut self, imm: u64) {
        self.bytes(&[0x48, 0xb8]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov rax, imm32` (sign-extended)
    pub fn mov_rax_imm_sx(&mut self, imm: i32) {
        self.bytes(&[0x48, 0xc7, 0xc0]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov rdx, [rsi + off]`
    pub fn load_rdx(&mut self, off: u8) {
        self.bytes(&[0x48, 0x8b, 0x56, off]);
    }
    /// `mov [rsi + off], rcx`
    pub fn store_rcx(&mut self, off: u8) {
        self.bytes(&[0x48, 0x89, 0x4e, off]);
    }
    /// `cmp rax, [rsi + off]`
    pub fn cmp_rax_param(&mut self, off: u8) {
        self.bytes(&[0x48, 0x3b, 0x46, off]);
    }
    pub fn inc_rcx(&mut self) {
        self.bytes(&[0x48, 0xff, 0xc1]);
    }
    /// `shl rdx, imm8`
    pub fn shl_rdx(&mut self, imm: u8) {
        self.bytes(&[0x48, 0xc1, 0xe2, imm]);
    }
    /// `mov dword [rbx + off], imm32`: a 32-bit MMIO register write when rbx is the device.
    pub fn store32_rbx_imm(&mut self, off: u32, imm: u32) {
        self.at_disp32(&[0xc7], 0, RBX, off);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov eax, [rbx + off]`
    pub fn load_eax_rbx(&mut self, off: u32) {
        self.at_disp32(&[0x8b], 0, RBX, off);
    }
    /// `mov [rbp + off], rax`
    pub fn store_rax_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x48, 0x89], 0, RBP, off);
    }
    /// `mov [rbp + off], rcx`
    pub fn store_rcx_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x48, 0x89], 1, RBP, off);
    }
    /// `mov [rbp + off], rdx`
    pub fn store_rdx_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x48, 0x89], 2, RBP, off);
    }
    /// `mov [rbp + off], eax`
    pub fn store_eax_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x89], 0, RBP, off);
    }
    /// `mov [rbp + off], cx`
    pub fn store_cx_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x66, 0x89], 1, RBP, off);
    }
    /// `mov byte [rbp + off], imm8`
    pub fn store8_rbp_imm(&mut self, off: u32, imm: u8) {
        self.at_disp32(&[0xc6], 0, RBP, off);
        self.bytes(&[imm]);
    }
    /// `inc word [rbp + off]`
    pub fn inc16_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x66, 0xff], 0, RBP, off);
    }
    /// `movzx eax, word [rbp + off]`
    pub fn load16_eax_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x0f, 0xb7], 0, RBP, off);
    }
    /// `cmp ax, [rbp + off]`
    pub fn cmp_ax_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x66, 0x3b], 0, RBP, off);
    }
    /// `cmp byte [rbp + off], imm8`
    pub fn cmp8_rbp_imm(&mut self, off: u32, imm: u8) {
        self.at_disp32(&[0x80], 7, RBP, off);
        self.bytes(&[imm]);
    }
    /// `cmp rax, [rbp + off]`
    pub fn cmp_rax_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x48, 0x3b], 0, RBP, off);
    }
    /// `cmp rcx, [rbp + off]`
    pub fn cmp_rcx_rbp(&mut self, off: u32) {
        self.at_disp32(&[0x48, 0x3b], 1, RBP, off);
    }
}

/// ModRM base-register numbers.
const RBX: u8 = 3;
const RBP: u8 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn one(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::default();
        f(&mut a);
        a.finish()
    }

    /// Each encoding as GNU `as` assembles the same instruction (intel syntax, disp32 forms).
    #[test]
    fn encodings_match_the_assembler() {
        let d = 0x4008;
        let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
            (
                "mov eax, 1",
                one(|a| a.mov_eax_imm(1)),
                vec![0xb8, 1, 0, 0, 0],
            ),
            (
                "mov ecx, 3",
                one(|a| a.mov_ecx_imm(3)),
                vec![0xb9, 3, 0, 0, 0],
            ),
            (
                "mov ebp, 0x40000",
                one(|a| a.mov_ebp_imm(0x40000)),
                vec![0xbd, 0, 0, 4, 0],
            ),
            (
                "movabs rax, 0x1122334455667788",
                one(|a| a.mov_rax_imm64(0x1122_3344_5566_7788)),
                vec![0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
            ),
            (
                "mov rax, -1",
                one(|a| a.mov_rax_imm_sx(-1)),
                vec![0x48, 0xc7, 0xc0, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                "mov rdx, [rsi+0x48]",
                one(|a| a.load_rdx(0x48)),
                vec![0x48, 0x8b, 0x56, 0x48],
            ),
            (
                "mov [rsi+0x48], rcx",
                one(|a| a.store_rcx(0x48)),
                vec![0x48, 0x89, 0x4e, 0x48],
            ),
            (
                "cmp rax, [rsi+0x48]",
                one(|a| a.cmp_rax_param(0x48)),
                vec![0x48, 0x3b, 0x46, 0x48],
            ),
            ("inc rcx", one(|a| a.inc_rcx()), vec![0x48, 0xff, 0xc1]),
            (
                "shl rdx, 3",
                one(|a| a.shl_rdx(3)),
                vec![0x48, 0xc1, 0xe2, 3],
            ),
            (
                "mov dword [rbx+0x170], 0xf",
                one(|a| a.store32_rbx_imm(0x170, 0xf)),
                vec![0xc7, 0x83, 0x70, 1, 0, 0, 0xf, 0, 0, 0],
            ),
            (
                "mov eax, [rbx+0x170]",
                one(|a| a.load_eax_rbx(0x170)),
                vec![0x8b, 0x83, 0x70, 1, 0, 0],
            ),
            (
                "mov [rbp+0x4008], rax",
                one(|a| a.store_rax_rbp(d)),
                vec![0x48, 0x89, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "mov [rbp+0x4008], rcx",
                one(|a| a.store_rcx_rbp(d)),
                vec![0x48, 0x89, 0x8d, 8, 0x40, 0, 0],
            ),
            (
                "mov [rbp+0x4008], rdx",
                one(|a| a.store_rdx_rbp(d)),
                vec![0x48, 0x89, 0x95, 8, 0x40, 0, 0],
            ),
            (
                "mov [rbp+0x4008], eax",
                one(|a| a.store_eax_rbp(d)),
                vec![0x89, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "mov [rbp+0x4008], cx",
                one(|a| a.store_cx_rbp(d)),
                vec![0x66, 0x89, 0x8d, 8, 0x40, 0, 0],
            ),
            (
                "mov byte [rbp+0x4008], 0xff",
                one(|a| a.store8_rbp_imm(d, 0xff)),
                vec![0xc6, 0x85, 8, 0x40, 0, 0, 0xff],
            ),
            (
                "inc word [rbp+0x4008]",
                one(|a| a.inc16_rbp(d)),
                vec![0x66, 0xff, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "movzx eax, word [rbp+0x4008]",
                one(|a| a.load16_eax_rbp(d)),
                vec![0x0f, 0xb7, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "cmp ax, [rbp+0x4008]",
                one(|a| a.cmp_ax_rbp(d)),
                vec![0x66, 0x3b, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "cmp byte [rbp+0x4008], 0",
                one(|a| a.cmp8_rbp_imm(d, 0)),
                vec![0x80, 0xbd, 8, 0x40, 0, 0, 0],
            ),
            (
                "cmp rax, [rbp+0x4008]",
                one(|a| a.cmp_rax_rbp(d)),
                vec![0x48, 0x3b, 0x85, 8, 0x40, 0, 0],
            ),
            (
                "cmp rcx, [rbp+0x4008]",
                one(|a| a.cmp_rcx_rbp(d)),
                vec![0x48, 0x3b, 0x8d, 8, 0x40, 0, 0],
            ),
            ("ret", one(|a| a.ret()), vec![0xc3]),
        ];
        for (what, got, want) in cases {
            assert_eq!(got, want, "{what}");
        }
    }

    /// Near jumps and calls land on their label, forwards and backwards.
    #[test]
    fn near_jumps_and_calls_resolve_rel32() {
        let code = one(|a| {
            a.label("top");
            a.call("end");
            a.jmp_near("end");
            a.jnz_near("top");
            a.jz_near("end");
            a.label("end");
        });
        assert_eq!(
            code,
            vec![
                0xe8, 0x11, 0, 0, 0, // call +17 (to 22)
                0xe9, 0x0c, 0, 0, 0, // jmp +12 (to 22)
                0x0f, 0x85, 0xf0, 0xff, 0xff, 0xff, // jnz -16 (to 0)
                0x0f, 0x84, 0, 0, 0, 0, // jz +0 (to 22)
            ]
        );
    }
}
