//! Rates: bytes per second, written as a plain number or with a unit operators know.
//!
//! A plain number is bytes/s (RayLimit's contract). Byte units are `B/s`, `KB/s`, `MB/s`,
//! `GB/s`, `TB/s` (powers of 1000) and `KiB/s`, `MiB/s`, `GiB/s`, `TiB/s` (powers of 1024); the
//! `/s` may be left out. Bit units are tc's: `bit`, `kbit`, `mbit`, `gbit`, `tbit` and the binary
//! `kibit`... forms, with an optional `/s` or `ps`. Spellings that read as bits to some and bytes
//! to others (`10mbps`, `10Mb`) are refused, naming both unambiguous ones.

/// Parses a rate into bytes per second: at least 1, at most `u64::MAX`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if t.starts_with('-') {
        return Err(format!(
            "rate {text:?} is negative; give bytes per second above zero"
        ));
    }
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(format!(
            "rate {text:?} is not a number (examples: 1000000, 10mbit, 5MB/s, 512KiB/s)"
        ));
    }
    if let Some(prefix) = ambiguous_prefix(unit.trim()) {
        let upper = match prefix.to_ascii_lowercase().as_str() {
            "" => String::new(),
            p => {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase())
                    .into_iter()
                    .chain(c)
                    .collect()
            }
        };
        return Err(format!(
            "rate {text:?} is ambiguous: bits or bytes per second? Write {number}{}bit for bits or {number}{upper}B/s for bytes",
            prefix.to_ascii_lowercase()
        ));
    }
    let bits_per_unit = unit_bits(unit.trim()).ok_or_else(|| {
        format!(
            "rate {text:?} has an unknown unit {unit:?} (use B/s, KB/s, MiB/s, kbit, mbit, ...)"
        )
    })?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    // Exact integer arithmetic: (whole.fraction × bits_per_unit) / 8, in u128.
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .filter(|_| fraction.len() <= 30)
        .ok_or_else(|| format!("rate {text:?} has too many decimal places"))?;
    let digits: u128 = format!("{whole}{fraction}").parse().map_err(|_| {
        format!("rate {text:?} is beyond what raylimit can represent (2^64-1 bytes/s)")
    })?;
    let bits = digits
        .checked_mul(bits_per_unit)
        .ok_or_else(|| format!("rate {text:?} is beyond 2^64-1 bytes/s"))?;
    let bytes = bits / scale / 8;
    if bytes == 0 {
        return Err(format!(
            "rate {text:?} is below 1 byte/s; give a rate greater than zero"
        ));
    }
    u64::try_from(bytes).map_err(|_| format!("rate {text:?} is beyond 2^64-1 bytes/s"))
}

/// The prefix of a unit that reads as bits to some and bytes to others: anything ending in `bps`
/// (tc's bytes, everyone else's bits) and a lower-case `b` (`Mb`, `mb/s`: megabits by
/// convention). Bytes are spelled with a capital `B`, bits with `bit`.
fn ambiguous_prefix(unit: &str) -> Option<&str> {
    let lower = unit.to_ascii_lowercase();
    if lower.contains("bit") {
        return None;
    }
    if let Some(prefix) = lower.strip_suffix("bps") {
        return Some(&unit[..prefix.len()]);
    }
    let lower_b = unit
        .strip_suffix("b/s")
        .or_else(|| unit.strip_suffix('b'))?;
    Some(lower_b)
}

/// A rate in bits per second with an SI prefix and at most three significant digits, as
/// operators compare links: `8 Mbit/s`, `4.19 Mbit/s`, `800 bit/s`.
pub fn human(bytes_per_second: u64) -> String {
    let bits = bytes_per_second as f64 * 8.0;
    let (value, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| bits >= *scale)
        .map_or((bits, ""), |(scale, p)| (bits / scale, p));
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{value:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {prefix}bit/s")
}

/// A byte count with an SI prefix and at most three significant digits: `4.27 MB`, `812 B`.
pub fn human_bytes(bytes: u64) -> String {
    let n = bytes as f64;
    let (value, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| n >= *scale)
        .map_or((n, ""), |(scale, p)| (n / scale, p));
    let digits = match value {
        v if v >= 100.0 || prefix.is_empty() => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    };
    format!("{value:.digits$} {prefix}B")
}

/// Bits per unit, or None for an unknown unit.
fn unit_bits(unit: &str) -> Option<u128> {
    let lower = unit.to_ascii_lowercase();
    if lower.is_empty() {
        return Some(8);
    }
    let bit_unit = lower
        .strip_suffix("bit/s")
        .or_else(|| lower.strip_suffix("bitps"))
        .or_else(|| lower.strip_suffix("bit"));
    if let Some(prefix) = bit_unit {
        return prefix_scale(prefix);
    }
    let byte_prefix = lower
        .strip_suffix("b/s")
        .or_else(|| lower.strip_suffix("bps"))
        .or_else(|| lower.strip_suffix('b'))?;
    Some(prefix_scale(byte_prefix)? * 8)
}

/// `k`, `m`, `g`, `t` are powers of 1000; `ki`, `mi`, `gi`, `ti` powers of 1024.
fn prefix_scale(prefix: &str) -> Option<u128> {
    const K: u128 = 1000;
    const KI: u128 = 1024;
    Some(match prefix {
        "" => 1,
        "k" => K,
        "m" => K.pow(2),
        "g" => K.pow(3),
        "t" => K.pow(4),
        "ki" => KI,
        "mi" => KI.pow(2),
        "gi" => KI.pow(3),
        "ti" => KI.pow(4),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn units_convert_to_bytes_per_second() {
        assert_eq!(parse_rate("2048"), Ok(2048));
        assert_eq!(parse_rate("10mbit"), Ok(1_250_000));
        assert_eq!(parse_rate("10Mbit/s"), Ok(1_250_000));
        assert_eq!(parse_rate("5MB/s"), Ok(5_000_000));
        assert_eq!(parse_rate("512KiB/s"), Ok(524_288));
        assert_eq!(parse_rate("1.5MB/s"), Ok(1_500_000));
        assert_eq!(parse_rate("100B/s"), Ok(100));
        assert_eq!(parse_rate("2 MB"), Ok(2_000_000));
        assert_eq!(parse_rate("1GiB"), Ok(1 << 30));
        assert_eq!(parse_rate("18446744073709551615"), Ok(u64::MAX));
    }

    /// `10mbps` read as 10 MB/s by tc and as 10 Mbit/s by most people: refused, with both
    /// unambiguous spellings.
    #[test]
    fn ambiguous_units_are_refused_with_both_readings() {
        for (text, bits, bytes) in [
            ("10mbps", "10mbit", "10MB/s"),
            ("10Mbps", "10mbit", "10MB/s"),
            ("10 mbps", "10mbit", "10MB/s"),
            ("5kbps", "5kbit", "5KB/s"),
            ("100bps", "100bit", "100B/s"),
            ("3Mb", "3mbit", "3MB/s"),
            ("3mb/s", "3mbit", "3MB/s"),
            ("2gibps", "2gibit", "2GiB/s"),
        ] {
            let e = parse_rate(text).unwrap_err();
            assert!(
                e.contains("ambiguous") && e.contains(bits) && e.contains(bytes),
                "{text}: {e}"
            );
        }
        // Both suggestions parse, to rates eight times apart.
        assert_eq!(parse_rate("10mbit"), Ok(1_250_000));
        assert_eq!(parse_rate("10MB/s"), Ok(10_000_000));
    }

    #[test]
    fn rates_read_back_in_bits() {
        use super::human;
        assert_eq!(human(250_000), "2 Mbit/s");
        assert_eq!(human(524_288), "4.19 Mbit/s");
        assert_eq!(human(1_250_000), "10 Mbit/s");
        assert_eq!(human(100), "800 bit/s");
        assert_eq!(human(1000), "8 kbit/s");
        assert_eq!(human(125_000_000_000), "1 Tbit/s");
        assert_eq!(human(12_345_678), "98.8 Mbit/s");
    }

    #[test]
    fn bad_rates_are_refused() {
        for bad in [
            "0",
            "-5",
            "abc",
            "",
            "1bit",
            "18446744073709551616",
            "99999999999999999999999999999999999999999",
            "5 parsecs",
            "1.2.3",
            "20000000000000000000GB/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad} was accepted");
        }
    }
}
