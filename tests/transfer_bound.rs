//! A policy cannot make the host copy more than [`MAX_TRANSFER`] bytes out of its memory at
//! once. The hostile fixture's `/alias-decision` answers an allow whose 100 header names all
//! point at one 1 MiB string: 1 MiB of the policy's memory, 100 MiB for a host that copies the
//! answer before judging its size. Those copies are outside the policy's memory cap and its
//! timeout, on every evaluation thread at once; a container sized as the policy guide says
//! would be killed for them.
//!
//! Alone in its test binary: it reads the process's peak resident memory, which no other test
//! may raise meanwhile.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_runtime::MAX_TRANSFER;
use sandgate_tests::{check, context, load, runtime};
use serde_json::{Value, json};

/// The process's peak resident memory (`VmHWM`), in KiB.
fn peak_resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_answer_naming_one_string_a_hundred_times_is_refused_before_the_host_copies_it() {
    let runtime = runtime();
    let hostile = load(&runtime, "hostile");
    // The module's first instance, and a check that writes 1 MiB of its memory as the attack
    // does: what the attack costs apart from the host's copies is in the baseline.
    assert!(runtime.evaluate(&hostile, &check(json!({ "path": "/write-1mib" })), &context(Value::Null)).is_allow());
    let before = peak_resident_kib();
    let evaluation = runtime.evaluate(&hostile, &check(json!({ "path": "/alias-decision" })), &context(Value::Null));
    let grown = peak_resident_kib().saturating_sub(before);
    // At most MAX_TRANSFER copied: with room for the allocator, a sixth of what copying the
    // whole answer takes.
    let bound_kib = (16 * MAX_TRANSFER / 1024) as u64;
    assert!(grown < bound_kib, "the host's peak resident memory grew by {grown} KiB for one answer");
    assert!(!evaluation.is_allow());
    assert_eq!(evaluation.reason(), "policy_transfer_too_large", "{:?}", evaluation.fault);
}
