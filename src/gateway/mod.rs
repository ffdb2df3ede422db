//! The gateway. Today it holds only the anti-pattern the design note warns
//! against, kept so the load test can measure it: `--chained`, a stateful
//! WebSocket relay for `/ws/microservice` that terminates every service's
//! socket and opens its own to the controller (see `relay`). Services must
//! connect to the controller directly; the gateway belongs in front of
//! human admins.

pub mod relay;
