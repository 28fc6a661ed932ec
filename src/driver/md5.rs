//! MD5 (RFC 1321), the checksum a copy's pieces carry on the data port:
//! `md5sum` is in busybox and coreutils alike, so every guest has it. It
//! guards against corruption on the way, not against a hostile guest (whose
//! archive the copy policy deals with).

/// Per-round shift amounts.
const S: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15,
    21,
];

/// A running digest, fed in pieces of any size.
#[derive(Clone)]
pub struct Md5 {
    state: [u32; 4],
    block: Vec<u8>,
    length: u64,
}

impl Default for Md5 {
    fn default() -> Self {
        Md5 { state: [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476], block: Vec::with_capacity(64), length: 0 }
    }
}

/// The sines of RFC 1321, `floor(abs(sin(i + 1)) * 2^32)`, computed once.
fn sines() -> &'static [u32; 64] {
    static K: std::sync::OnceLock<[u32; 64]> = std::sync::OnceLock::new();
    K.get_or_init(|| std::array::from_fn(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32))
}

impl Md5 {
    pub fn update(&mut self, mut data: &[u8]) {
        self.length += data.len() as u64;
        if !self.block.is_empty() {
            let take = (64 - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() < 64 {
                return;
            }
            let block: [u8; 64] = self.block[..].try_into().expect("a whole block");
            self.compress(&block);
            self.block.clear();
        }
        let mut blocks = data.chunks_exact(64);
        for block in &mut blocks {
            self.compress(block.try_into().expect("a whole block"));
        }
        self.block.extend_from_slice(blocks.remainder());
    }

    fn compress(&mut self, block: &[u8; 64]) {
        let m: [u32; 16] = std::array::from_fn(|i| u32::from_le_bytes(block[4 * i..4 * i + 4].try_into().unwrap()));
        let k = sines();
        let [mut a, mut b, mut c, mut d] = self.state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a.wrapping_add(f).wrapping_add(k[i]).wrapping_add(m[g]).rotate_left(S[i]);
            (a, d, c) = (d, c, b);
            b = b.wrapping_add(rotated);
        }
        for (s, v) in self.state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }

    /// The digest in lowercase hex, as `md5sum` prints it.
    pub fn hex(mut self) -> String {
        let bits = self.length.wrapping_mul(8);
        let pad = (55usize.wrapping_sub(self.block.len())) % 64 + 1;
        let mut tail = vec![0x80u8];
        tail.resize(pad, 0);
        tail.extend_from_slice(&bits.to_le_bytes());
        self.update(&tail);
        self.state.iter().flat_map(|s| s.to_le_bytes()).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_rfc_1321_and_md5sum_whatever_the_pieces() {
        let million_a = vec![b'a'; 1_000_000];
        let cases: [(&[u8], &str); 5] = [
            (b"", "d41d8cd98f00b204e9800998ecf8427e"),
            (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
            (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
            (&million_a, "7707d6ae4e027c70eea2a935c2296f21"),
        ];
        for (data, want) in cases {
            for piece in [1, 55, 56, 63, 64, 65, 4096] {
                let mut m = Md5::default();
                data.chunks(piece).for_each(|c| m.update(c));
                assert_eq!(m.hex(), want, "piece {piece}, {} bytes", data.len());
            }
        }
    }
}
