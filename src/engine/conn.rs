//! One server-side WebSocket connection as a state machine: bytes and ticks
//! in, events and bytes to send out. No sockets, no clocks, no threads; the
//! shard feeds it and carries out what it asks.
//!
//! Kinds of methods (as quinn-proto's `Connection`): getters (`phase`,
//! `pending_out`, …); `feed` and `on_deadline`, which take an input and
//! the tick it happened at; the mutators the shard calls when the handler
//! decides (`admit`, `start_closing`); and `poll_deadline`, the one place
//! the connection says when it next needs the shard. Every phase has a
//! deadline (handshake, admit, ping or pong, linger), and every input that
//! can move it moves it here: the shard re-links its wheel after each
//! input instead of working out what changed.
//!
//! Owns: the connection's phase, its liveness bookkeeping, and the bytes it
//! must hold between reads (an incomplete frame, a fragmented message, output
//! the socket would not take yet). Those live in one boxed `Bufs` that exists
//! only while one of them is non-empty, so an idle connection owns no heap.
//!
//! Never does: interpret a text message (that is the handler's), or keep a
//! buffer past its bound: a frame, a message and the upgrade head are capped
//! by `Limits`, and the output cap is the shard's to enforce.

use super::wheel::{Link, Tick};
use super::ws::{self, CloseError, FrameError, HandshakeError, OpCode, Role, UpgradeRequest};
use crate::metrics::BadInput;

/// Bounds on what a peer can make a connection hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// One message (after reassembly), and so one frame. Over it: close 1009.
    pub max_message: usize,
    /// The same before the handler admits the connection: all it needs
    /// then is a registration, so a socket that never registers cannot
    /// make the controller hold a megabyte.
    pub max_message_unadmitted: usize,
    /// The HTTP upgrade head. Over it: 431 and drop.
    pub max_upgrade: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 1 << 20,
            max_message_unadmitted: 64 << 10,
            max_upgrade: 8 << 10,
        }
    }
}

/// Deadlines, in wheel ticks.
#[derive(Clone, Debug)]
pub struct Timing {
    pub handshake: Tick,
    pub admit: Tick,
    pub ping_interval: Tick,
    /// How much later than an interval after the peer's own last sign of
    /// life the check comes, so a peer that pings every interval itself is
    /// seen before it (its timer and ours drift by ticks and milliseconds).
    pub ping_grace: Tick,
    pub pong_timeout: Tick,
    pub linger: Tick,
    /// A frame or fragmented message, once begun, must be whole within
    /// this (else close 1008): held input cannot be kept open by a trickle.
    pub message: Tick,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the HTTP upgrade request.
    Handshake,
    /// Upgraded; the handler has not admitted it yet (e.g. no register).
    Upgraded,
    /// Admitted: pinged every interval.
    Admitted,
    /// We sent a close frame; waiting for the peer's close or EOF.
    Closing,
}

/// Something the peer did that the protocol forbids.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    Handshake(HandshakeError),
    Frame(FrameError),
    Close(CloseError),
    Binary,
    InvalidUtf8,
    TooBig,
    UnexpectedContinuation,
    ExpectedContinuation,
}

impl Violation {
    /// The close code to send, or `None` before the upgrade (HTTP then).
    pub fn close_code(self) -> Option<u16> {
        Some(match self {
            Violation::Handshake(_) => return None,
            Violation::Binary => 1003,
            Violation::InvalidUtf8 | Violation::Close(CloseError::Reason) => 1007,
            Violation::TooBig => 1009,
            Violation::Frame(_)
            | Violation::Close(_)
            | Violation::UnexpectedContinuation
            | Violation::ExpectedContinuation => 1002,
        })
    }

    /// The counter this violation is reported under.
    pub fn kind(self) -> BadInput {
        match self {
            Violation::Handshake(HandshakeError::TooLarge(_) | HandshakeError::TooManyHeaders) => {
                BadInput::UpgradeTooLarge
            }
            Violation::Handshake(HandshakeError::NotGet | HandshakeError::NotUpgrade) => {
                BadInput::NotAnUpgrade
            }
            Violation::Handshake(HandshakeError::BadKey) => BadInput::BadWebsocketKey,
            Violation::Handshake(HandshakeError::BadVersion) => BadInput::BadWebsocketVersion,
            Violation::Handshake(_) => BadInput::MalformedHttp,
            Violation::Frame(FrameError::Unmasked) => BadInput::UnmaskedFrame,
            Violation::Frame(FrameError::ReservedBits | FrameError::ReservedOpcode(_)) => {
                BadInput::ReservedBitsOrOpcode
            }
            Violation::Frame(FrameError::ControlTooLong(_) | FrameError::FragmentedControl) => {
                BadInput::BadControlFrame
            }
            Violation::Frame(_) => BadInput::BadFrameHeader,
            Violation::Close(_) => BadInput::BadCloseFrame,
            Violation::Binary => BadInput::BinaryFrame,
            Violation::InvalidUtf8 => BadInput::InvalidUtf8,
            Violation::TooBig => BadInput::MessageTooBig,
            Violation::UnexpectedContinuation | Violation::ExpectedContinuation => {
                BadInput::BadFragmentation
            }
        }
    }

    pub fn reason(self) -> String {
        match self {
            Violation::Handshake(e) => e.to_string(),
            Violation::Frame(e) => e.to_string(),
            Violation::Close(e) => e.to_string(),
            Violation::Binary => "binary frames are not accepted; send JSON-RPC as text".into(),
            Violation::InvalidUtf8 => "text message is not valid UTF-8".into(),
            Violation::TooBig => "message exceeds the size limit".into(),
            Violation::UnexpectedContinuation => "continuation frame without a message".into(),
            Violation::ExpectedContinuation => "new message before the previous one ended".into(),
        }
    }
}

/// What a connection tells its handler.
pub enum Event<'a> {
    /// A complete upgrade request. `Flow::Continue` accepts it; to refuse,
    /// write an HTTP response into `out` and return `Flow::Stop`.
    Upgrade(&'a UpgradeRequest<'a>),
    /// The 101 response is in `out`; the handler may now send or admit.
    Open,
    Text(&'a str),
    Pong(&'a [u8]),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// How a `feed` ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fed {
    /// All input consumed or held; keep reading.
    Open,
    /// The handler returned `Flow::Stop`; the rest of the input was dropped.
    Stopped,
    /// The peer sent a close frame (its code, if any); our answer is in `out`.
    PeerClosed(Option<u16>),
    Violation(Violation),
}

/// What a deadline means when it comes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Called before `poll_deadline`: nothing is due yet (the shard's wheel
    /// leaves a deadline that moved later where it was, and comes early).
    Early,
    /// No upgrade within the handshake deadline: drop the socket.
    HandshakeTimeout,
    /// Upgraded but never admitted (no register): close 1008.
    AdmitTimeout,
    /// Time to ping; the pong check is the next deadline.
    SendPing,
    /// The peer showed life on its own (its own ping, any frame) within
    /// the interval: no ping needed; it is alive, and checked again an
    /// interval after that life.
    SkipPing,
    /// Nothing arrived since the ping within the pong timeout.
    PongMissed,
    /// We closed and the peer never finished the close handshake.
    LingerOver,
    /// A frame or message begun long ago is still not whole.
    MessageTimeout,
}

const FRAGMENTED: u8 = 1;
// Bit 2 is free.
const AWAITING_PONG: u8 = 4;
/// The handler has accepted the upgrade and not yet been told of the end.
const LIVE: u8 = 8;
/// Accepted past the shard's cap: upgraded only to be told 1013.
const OVER_CAP: u8 = 16;
/// Was admitted at some point (for the admitted-connections gauge).
const ADMITTED: u8 = 32;
/// A send is in flight (io_uring: one at a time keeps bytes in order).
const SENDING: u8 = 64;
/// The pong check was deferred (`defer_pong`): `due` no longer tells when
/// the ping went out.
const DEFERRED: u8 = 128;

#[derive(Default)]
struct Bufs {
    /// Received bytes that do not form a whole frame (or upgrade head) yet.
    partial: Vec<u8>,
    /// A fragmented text message being reassembled.
    message: Vec<u8>,
    /// Bytes the socket has not taken yet: `out[out_start..]` (what went
    /// out is dropped from the front lazily, so a slow reader's backlog is
    /// not moved once per partial send).
    out: Vec<u8>,
    out_start: usize,
    /// While `partial` or `message` holds bytes (after the upgrade): the
    /// tick by which they must form a whole message; 0 when none is held.
    input_due: Tick,
}

impl Bufs {
    fn holds_input(&self) -> bool {
        !self.partial.is_empty() || !self.message.is_empty()
    }
}

/// Unsent output taken out of a connection to be sent: the bytes are
/// `buf[start..]`.
#[derive(Default)]
pub struct Pending {
    buf: Vec<u8>,
    start: usize,
}

impl std::ops::Deref for Pending {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The per-connection state. Kept small: it is multiplied by every service.
pub struct Conn {
    /// Wheel membership; the shard's wheel owns its meaning.
    pub link: Link,
    /// Distinguishes reuses of a slab slot.
    pub generation: u32,
    /// The driver's handle for the socket (a raw fd for epoll).
    pub handle: i32,
    phase: Phase,
    flags: u8,
    /// The tick of the next deadline, whatever the phase. While a pong is
    /// awaited it is the ping's tick plus the pong timeout, so the ping's
    /// own tick needs no field.
    due: Tick,
    /// The last tick a frame arrived while no pong was awaited: the peer's
    /// own life (its pings, its messages), which spares it our ping. (A
    /// pong to our ping only ends the wait: counted here, it would put
    /// every ping off by an interval.) Until admitted, the accept's tick.
    /// Fits in the padding before `bufs`.
    last_life: Tick,
    bufs: Option<Box<Bufs>>,
}

impl Conn {
    /// A connection accepted at `now`: the upgrade is due by the handshake
    /// deadline.
    pub fn accepted(handle: i32, generation: u32, now: Tick, timing: &Timing) -> Conn {
        Conn {
            link: Link::default(),
            generation,
            handle,
            phase: Phase::Handshake,
            flags: 0,
            due: now + timing.handshake,
            // Until admitted: the accept's tick.
            last_life: now,
            bufs: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the connection next needs `on_deadline`. Changes only through
    /// `feed`, `on_deadline`, `admit` and `start_closing`.
    pub fn poll_deadline(&self) -> Tick {
        match &self.bufs {
            Some(b) if b.input_due != 0 => self.due.min(b.input_due),
            _ => self.due,
        }
    }

    /// When a connection not admitted yet was accepted.
    pub fn accepted_at(&self) -> Option<Tick> {
        (!self.was_admitted()).then_some(self.last_life)
    }

    pub fn set_live(&mut self) {
        self.flags |= LIVE;
    }

    /// True once: the first call after `set_live`. The handler hears of a
    /// connection's end exactly once.
    pub fn take_live(&mut self) -> bool {
        let live = self.flags & LIVE != 0;
        self.flags &= !LIVE;
        live
    }

    pub fn is_live(&self) -> bool {
        self.flags & LIVE != 0
    }

    pub fn mark_over_cap(&mut self) {
        self.flags |= OVER_CAP;
    }

    pub fn set_sending(&mut self, sending: bool) {
        if sending {
            self.flags |= SENDING;
        } else {
            self.flags &= !SENDING;
        }
    }

    pub fn is_sending(&self) -> bool {
        self.flags & SENDING != 0
    }

    pub fn was_admitted(&self) -> bool {
        self.flags & ADMITTED != 0
    }

    pub fn is_over_cap(&self) -> bool {
        self.flags & OVER_CAP != 0
    }

    /// Part of a frame (or of the upgrade head) is held: the peer stopped
    /// mid-frame if the connection ends now.
    pub fn holds_partial_input(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.holds_input())
    }

    /// Heap bytes held for input (a partial frame, a message being
    /// reassembled) and for output (what the socket has not taken), as
    /// allocated: what the memory budget counts.
    pub fn buffered(&self) -> (usize, usize) {
        self.bufs.as_ref().map_or((0, 0), |b| {
            (
                b.partial.capacity() + b.message.capacity(),
                b.out.capacity(),
            )
        })
    }

    /// The handler admitted the connection: start liveness checks. The first
    /// ping comes after `first_ping` ticks (spread by the caller over the
    /// interval so pings never come in bursts). False if it was not waiting
    /// to be admitted (already admitted, or closing).
    pub fn admit(&mut self, now: Tick, first_ping: Tick) -> bool {
        if self.phase != Phase::Upgraded {
            return false;
        }
        self.phase = Phase::Admitted;
        self.flags |= ADMITTED;
        self.due = now + first_ping.max(1);
        self.last_life = 0;
        true
    }

    /// We sent a close frame (or answered the peer's); the peer has
    /// `linger` ticks to finish.
    pub fn start_closing(&mut self, now: Tick, timing: &Timing) {
        self.phase = Phase::Closing;
        self.due = now + timing.linger;
        // Nothing of a message is delivered now: free it, and only the
        // linger bounds what is left (a partial frame, for the peer's close).
        if let Some(b) = &mut self.bufs {
            b.message = Vec::new();
            b.input_due = 0;
        }
        self.flags &= !FRAGMENTED;
        self.release_if_empty();
    }

    /// The deadline came: what it means (`Early` if it has not). A terminal
    /// one (every `Due` but `Early`, `SendPing` and `SkipPing`) leaves the deadline where it was, so it
    /// comes again if the shard does not end the connection.
    pub fn on_deadline(&mut self, now: Tick, timing: &Timing) -> Due {
        if now < self.poll_deadline() {
            return Due::Early;
        }
        let pong_timeout = timing.pong_timeout.max(1);
        if self
            .bufs
            .as_ref()
            .is_some_and(|b| b.input_due != 0 && b.input_due <= now)
        {
            return Due::MessageTimeout;
        }
        match self.phase {
            Phase::Handshake => Due::HandshakeTimeout,
            Phase::Upgraded => Due::AdmitTimeout,
            Phase::Closing => Due::LingerOver,
            // Still waiting: the first frame after the ping would have
            // ended the wait (`answered`).
            Phase::Admitted if self.flags & AWAITING_PONG != 0 => Due::PongMissed,
            // Passive liveness: a peer that showed life of its own within
            // the interval (and grace) needs no ping now.
            Phase::Admitted if self.last_life != 0 && now < self.life_check(timing) => {
                self.due = self.life_check(timing);
                Due::SkipPing
            }
            Phase::Admitted => {
                self.flags |= AWAITING_PONG;
                self.due = now + pong_timeout;
                self.last_life = 0;
                Due::SendPing
            }
        }
    }

    /// A frame arrived from an admitted peer. The first after our ping
    /// answers it: the wait ends there, and the next check comes an
    /// interval after the ping, whatever the pong timeout (so the ping
    /// period is the interval, not the longer of the two). Any other frame
    /// is the peer's own life.
    fn answered(&mut self, now: Tick, timing: &Timing) {
        if self.flags & AWAITING_PONG == 0 {
            self.last_life = now.max(1);
            return;
        }
        // After a deferral `due` no longer tells when the ping went out.
        let next = if self.flags & DEFERRED != 0 {
            now + timing.ping_interval
        } else {
            self.due - timing.pong_timeout.max(1) + timing.ping_interval
        };
        self.flags &= !(AWAITING_PONG | DEFERRED);
        self.due = next.max(now + 1);
    }

    /// When the peer's own last sign of life stops sparing it a ping.
    fn life_check(&self, timing: &Timing) -> Tick {
        self.last_life + timing.ping_interval + timing.ping_grace
    }

    /// The pong deadline passed but the handler keeps the connection until
    /// `until`: the check comes again then (a frame meanwhile ends the
    /// wait). False unless a pong is awaited.
    pub fn defer_pong(&mut self, until: Tick) -> bool {
        if self.phase != Phase::Admitted || self.flags & AWAITING_PONG == 0 {
            return false;
        }
        self.flags |= DEFERRED;
        self.due = until.max(self.due + 1);
        true
    }

    /// Output the socket would not take; kept until `take_pending_out`.
    pub fn queue_out(&mut self, bytes: &[u8]) {
        self.bufs
            .get_or_insert_default()
            .out
            .extend_from_slice(bytes);
    }

    pub fn pending_out(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.out.len() - b.out_start)
    }

    /// Takes the unsent output to try it again; give back what is left with
    /// `restore_out`.
    pub fn take_pending_out(&mut self) -> Pending {
        let pending = self
            .bufs
            .as_mut()
            .map(|b| Pending {
                buf: std::mem::take(&mut b.out),
                start: std::mem::take(&mut b.out_start),
            })
            .unwrap_or_default();
        self.release_if_empty();
        pending
    }

    /// Gives back what `take_pending_out` took, `sent` bytes of it gone.
    pub fn restore_out(&mut self, mut rest: Pending, sent: usize) {
        rest.start += sent;
        if rest.start >= rest.buf.len() {
            return;
        }
        if rest.start > rest.buf.len() / 2 {
            // Compact once most of it is gone: amortized, each byte moves
            // at most once per halving.
            rest.buf.drain(..rest.start);
            rest.start = 0;
        }
        let bufs = self.bufs.get_or_insert_default();
        debug_assert!(bufs.out.is_empty());
        bufs.out = rest.buf;
        bufs.out_start = rest.start;
    }

    fn release_if_empty(&mut self) {
        if let Some(b) = &mut self.bufs {
            if b.partial.is_empty() && b.message.is_empty() && b.out.is_empty() {
                self.bufs = None;
            } else if b.partial.is_empty() && b.partial.capacity() > 0 {
                b.partial = Vec::new();
            }
        }
    }

    /// Processes bytes received at `now`. `input` may be modified
    /// (unmasked in place). Whatever does not form a whole frame is kept.
    /// Replies the protocol requires (pong, close echo, 101) are appended
    /// to `out`. An upgrade starts the admit deadline, a peer's close the
    /// linger.
    pub fn feed<F>(
        &mut self,
        now: Tick,
        input: &mut [u8],
        limits: &Limits,
        timing: &Timing,
        out: &mut Vec<u8>,
        sink: F,
    ) -> Fed
    where
        F: FnMut(Event<'_>, &mut Vec<u8>) -> Flow,
    {
        let before = self.phase;
        let fed = self.feed_bytes(now, timing, input, limits, out, sink);
        if let Fed::PeerClosed(_) = fed {
            self.start_closing(now, timing);
        } else if before == Phase::Handshake && self.phase == Phase::Upgraded {
            self.due = now + timing.admit;
        }
        let phase = self.phase;
        if let Some(b) = &mut self.bufs {
            let timed = matches!(phase, Phase::Upgraded | Phase::Admitted) && b.holds_input();
            if !timed {
                b.input_due = 0;
            } else if b.input_due == 0 {
                b.input_due = now + timing.message.max(1);
            }
        }
        fed
    }

    fn feed_bytes<F>(
        &mut self,
        now: Tick,
        timing: &Timing,
        input: &mut [u8],
        limits: &Limits,
        out: &mut Vec<u8>,
        sink: F,
    ) -> Fed
    where
        F: FnMut(Event<'_>, &mut Vec<u8>) -> Flow,
    {
        let mut bufs = self.bufs.take();
        let holding = bufs.as_ref().is_some_and(|b| !b.partial.is_empty());
        let fed = if holding {
            let mut partial = {
                let b = bufs.as_mut().expect("holding implies bufs");
                b.partial.extend_from_slice(input);
                std::mem::take(&mut b.partial)
            };
            let (fed, used) = self.parse((now, timing), &mut partial, &mut bufs, limits, out, sink);
            partial.drain(..used);
            bufs.as_mut().expect("parse keeps bufs").partial = partial;
            fed
        } else {
            let (fed, used) = self.parse((now, timing), input, &mut bufs, limits, out, sink);
            if fed == Fed::Open && used < input.len() {
                bufs.get_or_insert_default()
                    .partial
                    .extend_from_slice(&input[used..]);
            }
            fed
        };
        if let (Fed::Violation(_), Some(b)) = (fed, bufs.as_mut()) {
            // Nothing after a violation is worth keeping: the connection is
            // closing, and garbage must not accumulate while it lingers.
            b.partial = Vec::new();
            b.message = Vec::new();
            self.flags &= !FRAGMENTED;
        }
        self.bufs = bufs;
        self.release_if_empty();
        fed
    }

    /// `at`: the tick of this input, and the deadlines it may move.
    fn parse<F>(
        &mut self,
        (now, timing): (Tick, &Timing),
        data: &mut [u8],
        bufs: &mut Option<Box<Bufs>>,
        limits: &Limits,
        out: &mut Vec<u8>,
        mut sink: F,
    ) -> (Fed, usize)
    where
        F: FnMut(Event<'_>, &mut Vec<u8>) -> Flow,
    {
        let mut pos = 0;
        if self.phase == Phase::Handshake {
            match ws::parse_upgrade(data, limits.max_upgrade) {
                Ok(None) => return (Fed::Open, 0),
                Err(e) => return (Fed::Violation(Violation::Handshake(e)), 0),
                Ok(Some((req, used))) => {
                    if sink(Event::Upgrade(&req), out) == Flow::Stop {
                        return (Fed::Stopped, used);
                    }
                    ws::write_upgrade_response(out, req.key);
                    self.phase = Phase::Upgraded;
                    pos = used;
                }
            }
            if sink(Event::Open, out) == Flow::Stop {
                return (Fed::Stopped, pos);
            }
        }
        let max_message = if self.phase == Phase::Admitted {
            limits.max_message
        } else {
            limits.max_message_unadmitted
        };
        loop {
            let rest = &mut data[pos..];
            let header = match ws::decode_header(rest, Role::Server) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return (Fed::Violation(Violation::Frame(e)), pos),
            };
            if header.payload_len > max_message as u64 {
                return (Fed::Violation(Violation::TooBig), pos);
            }
            let total = header.header_len + header.payload_len as usize;
            if rest.len() < total {
                break;
            }
            let payload = &mut rest[header.header_len..total];
            ws::apply_mask(payload, header.mask.expect("server role requires a mask"));
            pos += total;
            if self.phase == Phase::Admitted {
                self.answered(now, timing);
            }
            if self.phase == Phase::Closing && header.opcode != OpCode::Close {
                continue;
            }
            let flow = match header.opcode {
                OpCode::Text if self.flags & FRAGMENTED != 0 => {
                    return (Fed::Violation(Violation::ExpectedContinuation), pos);
                }
                OpCode::Text if header.fin => match std::str::from_utf8(payload) {
                    Ok(text) => sink(Event::Text(text), out),
                    Err(_) => return (Fed::Violation(Violation::InvalidUtf8), pos),
                },
                OpCode::Text => {
                    self.flags |= FRAGMENTED;
                    bufs.get_or_insert_default()
                        .message
                        .extend_from_slice(payload);
                    Flow::Continue
                }
                OpCode::Binary => return (Fed::Violation(Violation::Binary), pos),
                OpCode::Continuation => {
                    if self.flags & FRAGMENTED == 0 {
                        return (Fed::Violation(Violation::UnexpectedContinuation), pos);
                    }
                    // An empty first fragment holds no bytes, so no buffer
                    // need exist yet.
                    let b = bufs.get_or_insert_default();
                    if b.message.len() + payload.len() > max_message {
                        return (Fed::Violation(Violation::TooBig), pos);
                    }
                    b.message.extend_from_slice(payload);
                    if !header.fin {
                        continue;
                    }
                    self.flags &= !FRAGMENTED;
                    let message = std::mem::take(&mut b.message);
                    match std::str::from_utf8(&message) {
                        Ok(text) => sink(Event::Text(text), out),
                        Err(_) => return (Fed::Violation(Violation::InvalidUtf8), pos),
                    }
                }
                OpCode::Ping => {
                    ws::encode_frame(out, OpCode::Pong, payload, None);
                    Flow::Continue
                }
                OpCode::Pong => sink(Event::Pong(payload), out),
                OpCode::Close => {
                    let code = match ws::parse_close(payload) {
                        Ok(parsed) => parsed.map(|(code, _)| code),
                        Err(e) => return (Fed::Violation(Violation::Close(e)), pos),
                    };
                    if self.phase != Phase::Closing {
                        ws::encode_close(out, code.unwrap_or(1000), "", None);
                    }
                    self.phase = Phase::Closing;
                    return (Fed::PeerClosed(code), pos);
                }
            };
            if flow == Flow::Stop {
                return (Fed::Stopped, pos);
            }
            // A whole message (or a control frame outside one) came: what
            // is held from now on is a new frame, with a deadline of its
            // own. A fragment or a control frame inside a fragmented
            // message does not restart it.
            if self.flags & FRAGMENTED == 0
                && let Some(b) = bufs.as_mut()
            {
                b.input_due = 0;
            }
        }
        (Fed::Open, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn timing() -> Timing {
        Timing {
            handshake: 50,
            admit: 100,
            ping_interval: 300,
            ping_grace: 15,
            pong_timeout: 100,
            linger: 20,
            message: 40,
        }
    }

    fn upgrade_bytes() -> Vec<u8> {
        let mut v = Vec::new();
        ws::write_upgrade_request(&mut v, "h", "/ws/microservice", KEY, None);
        v
    }

    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        ws::encode_frame(&mut v, opcode, payload, Some([7, 1, 9, 3]));
        if !fin {
            v[0] &= 0x7F;
        }
        v
    }

    /// Records events; accepts every upgrade.
    #[derive(Default)]
    struct Log {
        texts: Vec<String>,
        pongs: usize,
        opened: usize,
    }

    fn feed(conn: &mut Conn, bytes: &[u8], log: &mut Log, out: &mut Vec<u8>) -> Fed {
        feed_at(conn, 0, bytes, log, out)
    }

    fn feed_at(conn: &mut Conn, now: Tick, bytes: &[u8], log: &mut Log, out: &mut Vec<u8>) -> Fed {
        feed_timed(conn, now, &timing(), bytes, log, out)
    }

    fn feed_timed(
        conn: &mut Conn,
        now: Tick,
        timing: &Timing,
        bytes: &[u8],
        log: &mut Log,
        out: &mut Vec<u8>,
    ) -> Fed {
        let mut input = bytes.to_vec();
        conn.feed(
            now,
            &mut input,
            &Limits {
                max_message: 1000,
                max_message_unadmitted: 1000,
                max_upgrade: 1024,
            },
            timing,
            out,
            |ev, _| {
                match ev {
                    Event::Upgrade(_) => {}
                    Event::Open => log.opened += 1,
                    Event::Text(t) => log.texts.push(t.to_owned()),
                    Event::Pong(_) => log.pongs += 1,
                }
                Flow::Continue
            },
        )
    }

    fn open_conn() -> (Conn, Log, Vec<u8>) {
        let mut conn = Conn::accepted(3, 0, 0, &timing());
        let mut log = Log::default();
        let mut out = Vec::new();
        assert_eq!(
            feed(&mut conn, &upgrade_bytes(), &mut log, &mut out),
            Fed::Open
        );
        assert!(out.starts_with(b"HTTP/1.1 101"));
        assert_eq!(conn.phase(), Phase::Upgraded);
        out.clear();
        (conn, log, out)
    }

    #[test]
    fn byte_by_byte_delivery_yields_the_same_messages_and_frees_buffers() {
        let mut stream = upgrade_bytes();
        stream.extend(client_frame(OpCode::Text, true, b"hello"));
        stream.extend(client_frame(OpCode::Text, false, b"frag"));
        stream.extend(client_frame(OpCode::Ping, true, b"p"));
        stream.extend(client_frame(
            OpCode::Continuation,
            true,
            "mented é".as_bytes(),
        ));
        let mut conn = Conn::accepted(3, 0, 0, &timing());
        let (mut log, mut out) = (Log::default(), Vec::new());
        for b in &stream {
            assert_eq!(
                feed(&mut conn, std::slice::from_ref(b), &mut log, &mut out),
                Fed::Open
            );
        }
        assert_eq!(log.texts, vec!["hello", "fragmented é"]);
        assert_eq!(log.opened, 1);
        assert_eq!(
            conn.buffered(),
            (0, 0),
            "an idle connection holds no buffer"
        );
        // The ping was answered with a pong carrying its payload.
        let tail = &out[out.len() - 3..];
        assert_eq!(tail, &[0x8A, 1, b'p']);
    }

    #[test]
    fn violations_map_to_protocol_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(OpCode::Binary, true, b"x"), 1003),
            (client_frame(OpCode::Text, true, &[0xFF, 0xFE]), 1007),
            (client_frame(OpCode::Text, true, &[b'a'; 1001]), 1009),
            (client_frame(OpCode::Continuation, true, b"x"), 1002),
            (
                [
                    client_frame(OpCode::Text, false, b"a"),
                    client_frame(OpCode::Text, true, b"b"),
                ]
                .concat(),
                1002,
            ),
            (
                [
                    client_frame(OpCode::Text, false, &[b'a'; 600]),
                    client_frame(OpCode::Continuation, true, &[b'a'; 600]),
                ]
                .concat(),
                1009,
            ),
            ([0x81u8, 0x05, b'h', b'e', b'l', b'l', b'o'].to_vec(), 1002),
            (
                client_frame(OpCode::Close, true, &1005u16.to_be_bytes()),
                1002,
            ),
        ];
        for (bytes, code) in cases {
            let (mut conn, mut log, mut out) = open_conn();
            match feed(&mut conn, &bytes, &mut log, &mut out) {
                Fed::Violation(v) => assert_eq!(v.close_code(), Some(code), "{v:?}"),
                other => panic!("expected a violation, got {other:?}"),
            }
        }
    }

    /// An empty first fragment used to leave FRAGMENTED set with no
    /// buffer, and the next continuation panicked the shard.
    #[test]
    fn an_empty_first_fragment_then_a_continuation_in_a_later_read() {
        let (mut conn, mut log, mut out) = open_conn();
        assert_eq!(
            feed(
                &mut conn,
                &client_frame(OpCode::Text, false, b""),
                &mut log,
                &mut out
            ),
            Fed::Open
        );
        assert_eq!(
            feed(
                &mut conn,
                &client_frame(OpCode::Continuation, false, b""),
                &mut log,
                &mut out
            ),
            Fed::Open
        );
        assert_eq!(
            feed(
                &mut conn,
                &client_frame(OpCode::Continuation, true, b"{}"),
                &mut log,
                &mut out
            ),
            Fed::Open
        );
        assert_eq!(log.texts, vec!["{}"]);
        // An empty message in fragments is an empty text.
        feed(
            &mut conn,
            &client_frame(OpCode::Text, false, b""),
            &mut log,
            &mut out,
        );
        feed(
            &mut conn,
            &client_frame(OpCode::Continuation, true, b""),
            &mut log,
            &mut out,
        );
        assert_eq!(log.texts, vec!["{}", ""]);
        assert_eq!(conn.buffered(), (0, 0));
    }

    #[test]
    fn nothing_is_held_after_a_violation() {
        let (mut conn, mut log, mut out) = open_conn();
        let mut bytes = client_frame(OpCode::Text, false, b"start");
        bytes.extend([0x81, 0x05]); // unmasked: a violation
        bytes.extend(vec![b'x'; 500]);
        assert!(matches!(
            feed(&mut conn, &bytes, &mut log, &mut out),
            Fed::Violation(_)
        ));
        conn.start_closing(0, &timing());
        for _ in 0..10 {
            feed(&mut conn, &[0x81, 0x05, 1, 2, 3], &mut log, &mut out);
        }
        assert_eq!(conn.buffered(), (0, 0));
    }

    #[test]
    fn a_fragmented_utf8_character_across_frames_is_valid() {
        let (mut conn, mut log, mut out) = open_conn();
        let e = "é".as_bytes();
        let mut bytes = client_frame(OpCode::Text, false, &e[..1]);
        bytes.extend(client_frame(OpCode::Continuation, true, &e[1..]));
        assert_eq!(feed(&mut conn, &bytes, &mut log, &mut out), Fed::Open);
        assert_eq!(log.texts, vec!["é"]);
    }

    #[test]
    fn peer_close_is_echoed_once_and_data_after_our_close_is_discarded() {
        let (mut conn, mut log, mut out) = open_conn();
        let fed = feed(
            &mut conn,
            &client_frame(OpCode::Close, true, &[0x03, 0xE9]),
            &mut log,
            &mut out,
        );
        assert_eq!(fed, Fed::PeerClosed(Some(1001)));
        assert_eq!(out, vec![0x88, 2, 0x03, 0xE9]);

        let (mut conn, mut log, mut out) = open_conn();
        conn.start_closing(0, &timing());
        let mut bytes = client_frame(OpCode::Text, true, b"late");
        bytes.extend(client_frame(OpCode::Close, true, &[]));
        assert_eq!(
            feed(&mut conn, &bytes, &mut log, &mut out),
            Fed::PeerClosed(None)
        );
        assert!(log.texts.is_empty());
        assert!(out.is_empty(), "our close was already sent");
    }

    #[test]
    fn handshake_violation_and_refusal() {
        let mut conn = Conn::accepted(3, 0, 0, &timing());
        let (mut log, mut out) = (Log::default(), Vec::new());
        let fed = feed(
            &mut conn,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &mut log,
            &mut out,
        );
        assert_eq!(
            fed,
            Fed::Violation(Violation::Handshake(HandshakeError::NotUpgrade))
        );

        let mut conn = Conn::accepted(3, 0, 0, &timing());
        let mut input = upgrade_bytes();
        let fed = conn.feed(
            0,
            &mut input,
            &Limits::default(),
            &timing(),
            &mut out,
            |ev, out| match ev {
                Event::Upgrade(_) => {
                    ws::write_http_error(out, 404, "no");
                    Flow::Stop
                }
                _ => Flow::Continue,
            },
        );
        assert_eq!(fed, Fed::Stopped);
        assert_eq!(conn.phase(), Phase::Handshake);
    }

    #[test]
    fn liveness_cycle() {
        let t = timing();
        let (mut conn, _, _) = open_conn();
        assert!(conn.admit(10, 30));
        assert!(!conn.admit(11, 30), "admitted once");
        assert_eq!(conn.poll_deadline(), 40);
        assert_eq!(conn.on_deadline(40, &t), Due::SendPing);
        assert_eq!(conn.poll_deadline(), 140);
        // A pong (any frame) ends the wait: the next ping is at 40 + 300.
        let (mut log, mut out) = (Log::default(), Vec::new());
        let pong = client_frame(OpCode::Pong, true, b"");
        feed_at(&mut conn, 90, &pong, &mut log, &mut out);
        assert_eq!(log.pongs, 1);
        assert_eq!(conn.poll_deadline(), 340);
        // The wheel still holds the pong check (140): it comes early, and
        // changes nothing.
        assert_eq!(conn.on_deadline(140, &t), Due::Early);
        assert_eq!(conn.poll_deadline(), 340);
        assert_eq!(conn.on_deadline(340, &t), Due::SendPing);
        feed_at(&mut conn, 400, &pong, &mut log, &mut out);
        assert_eq!(conn.poll_deadline(), 640, "an interval after the ping");
        // A late loop (the check at 645, not 640) pings then.
        assert_eq!(conn.on_deadline(645, &t), Due::SendPing);
        // Silence until the check: down, and it stays due.
        assert_eq!(conn.on_deadline(745, &t), Due::PongMissed);
        assert_eq!(conn.poll_deadline(), 745);

        // The ping period is the interval even when the pong timeout is
        // longer: one ping is outstanding, but the answer ends it.
        let t = Timing {
            ping_interval: 100,
            pong_timeout: 300,
            ..timing()
        };
        let (mut conn, _, _) = open_conn();
        assert!(conn.admit(0, 10));
        for ping_at in [10, 110, 210] {
            assert_eq!(conn.on_deadline(ping_at, &t), Due::SendPing);
            assert_eq!(conn.poll_deadline(), ping_at + 300);
            feed_timed(&mut conn, ping_at + 2, &t, &pong, &mut log, &mut out);
            assert_eq!(conn.poll_deadline(), ping_at + 100);
        }
    }

    #[test]
    fn a_peer_that_shows_life_of_its_own_is_not_pinged_until_it_stops() {
        let t = timing(); // interval 300, grace 15, pong timeout 100
        let (mut conn, _, _) = open_conn();
        let (mut log, mut out) = (Log::default(), Vec::new());
        let ping = client_frame(OpCode::Ping, true, b"theirs");
        let pong = client_frame(OpCode::Pong, true, b"ours");
        assert!(conn.admit(0, 10));
        assert_eq!(conn.on_deadline(10, &t), Due::SendPing);
        // The answer ends the wait and is not life of its own.
        feed_at(&mut conn, 20, &pong, &mut log, &mut out);
        assert_eq!(conn.poll_deadline(), 310);
        // A frame after the answer is.
        feed_at(&mut conn, 60, &ping, &mut log, &mut out);
        assert_eq!(conn.on_deadline(310, &t), Due::SkipPing);
        assert_eq!(conn.poll_deadline(), 60 + 315);
        // It pings every interval itself, a little late each time: never
        // pinged by us.
        for at in [360, 662, 965] {
            feed_at(&mut conn, at, &ping, &mut log, &mut out);
            let due = conn.poll_deadline();
            assert_eq!(conn.on_deadline(due, &t), Due::SkipPing, "at {at}");
            assert_eq!(conn.poll_deadline(), at + 315);
        }
        // Frozen after 965: pinged an interval and the grace later, and
        // down a pong timeout after that.
        assert_eq!(conn.on_deadline(965 + 315, &t), Due::SendPing);
        assert_eq!(conn.on_deadline(965 + 315 + 100, &t), Due::PongMissed);
        // A peer that only ever answers is pinged every interval, as before.
        let (mut quiet, _, _) = open_conn();
        assert!(quiet.admit(0, 10));
        for round in 0..3 {
            let ping_at = 10 + 300 * round;
            assert_eq!(quiet.on_deadline(ping_at, &t), Due::SendPing);
            feed_at(&mut quiet, ping_at + 5, &pong, &mut log, &mut out);
            assert_eq!(quiet.poll_deadline(), ping_at + 300);
        }
        assert_eq!(
            std::mem::size_of::<Conn>(),
            40,
            "last_life fits the padding"
        );
    }

    #[test]
    fn a_deferred_pong_check_comes_again_later() {
        let t = timing();
        let (mut conn, _, _) = open_conn();
        assert!(!conn.defer_pong(500), "no pong awaited yet");
        assert!(conn.admit(0, 10));
        assert_eq!(conn.on_deadline(10, &t), Due::SendPing);
        assert_eq!(conn.on_deadline(110, &t), Due::PongMissed);
        assert!(conn.defer_pong(500));
        assert_eq!(conn.poll_deadline(), 500);
        // Still silent at the new check: missed again (the handler decides).
        assert_eq!(conn.on_deadline(500, &t), Due::PongMissed);
        assert!(conn.defer_pong(600));
        // A frame before it ends the wait; the ping's tick is unknown after
        // a deferral, so the next comes an interval after the frame.
        let (mut log, mut out) = (Log::default(), Vec::new());
        feed_at(
            &mut conn,
            550,
            &client_frame(OpCode::Text, true, b"{}"),
            &mut log,
            &mut out,
        );
        assert_eq!(conn.poll_deadline(), 850);
        assert_eq!(conn.on_deadline(850, &t), Due::SendPing);
        feed_at(
            &mut conn,
            900,
            &client_frame(OpCode::Pong, true, b""),
            &mut log,
            &mut out,
        );
        assert_eq!(
            conn.poll_deadline(),
            1150,
            "back to the interval from its ping"
        );
    }

    #[test]
    fn every_phase_owns_its_deadline() {
        let t = timing();
        let mut conn = Conn::accepted(3, 0, 7, &t);
        assert_eq!(conn.poll_deadline(), 7 + t.handshake);
        let (mut log, mut out) = (Log::default(), Vec::new());
        let upgrade = upgrade_bytes();
        // Half the upgrade at 10, the rest at 12: the admit deadline runs
        // from the upgrade, and later frames do not move it.
        feed_at(&mut conn, 10, &upgrade[..20], &mut log, &mut out);
        assert_eq!(conn.poll_deadline(), 7 + t.handshake);
        feed_at(&mut conn, 12, &upgrade[20..], &mut log, &mut out);
        assert_eq!(conn.phase(), Phase::Upgraded);
        assert_eq!(conn.poll_deadline(), 12 + t.admit);
        feed_at(
            &mut conn,
            30,
            &client_frame(OpCode::Text, true, b"{}"),
            &mut log,
            &mut out,
        );
        assert_eq!(conn.poll_deadline(), 12 + t.admit);
        assert_eq!(conn.on_deadline(12 + t.admit, &t), Due::AdmitTimeout);
        // A peer's close starts the linger.
        let close = client_frame(OpCode::Close, true, &1000u16.to_be_bytes());
        assert_eq!(
            feed_at(&mut conn, 50, &close, &mut log, &mut out),
            Fed::PeerClosed(Some(1000))
        );
        assert_eq!(
            (conn.phase(), conn.poll_deadline()),
            (Phase::Closing, 50 + t.linger)
        );
        assert_eq!(conn.on_deadline(50 + t.linger, &t), Due::LingerOver);
        // Our close does too.
        let (mut conn, _, _) = open_conn();
        conn.start_closing(60, &t);
        assert_eq!(conn.poll_deadline(), 60 + t.linger);
    }

    #[test]
    fn unsent_output_is_kept_and_released() {
        let (mut conn, _, _) = open_conn();
        conn.queue_out(b"abcdef");
        assert_eq!(conn.pending_out(), 6);
        let out = conn.take_pending_out();
        conn.restore_out(out, 4);
        assert_eq!(&*conn.take_pending_out(), b"ef");
        assert_eq!(conn.buffered(), (0, 0));
        // Sent a little at a time, a backlog is compacted only once most of
        // it is gone; what is left stays in order.
        let backlog: Vec<u8> = (0..100u8).collect();
        conn.queue_out(&backlog);
        for step in 0..9 {
            let out = conn.take_pending_out();
            assert_eq!(out[0], step * 10);
            conn.restore_out(out, 10);
        }
        assert_eq!(&*conn.take_pending_out(), &backlog[90..]);
        assert_eq!(conn.buffered(), (0, 0));
    }

    #[test]
    fn before_admission_a_message_is_held_to_the_smaller_bound() {
        let limits = Limits {
            max_message: 1000,
            max_message_unadmitted: 100,
            max_upgrade: 1024,
        };
        let feed_with = |conn: &mut Conn, bytes: &[u8]| {
            let mut input = bytes.to_vec();
            let mut out = Vec::new();
            conn.feed(0, &mut input, &limits, &timing(), &mut out, |_, _| {
                Flow::Continue
            })
        };
        let (mut conn, _, _) = open_conn();
        let big = vec![b'x'; 500];
        assert_eq!(
            feed_with(&mut conn, &client_frame(OpCode::Text, true, &big)),
            Fed::Violation(Violation::TooBig),
            "a socket that has not registered cannot make us hold 500 bytes"
        );
        let (mut conn, _, _) = open_conn();
        assert!(conn.admit(0, 10));
        assert_eq!(
            feed_with(&mut conn, &client_frame(OpCode::Text, true, &big)),
            Fed::Open
        );
    }

    #[test]
    fn a_message_begun_must_be_whole_within_the_message_timeout() {
        let t = timing();
        let (mut conn, mut log, mut out) = open_conn();
        assert!(conn.admit(0, 300));
        let idle_deadline = conn.poll_deadline();
        // A fragment at tick 5: the message is due at 5 + message.
        let first = client_frame(OpCode::Text, false, b"part");
        assert_eq!(feed_at(&mut conn, 5, &first, &mut log, &mut out), Fed::Open);
        assert_eq!(conn.poll_deadline(), 5 + t.message);
        // Empty continuations do not move it (a trickle cannot keep it).
        let empty = client_frame(OpCode::Continuation, false, b"");
        assert_eq!(
            feed_at(&mut conn, 30, &empty, &mut log, &mut out),
            Fed::Open
        );
        assert_eq!(conn.poll_deadline(), 5 + t.message);
        assert_eq!(conn.on_deadline(5 + t.message, &t), Due::MessageTimeout);
        // Finished in time instead: the deadline is the idle one again.
        let (mut conn, mut log, mut out) = open_conn();
        assert!(conn.admit(0, 300));
        feed_at(&mut conn, 5, &first, &mut log, &mut out);
        let last = client_frame(OpCode::Continuation, true, b"!");
        assert_eq!(feed_at(&mut conn, 6, &last, &mut log, &mut out), Fed::Open);
        assert_eq!(log.texts, ["part!"]);
        assert_eq!(conn.poll_deadline(), idle_deadline);
        assert_eq!(conn.buffered(), (0, 0));
        // A peer that keeps sending whole messages, each read ending mid
        // frame, is never timed out: each whole message starts it over.
        let (mut steady, mut slog, mut sout) = open_conn();
        assert!(steady.admit(0, 300));
        let frame = client_frame(OpCode::Text, true, b"steady");
        let mut stream = Vec::new();
        for _ in 0..4 {
            stream.extend_from_slice(&frame);
        }
        let cut = frame.len() + 3;
        feed_at(&mut steady, 10, &stream[..cut], &mut slog, &mut sout);
        assert_eq!(steady.poll_deadline(), 10 + t.message);
        feed_at(
            &mut steady,
            10 + t.message - 1,
            &stream[cut..2 * cut],
            &mut slog,
            &mut sout,
        );
        assert_eq!(
            steady.poll_deadline(),
            10 + 2 * t.message - 1,
            "the deadline is the newest frame's"
        );
        // A partial frame counts too, and closing lets go of the message.
        let frame = client_frame(OpCode::Text, true, b"hello");
        feed_at(&mut conn, 50, &frame[..3], &mut log, &mut out);
        assert_eq!(conn.poll_deadline(), 50 + t.message);
        conn.start_closing(51, &t);
        assert_eq!(conn.poll_deadline(), 51 + t.linger, "only the linger now");
    }
}

#[cfg(test)]
mod budget {
    /// Every service holds one of these: its size is part of the
    /// per-service memory budget (README, performance). Grow it only on
    /// purpose.
    #[test]
    fn a_connection_fits_in_40_bytes() {
        assert!(
            size_of::<super::Conn>() <= 40,
            "Conn is {} bytes",
            size_of::<super::Conn>()
        );
    }
}
