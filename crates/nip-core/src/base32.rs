//! Nix's base32 ("nix32") encoding: the alphabet and bit order used in store paths and hashes.
//!
//! Nix encodes starting from the *last* output character, so the bit layout differs from
//! RFC 4648 base32; this module reproduces it exactly.

/// The 32 digits of nix32 (no `e`, `o`, `u`, `t`, to avoid accidental words).
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not valid nix32.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid character {ch:?} at position {pos} in nix32 string")]
    InvalidChar { ch: char, pos: usize },
    #[error("invalid nix32 length {0}: no byte length encodes to it")]
    InvalidLength(usize),
    #[error("nix32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Number of nix32 characters needed for `byte_len` bytes.
pub fn encoded_len(byte_len: usize) -> usize {
    (byte_len * 8).div_ceil(5)
}

/// True if `c` is one of the 32 nix32 digits.
pub fn is_nix32_char(c: u8) -> bool {
    digit_value(c).is_some()
}

/// Each byte's digit value, or `NOT_A_DIGIT`: built from `ALPHABET`, so the two cannot disagree.
/// Every narinfo request parses a hash: a table beats scanning the alphabet per character.
const DIGITS: [u8; 256] = {
    let mut t = [NOT_A_DIGIT; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};
const NOT_A_DIGIT: u8 = 0xff;

fn digit_value(c: u8) -> Option<u8> {
    match DIGITS[c as usize] {
        NOT_A_DIGIT => None,
        d => Some(d),
    }
}

/// Encode bytes as nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        // Widen to u16 so the shift by 8 (j == 0) is defined; those bits are masked off.
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        let c = (lo as u16 | hi) & 0x1f;
        out.push(ALPHABET[c as usize] as char);
    }
    out
}

/// Decode a nix32 string; rejects characters outside [`ALPHABET`], lengths that no byte
/// string encodes to, and non-zero leftover bits (as Nix does).
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    // Validate characters first so multi-byte input is reported as a whole char.
    if let Some((pos, ch)) = s
        .char_indices()
        .find(|&(_, ch)| !ch.is_ascii() || !is_nix32_char(ch as u8))
    {
        return Err(Base32Error::InvalidChar { ch, pos });
    }
    let chars = s.as_bytes();
    let byte_len = chars.len() * 5 / 8;
    if encoded_len(byte_len) != chars.len() {
        return Err(Base32Error::InvalidLength(chars.len()));
    }
    let mut out = vec![0u8; byte_len];
    for (n, &c) in chars.iter().rev().enumerate() {
        let digit = digit_value(c).unwrap_or(0) as u16; // validated above
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let shifted = digit << j;
        out[i] |= shifted as u8;
        let carry = (shifted >> 8) as u8;
        if i + 1 < byte_len {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn empty_sha256_vector() {
        let digest = Sha256::digest(b"");
        assert_eq!(
            hex::encode(digest),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let s = encode(&digest);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&s).unwrap(), digest.to_vec());
    }

    #[test]
    fn digit_table_matches_the_alphabet() {
        for c in 0..=255u8 {
            let expected = ALPHABET.iter().position(|&a| a == c).map(|p| p as u8);
            assert_eq!(digit_value(c), expected, "byte {c}");
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn rejects_bad_chars() {
        for bad in ['e', 'o', 'u', 't', 'A', '-', ' ', '\0', 'é'] {
            let s = format!("{bad}{}", "0".repeat(51));
            assert_eq!(
                decode(&s),
                Err(Base32Error::InvalidChar { ch: bad, pos: 0 }),
                "{s:?}"
            );
        }
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e"),
            Err(Base32Error::InvalidChar { ch: 'e', pos: 51 })
        );
    }

    #[test]
    fn rejects_bad_length_and_padding() {
        assert_eq!(decode("000"), Err(Base32Error::InvalidLength(3)));
        assert_eq!(decode("0"), Err(Base32Error::InvalidLength(1)));
        // One byte uses 8 of 10 bits; the top 2 bits of the first char must be zero.
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
        assert_eq!(decode("8z"), Err(Base32Error::NonZeroPadding));
        // 52 chars carry 4 spare bits; a first digit >= 16 sets them.
        let mut s = encode(&[0xff; 32]);
        assert_eq!(&s[..1], "1");
        s.replace_range(..1, "g");
        assert_eq!(decode(&s), Err(Base32Error::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert!(s.bytes().all(is_nix32_char));
            prop_assert_eq!(decode(&s).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,80}") {
            let _ = decode(&s);
        }

        #[test]
        fn decode_nix32_strings_never_panics(s in "[0-9a-z]{0,60}") {
            if let Ok(bytes) = decode(&s) {
                prop_assert_eq!(encode(&bytes), s);
            }
        }
    }
}
