//! `GET /metrics`: Prometheus text exposition (format 0.0.4). Names and
//! labels are a contract for dashboards: add, never rename.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::controller::Api;
use crate::controller::RegistryCounts;
use crate::metrics::{self, BadInput, RTT_BUCKETS_US, ShardStats};
use crate::registry::events::EventKind;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// One counter or gauge with a sample per shard.
    fn per_shard(
        &mut self,
        stats: &[ShardStats],
        name: &str,
        kind: &str,
        help: &str,
        field: impl Fn(&ShardStats) -> u64,
    ) {
        self.family(name, kind, help);
        for (i, s) in stats.iter().enumerate() {
            self.sample(name, &format!("shard=\"{i}\""), field(s));
        }
    }
}

/// The whole exposition for a controller.
pub fn render(api: &Api) -> String {
    let mut o = Out(String::with_capacity(16 << 10));
    connections(&mut o, api.stats());
    pong_rtt(&mut o, api.stats());
    registry(&mut o, api.counts());
    commands(&mut o, api);
    o.family("tether_build_info", "gauge", "The running version.");
    o.sample(
        "tether_build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    o.0
}

/// What the shards count: connections, pings, bytes, refused input.
fn connections(o: &mut Out, stats: &[ShardStats]) {
    let r = metrics::read;

    o.family("tether_connections", "gauge", "Open connections by shard and state (open: every socket; upgraded: WebSocket; admitted: registered or discovery, pinged).");
    for (i, s) in stats.iter().enumerate() {
        for (state, v) in [
            ("open", r(&s.open_connections)),
            ("upgraded", r(&s.open_upgraded)),
            ("admitted", r(&s.open_admitted)),
        ] {
            o.sample(
                "tether_connections",
                &format!("shard=\"{i}\",state=\"{state}\""),
                v,
            );
        }
    }
    o.per_shard(
        stats,
        "tether_accepted_total",
        "counter",
        "Connections accepted (rate() gives the accept rate).",
        |s| r(&s.accepted),
    );
    o.per_shard(
        stats,
        "tether_rejected_over_cap_total",
        "counter",
        "Upgrades answered 1013 because the shard was at its connection cap.",
        |s| r(&s.rejected_over_cap),
    );
    o.family(
        "tether_buffered_bytes",
        "gauge",
        "Heap bytes the shard holds for its connections (kind: in = partial frames and messages being reassembled; out = output the socket has not taken; in_flight = io_uring sends in flight), counted against --memory-budget.",
    );
    for (i, s) in stats.iter().enumerate() {
        for (kind, v) in [
            ("in", r(&s.held_in_bytes)),
            ("out", r(&s.held_out_bytes)),
            ("in_flight", r(&s.in_flight_bytes)),
        ] {
            o.sample(
                "tether_buffered_bytes",
                &format!("shard=\"{i}\",kind=\"{kind}\""),
                v,
            );
        }
    }
    o.family(
        "tether_connections_cut_total",
        "counter",
        "Connections the controller cut to bound its memory, by reason (slow_consumer: past its own output bound; over_budget: the shard was over its slice of the buffer budget and this one held the most beyond its share; evicted_unadmitted: the oldest connection not registered yet, evicted to make room; message_timeout: a message begun was not whole in time).",
    );
    for (i, s) in stats.iter().enumerate() {
        for (reason, v) in [
            ("slow_consumer", r(&s.slow_consumers_cut)),
            ("over_budget", r(&s.budget_cuts)),
            ("evicted_unadmitted", r(&s.unadmitted_evicted)),
            (
                "message_timeout",
                r(&s.bad_input[BadInput::MessageTimeout as usize]),
            ),
        ] {
            o.sample(
                "tether_connections_cut_total",
                &format!("shard=\"{i}\",reason=\"{reason}\""),
                v,
            );
        }
    }
    o.family(
        "tether_admission_refused_total",
        "counter",
        "New sockets refused, by reason (source_handshakes: closed at accept, its source address had its most sockets in their handshakes; source_connections: closed at accept, its source had its most connections; over_cap: the shard was at its connection bound, told 1013).",
    );
    for (i, s) in stats.iter().enumerate() {
        for (reason, v) in [
            ("source_handshakes", r(&s.refused_source_handshakes)),
            ("source_connections", r(&s.refused_source_conns)),
            ("over_cap", r(&s.rejected_over_cap)),
        ] {
            o.sample(
                "tether_admission_refused_total",
                &format!("shard=\"{i}\",reason=\"{reason}\""),
                v,
            );
        }
    }
    o.family(
        "tether_source_handshakes_peak",
        "gauge",
        "The most sockets one source address has held in their handshakes (accepted, not yet registered), node-wide, since start: against --max-handshakes-per-source (0 when neither per-source bound is set: nothing is counted).",
    );
    let peak = stats
        .iter()
        .map(|s| r(&s.source_handshakes_peak))
        .max()
        .unwrap_or(0);
    o.sample("tether_source_handshakes_peak", "", peak);
    o.per_shard(
        stats,
        "tether_slow_consumers_cut_total",
        "counter",
        "Connections cut for not reading their output.",
        |s| r(&s.slow_consumers_cut),
    );
    o.per_shard(
        stats,
        "tether_pings_sent_total",
        "counter",
        "Liveness pings sent.",
        |s| r(&s.pings_sent),
    );
    o.per_shard(
        stats,
        "tether_pings_skipped_total",
        "counter",
        "Liveness checks that sent no ping: the peer had shown life of its own within the interval.",
        |s| r(&s.pings_skipped),
    );
    o.per_shard(
        stats,
        "tether_pongs_received_total",
        "counter",
        "Pongs received.",
        |s| r(&s.pongs_received),
    );
    o.per_shard(
        stats,
        "tether_pong_deadlines_deferred_total",
        "counter",
        "Missed pong deadlines that waited for a command in flight to the instance (its tool may run in the service's read loop).",
        |s| r(&s.pongs_deferred),
    );
    o.per_shard(
        stats,
        "tether_rate_limited_total",
        "counter",
        "Lookups, subscriptions and metadata updates refused (-32003) past a connection's request rate.",
        |s| r(&s.rate_limited),
    );
    o.per_shard(
        stats,
        "tether_identity_conflict_refusals_total",
        "counter",
        "Registrations refused (-32003, then close 1013) because two live registrants kept superseding one identity; each conflict's start is an identity_conflict event.",
        |s| r(&s.identity_conflict_refusals),
    );
    o.per_shard(
        stats,
        "tether_peer_closed_total",
        "counter",
        "Connections the peer closed with a close frame.",
        |s| r(&s.peer_closed),
    );
    o.per_shard(
        stats,
        "tether_peer_gone_total",
        "counter",
        "Connections that ended without a close frame.",
        |s| r(&s.peer_gone),
    );
    o.per_shard(
        stats,
        "tether_recv_rearms_total",
        "counter",
        "io_uring receives re-armed after no receive buffer was free (no data is lost).",
        |s| r(&s.recv_rearms),
    );
    o.per_shard(
        stats,
        "tether_accept_errors_total",
        "counter",
        "accept(2) failures (e.g. out of file descriptors).",
        |s| r(&s.accept_errors),
    );
    o.per_shard(
        stats,
        "tether_received_bytes_total",
        "counter",
        "Bytes read from service sockets.",
        |s| r(&s.bytes_in),
    );
    o.per_shard(
        stats,
        "tether_sent_bytes_total",
        "counter",
        "Bytes written to service sockets.",
        |s| r(&s.bytes_out),
    );
    o.family(
        "tether_bad_input_total",
        "counter",
        "Refused input by kind.",
    );
    for kind in BadInput::ALL {
        o.sample(
            "tether_bad_input_total",
            &format!("kind=\"{}\"", kind.label()),
            metrics::total(stats, |s| &s.bad_input[kind as usize]),
        );
    }
}

/// The controller's ping round trips, summed over shards.
fn pong_rtt(o: &mut Out, stats: &[ShardStats]) {
    o.family(
        "tether_pong_rtt_seconds",
        "histogram",
        "Round trip of controller pings.",
    );
    let mut cumulative = 0;
    for (i, le) in RTT_BUCKETS_US.iter().enumerate() {
        cumulative += metrics::total(stats, |s| &s.rtt_buckets[i]);
        o.sample(
            "tether_pong_rtt_seconds_bucket",
            &format!("le=\"{}\"", *le as f64 / 1e6),
            cumulative,
        );
    }
    cumulative += metrics::total(stats, |s| &s.rtt_buckets[RTT_BUCKETS_US.len()]);
    o.sample("tether_pong_rtt_seconds_bucket", "le=\"+Inf\"", cumulative);
    o.sample(
        "tether_pong_rtt_seconds_sum",
        "",
        metrics::total(stats, |s| &s.rtt_sum_us) as f64 / 1e6,
    );
    // From the same reading as +Inf, as the exposition format requires
    // (shards keep counting while we read).
    o.sample("tether_pong_rtt_seconds_count", "", cumulative);
}

/// Instances, registry events, subscriptions and event subscribers.
fn registry(o: &mut Out, counts: RegistryCounts) {
    let RegistryCounts {
        up,
        down,
        subscriptions,
        event_subscribers: subscribers,
        events_cut: cut,
        events,
        ..
    } = counts;
    o.family(
        "tether_services",
        "gauge",
        "Registered instances by status (down ones are kept for a while).",
    );
    o.sample("tether_services", "status=\"up\"", up);
    o.sample("tether_services", "status=\"down\"", down);
    o.family(
        "tether_registry_events_total",
        "counter",
        "Instance state changes by kind (registered, updated, down, deregistered, superseded, identity_conflict).",
    );
    for (kind, n) in &events {
        o.sample(
            "tether_registry_events_total",
            &format!("kind=\"{}\"", kind.label()),
            n,
        );
    }
    o.family(
        "tether_downs_total",
        "counter",
        "Instances marked down, by cause.",
    );
    o.sample(
        "tether_downs_total",
        "cause=\"pong_timeout\"",
        events
            .iter()
            .find(|(k, _)| *k == EventKind::Down)
            .map_or(0, |(_, n)| *n),
    );
    o.family(
        "tether_discovery_subscriptions",
        "gauge",
        "Discovery subscriptions held by services.",
    );
    o.sample("tether_discovery_subscriptions", "", subscriptions);
    o.family(
        "tether_event_subscribers",
        "gauge",
        "Admin event stream subscribers.",
    );
    o.sample("tether_event_subscribers", "", subscribers);
    o.family(
        "tether_event_subscribers_cut_total",
        "counter",
        "Event subscribers cut for falling behind.",
    );
    o.sample("tether_event_subscribers_cut_total", "", cut);
}

fn commands(o: &mut Out, api: &Api) {
    o.family(
        "tether_commands_total",
        "counter",
        "Commands to services by outcome.",
    );
    for (label, n) in api.command_outcomes() {
        o.sample("tether_commands_total", &format!("outcome=\"{label}\""), n);
    }
    o.family(
        "tether_commands_in_flight",
        "gauge",
        "Commands awaiting a reply.",
    );
    o.sample("tether_commands_in_flight", "", api.commands_in_flight());
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = render(&state.api);
    let mut o = Out(String::new());
    o.family(
        "tether_audit_lines_total",
        "counter",
        "Audit lines written to the audit file, and dropped (queue full).",
    );
    o.sample(
        "tether_audit_lines_total",
        "result=\"written\"",
        state.audit.written(),
    );
    o.sample(
        "tether_audit_lines_total",
        "result=\"dropped\"",
        state.audit.dropped(),
    );
    o.family(
        "tether_audit_write_errors_total",
        "counter",
        "Writes or fsyncs of the audit file that failed (the lines are kept and retried).",
    );
    o.sample(
        "tether_audit_write_errors_total",
        "",
        state.audit.write_errors(),
    );
    o.family(
        "tether_audit_failing",
        "gauge",
        "1 while the audit file cannot be written (readyz fails, mutating commands are refused).",
    );
    o.sample("tether_audit_failing", "", u64::from(state.audit.failing()));
    if let Some(c) = state.config.cluster.get() {
        cluster(&mut o, c);
    }
    text.push_str(&o.0);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The cluster layer (`--cluster`): its writes to etcd and its view.
fn cluster(o: &mut Out, c: &crate::cluster::Cluster) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = c.stats();
    o.family(
        "tether_cluster_stale",
        "gauge",
        "1 while etcd is not reached: this node serves its own sockets and its last view of the others.",
    );
    o.sample("tether_cluster_stale", "", u64::from(c.is_stale()));
    o.family(
        "tether_cluster_remote_instances",
        "gauge",
        "Up instances of the other nodes in this node's view.",
    );
    o.sample(
        "tether_cluster_remote_instances",
        "",
        c.with_view(|v| v.instance_count()) as u64,
    );
    o.family(
        "tether_cluster_etcd_ops_total",
        "counter",
        "Operations written to etcd, by kind, and the transactions (of at most 128) that carried them.",
    );
    for (op, n) in [
        ("txn", &s.txns),
        ("put", &s.puts),
        ("delete", &s.deletes),
        ("list", &s.lists),
        ("lease_grant", &s.leases),
        ("resync", &s.resyncs),
    ] {
        o.sample(
            "tether_cluster_etcd_ops_total",
            &format!("op=\"{op}\""),
            n.load(Relaxed),
        );
    }
    o.family(
        "tether_cluster_etcd_bytes_total",
        "counter",
        "Bytes of keys and values written to etcd.",
    );
    o.sample("tether_cluster_etcd_bytes_total", "", s.bytes.load(Relaxed));
    o.family(
        "tether_cluster_etcd_errors_total",
        "counter",
        "Sessions with etcd that ended in an error (each followed by a new one).",
    );
    o.sample(
        "tether_cluster_etcd_errors_total",
        "",
        s.errors.load(Relaxed),
    );
}
