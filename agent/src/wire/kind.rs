//! Frame kinds: the number in each frame's header that says what it carries.

/// Frame kinds. `Invalid = 0` is reserved so a zeroed header never parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Never sent.
    Invalid = 0,
    /// Source introduces itself.
    Hello = 1,
    /// Destination accepts the protocol.
    Welcome = 2,
    /// Source asks for memory and the name.
    Reserve = 3,
    /// Destination reserved.
    Reserved = 4,
    /// Destination refused the reservation.
    Refused = 5,
    /// Guest pages.
    Pages = 6,
    /// End of a pre-copy round.
    RoundEnd = 7,
    /// A piece of one of the VM's files.
    FileChunk = 8,
    /// vCPU and device state.
    State = 9,
    /// Destination loaded the state.
    Ready = 10,
    /// Source commits: run on the destination.
    Go = 11,
    /// Destination runs the VM.
    Running = 12,
    /// Either side gives up.
    Abort = 13,
    /// Either side reports an error.
    Error = 14,
    /// Source released the VM.
    Released = 15,
    /// Destination discarded its copy (the source's check after the resume failed).
    Discarded = 23,
    /// Source switches to post-copy: the pages the destination must not trust.
    Postcopy = 16,
    /// Destination asks for pages a vCPU faulted on.
    PageRequest = 17,
    /// Guest pages answering a `PageRequest` (same layout as `Pages`).
    DemandPages = 18,
    /// Destination holds every page: post-copy is over.
    PostcopyDone = 19,
    /// Source reconnects to finish an interrupted post-copy.
    Resume = 20,
    /// Destination: the post-copy session waits here; the pages it still lacks.
    Resumed = 21,
    /// Destination placed the post-copy page frames up to a byte count (flow control).
    PagesPlaced = 22,
    /// Destination placed every page of a pre-copy round.
    RoundPlaced = 24,
    /// Cold migration: the source offers a stopped VM and its files.
    ColdOffer = 40,
    /// Cold migration: the destination accepts (where, and whether files travel).
    ColdAccepted = 41,
    /// Cold migration: one file was sent whole, with its digest.
    ColdFileDone = 42,
    /// Cold migration: every file was sent; register the VM.
    ColdCommit = 43,
    /// Cold migration: the VM is registered on the destination, durably.
    ColdRegistered = 44,
    /// Cold migration: the source let its copy go.
    ColdReleased = 45,
    /// Recovery: is the VM of this operation registered on the destination?
    ColdQuery = 46,
    /// Recovery: the destination's answer.
    ColdAnswer = 47,
    /// Fencing: which ownership generation do you hold of these VMs?
    OwnerQuery = 48,
    /// Fencing: the generations held.
    OwnerAnswer = 49,
    /// Fencing: the source took the VM back (a rollback); fence your copy.
    Fence = 50,
    /// Fencing: fenced or why not.
    FenceAnswer = 51,
}

impl Kind {
    /// Every kind that may be sent.
    pub const ALL: [Kind; 36] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Reserve,
        Kind::Reserved,
        Kind::Refused,
        Kind::Discarded,
        Kind::Pages,
        Kind::RoundEnd,
        Kind::FileChunk,
        Kind::State,
        Kind::Ready,
        Kind::Go,
        Kind::Running,
        Kind::Abort,
        Kind::Error,
        Kind::Released,
        Kind::Postcopy,
        Kind::PageRequest,
        Kind::DemandPages,
        Kind::PostcopyDone,
        Kind::Resume,
        Kind::Resumed,
        Kind::PagesPlaced,
        Kind::RoundPlaced,
        Kind::ColdOffer,
        Kind::ColdAccepted,
        Kind::ColdFileDone,
        Kind::ColdCommit,
        Kind::ColdRegistered,
        Kind::ColdReleased,
        Kind::ColdQuery,
        Kind::ColdAnswer,
        Kind::OwnerQuery,
        Kind::OwnerAnswer,
        Kind::Fence,
        Kind::FenceAnswer,
    ];

    pub(super) fn from_u16(v: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u16 == v)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A kind's name for error messages.
pub(super) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Invalid => "Invalid",
        Kind::Hello => "Hello",
        Kind::Welcome => "Welcome",
        Kind::Reserve => "Reserve",
        Kind::Reserved => "Reserved",
        Kind::Refused => "Refused",
        Kind::Pages => "Pages",
        Kind::RoundEnd => "RoundEnd",
        Kind::FileChunk => "FileChunk",
        Kind::State => "State",
        Kind::Ready => "Ready",
        Kind::Go => "Go",
        Kind::Running => "Running",
        Kind::Abort => "Abort",
        Kind::Error => "Error",
        Kind::Released => "Released",
        Kind::Discarded => "Discarded",
        Kind::Postcopy => "Postcopy",
        Kind::PageRequest => "PageRequest",
        Kind::DemandPages => "DemandPages",
        Kind::PostcopyDone => "PostcopyDone",
        Kind::Resume => "Resume",
        Kind::Resumed => "Resumed",
        Kind::PagesPlaced => "PagesPlaced",
        Kind::RoundPlaced => "RoundPlaced",
        Kind::ColdOffer => "ColdOffer",
        Kind::ColdAccepted => "ColdAccepted",
        Kind::ColdFileDone => "ColdFileDone",
        Kind::ColdCommit => "ColdCommit",
        Kind::ColdRegistered => "ColdRegistered",
        Kind::ColdReleased => "ColdReleased",
        Kind::ColdQuery => "ColdQuery",
        Kind::ColdAnswer => "ColdAnswer",
        Kind::OwnerQuery => "OwnerQuery",
        Kind::OwnerAnswer => "OwnerAnswer",
        Kind::Fence => "Fence",
        Kind::FenceAnswer => "FenceAnswer",
    }
}
