//! The controller's decisions and the other notes a migration's progress and report carry, as
//! enums: their `Display` is the wording of the human output, their serde form a tagged object
//! (see each type) so that `--json` consumers match a `kind`, not prose.

use serde::{Deserialize, Serialize};

use super::StopReason;

/// What the controller decided after a pre-copy round, with the figures behind it.
///
/// `Display` is the human wording ("throttle vCPUs to 20 %: …"). In JSON (`rounds[].decision`,
/// `decisions[]`) an object tagged by `kind` — `continue`, `throttle`, `stop-and-copy`,
/// `post-copy` or `abort` — with the reason's `cause` and `detail` (see [`StopReason`]) beside
/// it, and `pct` for a throttle:
/// `{"kind": "throttle", "pct": 20, "cause": "dirty-ratio", "detail": "dirty ratio 1.00 …"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Decision {
    /// Another pre-copy round.
    Continue,
    /// Another pre-copy round with the vCPUs throttled to `pct` percent.
    Throttle {
        /// Percent of each interval the vCPUs sleep.
        pct: u32,
        /// Why pre-copy could not go on unthrottled.
        #[serde(flatten)]
        why: StopReason,
    },
    /// Pause and send the rest; the reason goes into the report.
    StopAndCopy(StopReason),
    /// Pause, send the state, run on the destination and fetch the rest on demand.
    #[serde(rename = "post-copy")]
    Postcopy(StopReason),
    /// Give up; the VM stays on the source.
    Abort(StopReason),
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Continue => f.write_str("continue pre-copy"),
            Decision::Throttle { pct, why } => write!(f, "throttle vCPUs to {pct} %: {why}"),
            Decision::StopAndCopy(why) => write!(f, "stop-and-copy: {why}"),
            Decision::Postcopy(why) => write!(f, "switch to post-copy: {why}"),
            Decision::Abort(why) => write!(f, "abort: {why}"),
        }
    }
}

/// A decision that changed something (anything but [`Decision::Continue`]), and the round
/// after which the controller took it: an entry of the report's `decisions`.
///
/// `Display`: "after round 3: switch to post-copy: …". JSON: the decision's object with
/// `round` added, `{"round": 3, "kind": "post-copy", "cause": "dirty-ratio", "detail": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    /// The round after which it was taken.
    pub round: u32,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

impl std::fmt::Display for Decided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "after round {}: {}", self.round, self.decision)
    }
}

/// What a progress event announces besides its figures (the CLI prints it as `controller: …`).
///
/// Progress events go from the agent to the CLI only (never to `--json` output): serde's
/// default, externally tagged form, `{"decided": {…}}`, `"post-copy-complete"`,
/// `{"resumed": {"missing": 12, "waiting": 1}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgressNote {
    /// The controller's decision after a round, when it changed something (a throttle, the
    /// switch to post-copy; the switch pass repeats it).
    Decided(Decision),
    /// Post-copy placed every page on the destination.
    PostcopyComplete,
    /// A post-copy migration reconnected and goes on.
    Resumed {
        /// Pages the destination still misses.
        missing: u64,
        /// Faults waiting on the destination for one of them.
        waiting: u64,
    },
}

impl std::fmt::Display for ProgressNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProgressNote::Decided(d) => d.fmt(f),
            ProgressNote::PostcopyComplete => f.write_str("post-copy complete"),
            ProgressNote::Resumed { missing, waiting } => write!(
                f,
                "resumed: {missing} pages still missing, {waiting} faults waiting"
            ),
        }
    }
}

/// Which dirty count a round's prediction used (`RoundStats::estimate_from`; see
/// [`crate::migrate::controller::Controller::assess`]). JSON: `"log"` or `"kernel"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EstimateFrom {
    /// The dirty log's count (pages harvested from KVM's ring or bitmap).
    Log,
    /// The BPF probes' distinct pages, larger than the log's.
    Kernel,
}
named!(EstimateFrom { Log => "log", Kernel => "kernel" });

#[cfg(test)]
mod tests {
    use super::super::{Cause, RoundStats};
    use super::*;

    fn why() -> StopReason {
        StopReason::new(Cause::DirtyRatio, "dirty ratio 1.00".into())
    }

    #[test]
    fn decisions_read_as_before_and_serialize_tagged() {
        let d = Decided {
            round: 3,
            decision: Decision::Throttle {
                pct: 20,
                why: why(),
            },
        };
        assert_eq!(
            d.to_string(),
            "after round 3: throttle vCPUs to 20 %: dirty ratio 1.00"
        );
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"round": 3, "kind": "throttle", "pct": 20, "cause": "dirty-ratio", "detail": "dirty ratio 1.00"})
        );
        assert_eq!(serde_json::from_value::<Decided>(j).unwrap(), d);
        for d in [
            Decision::Continue,
            Decision::StopAndCopy(why()),
            Decision::Postcopy(why()),
            Decision::Abort(why()),
        ] {
            let j = serde_json::to_value(&d).unwrap();
            assert_eq!(serde_json::from_value::<Decision>(j.clone()).unwrap(), d);
            let d = Decided {
                round: 1,
                decision: d,
            };
            let j = serde_json::to_value(&d).unwrap();
            assert_eq!(serde_json::from_value::<Decided>(j).unwrap(), d);
        }
        let j = serde_json::to_value(Decision::Postcopy(why())).unwrap();
        assert_eq!(j["kind"], "post-copy");
        assert_eq!(j["cause"], "dirty-ratio");
        assert_eq!(
            Decision::Postcopy(why()).to_string(),
            "switch to post-copy: dirty ratio 1.00"
        );
    }

    #[test]
    fn progress_notes_and_rounds_round_trip() {
        for n in [
            ProgressNote::Decided(Decision::Postcopy(why())),
            ProgressNote::PostcopyComplete,
            ProgressNote::Resumed {
                missing: 0,
                waiting: 2,
            },
        ] {
            let j = serde_json::to_string(&n).unwrap();
            assert_eq!(serde_json::from_str::<ProgressNote>(&j).unwrap(), n);
        }
        assert_eq!(
            ProgressNote::Resumed {
                missing: 0,
                waiting: 2
            }
            .to_string(),
            "resumed: 0 pages still missing, 2 faults waiting"
        );
        let r = RoundStats {
            decision: Some(Decision::Continue),
            estimate_from: Some(EstimateFrom::Kernel),
            ..Default::default()
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["decision"]["kind"], "continue");
        assert_eq!(j["estimate_from"], "kernel");
        let back: RoundStats = serde_json::from_value(j).unwrap();
        assert_eq!(back.decision, r.decision);
        assert_eq!(back.estimate_from, r.estimate_from);
        // The last pass decides nothing and predicts nothing.
        let j = serde_json::to_value(RoundStats::default()).unwrap();
        assert!(j["decision"].is_null() && j["estimate_from"].is_null());
    }
}
