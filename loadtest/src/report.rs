//! What every scenario writes into `--out DIR`: `results.json` (every
//! figure, with the tether version, kernel and configuration),
//! `report.md` (the same as tables) and the SVG plots.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub use tether::results::Meta;

/// When this process began its run (set first thing in `main`).
static STARTED: std::sync::OnceLock<(std::time::SystemTime, std::time::Instant)> =
    std::sync::OnceLock::new();

/// Marks the start of the run, for `Meta`'s `started` and `seconds`.
pub fn mark_start() {
    STARTED.get_or_init(|| (std::time::SystemTime::now(), std::time::Instant::now()));
}

/// The tether version, kernel, cores, start and wall time of this run.
pub fn meta(tether: &Path) -> Meta {
    mark_start();
    let started = *STARTED.get().expect("marked");
    let version = std::process::Command::new(tether)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Meta {
        tether_version: version,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        started: humantime::format_rfc3339_seconds(started.0).to_string(),
        seconds: started.1.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    }
}

/// One table of the report.
pub struct Section {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(title: &str, header: &[&str]) -> Section {
        Section {
            title: title.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

pub struct Report {
    pub scenario: String,
    pub meta: Meta,
    pub config: serde_json::Value,
    pub results: serde_json::Value,
    pub sections: Vec<Section>,
    /// SVG files in the output directory.
    pub plots: Vec<(String, String)>,
}

impl Report {
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let json = serde_json::json!({
            "scenario": self.scenario,
            "meta": self.meta,
            "config": self.config,
            "results": self.results,
            "plots": self.plots.iter().map(|(file, _)| file).collect::<Vec<_>>(),
        });
        std::fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        std::fs::write(out.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = format!("# tether load test: {}\n\n", self.scenario);
        md.push_str(&format!(
            "`{}`  \n{}, Linux {}, {} cores, started {}, took {:.0} s\n\n",
            self.meta.command,
            self.meta.tether_version,
            self.meta.kernel,
            self.meta.cores,
            self.meta.started,
            self.meta.seconds
        ));
        for s in &self.sections {
            md.push_str(&format!(
                "## {}\n\n| {} |\n|{}|\n",
                s.title,
                s.header.join(" | "),
                vec!["---"; s.header.len()].join("|")
            ));
            for row in &s.rows {
                md.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            md.push('\n');
            for n in &s.notes {
                md.push_str(&format!("{n}\n\n"));
            }
        }
        for (file, caption) in &self.plots {
            md.push_str(&format!("![{caption}]({file})\n\n"));
        }
        md
    }

    pub fn print(&self) {
        println!("{}", self.markdown());
    }
}

pub fn out_dir(out: &Option<PathBuf>, scenario: &str) -> PathBuf {
    out.clone()
        .unwrap_or_else(|| PathBuf::from(format!("loadtest-out/{scenario}")))
}

/// Numbers as a report shows them.
pub fn n(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 100.0 || v == v.trunc() {
        format!("{:.0}", v)
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An optional figure as a report shows it.
pub fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), n)
}
