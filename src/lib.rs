//! tether: a control plane that holds one direct WebSocket per service.
//!
//! `engine` accepts and frames connections and knows nothing of JSON;
//! `registry` is the pure data model (instances, discovery, events);
//! `controller` glues the two with the JSON-RPC protocol; `agent` is the
//! client side (SDK and load-test swarm); `relay` is the chained proxy the
//! load test measures against the direct path (never on a real path).

pub mod admin;
pub mod agent;
pub mod cluster;
pub mod controller;
pub mod engine;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod jsonrpc;
pub mod jwt;
pub mod metrics;
pub mod plan;
pub mod registry;
pub mod relay;
pub mod results;
