//! The log's writer: a call appends its line to a shared buffer and returns; one thread
//! writes the buffer to stderr.
//!
//! tracing-appender's non-blocking writer (used before) sent every line over a channel and
//! woke its thread for each: a futex wake and a context switch per Encrypt on a 2-core
//! node. Here a call wakes the thread only when it was idle (the first line after a quiet
//! spell, written at once) or when [`WAKE_LINES`] lines are waiting; while lines keep
//! coming the thread wakes on its own timer, every [`FLUSH_INTERVAL`], and writes
//! everything gathered in one `write(2)`. A line therefore reaches stderr at once after a
//! quiet spell and at most [`FLUSH_INTERVAL`] later under load.
//!
//! Never blocking a call and never losing a line silently still hold: a reader that stops
//! reading (a stuck journald, a full pipe) blocks only the writer thread; lines beyond
//! [`MAX_LINES`] waiting are dropped and counted ([`LogWriter::dropped`], exported as
//! `kms_plugin_log_lines_dropped_total`), as are lines whose write failed. Dropping the
//! [`Guard`] (a clean stop) writes out every line appended before it, waiting at most
//! [`STOP_TIMEOUT`] for a reader that does not read.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long lines gather, while they keep coming, before the writer thread writes them.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Lines waiting beyond which new lines are dropped (the reader is not keeping up).
pub const MAX_LINES: usize = 16 * 1024;
/// Lines waiting at which a call wakes the writer thread before its timer.
pub const WAKE_LINES: usize = 1024;
/// How long dropping the [`Guard`] waits for the last lines to be written.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Buffer capacity kept between writes; a larger one (after a burst) is released.
const KEEP_BYTES: usize = 256 * 1024;

/// Appends lines to the log. Cheap to clone; every clone writes to the same log.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    lines: usize,
    /// The writer thread waits for a first line (not on its timer): the next line wakes it.
    idle: bool,
    /// The guard asked the thread to write what is left and stop.
    closing: bool,
    /// The thread has stopped: nothing appended now would be written.
    stopped: bool,
}

/// Stops the writer thread when dropped, after it wrote every line appended so far (or
/// after [`STOP_TIMEOUT`], if the reader does not take them).
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Starts the writer thread, writing to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<(Self, Guard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            dropped: Arc::new(AtomicU64::new(0)),
        });
        let thread = std::thread::Builder::new()
            .name("kms-plugin-log".into())
            .spawn({
                let shared = shared.clone();
                move || shared.run(out)
            })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            Guard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Appends one whole line (or several: counted as one), or drops and counts it when
    /// [`MAX_LINES`] are already waiting. Never waits for the writer thread's I/O.
    pub fn append(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if state.lines >= MAX_LINES || state.stopped {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.buf.extend_from_slice(line);
        state.lines += 1;
        if state.idle || state.lines == WAKE_LINES {
            state.idle = false;
            drop(state);
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far: more than [`MAX_LINES`] waiting, or a failed write.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.shared.dropped.clone()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A buffer of whole lines: nothing a panicking holder could leave half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer thread: waits for a line and writes it at once; then, while lines keep
    /// coming, writes what gathered every [`FLUSH_INTERVAL`] (or at [`WAKE_LINES`]) without
    /// being woken for each; after an interval with no line it waits idle again. On close,
    /// writes what is left.
    fn run<W: Write>(&self, mut out: W) {
        let mut writing = Vec::new();
        let mut lingering = false;
        loop {
            let mut state = self.lock();
            if lingering && !state.closing {
                state = self
                    .wake
                    .wait_timeout_while(state, FLUSH_INTERVAL, |s| {
                        !s.closing && s.lines < WAKE_LINES
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            while state.buf.is_empty() && !state.closing {
                state.idle = true;
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.idle = false;
            std::mem::swap(&mut state.buf, &mut writing);
            let lines = std::mem::take(&mut state.lines);
            let done = state.closing && writing.is_empty();
            state.stopped = done;
            drop(state);
            if done {
                self.wake.notify_all();
                return;
            }
            if out.write_all(&writing).and_then(|()| out.flush()).is_err() {
                self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
            }
            writing.clear();
            writing.shrink_to(KEEP_BYTES);
            lingering = true;
        }
    }
}

impl Drop for Guard {
    /// Waits for the writer thread to write what is left, but at most [`STOP_TIMEOUT`]: a
    /// reader that stopped reading must not keep a stopping plugin from exiting.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_all();
        let (state, _) = self
            .shared
            .wake
            .wait_timeout_while(state, STOP_TIMEOUT, |s| !s.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        let stopped = state.stopped;
        drop(state);
        if let Some(thread) = self.thread.take()
            && stopped
        {
            let _ = thread.join();
        }
    }
}

/// One line from tracing-subscriber's fmt layer: it formats an event whole and hands it
/// over with a single `write_all`.
pub struct LineWriter<'a>(&'a LogWriter);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into shared memory that can be made to block, like a full pipe.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().expect("gate");
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().expect("bytes").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().expect("bytes").clone()).expect("utf-8")
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_drops() {
        let sink = Sink::default();
        let (writer, guard) = LogWriter::spawn(sink.clone()).expect("spawn");
        let expected: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        for i in 0..5000 {
            writer.append(format!("line {i}\n").as_bytes());
        }
        drop(guard);
        assert_eq!(sink.text(), expected);
        assert_eq!(writer.dropped().load(Ordering::SeqCst), 0);
    }

    #[test]
    fn lines_are_written_in_batches_not_one_write_each() {
        let sink = Sink::default();
        let (writer, guard) = LogWriter::spawn(sink.clone()).expect("spawn");
        for i in 0..500 {
            writer.append(format!("line {i}\n").as_bytes());
        }
        drop(guard);
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(writes < 500, "{writes} writes for 500 lines");
        assert_eq!(sink.text().lines().count(), 500);
    }

    #[test]
    fn a_quiet_log_still_writes_its_line_without_a_flush() {
        let sink = Sink::default();
        let (writer, _guard) = LogWriter::spawn(sink.clone()).expect("spawn");
        writer.append(b"alone\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.text().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.text(), "alone\n");
    }

    #[test]
    fn a_stuck_reader_costs_counted_drops_not_a_blocked_caller() {
        let sink = Sink::default();
        let held = sink.gate.lock().expect("gate");
        let (writer, guard) = LogWriter::spawn(sink.clone()).expect("spawn");
        // The first line reaches the writer thread, which then blocks in write (the gate).
        writer.append(b"first\n");
        while writer.shared.lock().lines != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..MAX_LINES + 10 {
            writer.append(b"x\n");
        }
        assert_eq!(writer.dropped().load(Ordering::SeqCst), 10);
        drop(held);
        drop(guard);
        assert_eq!(sink.text().lines().count(), 1 + MAX_LINES);
    }

    #[test]
    fn a_stuck_reader_does_not_keep_the_guard_from_returning() {
        let sink = Sink::default();
        let held = sink.gate.lock().expect("gate");
        let (writer, guard) = LogWriter::spawn(sink.clone()).expect("spawn");
        writer.append(b"never read\n");
        let (done, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
        assert!(
            returned.recv_timeout(Duration::from_secs(30)).is_ok(),
            "dropping the guard hung behind a blocked write"
        );
        drop(held);
    }
}
