//! Discovery and its subscriptions: snapshots by serviceId (and envTag,
//! protocol), subscriptions keyed by their interned filter, and the
//! coalesced `discovery/changed` notifications routed to the owner's shard.

use super::*;

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
    /// `address` is the socket's peer: the service named none.
    pub address_derived: bool,
    pub port: u16,
    pub tags_json: Arc<str>,
    pub connected_at_ms: u64,
    pub last_seen_ms: u64,
    pub status: Status,
    /// The shard holding its socket.
    pub shard: u16,
    /// The last ping's round trip, in µs, if one was measured.
    pub rtt_us: Option<u32>,
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

/// A discovery subscription that must be told of a change.
pub struct Notification {
    pub snapshot: Arc<SharedSnapshot>,
    pub owners: Vec<Owner>,
}

/// One filter's snapshot, built once under the lock and shared by every
/// lookup and notification of that filter until its set changes; its JSON
/// is written once, outside the lock, by whoever sends it first.
pub struct SharedSnapshot {
    pub snapshot: Snapshot,
    json: std::sync::OnceLock<Box<serde_json::value::RawValue>>,
}

impl SharedSnapshot {
    pub fn new(snapshot: Snapshot) -> SharedSnapshot {
        SharedSnapshot {
            snapshot,
            json: std::sync::OnceLock::new(),
        }
    }

    /// Its JSON, written by `write` the first time it is asked for.
    pub fn json(
        &self,
        write: impl FnOnce(&Snapshot) -> Box<serde_json::value::RawValue>,
    ) -> &serde_json::value::RawValue {
        self.json.get_or_init(|| write(&self.snapshot))
    }
}

impl std::ops::Deref for SharedSnapshot {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// Instances other controller nodes hold (a cluster's view of them),
/// merged into every discovery snapshot after this node's own.
pub trait RemoteInstances: Send + Sync {
    /// Appends to `out` up to `limit` of the remote instances `filter`
    /// matches; true if more matched. Called with the registry locked: it
    /// must not call back into the registry.
    fn matching(&self, filter: &Filter, limit: usize, out: &mut Vec<Node>) -> bool;
}

/// How long a shared snapshot may serve before it is built again even
/// though no instance changed (its `lastSeenAt`s move).
const SNAPSHOT_MAX_AGE_MS: u64 = 1000;
/// Shared snapshots kept at once.
const MAX_SHARED_SNAPSHOTS: usize = 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("this connection already holds {0} subscriptions, the limit")]
    PerOwner(usize),
    #[error("the controller holds {0} subscriptions, the limit")]
    Total(usize),
}

/// A discovery subscription's key: the interned filter.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct SubKey {
    service: Sym,
    env: Option<Sym>,
    protocol: Option<Sym>,
}

pub(super) struct Subscriber {
    owner: Owner,
    pending: bool,
    last_sent_ms: u64,
}

impl Registry {
    pub(super) fn node(&self, i: &Instance) -> Node {
        let s = |sym| self.strings.resolve(sym).clone();
        Node {
            shard: i.owner.shard,
            runtime_instance_id: i.id,
            service_id: s(i.service),
            env_tag: s(i.env),
            version: s(i.version),
            protocol: s(i.protocol),
            address: self.node_address(i.address),
            address_derived: i.address_derived,
            port: i.port,
            tags_json: s(i.tags),
            connected_at_ms: i.connected_at_ms,
            last_seen_ms: i.last_seen_ms,
            status: i.status,
            rtt_us: i.rtt.micros(),
        }
    }

    /// An instance as discovery shows it.
    pub fn node_of(&self, id: &Uuid) -> Option<Node> {
        self.get(id).map(|i| self.node(i))
    }

    pub(super) fn node_address(&self, address: Address) -> NodeAddress {
        match address {
            Address::V4(v4) => NodeAddress::Ip(IpAddr::V4(v4)),
            Address::V6(v6) => NodeAddress::Ip(IpAddr::V6(v6)),
            Address::Host(h) => NodeAddress::Host(self.strings.resolve(h).clone()),
        }
    }

    /// The four filters an instance of (service, env, protocol) matches:
    /// envTag and protocol each either named or left open.
    fn keys_matching(service: Sym, env: Sym, protocol: Sym) -> [SubKey; 4] {
        [
            (None, None),
            (Some(env), None),
            (None, Some(protocol)),
            (Some(env), Some(protocol)),
        ]
        .map(|(env, protocol)| SubKey {
            service,
            env,
            protocol,
        })
    }

    /// Instance `slot` changed (appeared, moved, went): the filters it
    /// matches are due a notification and their shared snapshots are stale.
    pub(super) fn mark_changed(&mut self, slot: u32) {
        let i = &self.instances[slot as usize];
        let change = (i.service, i.env, i.protocol);
        for key in Self::keys_matching(change.0, change.1, change.2) {
            self.snapshots.remove(&key);
        }
        self.changed.insert(change);
    }

    /// The snapshot of `key` (as `filter` asked it), shared: built anew
    /// only if its set changed or it is older than `SNAPSHOT_MAX_AGE_MS`.
    fn shared(&mut self, key: SubKey, filter: Filter, now_ms: u64) -> Arc<SharedSnapshot> {
        if let Some((at, shared)) = self.snapshots.get(&key)
            && now_ms.saturating_sub(*at) < SNAPSHOT_MAX_AGE_MS
        {
            return shared.clone();
        }
        if self.snapshots.len() >= MAX_SHARED_SNAPSHOTS {
            self.snapshots
                .retain(|_, (at, _)| now_ms.saturating_sub(*at) < SNAPSHOT_MAX_AGE_MS);
            if self.snapshots.len() >= MAX_SHARED_SNAPSHOTS {
                self.snapshots.clear();
            }
        }
        let shared = Arc::new(SharedSnapshot::new(self.matching(&key, filter)));
        self.snapshots.insert(key, (now_ms, shared.clone()));
        shared
    }

    /// `lookup`, shared with every other asker of the same filter until the
    /// set changes. `now_ms` is a monotonic clock.
    pub fn lookup_shared(&mut self, filter: &Filter, now_ms: u64) -> Arc<SharedSnapshot> {
        match self.sub_key_of(filter) {
            Some(key) => self.shared(key, filter.clone(), now_ms),
            None => Arc::new(SharedSnapshot::new(self.lookup(filter))),
        }
    }

    /// The shared snapshots held now.
    pub fn shared_snapshots(&self) -> usize {
        self.snapshots.len()
    }

    pub(super) fn matching(&self, key: &SubKey, filter: Filter) -> Snapshot {
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
        if let Some(remote) = self.remote.as_ref().filter(|_| !truncated) {
            // Room for the hidden ones too (below), then cut to `max`.
            let room = max - nodes.len();
            let mut others = Vec::new();
            let more = remote.matching(&filter, room + nodes.len(), &mut others);
            if !others.is_empty() {
                // A service that moved to this node is shown once: its old
                // record, on a node that has not let it go yet, is hidden.
                let here: HashSet<(String, u16, &str)> = nodes
                    .iter()
                    .map(|n| (n.address.to_string(), n.port, &*n.env_tag))
                    .collect();
                let moved = |n: &Node| here.contains(&(n.address.to_string(), n.port, &*n.env_tag));
                others.retain(|n| !moved(n));
            }
            truncated = more || others.len() > room;
            others.truncate(room);
            nodes.extend(others);
        }
        Snapshot {
            filter,
            nodes,
            truncated,
        }
    }

    /// Sets (or clears) the other nodes' instances discovery merges in;
    /// every subscription is then due a snapshot.
    pub fn set_remote(&mut self, remote: Option<Arc<dyn RemoteInstances>>) {
        self.remote = remote;
        self.mark_all_remote_changed();
    }

    /// Instances of (service, env, protocol) came or went on another node:
    /// the filters they match are due a snapshot, their shared ones stale.
    /// Strings this node never interned match no subscription.
    pub fn mark_remote_changed(&mut self, service: &str, env: &str, protocol: &str) {
        let Some(service) = self.strings.find(service) else {
            return;
        };
        // Each filter names the envTag (protocol) or leaves it open.
        let envs = [Some(None), self.strings.find(env).map(Some)];
        let protocols = [Some(None), self.strings.find(protocol).map(Some)];
        for env in envs.into_iter().flatten() {
            for protocol in protocols.into_iter().flatten() {
                let key = SubKey {
                    service,
                    env,
                    protocol,
                };
                self.snapshots.remove(&key);
                if self.subs.contains_key(&key) {
                    self.remote_changed.insert(key);
                }
            }
        }
    }

    /// Every subscription is due a snapshot (the remote view was replaced).
    pub fn mark_all_remote_changed(&mut self) {
        self.snapshots.clear();
        self.remote_changed.extend(self.subs.keys().copied());
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
            // No instance here has these names; other nodes' may.
            _ => {
                let mut nodes = Vec::new();
                let truncated = self.remote.as_ref().is_some_and(|r| {
                    r.matching(filter, self.config.max_snapshot_nodes, &mut nodes)
                });
                Snapshot {
                    filter: filter.clone(),
                    nodes,
                    truncated,
                }
            }
        }
    }

    /// Subscribes `owner` to changes of `filter`; returns the snapshot now.
    /// Subscribing twice to the same filter is one subscription.
    pub fn subscribe(&mut self, filter: &Filter, owner: Owner) -> Result<Snapshot, SubscribeError> {
        self.add_subscriber(filter, owner)?;
        Ok(self.lookup(filter))
    }

    /// `subscribe`, with the snapshot shared as `lookup_shared`'s.
    pub fn subscribe_shared(
        &mut self,
        filter: &Filter,
        owner: Owner,
        now_ms: u64,
    ) -> Result<Arc<SharedSnapshot>, SubscribeError> {
        self.add_subscriber(filter, owner)?;
        Ok(self.lookup_shared(filter, now_ms))
    }

    fn add_subscriber(&mut self, filter: &Filter, owner: Owner) -> Result<(), SubscribeError> {
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
            list.push(Subscriber {
                owner,
                pending: false,
                last_sent_ms: 0,
            });
            self.subs_by_owner.entry(owner).or_default().push(key);
            self.sub_count += 1;
        }
        Ok(())
    }

    pub(super) fn sub_key_of(&self, filter: &Filter) -> Option<SubKey> {
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

    pub(super) fn drop_subscriber(&mut self, key: SubKey, owner: Owner) {
        let list = self
            .subs
            .get_mut(&key)
            .expect("owner's keys are subscribed");
        list.retain(|s| s.owner != owner);
        self.sub_count -= 1;
        if list.is_empty() {
            self.subs.remove(&key);
            // Its shared snapshot holds the key's strings: let them go.
            self.snapshots.remove(&key);
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

    fn mark_due(&mut self, key: SubKey) {
        for sub in self.subs.get_mut(&key).into_iter().flatten() {
            if !sub.pending {
                sub.pending = true;
                self.due[sub.owner.shard as usize].push((key, sub.owner));
            }
        }
    }

    /// Turns the services changed since the last call into due
    /// notifications, then hands `shard` the ones it may send now (each
    /// subscription at most once per `notify_interval_ms`), with their
    /// snapshots. Subscriptions still inside their interval stay due.
    /// `now_ms` is a monotonic clock: a wall-clock step must not stall
    /// notifications.
    pub fn take_notifications(&mut self, shard: u16, now_ms: u64) -> Vec<Notification> {
        // Indexed by filter: a change touches only the (at most four)
        // filters its instance matches, never every filter of its service.
        let remote = std::mem::take(&mut self.remote_changed);
        for (service, env, protocol) in std::mem::take(&mut self.changed) {
            for key in Self::keys_matching(service, env, protocol) {
                self.mark_due(key);
            }
        }
        for key in remote {
            self.mark_due(key);
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
                    snapshot: self.shared(key, filter, now_ms),
                    owners,
                }
            })
            .collect()
    }
}
