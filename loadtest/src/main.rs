//! tether-loadtest: the harness that runs the controller, the gateway and
//! swarms of simulated services on loopback and reports what each topology
//! costs. The scenarios land with the load-test issue; until then this
//! binary only says so, so nobody mistakes it for a measurement.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "no scenario is implemented yet; measure the controller with \
         `tether measure` (see README.md)"
    )
}
