//! Log lines to stderr in batches, written by a thread of their own.
//!
//! A request's thread formats its line and appends it to a shared buffer; it never makes the
//! write system call and, in a steady stream of lines, never wakes anything either. The writer
//! thread sleeps until the buffer has a line, then waits [`GATHER`] for more to arrive, then
//! writes them all with one call. So a busy process makes at most one wake-up and one write per
//! [`GATHER`] instead of one per line (a futex wake and a context switch per line cost as much
//! as formatting it, on a two-core box). Lines appear at most [`GATHER`] late.
//!
//! Nothing is dropped: a buffer over [`CAP`] bytes (the writer cannot keep up) makes loggers
//! wait until it has been written. Dropping the [`FlushGuard`] writes what is buffered and ends
//! the thread.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// How long the writer waits for more lines after the first one of a batch.
pub const GATHER: Duration = Duration::from_millis(10);
/// Buffered bytes at which the writer stops gathering and writes at once.
const HIGH_WATER: usize = 256 * 1024;
/// Buffered bytes past which loggers wait for the writer.
pub const CAP: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The writer waits for a first line (a logger must wake it).
    idle: bool,
    /// The writer waits for more lines of a batch (a logger wakes it past [`HIGH_WATER`]).
    gathering: bool,
    /// Loggers waiting for room.
    blocked: usize,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer.
    lines: Condvar,
    /// Wakes loggers waiting for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind; keep logging.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut st = self.lock();
        while st.buf.len() >= CAP && !st.closed {
            st.blocked += 1;
            st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
            st.blocked -= 1;
        }
        st.buf.extend_from_slice(line);
        if st.idle || (st.gathering && st.buf.len() >= HIGH_WATER) {
            st.idle = false;
            st.gathering = false;
            self.lines.notify_one();
        }
    }

    /// The writer thread: a batch per wake-up until closed and empty.
    fn run(&self, out: &mut dyn Write) {
        loop {
            let mut st = self.lock();
            while st.buf.is_empty() && !st.closed {
                st.idle = true;
                st = self.lines.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.idle = false;
            if !st.closed && st.buf.len() < HIGH_WATER {
                st.gathering = true;
                st = self
                    .lines
                    .wait_timeout(st, GATHER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                st.gathering = false;
            }
            let batch = std::mem::take(&mut st.buf);
            let closed = st.closed;
            if st.blocked > 0 {
                self.room.notify_all();
            }
            drop(st);
            // A log line that cannot be written has nowhere to be reported.
            let _ = out.write_all(&batch);
            let _ = out.flush();
            if closed && self.lock().buf.is_empty() {
                return;
            }
        }
    }
}

/// The logging side: a `MakeWriter` whose writers append whole lines to the shared buffer.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is buffered and stops the writer thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread for `out`.
pub fn batched(out: impl Write + Send + 'static) -> std::io::Result<(BatchedWriter, FlushGuard)> {
    let shared = Arc::new(Shared::default());
    let for_thread = shared.clone();
    let mut out = out;
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || for_thread.run(&mut out))?;
    Ok((
        BatchedWriter {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

/// One line being formatted; appended to the buffer as a whole when dropped, so lines from
/// different threads never interleave.
pub struct LineBuf<'a> {
    shared: &'a Shared,
    line: Vec<u8>,
}

impl Write for LineBuf<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuf<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.shared.append(&self.line);
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = LineBuf<'a>;
    fn make_writer(&'a self) -> LineBuf<'a> {
        LineBuf {
            shared: &self.shared,
            line: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &BatchedWriter, text: &str) {
        w.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        line(&w, &format!("t{t} {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..5000).collect::<Vec<_>>(),
                "thread {t} lost or reordered"
            );
        }
    }

    #[test]
    fn a_line_reaches_the_output_without_the_guard_being_dropped() {
        let sink = Sink::default();
        let (w, _guard) = batched(sink.clone()).unwrap();
        line(&w, "hello\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
    }

    /// An output slower than the loggers: loggers wait past the cap instead of dropping.
    #[test]
    fn a_slow_output_makes_loggers_wait_rather_than_lose_lines() {
        struct Slow(Sink);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                self.0.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (w, guard) = batched(Slow(sink.clone())).unwrap();
        let big = "x".repeat(64 * 1024) + "\n";
        for _ in 0..200 {
            line(&w, &big); // 12.8 MB through a 4 MiB buffer
        }
        drop(guard);
        assert_eq!(sink.0.lock().unwrap().len(), 200 * big.len());
    }
}
