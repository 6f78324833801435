//! Sandgate's decision records.
//!
//! A check is a pure function of its input, its pinned snapshot (module, data document, the
//! answers of `verify-jwt`) and a fresh instance: no clock but the pinned `now`, no randomness,
//! no state. So a record that captures the input ([`format`]) and names the module and data
//! by digest, with those kept in an [`archive`], can be decided again, offline, and must come
//! out the same ([`replay`]); and a candidate module can be run on recorded traffic to see
//! which decisions it would change.
//!
//! This crate knows the record format, the archive and replay; where records are written
//! (stdout, files, NATS) is the server's business.

pub mod archive;
pub mod format;
pub mod line;
pub mod replay;

pub use archive::Archive;
pub use format::{
    DecisionRecord, DecisionView, FORMAT_VERSION, Input, InputView, REDACTED, Record, SUMMARY_BOUNDS, VerifyAnswer,
    bounded,
};
pub use replay::{Replayer, Report, Verdict};
