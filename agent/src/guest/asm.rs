//! A tiny x86-64 encoder: just the instructions the guest programs use, with labels for
//! short jumps.

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    /// (position of the rel8 byte, label)
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    pub fn label(&mut self, name: &'static str) {
        let old = self.labels.insert(name, self.code.len());
        assert!(old.is_none(), "label {name} defined twice");
    }

    pub fn finish(mut self) -> Vec<u8> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("undefined label {name}"));
            let rel = target as isize - (at as isize + 1);
            let rel = i8::try_from(rel).unwrap_or_else(|_| panic!("jump to {name} too far"));
            self.code[at] = rel as u8;
        }
        self.code
    }

    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    fn jump(&mut self, opcode: u8, label: &'static str) {
        self.bytes(&[opcode, 0]);
        self.fixups.push((self.code.len() - 1, label));
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
}
