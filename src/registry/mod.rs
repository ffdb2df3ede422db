//! The registry: every registered service instance, the identity index that
//! finds a superseded registration, the discovery index by serviceId, the
//! discovery subscriptions and the event log. A pure data structure: time
//! comes in as arguments, connections are opaque `Owner`s, no I/O.
//!
//! Memory is the point here: one record per service, with every repeating
//! string interned (a 4-byte `Sym`), addresses stored as IPs when they are,
//! and no per-instance map beyond the identity table (4 bytes a slot) and
//! the per-service lists (4 bytes an instance). The runtimeInstanceId is a
//! UUID v7 whose last four random bytes carry the record's slot, so finding
//! an instance by id needs no table of its own; the full id is compared.
//!
//! Ownership: only the owner of a record (the connection that registered
//! it) may change or remove it, so a superseded connection never touches
//! its successor. Bounded: down instances are kept for a retention period
//! and at most `max_down_retained` of them; subscriptions are bounded per
//! owner and in all.

pub mod events;
pub mod intern;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hashbrown::HashTable;
use slab::Slab;
use uuid::Uuid;

use events::{EventKind, EventLog};
use intern::{Interner, Sym};

/// The connection that owns a record, as the controller names it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub shard: u16,
    pub key: u32,
    pub generation: u32,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Host(Sym),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    Down,
}

/// One service instance. Its size is multiplied by every service.
pub struct Instance {
    pub id: Uuid,
    pub service: Sym,
    /// The envTag; the empty string when there is none.
    pub env: Sym,
    pub version: Sym,
    pub protocol: Sym,
    /// The tags as canonical JSON (keys sorted), e.g. `{"zone":"a"}`.
    pub tags: Sym,
    pub address: Address,
    pub port: u16,
    pub status: Status,
    pub owner: Owner,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    /// Position in `by_service[service]` while up.
    index_pos: u32,
}

/// A validated `service/register`.
#[derive(Clone, Debug)]
pub struct Registration<'a> {
    pub service_id: &'a str,
    pub version: &'a str,
    pub protocol: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub env_tag: Option<&'a str>,
    /// Canonical JSON object.
    pub tags_json: &'a str,
}

/// A validated `service/update_metadata`: `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct MetadataUpdate<'a> {
    pub version: Option<&'a str>,
    pub protocol: Option<&'a str>,
    pub port: Option<u16>,
    pub tags_json: Option<&'a str>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpdateOutcome {
    Updated,
    /// Not the caller's record (superseded, or another connection's).
    NotOwner,
    /// Everything but the port was applied: another instance already has
    /// this identity with the new port.
    PortTaken,
}

#[derive(Debug)]
pub struct Registered {
    pub id: Uuid,
    /// The connection whose registration this one replaced (still up).
    pub superseded: Option<Owner>,
}

/// What a discovery query asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Filter {
    pub service_id: String,
    pub env_tag: Option<String>,
    pub protocol: Option<String>,
}

/// An instance as discovery shows it, detached from the registry.
#[derive(Clone, Debug)]
pub struct Node {
    pub runtime_instance_id: Uuid,
    pub service_id: Arc<str>,
    pub env_tag: Arc<str>,
    pub version: Arc<str>,
    pub protocol: Arc<str>,
    pub address: NodeAddress,
    pub port: u16,
    pub tags_json: Arc<str>,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    pub status: Status,
    /// The shard holding its socket.
    pub shard: u16,
}

#[derive(Clone, Debug)]
pub enum NodeAddress {
    Ip(IpAddr),
    Host(Arc<str>),
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeAddress::Ip(ip) => ip.fmt(f),
            NodeAddress::Host(h) => f.write_str(h),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub filter: Filter,
    pub nodes: Vec<Node>,
    /// More instances matched than `max_snapshot_nodes`.
    pub truncated: bool,
}

/// What an admin listing asks for (every field optional).
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<Status>,
    pub q: Option<String>,
}

/// A listing in progress (see `Registry::page_step`).
pub struct PageScan {
    query: Query,
    cursor: u32,
    limit: usize,
    next_slot: u32,
    q_syms: HashSet<Sym>,
    /// The interner generation `q_syms` was computed at.
    q_generation: Option<u64>,
    page: Page,
    done: bool,
}

impl PageScan {
    pub fn new(query: Query, cursor: u32, limit: usize) -> PageScan {
        PageScan {
            query,
            cursor,
            limit,
            next_slot: 0,
            q_syms: HashSet::new(),
            q_generation: None,
            page: Page {
                total: 0,
                items: Vec::new(),
                next: None,
            },
            done: false,
        }
    }

    pub fn finish(self) -> Page {
        self.page
    }
}

#[derive(Debug)]
pub struct Page {
    pub total: usize,
    pub items: Vec<Node>,
    /// The cursor of the next page, if there is one.
    pub next: Option<u32>,
}

#[derive(Debug)]
pub struct Summary {
    pub up: usize,
    pub down: usize,
    pub distinct_services: usize,
    /// (serviceId, up instances), largest first.
    pub services: Vec<(Arc<str>, usize)>,
}

/// A discovery subscription that must be told of a change.
pub struct Notification {
    pub snapshot: Snapshot,
    pub owners: Vec<Owner>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("this connection already holds {0} subscriptions, the limit")]
    PerOwner(usize),
    #[error("the controller holds {0} subscriptions, the limit")]
    Total(usize),
}

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Records the registry can ever hold (every connection registered,
    /// plus the retained down ones). Reserved up front: untouched
    /// reservation costs no RSS, and no table is ever copied to grow.
    pub capacity: usize,
    pub max_snapshot_nodes: usize,
    pub down_retention_ms: u64,
    pub max_down_retained: usize,
    pub max_subscriptions_per_owner: usize,
    pub max_subscriptions: usize,
    /// At most one `discovery/changed` per subscription per this long.
    pub notify_interval_ms: u64,
    pub event_ring: usize,
    pub event_subscriber_queue: usize,
    pub max_event_subscribers: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            capacity: 0,
            max_snapshot_nodes: 10_000,
            down_retention_ms: 10 * 60 * 1000,
            max_down_retained: 10_000,
            max_subscriptions_per_owner: 64,
            max_subscriptions: 100_000,
            notify_interval_ms: 100,
            event_ring: 4096,
            event_subscriber_queue: 8192,
            max_event_subscribers: 64,
        }
    }
}

/// A discovery subscription's key: the interned filter.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
struct SubKey {
    service: Sym,
    env: Option<Sym>,
    protocol: Option<Sym>,
}

struct Subscriber {
    owner: Owner,
    pending: bool,
    last_sent_ms: u64,
}

pub struct Registry {
    config: RegistryConfig,
    strings: Interner,
    instances: Slab<Instance>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Every record (up or down) by (service, env, address, port).
    identity: HashTable<u32>,
    /// Up records by service: what discovery returns.
    by_service: HashMap<Sym, Vec<u32>>,
    /// Down records, oldest first: (slot, id, when it went down).
    down: VecDeque<(u32, Uuid, u64)>,
    down_count: usize,
    subs: HashMap<SubKey, Vec<Subscriber>>,
    subs_by_service: HashMap<Sym, Vec<SubKey>>,
    subs_by_owner: HashMap<Owner, Vec<SubKey>>,
    sub_count: usize,
    changed: HashSet<Sym>,
    /// Subscriptions due a notification, per shard of their owner.
    due: Vec<Vec<(SubKey, Owner)>>,
    /// One past the highest slot ever used (where listings stop).
    high_water: u32,
    pub events: EventLog,
}

/// Case-insensitive (ASCII) substring test, without allocating.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Formats into a stack buffer (addresses fit in 64 bytes).
fn format_into<'a>(buf: &'a mut [u8; 64], args: std::fmt::Arguments<'_>) -> &'a str {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, args);
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// The registry slot an id names (its last four bytes).
pub fn slot_of(id: &Uuid) -> u32 {
    let b = id.as_bytes();
    u32::from_be_bytes([b[12], b[13], b[14], b[15]])
}

impl Registry {
    pub fn new(config: RegistryConfig, shards: usize) -> Registry {
        let capacity = config.capacity;
        let events = EventLog::new(
            config.event_ring,
            config.event_subscriber_queue,
            config.max_event_subscribers,
        );
        Registry {
            config,
            strings: Interner::default(),
            instances: Slab::with_capacity(capacity),
            hasher: Default::default(),
            identity: HashTable::with_capacity(capacity),
            by_service: HashMap::new(),
            down: VecDeque::new(),
            down_count: 0,
            subs: HashMap::new(),
            subs_by_service: HashMap::new(),
            subs_by_owner: HashMap::new(),
            sub_count: 0,
            changed: HashSet::new(),
            due: (0..shards).map(|_| Vec::new()).collect(),
            events,
            high_water: 0,
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Instances that are up.
    pub fn len_up(&self) -> usize {
        self.instances.len() - self.down_count
    }

    /// Down instances still retained.
    pub fn len_down(&self) -> usize {
        self.down_count
    }

    /// Debug builds: the counts agree with the tables they count. Called
    /// once per tick (by shard 0); O(records).
    #[cfg(debug_assertions)]
    pub fn check_invariants(&self) {
        let down = self
            .instances
            .iter()
            .filter(|(_, i)| i.status == Status::Down)
            .count();
        assert_eq!(down, self.down_count, "down count");
        // The queue also holds entries of down records since replaced.
        assert!(down <= self.down.len(), "every down record is queued");
        assert!(self.down.len() <= 2 * self.config.max_down_retained + 1024);
        let indexed: usize = self.by_service.values().map(Vec::len).sum();
        assert_eq!(indexed, self.len_up(), "discovery index vs up records");
        for (service, list) in &self.by_service {
            for (pos, &slot) in list.iter().enumerate() {
                let i = &self.instances[slot as usize];
                assert!(i.status == Status::Up && i.service == *service);
                assert_eq!(i.index_pos as usize, pos, "index position of slot {slot}");
            }
        }
        assert_eq!(self.identity.len(), self.instances.len(), "identity table");
        let subs: usize = self.subs.values().map(Vec::len).sum();
        assert_eq!(subs, self.sub_count, "subscription count");
        assert!(self.sub_count <= self.config.max_subscriptions);
    }

    pub fn resolve(&self, sym: Sym) -> &Arc<str> {
        self.strings.resolve(sym)
    }

    /// The instance with this id, up or down.
    pub fn get(&self, id: &Uuid) -> Option<&Instance> {
        self.instances
            .get(slot_of(id) as usize)
            .filter(|i| i.id == *id)
    }

    /// The id of the record in `slot` if `owner` owns it.
    pub fn owned_id(&self, slot: u32, owner: Owner) -> Option<Uuid> {
        self.instances
            .get(slot as usize)
            .filter(|i| i.owner == owner)
            .map(|i| i.id)
    }

    fn slot_owned(&self, id: &Uuid, owner: Owner) -> Option<u32> {
        self.get(id)
            .filter(|i| i.owner == owner)
            .map(|_| slot_of(id))
    }

    fn identity_hash(&self, service: Sym, env: Sym, address: &Address, port: u16) -> u64 {
        self.hasher.hash_one((service, env, address, port))
    }

    fn hash_of(hasher: &hashbrown::DefaultHashBuilder, i: &Instance) -> u64 {
        hasher.hash_one((i.service, i.env, &i.address, i.port))
    }

    fn intern_address(&mut self, address: &str) -> Address {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Address::V4(v4),
            Ok(IpAddr::V6(v6)) => Address::V6(v6),
            Err(_) => Address::Host(self.strings.intern(&address.to_ascii_lowercase())),
        }
    }

    /// Registers an instance owned by `owner`. A record with the same
    /// identity (serviceId, envTag, address, port) is replaced: if it was
    /// up, its owner is returned so its connection can be closed (4000).
    pub fn register(&mut self, reg: &Registration<'_>, owner: Owner, now_ms: u64) -> Registered {
        let service = self.strings.intern(reg.service_id);
        let env = self.strings.intern(reg.env_tag.unwrap_or(""));
        let address = self.intern_address(reg.address);
        let hash = self.identity_hash(service, env, &address, reg.port);
        let instances = &self.instances;
        let existing = self
            .identity
            .find(hash, |&slot| {
                let i = &instances[slot as usize];
                i.service == service && i.env == env && i.address == address && i.port == reg.port
            })
            .copied();
        let mut superseded = None;
        if let Some(slot) = existing {
            let old = &self.instances[slot as usize];
            if old.status == Status::Up {
                superseded = Some(old.owner);
                self.publish(
                    now_ms,
                    EventKind::Superseded,
                    slot,
                    Some("superseded by a new registration"),
                );
            }
            self.remove(slot);
        }
        let version = self.strings.intern(reg.version);
        let protocol = self.strings.intern(reg.protocol);
        let tags = self.strings.intern(reg.tags_json);
        let entry = self.instances.vacant_entry();
        let slot = entry.key() as u32;
        self.high_water = self.high_water.max(slot + 1);
        let mut random = [0u8; 10];
        random[..6].copy_from_slice(&fastrand::u64(..).to_le_bytes()[..6]);
        random[6..].copy_from_slice(&slot.to_be_bytes());
        let id = uuid::Builder::from_unix_timestamp_millis(now_ms, &random).into_uuid();
        debug_assert_eq!(slot_of(&id), slot);
        let list = self.by_service.entry(service).or_default();
        list.push(slot);
        entry.insert(Instance {
            id,
            service,
            env,
            version,
            protocol,
            tags,
            address,
            port: reg.port,
            status: Status::Up,
            owner,
            connected_at_ms: now_ms,
            last_seen_ms: now_ms,
            index_pos: (list.len() - 1) as u32,
        });
        let (instances, hasher) = (&self.instances, &self.hasher);
        self.identity.insert_unique(hash, slot, |&s| {
            Self::hash_of(hasher, &instances[s as usize])
        });
        self.changed.insert(service);
        self.publish(now_ms, EventKind::Registered, slot, None);
        Registered { id, superseded }
    }

    /// Applies a metadata update from the owner.
    pub fn update(
        &mut self,
        id: &Uuid,
        owner: Owner,
        update: &MetadataUpdate<'_>,
        now_ms: u64,
    ) -> UpdateOutcome {
        let Some(slot) = self.slot_owned(id, owner) else {
            return UpdateOutcome::NotOwner;
        };
        let mut port_taken = false;
        if let Some(port) = update.port {
            let i = &self.instances[slot as usize];
            let (service, env, address) = (i.service, i.env, i.address);
            let hash = self.identity_hash(service, env, &address, port);
            let instances = &self.instances;
            port_taken = self
                .identity
                .find(hash, |&s| {
                    let o = &instances[s as usize];
                    s != slot
                        && o.service == service
                        && o.env == env
                        && o.address == address
                        && o.port == port
                })
                .is_some();
        }
        // The port is part of the identity: re-index, unless another
        // instance already holds the new identity (then the port stays).
        if let Some(port) = update.port.filter(|_| !port_taken) {
            let (instances, hasher) = (&self.instances, &self.hasher);
            let hash = Self::hash_of(hasher, &instances[slot as usize]);
            if let Ok(found) = self.identity.find_entry(hash, |&s| s == slot) {
                found.remove();
            }
            self.instances[slot as usize].port = port;
            let (instances, hasher) = (&self.instances, &self.hasher);
            let hash = Self::hash_of(hasher, &instances[slot as usize]);
            self.identity.insert_unique(hash, slot, |&s| {
                Self::hash_of(hasher, &instances[s as usize])
            });
        }
        for (text, field) in [
            (update.version, 0),
            (update.protocol, 1),
            (update.tags_json, 2),
        ] {
            let Some(text) = text else { continue };
            let new = self.strings.intern(text);
            let record = &mut self.instances[slot as usize];
            let old = match field {
                0 => std::mem::replace(&mut record.version, new),
                1 => std::mem::replace(&mut record.protocol, new),
                _ => std::mem::replace(&mut record.tags, new),
            };
            self.strings.release(old);
        }
        let record = &mut self.instances[slot as usize];
        record.last_seen_ms = now_ms;
        let service = record.service;
        self.changed.insert(service);
        self.publish(now_ms, EventKind::Updated, slot, None);
        if port_taken {
            UpdateOutcome::PortTaken
        } else {
            UpdateOutcome::Updated
        }
    }

    /// Removes the owner's record. False if it is not the owner's.
    pub fn deregister(&mut self, id: &Uuid, owner: Owner, reason: &str, now_ms: u64) -> bool {
        let Some(slot) = self.slot_owned(id, owner) else {
            return false;
        };
        self.publish(now_ms, EventKind::Deregistered, slot, Some(reason));
        self.remove(slot);
        true
    }

    /// The owner's connection ended without a deregister: an up record is
    /// removed; a down one stays for its retention period.
    pub fn disconnected(&mut self, id: &Uuid, owner: Owner, now_ms: u64) {
        if let Some(slot) = self.slot_owned(id, owner)
            && self.instances[slot as usize].status == Status::Up
        {
            self.publish(now_ms, EventKind::Deregistered, slot, Some("disconnected"));
            self.remove(slot);
        }
    }

    /// The owner missed a liveness deadline: the record leaves discovery
    /// and is kept, down, for the retention period.
    pub fn mark_down(&mut self, id: &Uuid, owner: Owner, reason: &str, now_ms: u64) -> bool {
        let Some(slot) = self.slot_owned(id, owner) else {
            return false;
        };
        if self.instances[slot as usize].status != Status::Up {
            return false;
        }
        self.unlist(slot);
        self.instances[slot as usize].status = Status::Down;
        self.down_count += 1;
        self.down.push_back((slot, *id, now_ms));
        self.publish(now_ms, EventKind::Down, slot, Some(reason));
        while self.down_count > self.config.max_down_retained
            // Entries of down records replaced by a new registration stay
            // queued until they age out; bound them too.
            || self.down.len() > 2 * self.config.max_down_retained + 1024
        {
            self.forget_oldest_down(now_ms);
        }
        true
    }

    /// Drops down records older than the retention period.
    pub fn expire_down(&mut self, now_ms: u64) {
        while let Some(&(_, _, at)) = self.down.front() {
            if now_ms.saturating_sub(at) < self.config.down_retention_ms {
                break;
            }
            self.forget_oldest_down(now_ms);
        }
    }

    fn forget_oldest_down(&mut self, now_ms: u64) {
        let Some((slot, id, _)) = self.down.pop_front() else {
            return;
        };
        if self.get(&id).is_some_and(|i| i.status == Status::Down) {
            self.publish(
                now_ms,
                EventKind::Deregistered,
                slot,
                Some("down record expired"),
            );
            self.remove(slot);
        }
    }

    /// Records a sign of life from the owner.
    pub fn touch(&mut self, id: &Uuid, owner: Owner, now_ms: u64) {
        if let Some(slot) = self.slot_owned(id, owner) {
            self.instances[slot as usize].last_seen_ms = now_ms;
        }
    }

    fn publish(&mut self, now_ms: u64, kind: EventKind, slot: u32, reason: Option<&str>) {
        let i = &self.instances[slot as usize];
        let service = self.strings.resolve(i.service).clone();
        self.events
            .publish(now_ms, kind, i.id, service, reason.map(Arc::from));
    }

    /// Takes an up record out of discovery.
    fn unlist(&mut self, slot: u32) {
        let i = &self.instances[slot as usize];
        let (service, pos) = (i.service, i.index_pos as usize);
        let list = self
            .by_service
            .get_mut(&service)
            .expect("up records are listed");
        debug_assert_eq!(list[pos], slot);
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.instances[moved as usize].index_pos = pos as u32;
        }
        if list.is_empty() {
            self.by_service.remove(&service);
        }
        self.changed.insert(service);
    }

    fn remove(&mut self, slot: u32) {
        if self.instances[slot as usize].status == Status::Up {
            self.unlist(slot);
        } else {
            self.down_count -= 1;
        }
        let (instances, hasher) = (&self.instances, &self.hasher);
        let hash = Self::hash_of(hasher, &instances[slot as usize]);
        match self.identity.find_entry(hash, |&s| s == slot) {
            Ok(found) => {
                found.remove();
            }
            Err(_) => debug_assert!(false, "every record is in the identity index"),
        }
        let i = self.instances.remove(slot as usize);
        for sym in [i.service, i.env, i.version, i.protocol, i.tags] {
            self.strings.release(sym);
        }
        if let Address::Host(sym) = i.address {
            self.strings.release(sym);
        }
    }

    // -- discovery -------------------------------------------------------------

    fn node(&self, i: &Instance) -> Node {
        let s = |sym| self.strings.resolve(sym).clone();
        Node {
            shard: i.owner.shard,
            runtime_instance_id: i.id,
            service_id: s(i.service),
            env_tag: s(i.env),
            version: s(i.version),
            protocol: s(i.protocol),
            address: self.node_address(i.address),
            port: i.port,
            tags_json: s(i.tags),
            connected_at_ms: i.connected_at_ms,
            last_seen_ms: i.last_seen_ms,
            status: i.status,
        }
    }

    /// An instance as discovery shows it.
    pub fn node_of(&self, id: &Uuid) -> Option<Node> {
        self.get(id).map(|i| self.node(i))
    }

    fn matching(&self, key: &SubKey, filter: Filter) -> Snapshot {
        let max = self.config.max_snapshot_nodes;
        let mut nodes = Vec::new();
        let mut truncated = false;
        for &slot in self
            .by_service
            .get(&key.service)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let i = &self.instances[slot as usize];
            if key.env.is_some_and(|e| e != i.env) || key.protocol.is_some_and(|p| p != i.protocol)
            {
                continue;
            }
            if nodes.len() == max {
                truncated = true;
                break;
            }
            nodes.push(self.node(i));
        }
        Snapshot {
            filter,
            nodes,
            truncated,
        }
    }

    /// The up instances matching `filter`, at most `max_snapshot_nodes`.
    pub fn lookup(&self, filter: &Filter) -> Snapshot {
        let find = |s: &Option<String>| match s {
            None => Some(None),
            Some(text) => self.strings.find(text).map(Some),
        };
        match (
            self.strings.find(&filter.service_id),
            find(&filter.env_tag),
            find(&filter.protocol),
        ) {
            (Some(service), Some(env), Some(protocol)) => self.matching(
                &SubKey {
                    service,
                    env,
                    protocol,
                },
                filter.clone(),
            ),
            _ => Snapshot {
                filter: filter.clone(),
                nodes: Vec::new(),
                truncated: false,
            },
        }
    }

    /// Subscribes `owner` to changes of `filter`; returns the snapshot now.
    /// Subscribing twice to the same filter is one subscription.
    pub fn subscribe(&mut self, filter: &Filter, owner: Owner) -> Result<Snapshot, SubscribeError> {
        let held = self.subs_by_owner.get(&owner).map_or(0, Vec::len);
        let key_if_known = self.sub_key_of(filter);
        let already = key_if_known
            .and_then(|k| self.subs.get(&k))
            .is_some_and(|list| list.iter().any(|s| s.owner == owner));
        if !already {
            if held >= self.config.max_subscriptions_per_owner {
                return Err(SubscribeError::PerOwner(held));
            }
            if self.sub_count >= self.config.max_subscriptions {
                return Err(SubscribeError::Total(self.sub_count));
            }
            let mut intern = |s: &str| self.strings.intern(s);
            let key = SubKey {
                service: intern(&filter.service_id),
                env: filter.env_tag.as_deref().map(&mut intern),
                protocol: filter.protocol.as_deref().map(&mut intern),
            };
            let list = self.subs.entry(key).or_default();
            if list.is_empty() {
                self.subs_by_service
                    .entry(key.service)
                    .or_default()
                    .push(key);
            }
            list.push(Subscriber {
                owner,
                pending: false,
                last_sent_ms: 0,
            });
            self.subs_by_owner.entry(owner).or_default().push(key);
            self.sub_count += 1;
        }
        Ok(self.lookup(filter))
    }

    fn sub_key_of(&self, filter: &Filter) -> Option<SubKey> {
        let find = |s: &Option<String>| match s {
            None => Some(None),
            Some(text) => self.strings.find(text).map(Some),
        };
        Some(SubKey {
            service: self.strings.find(&filter.service_id)?,
            env: find(&filter.env_tag)?,
            protocol: find(&filter.protocol)?,
        })
    }

    /// Ends one subscription. False if `owner` did not hold it.
    pub fn unsubscribe(&mut self, filter: &Filter, owner: Owner) -> bool {
        let Some(key) = self.sub_key_of(filter) else {
            return false;
        };
        let Some(keys) = self.subs_by_owner.get_mut(&owner) else {
            return false;
        };
        let Some(pos) = keys.iter().position(|k| *k == key) else {
            return false;
        };
        keys.swap_remove(pos);
        if keys.is_empty() {
            self.subs_by_owner.remove(&owner);
        }
        self.drop_subscriber(key, owner);
        true
    }

    /// Ends every subscription `owner` holds (its connection closed).
    pub fn unsubscribe_all(&mut self, owner: Owner) {
        for key in self.subs_by_owner.remove(&owner).unwrap_or_default() {
            self.drop_subscriber(key, owner);
        }
    }

    fn drop_subscriber(&mut self, key: SubKey, owner: Owner) {
        let list = self
            .subs
            .get_mut(&key)
            .expect("owner's keys are subscribed");
        list.retain(|s| s.owner != owner);
        self.sub_count -= 1;
        if list.is_empty() {
            self.subs.remove(&key);
            if let Some(keys) = self.subs_by_service.get_mut(&key.service) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.subs_by_service.remove(&key.service);
                }
            }
        }
        for sym in [Some(key.service), key.env, key.protocol]
            .into_iter()
            .flatten()
        {
            self.strings.release(sym);
        }
    }

    /// Subscriptions held in all.
    pub fn subscription_count(&self) -> usize {
        self.sub_count
    }

    /// Turns the services changed since the last call into due
    /// notifications, then hands `shard` the ones it may send now (each
    /// subscription at most once per `notify_interval_ms`), with their
    /// snapshots. Subscriptions still inside their interval stay due.
    /// `now_ms` is a monotonic clock: a wall-clock step must not stall
    /// notifications.
    pub fn take_notifications(&mut self, shard: u16, now_ms: u64) -> Vec<Notification> {
        for service in std::mem::take(&mut self.changed) {
            for key in self.subs_by_service.get(&service).into_iter().flatten() {
                for sub in self.subs.get_mut(key).into_iter().flatten() {
                    if !sub.pending {
                        sub.pending = true;
                        self.due[sub.owner.shard as usize].push((*key, sub.owner));
                    }
                }
            }
        }
        let due = std::mem::take(&mut self.due[shard as usize]);
        let mut ready: HashMap<SubKey, Vec<Owner>> = HashMap::new();
        for (key, owner) in due {
            let Some(sub) = self
                .subs
                .get_mut(&key)
                .and_then(|l| l.iter_mut().find(|s| s.owner == owner))
            else {
                continue; // unsubscribed meanwhile
            };
            if now_ms.saturating_sub(sub.last_sent_ms) < self.config.notify_interval_ms {
                self.due[shard as usize].push((key, owner));
                continue;
            }
            sub.pending = false;
            sub.last_sent_ms = now_ms;
            ready.entry(key).or_default().push(owner);
        }
        ready
            .into_iter()
            .map(|(key, owners)| {
                let r = |sym: Sym| self.strings.resolve(sym).to_string();
                let filter = Filter {
                    service_id: r(key.service),
                    env_tag: key.env.map(r),
                    protocol: key.protocol.map(r),
                };
                Notification {
                    snapshot: self.matching(&key, filter),
                    owners,
                }
            })
            .collect()
    }

    /// Every record, up and down, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().map(|(_, i)| i)
    }

    /// One page of the records matching `query`, from slot `cursor` on, at
    /// most `limit`; `total` counts every match. In one go: for long scans
    /// use `PageScan` with `page_step`, which lets go of the registry
    /// between chunks.
    pub fn page(&self, query: &Query, cursor: u32, limit: usize) -> Page {
        let mut scan = PageScan::new(query.clone(), cursor, limit);
        while !self.page_step(&mut scan, u32::MAX) {}
        scan.finish()
    }

    /// Advances `scan` over at most `max_slots` slots; true when it is done.
    /// Filters on serviceId and envTag compare interned ids; `q` is a
    /// case-insensitive substring of the serviceId, envTag, version,
    /// address, tags or runtimeInstanceId.
    pub fn page_step(&self, scan: &mut PageScan, max_slots: u32) -> bool {
        if scan.done {
            return true;
        }
        let sym = |s: &Option<String>| match s {
            None => Some(None),
            Some(text) => self.strings.find(text).map(Some),
        };
        let query = &scan.query;
        let (Some(service), Some(env)) = (sym(&query.service_id), sym(&query.env_tag)) else {
            // Nothing can match a name nobody uses.
            scan.page = Page {
                total: 0,
                items: Vec::new(),
                next: None,
            };
            scan.done = true;
            return true;
        };
        let q = query.q.as_deref().filter(|q| !q.is_empty());
        // Interned strings are tested against `q` once, not once per record
        // (again only if strings came or went since the last step).
        if let Some(q) = q
            && scan.q_generation != Some(self.strings.generation())
        {
            scan.q_syms = self
                .strings
                .iter()
                .filter(|(_, text)| contains_ignore_case(text, q))
                .map(|(s, _)| s)
                .collect();
            scan.q_generation = Some(self.strings.generation());
        }
        let q_syms = &scan.q_syms;
        let matches = |i: &Instance| {
            service.is_none_or(|s| s == i.service)
                && env.is_none_or(|e| e == i.env)
                && query.status.is_none_or(|st| st == i.status)
                && q.is_none_or(|q| self.contains(i, q, q_syms))
        };
        let unfiltered =
            service.is_none() && env.is_none() && query.status.is_none() && q.is_none();
        let end = scan
            .next_slot
            .saturating_add(max_slots)
            .min(self.high_water);
        let page = &mut scan.page;
        for slot in scan.next_slot..end {
            let Some(i) = self.instances.get(slot as usize) else {
                continue;
            };
            if !matches(i) {
                continue;
            }
            if slot >= scan.cursor {
                if page.items.len() < scan.limit {
                    page.items.push(self.node(i));
                } else if page.next.is_none() {
                    page.next = Some(slot);
                    if unfiltered {
                        scan.next_slot = self.high_water;
                        break;
                    }
                }
            }
            if !unfiltered {
                page.total += 1;
            }
        }
        scan.next_slot = scan.next_slot.max(end);
        if unfiltered {
            page.total = self.instances.len();
        }
        scan.done = scan.next_slot >= self.high_water;
        scan.done
    }

    /// Whether `q` is in one of the record's strings (`q_syms`: the interned
    /// strings that hold it), its address or its id. No allocation.
    fn contains(&self, i: &Instance, q: &str, q_syms: &HashSet<Sym>) -> bool {
        if [i.service, i.env, i.version, i.tags]
            .iter()
            .any(|s| q_syms.contains(s))
        {
            return true;
        }
        let mut buf = [0u8; 64];
        let address: &str = match i.address {
            Address::Host(h) => {
                return q_syms.contains(&h)
                    || contains_ignore_case(i.id.hyphenated().encode_lower(&mut buf), q);
            }
            Address::V4(v4) => format_into(&mut buf, format_args!("{v4}")),
            Address::V6(v6) => format_into(&mut buf, format_args!("{v6}")),
        };
        if contains_ignore_case(address, q) {
            return true;
        }
        contains_ignore_case(i.id.hyphenated().encode_lower(&mut buf), q)
    }

    fn node_address(&self, address: Address) -> NodeAddress {
        match address {
            Address::V4(v4) => NodeAddress::Ip(IpAddr::V4(v4)),
            Address::V6(v6) => NodeAddress::Ip(IpAddr::V6(v6)),
            Address::Host(h) => NodeAddress::Host(self.strings.resolve(h).clone()),
        }
    }

    /// Counts by status, and up instances by serviceId (the `top` largest).
    pub fn summary(&self, top: usize) -> Summary {
        let mut services: Vec<(Arc<str>, usize)> = self
            .by_service
            .iter()
            .map(|(s, list)| (self.strings.resolve(*s).clone(), list.len()))
            .collect();
        let distinct_services = services.len();
        services.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        services.truncate(top);
        Summary {
            up: self.len_up(),
            down: self.len_down(),
            distinct_services,
            services,
        }
    }

    /// Distinct strings interned (for memory accounting).
    pub fn interned(&self) -> usize {
        self.strings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(key: u32) -> Owner {
        Owner {
            shard: (key % 2) as u16,
            key,
            generation: 1,
        }
    }

    fn reg<'a>(service: &'a str, address: &'a str, port: u16) -> Registration<'a> {
        Registration {
            service_id: service,
            version: "1.0.0",
            protocol: "https",
            address,
            port,
            env_tag: Some("prod"),
            tags_json: r#"{"zone":"a"}"#,
        }
    }

    fn filter(service: &str) -> Filter {
        Filter {
            service_id: service.into(),
            env_tag: None,
            protocol: None,
        }
    }

    #[test]
    fn register_lookup_and_remove_release_everything() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let a = r.register(&reg("user", "10.0.0.1", 8443), owner(1), 1000);
        let b = r.register(&reg("user", "node-b.example", 8443), owner(2), 1000);
        assert!(a.superseded.is_none() && b.superseded.is_none());
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.get_version_num(), 7);
        let snap = r.lookup(&filter("user"));
        assert_eq!(snap.nodes.len(), 2);
        let with_env = Filter {
            env_tag: Some("prod".into()),
            ..filter("user")
        };
        assert_eq!(r.lookup(&with_env).nodes.len(), 2);
        let other_env = Filter {
            env_tag: Some("dev".into()),
            ..filter("user")
        };
        assert!(r.lookup(&other_env).nodes.is_empty());
        assert!(r.deregister(&a.id, owner(1), "programmatic", 2000));
        r.disconnected(&b.id, owner(2), 2000);
        assert_eq!(r.len_up(), 0);
        assert!(r.lookup(&filter("user")).nodes.is_empty());
        assert_eq!(r.interned(), 0, "every string was released");
        let kinds: Vec<EventKind> = {
            let (_, rx) = r.events.subscribe(Some(0)).unwrap();
            rx.try_iter().map(|e| e.kind).collect()
        };
        assert_eq!(
            kinds,
            vec![
                EventKind::Registered,
                EventKind::Registered,
                EventKind::Deregistered,
                EventKind::Deregistered
            ]
        );
    }

    #[test]
    fn same_identity_supersedes_and_the_old_owner_cannot_touch_the_new() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let first = r.register(&reg("user", "10.0.0.1", 8443), owner(1), 1000);
        let second = r.register(&reg("user", "10.0.0.1", 8443), owner(2), 1001);
        assert_eq!(second.superseded, Some(owner(1)));
        assert!(r.get(&first.id).is_none());
        assert_eq!(r.len_up(), 1);
        // The superseded connection closing must not remove its successor.
        r.disconnected(&first.id, owner(1), 1002);
        assert!(!r.deregister(&second.id, owner(1), "x", 1002));
        assert!(r.get(&second.id).is_some());
        // A different port is a different identity.
        assert!(
            r.register(&reg("user", "10.0.0.1", 9000), owner(3), 1003)
                .superseded
                .is_none()
        );
    }

    #[test]
    fn down_leaves_discovery_is_retained_then_expires() {
        let config = RegistryConfig {
            down_retention_ms: 500,
            max_down_retained: 1,
            ..Default::default()
        };
        let mut r = Registry::new(config, 1);
        let a = r.register(&reg("user", "10.0.0.1", 1), owner(1), 0);
        let b = r.register(&reg("user", "10.0.0.2", 1), owner(2), 0);
        assert!(r.mark_down(&a.id, owner(1), "pong timeout", 100));
        assert_eq!(r.lookup(&filter("user")).nodes.len(), 1);
        assert_eq!(r.get(&a.id).unwrap().status, Status::Down);
        // Over the retention count: the older down record goes.
        assert!(r.mark_down(&b.id, owner(2), "pong timeout", 200));
        assert!(r.get(&a.id).is_none());
        assert_eq!(r.len_down(), 1);
        r.expire_down(600);
        assert_eq!(r.len_down(), 1, "b went down at 200, kept until 700");
        r.expire_down(700);
        assert_eq!((r.len_down(), r.len_up()), (0, 0));
        // Re-registering a down identity is not a supersede.
        let c = r.register(&reg("user", "10.0.0.3", 1), owner(3), 800);
        assert!(r.mark_down(&c.id, owner(3), "x", 900));
        assert!(
            r.register(&reg("user", "10.0.0.3", 1), owner(4), 901)
                .superseded
                .is_none()
        );
        assert_eq!((r.len_down(), r.len_up()), (0, 1));
    }

    #[test]
    fn update_changes_metadata_and_reindexes_the_port() {
        let mut r = Registry::new(RegistryConfig::default(), 1);
        let a = r.register(&reg("user", "10.0.0.1", 1), owner(1), 0);
        let update = MetadataUpdate {
            version: Some("2.0.0"),
            port: Some(2),
            ..Default::default()
        };
        assert_eq!(
            r.update(&a.id, owner(1), &update, 5),
            UpdateOutcome::Updated
        );
        assert_eq!(
            r.update(&a.id, owner(9), &update, 5),
            UpdateOutcome::NotOwner
        );
        let node = r.node_of(&a.id).unwrap();
        assert_eq!((&*node.version, node.port), ("2.0.0", 2));
        // The new port now identifies it.
        assert_eq!(
            r.register(&reg("user", "10.0.0.1", 2), owner(2), 6)
                .superseded,
            Some(owner(1))
        );
    }

    #[test]
    fn notifications_are_coalesced_per_interval_and_routed_to_the_owner_shard() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let sub = owner(3); // shard 1
        assert!(r.subscribe(&filter("user"), sub).unwrap().nodes.is_empty());
        r.register(&reg("user", "10.0.0.1", 1), owner(10), 0);
        assert!(r.take_notifications(0, 1000).is_empty(), "not shard 0's");
        let n = r.take_notifications(1, 1000);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].owners.clone(), n[0].snapshot.nodes.len()),
            (vec![sub], 1)
        );
        // Two changes inside one interval: one notification, after it.
        r.register(&reg("user", "10.0.0.2", 1), owner(12), 1010);
        r.register(&reg("user", "10.0.0.3", 1), owner(14), 1020);
        assert!(r.take_notifications(1, 1050).is_empty());
        let n = r.take_notifications(1, 1100);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].snapshot.nodes.len(), 3);
        assert!(r.take_notifications(1, 1300).is_empty());
        // Other services do not notify.
        r.register(&reg("billing", "10.0.0.1", 1), owner(16), 1400);
        assert!(r.take_notifications(1, 2000).is_empty());
        r.unsubscribe_all(sub);
        assert_eq!(r.subscription_count(), 0);
    }

    #[test]
    fn subscriptions_are_bounded_per_owner() {
        let config = RegistryConfig {
            max_subscriptions_per_owner: 2,
            ..Default::default()
        };
        let mut r = Registry::new(config, 1);
        r.subscribe(&filter("a"), owner(1)).unwrap();
        r.subscribe(&filter("a"), owner(1)).unwrap();
        r.subscribe(&filter("b"), owner(1)).unwrap();
        assert_eq!(
            r.subscribe(&filter("c"), owner(1)).unwrap_err(),
            SubscribeError::PerOwner(2)
        );
        assert!(r.unsubscribe(&filter("a"), owner(1)));
        assert!(!r.unsubscribe(&filter("a"), owner(1)));
        r.subscribe(&filter("c"), owner(1)).unwrap();
    }

    /// One record per service: part of the per-service memory budget.
    #[test]
    fn an_instance_record_fits_in_96_bytes() {
        assert!(
            size_of::<Instance>() <= 96,
            "Instance is {} bytes",
            size_of::<Instance>()
        );
    }

    #[test]
    fn pages_filter_count_and_continue() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        for i in 0..25u32 {
            let service = if i % 5 == 0 { "billing" } else { "user" };
            r.register(&reg(service, &format!("10.0.1.{i}"), 1), owner(i), 0);
        }
        let down = r.register(&reg("user", "10.0.9.9", 1), owner(99), 0).id;
        r.mark_down(&down, owner(99), "pong", 1);
        let all = r.page(&Query::default(), 0, 10);
        assert_eq!((all.total, all.items.len()), (26, 10));
        let mut seen = all.items.len();
        let mut cursor = all.next;
        while let Some(c) = cursor {
            let p = r.page(&Query::default(), c, 10);
            seen += p.items.len();
            cursor = p.next;
        }
        assert_eq!(seen, 26, "paging visits every record once");
        let users = Query {
            service_id: Some("user".into()),
            status: Some(Status::Up),
            ..Default::default()
        };
        assert_eq!(r.page(&users, 0, 100).total, 20);
        let by_q = Query {
            q: Some("10.0.1.1".into()),
            ..Default::default()
        };
        assert_eq!(r.page(&by_q, 0, 100).total, 11, "10.0.1.1 and 10.0.1.10-19");
        let downs = Query {
            status: Some(Status::Down),
            ..Default::default()
        };
        assert_eq!(r.page(&downs, 0, 100).items[0].runtime_instance_id, down);
        let nobody = Query {
            service_id: Some("nobody".into()),
            ..Default::default()
        };
        assert_eq!(r.page(&nobody, 0, 100).total, 0);
        let summary = r.summary(1);
        assert_eq!(
            (summary.up, summary.down, summary.distinct_services),
            (25, 1, 2)
        );
        assert_eq!(summary.services, vec![(Arc::from("user"), 20)]);
    }

    #[test]
    fn a_scan_in_small_chunks_finds_what_one_pass_finds() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        for i in 0..300u32 {
            r.register(
                &reg(
                    if i % 3 == 0 { "billing" } else { "user" },
                    &format!("10.0.{}.{}", i / 100, i % 100),
                    1,
                ),
                owner(i),
                0,
            );
        }
        for query in [
            Query::default(),
            Query {
                service_id: Some("billing".into()),
                ..Default::default()
            },
            Query {
                q: Some("10.0.2.".into()),
                ..Default::default()
            },
            Query {
                q: Some("BILL".into()),
                ..Default::default()
            },
        ] {
            let whole = r.page(&query, 7, 25);
            let mut scan = PageScan::new(query.clone(), 7, 25);
            let mut steps = 0;
            while !r.page_step(&mut scan, 13) {
                steps += 1;
            }
            let chunked = scan.finish();
            assert!(steps > 1 || query.q.is_none());
            let ids = |p: &Page| {
                p.items
                    .iter()
                    .map(|n| n.runtime_instance_id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                (chunked.total, chunked.next, ids(&chunked)),
                (whole.total, whole.next, ids(&whole)),
                "{query:?}"
            );
        }
        assert_eq!(
            r.page(
                &Query {
                    q: Some("BILL".into()),
                    ..Default::default()
                },
                0,
                1000
            )
            .total,
            100
        );
    }

    #[test]
    fn snapshots_are_capped() {
        let config = RegistryConfig {
            max_snapshot_nodes: 3,
            ..Default::default()
        };
        let mut r = Registry::new(config, 1);
        for i in 0..5 {
            r.register(&reg("user", &format!("10.0.0.{i}"), 1), owner(i), 0);
        }
        let snap = r.lookup(&filter("user"));
        assert_eq!((snap.nodes.len(), snap.truncated), (3, true));
    }
}
