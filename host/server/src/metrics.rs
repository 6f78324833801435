//! Prometheus metrics, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub outcome: &'static str,
    /// The reason code (`allow` for allows).
    pub reason: String,
}

/// Labels of a JWKS fetch.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// The issuer.
    pub issuer: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of a shadow evaluation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// The live policy's id.
    pub policy: String,
    /// `agree`, `disagree`, or `skipped` (no instance was free).
    pub result: &'static str,
}

/// Labels of a listener's connection counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `forward-auth`, `grpc`, `admin` or `ops`.
    pub listener: &'static str,
}

/// Labels of the preparations' outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrepareLabels {
    /// `prepared`, `declined` or `failed`.
    pub outcome: &'static str,
}

/// Every metric Sandgate exports.
pub struct Metrics {
    registry: Registry,
    /// Decisions by outcome and reason.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Check latency, seconds.
    pub latency: Histogram,
    /// JWKS fetches by issuer and result.
    pub jwks_fetches: Family<FetchLabels, Counter>,
    /// Policy instances in use (set at scrape time).
    pub pool_in_use: Gauge,
    /// Checks that had to wait for a free instance.
    pub queue_waits: Counter,
    /// Shadow evaluations by policy and agreement with the live version.
    pub shadow: Family<ShadowLabels, Counter>,
    /// Decision-log lines dropped because the log's reader was not keeping up.
    pub decision_log_dropped: Counter,
    /// In a fleet: seconds since NATS last answered (set at scrape time).
    pub fleet_staleness: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// In a fleet: the bucket revision applied (set at scrape time).
    pub fleet_revision: Gauge,
    /// With the NATS sink: bytes of decision records in the spool, not yet acknowledged.
    pub decision_spool_bytes: Gauge,
    /// Connections open, by listener.
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// New connections that found their listener at `max_connections`, by listener.
    pub connections_at_cap: Family<ListenerLabels, Counter>,
    /// Idle connections closed to make room at `max_connections`, by listener.
    pub connections_closed_for_room: Family<ListenerLabels, Counter>,
    /// Policies prepared for a data version (`prepare`), by outcome (brought up to the
    /// runtime's counts at scrape time).
    pub policy_preparations: Family<PrepareLabels, Counter>,
    /// Serialises bringing `policy_preparations` up to date (two scrapes at once would add
    /// the same difference twice).
    preparations_update: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sandgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("decisions", "Authorization decisions by outcome and reason", decisions.clone());
        let latency = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register("check_latency_seconds", "Time to answer a check", latency.clone());
        let jwks_fetches = Family::<FetchLabels, Counter>::default();
        registry.register("jwks_fetches", "JWKS fetches by issuer and result", jwks_fetches.clone());
        let pool_in_use = Gauge::default();
        registry.register("pool_instances_in_use", "Policy instances in use", pool_in_use.clone());
        let queue_waits = Counter::default();
        registry.register("queue_waits", "Checks that waited for a free policy instance", queue_waits.clone());
        let shadow = Family::<ShadowLabels, Counter>::default();
        registry.register("shadow_evaluations", "Shadow evaluations by agreement with the live policy", shadow.clone());
        let decision_log_dropped = Counter::default();
        registry.register(
            "decision_log_dropped",
            "Decision-log lines dropped because the log's reader was not keeping up",
            decision_log_dropped.clone(),
        );
        let fleet_staleness = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "fleet_staleness_seconds",
            "Seconds since the fleet's NATS last answered",
            fleet_staleness.clone(),
        );
        let fleet_revision = Gauge::default();
        registry.register("fleet_revision", "The fleet bucket revision applied", fleet_revision.clone());
        let decision_spool_bytes = Gauge::default();
        registry.register(
            "decision_spool_bytes",
            "Bytes of decision records waiting in the spool for NATS to acknowledge them",
            decision_spool_bytes.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register("connections_open", "Connections open, by listener", connections_open.clone());
        let connections_at_cap = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_at_cap",
            "New connections that found their listener at max_connections",
            connections_at_cap.clone(),
        );
        let connections_closed_for_room = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_closed_for_room",
            "Idle connections closed to make room at max_connections",
            connections_closed_for_room.clone(),
        );
        let policy_preparations = Family::<PrepareLabels, Counter>::default();
        registry.register(
            "policy_preparations",
            "Policies prepared for a data version by their prepare export, by outcome",
            policy_preparations.clone(),
        );
        Metrics {
            policy_preparations,
            preparations_update: std::sync::Mutex::new(()),
            registry,
            decisions,
            latency,
            jwks_fetches,
            pool_in_use,
            queue_waits,
            shadow,
            decision_log_dropped,
            fleet_staleness,
            fleet_revision,
            decision_spool_bytes,
            connections_open,
            connections_at_cap,
            connections_closed_for_room,
        }
    }
}

impl Metrics {
    /// The connection counts of listener `name`.
    pub fn listener(&self, name: &'static str) -> crate::listener::ConnectionMetrics {
        let labels = ListenerLabels { listener: name };
        crate::listener::ConnectionMetrics {
            open: self.connections_open.get_or_create(&labels).clone(),
            at_cap: self.connections_at_cap.get_or_create(&labels).clone(),
            closed_for_room: self.connections_closed_for_room.get_or_create(&labels).clone(),
        }
    }

    /// Bring `policy_preparations` up to the runtime's `counts`.
    pub fn set_preparations(&self, counts: sandgate_runtime::PrepareCounts) {
        let _update = self.preparations_update.lock().unwrap_or_else(|e| e.into_inner());
        for (outcome, total) in
            [("prepared", counts.prepared), ("declined", counts.declined), ("failed", counts.failed)]
        {
            let counter = self.policy_preparations.get_or_create(&PrepareLabels { outcome });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
