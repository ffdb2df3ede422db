//! Thousands of real connections: the swarm against a 4-shard controller.

mod common;

use std::time::Duration;

use common::*;
use tether::agent::parse_source_ips;
use tether::agent::swarm::{Swarm, SwarmConfig};
use tether::metrics;
use tether::registry::Filter;

#[test]
fn five_thousand_swarm_services_across_four_shards_all_visible_in_one_lookup() {
    let ctl = controller(4);
    let url = format!("ws://{}/ws/microservice", ctl.local_addr())
        .parse()
        .unwrap();
    let mut config = SwarmConfig::new(url, 5_000);
    config.service_id = "swarm".into();
    config.sources = parse_source_ips("127.0.0.2-127.0.0.5").unwrap();
    config.run_for = Some(Duration::from_secs(120));
    let swarm = Swarm::start(config).unwrap();
    assert!(
        swarm.wait_registered(5_000, Duration::from_secs(90)),
        "registered {} of 5000",
        swarm.registered()
    );

    let snapshot = ctl.lookup(&Filter {
        service_id: "swarm".into(),
        env_tag: Some("prod".into()),
        protocol: None,
    });
    assert_eq!(snapshot.nodes.len(), 5_000);
    assert!(!snapshot.truncated);
    let mut ids: Vec<_> = snapshot
        .nodes
        .iter()
        .map(|n| n.runtime_instance_id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5_000, "every instance is distinct");

    // SO_REUSEPORT spread the connections over every shard.
    for (shard, stats) in ctl.stats().iter().enumerate() {
        let held = metrics::read(&stats.open_admitted);
        assert!(held > 500, "shard {shard} holds {held}");
    }
    assert_eq!(metrics::total(ctl.stats(), |s| &s.open_admitted), 5_000);

    // The same lookup over the wire.
    let mut c = Client::connect(ctl.local_addr(), "/ws/discovery");
    let reply = c.call(
        "discovery/lookup",
        serde_json::json!({"serviceId": "swarm"}),
    );
    assert_eq!(reply["result"]["nodes"].as_array().unwrap().len(), 5_000);

    swarm.stop();
    eventually("all gone after the swarm stops", || ctl.counts().up == 0);
}
