//! Watching the controller as an operator would: its event stream over
//! WebSocket (`/events`) and its `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

/// One event, as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub kind: String,
    pub id: String,
    pub service: String,
}

/// Records every event of a controller's stream until dropped.
pub struct Watcher {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// `admin` is http://host:port; waits until the stream's hello.
    pub fn start(admin: &str) -> anyhow::Result<Watcher> {
        let url = format!("{}/events", admin.replace("http://", "ws://"));
        let host = admin.trim_start_matches("http://").to_string();
        let stream =
            std::net::TcpStream::connect(&host).with_context(|| format!("connect {host}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut request =
            tungstenite::client::IntoClientRequest::into_client_request(url.as_str())?;
        request
            .headers_mut()
            .insert("authorization", admin_bearer(admin)?.parse()?);
        let (mut ws, _) = tungstenite::client(request, stream).context("event stream handshake")?;
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) if t.contains("\"hello\"") => break,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => anyhow::bail!("event stream: {e}"),
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                        let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
                        s.lock().unwrap().push(Seen {
                            at: Instant::now(),
                            kind: field("kind"),
                            id: field("runtimeInstanceId"),
                            service: field("serviceId"),
                        });
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Watcher {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    pub fn events(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `Authorization` for the admin API at `admin` (http://host:port): the
/// key its controller wrote to its default file for that port.
pub fn admin_bearer(admin: &str) -> anyhow::Result<String> {
    Ok(tether::admin::access::AdminKey::for_url(admin, None)
        .map_err(anyhow::Error::msg)?
        .bearer())
}

/// An agent for the admin API at `admin` whose requests carry its key
/// (an error status is an error).
pub fn admin_agent(admin: &str, timeout: Option<Duration>) -> anyhow::Result<ureq::Agent> {
    let bearer = admin_bearer(admin)?;
    Ok(ureq::Agent::config_builder()
        .timeout_global(timeout)
        .middleware(
            move |mut req: ureq::http::Request<ureq::SendBody>,
                  next: ureq::middleware::MiddlewareNext| {
                req.headers_mut()
                    .insert("authorization", bearer.parse().expect("ASCII"));
                next.handle(req)
            },
        )
        .build()
        .into())
}

pub fn scrape(admin: &str) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    Ok(agent
        .get(&format!("{admin}/metrics"))
        .call()
        .context("GET /metrics")?
        .body_mut()
        .read_to_string()?)
}

/// Sums every sample of a metric (optionally one label set) in an exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sums the samples of a metric whose labels include `label` (e.g.
/// `reason="evicted_unadmitted"`), whatever its other labels.
pub fn metric_where(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix('{'))
                .is_some_and(|r| r.split('}').next().is_some_and(|ls| ls.contains(label)))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A histogram's cumulative buckets (le, count), sorted.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// A quantile of what a Prometheus histogram observed between two
/// scrapes, in the unit of its `le` labels (linear inside a bucket).
pub fn histogram_quantile_between(before: &str, after: &str, name: &str, q: f64) -> Option<f64> {
    let earlier = buckets(before, name);
    let later = buckets(after, name);
    let delta = later
        .iter()
        .map(|(le, count)| {
            let was = earlier.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1);
            (*le, count - was)
        })
        .collect();
    quantile_of(delta, q)
}

fn quantile_of(buckets: Vec<(f64, f64)>, q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= target {
            if le.is_infinite() {
                return Some(lower);
            }
            let share = if count > below {
                (target - below) / (count - below)
            } else {
                1.0
            };
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    None
}

/// The controller's registry, as one scrape of `/metrics` shows it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub up: f64,
    pub registered: f64,
    pub down: f64,
    pub deregistered: f64,
}

impl Sample {
    pub fn from_metrics(at: Instant, text: &str) -> Sample {
        let kind = |k: &str| {
            metric(
                text,
                &format!("tether_registry_events_total{{kind=\"{k}\"}}"),
            )
        };
        Sample {
            at,
            up: metric(text, "tether_services{status=\"up\"}"),
            registered: kind("registered"),
            down: kind("down"),
            deregistered: kind("deregistered"),
        }
    }
}

/// Scrapes a controller's `/metrics` every `every` until dropped; failed
/// scrapes (while it restarts) are skipped.
pub struct Poller {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    pub fn start(admin: &str, every: Duration) -> Poller {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, admin) = (samples.clone(), stop.clone(), admin.to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let at = Instant::now();
                if let Ok(text) = scrape(&admin) {
                    s.lock().unwrap().push(Sample::from_metrics(at, &text));
                }
                std::thread::sleep(every.saturating_sub(at.elapsed()));
            }
        });
        Poller {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn last(&self) -> Option<Sample> {
        self.samples.lock().unwrap().last().copied()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-second rates of a counter between samples, as (seconds since
/// `since`, rate) points; samples before `since` are left out.
pub fn rate_curve(
    samples: &[Sample],
    since: Instant,
    counter: impl Fn(&Sample) -> f64,
) -> Vec<(f64, f64)> {
    let kept: Vec<&Sample> = samples.iter().filter(|s| s.at >= since).collect();
    kept.windows(2)
        .filter_map(|w| {
            let dt = w[1].at.duration_since(w[0].at).as_secs_f64();
            let dv = counter(w[1]) - counter(w[0]);
            (dt > 0.0 && dv >= 0.0).then(|| (w[1].at.duration_since(since).as_secs_f64(), dv / dt))
        })
        .collect()
}

/// The highest rate of a counter over any `window` after `since`, per second.
pub fn peak_rate(
    samples: &[Sample],
    since: Instant,
    window: Duration,
    counter: impl Fn(&Sample) -> f64,
) -> f64 {
    let kept: Vec<&Sample> = samples.iter().filter(|s| s.at >= since).collect();
    let mut peak: f64 = 0.0;
    let mut j = 0;
    for i in 0..kept.len() {
        j = j.max(i);
        while j < kept.len() && kept[j].at.duration_since(kept[i].at) < window {
            j += 1;
        }
        if j == kept.len() {
            break;
        }
        let dt = kept[j].at.duration_since(kept[i].at).as_secs_f64();
        peak = peak.max((counter(kept[j]) - counter(kept[i])) / dt);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labelled_sum_takes_only_its_label() {
        let text = "tether_cut_total{shard=\"0\",reason=\"a\"} 2\ntether_cut_total{shard=\"1\",reason=\"a\"} 3\ntether_cut_total{shard=\"0\",reason=\"b\"} 7\ntether_cut_totals{reason=\"a\"} 9\n";
        assert_eq!(metric_where(text, "tether_cut_total", "reason=\"a\""), 5.0);
    }

    #[test]
    fn reads_counters_and_histogram_quantiles() {
        let text = "x_total{shard=\"0\"} 3\nx_total{shard=\"1\"} 4\nx_total_other 9\n\
                    h_bucket{le=\"0.001\"} 50\nh_bucket{le=\"0.01\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(metric(text, "x_total"), 7.0);
        assert_eq!(histogram_quantile_between("", text, "h", 0.5), Some(0.001));
        let p75 = histogram_quantile_between("", text, "h", 0.75).unwrap();
        assert!((p75 - 0.0055).abs() < 1e-9);
        let later =
            "h_bucket{le=\"0.001\"} 50\nh_bucket{le=\"0.01\"} 200\nh_bucket{le=\"+Inf\"} 200\n";
        // The 100 observed in between all fell in (0.001, 0.01].
        let p50 = histogram_quantile_between(text, later, "h", 0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
    }
}
