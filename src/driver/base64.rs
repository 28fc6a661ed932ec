//! Standard base64 (RFC 4648, with padding), the encoding every guest's
//! `base64` tool speaks. The decoder is incremental and skips whitespace, so
//! it takes the guest's output line by line whatever its wrap width.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Wraps base64 text at `width` columns, one line each (as `base64` does by default).
pub fn encode_lines(data: &[u8], width: usize) -> String {
    let flat = encode(data);
    let mut out = String::with_capacity(flat.len() + flat.len() / width + 1);
    for line in flat.as_bytes().chunks(width) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out
}

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes a stream fed in pieces of any size; whitespace is ignored.
#[derive(Debug, Default)]
pub struct Decoder {
    acc: u32,
    bits: u8,
    padded: bool,
}

impl Decoder {
    pub fn feed(&mut self, text: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        for &c in text {
            if c.is_ascii_whitespace() {
                continue;
            }
            if c == b'=' {
                self.padded = true;
                continue;
            }
            if self.padded {
                return Err("base64 data continues after padding".into());
            }
            let v = value(c).ok_or_else(|| format!("invalid base64 byte 0x{c:02x}"))?;
            self.acc = (self.acc << 6 | v) & 0xff_ffff;
            self.bits += 6;
            if self.bits >= 8 {
                self.bits -= 8;
                out.push((self.acc >> self.bits) as u8);
            }
        }
        Ok(())
    }

    /// Checks that the stream ended on a whole group (at most 4 bits of padding left over).
    pub fn finish(self) -> Result<(), String> {
        if self.bits >= 6 {
            return Err("base64 data is truncated".into());
        }
        Ok(())
    }
}

pub fn decode(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut d = Decoder::default();
    d.feed(text, &mut out)?;
    d.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded.as_bytes()).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn every_byte_round_trips_through_wrapped_lines_fed_byte_by_byte() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = encode_lines(&data, 76);
        assert!(text.lines().all(|l| l.len() <= 76));
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for b in text.as_bytes().chunks(1) {
            d.feed(b, &mut out).unwrap();
        }
        d.finish().unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(decode(b"Zm9v!").is_err());
        assert!(decode(b"Zg==Zg==").is_err());
        assert!(decode(b"Z").is_err());
    }
}
