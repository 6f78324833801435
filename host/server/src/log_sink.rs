//! Where decision records go: stdout (the default), a file rotated by size, or a NATS
//! JetStream stream through an on-disk spool.
//!
//! The NATS sink never makes a check wait and loses nothing it accepted: the log writer
//! appends each batch to the spool (segment files; what is still unacknowledged is synced to
//! disk at least every `spool_sync_ms`), and a publisher sends what is
//! spooled to JetStream in order, as messages of whole lines (up to 1 MiB each, less if the
//! server's `max_payload` is lower), each with a
//! `Nats-Msg-Id` made of its place in the spool (a batch sent again after a lost
//! acknowledgement is sent with the same boundaries and stored once), and moves its cursor
//! only past what JetStream acknowledged. Delivery is at least once: a batch in flight when
//! the process dies may be stored twice (request ids tell the copies apart). A message's
//! lines are compressed as one LZ4 frame (`Content-Encoding: lz4`) unless `compression = "none"`:
//! decision records repeat themselves, and NATS stores about a fifteenth of the bytes (on varied
//! traffic, `docs/BENCHMARKS.md`). While NATS is unreachable the spool grows up
//! to its size limit; past it, whole lines are dropped and counted
//! (`sandgate_decision_log_dropped_total`), never partly written.

use prometheus_client::metrics::counter::Counter;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A file that is renamed to `NAME.1` (and `NAME.1` to `NAME.2`, …, up to `keep`) once it
/// would grow past `max_bytes`. Batches of whole lines go in whole, so no line is split
/// between two files. Files it creates are 0600: records hold claims and headers. A file
/// removed or renamed by someone else (an operator, a log rotator without a signal) is made
/// anew within a second, and a rotation that finds it gone shifts nothing: no kept file is
/// lost to it.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
    /// When `path` was last checked to still be `file`.
    checked: Instant,
    recheck_every: Duration,
}

impl RotatingFile {
    /// Append to `path` (created with its directory if need be).
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = private().append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path,
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
            checked: Instant::now(),
            recheck_every: Duration::from_secs(1),
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Whether `path` is still the file being written.
    fn still_there(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
            _ => false,
        }
    }

    /// Write to `path` anew, as it is now (created if it is gone): never through a link, and
    /// only to a regular file of this user's that no one else may read (someone who can write
    /// the directory could put a file of theirs, or a link, where the records go).
    fn reopen(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let file = spool_file().append(true).open(&self.path)?;
        let metadata = file.metadata()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = unsafe { libc::geteuid() };
        if !metadata.file_type().is_file() || metadata.uid() != user || metadata.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "`{}` is now not a private regular file of this user's; records are not written to it",
                self.path.display()
            )));
        }
        self.file = file;
        self.size = metadata.len();
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        // Best effort: a file that cannot be synced is still rotated.
        let _ = self.file.sync_data();
        if self.keep == 0 {
            self.file = spool_file().write(true).truncate(true).open(&self.path)?;
        } else {
            // Shift the kept files only when there is a file to take their place: a rotation
            // that failed must not shift again on every later batch, dropping one kept file
            // each time.
            if std::fs::symlink_metadata(&self.path).is_ok() {
                let _ = std::fs::remove_file(self.numbered(self.keep));
                for n in (1..self.keep).rev() {
                    let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
                }
                std::fs::rename(&self.path, self.numbered(1))?;
            }
            self.reopen()?;
        }
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, batch: &[u8]) -> std::io::Result<usize> {
        if self.checked.elapsed() >= self.recheck_every {
            self.checked = Instant::now();
            if !self.still_there() {
                self.reopen()?;
            }
        }
        if self.size > 0 && self.size + batch.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(batch)?;
        self.size += batch.len() as u64;
        Ok(batch.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// How a message's lines are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As they are.
    None,
    /// One LZ4 frame (the LZ4 frame format, readable by `lz4 -d` and every LZ4 library),
    /// marked `Content-Encoding: lz4`.
    #[default]
    Lz4,
}

/// The header that names a message's encoding.
pub const CONTENT_ENCODING: &str = "Content-Encoding";

/// The most a message may decode to: a message holds at most 1 MiB of lines.
const MAX_DECODED: u64 = 4 << 20;

impl Compression {
    /// `lines` as a message body.
    fn encode(self, lines: bytes::Bytes) -> std::io::Result<bytes::Bytes> {
        match self {
            Compression::None => Ok(lines),
            Compression::Lz4 => Ok(lz4_frame(&lines)?.into()),
        }
    }
}

/// The largest block of a message's LZ4 frame: a message's lines (at most 1 MiB) are one
/// block, seldom two.
const LZ4_BLOCK: usize = 1 << 20;

/// `lines` as one LZ4 frame of independent blocks of at most [`LZ4_BLOCK`], without checksums:
/// the frame `lz4_flex::frame::FrameEncoder` writes, made without its copy of every byte into
/// its own buffer and its zeroed output buffer. Each block is compressed straight from `lines`
/// and stored as it is when that is not smaller. The frame's header is the one `lz4_flex`
/// writes for these settings.
fn lz4_frame(lines: &[u8]) -> std::io::Result<Vec<u8>> {
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
    static HEADER: std::sync::LazyLock<std::io::Result<Vec<u8>>> = std::sync::LazyLock::new(|| {
        let info = FrameInfo::new().block_size(BlockSize::Max1MB).block_mode(BlockMode::Independent);
        // An empty frame: the header, then the end mark (four zero bytes).
        let mut empty = FrameEncoder::with_frame_info(info, Vec::new()).finish().map_err(std::io::Error::other)?;
        empty.truncate(empty.len().saturating_sub(4));
        Ok(empty)
    });
    let header = HEADER.as_ref().map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
    const UNCOMPRESSED: u32 = 1 << 31;
    let mut frame = Vec::with_capacity(header.len() + lines.len() / 8 + 64);
    frame.extend_from_slice(header);
    for block in lines.chunks(LZ4_BLOCK) {
        let compressed = lz4_flex::block::compress(block);
        // A block is at most 1 MiB, so its length fits the 31 bits the format gives it.
        if compressed.len() < block.len() {
            frame.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            frame.extend_from_slice(&compressed);
        } else {
            frame.extend_from_slice(&(block.len() as u32 | UNCOMPRESSED).to_le_bytes());
            frame.extend_from_slice(block);
        }
    }
    frame.extend_from_slice(&0u32.to_le_bytes());
    Ok(frame)
}

/// The lines a message of the records stream holds, decoded as its `Content-Encoding` says
/// (none, or `lz4`); an unknown encoding or a body that does not decode is an error.
pub fn decode_message<'a>(encoding: Option<&str>, body: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
    match encoding {
        None | Some("identity") => Ok(std::borrow::Cow::Borrowed(body)),
        Some("lz4") => {
            let mut lines = Vec::with_capacity(body.len().saturating_mul(8).min(MAX_DECODED as usize));
            lz4_flex::frame::FrameDecoder::new(body)
                .take(MAX_DECODED + 1)
                .read_to_end(&mut lines)
                .map_err(|e| format!("a message does not decode as LZ4: {e}"))?;
            if lines.len() as u64 > MAX_DECODED {
                return Err(format!("a message decodes to more than {} MiB", MAX_DECODED >> 20));
            }
            Ok(std::borrow::Cow::Owned(lines))
        }
        Some(other) => Err(format!("a message has an unknown Content-Encoding `{other}`")),
    }
}

/// A batch of spooled lines as one NATS message: its id (`<spool id>-<segment>-<start>-<end>`,
/// the `Nats-Msg-Id`) and its bytes (whole lines, each ending in a newline).
type SpooledMessage = (String, bytes::Bytes);

/// What [`Spool::peek`] found: the messages, the cursor after them, and the lines skipped as too
/// long for the server.
type Peeked = (Vec<SpooledMessage>, (u64, u64), u64);

/// A message holds whole lines up to this size, or less when the server's `max_payload` is
/// lower ([`message_room`]; for the default 1 MiB, just over 1015 KiB). Large messages cost
/// JetStream least: against 64 KiB, nats-server spent a quarter to a third less CPU a record
/// (`docs/BENCHMARKS.md`). Its lines never pass 1 MiB, so a consumer can bound what it
/// decodes ([`MAX_DECODED`]).
const MESSAGE_BYTES: usize = 1 << 20;

/// The most bytes of lines one message may carry to a server that accepts messages (headers
/// and body) of `max_payload` bytes: what is left after 1 KiB for the headers, less 1/128 for
/// LZ4's worst case on lines that do not compress. For NATS's default 1 MiB, 1,039,368 bytes:
/// every line the spool keeps ([`MAX_LINE`]) fits.
const fn message_room(max_payload: usize) -> usize {
    max_payload.saturating_sub(1024) / 128 * 127
}

/// The longest line the spool keeps: what a message to a server with NATS's default 1 MiB
/// `max_payload` can carry ([`message_room`]).
const MAX_LINE: usize = 1000 << 10;

/// A spool segment grows to this size before the next one is started.
const SEGMENT_BYTES: u64 = 8 << 20;

/// The most unsent lines the spool also keeps in memory ([`Tail`]). While the publisher keeps
/// up, it sends from there and the disk is only written; past this (NATS slow or away), the
/// older lines are read back from disk.
const TAIL_BYTES: usize = 8 << 20;

/// Segments whose files the spool keeps open (2 GiB of them), the first and the one being
/// appended to always among them: removing the name of an open one loses nothing.
const MAX_HELD_READERS: usize = 256;

/// The cursor file is written at most this often (and when the publisher stops): a cursor
/// that lags only sends acknowledged lines again.
const CURSOR_EVERY: Duration = Duration::from_millis(200);

/// Decision records waiting for JetStream, on disk: numbered segment files of whole lines and
/// a cursor (segment, offset) naming the first line not yet acknowledged.
pub struct Spool {
    dir: PathBuf,
    /// This spool's random id, kept in `DIR/id`: message ids are unique across every spool
    /// that sends to a stream (other sidecars, a spool directory made anew).
    id: String,
    max_bytes: u64,
    /// Unacknowledged lines are synced to disk this long after they are written at most
    /// (`ZERO`: as each batch is written).
    sync_every: Duration,
    dropped: Counter,
    inner: Mutex<SpoolState>,
    /// Woken when lines are appended.
    pub(crate) appended: tokio::sync::Notify,
    /// `DIR/lock`, locked for as long as this spool is open: one process a spool.
    _lock: File,
}

struct SpoolState {
    /// Segments in order: (number, length in bytes).
    segments: VecDeque<(u64, u64)>,
    /// Each segment's file, open for reading from when it was found or made until it is
    /// removed: a segment whose name is removed by someone else (a cache cleaner) is still
    /// sent whole, and the lines appended to it after that too.
    readers: std::collections::HashMap<u64, Arc<File>>,
    /// The first unacknowledged byte of the first segment.
    offset: u64,
    /// The segment being appended to.
    current: Option<File>,
    /// `current` holds lines written since it was last synced.
    unsynced: bool,
    synced_at: Instant,
    /// Syncs made.
    syncs: u64,
    /// When the cursor file was last written, and the cursor last written.
    cursor_written: Option<(Instant, (u64, u64))>,
    /// The number the next segment gets.
    next_segment: u64,
    /// The lines most recently appended, as written, and the most it holds ([`TAIL_BYTES`]).
    tail: Option<Tail>,
    tail_bytes: usize,
}

/// A copy of a segment's last lines, from `start` to its end: what the publisher sends next
/// while it keeps up, taken from memory instead of read back from the file (a read of every
/// line into a new buffer). Every byte is also in the file: a send that fails is retried from
/// there, and lines the tail no longer holds are read from there.
struct Tail {
    segment: u64,
    start: u64,
    lines: bytes::BytesMut,
    /// No line it holds is longer.
    longest: usize,
}

impl SpoolState {
    fn pending(&self) -> u64 {
        self.segments.iter().map(|(_, len)| len).sum::<u64>().saturating_sub(self.offset)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cursor {
    segment: u64,
    offset: u64,
}

impl Spool {
    /// The spool in `dir` (created 0700), holding at most `max_bytes` of unacknowledged lines
    /// and syncing them to disk within `sync_every` of their writing; what an earlier run left
    /// unacknowledged is sent first.
    ///
    /// Refused if another process has it open (two writers would reuse each other's segment
    /// numbers and message ids, and JetStream would drop one's records as duplicates). A
    /// directory another user owns or may write in is used with a warning (a volume's mount
    /// point often is one): it never reads or writes records through a link, nor
    /// writes its lock or cursor through one, so what others plant there can drop records but not read them.
    pub fn open(dir: PathBuf, max_bytes: u64, sync_every: Duration, dropped: Counter) -> std::io::Result<Arc<Spool>> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let metadata = std::fs::metadata(&dir)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = unsafe { libc::geteuid() };
        if metadata.uid() != user || metadata.mode() & 0o022 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                owner = metadata.uid(),
                mode = format!("{:o}", metadata.mode() & 0o7777),
                "the decision-record spool's directory is not this user's alone: others may drop its records; \
                 give it a directory only this user can write (a subdirectory of a shared volume)"
            );
        }
        let lock = spool_file().truncate(false).write(true).open(dir.join("lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "the spool directory `{}` is in use by another process ({e}); give each sidecar its own \
                     `[decision_log.nats] spool_dir`",
                    dir.display()
                ),
            ));
        }
        let mut segments: Vec<(u64, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            // Only regular files (a symlink is not followed); made 0600 if an earlier version
            // left one open to others.
            let metadata = entry.metadata()?;
            if !metadata.file_type().is_file() {
                tracing::warn!(path = %entry.path().display(), "not a regular file; ignored");
                continue;
            }
            if metadata.permissions().mode() & 0o077 != 0
                && let Err(e) = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot make a spool segment private");
            }
            // After a power loss a segment may end in a torn line (or zeros where unsynced
            // bytes were): it is cut back to its last whole line.
            let len = whole_lines(&entry.path(), metadata.len())?;
            segments.push((n, len));
        }
        segments.sort_unstable();
        // New lines go to a new segment, numbered past every segment and cursor seen: never
        // after a torn tail, never under a message id already used.
        let mut next_segment = segments.last().map_or(0, |(n, _)| n + 1);
        let cursor: Option<Cursor> =
            std::fs::read(dir.join("cursor")).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let mut offset = 0;
        if let Some(cursor) = &cursor {
            next_segment = next_segment.max(cursor.segment + 1);
            // Segments wholly before the cursor were acknowledged: remove them.
            segments.retain(|(n, _)| {
                let done = *n < cursor.segment;
                if done {
                    let _ = std::fs::remove_file(dir.join(format!("{n}.seg")));
                }
                !done
            });
            // A cursor past its segment's end on disk (the cursor reached the disk, the
            // acknowledged lines, never synced, did not) means all of it was acknowledged.
            if let Some((_, len)) = segments.first().filter(|(n, _)| *n == cursor.segment) {
                offset = cursor.offset.min(*len);
            }
        }
        let mut readers = std::collections::HashMap::new();
        for (n, _) in segments.iter().take(MAX_HELD_READERS) {
            readers.insert(*n, Arc::new(no_follow(OpenOptions::new().read(true)).open(dir.join(format!("{n}.seg")))?));
        }
        let id = match std::fs::read_to_string(dir.join("id")) {
            Ok(id) if id.trim().len() == 32 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()) => id.trim().to_owned(),
            _ => {
                let mut bytes = [0u8; 16];
                aws_lc_rs::rand::fill(&mut bytes)
                    .map_err(|_| std::io::Error::other("no randomness for the spool's id"))?;
                let id = hex::encode(bytes);
                sandgate_registry::write_atomically(&dir.join("id"), id.as_bytes())?;
                id
            }
        };
        let spool = Spool {
            dir,
            id,
            max_bytes: max_bytes.max(1),
            sync_every,
            dropped,
            inner: Mutex::new(SpoolState {
                segments: segments.into(),
                readers,
                offset,
                current: None,
                unsynced: false,
                synced_at: Instant::now(),
                syncs: 0,
                cursor_written: None,
                next_segment,
                tail: None,
                tail_bytes: TAIL_BYTES,
            }),
            appended: tokio::sync::Notify::new(),
            _lock: lock,
        };
        Ok(Arc::new(spool))
    }

    fn segment_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n}.seg"))
    }

    /// Bytes not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).pending()
    }

    /// Append whole lines of `batch`, as many as fit under the limit; the rest are dropped
    /// and counted.
    pub fn append(&self, batch: &[u8]) -> std::io::Result<()> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.max_bytes.saturating_sub(state.pending());
        // The lines that fit (the end of each), found with `memchr`: a batch is hundreds of
        // KiB at full load, and scanning it byte by byte cost a visible share of the CPU.
        // `longest`: no line kept is longer.
        let (mut take, mut oversized, mut dropped, mut longest) = (0usize, 0u64, 0u64, 0usize);
        if batch.last() == Some(&b'\n') && batch.len() <= MAX_LINE && batch.len() as u64 <= room {
            // The usual batch: whole lines, all of them fitting, none too long (the batch is
            // not); no line end needs finding.
            (take, longest) = (batch.len(), batch.len());
        } else {
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', batch).map(|i| i + 1) {
                if dropped == 0 && (end as u64) <= room {
                    take = end;
                    oversized += u64::from(end - start > MAX_LINE);
                    longest = longest.max((end - start).min(MAX_LINE));
                } else {
                    dropped += 1;
                }
                start = end;
            }
        }
        // A line too long for one NATS message could never be sent: not spooled, counted.
        let kept: Vec<u8>;
        let mut batch = &batch[..take];
        if oversized > 0 {
            tracing::warn!(lines = oversized, "decision records too long for a NATS message were dropped");
            kept = batch.split_inclusive(|b| *b == b'\n').filter(|l| l.len() <= MAX_LINE).flatten().copied().collect();
            take = kept.len();
            batch = &kept;
        }
        // Counted once the rest is written: a batch that fails is counted whole by the log
        // writer, these lines among them.
        let not_kept = oversized + dropped;
        if take == 0 {
            self.dropped.inc_by(not_kept);
            return Ok(());
        }
        // A new segment when the current one is full, and for the first lines after opening.
        let full = state.current.is_none() || state.segments.back().is_none_or(|(_, len)| *len >= SEGMENT_BYTES);
        // What was written before is synced if it is due and still unacknowledged (it mostly
        // is acknowledged by now, 10 ms after it was written), and always before its segment
        // is closed. A failed sync loses nothing yet (the lines are in the page cache): this
        // batch is still written.
        if let Err(e) = self.sync(&mut state, full) {
            tracing::error!(error = %e, "cannot sync the decision-record spool to disk");
        }
        if full {
            // The number is used up even if the open fails (a link planted under it): the next
            // batch tries the next one.
            let n = state.next_segment;
            state.next_segment = n + 1;
            let file = spool_file().append(true).read(true).open(self.segment_path(n))?;
            let reader = Arc::new(file.try_clone()?);
            // Past the bound, the segment just finished gives its reader up (never the first:
            // it is being sent).
            if state.readers.len() >= MAX_HELD_READERS
                && let Some(&(last, _)) = state.segments.back()
                && state.segments.front().is_some_and(|(first, _)| *first != last)
            {
                state.readers.remove(&last);
            }
            state.segments.push_back((n, 0));
            state.readers.insert(n, reader);
            state.current = Some(file);
        }
        let (segment, written) = state.segments.back().copied().unwrap_or((0, 0));
        if let Some(file) = state.current.as_mut() {
            if let Err(e) = file.write_all(batch) {
                // Part of the batch may be in the file (a full disk, an I/O error): cut it
                // off, or the next batch would land after it, the segment would no longer end
                // where its length says, and the publisher would never finish it. If even that
                // fails, the segment is left as it is and the next batch starts a new one.
                if file.set_len(written).is_err() {
                    state.current = None;
                }
                // The batch is lost: the log writer counts it.
                return Err(e);
            }
            state.unsynced = true;
        }
        if let Some((_, len)) = state.segments.back_mut() {
            *len += take as u64;
        }
        // The tail goes on if these lines follow it and it has room; otherwise it starts
        // again with them, and the lines it held are read from disk when their turn comes.
        let most = state.tail_bytes;
        match state.tail.as_mut() {
            Some(tail)
                if tail.segment == segment
                    && tail.start + tail.lines.len() as u64 == written
                    && tail.lines.len() + take <= most =>
            {
                tail.lines.extend_from_slice(batch);
                tail.longest = tail.longest.max(longest);
            }
            _ if take <= most => {
                state.tail = Some(Tail { segment, start: written, lines: bytes::BytesMut::from(batch), longest });
            }
            _ => state.tail = None,
        }
        self.dropped.inc_by(not_kept);
        // The batch is written: a failed sync is reported, not returned (which would count
        // the batch as lost).
        if self.sync_every.is_zero()
            && let Err(e) = self.sync(&mut state, true)
        {
            tracing::error!(error = %e, "cannot sync the decision-record spool to disk");
        }
        drop(state);
        self.appended.notify_one();
        Ok(())
    }

    /// Sync the segment being appended to if it holds lines written since its last sync and
    /// `force` or [`Spool::sync_every`] has passed since then. Lines JetStream has already
    /// acknowledged need no sync: when nothing is pending, none is made. Syncing only at an
    /// interval, not every batch, is most of what the NATS sink costs less at full load: while
    /// NATS keeps up, lines are acknowledged (and their segments removed) before they would
    /// ever be written back.
    fn sync(&self, state: &mut SpoolState, force: bool) -> std::io::Result<()> {
        if !state.unsynced || !(force || state.synced_at.elapsed() >= self.sync_every) {
            return Ok(());
        }
        // Tried again an interval later if it fails.
        state.synced_at = Instant::now();
        if state.pending() > 0
            && let Some(file) = state.current.as_ref()
        {
            file.sync_data()?;
            state.syncs += 1;
        }
        state.unsynced = false;
        Ok(())
    }

    /// Sync what is due (see [`Spool::sync`]); `force`: all that is unsynced.
    pub fn sync_due(&self, force: bool) -> std::io::Result<()> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.sync(&mut state, force).inspect_err(|e| {
            tracing::error!(error = %e, "cannot sync the decision-record spool to disk");
        })
    }

    /// What follows the cursor (up to `limit`, the end of a batch that was not acknowledged,
    /// so that it is sent again with the same boundaries), as messages of whole lines of at
    /// most [`MESSAGE_BYTES`] and at most `room` bytes each: each with its id (`<spool
    /// id>-<segment>-<start>-<end>`), the cursor after them, and how many lines were skipped.
    /// A line longer than `room` (what the server's `max_payload` leaves for lines,
    /// [`message_room`]) could never be sent: it is skipped, and counted as dropped by the
    /// publisher once the cursor moves past it (a batch peeked again after a failed send must
    /// not count it twice).
    fn peek(&self, limit: Option<(u64, u64)>, room: usize) -> std::io::Result<Peeked> {
        let (segment, offset, len, file, in_memory) = {
            let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            // A segment sent whole while it was the last one is left when the next one starts.
            self.remove_finished(&mut state);
            let (segment, offset, len) = match state.segments.front() {
                Some((n, len)) => (*n, state.offset, *len),
                None => return Ok((Vec::new(), (0, 0), 0)),
            };
            // A retry reads the disk: the tail has given those lines away.
            let in_memory = if limit.is_none() { take_from_tail(&mut state.tail, segment, offset) } else { None };
            (segment, offset, len, state.readers.get(&segment).cloned(), in_memory)
        };
        let end = match limit {
            Some((s, end)) if s == segment => len.min(end),
            _ => len,
        };
        if offset >= end {
            return Ok((Vec::new(), (segment, offset), 0));
        }
        // The lines to send: from the tail, or read back from the file (and then how much was
        // asked for).
        let (bytes, from_disk) = match in_memory {
            // Whole lines, each short enough for a message: cut at the last line end that fits,
            // found from there, with no need to look at every line.
            Some((lines, longest)) if longest <= MESSAGE_BYTES.min(room) => {
                let limit = MESSAGE_BYTES.min(room);
                let (mut messages, mut start) = (Vec::new(), 0);
                while start < lines.len() {
                    let end = match lines.len() - start {
                        rest if rest <= limit => lines.len(),
                        _ => match memchr::memrchr(b'\n', &lines[start..start + limit]) {
                            Some(i) => start + i + 1,
                            // Not so: every line is shorter than `limit`.
                            None => break,
                        },
                    };
                    let (from, to) = (offset + start as u64, offset + end as u64);
                    messages.push((self.message_id(segment, from, to), lines.slice(start..end)));
                    start = end;
                }
                return Ok((messages, (segment, offset + start as u64), 0));
            }
            Some((lines, _)) => (lines, None),
            None => {
                let file = match file {
                    Some(file) => file,
                    None => match no_follow(OpenOptions::new().read(true)).open(self.segment_path(segment)) {
                        Ok(file) => Arc::new(file),
                        // Removed by someone else before it was opened: what it held is lost. Moving
                        // past it keeps the records after it flowing; left, it would hold them all up.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            tracing::error!(
                                segment,
                                bytes = end - offset,
                                "a decision-record spool segment was removed by someone else before it was sent; \
                         its records are lost"
                            );
                            // Past it, and on to the next segment (a cursor with no message to send
                            // would not be moved by the publisher).
                            {
                                let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                                if state.segments.front().is_some_and(|(n, _)| *n == segment) && state.offset == offset
                                {
                                    state.offset = end;
                                    self.remove_finished(&mut state);
                                }
                            }
                            return self.peek(limit, room);
                        }
                        Err(e) => return Err(e),
                    },
                };
                // Spooled lines are at most MAX_LINE long: a window of two of them holds a whole one.
                let want = (end - offset).min(2 * MAX_LINE as u64);
                let mut bytes = vec![0u8; want as usize];
                let read = read_at(&file, &mut bytes, offset)?;
                bytes.truncate(read);
                (bytes::Bytes::from(bytes), Some((file, want)))
            }
        };
        // Messages are slices of this one buffer: nothing is copied again.
        let mut messages = Vec::new();
        let (mut start, mut at) = (offset, offset);
        let slice = |from: u64, to: u64| bytes.slice((from - offset) as usize..(to - offset) as usize);
        let (mut line_start, mut skipped) = (0, 0);
        for line_end in memchr::memchr_iter(b'\n', &bytes).map(|i| i + 1) {
            let len = (line_end - line_start) as u64;
            line_start = line_end;
            if len as usize > room {
                skipped += 1;
                if at > start {
                    messages.push((self.message_id(segment, start, at), slice(start, at)));
                }
                at += len;
                start = at;
                continue;
            }
            if at > start && (at - start + len) as usize > MESSAGE_BYTES.min(room) {
                messages.push((self.message_id(segment, start, at), slice(start, at)));
                start = at;
            }
            at += len;
        }
        if at > start {
            messages.push((self.message_id(segment, start, at), slice(start, at)));
        }
        // A whole window without a line end: no spooled line is that long, so this is damage (a
        // power loss that kept later pages of a segment and not earlier ones). It is skipped up
        // to the next line end, counted as one dropped line, so that the records after it are
        // sent; left, it would hold up every record behind it, across restarts.
        if let Some((file, want)) = from_disk
            && at == offset
            && want == 2 * MAX_LINE as u64
        {
            let mut past = offset + want;
            let mut chunk = vec![0u8; 64 << 10];
            while past < end {
                let room = (end - past).min(chunk.len() as u64) as usize;
                let n = read_at(&file, &mut chunk[..room], past)?;
                if n == 0 {
                    break;
                }
                if let Some(i) = memchr::memchr(b'\n', &chunk[..n]) {
                    past += i as u64 + 1;
                    break;
                }
                past += n as u64;
            }
            tracing::error!(
                segment,
                offset,
                bytes = past - offset,
                "a damaged run without a line end in the decision-record spool is skipped"
            );
            return Ok((messages, (segment, past), skipped + 1));
        }
        Ok((messages, (segment, at), skipped))
    }

    /// The `Nats-Msg-Id` of the lines from `start` to `end` of `segment`.
    fn message_id(&self, segment: u64, start: u64, end: u64) -> String {
        format!("{}-{segment}-{start}-{end}", self.id)
    }

    /// Peek and acknowledge until nothing is left, as the publisher does while NATS keeps up,
    /// handing each message's lines to `sent`.
    #[cfg(any(test, feature = "bench-internals"))]
    fn send_everything(&self, room: usize, mut sent: impl FnMut(&[u8])) -> std::io::Result<()> {
        loop {
            let (messages, cursor, _) = self.peek(None, room)?;
            if messages.is_empty() {
                return Ok(());
            }
            messages.iter().for_each(|(_, lines)| sent(lines));
            self.advance(cursor)?;
        }
    }

    /// [`Spool::send_everything`] for a NATS server with the default `max_payload`; the bytes
    /// sent. With `from_disk`, the spool keeps no lines in memory.
    #[cfg(feature = "bench-internals")]
    pub fn bench_send_everything(&self, from_disk: bool) -> std::io::Result<usize> {
        if from_disk {
            let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            (state.tail, state.tail_bytes) = (None, 0);
        }
        let mut bytes = 0;
        self.send_everything(message_room(1 << 20), |lines| bytes += lines.len())?;
        Ok(bytes)
    }

    /// Remove the segments sent whole, except the one being appended to.
    fn remove_finished(&self, state: &mut SpoolState) {
        while state.segments.len() > 1 && state.segments.front().is_some_and(|(_, len)| state.offset >= *len) {
            if let Some((n, _)) = state.segments.pop_front() {
                let _ = std::fs::remove_file(self.segment_path(n));
                state.readers.remove(&n);
            }
            state.offset = 0;
        }
    }

    /// Everything before `cursor` is acknowledged: move past it, remove finished segments and
    /// write the cursor down if it was not for [`CURSOR_EVERY`].
    fn advance(&self, cursor: (u64, u64)) -> std::io::Result<()> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        state.offset = cursor.1;
        self.remove_finished(&mut state);
        drop(state);
        self.write_cursor(false)
    }

    /// Write the cursor file if it changed and `force` or [`CURSOR_EVERY`] has passed since
    /// it was last written.
    fn write_cursor(&self, force: bool) -> std::io::Result<()> {
        let state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (segment, offset) = (state.segments.front().map_or(0, |(n, _)| *n), state.offset);
        let now = Instant::now();
        match state.cursor_written {
            Some((_, written)) if written == (segment, offset) => return Ok(()),
            Some((at, _)) if !force && now.duration_since(at) < CURSOR_EVERY => return Ok(()),
            _ => {}
        }
        drop(state);
        let bytes = serde_json::to_vec(&Cursor { segment, offset }).map_err(std::io::Error::other)?;
        // Written whole (a new file renamed over the old), at most every CURSOR_EVERY, and not
        // synced: at full load it moves a hundred times a second. A cursor that lags (after a
        // crash or a power loss) only sends acknowledged lines again: at least once, never lost.
        let temporary = self.dir.join("cursor.tmp");
        spool_file().write(true).truncate(true).open(&temporary)?.write_all(&bytes)?;
        std::fs::rename(&temporary, self.dir.join("cursor"))?;
        // Noted only once written: a failed write is tried again.
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).cursor_written = Some((now, (segment, offset)));
        Ok(())
    }
}

/// The lines `tail` holds from `offset` of `segment` on, at most a window of two of the longest
/// lines, and given away: the publisher sends them next; with a length no line among them
/// passes. `None` if the tail does not hold them; a tail left behind (by lines sent from disk)
/// is let go of.
fn take_from_tail(tail: &mut Option<Tail>, segment: u64, offset: u64) -> Option<(bytes::Bytes, usize)> {
    let held = tail.as_mut()?;
    let end = held.start + held.lines.len() as u64;
    if held.segment != segment || offset < held.start || offset >= end {
        if held.segment < segment || (held.segment == segment && offset > end) {
            *tail = None;
        }
        return None;
    }
    // Lines before the cursor were sent (from disk) and acknowledged.
    let _ = held.lines.split_to((offset - held.start) as usize);
    held.start = offset;
    // The tail holds whole lines: a window that cuts one ends at the line before.
    let mut take = held.lines.len().min(2 * MAX_LINE);
    if take < held.lines.len() {
        take = memchr::memrchr(b'\n', &held.lines[..take]).map_or(0, |i| i + 1);
    }
    if take == 0 {
        return None;
    }
    held.start += take as u64;
    Some((held.lines.split_to(take).freeze(), held.longest))
}

/// Read into `buf` from `offset` until it is full or the file ends; how much was read.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut read = 0;
    while read < buf.len() {
        match file.read_at(&mut buf[read..], offset + read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(read)
}

/// The length of the whole lines at the start of segment `path` (`len` bytes long), the file
/// cut back to it if it ends in a torn line: what a power loss can leave of bytes never synced.
fn whole_lines(path: &std::path::Path, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let mut file = no_follow(OpenOptions::new().read(true).write(true)).open(path)?;
    // The common case, a segment ending in a newline, costs one byte read.
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    // Spooled lines are at most MAX_LINE long, so the last newline is usually within the last
    // two; but a power loss can leave any length of zeros after it: look further back until
    // one is found, or the segment holds no whole line.
    let mut end = len;
    let whole = loop {
        let window = end.min(2 * MAX_LINE as u64 + 1);
        file.seek(SeekFrom::Start(end - window))?;
        let mut tail = Vec::with_capacity(window as usize);
        (&mut file).take(window).read_to_end(&mut tail)?;
        if let Some(i) = memchr::memrchr(b'\n', &tail) {
            break end - window + i as u64 + 1;
        }
        end -= window;
        if end == 0 {
            break 0;
        }
    };
    tracing::warn!(path = %path.display(), bytes = len - whole, "a spool segment ended in a torn line (a power loss?); cut back");
    file.set_len(whole)?;
    Ok(whole)
}

/// Options creating a file only its owner may read (0600): spooled records hold claims and
/// headers, and the spool directory may already exist open to others.
/// [`private`], never through a symbolic link: for the files of the spool it creates.
fn spool_file() -> OpenOptions {
    let mut options = private();
    no_follow(&mut options);
    options
}

/// `options`, refusing to open through a symbolic link: every open of a spool file.
fn no_follow(options: &mut OpenOptions) -> &mut OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NOFOLLOW)
}

fn private() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.create(true).mode(0o600);
    options
}

/// The log writer's side of a spool.
pub struct SpoolWriter(pub Arc<Spool>);

impl Write for SpoolWriter {
    fn write(&mut self, batch: &[u8]) -> std::io::Result<usize> {
        self.0.append(batch)?;
        Ok(batch.len())
    }

    /// Called by the log writer while it is idle: syncs what is due.
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.sync_due(false)
    }
}

impl Drop for SpoolWriter {
    /// The log writer is done: what it wrote and is not yet acknowledged goes to disk now.
    fn drop(&mut self) {
        let _ = self.0.sync_due(true);
    }
}

/// Where and how [`publish`] sends records.
pub struct Publishing {
    /// A subject of the JetStream stream.
    pub subject: String,
    /// How each message's records are encoded.
    pub compression: Compression,
    /// After a send, while the spool holds less than a whole message, records gather this long
    /// before the next send (`ZERO`: sent at once).
    pub linger: Duration,
}

/// Run `publisher` (the NATS client's tasks with it) on a thread of its own with a
/// single-threaded runtime, not on the workers that answer checks: compressing, sending and
/// the client's wake-ups take at most that thread's share of the CPU and never sit in a
/// check's queue. The receiver completes when the publisher has stopped; `None` (logged) if
/// the thread cannot be started, and the records then stay in the spool.
pub fn on_own_thread(
    publisher: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let (done, stopped) = tokio::sync::oneshot::channel();
    let started = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|runtime| {
        std::thread::Builder::new().name("sandgate-nats".into()).spawn(move || {
            runtime.block_on(publisher);
            let _ = done.send(());
        })
    });
    match started {
        Ok(_) => Some(stopped),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the decision-record publisher; records stay in the spool");
            None
        }
    }
}

/// Send what `spool` holds as `to` says, in order, until `stop` and the spool is empty (or,
/// after `stop`, for at most `grace`).
pub async fn publish(
    spool: Arc<Spool>,
    js: async_nats::jetstream::Context,
    to: Publishing,
    stop: tokio_util::sync::CancellationToken,
    grace: Duration,
    pending: prometheus_client::metrics::gauge::Gauge,
) {
    let Publishing { subject, compression, linger } = to;
    let client = js.client();
    let mut failing = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    // After a failure, the same batch is sent again with the same boundaries (and ids).
    let mut retry: Option<(u64, u64)> = None;
    let mut last_send: Option<tokio::time::Instant> = None;
    loop {
        pending.set(spool.pending() as i64);
        if stop.is_cancelled() && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            if spool.pending() > 0 {
                tracing::warn!(
                    bytes = spool.pending(),
                    "decision records left in the spool; they are sent on the next start"
                );
            }
            break;
        }
        // Fuller messages: records gather for the linger after the last send, until a
        // message's worth is spooled (a retry, a stop and the first records after a quiet
        // spell go at once). A message costs the publisher and JetStream about as much
        // whether it carries 100 records or 1,000.
        if let Some(sent) = last_send.filter(|_| retry.is_none()) {
            gather(&spool, message_room(client.max_payload()), sent + linger, &stop).await;
        }
        // Read anew for every batch: a reconnect may reach a server with another limit.
        let room = message_room(client.max_payload());
        let (messages, cursor, skipped) = match spool.peek(retry, room) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the decision-record spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() && skipped == 0 {
            if stop.is_cancelled() {
                break;
            }
            // Everything sent is acknowledged: the cursor says so on disk within CURSOR_EVERY
            // (at full load this loop comes here between batches, hundreds of times a second).
            if let Err(e) = spool.write_cursor(false) {
                tracing::error!(error = %e, "cannot write the decision-record spool's cursor");
            }
            tokio::select! {
                () = spool.appended.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = stop.cancelled() => {}
            }
            continue;
        }
        tracing::debug!(messages = messages.len(), ?cursor, "sending spooled decision records");
        last_send = Some(tokio::time::Instant::now());
        match send(&js, &subject, compression, messages).await {
            Ok(()) => {
                retry = None;
                if failing {
                    tracing::info!("decision records are reaching NATS again");
                    failing = false;
                }
                if skipped > 0 {
                    tracing::warn!(
                        records = skipped,
                        room,
                        "decision records too long for the NATS server's max_payload were dropped"
                    );
                    spool.dropped.inc_by(skipped);
                }
                if let Err(e) = spool.advance(cursor) {
                    tracing::error!(error = %e, "cannot move the decision-record spool's cursor");
                }
            }
            Err(e) => {
                retry = Some(cursor);
                if !failing {
                    tracing::warn!(error = %e, pending = spool.pending(), "cannot send decision records to NATS; spooling them");
                    failing = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
    }
    // Stopping: the cursor names exactly what JetStream acknowledged, so the next start sends
    // none of it again.
    if let Err(e) = spool.write_cursor(true) {
        tracing::error!(error = %e, "cannot write the decision-record spool's cursor");
    }
}

/// Why [`gather`] stopped waiting.
#[derive(Debug, PartialEq, Eq)]
enum Gathered {
    /// The spool holds a message's worth.
    Message,
    /// The linger is over.
    Lingered,
    /// The publisher is stopping.
    Stopping,
}

/// Wait until `spool` holds `room` bytes, `until` passes, or `stop`.
async fn gather(
    spool: &Spool,
    room: usize,
    until: tokio::time::Instant,
    stop: &tokio_util::sync::CancellationToken,
) -> Gathered {
    loop {
        // Asked for before the check, so that an append between the check and the wait
        // still wakes it.
        let appended = spool.appended.notified();
        if stop.is_cancelled() {
            return Gathered::Stopping;
        }
        if spool.pending() >= room as u64 {
            return Gathered::Message;
        }
        tokio::select! {
            () = appended => {}
            () = tokio::time::sleep_until(until) => return Gathered::Lingered,
            () = stop.cancelled() => return Gathered::Stopping,
        }
    }
}

/// Publish `messages`, encoded with `compression`, and wait for every acknowledgement.
async fn send(
    js: &async_nats::jetstream::Context,
    subject: &str,
    compression: Compression,
    messages: Vec<SpooledMessage>,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(messages.len());
    for (id, lines) in messages {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        if compression == Compression::Lz4 {
            headers.insert(CONTENT_ENCODING, "lz4");
        }
        let body = compression.encode(lines).map_err(|e| format!("cannot compress decision records: {e}"))?;
        let ack = js.publish_with_headers(subject.to_owned(), headers, body).await.map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    for ack in acks {
        tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .map_err(|_| "no acknowledgement within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The stream records are sent to: created (file storage, a two-minute duplicate window) if
/// it does not exist.
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subjects: &str,
    replicas: usize,
) -> Result<(), String> {
    if js.get_stream(stream).await.is_ok() {
        return Ok(());
    }
    let config = async_nats::jetstream::stream::Config {
        name: stream.to_owned(),
        subjects: vec![subjects.to_owned()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map(|_| ()).map_err(|e| format!("cannot create the stream `{stream}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a message may carry to a server with NATS's default `max_payload` (1 MiB).
    const ROOM: usize = message_room(1 << 20);

    #[test]
    fn the_room_a_message_has_follows_the_servers_max_payload() {
        assert_eq!(ROOM, 1_039_368);
        assert!(message_room(1 << 20) >= MAX_LINE);
        assert_eq!(message_room(512), 0);
        // Lines that LZ4 cannot compress, as large as the room allows, still fit the limit
        // once encoded and given their headers.
        let mut noise = vec![0u8; message_room(64 << 10)];
        aws_lc_rs::rand::fill(&mut noise).unwrap();
        let body = Compression::Lz4.encode(bytes::Bytes::from(noise)).unwrap();
        assert!(body.len() + 1024 <= 64 << 10, "{}", body.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_publisher_runs_on_its_own_thread_with_timers_and_reports_its_end() {
        let (ran, mut on) = tokio::sync::oneshot::channel();
        let stopped = on_own_thread(async move {
            // Timers and spawned tasks (the NATS client's) work on the publisher's runtime.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let name = tokio::spawn(async { std::thread::current().name().map(str::to_owned) }).await.unwrap();
            let _ = ran.send(name);
        })
        .expect("the thread starts");
        tokio::time::timeout(Duration::from_secs(10), stopped).await.unwrap().unwrap();
        assert_eq!(on.try_recv().unwrap().as_deref(), Some("sandgate-nats"));
    }

    #[tokio::test]
    async fn records_gather_until_a_message_s_worth_the_linger_s_end_or_a_stop() {
        use tokio::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let later = || Instant::now() + Duration::from_secs(30);
        // Less than a message's worth, nothing more coming: the linger ends it.
        spool.append(&[b'a'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>()).unwrap();
        let soon = Instant::now() + Duration::from_millis(30);
        assert_eq!(gather(&spool, 1000, soon, &stop).await, Gathered::Lingered);
        // Appends below a message's worth wake it, and it goes on waiting.
        let appender = {
            let spool = spool.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    spool.append(&[b'b'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>()).unwrap();
                }
            })
        };
        let soon = Instant::now() + Duration::from_millis(200);
        assert_eq!(gather(&spool, 1000, soon, &stop).await, Gathered::Lingered);
        appender.await.unwrap();
        assert_eq!(spool.pending(), 400);
        // A message's worth arriving ends it long before the linger would.
        let appender = {
            let spool = spool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                spool.append(&[b'c'; 699].iter().chain(b"\n").copied().collect::<Vec<u8>>()).unwrap();
            })
        };
        assert_eq!(gather(&spool, 1000, later(), &stop).await, Gathered::Message);
        appender.await.unwrap();
        // Already a message's worth: at once. A stop: at once, whatever is spooled.
        assert_eq!(gather(&spool, 1000, later(), &stop).await, Gathered::Message);
        stop.cancel();
        assert_eq!(gather(&spool, 1 << 20, later(), &stop).await, Gathered::Stopping);
    }

    #[test]
    fn a_server_with_a_smaller_max_payload_gets_smaller_messages_and_no_line_it_cannot_take() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, dropped.clone()).unwrap();
        let line = |c: u8, n: usize| [vec![c; n - 1], vec![b'\n']].concat();
        // A server accepting 8 KiB messages: 7,112 bytes of lines each.
        let room = message_room(8 << 10);
        spool
            .append(&[line(b'a', 3000), line(b'b', 3000), line(b'c', 3000), line(b'x', 7200), line(b'd', 10)].concat())
            .unwrap();
        let (messages, cursor, skipped) = spool.peek(None, room).unwrap();
        let bodies: Vec<&[u8]> = messages.iter().map(|(_, m)| m.as_ref()).collect();
        assert_eq!(
            bodies,
            [[line(b'a', 3000), line(b'b', 3000)].concat(), [line(b'c', 3000)].concat(), line(b'd', 10)]
        );
        // The line too long for this server is skipped, not sent forever in vain; the
        // publisher counts it as dropped once the batch is acknowledged, so peeking the same
        // batch again after a failed send does not count it twice.
        assert_eq!(skipped, 1);
        assert_eq!(spool.peek(Some(cursor), room).unwrap().2, 1);
        assert_eq!(dropped.get(), 0);
        assert_eq!(cursor, (0, 16_210));
        assert_eq!(messages[2].0, format!("{}-0-16200-16210", spool.id));
        // A skipped line with nothing after it still moves the cursor: nothing to send, and
        // nothing left to peek once the publisher advances.
        spool.advance(cursor).unwrap();
        spool.append(&line(b'y', 7200)).unwrap();
        let (messages, cursor, skipped) = spool.peek(None, room).unwrap();
        assert_eq!((messages.len(), cursor, skipped), (0, (0, 23_410), 1));
        spool.advance(cursor).unwrap();
        assert_eq!(spool.pending(), 0);
    }

    #[test]
    fn a_rotating_file_keeps_whole_batches_and_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.log");
        let mut file = RotatingFile::open(path.clone(), 100, 2).unwrap();
        for i in 0..10 {
            file.write_all(format!("{{\"n\":{i:040}}}\n").as_bytes()).unwrap();
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let (now, one, two) =
            (read(path.clone()), read(dir.path().join("decisions.log.1")), read(dir.path().join("decisions.log.2")));
        assert!(!dir.path().join("decisions.log.3").exists());
        for text in [&now, &one, &two] {
            assert!(text.lines().all(|l| l.len() == 46), "{text}");
            assert!(text.len() <= 100);
        }
        assert!(now.contains(&format!("{:040}", 9)) && two.contains(&format!("{:040}", 4)));
    }

    /// A decision file removed while it is written (by an operator, or a rotator that moves
    /// it without telling the sidecar): the next rotation used to shift the kept files and
    /// then fail to rename the missing one, on every batch after it, until no kept file was
    /// left and nothing more was written.
    #[test]
    fn a_rotating_file_removed_underneath_loses_no_kept_file_and_is_made_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.log");
        let mut file = RotatingFile::open(path.clone(), 100, 2).unwrap();
        let batch = |i: usize| format!("{{\"n\":{i:054}}}\n");
        for i in 0..3 {
            file.write_all(batch(i).as_bytes()).unwrap();
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        assert_eq!((read("decisions.log.2"), read("decisions.log.1")), (batch(0), batch(1)));
        std::fs::remove_file(&path).unwrap();
        // A rotation that finds the file gone: the kept files stay, the file is made anew.
        file.write_all(batch(3).as_bytes()).unwrap();
        assert_eq!(
            (read("decisions.log.2"), read("decisions.log.1"), read("decisions.log")),
            (batch(0), batch(1), batch(3))
        );
        // Rotations after it shift as usual.
        file.write_all(batch(4).as_bytes()).unwrap();
        assert_eq!(
            (read("decisions.log.2"), read("decisions.log.1"), read("decisions.log")),
            (batch(1), batch(3), batch(4))
        );
        // Removed again, with room left in it: made anew at the next check.
        file.recheck_every = Duration::ZERO;
        file.max_bytes = 1000;
        std::fs::remove_file(&path).unwrap();
        file.write_all(batch(5).as_bytes()).unwrap();
        assert_eq!(read("decisions.log"), batch(5));
        // Renamed away by a rotator: the records after it go to a new file by the name.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        file.write_all(batch(6).as_bytes()).unwrap();
        assert_eq!((read("moved"), read("decisions.log")), (batch(5), batch(6)));
        // Replaced by a link, or by a file others may read: records are not written there.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(file.write_all(batch(7).as_bytes()).is_err());
        assert!(!dir.path().join("elsewhere").exists());
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(file.write_all(batch(8).as_bytes()).is_err());
        assert_eq!(read("decisions.log"), "");
    }

    /// A segment whose name someone else removes (a cache cleaner in the spool's directory):
    /// its records, and those appended to it after, are still sent, from the file the spool
    /// holds open. Before, the publisher failed to open it on every try, and every record
    /// behind it waited until the spool was full.
    #[test]
    fn a_segment_removed_underneath_is_still_sent_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, dropped.clone()).unwrap();
        spool.append(b"one\ntwo\n").unwrap();
        std::fs::remove_file(dir.path().join("0.seg")).unwrap();
        spool.append(b"three\n").unwrap();
        assert_eq!(send_all(&spool), "one\ntwo\nthree\n");
        spool.append(b"four\n").unwrap();
        assert_eq!(send_all(&spool), "four\n");
        assert_eq!((spool.pending(), dropped.get()), (0, 0));
    }

    /// A segment removed before the spool held it open (past the segments it holds open, or
    /// left by an earlier run) is skipped: the records after it are sent. (It used to be
    /// peeked again and again, holding every record behind it.)
    #[test]
    fn a_segment_removed_before_it_was_opened_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"lost\n").unwrap();
        // The next batch starts segment 1; segment 0 is not held open, and its file goes.
        {
            let mut state = spool.inner.lock().unwrap();
            state.current = None;
            state.readers.remove(&0);
        }
        spool.append(b"kept\n").unwrap();
        std::fs::remove_file(dir.path().join("0.seg")).unwrap();
        assert_eq!(send_all(&spool), "kept\n");
        assert_eq!(spool.pending(), 0);
    }

    /// While the publisher keeps up, it sends the lines from memory: what the disk holds is
    /// not read back. A retry reads them from disk, where every spooled line is.
    #[test]
    fn lines_kept_up_with_are_sent_from_memory_and_a_retry_reads_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"one\ntwo\n").unwrap();
        // The file changed underneath (same length): only a read of the disk would see it.
        std::fs::write(dir.path().join("0.seg"), b"ONE\nTWO\n").unwrap();
        let (messages, cursor, _) = spool.peek(None, ROOM).unwrap();
        assert_eq!(&messages[0].1[..], b"one\ntwo\n");
        // The send failed: the same batch again, from disk.
        let (again, retried, _) = spool.peek(Some(cursor), ROOM).unwrap();
        assert_eq!((&again[0].1[..], &again[0].0, retried), (&b"ONE\nTWO\n"[..], &messages[0].0, cursor));
        spool.advance(cursor).unwrap();
        spool.append(b"three\n").unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(dir.path().join("0.seg")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"THREE", 8).unwrap();
        assert_eq!(send_all(&spool), "three\n");
    }

    proptest::proptest! {
        /// Whatever the mix of appends, sends, failed sends and a tail too small for what
        /// waits (NATS slow or away), every line is sent once and in order, in messages whose
        /// ids follow one another, and what the tail gave is what the disk holds.
        #[test]
        fn every_line_is_sent_once_and_in_order_from_memory_or_disk(
            steps in proptest::collection::vec((0u8..4, 1usize..40, 1usize..300), 1..60),
            tail_bytes in 1usize..20_000,
            room in 200usize..8000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
            spool.inner.lock().unwrap().tail_bytes = tail_bytes;
            let (mut appended, mut sent) = (Vec::new(), Vec::new());
            let mut next_start = 0;
            for (n, (step, lines, len)) in steps.into_iter().enumerate() {
                if step < 2 {
                    let batch: Vec<u8> = (0..lines)
                        .flat_map(|i| [format!("{n}.{i}-").into_bytes(), vec![b'x'; len % (i + 7)], vec![b'\n']].concat())
                        .collect();
                    spool.append(&batch).unwrap();
                    appended.extend_from_slice(&batch);
                    continue;
                }
                let (messages, cursor, skipped) = spool.peek(None, room).unwrap();
                proptest::prop_assert_eq!(skipped, 0);
                let on_disk = std::fs::read(dir.path().join("0.seg")).unwrap_or_default();
                for (id, lines) in &messages {
                    let range: Vec<usize> = id.rsplitn(3, '-').take(2).map(|n| n.parse().unwrap()).collect();
                    let (start, end) = (range[1], range[0]);
                    proptest::prop_assert_eq!(start, next_start);
                    proptest::prop_assert!(lines.len() <= room);
                    proptest::prop_assert_eq!(&on_disk[start..end], &lines[..]);
                    next_start = end;
                }
                let messages = if step == 3 {
                    // The send failed: the same batch again, with the same ids.
                    let (again, retried, _) = spool.peek(Some(cursor), room).unwrap();
                    proptest::prop_assert_eq!(retried, cursor);
                    proptest::prop_assert_eq!(&again, &messages);
                    again
                } else {
                    messages
                };
                sent.extend(messages.iter().flat_map(|(_, lines)| lines.to_vec()));
                spool.advance(cursor).unwrap();
            }
            sent.extend(send_all(&spool).into_bytes());
            proptest::prop_assert_eq!(String::from_utf8(sent).unwrap(), String::from_utf8(appended).unwrap());
        }
    }

    /// Send and acknowledge everything the spool holds; the lines sent.
    fn send_all(spool: &Spool) -> String {
        let mut sent = Vec::new();
        spool.send_everything(ROOM, |lines| sent.extend_from_slice(lines)).unwrap();
        String::from_utf8_lossy(&sent).into_owned()
    }

    /// A power loss can leave a segment ending in more zeros than two of the longest lines
    /// (space allocated, data never written): it is still cut back to its last whole line.
    /// (It used to be cut inside the zeros, and the segment was never finished.)
    #[test]
    fn a_spool_recovers_from_a_long_run_of_zeros_after_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"line-0\nline-1\n").unwrap();
        drop(spool);
        let segment = dir.path().join("0.seg");
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&vec![0u8; 3 * MAX_LINE + 5]).unwrap();
        drop(file);
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), 14, "cut back to its whole lines");
        spool.append(b"line-2\n").unwrap();
        assert_eq!(send_all(&spool), "line-0\nline-1\nline-2\n");
    }

    /// A run of damage in the middle of a segment, longer than any line (a power loss that kept
    /// later pages and not earlier ones), is skipped and counted: the lines after it are sent.
    /// (It used to stop the publisher for good, silently, across restarts.)
    #[test]
    fn a_damaged_run_inside_a_segment_is_skipped_and_the_lines_after_it_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"line-0\n").unwrap();
        drop(spool);
        let mut file = OpenOptions::new().append(true).open(dir.path().join("0.seg")).unwrap();
        file.write_all(&vec![0u8; 3 * MAX_LINE]).unwrap();
        file.write_all(b"\nline-1\n").unwrap();
        drop(file);
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"line-2\n").unwrap();
        let (mut sent, mut skipped) = (Vec::new(), 0);
        for _ in 0..10 {
            let (messages, cursor, skipping) = spool.peek(None, ROOM).unwrap();
            if messages.is_empty() && skipping == 0 {
                break;
            }
            skipped += skipping;
            sent.extend(messages.iter().flat_map(|(_, lines)| lines.to_vec()));
            spool.advance(cursor).unwrap();
        }
        assert_eq!(String::from_utf8_lossy(&sent), "line-0\nline-1\nline-2\n");
        assert_eq!(skipped, 1);
        assert_eq!(spool.pending(), 0);
    }

    #[test]
    fn a_spool_recovers_from_a_power_loss_that_kept_the_cursor_but_not_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().to_owned(), 1 << 20, Duration::from_secs(3600), dropped.clone()).unwrap();
        for i in 0..10 {
            spool.append(format!("line-{i:03}\n").as_bytes()).unwrap();
        }
        // All ten acknowledged: nothing synced (nothing pending), the cursor at byte 90.
        let (_, cursor, _) = spool.peek(None, ROOM).unwrap();
        spool.advance(cursor).unwrap();
        spool.write_cursor(true).unwrap();
        drop(spool);
        // The power goes: the cursor reached the disk, the segment's last lines did not, and its
        // end is a torn line.
        let segment = dir.path().join("0.seg");
        let kept = std::fs::read(&segment).unwrap()[..40].to_vec();
        std::fs::write(&segment, [kept, vec![0u8; 7]].concat()).unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 20, Duration::from_secs(3600), dropped.clone()).unwrap();
        assert_eq!(spool.pending(), 0);
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), 36, "cut back to its whole lines");
        // New records are spooled and sent, under ids never used before.
        spool.append(b"after\n").unwrap();
        assert_eq!(spool.pending(), 6);
        let (messages, _, _) = spool.peek(None, ROOM).unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(&messages[0].1[..], b"after\n");
        assert_eq!(messages[0].0, format!("{}-1-0-6", spool.id));
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn record_files_are_readable_by_the_sidecar_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.log");
        let mut file = RotatingFile::open(path.clone(), 100, 2).unwrap();
        for _ in 0..4 {
            file.write_all(&[b'x'; 60]).unwrap();
        }
        for name in ["decisions.log", "decisions.log.1", "decisions.log.2"] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
    }

    #[test]
    fn a_spool_keeps_order_across_segments_and_reopening_and_drops_whole_lines_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().to_owned(), 1000, Duration::ZERO, dropped.clone()).unwrap();
        for i in 0..10 {
            spool.append(format!("line-{i:03}\n").as_bytes()).unwrap();
        }
        let (messages, cursor, _) = spool.peek(None, ROOM).unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].0, format!("{}-0-0-90", spool.id));
        let text = String::from_utf8_lossy(&messages[0].1).into_owned();
        assert_eq!(text.lines().take(2).collect::<Vec<_>>(), ["line-000", "line-001"]);
        assert_eq!(cursor, (0, 90));
        // The first four lines acknowledged.
        spool.advance((0, 36)).unwrap();
        drop(spool);
        // Reopened: what was acknowledged is not sent again.
        let spool = Spool::open(dir.path().to_owned(), 1000, Duration::ZERO, dropped.clone()).unwrap();
        let (messages, _, _) = spool.peek(None, ROOM).unwrap();
        assert_eq!(messages[0].0, format!("{}-0-36-90", spool.id));
        assert!(messages[0].1.starts_with(b"line-004\n"));
        // A retry stops where the failed batch did.
        spool.append(b"line-010\n").unwrap();
        assert_eq!(spool.peek(Some((0, 90)), ROOM).unwrap().1, (0, 90));
        // Lines written after reopening go to a new segment (never after a torn tail).
        assert_eq!(spool.peek(None, ROOM).unwrap().1, (0, 90));
        // 63 bytes pending, room for 937: of 200 lines of 9 bytes, 104 fit; the other 96 are
        // dropped whole and counted.
        let batch: Vec<u8> = (0..200).flat_map(|i| format!("more-{i:03}\n").into_bytes()).collect();
        spool.append(&batch).unwrap();
        assert_eq!(spool.pending(), 63 + 104 * 9);
        assert_eq!(dropped.get(), 96);
    }

    /// A write that fails part way (a full disk) does not stall the spool: what it wrote is not
    /// read, and the records after it are sent. (The segment used to be left with bytes past
    /// its recorded length: every later batch failed, or landed after them and was never sent
    /// whole.)
    #[test]
    fn a_failed_write_is_counted_and_the_records_after_it_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().to_owned(), 1 << 20, Duration::ZERO, dropped.clone()).unwrap();
        spool.append(b"line-0\nline-1\n").unwrap();
        // Part of a batch reached the segment before the disk filled up.
        let mut segment = OpenOptions::new().append(true).open(dir.path().join("0.seg")).unwrap();
        segment.write_all(b"partial-li").unwrap();
        spool.inner.lock().unwrap().current = Some(OpenOptions::new().write(true).open("/dev/full").unwrap());
        // The log writer counts the batch as dropped (`decision_log` tests), every line of it:
        // the spool counts none of it, not even a line it would have dropped as too long
        // (which used to be counted twice).
        let failing = [b"lost-0\nlost-1\n".to_vec(), vec![b'h'; MAX_LINE + 1], b"\n".to_vec()].concat();
        assert!(spool.append(&failing).is_err());
        assert_eq!(dropped.get(), 0);
        // Space again.
        spool.append(b"line-2\n").unwrap();
        assert_eq!(send_all(&spool), "line-0\nline-1\nline-2\n");
        assert_eq!(spool.pending(), 0);
    }

    #[test]
    fn a_segment_sent_whole_while_it_was_the_last_does_not_stop_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        let line = [vec![b'a'; 1023], vec![b'\n']].concat();
        spool.append(&line.repeat(SEGMENT_BYTES as usize / 1024)).unwrap();
        // Send all of segment 0 while no other segment exists.
        let mut cursor = (0, 0);
        loop {
            let (messages, next, _) = spool.peek(None, ROOM).unwrap();
            if messages.is_empty() {
                break;
            }
            cursor = next;
            spool.advance(cursor).unwrap();
        }
        assert_eq!(cursor, (0, SEGMENT_BYTES));
        // The writer starts segment 1: what it holds is sent.
        spool.append(b"next\n").unwrap();
        let (messages, cursor, _) = spool.peek(None, ROOM).unwrap();
        assert_eq!((messages.len(), cursor), (1, (1, 5)));
        assert_eq!(&messages[0].1[..], b"next\n");
        assert!(!dir.path().join("0.seg").exists());
        // Message ids carry the spool's own id, kept across reopening; another spool has another.
        let id = spool.id.clone();
        drop(spool);
        assert_eq!(Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap().id, id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Spool::open(other.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap().id, id);
    }

    #[test]
    fn unacknowledged_lines_are_synced_when_due_and_before_their_segment_is_left() {
        let syncs = |spool: &Spool| spool.inner.lock().unwrap().syncs;
        let dir = tempfile::tempdir().unwrap();
        // Synced as each batch is written.
        let every_batch = Spool::open(dir.path().join("a"), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        for _ in 0..3 {
            every_batch.append(b"line\n").unwrap();
        }
        assert_eq!(syncs(&every_batch), 3);
        // Synced at an interval: not as batches are written, but when forced (the writer stops).
        let spool = Spool::open(dir.path().join("b"), 1 << 30, Duration::from_secs(3600), Counter::default()).unwrap();
        for _ in 0..3 {
            spool.append(b"line\n").unwrap();
        }
        spool.sync_due(false).unwrap();
        assert_eq!(syncs(&spool), 0);
        spool.sync_due(true).unwrap();
        assert_eq!(syncs(&spool), 1);
        // Lines JetStream acknowledged are not synced.
        spool.append(b"line\n").unwrap();
        let (_, cursor, _) = spool.peek(None, ROOM).unwrap();
        spool.advance(cursor).unwrap();
        spool.sync_due(true).unwrap();
        assert_eq!(syncs(&spool), 1);
        // A segment still holding unacknowledged lines is synced before the next one starts.
        let line = [vec![b'a'; 1023], vec![b'\n']].concat();
        spool.append(&line.repeat(SEGMENT_BYTES as usize / 1024)).unwrap();
        assert_eq!(syncs(&spool), 1);
        spool.append(b"next\n").unwrap();
        assert_eq!(syncs(&spool), 2);
        // What is due is synced on the next write or idle flush.
        let due = Spool::open(dir.path().join("c"), 1 << 30, Duration::from_millis(1), Counter::default()).unwrap();
        due.append(b"line\n").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        SpoolWriter(due.clone()).flush().unwrap();
        assert_eq!(syncs(&due), 1);
    }

    #[test]
    fn spooled_records_are_readable_by_the_sidecar_alone_even_in_a_directory_open_to_others() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        // A spool directory that already exists, readable by every local user (made by hand,
        // or by a deployment): the records in it (claims, headers) must still not be.
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::DirBuilder::new().mode(0o755).create(&spool_dir).unwrap();
        std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spool = Spool::open(spool_dir.clone(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        spool.append(b"{\"subject\":\"alice\"}\n").unwrap();
        let (_, cursor, _) = spool.peek(None, ROOM).unwrap();
        spool.advance(cursor).unwrap();
        let mut files = 0;
        for entry in std::fs::read_dir(&spool_dir).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.file_name().to_string_lossy());
            files += 1;
        }
        assert_eq!(files, 4, "a segment, the cursor, the id and the lock");
        // A segment an earlier version left readable by others is made private when reopened.
        std::fs::set_permissions(spool_dir.join("0.seg"), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(spool);
        Spool::open(spool_dir.clone(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        let mode = std::fs::metadata(spool_dir.join("0.seg")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_spool_is_open_in_one_process_at_a_time_and_only_in_a_directory_of_its_own() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let open = || Spool::open(spool_dir.clone(), 1 << 30, Duration::ZERO, Counter::default());
        // Two writers of one spool would reuse segment numbers and message ids: JetStream
        // would keep one's records and drop the other's as duplicates, uncounted.
        let first = open().unwrap();
        let second = open().err().expect("a spool in use is refused");
        assert!(second.to_string().contains("is in use by another process"), "{second}");
        drop(first);
        drop(open().unwrap());
        // A directory others may write in (a volume's mount point) is used, but a link planted
        // under the next segment's name is not followed: the records never land where the
        // link points, and the batch after the one it cost goes to the next segment.
        std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let stolen = dir.path().join("stolen");
        std::fs::write(&stolen, b"").unwrap();
        let spool = open().unwrap();
        let next = spool.inner.lock().unwrap().next_segment;
        std::os::unix::fs::symlink(&stolen, spool_dir.join(format!("{next}.seg"))).unwrap();
        assert!(spool.append(b"{\"subject\":\"alice\"}\n").is_err());
        spool.append(b"{\"subject\":\"bob\"}\n").unwrap();
        assert_eq!(std::fs::read(&stolen).unwrap(), b"");
        assert_eq!(send_all(&spool), "{\"subject\":\"bob\"}\n");
    }

    #[test]
    fn a_compressed_message_decodes_to_its_lines_and_bad_bodies_are_errors() {
        let lines: Vec<u8> = (0..500)
            .flat_map(|i| {
                format!("{{\"request_id\":\"r-{i}\",\"outcome\":\"allow\",\"path\":\"/api/orders/{i}\"}}\n")
                    .into_bytes()
            })
            .collect();
        let body = Compression::Lz4.encode(bytes::Bytes::from(lines.clone())).unwrap();
        assert!(body.len() * 4 < lines.len(), "{} → {}", lines.len(), body.len());
        assert_eq!(&decode_message(Some("lz4"), &body).unwrap()[..], &lines[..]);
        // Uncompressed: the body is the lines.
        let plain = Compression::None.encode(bytes::Bytes::from(lines.clone())).unwrap();
        assert_eq!(&decode_message(None, &plain).unwrap()[..], &lines[..]);
        // A body that is not what its header says, an unknown encoding, a decompression bomb.
        assert!(decode_message(Some("lz4"), &lines).unwrap_err().contains("LZ4"));
        assert!(decode_message(Some("br"), &body).unwrap_err().contains("unknown Content-Encoding `br`"));
        let bomb = Compression::Lz4.encode(bytes::Bytes::from(vec![b'a'; 5 << 20])).unwrap();
        assert!(decode_message(Some("lz4"), &bomb).unwrap_err().contains("more than 4 MiB"));
    }

    #[test]
    fn a_message_frame_is_one_any_lz4_reader_reads_whatever_its_lines() {
        // Nothing, one block that compresses, blocks that do not (stored as they are), and a
        // message of more than one block.
        let mut noise = vec![0u8; LZ4_BLOCK + 5000];
        aws_lc_rs::rand::fill(&mut noise).unwrap();
        let lines: Vec<u8> = (0..30_000).flat_map(|i| format!("{{\"request_id\":\"r-{i}\"}}\n").into_bytes()).collect();
        let mut mixed = lines.clone();
        mixed.extend_from_slice(&noise);
        for input in [&b""[..], &lines, &noise, &mixed, &noise[..LZ4_BLOCK]] {
            let body = Compression::Lz4.encode(bytes::Bytes::copy_from_slice(input)).unwrap();
            let mut decoded = Vec::new();
            lz4_flex::frame::FrameDecoder::new(&body[..]).read_to_end(&mut decoded).unwrap();
            assert!(decoded == input, "{} bytes decode to {}", input.len(), decoded.len());
        }
        // Incompressible lines cost only the frame's 15 bytes.
        assert_eq!(Compression::Lz4.encode(bytes::Bytes::copy_from_slice(&noise[..1000])).unwrap().len(), 1015);
    }

    #[test]
    fn spooled_lines_go_out_in_messages_of_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::ZERO, Counter::default()).unwrap();
        let line = |c: u8, n: usize| [vec![c; n - 1], vec![b'\n']].concat();
        for c in b"abcde" {
            spool.append(&line(*c, 300 << 10)).unwrap();
        }
        let (messages, cursor, _) = spool.peek(None, ROOM).unwrap();
        let sizes: Vec<usize> = messages.iter().map(|(_, m)| m.len()).collect();
        assert_eq!(sizes, [900 << 10, 600 << 10]);
        assert_eq!(messages[1].0, format!("{}-0-{}-{}", spool.id, 900 << 10, 1500 << 10));
        assert_eq!(cursor, (0, 1500 << 10));
        assert!(messages.iter().all(|(_, m)| m.ends_with(b"\n")));
        // A line longer than a NATS message can carry is not spooled; it is counted.
        let dropped = Counter::default();
        let spool = Spool::open(dir.path().join("other"), 1 << 30, Duration::ZERO, dropped.clone()).unwrap();
        spool.append(&[line(b'x', MAX_LINE + 1), line(b'y', 10)].concat()).unwrap();
        assert_eq!((spool.pending(), dropped.get()), (10, 1));
    }
}
