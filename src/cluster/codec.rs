//! The cluster's keys and values in etcd: what one node publishes of each
//! instance it holds, and the node's own record. Pure: no etcd, no I/O.
//!
//! Layout under the prefix (default `/tether/v1/`):
//! - `n/{node}`: the node (`NodeRecord`, JSON), bound to its lease;
//! - `i/{node}/{runtimeInstanceId}`: one up instance, bound to the same
//!   lease, its value `InstanceValue` as a JSON array (what discovery
//!   needs, nothing else: ~60 bytes for a typical service).
//!
//! Keys never hold a `/` but the separators, so a node id is checked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::registry::{Node, NodeAddress};

/// Longest node id (it is in every key).
pub const MAX_NODE_ID: usize = 64;

/// A node id: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node id {id:?} must be 1 to {MAX_NODE_ID} of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// The keys of one cluster, under `prefix` (ends with `/`).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Node(&'a str),
    Instance(&'a str, Uuid),
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    /// Every key of the cluster starts with this.
    pub fn all(&self) -> &str {
        &self.prefix
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}n/{node}", self.prefix)
    }

    /// The prefix of one node's instances.
    pub fn instances_of(&self, node: &str) -> String {
        format!("{}i/{node}/", self.prefix)
    }

    pub fn instance(&self, node: &str, id: &Uuid) -> String {
        format!("{}i/{node}/{}", self.prefix, id.hyphenated())
    }

    /// What `key` is, or None for a key that is not the cluster's.
    pub fn parse<'a>(&self, key: &'a str) -> Option<KeyKind<'a>> {
        let rest = key.strip_prefix(&self.prefix)?;
        if let Some(node) = rest.strip_prefix("n/") {
            return check_node_id(node).ok().map(|()| KeyKind::Node(node));
        }
        let (node, id) = rest.strip_prefix("i/")?.split_once('/')?;
        check_node_id(node).ok()?;
        Some(KeyKind::Instance(node, Uuid::parse_str(id).ok()?))
    }
}

/// A node as the others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Its admin API, for commands forwarded to it (empty: none).
    pub admin: String,
    /// Its event log's epoch (16 hex digits).
    pub epoch: String,
    /// When it joined, in ms since the Unix epoch.
    pub started_at_ms: u64,
}

/// One up instance of another node: what discovery shows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceValue {
    pub service_id: Arc<str>,
    pub env_tag: Arc<str>,
    pub version: Arc<str>,
    pub protocol: Arc<str>,
    pub address: Arc<str>,
    pub port: u16,
    /// The tags as a JSON object (canonical, as the registry keeps them).
    pub tags_json: Arc<str>,
}

#[derive(Serialize)]
struct Wire<'a>(
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    u16,
    &'a RawValue,
);

#[derive(Deserialize)]
struct WireIn<'a>(
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    u16,
    #[serde(borrow)] &'a RawValue,
);

/// The value of an instance key: `["svc","prod","1.0.0","https","10.0.0.7",8443,{"zone":"a"}]`.
pub fn encode_instance(node: &Node) -> Vec<u8> {
    let address = match &node.address {
        NodeAddress::Ip(ip) => ip.to_string(),
        NodeAddress::Host(h) => h.to_string(),
    };
    let tags = serde_json::from_str::<&RawValue>(&node.tags_json)
        .unwrap_or_else(|_| serde_json::from_str("{}").expect("{} is JSON"));
    serde_json::to_vec(&Wire(
        &node.service_id,
        &node.env_tag,
        &node.version,
        &node.protocol,
        &address,
        node.port,
        tags,
    ))
    .expect("strings serialize")
}

/// Reads an instance value; `intern` shares the strings that repeat.
pub fn decode_instance(
    bytes: &[u8],
    intern: &mut impl FnMut(&str) -> Arc<str>,
) -> Result<InstanceValue, String> {
    let w: WireIn = serde_json::from_slice(bytes).map_err(|e| format!("instance value: {e}"))?;
    Ok(InstanceValue {
        service_id: intern(&w.0),
        env_tag: intern(&w.1),
        version: intern(&w.2),
        protocol: intern(&w.3),
        address: intern(&w.4),
        port: w.5,
        tags_json: intern(w.6.get()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            runtime_instance_id: Uuid::now_v7(),
            service_id: "billing".into(),
            env_tag: "prod".into(),
            version: "1.4.2".into(),
            protocol: "https".into(),
            address: NodeAddress::Ip("10.0.0.7".parse().unwrap()),
            address_derived: false,
            port: 8443,
            tags_json: r#"{"zone":"a"}"#.into(),
            connected_at_ms: 1,
            last_seen_ms: 2,
            status: crate::registry::Status::Up,
            shard: 0,
            rtt_us: None,
        }
    }

    #[test]
    fn an_instance_value_is_small_and_reads_back() {
        let n = node();
        let bytes = encode_instance(&n);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"["billing","prod","1.4.2","https","10.0.0.7",8443,{"zone":"a"}]"#
        );
        let v = decode_instance(&bytes, &mut |s| Arc::from(s)).unwrap();
        assert_eq!(
            (&*v.service_id, &*v.address, v.port, &*v.tags_json),
            ("billing", "10.0.0.7", 8443, r#"{"zone":"a"}"#)
        );
        assert!(decode_instance(b"[1,2]", &mut |s| Arc::from(s)).is_err());
    }

    #[test]
    fn keys_name_nodes_and_instances_and_nothing_else() {
        let k = Keys::new("/tether/v1");
        let id = Uuid::now_v7();
        assert_eq!(k.node("n1"), "/tether/v1/n/n1");
        let key = k.instance("n1", &id);
        assert!(key.starts_with(&k.instances_of("n1")));
        assert_eq!(k.parse(&key), Some(KeyKind::Instance("n1", id)));
        assert_eq!(k.parse("/tether/v1/n/n1"), Some(KeyKind::Node("n1")));
        for other in [
            "/tether/v2/n/n1",
            "/tether/v1/x/n1",
            "/tether/v1/i/n1/not-a-uuid",
            "/tether/v1/n/bad/id",
        ] {
            assert_eq!(k.parse(other), None, "{other}");
        }
        assert!(check_node_id("node-a.1_b").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
    }
}
