//! The bodies of the fuzz targets (`fuzz/`): one per decoder of bytes that come from the
//! network or a file. Each must return, never panic, whatever the bytes. The coverage-guided
//! runs are in `fuzz/` (`docs/security.md`); the test below passes seeds and their random
//! mutations through every body on each test run, so that they keep compiling and working.

use std::collections::HashMap;

use crate::inventory::VmDef;
use crate::wire::{self, messages as msg, Frame, Header, Message, HEADER_LEN};

/// Guest pages the page-table decoder checks entries against (a 1 GiB guest).
const GUEST_PAGES: u64 = 1 << 18;

/// A frame off the wire: the header, then the payload checked against its CRC as the
/// receiver does, then its metadata through every control message's decoder and the page
/// table's.
pub fn frame(data: &[u8]) {
    let Some(h) = data.get(..HEADER_LEN) else {
        return;
    };
    let Ok(header) = Header::parse(h.try_into().expect("HEADER_LEN bytes")) else {
        return;
    };
    let rest = &data[HEADER_LEN..];
    let Some(payload) = rest.get(..header.payload_len as usize) else {
        return;
    };
    let Ok(f) = Frame::parse(header, payload.to_vec()) else {
        return;
    };
    control(&f);
    let _ = wire::pages::frame_pages(&f, GUEST_PAGES);
}

/// Every control message's decoder over the frame (the one of its kind decodes it).
fn control(f: &Frame) {
    let _ = f.decode::<msg::Hello>();
    let _ = f.decode::<msg::Welcome>();
    let _ = f.decode::<msg::Reserve>();
    let _ = f.decode::<msg::Reserved>();
    let _ = f.decode::<msg::Refused>();
    let _ = f.decode::<msg::FileChunk>();
    let _ = f.decode::<msg::RoundEnd>();
    let _ = f.decode::<msg::State>();
    let _ = f.decode::<msg::Ready>();
    let _ = f.decode::<msg::Go>();
    let _ = f.decode::<msg::Running>();
    let _ = f.decode::<msg::Abort>();
    let _ = f.decode::<msg::Released>();
    let _ = f.decode::<msg::Postcopy>();
    let _ = f.decode::<msg::Resume>();
    let _ = f.decode::<msg::Resumed>();
    let _ = f.decode::<msg::PageRequest>();
    let _ = f.decode::<msg::PagesPlaced>();
    let _ = f.decode::<msg::RoundPlaced>();
    let _ = f.decode::<msg::PostcopyDone>();
    let _ = f.decode::<msg::ColdOffer>();
    let _ = f.decode::<msg::ColdAccepted>();
    let _ = f.decode::<msg::ColdFileDone>();
    let _ = f.decode::<msg::ColdCommit>();
    let _ = f.decode::<msg::ColdRegistered>();
    let _ = f.decode::<msg::ColdReleased>();
    let _ = f.decode::<msg::ColdQuery>();
    let _ = f.decode::<msg::ColdAnswer>();
    let _ = f.decode::<msg::OwnerQuery>();
    let _ = f.decode::<msg::OwnerAnswer>();
    let _ = f.decode::<msg::Fence>();
    let _ = f.decode::<msg::FenceAnswer>();
}

fn as_every<M: Message>(meta: &[u8]) {
    let _ = wire::frame_of(M::KIND, meta).decode::<M>();
}

/// A page table: the first 4 bytes give the data length the table must match.
pub fn pages(data: &[u8]) {
    let Some(len) = data.get(..4) else {
        return;
    };
    let data_len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let _ = wire::pages::decode(&data[4..], data_len, GUEST_PAGES);
}

/// A control message alone: the bytes as the metadata of a frame of each message's kind.
pub fn message(data: &[u8]) {
    as_every::<msg::Hello>(data);
    as_every::<msg::Welcome>(data);
    as_every::<msg::Reserve>(data);
    as_every::<msg::Reserved>(data);
    as_every::<msg::Refused>(data);
    as_every::<msg::FileChunk>(data);
    as_every::<msg::RoundEnd>(data);
    as_every::<msg::State>(data);
    as_every::<msg::Ready>(data);
    as_every::<msg::Go>(data);
    as_every::<msg::Running>(data);
    as_every::<msg::Abort>(data);
    as_every::<msg::Released>(data);
    as_every::<msg::Postcopy>(data);
    as_every::<msg::Resume>(data);
    as_every::<msg::Resumed>(data);
    as_every::<msg::PageRequest>(data);
    as_every::<msg::PagesPlaced>(data);
    as_every::<msg::RoundPlaced>(data);
    as_every::<msg::PostcopyDone>(data);
    as_every::<msg::ColdOffer>(data);
    as_every::<msg::ColdAccepted>(data);
    as_every::<msg::ColdFileDone>(data);
    as_every::<msg::ColdCommit>(data);
    as_every::<msg::ColdRegistered>(data);
    as_every::<msg::ColdReleased>(data);
    as_every::<msg::ColdQuery>(data);
    as_every::<msg::ColdAnswer>(data);
    as_every::<msg::OwnerQuery>(data);
    as_every::<msg::OwnerAnswer>(data);
    as_every::<msg::Fence>(data);
    as_every::<msg::FenceAnswer>(data);
}

/// A VM definition file (`vm.toml`), as the destination parses it from the stream.
pub fn definition(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = VmDef::parse(text);
    }
}

/// A hosts file, as the agent reads it.
pub fn hosts(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<HashMap<String, String>>(text);
    }
}

/// Seeds for each target: real encodings (a corpus to start the fuzzer from).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let def = VmDef::parse(
        "name = \"vm1\"\nmemory_mib = 64\nvcpus = 1\nworkload = [\"counter\"]\ndirty_mib = 16\ndirty_rate = 0\ndirty_tracking = \"auto\"\ndisk_mib = 16\n",
    )
    .map(|d| d.to_toml())
    .unwrap_or_default();
    let mut b = wire::pages::PageFrameBuilder::new(wire::pages::PageFrameKind::Pages);
    for i in 0..4u64 {
        b.push(i * 7, i % 2 == 0);
    }
    let table = b.head()[HEADER_LEN..].to_vec();
    let mut pages_seed = (2u32 * 4096).to_le_bytes().to_vec();
    pages_seed.extend_from_slice(&table);
    let hello = msg::Hello {
        min_version: *wire::supported_versions().start(),
        max_version: *wire::supported_versions().end(),
        agent: "hostA".into(),
        page_size: 4096,
        cpu: "0123456789abcdef".into(),
    };
    let resume = msg::Resume {
        name: "vm1".into(),
        session: 42,
    };
    let request = msg::PageRequest {
        pages: vec![1, 2, 3],
    };
    vec![
        ("frame", wire::control_frame(&hello)),
        ("frame", wire::control_frame(&resume)),
        ("frame", wire::control_frame(&request)),
        ("pages", pages_seed),
        (
            "message",
            wire::control_frame(&hello)[HEADER_LEN..].to_vec(),
        ),
        ("definition", def.into_bytes()),
        (
            "hosts",
            b"hostA = \"127.0.0.1:7401\"\nhostB = \"10.0.0.2:7401\"\n".to_vec(),
        ),
    ]
}

/// Runs target `name`'s body on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame" => frame(data),
        "pages" => pages(data),
        "message" => message(data),
        "definition" => definition(data),
        "hosts" => hosts(data),
        other => panic!("no fuzz target {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not coverage-guided (that is `fuzz/`): every seed, then 3000 random mutations of it
    /// (bytes flipped, set, cut, inserted), through its target's body.
    #[test]
    fn decoders_survive_mutations_of_real_input() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (target, seed) in seeds() {
            assert!(!seed.is_empty(), "empty seed for {target}");
            run(target, &seed);
            for _ in 0..3000 {
                let mut d = seed.clone();
                for _ in 0..1 + rnd() % 4 {
                    let at = (rnd() as usize) % d.len().max(1);
                    match rnd() % 4 {
                        0 if !d.is_empty() => d[at] ^= 1 << (rnd() % 8),
                        1 if !d.is_empty() => d[at] = rnd() as u8,
                        2 => d.truncate(at),
                        _ => d.insert(at.min(d.len()), rnd() as u8),
                    }
                }
                run(target, &d);
            }
        }
    }
}
