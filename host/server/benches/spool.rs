//! What the NATS sink's spool costs the publisher a batch of records: the log writer's append
//! (a write into the page cache) and the publisher's peek of the lines to send, taken from the
//! spool's copy in memory (what it does while it keeps up) or read back from the segment file
//! (what it does for a retry or a backlog). One batch is 1 MiB of record lines of ~1.6 KB,
//! what `capture = "input"` writes for 640 checks; it is acknowledged at once, as a NATS server
//! that keeps up would.
//!
//! ```sh
//! cargo bench -p sandgate-server --features bench --bench spool
//! ```
#![allow(clippy::expect_used, reason = "a benchmark: a failed set-up should stop it loudly")]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prometheus_client::metrics::counter::Counter;
use sandgate_server::log_sink::Spool;
use std::hint::black_box;
use std::time::Duration;

/// 640 lines of ~1.6 KB, each different (a request id and a path that vary), in batches of
/// 256 KiB as the log writer hands them over.
fn batches() -> (Vec<Vec<u8>>, usize) {
    let lines: Vec<u8> = (0..640)
        .flat_map(|i| {
            let mut line = format!(
                r#"{{"v":2,"request_id":"0194d3c5-7b7e-7cc1-8a33-{i:012}","route":"/api","path":"/api/orders/{}","outcome":"allow","#,
                i * 7919 % 100_000
            );
            while line.len() < 1600 {
                line.push_str(r#""header":"x-forwarded-for: 127.0.0.1","#);
            }
            line.push_str("\"end\":true}\n");
            line.into_bytes()
        })
        .collect();
    let mut batches = Vec::new();
    let mut rest = &lines[..];
    while !rest.is_empty() {
        let cut = rest[..rest.len().min(256 << 10)].iter().rposition(|b| *b == b'\n').map_or(rest.len(), |i| i + 1);
        batches.push(rest[..cut].to_vec());
        rest = &rest[cut..];
    }
    (batches, 640)
}

fn spool(c: &mut Criterion) {
    let (batches, records) = batches();
    let mut group = c.benchmark_group("spool: append and send 640 records");
    group.throughput(Throughput::Elements(records as u64));
    for (name, from_disk) in [("sent from memory", false), ("read back from disk", true)] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let spool = Spool::open(dir.path().to_owned(), 1 << 30, Duration::from_secs(3600), Counter::default())
            .expect("the spool opens");
        group.bench_function(name, |b| {
            b.iter(|| {
                for batch in &batches {
                    spool.append(batch).expect("the batch is written");
                }
                black_box(spool.bench_send_everything(from_disk).expect("the spool is readable"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, spool);
criterion_main!(benches);
