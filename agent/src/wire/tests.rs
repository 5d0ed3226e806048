//! Frames: round trips, corruption, header checks, version negotiation.

use super::*;

fn parse_frame(bytes: &[u8]) -> Result<Frame, WireError> {
    let header = Header::parse(bytes[..HEADER_LEN].try_into().unwrap())?;
    Frame::parse(header, bytes[HEADER_LEN..].to_vec())
}

#[test]
fn control_frames_round_trip() {
    let msg = messages::Refused {
        reason: "no room".into(),
    };
    let bytes = control_frame(&msg);
    let f = parse_frame(&bytes).unwrap();
    assert_eq!(f.kind(), Kind::Refused);
    let back: messages::Refused = f.decode().unwrap();
    assert_eq!(back.reason, "no room");
    assert!(matches!(
        f.decode::<messages::Reserved>(),
        Err(WireError::Unexpected { .. })
    ));
}

#[test]
fn every_corrupted_byte_is_caught() {
    let bytes = control_frame(&messages::Refused {
        reason: "x".repeat(40),
    });
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        assert!(parse_frame(&b).is_err(), "flip at byte {i} went unnoticed");
    }
}

#[test]
fn a_data_frame_checksums_its_data() {
    let bytes = data_frame(
        &messages::FileChunk {
            name: "disk.img".into(),
            size: 8,
            offset: 0,
        },
        b"12345678",
    );
    let f = parse_frame(&bytes).unwrap();
    assert_eq!(f.data(), b"12345678");
    let mut b = bytes.clone();
    *b.last_mut().unwrap() ^= 1;
    assert!(matches!(parse_frame(&b), Err(WireError::Checksum { .. })));
}

#[test]
fn header_checks_magic_version_kind_and_lengths() {
    let h = Header {
        kind: Kind::Go,
        flags: 0,
        payload_len: 0,
        meta_len: 0,
        crc: 0,
    };
    let other = VERSION + 1;
    let mut b = h.encode();
    set_version(&mut b, other);
    assert!(matches!(
        Header::parse(&b),
        Err(WireError::Version { got }) if got == other
    ));
    let mut b = h.encode();
    b[0] = 0;
    assert!(matches!(Header::parse(&b), Err(WireError::BadMagic(_))));
    let mut b = h.encode();
    b[6] = 99;
    assert!(matches!(Header::parse(&b), Err(WireError::BadKind(99))));
    let big = Header {
        payload_len: MAX_PAYLOAD + 1,
        ..h
    };
    assert!(matches!(
        Header::parse(&big.encode()),
        Err(WireError::BadLength { .. })
    ));
    let inconsistent = Header {
        payload_len: 4,
        meta_len: 8,
        ..h
    };
    assert!(Header::parse(&inconsistent.encode()).is_err());
    let zero = [0u8; HEADER_LEN];
    assert!(Header::parse(&zero).is_err());
}

#[test]
fn versions_negotiate_to_the_highest_common_one() {
    assert_eq!(negotiate(2..=5, 3..=4), Some(4));
    assert_eq!(negotiate(2..=5, 4..=9), Some(5));
    assert_eq!(negotiate(3..=3, 3..=3), Some(3));
    assert_eq!(negotiate(2..=3, 4..=6), None);
    assert_eq!(
        negotiate(supported_versions(), supported_versions()),
        Some(VERSION)
    );
}

#[test]
fn every_kind_parses_back() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_u16(k as u16), Some(k));
        assert_eq!(kind_name(k), k.to_string());
    }
    assert_eq!(Kind::from_u16(0), None);
}
