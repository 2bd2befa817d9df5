//! Option values read the way the C `cbt-util` reads them, so scripts that pass odd values get
//! the same result: sizes through `strtoull(.., 10)`, the consistency flag through `atoi`,
//! UUIDs through libuuid's `uuid_parse`.

use cbt::Uuid;

/// `strtoull(text, NULL, 10)`: leading white space, an optional sign, then as many decimal
/// digits as there are (none: 0); a value past `u64::MAX` is `u64::MAX`, and a minus sign
/// negates modulo 2^64 (so `-1` is `u64::MAX`).
pub fn c_strtoull(text: &str) -> u64 {
    let (negative, digits) = sign_and_digits(text);
    let mut value: u64 = 0;
    for digit in digits.bytes().map(|b| u64::from(b - b'0')) {
        match value.checked_mul(10).and_then(|v| v.checked_add(digit)) {
            Some(next) => value = next,
            None => return u64::MAX,
        }
    }
    if negative {
        value.wrapping_neg()
    } else {
        value
    }
}

/// `atoi(text)` as glibc computes it: `strtol` (saturating at the 64-bit limits), then the
/// low 32 bits as an `int`.
pub fn c_atoi(text: &str) -> i32 {
    let (negative, digits) = sign_and_digits(text);
    let mut value: i64 = 0;
    for digit in digits.bytes().map(|b| i64::from(b - b'0')) {
        let next = value.checked_mul(10).and_then(|v| {
            if negative {
                v.checked_sub(digit)
            } else {
                v.checked_add(digit)
            }
        });
        match next {
            Some(next) => value = next,
            None => {
                value = if negative { i64::MIN } else { i64::MAX };
                break;
            }
        }
    }
    let low = value.to_le_bytes();
    i32::from_le_bytes([low[0], low[1], low[2], low[3]])
}

/// Skips C white space and an optional sign; returns whether it was `-` and the leading run
/// of decimal digits after it.
fn sign_and_digits(text: &str) -> (bool, &str) {
    let text = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let end = rest
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    (negative, &rest[..end])
}

/// `uuid_parse`: exactly 36 characters, `-` at 8, 13, 18 and 23, hexadecimal digits (either
/// case) elsewhere; `None` for anything else.
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut uuid = Uuid::default();
    let mut nibbles = Vec::with_capacity(32);
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 8 | 13 | 18 | 23) {
            if *byte != b'-' {
                return None;
            }
            continue;
        }
        let value = char::from(*byte).to_digit(16)?;
        nibbles.push(u8::try_from(value).ok()?);
    }
    for (slot, pair) in uuid.iter_mut().zip(nibbles.chunks_exact(2)) {
        *slot = pair[0] << 4 | pair[1];
    }
    Some(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_convert_like_strtoull() {
        assert_eq!(c_strtoull("68719476736"), 68_719_476_736);
        assert_eq!(c_strtoull("  +42xyz"), 42);
        assert_eq!(c_strtoull("abc"), 0);
        assert_eq!(c_strtoull(""), 0);
        assert_eq!(c_strtoull("-1"), u64::MAX);
        assert_eq!(c_strtoull("-"), 0);
        assert_eq!(c_strtoull("99999999999999999999999"), u64::MAX);
        assert_eq!(c_strtoull("18446744073709551615"), u64::MAX);
        assert_eq!(c_strtoull("0x10"), 0);
    }

    #[test]
    fn flags_convert_like_atoi() {
        assert_eq!(c_atoi("1"), 1);
        assert_eq!(c_atoi(" -7 "), -7);
        assert_eq!(c_atoi("yes"), 0);
        assert_eq!(c_atoi("4294967297"), 1);
        assert_eq!(c_atoi("99999999999999999999"), -1);
        assert_eq!(c_atoi("-99999999999999999999"), 0);
    }

    #[test]
    fn uuids_parse_like_libuuid() {
        let uuid = parse_uuid("00112233-4455-6677-8899-AABBCCDDEEFF").unwrap();
        assert_eq!(
            uuid,
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(
            vhd::create::format_uuid(&uuid),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        for bad in [
            "",
            "00112233-4455-6677-8899-aabbccddeef",
            "00112233-4455-6677-8899-aabbccddeeff0",
            "00112233+4455-6677-8899-aabbccddeeff",
            "0011223g-4455-6677-8899-aabbccddeeff",
            "001122334455-6677-8899-aabbccddeeff-",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad:?}");
        }
    }
}
