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
    ("Hello", "564d494707000100010000001a0000001a0000002dc5355c0300040001000000000000006100100000010000000000000063"),
    ("Welcome", "564d494707000200010000000b0000000b0000009f98ee860300010000000000000062"),
    ("Reserve", "564d4947070003000100000084000000840000007aac8cb0010000000000000076000010000000000005000000000000000000000001000000020000000300000004000000001000000000000005000000000000000200000006000000000000000700000000000000080000000000000001000000000000006401010000000100000000000000730100000000000000700101010000000000000074"),
    ("Reserved", "564d49470700040001000000090000000900000059a100f7070000000000000001"),
    ("Refused", "564d49470700050001000000090000000900000014e39a23010000000000000072"),
    ("FileChunk", "564d494707000800010000001b000000190000008af71683010000000000000066020000000000000000000000000000007879"),
    ("RoundEnd", "564d494707000700010000000c0000000c00000053446893020000000900000000000000"),
    ("State", "564d494707000900010000000c0000000c0000007897a441030000000000000001020301"),
    ("Ready", "564d494707000a00010000001d0000001d000000188474eb0101000000000000006d00000000000000f83f0101000000000000006b"),
    ("Go", "564d494707000b000100000000000000000000006be2cf9f"),
    ("Running", "564d494707000c0001000000080000000800000097e615a40b00000000000000"),
    ("Abort", "564d494707000d000100000009000000090000004074a665010000000000000061"),
    ("Error", "564d494707000e000100000009000000090000009a9d5fd1010000000000000065"),
    ("Released", "564d494707000f000100000000000000000000006d356794"),
    ("Discarded", "564d49470700170001000000000000000000000079c795ad"),
    ("Postcopy", "564d494707001000010000003100000031000000a3c179d602000000000000000100000000000000200000000000000002000000000000000100000000000000770807060504030201"),
    ("Resume", "564d494707001400010000001100000011000000b5cbe8d20100000000000000760600000000000000"),
    ("Resumed", "564d494707001500010000002000000020000000e06251eb0100000000000000020000000000000001000000000000000400000000000000"),
    ("PageRequest", "564d494707001100010000001800000018000000641680f5020000000000000005000000000000000600000000000000"),
    ("PagesPlaced", "564d494707001600010000000800000008000000cf1412d80000010000000000"),
    ("PostcopyDone", "564d494707001300010000007100000071000000e813228b0100000000000000020000000000000003000000000000000400000000000000050000000000000006000000000000000700000000000000080000000000000009000000000000000a000000000000000b000000000000000c000000000000000d00000000000000000000000000d03f00"),
    ("ColdOffer", "564d4947070028000100000049000000490000000ace91ed01000000000000006f01000000000000007601000000000000006401000000000000007301010100000000000000740101000000000000000100000000000000660300000000000000"),
    ("ColdAccepted", "564d494707002900010000000a0000000a0000001df99f0701000000000000007401"),
    ("ColdFileDone", "564d494707002a00010000001a0000001a000000d7937cb60100000000000000660300000000000000010000000000000068"),
    ("ColdCommit", "564d494707002b000100000000000000000000005b5a89c2"),
    ("ColdRegistered", "564d494707002c00010000001a0000001a0000001cef0ac30100000000000000010000000000000066010000000000000068"),
    ("ColdReleased", "564d494707002d00010000000000000000000000dee6f5cc"),
    ("ColdQuery", "564d494707002e00010000001200000012000000a72513a001000000000000006f010000000000000076"),
    ("ColdAnswer", "564d494707002f00010000000100000001000000191efb7a01"),
    ("OwnerQuery", "564d49470700300001000000110000001100000013634d2e0100000000000000010000000000000076"),
    ("OwnerAnswer", "564d494707003100010000001900000019000000b1eaa09901000000000000000100000000000000760300000000000000"),
    ("Fence", "564d4947070032000100000011000000110000002d3eeec30100000000000000760400000000000000"),
    ("FenceAnswer", "564d494707003300010000000a0000000a00000016d9e26800010000000000000072"),
    ("Pages", "564d4947070006000000000014100000140000004ef596350200000001000000000000800200000000000000"),
    ("DemandPages", "564d494707001200010000000c1000000c0000008d5d351e010000000300000000000000"),
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
