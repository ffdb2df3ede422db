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
//!
//! One concern a file, all on the one `Registry`: this file holds the
//! record and the tables; `records` registers, supersedes, updates and
//! removes; `discovery` answers lookups and keeps subscriptions;
//! `listing` pages and searches for the admin plane; `summary` counts;
//! `events` is the log every change goes to. Callers outside the
//! controller reach it only through `controller::Api`, never the lock.
//!
//! Where a cluster layer attaches: the event log is the stream of every
//! change a node makes (what another node's view is built from), and
//! `Owner` names a connection on this node only; an instance held by
//! another node would be a record whose owner is that node.

pub mod conflicts;
mod discovery;
pub mod events;
pub mod intern;
mod listing;
mod records;
mod summary;

pub use discovery::RemoteInstances;
pub use discovery::{
    Filter, Node, NodeAddress, Notification, SharedSnapshot, Snapshot, SubscribeError,
};
use discovery::{SubKey, Subscriber};
pub use listing::{Page, PageScan, Query, Sort, SortKey};
pub use records::{
    MetadataUpdate, MovedInstance, Refused, Registered, Registration, UpdateOutcome,
};
pub use summary::Summary;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hashbrown::HashTable;
use slab::Slab;
use uuid::Uuid;

use conflicts::{Conflicts, Verdict};
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

impl Address {
    /// The interned host name, if it is one.
    pub(super) fn host(self) -> Option<Sym> {
        match self {
            Address::Host(sym) => Some(sym),
            _ => None,
        }
    }
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
    /// `address` is the socket's peer: the service named none.
    pub address_derived: bool,
    pub status: Status,
    pub owner: Owner,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    /// Position in `by_service[service]` while up.
    index_pos: u32,
    /// The last ping's round trip (`Rtt`); fits in the padding.
    pub rtt: Rtt,
}

/// A ping's round trip in 10 µs units, saturating at ~655 ms; 0 when none
/// was measured (a service that pings us itself is spared our pings).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rtt(u16);

impl Rtt {
    pub const UNMEASURED: Rtt = Rtt(0);

    pub fn new(rtt: std::time::Duration) -> Rtt {
        let units = rtt.as_micros().div_ceil(10);
        Rtt(units.clamp(1, u16::MAX as u128) as u16)
    }

    /// The round trip in microseconds (to 10 µs), if one was measured.
    pub fn micros(self) -> Option<u32> {
        (self.0 != 0).then_some(self.0 as u32 * 10)
    }
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
    subs_by_owner: HashMap<Owner, Vec<SubKey>>,
    sub_count: usize,
    /// (service, env, protocol) of the instances changed since the last
    /// `take_notifications`: only the filters they match are told.
    changed: HashSet<(Sym, Sym, Sym)>,
    /// Snapshots built for a filter, shared by every lookup and
    /// notification of it until the set changes (bounded, short-lived).
    snapshots: HashMap<SubKey, (u64, Arc<SharedSnapshot>)>,
    /// Subscriptions due a notification, per shard of their owner.
    due: Vec<Vec<(SubKey, Owner)>>,
    /// What other controller nodes hold (a cluster's view), merged into
    /// discovery snapshots; and the subscribed filters whose remote
    /// instances changed since the last `take_notifications`.
    remote: Option<Arc<dyn discovery::RemoteInstances>>,
    remote_changed: HashSet<SubKey>,
    /// One past the highest slot ever used (where listings stop).
    high_water: u32,
    /// Identities superseded often lately (bounded).
    conflicts: Conflicts,
    pub events: EventLog,
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
            snapshots: HashMap::new(),
            subs_by_owner: HashMap::new(),
            sub_count: 0,
            changed: HashSet::new(),
            due: (0..shards).map(|_| Vec::new()).collect(),
            remote: None,
            remote_changed: HashSet::new(),
            events,
            high_water: 0,
            conflicts: Conflicts::default(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            address_derived: false,
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
        let a = r
            .register(&reg("user", "10.0.0.1", 8443), owner(1), 1000, &mut || None)
            .unwrap();
        let b = r
            .register(
                &reg("user", "node-b.example", 8443),
                owner(2),
                1000,
                &mut || None,
            )
            .unwrap();
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
            let epoch = r.events.epoch();
            let (_, rx) = r
                .events
                .subscribe(Some(events::Resume { epoch, seq: 0 }))
                .unwrap();
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
        let first = r
            .register(&reg("user", "10.0.0.1", 8443), owner(1), 1000, &mut || None)
            .unwrap();
        let second = r
            .register(&reg("user", "10.0.0.1", 8443), owner(2), 1001, &mut || None)
            .unwrap();
        assert_eq!(second.superseded, Some(owner(1)));
        assert!(r.get(&first.id).is_none());
        assert_eq!(r.len_up(), 1);
        // The superseded connection closing must not remove its successor.
        r.disconnected(&first.id, owner(1), 1002);
        assert!(!r.deregister(&second.id, owner(1), "x", 1002));
        assert!(r.get(&second.id).is_some());
        // A different port is a different identity.
        assert!(
            r.register(&reg("user", "10.0.0.1", 9000), owner(3), 1003, &mut || None)
                .unwrap()
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
        let a = r
            .register(&reg("user", "10.0.0.1", 1), owner(1), 0, &mut || None)
            .unwrap();
        let b = r
            .register(&reg("user", "10.0.0.2", 1), owner(2), 0, &mut || None)
            .unwrap();
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
        let c = r
            .register(&reg("user", "10.0.0.3", 1), owner(3), 800, &mut || None)
            .unwrap();
        assert!(r.mark_down(&c.id, owner(3), "x", 900));
        assert!(
            r.register(&reg("user", "10.0.0.3", 1), owner(4), 901, &mut || None)
                .unwrap()
                .superseded
                .is_none()
        );
        assert_eq!((r.len_down(), r.len_up()), (0, 1));
    }

    #[test]
    fn an_update_onto_a_down_records_identity_replaces_it() {
        let mut r = Registry::new(RegistryConfig::default(), 1);
        let gone = r
            .register(&reg("user", "10.0.0.1", 1), owner(1), 0, &mut || None)
            .unwrap();
        assert!(r.mark_down(&gone.id, owner(1), "pong timeout", 10));
        let live = r
            .register(&reg("user", "10.0.0.1", 2), owner(2), 20, &mut || None)
            .unwrap();
        let update = MetadataUpdate {
            version: Some("2"),
            port: Some(1),
            ..Default::default()
        };
        assert_eq!(
            r.update(&live.id, owner(2), &update, 30),
            UpdateOutcome::Updated,
            "the whole update applies"
        );
        let i = r.get(&live.id).unwrap();
        assert_eq!((i.port, r.resolve(i.version).as_ref()), (1, "2"));
        assert!(r.get(&gone.id).is_none(), "the down record is replaced");
        assert_eq!((r.len_up(), r.len_down()), (1, 0));
        #[cfg(debug_assertions)]
        r.check_invariants();
        // A live holder still keeps its identity: the port stays.
        let other = r
            .register(&reg("user", "10.0.0.1", 3), owner(3), 40, &mut || None)
            .unwrap();
        let onto_live = MetadataUpdate {
            port: Some(1),
            ..Default::default()
        };
        assert_eq!(
            r.update(&other.id, owner(3), &onto_live, 50),
            UpdateOutcome::PortTaken
        );
        assert_eq!(r.get(&other.id).unwrap().port, 3);
    }

    #[test]
    fn update_changes_metadata_and_reindexes_the_port() {
        let mut r = Registry::new(RegistryConfig::default(), 1);
        let a = r
            .register(&reg("user", "10.0.0.1", 1), owner(1), 0, &mut || None)
            .unwrap();
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
            r.register(&reg("user", "10.0.0.1", 2), owner(2), 6, &mut || None)
                .unwrap()
                .superseded,
            Some(owner(1))
        );
    }

    #[test]
    fn a_registration_on_another_node_supersedes_the_record_it_names() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let a = r
            .register(&reg("user", "10.0.0.1", 1), owner(10), 5_000, &mut || None)
            .unwrap();
        let moved = MovedInstance {
            service_id: "user",
            env_tag: "prod",
            address: "10.0.0.1",
            port: 1,
            node: "n2",
        };
        assert_eq!(r.up_with_identity(&moved), Some(a.id));
        let other = MovedInstance { port: 2, ..moved };
        assert_eq!(r.up_with_identity(&other), None, "not here");
        let unknown = MovedInstance {
            service_id: "nobody",
            ..moved
        };
        assert_eq!(r.up_with_identity(&unknown), None);
        // Only the record the caller ordered gives way (not a newer one
        // that took the identity meanwhile).
        assert_eq!(r.supersede_moved(&Uuid::now_v7(), &moved, 6_000), None);
        assert_eq!(r.supersede_moved(&a.id, &moved, 6_000), Some(owner(10)));
        assert!(r.node_of(&a.id).is_none(), "gone here");
        assert!(r.lookup(&filter("user")).nodes.is_empty());
        assert_eq!(r.up_with_identity(&moved), None);
    }

    /// Another node's instances, as a cluster's view would hand them over.
    struct Others(std::sync::Mutex<Vec<Node>>);

    impl RemoteInstances for Others {
        fn matching(&self, filter: &Filter, limit: usize, out: &mut Vec<Node>) -> bool {
            let all = self.0.lock().unwrap();
            let mut matched = all.iter().filter(|n| {
                *n.service_id == *filter.service_id
                    && filter.env_tag.as_deref().is_none_or(|e| e == &*n.env_tag)
            });
            out.extend(matched.by_ref().take(limit).cloned());
            matched.next().is_some()
        }
    }

    #[test]
    fn other_nodes_instances_join_snapshots_and_notify_their_subscribers() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let a = r
            .register(&reg("user", "10.0.0.1", 1), owner(10), 0, &mut || None)
            .unwrap();
        let remote_node = |address: &str| Node {
            runtime_instance_id: Uuid::now_v7(),
            address: NodeAddress::Ip(address.parse().unwrap()),
            ..r.node_of(&a.id).unwrap()
        };
        // One elsewhere, and one that is this node's own (it moved here and
        // the other node has not let it go yet): shown once.
        let others = Arc::new(Others(std::sync::Mutex::new(vec![
            remote_node("10.0.0.2"),
            remote_node("10.0.0.1"),
        ])));
        r.set_remote(Some(others.clone()));
        let prod = Filter {
            env_tag: Some("prod".into()),
            ..filter("user")
        };
        let sub = owner(3); // shard 1
        let snap = r.subscribe(&prod, sub).unwrap();
        assert_eq!(snap.nodes.len(), 2, "{:?}", snap.nodes);
        assert_eq!(r.lookup(&filter("user")).nodes.len(), 2);
        // Names no instance here holds are still looked up elsewhere.
        others.0.lock().unwrap()[0].service_id = "billing".into();
        assert_eq!(r.lookup(&filter("billing")).nodes.len(), 1);
        r.take_notifications(1, 1000);
        // A remote change notifies the filters it matches, not others.
        r.mark_remote_changed("user", "prod", "https");
        let n = r.take_notifications(1, 2000);
        assert_eq!((n.len(), n[0].owners.clone()), (1, vec![sub]));
        assert_eq!(n[0].snapshot.nodes.len(), 1, "billing's moved away");
        r.mark_remote_changed("user", "dev", "https");
        r.mark_remote_changed("nobody", "prod", "https");
        r.mark_remote_changed("user", "prod", "wss");
        assert_eq!(
            r.take_notifications(1, 3000).len(),
            1,
            "envTag left open: wss counts"
        );
        r.mark_remote_changed("user", "dev", "https");
        assert!(r.take_notifications(1, 4000).is_empty(), "dev is not prod");
        r.set_remote(None);
        let n = r.take_notifications(1, 5000);
        assert_eq!(n[0].snapshot.nodes.len(), 1, "its own only");
    }

    #[test]
    fn notifications_are_coalesced_per_interval_and_routed_to_the_owner_shard() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let sub = owner(3); // shard 1
        assert!(r.subscribe(&filter("user"), sub).unwrap().nodes.is_empty());
        r.register(&reg("user", "10.0.0.1", 1), owner(10), 0, &mut || None)
            .unwrap();
        assert!(r.take_notifications(0, 1000).is_empty(), "not shard 0's");
        let n = r.take_notifications(1, 1000);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].owners.clone(), n[0].snapshot.nodes.len()),
            (vec![sub], 1)
        );
        // Two changes inside one interval: one notification, after it.
        r.register(&reg("user", "10.0.0.2", 1), owner(12), 1010, &mut || None)
            .unwrap();
        r.register(&reg("user", "10.0.0.3", 1), owner(14), 1020, &mut || None)
            .unwrap();
        assert!(r.take_notifications(1, 1050).is_empty());
        let n = r.take_notifications(1, 1100);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].snapshot.nodes.len(), 3);
        assert!(r.take_notifications(1, 1300).is_empty());
        // Other services do not notify.
        r.register(&reg("billing", "10.0.0.1", 1), owner(16), 1400, &mut || {
            None
        })
        .unwrap();
        assert!(r.take_notifications(1, 2000).is_empty());
        r.unsubscribe_all(sub);
        assert_eq!(r.subscription_count(), 0);
    }

    /// A change tells only the filters its instance matches (not every
    /// filter of its service), and one snapshot serves every asker of a
    /// filter until its set changes.
    #[test]
    fn changes_reach_only_matching_filters_and_snapshots_are_shared() {
        let mut r = Registry::new(RegistryConfig::default(), 1);
        let f = |env: Option<&str>, protocol: Option<&str>| Filter {
            service_id: "user".into(),
            env_tag: env.map(Into::into),
            protocol: protocol.map(Into::into),
        };
        let matching = [
            f(None, None),
            f(Some("prod"), None),
            f(None, Some("https")),
            f(Some("prod"), Some("https")),
        ];
        let other = [
            f(Some("dev"), None),
            f(None, Some("http")),
            f(Some("dev"), Some("https")),
        ];
        for (i, filter) in matching.iter().chain(&other).enumerate() {
            r.subscribe(filter, owner(2 * i as u32)).unwrap();
        }
        // reg() is envTag prod, protocol https.
        let a = r
            .register(&reg("user", "10.0.0.1", 1), owner(99), 0, &mut || None)
            .unwrap();
        let told: Vec<Owner> = r
            .take_notifications(0, 1000)
            .into_iter()
            .flat_map(|n| n.owners)
            .collect();
        assert_eq!(told.len(), 4, "only the matching filters: {told:?}");
        assert!(told.iter().all(|o| o.key < 2 * matching.len() as u32));
        // Shared until it changes.
        let one = r.lookup_shared(&matching[0], 1000);
        let two = r.lookup_shared(&matching[0], 1001);
        assert!(Arc::ptr_eq(&one, &two));
        assert_eq!(r.shared_snapshots(), 4);
        r.update(
            &a.id,
            owner(99),
            &MetadataUpdate {
                version: Some("2"),
                ..Default::default()
            },
            1002,
        );
        let three = r.lookup_shared(&matching[0], 1003);
        assert!(!Arc::ptr_eq(&one, &three), "a change builds it again");
        assert_eq!(three.nodes[0].version.as_ref(), "2");
        // And it ages out even without a change (lastSeenAt moves).
        let four = r.lookup_shared(&matching[0], 1003 + 1000);
        assert!(!Arc::ptr_eq(&three, &four));
        // A protocol change tells the filters of the old and the new one.
        r.take_notifications(0, 5000);
        r.update(
            &a.id,
            owner(99),
            &MetadataUpdate {
                protocol: Some("http"),
                ..Default::default()
            },
            6000,
        );
        let told = r
            .take_notifications(0, 7000)
            .into_iter()
            .flat_map(|n| n.owners)
            .count();
        assert_eq!(
            told,
            4 + 1,
            "the https ones, and now the (any env, http) one"
        );
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
            r.register(
                &reg(service, &format!("10.0.1.{i}"), 1),
                owner(i),
                0,
                &mut || None,
            )
            .unwrap();
        }
        let down = r
            .register(&reg("user", "10.0.9.9", 1), owner(99), 0, &mut || None)
            .unwrap()
            .id;
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
    fn sorted_pages_follow_the_order_across_cursors() {
        let mut r = Registry::new(RegistryConfig::default(), 2);
        let names = ["user", "Billing", "audit", "cart", "billing"];
        let addresses = [
            "10.0.0.1",
            "9.0.0.1",
            "2001:db8::1",
            "db.internal",
            "10.0.0.1",
        ];
        let mut ids = Vec::new();
        for (n, (name, address)) in names.iter().zip(addresses).enumerate() {
            let id = r
                .register(
                    &reg(name, address, 100 - n as u16),
                    owner(n as u32),
                    10 * n as u64,
                    &mut || None,
                )
                .unwrap()
                .id;
            ids.push(id);
        }
        // Two measured round trips; the others never pinged.
        r.touch(
            &ids[3],
            owner(3),
            100,
            Some(Rtt::new(Duration::from_micros(900))),
        );
        r.touch(
            &ids[0],
            owner(0),
            100,
            Some(Rtt::new(Duration::from_micros(41))),
        );
        let order = |text: &str, limit: usize| {
            let query = Query {
                sort: Sort::parse(text),
                ..Default::default()
            };
            let mut out = Vec::new();
            let mut cursor = Some(0);
            while let Some(c) = cursor {
                let page = r.page(&query, c, limit);
                assert_eq!(page.total, 5, "{text}");
                out.extend(page.items.iter().map(|n| n.runtime_instance_id));
                cursor = page.next;
            }
            out.iter()
                .map(|id| ids.iter().position(|i| i == id).unwrap())
                .collect::<Vec<_>>()
        };
        // Case-insensitive, then exact; ties keep slot order.
        assert_eq!(order("serviceId", 2), [2, 1, 4, 3, 0]);
        assert_eq!(order("serviceId", 100), [2, 1, 4, 3, 0]);
        assert_eq!(order("-serviceId", 3), [0, 3, 4, 1, 2]);
        // Addresses by number (9 before 10), then port; names after IPs.
        assert_eq!(order("address", 1), [1, 4, 0, 2, 3]);
        assert_eq!(order("-connectedAt", 2), [4, 3, 2, 1, 0]);
        // Unmeasured round trips come last in both directions.
        assert_eq!(order("rttMs", 2), [0, 3, 1, 2, 4]);
        assert_eq!(order("-rttMs", 2), [3, 0, 1, 2, 4]);
        assert_eq!(Sort::parse("nope"), None);
        // A record gone between the sort and the page is left out.
        let query = Query {
            sort: Sort::parse("serviceId"),
            ..Default::default()
        };
        let mut scan = PageScan::new(query.clone(), 0, 3);
        while !r.page_step(&mut scan, 2) {}
        scan.sort();
        r.remove(slot_of(&ids[2]));
        r.fill_sorted(&mut scan);
        let page = scan.finish();
        assert_eq!((page.total, page.items.len(), page.next), (5, 2, Some(3)));
        // Chunked or whole, a sorted scan agrees.
        let mut scan = PageScan::new(query.clone(), 1, 2);
        while !r.page_step(&mut scan, 1) {}
        scan.sort();
        r.fill_sorted(&mut scan);
        let chunked: Vec<_> = scan
            .finish()
            .items
            .iter()
            .map(|n| n.runtime_instance_id)
            .collect();
        let whole: Vec<_> = r
            .page(&query, 1, 2)
            .items
            .iter()
            .map(|n| n.runtime_instance_id)
            .collect();
        assert_eq!(chunked, whole);
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
                &mut || None,
            )
            .unwrap();
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
        // An uncounted walk reads from its cursor to its page's end and
        // yields, page after page, what the counted pages yield.
        let billing = Query {
            service_id: Some("billing".into()),
            ..Default::default()
        };
        let walk = |uncounted: bool| {
            let (mut ids, mut cursor, mut pages) = (Vec::new(), Some(0), 0);
            while let Some(c) = cursor {
                let mut scan = PageScan::new(billing.clone(), c, 7);
                if uncounted {
                    scan = scan.uncounted();
                }
                while !r.page_step(&mut scan, 1_000) {}
                let page = scan.finish();
                if uncounted && page.next.is_some() {
                    assert!(page.total <= 8, "stopped at the page's end");
                }
                ids.extend(page.items.iter().map(|n| n.runtime_instance_id));
                cursor = page.next;
                pages += 1;
            }
            (ids, pages)
        };
        let (counted, uncounted) = (walk(false), walk(true));
        assert_eq!(counted.0.len(), 100);
        assert_eq!(counted, uncounted);
    }

    #[test]
    fn snapshots_are_capped() {
        let config = RegistryConfig {
            max_snapshot_nodes: 3,
            ..Default::default()
        };
        let mut r = Registry::new(config, 1);
        for i in 0..5 {
            r.register(
                &reg("user", &format!("10.0.0.{i}"), 1),
                owner(i),
                0,
                &mut || None,
            )
            .unwrap();
        }
        let snap = r.lookup(&filter("user"));
        assert_eq!((snap.nodes.len(), snap.truncated), (3, true));
    }
}
