//! A VM's definition file (`vm.toml`).

use serde::{Deserialize, Serialize};

use super::InventoryError;
use crate::dirty::DirtyTracking;
use crate::guest::{layout, Program};
use crate::vm::VmSpec;

/// What a VM is: the contents of its `vm.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    /// Name (letters, digits, `-`, `_`).
    pub name: String,
    /// Guest memory, MiB (a multiple of 2, 16 to 16384).
    pub memory_mib: u64,
    /// Number of vCPUs (1 to 4).
    pub vcpus: u32,
    /// Program of each vCPU; the last one repeats for the remaining vCPUs.
    pub workload: Vec<String>,
    /// Working set of each `dirty` vCPU, MiB.
    #[serde(default = "default_dirty_mib")]
    pub dirty_mib: u64,
    /// Pages per second each `dirty` vCPU writes; 0 = flat out.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Dirty-tracking mechanism.
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    /// Disk image size, MiB.
    #[serde(default = "default_disk_mib")]
    pub disk_mib: u64,
    /// Blocks (4 KiB) per second the `disk` vCPU writes and reads back; 0 = flat out.
    #[serde(default)]
    pub disk_rate: u64,
    /// Size of the region the `disk` vCPU writes, from the disk's start, MiB; 0 = the whole disk.
    #[serde(default)]
    pub disk_region_mib: u64,
    /// Ownership generation: moved at each migration's commit (the destination's copy is the
    /// source's + 1) and bumped by a rollback; a copy older than another host's is fenced
    /// (see [`super::generation`]). 0 for definitions written before it existed.
    #[serde(default)]
    pub generation: u64,
}

fn default_dirty_mib() -> u64 {
    16
}

fn default_disk_mib() -> u64 {
    16
}

impl VmDef {
    /// Parses a `vm.toml`.
    pub fn parse(text: &str) -> Result<Self, InventoryError> {
        let def: VmDef =
            toml::from_str(text).map_err(|e| InventoryError::Invalid(e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Renders the `vm.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("definitions serialize")
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// The program of each vCPU.
    pub fn programs(&self) -> Result<Vec<Program>, InventoryError> {
        if self.workload.is_empty() {
            return Err(InventoryError::Invalid("workload is empty".into()));
        }
        let parsed: Vec<Program> = self
            .workload
            .iter()
            .map(|w| {
                Program::parse(w).ok_or_else(|| {
                    InventoryError::Invalid(format!(
                        "unknown workload {w:?} (idle, dirty, counter, fill, disk)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        if parsed.len() > self.vcpus as usize {
            return Err(InventoryError::Invalid(format!(
                "{} workloads for {} vCPUs",
                parsed.len(),
                self.vcpus
            )));
        }
        let last = *parsed.last().expect("not empty");
        Ok((0..self.vcpus as usize)
            .map(|i| parsed.get(i).copied().unwrap_or(last))
            .collect())
    }

    /// What the VMM builds.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            memory: self.memory_bytes(),
            programs: self.programs().unwrap_or_default(),
            dirty_bytes: self.dirty_mib << 20,
            dirty_rate: self.dirty_rate,
            dirty_tracking: self.dirty_tracking,
            disk_rate: self.disk_rate,
            disk_first_block: 0,
            disk_blocks: self.disk_region_mib << 20 >> 12,
        }
    }

    /// Checks the definition.
    pub fn validate(&self) -> Result<(), InventoryError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok_name {
            return Err(InventoryError::Invalid(format!(
                "name {:?}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit",
                self.name
            )));
        }
        if !(16..=16384).contains(&self.memory_mib) || !self.memory_mib.is_multiple_of(2) {
            return Err(InventoryError::Invalid(format!(
                "memory {} MiB: use an even number from 16 to 16384",
                self.memory_mib
            )));
        }
        if !(1..=1 << 20).contains(&self.disk_mib) {
            return Err(InventoryError::Invalid(format!(
                "disk {} MiB: use 1 to 1048576 MiB (1 TiB)",
                self.disk_mib
            )));
        }
        if self.disk_region_mib > self.disk_mib {
            return Err(InventoryError::Invalid(format!(
                "disk region {} MiB: use 0 (the whole disk) to the disk's {} MiB",
                self.disk_region_mib, self.disk_mib
            )));
        }
        if self.disk_rate > 1 << 24 {
            return Err(InventoryError::Invalid(format!(
                "disk rate {} blocks/s: use 0 (flat out) to 16777216",
                self.disk_rate
            )));
        }
        if !(1..=layout::MAX_VCPUS).contains(&self.vcpus) {
            return Err(InventoryError::Invalid(format!(
                "{} vCPUs: use 1 to {}",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        self.programs()?;
        self.spec()
            .validate()
            .map_err(|e| InventoryError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> VmDef {
        VmDef {
            name: "vm1".into(),
            memory_mib: 64,
            vcpus: 3,
            workload: vec!["dirty".into(), "counter".into()],
            dirty_mib: 8,
            dirty_rate: 0,
            dirty_tracking: DirtyTracking::Auto,
            disk_mib: 4,
            disk_rate: 0,
            disk_region_mib: 0,
            generation: 0,
        }
    }

    #[test]
    fn toml_round_trip_and_workload_repeats() {
        let d = def();
        assert_eq!(VmDef::parse(&d.to_toml()).unwrap(), d);
        assert_eq!(
            d.programs().unwrap(),
            vec![Program::Dirty, Program::Counter, Program::Counter]
        );
    }

    #[test]
    fn an_old_definition_without_a_generation_loads_at_0_and_the_generation_round_trips() {
        let old = "name = \"vm1\"\nmemory_mib = 64\nvcpus = 1\nworkload = [\"counter\"]\n";
        let d = VmDef::parse(old).unwrap();
        assert_eq!(d.generation, 0);
        let mut d2 = d.clone();
        d2.generation = 7;
        let text = d2.to_toml();
        assert!(text.contains("generation = 7"), "{text}");
        assert_eq!(VmDef::parse(&text).unwrap().generation, 7);
    }

    #[test]
    fn bad_definitions_are_refused_with_reasons() {
        for (f, want) in [
            (
                Box::new(|d: &mut VmDef| d.name = "../x".into()) as Box<dyn Fn(&mut VmDef)>,
                "name",
            ),
            (Box::new(|d: &mut VmDef| d.memory_mib = 15), "memory"),
            (Box::new(|d: &mut VmDef| d.vcpus = 9), "vCPUs: use 1 to"),
            (Box::new(|d: &mut VmDef| d.vcpus = 0), "0 vCPUs: use 1 to"),
            (
                Box::new(|d: &mut VmDef| d.disk_mib = 0),
                "disk 0 MiB: use 1 to",
            ),
            (
                Box::new(|d: &mut VmDef| d.disk_region_mib = 5),
                "disk region 5 MiB: use 0 (the whole disk) to the disk's 4 MiB",
            ),
            (
                Box::new(|d: &mut VmDef| d.disk_rate = u64::MAX),
                "blocks/s: use 0 (flat out) to",
            ),
            (
                Box::new(|d: &mut VmDef| d.name = "-vm".into()),
                "starting with a letter or digit",
            ),
            (
                Box::new(|d: &mut VmDef| d.workload = vec!["mine".into()]),
                "unknown workload",
            ),
            (Box::new(|d: &mut VmDef| d.dirty_mib = 64), "do not fit"),
        ] {
            let mut d = def();
            f(&mut d);
            let e = d.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        assert!(VmDef::parse("name = 'x'\nbogus = 1").is_err());
    }
}
