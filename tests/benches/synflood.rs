//! The SYN-flood defence against a spoofed SYN flood, with and without it, in the same
//! run: a flood at the load generator's top rate from 65,536 spoofed sources against an
//! open port of fw, while a real client makes connections that each exchange a request
//! and an answer (`session_tests::syn_flood`). Per firewall configuration and round: the
//! share of real connections that succeeded, their median and 99th-percentile time
//! (connect to last byte), the flood's sessions in the table and the flood's rate. The
//! ratios compare the defence with the same firewall without it.

use serde_json::{Value, json};
use session_testkit::bench;
use session_tests::syn_flood::{ALWAYS, FloodRun, flood_run};

/// Rounds per configuration: each floods for at most 8 s.
const ROUNDS: usize = 3;
/// Real connection attempts per round.
const ATTEMPTS: usize = 300;

/// The value at quantile `q` of `samples` (nearest rank).
fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One configuration's figures over its rounds: success %, median and p99 exchange µs
/// over all successful exchanges, most flood sessions seen, median flood pps.
fn summary(runs: &[FloodRun]) -> [f64; 5] {
    let attempts: usize = runs.iter().map(|run| run.attempts).sum();
    let succeeded: usize = runs.iter().map(|run| run.succeeded).sum();
    let times: Vec<f64> = runs
        .iter()
        .flat_map(|run| run.exchange_us.clone())
        .collect();
    let pps: Vec<f64> = runs.iter().map(|run| run.pps).collect();
    [
        100.0 * succeeded as f64 / attempts.max(1) as f64,
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        runs.iter().map(|run| run.flood_sessions).max().unwrap_or(0) as f64,
        quantile(&pps, 0.5),
    ]
}

fn main() {
    if bench::only_listing() {
        return;
    }
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..ROUNDS {
        eprintln!(
            "synflood: round {} of {ROUNDS}: with the defence",
            round + 1
        );
        with.push(flood_run("bsynd", ALWAYS, ATTEMPTS));
        eprintln!("synflood: round {} of {ROUNDS}: without", round + 1);
        without.push(flood_run("bsyn0", "", ATTEMPTS));
    }
    let (on, off) = (summary(&with), summary(&without));
    let mut md = format!(
        "### SYN flood against an open port (`[syn_defence]`)\n\n\
         {ROUNDS} rounds per configuration; each floods fw's open port from 65,536 spoofed \
         sources at the load generator's top rate (at most 8 s) while a client makes \
         {ATTEMPTS} connections that each exchange a request and an answer. Times are \
         connect to last byte over every successful connection.\n\n\
         | firewall | real connections ok | median ms | p99 ms | flood sessions in the table | flood pps |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    for (name, row) in [
        ("session, `[syn_defence]`", on),
        ("session, no defence", off),
    ] {
        md.push_str(&format!(
            "| {name} | {:.1}% | {:.2} | {:.2} | {:.0} | {:.0} |\n",
            row[0],
            row[1] / 1e3,
            row[2] / 1e3,
            row[3],
            row[4]
        ));
    }
    let ratios = json!({
        "success_with_over_without": on[0] / off[0].max(f64::MIN_POSITIVE),
        "median_time_with_over_without": on[1] / off[1],
        "p99_time_with_over_without": on[2] / off[2],
        "flood_sessions_with": on[3],
        "flood_sessions_without": off[3],
    });
    md.push_str(&format!(
        "\nWith the defence over without: real connections ok {:.3}×, median time {:.2}×, \
         p99 {:.2}×; flood sessions {:.0} against {:.0}.\n",
        on[0] / off[0].max(f64::MIN_POSITIVE),
        on[1] / off[1],
        on[2] / off[2],
        on[3],
        off[3]
    ));
    print!("{md}");
    let row = |figures: [f64; 5]| -> Value {
        json!({"success_percent": figures[0], "median_us": figures[1], "p99_us": figures[2],
            "flood_sessions": figures[3], "flood_pps": figures[4]})
    };
    let doc = json!({"rounds": ROUNDS, "attempts": ATTEMPTS,
        "with_defence": row(on), "without_defence": row(off), "ratios": ratios});
    let dir = bench::out_dir();
    std::fs::create_dir_all(&dir).expect("creating the bench output directory");
    std::fs::write(dir.join("synflood.md"), &md).expect("writing synflood.md");
    std::fs::write(
        dir.join("synflood.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("writing synflood.json");
    println!("\nwritten: {}", dir.join("synflood.json").display());
}
