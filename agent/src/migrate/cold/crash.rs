//! Crash points for the crash-matrix tests: with the `fault-injection` feature, an agent whose
//! environment has `VMIG_CRASH_AT=<point>` aborts (`std::process::abort`, as abrupt as a
//! SIGKILL: no unwinding, no cleanup) when it reaches that point of a cold migration or a
//! storage move. Without the feature every point is a no-op.

/// The environment variable naming the crash point.
pub const ENV: &str = "VMIG_CRASH_AT";

/// The steps a test can crash an agent at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Source: the intent record is written, nothing sent.
    SourceIntent,
    /// Source: in the middle of the disk image.
    SourceMidFile,
    /// Source: the commit is journaled, `ColdCommit` not sent yet.
    SourceCommitting,
    /// Source: the destination confirmed; before the source's delete.
    SourceBeforeDelete,
    /// Destination: the intent record is written.
    DestIntent,
    /// Destination: in the middle of the disk image.
    DestMidFile,
    /// Destination: every file and the staging folder synced.
    DestSynced,
    /// Destination: just before the rename that registers the VM.
    DestBeforeRegister,
    /// Destination: just after the registration, before the confirmation goes.
    DestRegistered,
    /// Destination: a recovering source asked about an operation; the answer is decided (an
    /// unregistered operation aborted) and not sent yet.
    DestAnswering,
    /// Source: recovering, the destination's answer came; not acted on yet.
    SourceAnswered,
    /// Storage move: the intent record is written.
    MoveIntent,
    /// Storage move: in the middle of the disk image.
    MoveMidFile,
    /// Storage move: the copy is renamed into place, the old folder not yet deleted.
    MoveSwitched,
}

impl Crash {
    /// Every point, in the order an operation reaches them.
    pub const ALL: [Crash; 14] = [
        Crash::SourceIntent,
        Crash::SourceMidFile,
        Crash::SourceCommitting,
        Crash::SourceBeforeDelete,
        Crash::DestIntent,
        Crash::DestMidFile,
        Crash::DestSynced,
        Crash::DestBeforeRegister,
        Crash::DestRegistered,
        Crash::DestAnswering,
        Crash::SourceAnswered,
        Crash::MoveIntent,
        Crash::MoveMidFile,
        Crash::MoveSwitched,
    ];

    /// The point's name in `VMIG_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Crash::SourceIntent => "source-intent",
            Crash::SourceMidFile => "source-mid-file",
            Crash::SourceCommitting => "source-committing",
            Crash::SourceBeforeDelete => "source-before-delete",
            Crash::DestIntent => "dest-intent",
            Crash::DestMidFile => "dest-mid-file",
            Crash::DestSynced => "dest-synced",
            Crash::DestBeforeRegister => "dest-before-register",
            Crash::DestRegistered => "dest-registered",
            Crash::DestAnswering => "dest-answering",
            Crash::SourceAnswered => "source-answered",
            Crash::MoveIntent => "move-intent",
            Crash::MoveMidFile => "move-mid-file",
            Crash::MoveSwitched => "move-switched",
        }
    }
}

/// Aborts the process if `VMIG_CRASH_AT` names `p` (fault-injection builds only).
#[inline]
pub fn point(p: Crash) {
    #[cfg(feature = "fault-injection")]
    if std::env::var(ENV).is_ok_and(|v| v == p.name()) {
        tracing::error!(point = p.name(), "{ENV}: crashing here");
        std::process::abort();
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = p;
}
