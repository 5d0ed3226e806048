//! Booting a VM: identity page tables, the guest programs and their parameters loaded, every
//! vCPU put in long mode at its program's entry.

use kvm_bindings::kvm_segment;

use super::{kvm_err, Vm, VmError};
use crate::guest::{layout, param, Program};

impl Vm {
    /// Fills `len` bytes of guest memory at `base` with pseudo-random bytes (xorshift64,
    /// seeded by `seed`): pages no compressor shrinks.
    fn fill_with_noise(&self, base: u64, len: u64, seed: u64) -> Result<(), VmError> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            for b in buf[..n].chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            self.ram.write(base + off, &buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Loads page tables, programs and parameters, and points every vCPU at its program.
    pub fn boot(&self, name: &str) -> Result<(), VmError> {
        self.write_page_tables()?;
        for p in Program::ALL {
            self.ram.write(p.entry(), &p.code())?;
        }
        let mut dirty_index = 0;
        for (i, p) in self.spec.programs.iter().enumerate() {
            let i = i as u32;
            let params = layout::params(i);
            let w = |off: u8, v: u64| self.ram.write_u64(params + off as u64, v);
            w(0, 0x564d_4947_5041_5241)?; // "ARAPGIMV": marks a parameter page.
            if p.uses_working_set() {
                let pages = self.spec.dirty_bytes / layout::PAGE_SIZE;
                w(
                    param::WS_BASE,
                    layout::WORKING_SETS + dirty_index * self.spec.dirty_bytes,
                )?;
                w(param::WS_PAGES, pages)?;
                let batch = if self.spec.dirty_rate == 0 || *p == Program::Fill {
                    pages
                } else {
                    (self.spec.dirty_rate / 100).clamp(1, pages)
                };
                w(param::BATCH, batch)?;
                if *p == Program::Noise {
                    self.fill_with_noise(
                        layout::WORKING_SETS + dirty_index * self.spec.dirty_bytes,
                        self.spec.dirty_bytes,
                        dirty_index,
                    )?;
                }
                dirty_index += 1;
            }
            if *p == Program::Disk {
                let (first, end) = self.disk_region()?;
                w(param::DISK_MMIO, layout::VIRTIO_MMIO)?;
                w(param::DISK_FIRST, first)?;
                w(param::DISK_END, end)?;
                w(param::DISK_GEN, 0)?;
                w(param::DISK_BLOCK, first)?;
            }
            let banner = format!("vmig guest {name} vcpu{i}: {}\n\0", p.name());
            self.ram
                .write(params + param::BANNER as u64, banner.as_bytes())?;
            let v = &self.vcpus[i as usize];
            let fd = v.shared.fd.lock().expect("vcpu fd");
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: p.entry(),
                rsi: params,
                rsp: params + layout::PAGE_SIZE,
                rflags: 2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// The `disk` program's blocks [first, end), inside the attached disk.
    fn disk_region(&self) -> Result<(u64, u64), VmError> {
        let blk = self.devices.blk().ok_or_else(|| {
            VmError::Invalid("the disk workload needs a disk: none is attached".into())
        })?;
        let blocks = blk.capacity_bytes() / layout::disk::BLOCK;
        let first = self.spec.disk_first_block;
        let end = match self.spec.disk_blocks {
            0 => blocks,
            n => first.saturating_add(n),
        };
        if first >= end || end > blocks {
            return Err(VmError::Invalid(format!(
                "disk region of blocks {first}..{end} is not inside the disk's {blocks} blocks"
            )));
        }
        Ok((first, end))
    }

    fn write_page_tables(&self) -> Result<(), VmError> {
        let gib = self.spec.memory.div_ceil(1 << 30);
        self.ram.write_u64(layout::PML4, layout::PDPT | 3)?;
        for g in 0..gib {
            let pd = layout::PD + g * layout::PAGE_SIZE;
            self.ram.write_u64(layout::PDPT + g * 8, pd | 3)?;
            let mut table = vec![0u8; layout::PAGE_SIZE as usize];
            for (e, chunk) in table.chunks_exact_mut(8).enumerate() {
                let addr = (g << 30) + ((e as u64) << 21);
                chunk.copy_from_slice(&(addr | 0x83).to_le_bytes());
            }
            self.ram.write(pd, &table)?;
        }
        // The virtio-mmio registers: one uncached 2 MiB page (PCD) past the end of RAM.
        let gib = layout::VIRTIO_MMIO >> 30;
        self.ram
            .write_u64(layout::PDPT + gib * 8, layout::MMIO_PD | 3)?;
        self.ram
            .write_u64(layout::MMIO_PD, layout::VIRTIO_MMIO | 0x93)?;
        Ok(())
    }
}

/// Puts a vCPU in 64-bit long mode with the identity page tables of [`layout`].
fn long_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
}
