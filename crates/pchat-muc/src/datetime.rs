//! XEP-0082 date-times (`1969-07-21T02:56:15Z`, optional fraction and offset), as used by the
//! `since` attribute of MUC history requests. A few lines here spare a date crate.

use pchat_room::Timestamp;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses an XEP-0082 DateTime; `None` when malformed.
pub fn parse(s: &str) -> Option<Timestamp> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (ys, ms, ds) = (d.next()?, d.next()?, d.next()?);
    // Fixed widths (CCYY-MM-DD) also bound the arithmetic below: no year can overflow it.
    if ys.len() != 4 || ms.len() != 2 || ds.len() != 2 {
        return None;
    }
    let (y, mo, da) = (num(ys)?, num(ms)?, num(ds)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || rest.len() < 8 {
        return None;
    }
    let time = rest.get(..8)?;
    let mut t = time.splitn(3, ':');
    let (h, mi, se) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut tail = rest.get(8..)?;
    let mut micros = 0i64;
    if let Some(frac) = tail.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut scaled = frac[..digits].chars().take(6).collect::<String>();
        while scaled.len() < 6 {
            scaled.push('0');
        }
        micros = num(&scaled)?;
        tail = &frac[digits..];
    }
    let offset_secs = match tail {
        "Z" => 0,
        _ => {
            let sign = match tail.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = tail[1..].split_once(':')?;
            let (oh, om) = (num(oh)?, num(om)?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se - offset_secs;
    Some(Timestamp(secs.checked_mul(1_000_000)?.checked_add(micros)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        #[rustfmt::skip]
        let cases = [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("1969-07-21T02:56:15Z", Some(-14_159_025_000_000)),
            ("1969-07-20T21:56:15-05:00", Some(-14_159_025_000_000)),
            ("2024-02-29T12:00:00.5Z", Some(1_709_208_000_500_000)),
            ("2024-02-29T12:00:00.123456789+00:00", Some(1_709_208_000_123_456)),
            ("2024-02-29", None),
            ("2024-13-01T00:00:00Z", None),
            ("2024-01-01T00:00:00", None),
            ("2024-01-01T00:00:00.Z", None),
            ("x", None),
            ("99999999999999999-01-01T00:00:00Z", None),
            ("2024-1-01T00:00:00Z", None),
        ];
        for (s, expect) in cases {
            assert_eq!(parse(s).map(|t| t.0), expect, "{s}");
        }
    }
}
