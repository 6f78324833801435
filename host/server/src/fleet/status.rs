//! Each sidecar's status in the bucket `sandgate_<fleet>_status`, key = node id: what it has
//! applied and what failed, with a heartbeat. `sandgate fleet status` lists them;
//! `sandgate fleet … --wait` watches them until every live sidecar has applied a write.

use crate::state::State;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One sidecar's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its node id.
    pub node: String,
    /// The bucket revision its snapshot is at.
    pub applied_revision: u64,
    /// Whether it has caught up with the bucket since it started.
    pub synced: bool,
    /// Whether it is past `max_staleness_secs` without NATS.
    pub stale: bool,
    /// Policies and the module each runs (pinned reference, or digest for a local module).
    pub policies: BTreeMap<String, String>,
    /// Items of the applied revision that could not be applied.
    pub errors: Vec<super::ItemError>,
    /// When this was written, Unix milliseconds.
    pub heartbeat_ms: u64,
    /// How often it writes, milliseconds.
    pub heartbeat_every_ms: u64,
}

impl NodeStatus {
    /// Whether the sidecar is alive at `now_ms`: it wrote within three of its heartbeats.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.heartbeat_ms) <= 3 * self.heartbeat_every_ms.max(100) + 1000
    }
}

fn current(state: &State) -> Option<NodeStatus> {
    let health = state.fleet.as_ref()?;
    let snapshot = state.store.load();
    // The revision with its own errors (the snapshot may already be one batch ahead: then
    // this says less than is true, never more).
    let (applied_revision, errors) = health.applied_with_errors();
    Some(NodeStatus {
        node: health.node_id.clone(),
        applied_revision,
        synced: health.is_synced(),
        stale: health.is_stale(),
        policies: snapshot
            .policies
            .values()
            .map(|p| {
                let module = p.source.as_ref().map_or_else(|| p.module.digest().to_owned(), |s| s.pinned.clone());
                (p.id.clone(), module)
            })
            .collect(),
        errors: bounded(errors),
        heartbeat_ms: super::unix_ms(),
        heartbeat_every_ms: health.heartbeat_every.as_millis() as u64,
    })
}

/// Errors a status lists, and bytes of each error's text it keeps.
const MAX_ERRORS: usize = 64;
const MAX_ERROR_TEXT: usize = 1024;

/// `errors` cut to what a status carries: a registry's long error body, or many failing items,
/// must not make the status larger than NATS takes (the sidecar would then drop out of the
/// live ones `--wait` waits for, while it keeps serving). A cut is said in the text.
fn bounded(mut errors: Vec<super::ItemError>) -> Vec<super::ItemError> {
    let more = errors.len().saturating_sub(MAX_ERRORS);
    errors.truncate(MAX_ERRORS);
    for e in &mut errors {
        if e.error.len() > MAX_ERROR_TEXT {
            e.error.truncate(sandgate_records::bounded(&e.error, MAX_ERROR_TEXT).len());
            e.error.push_str(" … (cut)");
        }
    }
    if more > 0
        && let Some(last) = errors.last_mut()
    {
        last.error.push_str(&format!(" (and {more} more items not applied)"));
    }
    errors
}

/// Open (or create) the status bucket.
pub async fn status_store(
    js: &async_nats::jetstream::Context,
    fleet: &str,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let name = super::status_bucket(fleet);
    super::open_or_create_bucket(
        js,
        &name,
        1,
        super::STATUS_MAX_AGE,
        async_nats::jetstream::stream::StorageType::Memory,
        replicas,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Write this sidecar's status now; `true` when NATS took it. Writes are serialised and each
/// reads the state under the lock, so the last write is always the newest state (a heartbeat
/// started before an apply can never land after the apply's own write).
pub async fn publish(state: &State, client: &async_nats::Client) -> bool {
    let Some(health) = state.fleet.as_ref() else { return false };
    let mut store = health.status_store.lock().await;
    if store.is_none() {
        let js = async_nats::jetstream::new(client.clone());
        *store = status_store(&js, &health.name, health.replicas).await.ok();
    }
    let (Some(kv), Some(status)) = (store.as_ref(), current(state)) else { return false };
    let Ok(value) = serde_json::to_vec(&status) else { return false };
    let taken = kv.put(&status.node, value.into()).await.is_ok();
    if !taken {
        // Opened again next time: the bucket may have gone with a NATS restart.
        *store = None;
    }
    taken
}

/// Write the status every `every` until `stop`.
pub async fn heartbeat(
    state: std::sync::Arc<State>,
    client: async_nats::Client,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _ = tokio::time::timeout(every.max(Duration::from_secs(2)), publish(&state, &client)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::ItemError;

    /// A status listing every error in full grew with them: 200 items failing with a
    /// registry's 1 MiB error body made a status NATS refuses (its default `max_payload` is
    /// 1 MiB).
    #[test]
    fn a_status_lists_a_bounded_number_of_errors_each_cut_short() {
        let long = "é".repeat(512 << 10);
        let errors: Vec<ItemError> =
            (0..200).map(|i| ItemError { key: format!("policy.p{i}"), revision: i, error: long.clone() }).collect();
        let kept = bounded(errors);
        assert_eq!(kept.len(), MAX_ERRORS);
        assert!(kept.iter().all(|e| e.error.len() <= MAX_ERROR_TEXT + 64 && e.error.contains("(cut)")));
        assert!(kept[MAX_ERRORS - 1].error.ends_with("(and 136 more items not applied)"));
        assert!(serde_json::to_vec(&kept).unwrap().len() < 128 << 10);
        let short = vec![ItemError { key: "route.r".into(), revision: 1, error: "no policy `p`".into() }];
        assert_eq!(bounded(short.clone()), short);
    }
}
