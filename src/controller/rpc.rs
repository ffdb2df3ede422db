//! The service protocol's methods (../shared/PROTOCOL.md) as types: a
//! method name is matched once (`Method`), its params validated once into
//! a `Request`, and replies and snapshots written. The envelope and the
//! error codes are `crate::jsonrpc`'s. Pure functions on strings and byte
//! buffers; the names here are a compatibility contract.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::jsonrpc::RpcError;
use crate::registry::{Filter, MetadataUpdate, Node, Registration, Snapshot};

/// The methods a service may call.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Register,
    Deregister,
    UpdateMetadata,
    Lookup,
    Subscribe,
    Unsubscribe,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Register,
        Method::Deregister,
        Method::UpdateMetadata,
        Method::Lookup,
        Method::Subscribe,
        Method::Unsubscribe,
    ];

    /// The method a wire name names, if tether serves it.
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Method::Register => "service/register",
            Method::Deregister => "service/deregister",
            Method::UpdateMetadata => "service/update_metadata",
            Method::Lookup => "discovery/lookup",
            Method::Subscribe => "discovery/subscribe",
            Method::Unsubscribe => "discovery/unsubscribe",
        }
    }

    /// Served on `/ws/discovery` too (and needs no registration there).
    pub const fn is_discovery(self) -> bool {
        matches!(
            self,
            Method::Lookup | Method::Subscribe | Method::Unsubscribe
        )
    }
}

/// A service's request, its params validated.
#[derive(Debug)]
pub enum Request<'a> {
    Register(RegisterRequest<'a>),
    Deregister { instance: Uuid, reason: String },
    UpdateMetadata(UpdateRequest<'a>),
    Lookup(Filter),
    Subscribe(Filter),
    Unsubscribe(Filter),
}

impl<'a> Request<'a> {
    /// Validates `params` for `method`; invalid params are -32602.
    pub fn parse(method: Method, params: Option<&'a RawValue>) -> Result<Request<'a>, RpcError> {
        let request = match method {
            Method::Register => register_params(params).map(Request::Register),
            Method::Deregister => deregister_params(params)
                .map(|(instance, reason)| Request::Deregister { instance, reason }),
            Method::UpdateMetadata => update_params(params).map(Request::UpdateMetadata),
            Method::Lookup => filter_params(params).map(Request::Lookup),
            Method::Subscribe => filter_params(params).map(Request::Subscribe),
            Method::Unsubscribe => filter_params(params).map(Request::Unsubscribe),
        };
        request.map_err(RpcError::invalid_params)
    }
}

/// Bounds on what a registration may carry.
pub const MAX_NAME: usize = 256;
pub const MAX_HOST: usize = 253;
pub const MAX_TAGS: usize = 64;
pub const MAX_TAGS_JSON: usize = 4096;

/// Milliseconds since the Unix epoch, written as RFC 3339 UTC with
/// milliseconds (`2026-11-23T05:59:00.123Z`).
pub struct Rfc3339(pub u64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(self.0);
        humantime::format_rfc3339_millis(at).fmt(f)
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

struct Display<T>(T);

impl<T: std::fmt::Display> Serialize for Display<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeJson<'a> {
    runtime_instance_id: &'a Uuid,
    service_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    env_tag: Option<&'a str>,
    /// Always a string: clients parse it strictly.
    environment: &'a str,
    version: &'a str,
    protocol: &'a str,
    address: Display<&'a crate::registry::NodeAddress>,
    port: u16,
    tags: &'a RawValue,
    connected_at: Rfc3339,
    last_seen_at: Rfc3339,
    connected: bool,
}

impl<'a> NodeJson<'a> {
    fn new(n: &'a Node) -> NodeJson<'a> {
        let tags = serde_json::from_str(&n.tags_json).expect("tags are stored as canonical JSON");
        NodeJson {
            runtime_instance_id: &n.runtime_instance_id,
            service_id: &n.service_id,
            env_tag: Some(&*n.env_tag).filter(|e| !e.is_empty()),
            environment: &n.env_tag,
            version: &n.version,
            protocol: &n.protocol,
            address: Display(&n.address),
            port: n.port,
            tags,
            connected_at: Rfc3339(n.connected_at_ms),
            last_seen_at: Rfc3339(n.last_seen_ms),
            connected: n.status == crate::registry::Status::Up,
        }
    }
}

/// A shared snapshot's JSON, written once for all who send it (outside
/// the registry lock).
pub fn shared_json(shared: &crate::registry::SharedSnapshot) -> &RawValue {
    shared
        .json(|s| serde_json::value::to_raw_value(&SnapshotJson(s)).expect("a snapshot serializes"))
}

/// A discovery snapshot as the protocol shows it: the filter echoed as it
/// was asked (clients key their caches on it), then the nodes.
pub struct SnapshotJson<'a>(pub &'a Snapshot);

impl Serialize for SnapshotJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        crate::controller::assert_registry_unlocked("writing a snapshot");
        struct Nodes<'a>(&'a [Node]);
        impl Serialize for Nodes<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for n in self.0 {
                    seq.serialize_element(&NodeJson::new(n))?;
                }
                seq.end()
            }
        }
        let snap = self.0;
        let mut st = s.serialize_struct("Snapshot", 5)?;
        st.serialize_field("serviceId", &snap.filter.service_id)?;
        if let Some(env) = &snap.filter.env_tag {
            st.serialize_field("envTag", env)?;
        }
        if let Some(protocol) = &snap.filter.protocol {
            st.serialize_field("protocol", protocol)?;
        }
        st.serialize_field("nodes", &Nodes(&snap.nodes))?;
        if snap.truncated {
            st.serialize_field("truncated", &true)?;
        }
        st.end()
    }
}

/// One node as JSON (admin views use the same shape as discovery).
pub fn node_json(node: &Node) -> serde_json::Value {
    crate::controller::assert_registry_unlocked("writing a node");
    serde_json::to_value(NodeJson::new(node)).expect("nodes serialize")
}

// -- parameters ----------------------------------------------------------------

fn params_of<'a, T: Deserialize<'a>>(params: Option<&'a RawValue>) -> Result<T, String> {
    let raw = params.map_or("{}", RawValue::get);
    serde_json::from_str(raw).map_err(|e| format!("invalid params: {e}"))
}

fn bounded<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes; the limit is {max}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(value)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterParams<'a> {
    #[serde(borrow)]
    service_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    protocol: Option<Cow<'a, str>>,
    #[serde(borrow)]
    address: Option<Cow<'a, str>>,
    port: Option<i64>,
    #[serde(default)]
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(borrow, default)]
    env_tag: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    jwt: Option<Cow<'a, str>>,
}

/// A `service/register` whose parameters passed validation; borrow it as a
/// `Registration` for the registry.
#[derive(Debug)]
pub struct RegisterRequest<'a> {
    pub service_id: Cow<'a, str>,
    pub version: Cow<'a, str>,
    pub protocol: Cow<'a, str>,
    /// `None`: the service named none (the field missing, null, empty or
    /// unspecified), so the controller takes the socket's peer address.
    pub address: Option<String>,
    pub port: u16,
    pub env_tag: Option<Cow<'a, str>>,
    pub tags_json: String,
    pub jwt: Option<Cow<'a, str>>,
}

impl RegisterRequest<'_> {
    /// The registration at `address`: the request's own, or (when it named
    /// none) the socket's peer, and then the record says it was derived.
    pub fn registration<'b>(&'b self, address: &'b str) -> Registration<'b> {
        Registration {
            service_id: &self.service_id,
            version: &self.version,
            protocol: &self.protocol,
            address,
            port: self.port,
            env_tag: self.env_tag.as_deref(),
            tags_json: &self.tags_json,
            address_derived: self.address.is_none(),
        }
    }
}

fn valid_port(port: i64) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port must be 1..65535, not {port}"))
}

/// A concrete address: an IP that is not the unspecified address, or a
/// host name; brackets around an IPv6 address are removed, and an
/// IPv4-mapped one is unwrapped. `None` when there is none to take: empty,
/// or unspecified (`0.0.0.0`, `::`), as light-4j clients send when they
/// leave the address to the controller.
fn valid_address(address: &str) -> Result<Option<String>, String> {
    let bare = address
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(address);
    if bare.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return Ok(Some(ip.to_string()).filter(|_| !ip.is_unspecified()));
    }
    let host_ok = !bare.is_empty()
        && bare.len() <= MAX_HOST
        && !bare.starts_with(['-', '.'])
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if host_ok {
        Ok(Some(bare.to_string()))
    } else {
        Err(format!(
            "address {address:?} is neither an IP address nor a host name"
        ))
    }
}

fn tags_json(tags: Option<serde_json::Map<String, serde_json::Value>>) -> Result<String, String> {
    let tags = tags.unwrap_or_default();
    if tags.len() > MAX_TAGS {
        return Err(format!("{} tags; the limit is {MAX_TAGS}", tags.len()));
    }
    // Clients read tags as a map of strings; one registrant with other
    // values would break every snapshot that includes it.
    if let Some((key, _)) = tags.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!("tag {key:?} must have a string value"));
    }
    // serde_json's Map keeps keys sorted: this is the canonical form.
    let json = serde_json::to_string(&tags).expect("a map serializes");
    if json.len() > MAX_TAGS_JSON {
        return Err(format!(
            "tags take {} bytes; the limit is {MAX_TAGS_JSON}",
            json.len()
        ));
    }
    Ok(json)
}

pub fn register_params(params: Option<&RawValue>) -> Result<RegisterRequest<'_>, String> {
    let p: RegisterParams<'_> = params_of(params)?;
    let service_id = p.service_id.ok_or("missing serviceId")?;
    if service_id.is_empty() {
        return Err("serviceId is empty".into());
    }
    bounded("serviceId", &service_id, MAX_NAME)?;
    let address = match p.address.as_deref() {
        Some(a) => valid_address(a)?,
        None => None,
    };
    let port = valid_port(p.port.ok_or("missing port")?)?;
    let version = p.version.unwrap_or(Cow::Borrowed(""));
    bounded("version", &version, MAX_NAME)?;
    let protocol = p.protocol.unwrap_or(Cow::Borrowed(""));
    bounded("protocol", &protocol, MAX_NAME)?;
    if let Some(env) = &p.env_tag {
        bounded("envTag", env, MAX_NAME)?;
    }
    Ok(RegisterRequest {
        service_id,
        version,
        protocol,
        address,
        port,
        env_tag: p.env_tag,
        tags_json: tags_json(p.tags)?,
        jwt: p.jwt,
    })
}

#[derive(Deserialize)]
struct UpdateParams<'a> {
    #[serde(borrow, default)]
    version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    protocol: Option<Cow<'a, str>>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    tags: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug)]
pub struct UpdateRequest<'a> {
    version: Option<Cow<'a, str>>,
    protocol: Option<Cow<'a, str>>,
    port: Option<u16>,
    tags_json: Option<String>,
}

impl UpdateRequest<'_> {
    pub fn update(&self) -> MetadataUpdate<'_> {
        MetadataUpdate {
            version: self.version.as_deref(),
            protocol: self.protocol.as_deref(),
            port: self.port,
            tags_json: self.tags_json.as_deref(),
        }
    }
}

pub fn update_params(params: Option<&RawValue>) -> Result<UpdateRequest<'_>, String> {
    let p: UpdateParams<'_> = params_of(params)?;
    for (field, value) in [("version", &p.version), ("protocol", &p.protocol)] {
        if let Some(v) = value {
            bounded(field, v, MAX_NAME)?;
        }
    }
    Ok(UpdateRequest {
        port: p.port.map(valid_port).transpose()?,
        tags_json: p.tags.map(|t| tags_json(Some(t))).transpose()?,
        version: p.version,
        protocol: p.protocol,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeregisterParams<'a> {
    #[serde(borrow)]
    runtime_instance_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

pub fn deregister_params(params: Option<&RawValue>) -> Result<(Uuid, String), String> {
    let p: DeregisterParams<'_> = params_of(params)?;
    let raw = p.runtime_instance_id.ok_or("missing runtimeInstanceId")?;
    let id =
        Uuid::parse_str(&raw).map_err(|_| format!("runtimeInstanceId {raw:?} is not a UUID"))?;
    let reason = p.reason.unwrap_or(Cow::Borrowed("programmatic"));
    Ok((id, bounded("reason", &reason, 64)?.to_string()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilterParams<'a> {
    #[serde(borrow)]
    service_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    env_tag: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    protocol: Option<Cow<'a, str>>,
}

pub fn filter_params(params: Option<&RawValue>) -> Result<Filter, String> {
    let p: FilterParams<'_> = params_of(params)?;
    let service_id = p.service_id.ok_or("missing serviceId")?;
    bounded("serviceId", &service_id, MAX_NAME)?;
    let env_tag = p
        .env_tag
        .map(|e| bounded("envTag", &e, MAX_NAME).map(str::to_owned))
        .transpose()?;
    let protocol = p
        .protocol
        .map(|e| bounded("protocol", &e, MAX_NAME).map(str::to_owned))
        .transpose()?;
    Ok(Filter {
        service_id: service_id.into_owned(),
        env_tag,
        protocol,
    })
}

/// The reply to `discovery/unsubscribe`: the filter echoed.
pub fn unsubscribed(filter: &Filter) -> serde_json::Value {
    let mut v = serde_json::json!({"status": "unsubscribed", "serviceId": filter.service_id});
    if let Some(env) = &filter.env_tag {
        v["envTag"] = env.as_str().into();
    }
    if let Some(protocol) = &filter.protocol {
        v["protocol"] = protocol.as_str().into();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn register_validation() {
        let ok = register_params(Some(raw(
            r#"{"serviceId":"user","version":"1","protocol":"https","address":"[::1]","port":8443,"tags":{"b":"2","a":"1"},"envTag":"prod","jwt":"t"}"#,
        )))
        .unwrap();
        assert_eq!(
            (ok.address.as_deref(), ok.port, ok.tags_json.as_str()),
            (Some("::1"), 8443, r#"{"a":"1","b":"2"}"#)
        );
        // light-4j leaves the address to the controller: missing, null,
        // empty or unspecified all mean "take the peer's".
        for params in [
            r#"{"serviceId":"u","port":1}"#,
            r#"{"serviceId":"u","address":null,"port":1}"#,
            r#"{"serviceId":"u","address":"","port":1}"#,
            r#"{"serviceId":"u","address":"0.0.0.0","port":1}"#,
            r#"{"serviceId":"u","address":"::","port":1}"#,
            r#"{"serviceId":"u","address":"[::]","port":1}"#,
        ] {
            let req = register_params(Some(raw(params))).unwrap();
            assert_eq!(req.address, None, "{params}");
            assert!(req.registration("10.0.0.1").address_derived);
        }
        let mapped = register_params(Some(raw(
            r#"{"serviceId":"u","address":"::ffff:10.1.2.3","port":1}"#,
        )))
        .unwrap();
        assert_eq!(mapped.address.as_deref(), Some("10.1.2.3"));
        assert!(!mapped.registration("10.1.2.3").address_derived);
        let bad = [
            (
                r#"{"serviceId":"u","address":"h","port":0}"#,
                "port must be",
            ),
            (
                r#"{"serviceId":"u","address":"h","port":70000}"#,
                "port must be",
            ),
            (r#"{"address":"h","port":1}"#, "missing serviceId"),
            (r#"{"serviceId":"u","address":"h"}"#, "missing port"),
            (
                r#"{"serviceId":"u","address":"bad host!","port":1}"#,
                "neither",
            ),
            (
                r#"{"serviceId":"u","address":"h","port":"x"}"#,
                "invalid params",
            ),
            (
                r#"{"serviceId":"u","address":"h","port":1,"tags":{"n":1}}"#,
                "string value",
            ),
        ];
        for (params, why) in bad {
            let err = register_params(Some(raw(params))).unwrap_err();
            assert!(err.contains(why), "{params}: {err}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(
            Rfc3339(1_795_413_540_123).to_string(),
            "2026-11-23T05:59:00.123Z"
        );
    }
}
