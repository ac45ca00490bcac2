//! XEP-0082 date-times ⇄ [`Timestamp`], and the wall clock (read here and passed down: the
//! room domain never reads a clock).

use pchat_room::Timestamp;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in microseconds since the epoch.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Formats as `2026-11-26T09:41:33.123456Z`.
pub fn format(ts: Timestamp) -> String {
    let secs = ts.as_secs();
    let micros = ts.0.rem_euclid(1_000_000);
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            micros
        ),
        Err(_) => "1970-01-01T00:00:00Z".to_owned(),
    }
}

/// Parses an XEP-0082 date-time (RFC 3339 with a zone).
pub fn parse(s: &str) -> Option<Timestamp> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    let micros = t.unix_timestamp_nanos() / 1000;
    i64::try_from(micros).ok().map(Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let ts = Timestamp(1_764_150_093_123_456);
        assert_eq!(format(ts), "2025-11-26T09:41:33.123456Z");
        assert_eq!(parse(&format(ts)), Some(ts));
        assert_eq!(
            parse("2025-11-26T10:41:33+01:00"),
            Some(Timestamp(1_764_150_093_000_000))
        );
        assert_eq!(parse("yesterday"), None);
    }
}
