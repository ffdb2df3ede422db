//! What one node knows of the others: their records and up instances, as
//! etcd last told it (a list from one revision, then the watch's events).
//! Pure: fed keys and values, no etcd, no I/O.
//!
//! Owns: the other nodes' instances (never this node's own: those are the
//! local registry's), the revision the view is at, and whether it is
//! stale (etcd unreachable: the last view is kept and served, flagged).
//! Bounded: at most `max_instances` remote instances; past it, puts are
//! counted as dropped and the view says so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use uuid::Uuid;

use super::codec::{InstanceValue, KeyKind, Keys, NodeRecord, decode_instance};

/// Another node, as the view holds it.
#[derive(Debug, Default)]
pub struct NodeView {
    /// Its record; None while only instances of it were seen (a list
    /// reads keys in order: `i/…` before `n/…`).
    pub record: Option<NodeRecord>,
    /// Its up instances in the view.
    pub instances: usize,
}

/// One instance of another node, for listings.
#[derive(Clone, Debug)]
pub struct RemoteInstance {
    pub node: Arc<str>,
    pub id: Uuid,
    pub value: InstanceValue,
}

/// What discovery filters on: serviceId, envTag, protocol.
pub type Triple = (Arc<str>, Arc<str>, Arc<str>);

pub struct View {
    me: String,
    keys: Keys,
    nodes: BTreeMap<Arc<str>, NodeView>,
    strings: HashSet<Arc<str>>,
    /// Every remote instance, by id, with the node holding it.
    instances: HashMap<Uuid, (Arc<str>, InstanceValue)>,
    /// The ids of each serviceId's instances (discovery's index).
    by_service: HashMap<Arc<str>, HashSet<Uuid>>,
    /// The (serviceId, envTag, protocol) whose instances came or went
    /// since `take_changed`: their discovery subscribers are due a snapshot.
    changed: HashSet<Triple>,
    /// Instances new to the view since `take_arrived`, with their keys'
    /// create revisions (a service that registered on another node may
    /// have moved from this one).
    arrived: Vec<(RemoteInstance, i64)>,
    max_instances: usize,
    /// The etcd revision the view reflects.
    pub revision: i64,
    /// etcd could not be reached since the view was last in sync.
    pub stale: bool,
    /// When it turned stale (wall ms): the last time its instances were
    /// known to be up.
    pub stale_since_ms: u64,
    /// Puts refused by `max_instances`, and values that did not parse.
    pub dropped: u64,
    pub malformed: u64,
}

impl View {
    pub fn new(me: &str, keys: Keys, max_instances: usize) -> View {
        View {
            me: me.to_string(),
            keys,
            nodes: BTreeMap::new(),
            strings: HashSet::new(),
            instances: HashMap::new(),
            by_service: HashMap::new(),
            changed: HashSet::new(),
            arrived: Vec::new(),
            max_instances,
            revision: 0,
            stale: true,
            stale_since_ms: 0,
            dropped: 0,
            malformed: 0,
        }
    }

    fn intern(strings: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
        if let Some(a) = strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        strings.insert(a.clone());
        a
    }

    fn node_entry(&mut self, node: &str) -> &mut NodeView {
        let name = Self::intern(&mut self.strings, node);
        self.nodes.entry(name).or_default()
    }

    fn triple(v: &InstanceValue) -> Triple {
        (v.service_id.clone(), v.env_tag.clone(), v.protocol.clone())
    }

    /// A key was written (a list's key, or a watch's put).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.put_created(key, value, 0);
    }

    /// The same, with the key's create revision (kept for arrivals).
    pub fn put_created(&mut self, key: &str, value: &[u8], create_revision: i64) {
        match self.keys.parse(key) {
            Some(KeyKind::Node(node)) => {
                let Ok(record) = serde_json::from_slice::<NodeRecord>(value) else {
                    self.malformed += 1;
                    return;
                };
                self.node_entry(node).record = Some(record);
            }
            Some(KeyKind::Instance(node, id)) if node != self.me => {
                let strings = &mut self.strings;
                let Ok(v) = decode_instance(value, &mut |s| Self::intern(strings, s)) else {
                    self.malformed += 1;
                    return;
                };
                if !self.instances.contains_key(&id) && self.instances.len() >= self.max_instances {
                    self.dropped += 1;
                    return;
                }
                let name = Self::intern(&mut self.strings, node);
                self.changed.insert(Self::triple(&v));
                let service = v.service_id.clone();
                match self.instances.insert(id, (name.clone(), v)) {
                    Some((old_node, old)) => {
                        self.changed.insert(Self::triple(&old));
                        if old.service_id != service {
                            self.unindex(&old.service_id, &id);
                        }
                        if old_node != name {
                            self.count(&old_node, -1);
                            self.count(&name, 1);
                        }
                    }
                    None => {
                        self.count(&name, 1);
                        if let Some((_, v)) = self.instances.get(&id) {
                            let r = RemoteInstance {
                                node: name.clone(),
                                id,
                                value: v.clone(),
                            };
                            self.arrived.push((r, create_revision));
                        }
                    }
                }
                self.by_service.entry(service).or_default().insert(id);
            }
            _ => {}
        }
    }

    fn count(&mut self, node: &Arc<str>, by: isize) {
        let n = self.nodes.entry(node.clone()).or_default();
        n.instances = n.instances.saturating_add_signed(by);
        if n.instances == 0 && n.record.is_none() {
            self.nodes.remove(node);
        }
    }

    fn unindex(&mut self, service: &Arc<str>, id: &Uuid) {
        if let Some(ids) = self.by_service.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// A key was deleted (or its lease expired).
    pub fn delete(&mut self, key: &str) {
        match self.keys.parse(key) {
            Some(KeyKind::Node(node)) => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.record = None;
                    if n.instances == 0 {
                        self.nodes.remove(node);
                    }
                }
            }
            Some(KeyKind::Instance(node, id)) => {
                // Only the node's own key removes its record.
                if self.instances.get(&id).is_none_or(|(n, _)| **n != *node) {
                    return;
                }
                let Some((node, old)) = self.instances.remove(&id) else {
                    return;
                };
                self.changed.insert(Self::triple(&old));
                self.unindex(&old.service_id, &id);
                self.count(&node, -1);
            }
            None => {}
        }
    }

    /// Remote instances held now.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&Arc<str>, &NodeView)> {
        self.nodes.iter()
    }

    /// The filters whose instances changed since the last call.
    pub fn take_changed(&mut self) -> HashSet<Triple> {
        std::mem::take(&mut self.changed)
    }

    /// The instances new to the view since the last call.
    pub fn take_arrived(&mut self) -> Vec<(RemoteInstance, i64)> {
        std::mem::take(&mut self.arrived)
    }

    /// The admin URL node `node`'s record names, if its record is here.
    pub fn admin_of(&self, node: &str) -> Option<&str> {
        Some(self.nodes.get(node)?.record.as_ref()?.admin.as_str())
    }

    /// Another node's up instance `id`, if one holds it.
    pub fn remote(&self, id: &Uuid) -> Option<RemoteInstance> {
        let (node, value) = self.instances.get(id)?;
        Some(RemoteInstance {
            node: node.clone(),
            id: *id,
            value: value.clone(),
        })
    }

    /// Up to `limit` remote instances of `service_id` (all services when
    /// None), in node then id order, with the number that matched.
    pub fn list(&self, service_id: Option<&str>, limit: usize) -> (usize, Vec<RemoteInstance>) {
        self.list_page(service_id, |_, _| true, 0, limit)
    }

    /// The page `[offset, offset + limit)` of the remote instances of
    /// `service_id` (all when None) that `keep` keeps, in node then id
    /// order (stable across pages while the view holds still), with the
    /// number that matched. O(matches): a selection, then the page sorted.
    pub fn list_page(
        &self,
        service_id: Option<&str>,
        keep: impl Fn(&Uuid, &InstanceValue) -> bool,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<RemoteInstance>) {
        let mut ids: Vec<(&Arc<str>, &Uuid)> = match service_id {
            Some(s) => self
                .by_service
                .get(s)
                .into_iter()
                .flatten()
                .filter_map(|id| {
                    let (n, v) = self.instances.get(id)?;
                    keep(id, v).then_some((n, id))
                })
                .collect(),
            None => self
                .instances
                .iter()
                .filter(|(id, (_, v))| keep(id, v))
                .map(|(id, (n, _))| (n, id))
                .collect(),
        };
        let total = ids.len();
        let end = offset.saturating_add(limit).min(total);
        if end < total {
            ids.select_nth_unstable(end);
            ids.truncate(end);
        }
        ids.sort_unstable();
        let out = ids
            .iter()
            .skip(offset)
            .filter_map(|(_, id)| self.remote(id))
            .collect();
        (total, out)
    }

    /// The remote instances discovery shows for a filter: `service_id`'s,
    /// of `env_tag` and `protocol` when named; at most `limit`, and whether
    /// more matched.
    pub fn matching(
        &self,
        service_id: &str,
        env_tag: Option<&str>,
        protocol: Option<&str>,
        limit: usize,
        mut each: impl FnMut(&Uuid, &InstanceValue),
    ) -> bool {
        let mut n = 0;
        for id in self.by_service.get(service_id).into_iter().flatten() {
            let Some((_, v)) = self.instances.get(id) else {
                continue;
            };
            if env_tag.is_some_and(|e| e != &*v.env_tag)
                || protocol.is_some_and(|p| p != &*v.protocol)
            {
                continue;
            }
            if n == limit {
                return true;
            }
            n += 1;
            each(id, v);
        }
        false
    }

    /// Turns the view stale (etcd lost), noting since when.
    pub fn set_stale(&mut self, now_ms: u64) {
        if !self.stale {
            self.stale = true;
            self.stale_since_ms = now_ms;
        }
    }

    /// Per node, its up instances of `service_id` (every service's when
    /// None) in `env_tag` (any when None).
    pub fn count_by_node(
        &self,
        service_id: Option<&str>,
        env_tag: Option<&str>,
    ) -> Vec<(Arc<str>, usize)> {
        let mut counts: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        let mut count = |id: &Uuid| {
            if let Some((node, v)) = self.instances.get(id)
                && env_tag.is_none_or(|e| e == &*v.env_tag)
            {
                *counts.entry(node.clone()).or_default() += 1;
            }
        };
        match service_id {
            Some(s) => self
                .by_service
                .get(s)
                .into_iter()
                .flatten()
                .for_each(&mut count),
            None => self.instances.keys().for_each(&mut count),
        }
        counts.into_iter().collect()
    }

    /// The node that holds `id`, if another does.
    pub fn holder(&self, id: &Uuid) -> Option<(&Arc<str>, &InstanceValue)> {
        self.instances.get(id).map(|(n, v)| (n, v))
    }
}

/// A remote instance as a registry node (for discovery snapshots), seen
/// last at `seen_ms`.
pub fn registry_node(id: &Uuid, v: &InstanceValue, seen_ms: u64) -> crate::registry::Node {
    use crate::registry::NodeAddress;
    let connected_at_ms = id
        .get_timestamp()
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        })
        .unwrap_or(seen_ms);
    crate::registry::Node {
        runtime_instance_id: *id,
        service_id: v.service_id.clone(),
        env_tag: v.env_tag.clone(),
        version: v.version.clone(),
        protocol: v.protocol.clone(),
        address: match v.address.parse() {
            Ok(ip) => NodeAddress::Ip(ip),
            Err(_) => NodeAddress::Host(v.address.clone()),
        },
        address_derived: false,
        port: v.port,
        tags_json: v.tags_json.clone(),
        connected_at_ms,
        last_seen_ms: seen_ms.max(connected_at_ms),
        status: crate::registry::Status::Up,
        shard: 0,
        rtt_us: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &[u8] = br#"["billing","prod","1.0.0","https","10.0.0.7",8443,{}]"#;

    #[test]
    fn puts_and_deletes_build_the_other_nodes_instances() {
        let keys = Keys::new("/t/");
        let mut v = View::new("me", keys.clone(), 3);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        v.put(&keys.instance("n2", &a), VALUE);
        v.put(&keys.instance("n2", &b), VALUE);
        v.put(
            &keys.node("n2"),
            br#"{"admin":"http://127.0.0.1:1","epoch":"00","startedAtMs":1}"#,
        );
        // This node's own keys are the registry's, not the view's.
        v.put(&keys.instance("me", &Uuid::now_v7()), VALUE);
        assert_eq!(v.instance_count(), 2);
        assert_eq!(v.list(Some("billing"), 10).0, 2);
        assert_eq!(v.list(Some("nobody"), 10).0, 0);
        assert_eq!(v.holder(&a).map(|(n, _)| &**n), Some("n2"));
        // Bounded: the fourth is dropped and counted; a rewrite is not new.
        v.put(&keys.instance("n3", &Uuid::now_v7()), VALUE);
        v.put(&keys.instance("n3", &Uuid::now_v7()), VALUE);
        v.put(&keys.instance("n2", &a), VALUE);
        assert_eq!((v.instance_count(), v.dropped), (3, 1));
        v.put(&keys.instance("n2", &Uuid::now_v7()), b"not json");
        assert_eq!(v.malformed, 1);
        // A lease's expiry deletes each key: the node goes with its last.
        v.delete(&keys.instance("n2", &a));
        v.delete(&keys.node("n2"));
        assert_eq!(v.nodes().count(), 2, "n2 still holds b");
        v.delete(&keys.instance("n2", &b));
        assert_eq!(
            v.nodes().map(|(n, _)| n.to_string()).collect::<Vec<_>>(),
            ["n3"]
        );
        // Discovery's index follows, and says which filters changed.
        let changed = v.take_changed();
        assert!(changed.iter().all(|t| &*t.0 == "billing"), "{changed:?}");
        let mut seen = 0;
        let more = v.matching("billing", Some("prod"), Some("https"), 0, |_, _| seen += 1);
        assert_eq!((seen, more), (0, true), "n3's one is past a limit of 0");
        let more = v.matching("billing", None, None, 9, |_, _| seen += 1);
        assert_eq!((seen, more), (1, false));
        v.matching("billing", Some("dev"), None, 9, |_, _| seen += 1);
        assert_eq!(seen, 1, "no dev instance");
        assert!(v.take_changed().is_empty());
    }
}
