//! The audit line of a successful Encrypt or Decrypt, written without going through
//! tracing's formatter.
//!
//! One line per call is the plugin's default (the audit log at info). tracing-subscriber's
//! fmt layer spent ~10k instructions per line on the calling thread (field visitors, a
//! `Debug` per field, level styling, a timestamp through `fmt`). This writes the very same
//! bytes, text or JSON, into a reused per-thread buffer and hands them to the log writer:
//!
//! ```text
//! 2026-11-30T04:32:43.921776Z  INFO kms_plugin::service: op="encrypt" uid=... key_id=... outcome="ok" micros=8
//! {"timestamp":"2026-11-30T04:32:45.976773Z","level":"INFO","fields":{"op":"encrypt","uid":"...","key_id":"...","outcome":"ok","micros":14},"target":"kms_plugin::service"}
//! ```
//!
//! It is used only where it cannot differ from tracing's output: installed by the `serve`
//! command's log set-up when its subscriber is the global one and colours are off (not a
//! terminal), and written only when tracing's filter (`KMS_PLUGIN_LOG`) would let the event
//! through. Errors and every other line still go through tracing.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log_writer::LogWriter;

/// Where audit lines go, and in which format.
struct Sink {
    writer: LogWriter,
    json: bool,
    due: Due,
}

/// Whether tracing's filter lets the line through.
#[derive(Clone, Copy)]
enum Due {
    Always,
    Never,
    /// The filter has span or field directives: its answer can change from call to call.
    AskEachTime,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Routes audit lines to `writer`, as JSON or text (once; later calls change nothing). Call
/// it after the global subscriber is set. With `static_filter` (no span or field directives,
/// so target and level alone decide) the filter is asked once here instead of on every
/// call, where the question cost ~0.2 µs of a ~30 µs call.
pub fn install(writer: LogWriter, json: bool, static_filter: bool) {
    let due = if !static_filter {
        Due::AskEachTime
    } else if enabled() {
        Due::Always
    } else {
        Due::Never
    };
    let _ = SINK.set(Sink { writer, json, due });
}

/// Whether the global subscriber logs an info event of the audit line's target now.
fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// The module path tracing would print as the event's target.
const TARGET: &str = "kms_plugin::service";
/// Longest caller-supplied string in a log line, in characters (longer ones are cut).
pub const MAX_LOGGED_CHARS: usize = 80;

/// Writes the info line of a successful call if the filter lets it through and returns
/// true, or returns false when no audit sink is installed (the caller logs through tracing
/// instead).
pub fn write_ok(op: &str, uid: &str, key_id: &str, micros: u64) -> bool {
    let Some(sink) = SINK.get() else {
        return false;
    };
    match sink.due {
        Due::Always => {}
        Due::Never => return true,
        Due::AskEachTime if enabled() => {}
        Due::AskEachTime => return true,
    }
    thread_local! {
        static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    }
    LINE.with(|line| {
        // Not re-entered (nothing here logs), but a failed borrow must not panic a call.
        let Ok(mut line) = line.try_borrow_mut() else {
            return false;
        };
        line.clear();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format_ok(&mut line, sink.json, now, op, uid, key_id, micros);
        sink.writer.append(&line);
        true
    })
}

/// The whole line, newline included.
fn format_ok(
    out: &mut Vec<u8>,
    json: bool,
    now: std::time::Duration,
    op: &str,
    uid: &str,
    key_id: &str,
    micros: u64,
) {
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        push_timestamp(out, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"op\":\"");
        push_loggable(out, op, true);
        out.extend_from_slice(b"\",\"uid\":\"");
        push_loggable(out, uid, true);
        out.extend_from_slice(b"\",\"key_id\":\"");
        push_loggable(out, key_id, true);
        out.extend_from_slice(b"\",\"outcome\":\"ok\",\"micros\":");
        push_u64(out, micros);
        out.extend_from_slice(b"},\"target\":\"");
        out.extend_from_slice(TARGET.as_bytes());
        out.extend_from_slice(b"\"}\n");
    } else {
        push_timestamp(out, now);
        out.extend_from_slice(b"  INFO ");
        out.extend_from_slice(TARGET.as_bytes());
        out.extend_from_slice(b": op=\"");
        push_loggable(out, op, false);
        out.extend_from_slice(b"\" uid=");
        push_loggable(out, uid, false);
        out.extend_from_slice(b" key_id=");
        push_loggable(out, key_id, false);
        out.extend_from_slice(b" outcome=\"ok\" micros=");
        push_u64(out, micros);
        out.push(b'\n');
    }
}

/// True when every byte is printable ASCII and, in JSON, neither `"` nor `\`. Folded
/// without an early exit, which lets the compiler check 16 or 32 bytes per step.
fn is_plain(bytes: &[u8], json: bool) -> bool {
    let mut bad = 0u8;
    for &b in bytes {
        // Outside `!`..=`~` wraps to above 0x5d.
        bad |= u8::from(b.wrapping_sub(b'!') > b'~' - b'!');
        if json {
            bad |= u8::from(b == b'"') | u8::from(b == b'\\');
        }
    }
    bad == 0
}

/// A caller-supplied string as every log line shows it: its first [`MAX_LOGGED_CHARS`]
/// characters, each one that is not printable ASCII as `?`; in JSON, `"` and `\` escaped.
pub fn push_loggable(out: &mut Vec<u8>, text: &str, json: bool) {
    // The usual case (a UUID, a key_id): short printable ASCII with nothing to escape.
    if text.len() <= MAX_LOGGED_CHARS && is_plain(text.as_bytes(), json) {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    for c in text.chars().take(MAX_LOGGED_CHARS) {
        match c {
            '"' | '\\' if json => {
                out.push(b'\\');
                out.push(c as u8);
            }
            c if c.is_ascii_graphic() => out.push(c as u8),
            _ => out.push(b'?'),
        }
    }
}

/// `2026-11-30T04:32:43.921776Z`: UTC, microseconds, as tracing-subscriber prints it.
/// The part up to the seconds is computed once per second per thread.
fn push_timestamp(out: &mut Vec<u8>, since_epoch: std::time::Duration) {
    thread_local! {
        static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let secs = since_epoch.as_secs();
    let cached = SECOND.with(|second| {
        let Ok(mut second) = second.try_borrow_mut() else {
            return false;
        };
        if second.0 != secs {
            second.1.clear();
            push_seconds(&mut second.1, secs);
            second.0 = secs;
        }
        out.extend_from_slice(&second.1);
        true
    });
    if !cached {
        push_seconds(out, secs);
    }
    push_padded(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push(b'Z');
}

/// `2026-11-30T04:32:43.` for `secs` since the epoch.
fn push_seconds(out: &mut Vec<u8>, secs: u64) {
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    push_padded(out, year.max(0) as u64, 4);
    out.push(b'-');
    push_padded(out, month, 2);
    out.push(b'-');
    push_padded(out, day, 2);
    out.push(b'T');
    push_padded(out, of_day / 3600, 2);
    out.push(b':');
    push_padded(out, of_day / 60 % 60, 2);
    out.push(b':');
    push_padded(out, of_day % 60, 2);
    out.push(b'.');
}

/// (year, month, day) of a day counted from 1970-01-01, proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u64, day as u64)
}

/// `value` in decimal, left-padded with zeros to `width` digits.
fn push_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut n = value;
    let mut i = digits.len();
    while n > 0 && i > 0 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let start = i.min(digits.len().saturating_sub(width));
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// `value` in decimal.
fn push_u64(out: &mut Vec<u8>, value: u64) {
    push_padded(out, value, 1);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn plain_is_printable_ascii_with_nothing_to_escape_for_every_byte() {
        for json in [false, true] {
            for b in 0..=u8::MAX {
                let want = b.is_ascii_graphic() && !(json && (b == b'"' || b == b'\\'));
                // Alone, and after a run long enough for the vectorised loop.
                let mut run = vec![b'a'; 40];
                run.push(b);
                assert_eq!(is_plain(&[b], json), want, "{b:#x} json={json}");
                assert_eq!(is_plain(&run, json), want, "{b:#x} json={json} in a run");
            }
        }
    }

    fn line(json: bool, at: Duration, uid: &str, key_id: &str, micros: u64) -> String {
        let mut out = Vec::new();
        format_ok(&mut out, json, at, "encrypt", uid, key_id, micros);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn text_line_is_the_tracing_line() {
        // As tracing-subscriber 0.3 wrote it (README sample), with this timestamp.
        let at = Duration::new(1_796_013_163, 921_776_999);
        assert_eq!(
            line(false, at, "00000000-0000", "file-1b53", 8),
            "2026-11-30T04:32:43.921776Z  INFO kms_plugin::service: op=\"encrypt\" \
             uid=00000000-0000 key_id=file-1b53 outcome=\"ok\" micros=8\n"
        );
    }

    #[test]
    fn json_line_is_the_tracing_line() {
        let at = Duration::new(1_796_013_165, 976_773_000);
        assert_eq!(
            line(true, at, "u\"i\\d", "file-9e85", 14),
            "{\"timestamp\":\"2026-11-30T04:32:45.976773Z\",\"level\":\"INFO\",\"fields\":\
             {\"op\":\"encrypt\",\"uid\":\"u\\\"i\\\\d\",\"key_id\":\"file-9e85\",\
             \"outcome\":\"ok\",\"micros\":14},\"target\":\"kms_plugin::service\"}\n"
        );
    }

    #[test]
    fn caller_strings_are_bounded_and_printable() {
        let mut out = Vec::new();
        push_loggable(&mut out, "a\nb\u{7}c é", false);
        assert_eq!(out, b"a?b?c??");
        out.clear();
        push_loggable(&mut out, &"é".repeat(100), false);
        assert_eq!(out, "?".repeat(80).as_bytes());
        out.clear();
        push_loggable(&mut out, &"x".repeat(81), false);
        assert_eq!(out, "x".repeat(80).as_bytes());
        out.clear();
        push_loggable(&mut out, "a\"b\\c", true);
        assert_eq!(out, b"a\\\"b\\\\c");
        out.clear();
        push_loggable(&mut out, "a\"b\\c", false);
        assert_eq!(out, b"a\"b\\c");
    }

    #[test]
    fn timestamps_across_calendar_edges() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
            (4_107_542_400, "2100-03-01T00:00:00.000000Z"),
            (1_704_067_199, "2023-12-31T23:59:59.000000Z"),
        ];
        for (secs, want) in cases {
            let mut out = Vec::new();
            push_timestamp(&mut out, Duration::from_secs(secs));
            assert_eq!(String::from_utf8(out).expect("utf-8"), want, "{secs}");
        }
        // The per-second cache: same second twice, then the next.
        for (secs, micros, want) in [
            (1_704_067_199, 5, "2023-12-31T23:59:59.000005Z"),
            (1_704_067_199, 999_999, "2023-12-31T23:59:59.999999Z"),
            (1_704_067_200, 0, "2024-01-01T00:00:00.000000Z"),
        ] {
            let mut out = Vec::new();
            push_timestamp(&mut out, Duration::new(secs, micros * 1000));
            assert_eq!(String::from_utf8(out).expect("utf-8"), want);
        }
        let mut out = Vec::new();
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string().as_bytes());
        out.clear();
        push_u64(&mut out, 0);
        assert_eq!(out, b"0");
    }

    /// What tracing-subscriber itself writes for the event, with colours off.
    fn tracing_line(json: bool, uid: &str, key_id: &str, micros: u64) -> String {
        #[derive(Clone, Default)]
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("capture").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let dispatch: tracing::Dispatch = if json {
            builder.json().finish().into()
        } else {
            builder.finish().into()
        };
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(target: "kms_plugin::service", op = "encrypt", uid = %uid,
                key_id = %key_id, outcome = "ok", micros);
        });
        let bytes = capture.0.lock().expect("capture").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn same_bytes_as_tracing_subscriber_but_the_timestamp() {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        for json in [false, true] {
            for (uid, key_id, micros) in [
                ("00000000-0000-0000-0000-000000000000", "file-1b53", 8),
                ("q\"uo\\te", "aws-0f", u64::MAX),
            ] {
                let ours = line(json, at, uid, key_id, micros);
                let theirs = tracing_line(json, uid, key_id, micros);
                // The timestamp is the first 27 bytes of a text line, and starts at byte 14
                // of a JSON line; the rest must be identical.
                let skip = if json { 14 + 27 } else { 27 };
                assert_eq!(ours.get(skip..), theirs.get(skip..), "{theirs}");
                assert_eq!(ours.len(), theirs.len(), "{theirs}");
            }
        }
    }
}
