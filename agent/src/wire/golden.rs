//! Golden bytes: the exact encoding of one frame of every message. A failure here means the
//! protocol changed: bump `VERSION` (and `MIN_VERSION` unless the old encoding is still spoken),
//! then update the bytes.

use super::bitmap::Bitmap;
use super::messages::*;
use super::pages::{PageFrameBuilder, PageFrameKind};
use super::{control_frame, data_frame, Message};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn frame<M: Message>(m: M) -> String {
    hex(&control_frame(&m))
}

/// One frame of every message, with fixed contents.
fn frames() -> Vec<(&'static str, String)> {
    let mut pages = PageFrameBuilder::new(PageFrameKind::Pages);
    pages.push(1, true);
    pages.push(2, false);
    let mut demand = PageFrameBuilder::new(PageFrameKind::Demand);
    demand.push(3, false);
    vec![
        (
            "Hello",
            frame(Hello {
                min_version: 3,
                max_version: 4,
                agent: "a".into(),
                page_size: 4096,
                cpu: "c".into(),
            }),
        ),
        (
            "Welcome",
            frame(Welcome {
                version: 3,
                agent: "b".into(),
            }),
        ),
        (
            "Reserve",
            frame(Reserve {
                name: "v".into(),
                spec: VmSpec {
                    memory: 1 << 20,
                    programs: vec![
                        Program::Idle,
                        Program::Dirty,
                        Program::Counter,
                        Program::Fill,
                        Program::Disk,
                    ],
                    dirty_bytes: 4096,
                    dirty_rate: 5,
                    dirty_tracking: Tracking::Bitmap,
                    disk_rate: 6,
                    disk_first_block: 7,
                    disk_blocks: 8,
                },
                definition: "d".into(),
                verify: true,
                storage: StorageRequest::Shared {
                    datastore: "s".into(),
                    probe: "p".into(),
                    or_copy: true,
                },
                target_datastore: Some("t".into()),
            }),
        ),
        (
            "Reserved",
            frame(Reserved {
                memory: 7,
                shared: true,
            }),
        ),
        ("Refused", frame(Refused { reason: "r".into() })),
        (
            "FileChunk",
            hex(&data_frame(
                &FileChunk {
                    name: "f".into(),
                    size: 2,
                    offset: 0,
                },
                b"xy",
            )),
        ),
        ("RoundEnd", frame(RoundEnd { round: 2, pages: 9 })),
        (
            "State",
            frame(State {
                machine: MachineSection {
                    bytes: vec![1, 2, 3],
                },
                verify: true,
            }),
        ),
        (
            "Ready",
            frame(Ready {
                memory_digest: Some("m".into()),
                vcpu_digest: None,
                verify_ms: 1.5,
                disk_digest: Some("k".into()),
            }),
        ),
        ("Go", frame(Go {})),
        ("Running", frame(Running { resume_us: 11 })),
        ("Abort", frame(Abort { reason: "a".into() })),
        ("Error", frame(Error { reason: "e".into() })),
        ("Released", frame(Released {})),
        ("Discarded", frame(Discarded {})),
        (
            "Postcopy",
            frame(Postcopy {
                dirty: Bitmap::of(70, [0, 69]),
                count: 2,
                reason: "w".into(),
                session: 0x0102_0304_0506_0708,
            }),
        ),
        (
            "Resume",
            frame(Resume {
                name: "v".into(),
                session: 6,
            }),
        ),
        (
            "Resumed",
            frame(Resumed {
                missing: Bitmap::of(3, [1]),
                count: 1,
                waiting: 4,
            }),
        ),
        ("PageRequest", frame(PageRequest { pages: vec![5, 6] })),
        ("PagesPlaced", frame(PagesPlaced { bytes: 65536 })),
        ("RoundPlaced", frame(RoundPlaced { round: 2 })),
        (
            "PostcopyDone",
            frame(PostcopyDone {
                stats: PostcopyFigures {
                    pages_missing: 1,
                    faults: 2,
                    duplicate_faults: 3,
                    zero_local: 4,
                    requests: 5,
                    pages_demand: 6,
                    pages_pushed: 7,
                    bytes_demand: 8,
                    bytes_pushed: 9,
                    latency_count: 10,
                    latency_p50_us: 11,
                    latency_p99_us: 12,
                    latency_max_us: 13,
                    duration_ms: 0.25,
                },
                memory_digest: None,
            }),
        ),
        (
            "ColdOffer",
            frame(ColdOffer {
                op: "o".into(),
                name: "v".into(),
                definition: "d".into(),
                source_datastore: "s".into(),
                source_shared: true,
                target_datastore: Some("t".into()),
                move_storage: true,
                files: vec![ColdFile {
                    name: "f".into(),
                    size: 3,
                }],
            }),
        ),
        (
            "ColdAccepted",
            frame(ColdAccepted {
                datastore: "t".into(),
                copy: true,
            }),
        ),
        (
            "ColdFileDone",
            frame(ColdFileDone {
                name: "f".into(),
                size: 3,
                digest: "h".into(),
            }),
        ),
        ("ColdCommit", frame(ColdCommit {})),
        (
            "ColdRegistered",
            frame(ColdRegistered {
                digests: vec![ColdDigest {
                    name: "f".into(),
                    digest: "h".into(),
                }],
            }),
        ),
        ("ColdReleased", frame(ColdReleased {})),
        (
            "ColdQuery",
            frame(ColdQuery {
                op: "o".into(),
                name: "v".into(),
            }),
        ),
        ("ColdAnswer", frame(ColdAnswer { registered: true })),
        (
            "OwnerQuery",
            frame(OwnerQuery {
                names: vec!["v".into()],
            }),
        ),
        (
            "OwnerAnswer",
            frame(OwnerAnswer {
                vms: vec![OwnerEntry {
                    name: "v".into(),
                    generation: 3,
                }],
            }),
        ),
        (
            "Fence",
            frame(Fence {
                name: "v".into(),
                generation: 4,
            }),
        ),
        (
            "FenceAnswer",
            frame(FenceAnswer {
                fenced: false,
                reason: "r".into(),
            }),
        ),
        ("Pages", hex(&pages.head())),
        ("DemandPages", hex(&demand.head_checked([&[0u8; 4096][..]]))),
    ]
}

const GOLDEN: &[(&str, &str)] = &[
    ("Hello", "564d494708000100010000001a0000001a0000008fd196b00300040001000000000000006100100000010000000000000063"),
    ("Welcome", "564d494708000200010000000b0000000b000000204466d90300010000000000000062"),
    ("Reserve", "564d494708000300010000008400000084000000e1308eac010000000000000076000010000000000005000000000000000000000001000000020000000300000004000000001000000000000005000000000000000200000006000000000000000700000000000000080000000000000001000000000000006401010000000100000000000000730100000000000000700101010000000000000074"),
    ("Reserved", "564d494708000400010000000900000009000000466dbaab070000000000000001"),
    ("Refused", "564d4947080005000100000009000000090000000b2f207f010000000000000072"),
    ("FileChunk", "564d494708000800010000001b000000190000005a9622bb010000000000000066020000000000000000000000000000007879"),
    ("RoundEnd", "564d494708000700010000000c0000000c0000009262e9c8020000000900000000000000"),
    ("State", "564d494708000900010000000c0000000c000000b9b1251a030000000000000001020301"),
    ("Ready", "564d494708000a00010000001d0000001d000000fd28f9500101000000000000006d00000000000000f83f0101000000000000006b"),
    ("Go", "564d494708000b000100000000000000000000004a9250e3"),
    ("Running", "564d494708000c000100000008000000080000002cfdb3ad0b00000000000000"),
    ("Abort", "564d494708000d000100000009000000090000005fb81c39010000000000000061"),
    ("Error", "564d494708000e000100000009000000090000008551e58d010000000000000065"),
    ("Released", "564d494708000f000100000000000000000000004c45f8e8"),
    ("Discarded", "564d49470800170001000000000000000000000058b70ad1"),
    ("Postcopy", "564d494708001000010000003100000031000000b1426e8e02000000000000000100000000000000200000000000000002000000000000000100000000000000770807060504030201"),
    ("Resume", "564d494708001400010000001100000011000000140f7c3a0100000000000000760600000000000000"),
    ("Resumed", "564d494708001500010000002000000020000000687cc3d50100000000000000020000000000000001000000000000000400000000000000"),
    ("PageRequest", "564d4947080011000100000018000000180000001b7a68a9020000000000000005000000000000000600000000000000"),
    ("PagesPlaced", "564d494708001600010000000800000008000000740fb4d10000010000000000"),
    ("RoundPlaced", "564d4947080018000100000004000000040000003fbd734502000000"),
    ("PostcopyDone", "564d49470800130001000000710000007100000042f006340100000000000000020000000000000003000000000000000400000000000000050000000000000006000000000000000700000000000000080000000000000009000000000000000a000000000000000b000000000000000c000000000000000d00000000000000000000000000d03f00"),
    ("ColdOffer", "564d4947080028000100000049000000490000000f54696001000000000000006f01000000000000007601000000000000006401000000000000007301010100000000000000740101000000000000000100000000000000660300000000000000"),
    ("ColdAccepted", "564d494708002900010000000a0000000a000000244ecb8a01000000000000007401"),
    ("ColdFileDone", "564d494708002a00010000001a0000001a0000007587df5a0100000000000000660300000000000000010000000000000068"),
    ("ColdCommit", "564d494708002b000100000000000000000000007a2a16be"),
    ("ColdRegistered", "564d494708002c00010000001a0000001a000000befba92f0100000000000000010000000000000066010000000000000068"),
    ("ColdReleased", "564d494708002d00010000000000000000000000ff966ab0"),
    ("ColdQuery", "564d494708002e000100000012000000120000001d222a0101000000000000006f010000000000000076"),
    ("ColdAnswer", "564d494708002f000100000001000000010000003791ee3601"),
    ("OwnerQuery", "564d494708003000010000001100000011000000b2a7d9c60100000000000000010000000000000076"),
    ("OwnerAnswer", "564d494708003100010000001900000019000000706e465901000000000000000100000000000000760300000000000000"),
    ("Fence", "564d4947080032000100000011000000110000008cfa7a2b0100000000000000760400000000000000"),
    ("FenceAnswer", "564d494708003300010000000a0000000a0000002f6eb6e500010000000000000072"),
    ("Pages", "564d494708000600000000001410000014000000e687d8b50200000001000000000000800200000000000000"),
    ("DemandPages", "564d494708001200010000000c1000000c0000009c5a36db010000000300000000000000"),
];

#[test]
fn every_message_encodes_to_its_golden_bytes() {
    let got = frames();
    let printed: String = got
        .iter()
        .map(|(k, h)| format!("    (\"{k}\", \"{h}\"),\n"))
        .collect();
    assert_eq!(
        got.len(),
        GOLDEN.len(),
        "one golden frame per message:\n{printed}"
    );
    for ((kind, bytes), (gk, gb)) in got.iter().zip(GOLDEN) {
        assert_eq!(kind, gk);
        assert_eq!(bytes, gb, "the encoding of {kind} changed:\n{printed}");
    }
}
