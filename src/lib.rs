//! tether: a control plane that holds one direct WebSocket per service.
//!
//! `engine` accepts and frames connections and knows nothing of JSON;
//! `registry` is the pure data model (instances, discovery, events);
//! `controller` glues the two with the JSON-RPC protocol; `agent` is the
//! client side (SDK and load-test swarm).

pub mod admin;
pub mod agent;
pub mod controller;
pub mod engine;
pub mod gateway;
pub mod metrics;
pub mod plan;
pub mod registry;
