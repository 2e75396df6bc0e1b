//! Times on the command line: durations (`1s`, `500ms`, `1h 30m`, or plain
//! seconds) and instants (`2026-12-01`, `2026-12-01 10:00`, RFC 3339, or
//! plain Unix seconds), parsed for clap.

use std::time::{Duration, UNIX_EPOCH};

/// A duration: `1s`, `500ms`, `2m 30s` (humantime's forms), or a plain
/// number of seconds, as older versions took (`2.5`).
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{text:?} is not a duration: seconds must be 0 or more"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write it like 10s, 500ms, 2m 30s or 1h")
    })
}

/// An instant as Unix seconds: `2026-12-01` (midnight UTC),
/// `2026-12-01 10:00`, `2026-12-01T10:00:00Z` (RFC 3339, UTC), `now`, or
/// a plain number of seconds since the Unix epoch.
pub(crate) fn instant(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(junction::unix_now());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    // humantime wants the seconds; people often leave them (and the time)
    // out.
    let full = match text.len() {
        10 => format!("{text} 00:00:00"),
        16 => format!("{text}:00"),
        _ => text.to_string(),
    };
    let at = humantime::parse_rfc3339_weak(&full).map_err(|e| {
        format!(
            "{text:?} is not a date ({e}); write it like 2026-12-01, 2026-12-01 10:00 \
             or 2026-12-01T10:00:00Z (UTC), or as seconds since the Unix epoch"
        )
    })?;
    Ok(at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_secs())
}

/// Seconds since the Unix epoch of `t`, for tests.
#[cfg(test)]
fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_words_and_seconds() {
        assert_eq!(duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(duration("-1").unwrap_err().contains("0 or more"));
        assert!(duration("soon").unwrap_err().contains("10s, 500ms"));
    }

    #[test]
    fn instants_as_dates_or_seconds() {
        assert_eq!(instant("2026-12-01"), Ok(1_796_083_200));
        assert_eq!(instant("2026-12-01 10:00"), Ok(1_796_119_200));
        assert_eq!(instant("2026-12-01T10:00:00Z"), Ok(1_796_119_200));
        assert_eq!(instant("1796119200"), Ok(1_796_119_200));
        let now = secs(std::time::SystemTime::now());
        assert!(instant("now").unwrap().abs_diff(now) < 60);
        assert!(instant("tomorrow").unwrap_err().contains("2026-12-01"));
    }
}
