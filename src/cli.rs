//! `tether status` and `tether services`: the admin API as tables.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

use tether::admin::access::AdminKey;

/// An admin API and the key to call it with.
pub struct AdminClient {
    base: String,
    key: AdminKey,
    agent: ureq::Agent,
}

impl AdminClient {
    /// The key comes from `key_file`, else from the controller's default
    /// file for the URL's port; an https:// API is trusted by `ca`'s
    /// certificates, else by the web's.
    pub fn new(
        base: &str,
        key_file: Option<&Path>,
        ca: Option<&Path>,
    ) -> anyhow::Result<AdminClient> {
        let mut config = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<_>>();
            anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", ca.display());
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            key: AdminKey::for_url(base, key_file).map_err(anyhow::Error::msg)?,
            agent: config.build().into(),
        })
    }
}

fn get(admin: &AdminClient, path_and_query: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path_and_query}", admin.base);
    let mut response = admin
        .agent
        .get(&url)
        .header("authorization", &admin.key.bearer())
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

/// One cell: a string without its quotes, a number as it is, null empty.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A bordered table, as `etcdctl -w table` prints: every column as wide
/// as its widest cell, numbers to the right, text to the left.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            rows.iter().all(|r| {
                r.get(i)
                    .is_none_or(|c| c.is_empty() || c.parse::<f64>().is_ok())
            })
        })
        .collect();
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .chain(["+\n".to_string()])
        .collect();
    let line = |cells: &[String], align: bool| -> String {
        let mut out = String::new();
        for (i, w) in widths.iter().enumerate() {
            let c = cells.get(i).map_or("", String::as_str);
            let pad = " ".repeat(w - c.chars().count());
            if align && numeric[i] {
                out.push_str(&format!("| {pad}{c} "));
            } else {
                out.push_str(&format!("| {c}{pad} "));
            }
        }
        out + "|\n"
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = rule.clone() + &line(&header, false) + &rule;
    for row in rows {
        out.push_str(&line(row, true));
    }
    out + &rule
}

pub fn status(admin: &AdminClient, json: bool) -> anyhow::Result<()> {
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
    let shards: Vec<Vec<String>> = s["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|shard| {
            ["shard", "connections", "upgraded", "admitted"]
                .iter()
                .map(|k| cell(&shard[k]))
                .collect()
        })
        .collect();
    print!(
        "\n{}",
        table(&["SHARD", "CONNECTIONS", "UPGRADED", "ADMITTED"], &shards)
    );
    let services: Vec<Vec<String>> = s["byService"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|service| vec![cell(&service["serviceId"]), cell(&service["up"])])
        .collect();
    print!("\n{}", table(&["SERVICE", "UP"], &services));
    Ok(())
}

pub struct ServicesQuery {
    pub service_id: Option<String>,
    pub env_tag: Option<String>,
    pub status: Option<String>,
    pub q: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
    pub sort: Option<String>,
}

pub fn services(admin: &AdminClient, query: &ServicesQuery, json: bool) -> anyhow::Result<()> {
    let mut path = format!("/services?limit={}", query.limit);
    for (key, value) in [
        ("serviceId", &query.service_id),
        ("envTag", &query.env_tag),
        ("status", &query.status),
        ("q", &query.q),
        ("cursor", &query.cursor),
        ("sort", &query.sort),
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
    let rows: Vec<Vec<String>> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                cell(&i["runtimeInstanceId"]),
                cell(&i["serviceId"]),
                cell(&i["environment"]),
                cell(&i["status"]),
                format!("{}:{}", cell(&i["address"]), cell(&i["port"])),
                cell(&i["shard"]),
                match i["rttMs"].as_f64() {
                    Some(ms) => format!("{ms:.2} ms"),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let header = [
        "RUNTIME INSTANCE",
        "SERVICE",
        "ENV",
        "STATUS",
        "ADDRESS",
        "SHARD",
        "RTT",
    ];
    print!("{}", table(&header, &rows));
    let shown = page["items"].as_array().map_or(0, Vec::len);
    match page["nextCursor"].as_str() {
        Some(next) => println!(
            "\n{shown} of {} shown; next page: --cursor {next}{}",
            page["total"],
            match &query.sort {
                Some(sort) => format!(" --sort={sort}"),
                None => String::new(),
            }
        ),
        None => println!("\n{shown} of {} shown", page["total"]),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn tables_line_up_like_etcdctl() {
        let rows = vec![
            vec!["0".to_string(), "1002".to_string(), "billing".to_string()],
            vec![
                "15".to_string(),
                "7".to_string(),
                "a-much-longer-service".to_string(),
            ],
        ];
        let text = table(&["SHARD", "CONNECTIONS", "SERVICE"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        let bars = |l: &str| {
            l.match_indices(['|', '+'])
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        for l in &lines {
            assert_eq!(bars(l), bars(lines[0]), "column edges differ:\n{text}");
        }
        assert!(
            lines[3].contains("|     0 |        1002 | billing "),
            "{text}"
        );
        assert!(
            lines[1].starts_with("| SHARD | CONNECTIONS | SERVICE "),
            "{text}"
        );
    }
}
