//! Counters every part of the controller writes and anyone may read: plain
//! relaxed atomics, one block per shard so shards never share a cache line
//! on the hot path. Readers sum the blocks.
//!
//! Never does: allocate per event, or lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Every kind of bad input the controller refuses, engine and protocol alike.
/// The label is part of the metrics contract: do not rename.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BadInput {
    UpgradeTooLarge,
    NotAnUpgrade,
    BadWebsocketKey,
    BadWebsocketVersion,
    MalformedHttp,
    WrongPath,
    HandshakeTimeout,
    UnmaskedFrame,
    ReservedBitsOrOpcode,
    BadControlFrame,
    BadFrameHeader,
    BadCloseFrame,
    BinaryFrame,
    InvalidUtf8,
    MessageTooBig,
    BadFragmentation,
    ResetMidFrame,
    InvalidJson,
    InvalidRequest,
    MethodNotFound,
    NotRegistered,
    InvalidParams,
    UnknownReplyId,
    RegisterTimeout,
    Unauthorized,
    /// A frame or fragmented message not whole within the message timeout.
    MessageTimeout,
    /// A TLS handshake that failed, or a record that would not open.
    Tls,
}

impl BadInput {
    pub const ALL: [BadInput; 27] = [
        BadInput::UpgradeTooLarge,
        BadInput::NotAnUpgrade,
        BadInput::BadWebsocketKey,
        BadInput::BadWebsocketVersion,
        BadInput::MalformedHttp,
        BadInput::WrongPath,
        BadInput::HandshakeTimeout,
        BadInput::UnmaskedFrame,
        BadInput::ReservedBitsOrOpcode,
        BadInput::BadControlFrame,
        BadInput::BadFrameHeader,
        BadInput::BadCloseFrame,
        BadInput::BinaryFrame,
        BadInput::InvalidUtf8,
        BadInput::MessageTooBig,
        BadInput::BadFragmentation,
        BadInput::ResetMidFrame,
        BadInput::InvalidJson,
        BadInput::InvalidRequest,
        BadInput::MethodNotFound,
        BadInput::NotRegistered,
        BadInput::InvalidParams,
        BadInput::UnknownReplyId,
        BadInput::RegisterTimeout,
        BadInput::Unauthorized,
        BadInput::MessageTimeout,
        BadInput::Tls,
    ];

    pub fn label(self) -> &'static str {
        match self {
            BadInput::UpgradeTooLarge => "upgrade_too_large",
            BadInput::NotAnUpgrade => "not_an_upgrade",
            BadInput::BadWebsocketKey => "bad_websocket_key",
            BadInput::BadWebsocketVersion => "bad_websocket_version",
            BadInput::MalformedHttp => "malformed_http",
            BadInput::WrongPath => "wrong_path",
            BadInput::HandshakeTimeout => "handshake_timeout",
            BadInput::UnmaskedFrame => "unmasked_frame",
            BadInput::ReservedBitsOrOpcode => "reserved_bits_or_opcode",
            BadInput::BadControlFrame => "bad_control_frame",
            BadInput::BadFrameHeader => "bad_frame_header",
            BadInput::BadCloseFrame => "bad_close_frame",
            BadInput::BinaryFrame => "binary_frame",
            BadInput::InvalidUtf8 => "invalid_utf8",
            BadInput::MessageTooBig => "message_too_big",
            BadInput::BadFragmentation => "bad_fragmentation",
            BadInput::ResetMidFrame => "reset_mid_frame",
            BadInput::InvalidJson => "invalid_json",
            BadInput::InvalidRequest => "invalid_request",
            BadInput::MethodNotFound => "method_not_found",
            BadInput::NotRegistered => "not_registered",
            BadInput::InvalidParams => "invalid_params",
            BadInput::UnknownReplyId => "unknown_reply_id",
            BadInput::RegisterTimeout => "register_timeout",
            BadInput::Unauthorized => "unauthorized",
            BadInput::MessageTimeout => "message_timeout",
            BadInput::Tls => "tls",
        }
    }

    pub fn from_label(label: &str) -> Option<BadInput> {
        BadInput::ALL.into_iter().find(|b| b.label() == label)
    }
}

/// Upper bounds of the pong round-trip histogram, in microseconds.
pub const RTT_BUCKETS_US: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
];

/// One shard's counters. Gauges are the `open_*` fields.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardStats {
    pub accepted: AtomicU64,
    pub open_connections: AtomicU64,
    pub open_upgraded: AtomicU64,
    pub open_admitted: AtomicU64,
    pub rejected_over_cap: AtomicU64,
    pub slow_consumers_cut: AtomicU64,
    pub pings_sent: AtomicU64,
    /// Checks that found the peer alive on its own: no ping was sent.
    pub pings_skipped: AtomicU64,
    pub pongs_received: AtomicU64,
    pub pongs_missed: AtomicU64,
    /// Missed pongs that waited for a command in flight to the instance.
    pub pongs_deferred: AtomicU64,
    /// Registrations refused: their identity is in conflict (two live
    /// registrants kept superseding each other).
    pub identity_conflict_refusals: AtomicU64,
    /// Connections cut because the shard was over its slice of the buffer
    /// budget and they held the most beyond their share.
    pub budget_cuts: AtomicU64,
    /// Requests refused (-32003) past a connection's request rate.
    pub rate_limited: AtomicU64,
    /// Connections not admitted yet evicted to make room (the oldest).
    pub unadmitted_evicted: AtomicU64,
    /// Sockets closed at accept: their source address had its most
    /// sockets in their handshakes, or its most connections.
    pub refused_source_handshakes: AtomicU64,
    pub refused_source_conns: AtomicU64,
    /// The most sockets one source address held in their handshakes,
    /// node-wide, as this shard saw it when it took one (a high-water mark
    /// since start: what `--max-handshakes-per-source` is held against).
    pub source_handshakes_peak: AtomicU64,
    /// Gauges, set every tick: heap bytes held for input (partial frames,
    /// messages being reassembled), for output not yet taken by the socket,
    /// and by sends in flight (io_uring).
    pub held_in_bytes: AtomicU64,
    pub held_out_bytes: AtomicU64,
    pub in_flight_bytes: AtomicU64,
    pub peer_closed: AtomicU64,
    pub peer_gone: AtomicU64,
    pub accept_errors: AtomicU64,
    /// io_uring: receives re-armed after no buffer was free (ENOBUFS).
    pub recv_rearms: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub rtt_count: AtomicU64,
    pub rtt_sum_us: AtomicU64,
    pub rtt_buckets: [AtomicU64; RTT_BUCKETS_US.len() + 1],
    pub bad_input: [AtomicU64; BadInput::ALL.len()],
}

impl ShardStats {
    pub fn bad(&self, kind: BadInput) {
        self.bad_input[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn rtt(&self, micros: u64) {
        let bucket = RTT_BUCKETS_US
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(RTT_BUCKETS_US.len());
        self.rtt_buckets[bucket].fetch_add(1, Relaxed);
        self.rtt_count.fetch_add(1, Relaxed);
        self.rtt_sum_us.fetch_add(micros, Relaxed);
    }
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

pub fn dec(counter: &AtomicU64) {
    counter.fetch_sub(1, Relaxed);
}

pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

/// Sums one counter over all shards.
pub fn total(stats: &[ShardStats], field: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    stats.iter().map(|s| read(field(s))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_round_trip() {
        for (i, kind) in BadInput::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "ALL must be in declaration order");
            assert_eq!(BadInput::from_label(kind.label()), Some(kind));
        }
    }

    #[test]
    fn rtt_lands_in_the_first_bucket_that_holds_it() {
        let s = ShardStats::default();
        s.rtt(100);
        s.rtt(101);
        s.rtt(u64::MAX / 2);
        assert_eq!(read(&s.rtt_buckets[0]), 1);
        assert_eq!(read(&s.rtt_buckets[1]), 1);
        assert_eq!(read(&s.rtt_buckets[RTT_BUCKETS_US.len()]), 1);
    }
}
