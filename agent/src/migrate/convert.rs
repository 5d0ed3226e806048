//! Conversions between the wire's messages and the engine's and the VMM's types. The wire
//! owns its structs (`wire::messages`); these are the only places where the two meet.

use crate::dirty::DirtyTracking;
use crate::guest::Program;
use crate::vm::state::MachineState;
use crate::vm::VmSpec;
use crate::wire::{messages as msg, Kind, WireError, MAX_PAYLOAD};

use super::PostcopyStats;

impl From<Program> for msg::Program {
    fn from(p: Program) -> Self {
        match p {
            Program::Idle => msg::Program::Idle,
            Program::Dirty => msg::Program::Dirty,
            Program::Counter => msg::Program::Counter,
            Program::Fill => msg::Program::Fill,
            Program::Disk => msg::Program::Disk,
            Program::Noise => msg::Program::Noise,
        }
    }
}

impl From<msg::Program> for Program {
    fn from(p: msg::Program) -> Self {
        match p {
            msg::Program::Idle => Program::Idle,
            msg::Program::Dirty => Program::Dirty,
            msg::Program::Counter => Program::Counter,
            msg::Program::Fill => Program::Fill,
            msg::Program::Disk => Program::Disk,
            msg::Program::Noise => Program::Noise,
        }
    }
}

impl From<DirtyTracking> for msg::Tracking {
    fn from(t: DirtyTracking) -> Self {
        match t {
            DirtyTracking::Auto => msg::Tracking::Auto,
            DirtyTracking::Ring => msg::Tracking::Ring,
            DirtyTracking::Bitmap => msg::Tracking::Bitmap,
        }
    }
}

impl From<msg::Tracking> for DirtyTracking {
    fn from(t: msg::Tracking) -> Self {
        match t {
            msg::Tracking::Auto => DirtyTracking::Auto,
            msg::Tracking::Ring => DirtyTracking::Ring,
            msg::Tracking::Bitmap => DirtyTracking::Bitmap,
        }
    }
}

impl From<&VmSpec> for msg::VmSpec {
    fn from(s: &VmSpec) -> Self {
        msg::VmSpec {
            memory: s.memory,
            programs: s.programs.iter().map(|&p| p.into()).collect(),
            dirty_bytes: s.dirty_bytes,
            dirty_rate: s.dirty_rate,
            dirty_tracking: s.dirty_tracking.into(),
            disk_rate: s.disk_rate,
            disk_first_block: s.disk_first_block,
            disk_blocks: s.disk_blocks,
        }
    }
}

impl From<msg::VmSpec> for VmSpec {
    fn from(s: msg::VmSpec) -> Self {
        VmSpec {
            memory: s.memory,
            programs: s.programs.into_iter().map(Program::from).collect(),
            dirty_bytes: s.dirty_bytes,
            dirty_rate: s.dirty_rate,
            dirty_tracking: s.dirty_tracking.into(),
            disk_rate: s.disk_rate,
            disk_first_block: s.disk_first_block,
            disk_blocks: s.disk_blocks,
        }
    }
}

impl From<&MachineState> for msg::MachineSection {
    fn from(m: &MachineState) -> Self {
        msg::MachineSection {
            bytes: bincode::serialize(m).expect("the machine state serializes"),
        }
    }
}

impl TryFrom<&msg::MachineSection> for MachineState {
    type Error = WireError;

    fn try_from(s: &msg::MachineSection) -> Result<Self, WireError> {
        use bincode::Options;
        bincode::options()
            .with_fixint_encoding()
            .with_limit(MAX_PAYLOAD as u64)
            .deserialize(&s.bytes)
            .map_err(|e| WireError::Decode {
                kind: Kind::State,
                cause: format!("machine state: {e}"),
            })
    }
}

impl From<&msg::PostcopyFigures> for PostcopyStats {
    fn from(f: &msg::PostcopyFigures) -> Self {
        PostcopyStats {
            pages_missing: f.pages_missing,
            faults: f.faults,
            duplicate_faults: f.duplicate_faults,
            zero_local: f.zero_local,
            requests: f.requests,
            pages_demand: f.pages_demand,
            pages_pushed: f.pages_pushed,
            bytes_demand: f.bytes_demand,
            bytes_pushed: f.bytes_pushed,
            latency_count: f.latency_count,
            latency_p50_us: f.latency_p50_us,
            latency_p99_us: f.latency_p99_us,
            latency_max_us: f.latency_max_us,
            duration_ms: f.duration_ms,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_survives_the_wire() {
        let spec = VmSpec {
            memory: 64 << 20,
            programs: Program::ALL.to_vec(),
            dirty_bytes: 1 << 20,
            dirty_rate: 7,
            dirty_tracking: DirtyTracking::Ring,
            disk_rate: 3,
            disk_first_block: 4,
            disk_blocks: 5,
        };
        assert_eq!(VmSpec::from(msg::VmSpec::from(&spec)), spec);
    }

    #[test]
    fn a_truncated_machine_section_is_a_decode_error() {
        let s = msg::MachineSection { bytes: vec![1, 2] };
        assert!(matches!(
            MachineState::try_from(&s),
            Err(WireError::Decode {
                kind: Kind::State,
                ..
            })
        ));
    }
}
