//! The TLS 1.3 record layer of an established migration connection (RFC 8446 §5.2), over the
//! traffic keys rustls hands over after the handshake (what kernel TLS would take).
//!
//! rustls authenticates the peers and agrees the keys; from then on each direction is its own
//! state (key, IV, sequence number), so the reader and the writers never share a lock, and
//! pages are copied once, into the record being sealed, instead of through rustls's buffers:
//!
//! ```text
//! record = 0x17 0x03 0x03 len:u16be ‖ AEAD(key, iv ⊕ seq, aad = the 5 header bytes,
//!                                          plaintext ‖ 0x17)  ‖ tag (16 bytes)
//! ```
//!
//! Only application-data records are accepted; an alert is reported with its description,
//! anything else (a key update, a ticket) ends the connection: vmig peers send neither.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, NONCE_LEN,
};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext of a record.
const MAX_PLAIN: usize = 1 << 14;
/// Record header length.
const HEADER: usize = 5;
/// AEAD tag length (all three suites).
const TAG: usize = 16;
/// Largest ciphertext a peer may send (RFC 8446: 2^14 + 256).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Records per key and direction: well under AES-GCM's limit (RFC 8446 §5.5: 2^24.5), about
/// 256 GiB of pages. A longer connection is closed (there is no key update).
const MAX_RECORDS: u64 = 1 << 24;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;

/// One direction's key, IV and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, s: ConnectionTrafficSecrets) -> io::Result<Keys> {
        let (alg, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(io::Error::other("unsupported TLS cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("bad TLS traffic key"))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("bad TLS IV length"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (IV ⊕ sequence number).
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "TLS record limit of this connection reached (no key update): reconnect",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// The sending direction: seals whole frames into records and writes them.
pub(crate) struct Sealer {
    keys: Keys,
    sock: TcpStream,
    out: Vec<u8>,
}

impl Sealer {
    pub(crate) fn new(seq: u64, s: ConnectionTrafficSecrets, sock: TcpStream) -> io::Result<Self> {
        Ok(Sealer {
            keys: Keys::new(seq, s)?,
            sock,
            out: Vec::new(),
        })
    }

    /// Seals the concatenation of `parts` into records and writes them all.
    pub(crate) fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let records = total.div_ceil(MAX_PLAIN).max(1);
        self.out.clear();
        self.out.reserve(total + records * (HEADER + 1 + TAG));
        let mut parts = parts.iter().copied().filter(|p| !p.is_empty());
        let mut cur: &[u8] = parts.next().unwrap_or(&[]);
        let mut left = total;
        while left > 0 {
            let n = left.min(MAX_PLAIN);
            let start = self.out.len();
            let len = (n + 1 + TAG) as u16;
            self.out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
            self.out.extend_from_slice(&len.to_be_bytes());
            let mut want = n;
            while want > 0 {
                if cur.is_empty() {
                    cur = parts.next().expect("parts hold `total` bytes");
                }
                let k = want.min(cur.len());
                self.out.extend_from_slice(&cur[..k]);
                cur = &cur[k..];
                want -= k;
            }
            self.out.push(APPLICATION_DATA);
            let header: [u8; HEADER] = self.out[start..start + HEADER]
                .try_into()
                .expect("five bytes");
            let nonce = self.keys.next_nonce()?;
            let tag = self
                .keys
                .key
                .seal_in_place_separate_tag(
                    nonce,
                    Aad::from(header),
                    &mut self.out[start + HEADER..],
                )
                .map_err(|_| io::Error::other("TLS record encryption failed"))?;
            self.out.extend_from_slice(tag.as_ref());
            left -= n;
        }
        let r = self.sock.write_all(&self.out);
        if self.out.capacity() > 8 << 20 {
            self.out = Vec::new();
        }
        r
    }
}

/// The receiving direction: reads records, opens them in place, hands out the plaintext.
pub(crate) struct Opener {
    keys: Keys,
    sock: TcpStream,
    buf: Box<[u8]>,
    /// Raw bytes not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last opened record not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
}

impl Opener {
    /// `pending`: bytes the handshake read past its end (the start of the first record).
    pub(crate) fn new(
        seq: u64,
        s: ConnectionTrafficSecrets,
        sock: TcpStream,
        pending: &[u8],
    ) -> io::Result<Self> {
        let mut buf = vec![0u8; 4 * (HEADER + MAX_CIPHER)].into_boxed_slice();
        if pending.len() > buf.len() {
            return Err(io::Error::other("too many bytes after the TLS handshake"));
        }
        buf[..pending.len()].copy_from_slice(pending);
        Ok(Opener {
            keys: Keys::new(seq, s)?,
            sock,
            buf,
            start: 0,
            end: pending.len(),
            plain: (0, 0),
        })
    }

    /// Whether bytes are here already (opened or not) that polling the socket would not show.
    pub(crate) fn buffered(&self) -> bool {
        self.plain.0 < self.plain.1 || self.start < self.end
    }

    /// Reads decrypted bytes; Ok(0) at the end of the stream.
    pub(crate) fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.plain.0 == self.plain.1 {
            if !self.open_next()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.plain.1 - self.plain.0);
        out[..n].copy_from_slice(&self.buf[self.plain.0..self.plain.0 + n]);
        self.plain.0 += n;
        Ok(n)
    }

    /// Reads until `buf[start..]` holds `want` bytes; false at the end of the stream.
    fn fill(&mut self, want: usize) -> io::Result<bool> {
        if self.start + want > self.buf.len() {
            // Keep the partial record, move it to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < want {
            match self.sock.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return if self.end == self.start {
                        Ok(false)
                    } else {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Opens the next record into `plain`; false at a clean end of the stream.
    fn open_next(&mut self) -> io::Result<bool> {
        if !self.fill(HEADER)? {
            return Ok(false);
        }
        let h: [u8; HEADER] = self.buf[self.start..self.start + HEADER]
            .try_into()
            .expect("five bytes");
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if h[0] != APPLICATION_DATA || h[1..3] != [3, 3] || !(TAG + 1..=MAX_CIPHER).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a TLS 1.3 application-data record",
            ));
        }
        if !self.fill(HEADER + len)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let body = self.start + HEADER;
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(h), &mut self.buf[body..body + len])
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS record failed authentication (corrupted or forged)",
                )
            })?;
        // Content, then its type, then zero padding (vmig peers never pad: look there first).
        let last = plain.len() - 1;
        let at = if plain[last] != 0 {
            Some(last)
        } else {
            plain.iter().rposition(|&b| b != 0)
        };
        let Some(at) = at else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record without a type",
            ));
        };
        let kind = plain[at];
        let (pstart, pend) = (body, body + at);
        self.start = body + len;
        match kind {
            APPLICATION_DATA => {
                self.plain = (pstart, pend);
                Ok(true)
            }
            ALERT if at >= 2 => {
                let desc = rustls::AlertDescription::from(self.buf[pstart + 1]);
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the peer sent a TLS alert: {desc:?}"),
                ))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected TLS record of type {other} after the handshake"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};
    use std::net::TcpListener;

    fn secrets() -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::new([9u8; NONCE_LEN]),
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn records_cross_and_split_at_the_record_size() {
        let (a, b) = pair();
        let mut s = Sealer::new(5, secrets(), a).unwrap();
        let mut o = Opener::new(5, secrets(), b, &[]).unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        s.send(&[b"head", &big[..40_000], &big[40_000..]]).unwrap();
        s.send(&[b"x"]).unwrap();
        let mut got = vec![0u8; 4 + big.len() + 1];
        let mut at = 0;
        while at < got.len() {
            at += o.read(&mut got[at..]).unwrap();
        }
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..4 + big.len()], &big[..]);
        assert_eq!(got[4 + big.len()], b'x');
        assert!(!o.buffered());
    }

    #[test]
    fn a_flipped_bit_or_a_replayed_record_is_refused() {
        let (a, mut b) = pair();
        let mut s = Sealer::new(0, secrets(), a).unwrap();
        s.send(&[b"hello"]).unwrap();
        let rec = s.out.clone();
        let mut raw = vec![0u8; rec.len()];
        b.read_exact(&mut raw).unwrap();
        let (x, y) = pair();
        let mut o = Opener::new(0, secrets(), y, &[]).unwrap();
        let mut bad = raw.clone();
        bad[HEADER + 1] ^= 1;
        let mut xx = x;
        xx.write_all(&bad).unwrap();
        let e = o.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The genuine record again, but at the next sequence number: refused too.
        let (x, y) = pair();
        let mut o = Opener::new(0, secrets(), y, &[]).unwrap();
        let mut xx = x;
        xx.write_all(&raw).unwrap();
        xx.write_all(&raw).unwrap();
        assert_eq!(o.read(&mut [0u8; 16]).unwrap(), 5);
        assert!(
            o.read(&mut [0u8; 16]).is_err(),
            "a replayed record was accepted"
        );
    }
}
