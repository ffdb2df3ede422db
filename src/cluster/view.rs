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
    pub instances: HashMap<Uuid, InstanceValue>,
}

/// One instance of another node, for listings.
#[derive(Clone, Debug)]
pub struct RemoteInstance {
    pub node: Arc<str>,
    pub id: Uuid,
    pub value: InstanceValue,
}

pub struct View {
    me: String,
    keys: Keys,
    nodes: BTreeMap<Arc<str>, NodeView>,
    strings: HashSet<Arc<str>>,
    instances: usize,
    max_instances: usize,
    /// The etcd revision the view reflects.
    pub revision: i64,
    /// etcd could not be reached since the view was last in sync.
    pub stale: bool,
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
            instances: 0,
            max_instances,
            revision: 0,
            stale: true,
            dropped: 0,
            malformed: 0,
        }
    }

    /// Forgets everything, before a fresh list.
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.strings.clear();
        self.instances = 0;
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

    /// A key was written (a list's key, or a watch's put).
    pub fn put(&mut self, key: &str, value: &[u8]) {
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
                let full = self.instances >= self.max_instances;
                let entry = self.node_entry(node);
                if !entry.instances.contains_key(&id) && full {
                    self.dropped += 1;
                    return;
                }
                if entry.instances.insert(id, v).is_none() {
                    self.instances += 1;
                }
            }
            _ => {}
        }
    }

    /// A key was deleted (or its lease expired).
    pub fn delete(&mut self, key: &str) {
        match self.keys.parse(key) {
            Some(KeyKind::Node(node)) => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.record = None;
                    if n.instances.is_empty() {
                        self.nodes.remove(node);
                    }
                }
            }
            Some(KeyKind::Instance(node, id)) => {
                let Some(n) = self.nodes.get_mut(node) else {
                    return;
                };
                if n.instances.remove(&id).is_some() {
                    self.instances -= 1;
                }
                if n.instances.is_empty() && n.record.is_none() {
                    self.nodes.remove(node);
                }
            }
            None => {}
        }
    }

    /// Remote instances held now.
    pub fn instance_count(&self) -> usize {
        self.instances
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&Arc<str>, &NodeView)> {
        self.nodes.iter()
    }

    /// Up to `limit` remote instances of `service_id` (all services when
    /// None), from node and id order, with the number that matched.
    pub fn list(&self, service_id: Option<&str>, limit: usize) -> (usize, Vec<RemoteInstance>) {
        let mut total = 0;
        let mut out = Vec::new();
        for (node, n) in &self.nodes {
            for (id, v) in &n.instances {
                if service_id.is_some_and(|s| s != &*v.service_id) {
                    continue;
                }
                total += 1;
                if out.len() < limit {
                    out.push(RemoteInstance {
                        node: node.clone(),
                        id: *id,
                        value: v.clone(),
                    });
                }
            }
        }
        (total, out)
    }

    /// The node that holds `id`, if another does.
    pub fn holder(&self, id: &Uuid) -> Option<(&Arc<str>, &InstanceValue)> {
        self.nodes
            .iter()
            .find_map(|(node, n)| n.instances.get(id).map(|v| (node, v)))
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
        v.clear();
        assert_eq!((v.instance_count(), v.nodes().count()), (0, 0));
    }
}
