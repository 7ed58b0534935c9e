//! `cargo xtask bench`: the performance benchmarks, kept apart from the tests because
//! they need a release build, a quiet machine and minutes of run time.
//!
//! Each benchmark is a `harness = false` bench target that sets up and removes its own
//! pins, namespaces and processes, prints markdown tables and writes JSON under
//! target/bench. This command builds the release binaries, runs the benchmarks one after
//! the other, and assembles `target/bench/BENCHMARKS-latest.md` (the section
//! BENCHMARKS.md shows) and `target/bench/summary.json`, both headed by the machine they
//! ran on.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{cmd, setup};

/// The benchmarks: (name for `--only`, package, bench target, output stem).
const BENCHES: [(&str, &str, &str, &str); 5] = [
    ("kernel", "session-user", "kernel_path", "kernel"),
    ("continuity", "session-user", "continuity", "continuity"),
    ("e2e", "session-tests", "e2e", "e2e"),
    ("synflood", "session-tests", "synflood", "synflood"),
    ("ha", "session-tests", "ha_sync", "ha"),
];

/// Runs the benchmarks (all, or only the one named) and writes the combined report.
pub fn run(root: &Path, only: Option<&str>) -> Result<()> {
    if let Some(name) = only
        && !BENCHES.iter().any(|(bench, ..)| *bench == name)
    {
        anyhow::bail!(
            "no benchmark named `{name}`: choose one of {}",
            BENCHES.map(|(bench, ..)| bench).join(", ")
        );
    }
    setup::run().context("setup failed")?;
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    cmd::run(
        Command::new("cargo")
            .args(["build", "--release", "-p", "session-user"])
            .current_dir(root),
    )
    .context("building the release session binary failed: fix the errors above")?;
    let started = Instant::now();
    for (name, package, target, stem) in BENCHES {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        // Stale results from an earlier run must not be reported as this run's.
        let _ = std::fs::remove_file(out.join(format!("{stem}.json")));
        let _ = std::fs::remove_file(out.join(format!("{stem}.md")));
        println!("bench: {name}");
        cmd::run(
            Command::new("cargo")
                .args(["bench", "-p", package, "--bench", target])
                .env("SESSION_BIN", root.join("target/release/session"))
                .env(
                    "SESSION_LOADGEN",
                    root.join("target/release/session-loadgen"),
                )
                .env("SESSION_BENCH_DIR", &out)
                .stdin(std::process::Stdio::null())
                .current_dir(root),
        )
        .with_context(|| format!("benchmark `{name}` failed: see its output above"))?;
    }
    let machine = machine(root);
    let report = report(&out, &machine)?;
    let report_path = out.join("BENCHMARKS-latest.md");
    std::fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!(
        "bench: done in {:.0?}; report in {} (paste it into BENCHMARKS.md), JSON in {}",
        started.elapsed(),
        report_path.display(),
        out.join("summary.json").display()
    );
    Ok(())
}

/// What the numbers were measured on.
fn machine(root: &Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: Option<u64> = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok());
    let output = |program: &str, args: &[&str]| {
        cmd::stdout(Command::new(program).args(args).current_dir(root))
            .map(|text| text.trim().to_string())
            .ok()
    };
    json!({
        "cpu": model,
        "cpus": cpus,
        "memory_gib": mem_kib.map(|k| (k as f64 / 1_048_576.0 * 10.0).round() / 10.0),
        "kernel": output("uname", &["-r"]),
        "commit": output("git", &["rev-parse", "--short", "HEAD"]),
        "date_utc": output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        "load_average_at_end": std::fs::read_to_string("/proc/loadavg").ok()
            .and_then(|text| text.split_whitespace().next().map(str::to_string)),
    })
}

/// The markdown report and summary.json from the benchmarks' own outputs.
fn report(out: &Path, machine: &Value) -> Result<String> {
    let text = |key: &str| machine[key].as_str().unwrap_or("unknown").to_string();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured {} UTC at commit {} on {} ({} CPUs, {} GiB, Linux {}); load average {} at the end.\n",
        text("date_utc"),
        text("commit"),
        text("cpu"),
        machine["cpus"],
        machine["memory_gib"],
        text("kernel"),
        text("load_average_at_end"),
    );
    let mut summary = serde_json::Map::new();
    summary.insert("machine".into(), machine.clone());
    for (name, _, _, stem) in BENCHES {
        let md_path: PathBuf = out.join(format!("{stem}.md"));
        let json_path = out.join(format!("{stem}.json"));
        if let (Ok(section), Ok(data)) = (
            std::fs::read_to_string(&md_path),
            std::fs::read_to_string(&json_path),
        ) {
            md.push_str(&section);
            md.push('\n');
            let value: Value = serde_json::from_str(&data)
                .with_context(|| format!("{} is not valid JSON", json_path.display()))?;
            summary.insert(name.into(), value);
        }
    }
    let summary_path = out.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&Value::Object(summary)).context("encoding summary")?,
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_heads_the_sections_with_the_machine_and_skips_missing_benchmarks() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        std::fs::write(dir.join("kernel.md"), "### Kernel path\n").expect("kernel.md");
        std::fs::write(dir.join("kernel.json"), r#"{"sessions": 7}"#).expect("kernel.json");
        let machine = json!({"date_utc": "2026-01-01 00:00", "commit": "abc1234",
            "cpu": "Test CPU", "cpus": 2, "memory_gib": 1.0, "kernel": "6.18",
            "load_average_at_end": "0.10"});

        let md = report(&dir, &machine).expect("assembling the report");
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"),
        )
        .expect("summary.json is JSON");
        let _ = std::fs::remove_dir_all(&dir);

        assert!(
            md.starts_with("Measured 2026-01-01 00:00 UTC at commit abc1234 on Test CPU (2 CPUs"),
            "the machine must head the report: {md}"
        );
        assert!(md.contains("### Kernel path"), "the kernel section: {md}");
        assert_eq!(
            summary["kernel"]["sessions"], 7,
            "kernel results in the summary"
        );
        assert!(
            summary.get("e2e").is_none(),
            "a benchmark that did not run must not appear: {summary}"
        );
        assert_eq!(summary["machine"]["commit"], "abc1234");
    }
}
