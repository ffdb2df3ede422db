//! `tether status` and `tether services`: the admin API as tables.

use anyhow::{Context, bail};
use serde_json::Value;

fn get(base: &str, path_and_query: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path_and_query}", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .with_context(|| format!("cannot reach the admin API at {url}"))?;
    let status = response.status();
    let body = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        bail!("{url}: HTTP {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn status(admin: &str, json: bool) -> anyhow::Result<()> {
    let s = get(admin, "/summary?top=20")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "instances {} (up {}, down {}), {} distinct services, {} commands in flight, {} event subscribers",
        s["total"],
        s["byStatus"]["up"],
        s["byStatus"]["down"],
        s["distinctServices"],
        s["commandsInFlight"],
        s["eventSubscribers"]
    );
    println!(
        "\n{:<6} {:>12} {:>10} {:>10}",
        "SHARD", "CONNECTIONS", "UPGRADED", "ADMITTED"
    );
    for shard in s["shards"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:>12} {:>10} {:>10}",
            shard["shard"], shard["connections"], shard["upgraded"], shard["admitted"]
        );
    }
    println!("\n{:<40} {:>8}", "SERVICE", "UP");
    for service in s["byService"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>8}",
            service["serviceId"].as_str().unwrap_or(""),
            service["up"]
        );
    }
    Ok(())
}

pub struct ServicesQuery {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<String>,
    pub q: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

pub fn services(admin: &str, query: &ServicesQuery, json: bool) -> anyhow::Result<()> {
    let mut path = format!("/services?limit={}", query.limit);
    for (key, value) in [
        ("serviceId", &query.service_id),
        ("envTag", &query.env_tag),
        ("status", &query.status),
        ("q", &query.q),
        ("cursor", &query.cursor),
    ] {
        if let Some(v) = value {
            path.push_str(&format!("&{key}={}", encode(v)));
        }
    }
    let page = get(admin, &path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<24} {:<6} {:<8} {:<22} {:<5} {:<4}",
        "RUNTIME INSTANCE", "SERVICE", "ENV", "STATUS", "ADDRESS", "SHARD", ""
    );
    for i in page["items"].as_array().into_iter().flatten() {
        let s = |k: &str| i[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<36}  {:<24} {:<6} {:<8} {:<22} {:<5}",
            s("runtimeInstanceId"),
            s("serviceId"),
            s("environment"),
            s("status"),
            format!("{}:{}", s("address"), i["port"]),
            i["shard"]
        );
    }
    let shown = page["items"].as_array().map_or(0, Vec::len);
    match page["nextCursor"].as_str() {
        Some(next) => println!(
            "\n{shown} of {} shown; next page: --cursor {next}",
            page["total"]
        ),
        None => println!("\n{shown} of {} shown", page["total"]),
    }
    Ok(())
}
