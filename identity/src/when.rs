//! Times for people: Unix seconds as a UTC date, and how far a time is
//! from now, so that messages never show raw epoch seconds.

/// `secs` since the Unix epoch as `2026-12-01 10:00 UTC` (seconds shown
/// only when not zero).
///
/// ```
/// use junction_identity::when::utc;
/// assert_eq!(utc(0), "1970-01-01 00:00 UTC");
/// assert_eq!(utc(1_796_119_200), "2026-12-01 10:00 UTC");
/// assert_eq!(utc(1_796_119_201), "2026-12-01 10:00:01 UTC");
/// assert_eq!(utc(u64::MAX), "never");
/// ```
pub fn utc(secs: u64) -> String {
    // Certificates that never end are made with u64::MAX; and a year past
    // 9999 is no date anyone means.
    if secs >= 253_402_300_800 {
        return "never".to_string();
    }
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let (h, min, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    if s == 0 {
        format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02} UTC")
    } else {
        format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02} UTC")
    }
}

/// How far `then` is from `now` (both Unix seconds), roughly, for people:
/// `in 23 h`, `5 min ago`, `now`.
///
/// ```
/// use junction_identity::when::relative;
/// assert_eq!(relative(100, 100), "now");
/// assert_eq!(relative(100 + 23 * 3600 + 59, 100), "in 23 h");
/// assert_eq!(relative(100, 100 + 90), "1 min ago");
/// assert_eq!(relative(3 * 86_400, 0), "in 3 days");
/// ```
pub fn relative(then: u64, now: u64) -> String {
    let (gap, future) = if then >= now {
        (then - now, true)
    } else {
        (now - then, false)
    };
    let amount = match gap {
        0 => return "now".to_string(),
        1..60 => format!("{gap} s"),
        60..3600 => format!("{} min", gap / 60),
        3600..172_800 => format!("{} h", gap / 3600),
        _ if gap >= 253_402_300_800 => return "never".to_string(),
        _ => format!("{} days", gap / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// `utc(then)` with how far it is from `now`: `2026-12-01 10:00 UTC (in 23 h)`.
pub fn dated(then: u64, now: u64) -> String {
    match utc(then).as_str() {
        "never" => "never".to_string(),
        date => format!("{date} ({})", relative(then, now)),
    }
}

/// Year, month and day of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, exact for the proleptic Gregorian
/// calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_days() {
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_709_164_800), "2024-02-29 00:00 UTC");
        assert_eq!(utc(253_402_300_799), "9999-12-31 23:59:59 UTC");
        assert_eq!(dated(7_200, 0), "1970-01-01 02:00 UTC (in 2 h)");
        assert_eq!(dated(u64::MAX, 0), "never");
    }
}
