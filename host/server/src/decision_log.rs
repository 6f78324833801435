//! The decision log: one JSON object a line, by default on stdout, each naming everything
//! needed to explain its decision (request id, route, policy digest, snapshot versions,
//! outcome, reason, latency).
//!
//! A check never waits for the log. Lines go into a bounded queue that one thread writes
//! out; when the reader stops reading (a blocking container log driver, a paused pipe) the
//! queue fills and further lines are dropped and counted
//! (`sandgate_decision_log_dropped_total`) instead of stalling checks and health probes.

use prometheus_client::metrics::counter::Counter;
use sandgate_runtime::PolicyLog;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 16_384;

/// One line of the decision log: everything needed to explain the decision.
#[derive(serde::Serialize)]
pub(crate) struct DecisionLogEntry<'a> {
    pub(crate) ts: u64,
    pub(crate) request_id: &'a str,
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) policy: Option<&'a str>,
    pub(crate) policy_digest: Option<&'a str>,
    pub(crate) snapshot: u64,
    pub(crate) key_set: u64,
    pub(crate) revocations: u64,
    pub(crate) data: Option<u64>,
    /// `none`, `verified`, or the reason the credential was rejected.
    pub(crate) credential: Option<&'a str>,
    pub(crate) subject: Option<&'a str>,
    pub(crate) outcome: &'static str,
    pub(crate) status: u16,
    pub(crate) reason: &'a str,
    pub(crate) fault: Option<String>,
    pub(crate) policy_logs: &'a [PolicyLog],
    pub(crate) latency_us: u64,
}

/// Where checks hand their lines: cheap to clone, never blocks.
#[derive(Clone)]
pub struct DecisionLog {
    queue: SyncSender<Vec<u8>>,
    dropped: Counter,
}

impl DecisionLog {
    /// A log written to `sink` by its own thread, counting dropped lines in `dropped`.
    pub fn start(
        sink: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
    ) -> std::io::Result<(DecisionLog, LogWriter)> {
        let (queue, lines) = std::sync::mpsc::sync_channel(capacity.max(1));
        let closing = Arc::new(AtomicBool::new(false));
        let flag = closing.clone();
        let thread =
            std::thread::Builder::new().name("sandgate-log".into()).spawn(move || write_lines(lines, sink, &flag))?;
        Ok((DecisionLog { queue, dropped }, LogWriter { closing, thread: Some(thread) }))
    }

    pub(crate) fn write(&self, entry: &DecisionLogEntry<'_>) {
        self.send(serde_json::to_vec(entry));
    }

    pub(crate) fn write_json(&self, value: &serde_json::Value) {
        self.send(serde_json::to_vec(value));
    }

    fn send(&self, line: serde_json::Result<Vec<u8>>) {
        let Ok(mut line) = line else { return };
        line.push(b'\n');
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn write_lines(lines: Receiver<Vec<u8>>, mut sink: Box<dyn Write + Send>, closing: &AtomicBool) {
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            // A closed sink must not stop authorization: a write error drops the line.
            Ok(line) => {
                let _ = sink.write_all(&line);
            }
            Err(RecvTimeoutError::Timeout) if closing.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = sink.flush();
}

/// The log's writer thread: [`LogWriter::finish`] lets it write out what is queued.
pub struct LogWriter {
    closing: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    /// Stop once the queue is empty, waiting at most `grace` (a reader that never reads
    /// again must not keep the process alive).
    pub async fn finish(mut self, grace: Duration) {
        self.closing.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(grace, joined).await.is_err() {
                tracing::warn!("the decision log's reader is not reading; unwritten lines are lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that never returns from `write`: a reader that stopped reading.
    struct Stalled;

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_drops_and_counts_lines_without_blocking() {
        let dropped = Counter::default();
        let (log, _writer) = DecisionLog::start(Box::new(Stalled), 4, dropped.clone()).unwrap();
        for _ in 0..100 {
            log.write_json(&serde_json::json!({ "line": "x" }));
        }
        // One line is stuck in the stalled write, four wait in the queue; the rest are dropped.
        assert!(dropped.get() >= 95, "dropped {}", dropped.get());
    }
}
