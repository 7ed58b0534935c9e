//! The results of one kernel's run, read from the lines the checks print, and the matrix
//! kernel × check that `vm-test` prints at the end.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use super::rootfs;

/// The line a program's verified instruction count is printed on (by the `verifier`
/// test of session-user): `SESSION-INSNS <program> <count>`.
pub const INSNS_MARK: &str = "SESSION-INSNS";

/// The marks a line of the console may hold.
const MARKS: &[&str] = &[
    rootfs::BOOTED_MARK,
    rootfs::RESULT_MARK,
    rootfs::DONE_MARK,
    INSNS_MARK,
    rootfs::MODULE_FAILED_MARK,
    rootfs::PROGRESS_MARK,
];

/// `line` from its mark on: the firmware's terminal escapes can precede the first line
/// the guest prints. Output lines of a failed check (prefixed) are left as they are.
pub fn unprefixed(line: &str) -> &str {
    if line.starts_with(rootfs::OUTPUT_PREFIX) {
        return line;
    }
    MARKS
        .iter()
        .find_map(|mark| line.find(mark).map(|at| &line[at..]))
        .unwrap_or(line)
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// Whether it exited 0.
    pub passed: bool,
    /// How long it ran.
    pub secs: f64,
}

/// One kernel's column of the matrix.
#[derive(Debug, Default)]
pub struct Run {
    /// The kernel's name in the matrix (`6.1`, `host`, ...).
    pub kernel: String,
    /// The release the guest reported, or `uname -r` on the host.
    pub release: Option<String>,
    /// The checks that reported, in order.
    pub results: Vec<CheckResult>,
    /// Verified instructions per program.
    pub insns: BTreeMap<String, u32>,
    /// Why the run as a whole failed (did not boot, timed out, a check never reported).
    pub problems: Vec<String>,
    /// Wall time of the whole run (boot included).
    pub took: Duration,
}

impl Run {
    /// Whether every expected check passed and nothing else went wrong.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.results.iter().all(|r| r.passed)
    }

    /// Reads the result lines of `console` for the `expected` checks.
    pub fn from_console(kernel: &str, console: &[String], expected: &[&str]) -> Run {
        let mut run = Run {
            kernel: kernel.to_string(),
            ..Run::default()
        };
        let mut done = false;
        for line in console {
            let mut words = unprefixed(line).split_whitespace();
            match words.next() {
                Some(rootfs::BOOTED_MARK) => run.release = words.next().map(str::to_string),
                Some(rootfs::DONE_MARK) => done = true,
                Some(INSNS_MARK) => run.add_insns(words.next(), words.next()),
                Some(rootfs::RESULT_MARK) => {
                    let fields: Vec<&str> = words.collect();
                    if let [name, rc, start, end] = fields[..] {
                        let secs = match (start.parse::<f64>(), end.parse::<f64>()) {
                            (Ok(start), Ok(end)) => end - start,
                            _ => 0.0,
                        };
                        run.results.push(CheckResult {
                            name: name.to_string(),
                            passed: rc == "0",
                            secs,
                        });
                    }
                }
                Some(rootfs::MODULE_FAILED_MARK) => {
                    run.problems.push(format!("insmod failed: {line}"))
                }
                _ => {}
            }
        }
        if run.release.is_none() {
            run.problems
                .push("the guest never finished booting".to_string());
        }
        for name in expected {
            if !run.results.iter().any(|r| r.name == *name) {
                run.problems.push(format!("check {name} never reported"));
            }
        }
        if run.release.is_some() && !done {
            run.problems
                .push("the guest did not finish its checks".to_string());
        }
        run
    }

    /// Records a `SESSION-INSNS` line's program and count.
    pub fn add_insns(&mut self, program: Option<&str>, count: Option<&str>) {
        if let (Some(program), Some(Ok(count))) = (program, count.map(str::parse::<u32>)) {
            self.insns.insert(program.to_string(), count);
        }
    }
}

/// The matrix: one row per check and per program's instruction count, one column per kernel.
pub fn render(runs: &[Run]) -> String {
    let mut rows: Vec<String> = Vec::new();
    for run in runs {
        for result in &run.results {
            if !rows.contains(&result.name) {
                rows.push(result.name.clone());
            }
        }
    }
    let mut programs: Vec<&String> = runs.iter().flat_map(|r| r.insns.keys()).collect();
    programs.sort();
    programs.dedup();
    let width = rows
        .iter()
        .map(String::len)
        .chain(programs.iter().map(|p| p.len() + 7))
        .max()
        .unwrap_or(5)
        .max(12);
    let cell = runs
        .iter()
        .filter_map(|r| r.release.as_deref())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(16);
    let mut out = String::new();
    let _ = write!(out, "{:width$}", "check");
    for run in runs {
        let _ = write!(out, " | {:>cell$}", run.kernel);
    }
    out.push('\n');
    let _ = write!(out, "{:width$}", "release");
    for run in runs {
        let _ = write!(out, " | {:>cell$}", run.release.as_deref().unwrap_or("-"));
    }
    out.push('\n');
    for row in &rows {
        let _ = write!(out, "{row:width$}");
        for run in runs {
            let text = match run.results.iter().find(|r| &r.name == row) {
                Some(r) => format!("{} {:.0}s", if r.passed { "pass" } else { "FAIL" }, r.secs),
                None => "missing".to_string(),
            };
            let _ = write!(out, " | {text:>cell$}");
        }
        out.push('\n');
    }
    for program in programs {
        let _ = write!(out, "{:width$}", format!("insns: {program}"));
        for run in runs {
            let text = run
                .insns
                .get(program)
                .map_or_else(|| "-".to_string(), u32::to_string);
            let _ = write!(out, " | {text:>cell$}");
        }
        out.push('\n');
    }
    let _ = write!(out, "{:width$}", "run time");
    for run in runs {
        let _ = write!(out, " | {:>w$}s", run.took.as_secs(), w = cell - 1);
    }
    out.push('\n');
    let _ = write!(out, "{:width$}", "result");
    for run in runs {
        let _ = write!(
            out,
            " | {:>cell$}",
            if run.passed() { "PASS" } else { "FAIL" }
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn a_full_run_parses_and_passes() {
        let run = Run::from_console(
            "6.1",
            &console(&[
                "noise",
                "\u{1b}[?7l\u{1b}[2JSESSION-VM-BOOTED 6.1.0-57-cloud-amd64 2.51",
                "SESSION-INSNS session_ingress 12345",
                "SESSION-VM-RESULT verify 0 3.00 10.50",
                "SESSION-VM-RESULT smoke 0 10.50 20.00",
                "SESSION-VM-DONE",
            ]),
            &["verify", "smoke"],
        );
        assert!(run.passed(), "{:?}", run.problems);
        assert_eq!(run.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(run.insns["session_ingress"], 12345);
        assert!((run.results[0].secs - 7.5).abs() < 1e-9, "duration");
    }

    #[test]
    fn a_failed_check_or_a_missing_one_fails_the_run() {
        let failed = Run::from_console(
            "6.1",
            &console(&[
                "SESSION-VM-BOOTED 6.1.0 1.0",
                "SESSION-VM-RESULT verify 1 1.0 2.0",
                "SESSION-VM-DONE",
            ]),
            &["verify"],
        );
        assert!(!failed.passed(), "exit code 1");
        let cut = Run::from_console(
            "6.1",
            &console(&[
                "SESSION-VM-BOOTED 6.1.0 1.0",
                "SESSION-VM-RESULT verify 0 1.0 2.0",
            ]),
            &["verify", "smoke"],
        );
        assert!(!cut.passed(), "smoke never reported, no DONE");
        let dead = Run::from_console("6.1", &console(&["Kernel panic"]), &[]);
        assert!(!dead.passed(), "never booted");
    }

    #[test]
    fn the_matrix_has_a_cell_per_kernel_and_check() {
        let mut a = Run::from_console(
            "6.1",
            &console(&[
                "SESSION-VM-BOOTED 6.1.0 1.0",
                "SESSION-INSNS session_egress 99",
                "SESSION-VM-RESULT verify 0 1.0 2.0",
                "SESSION-VM-DONE",
            ]),
            &["verify"],
        );
        a.took = Duration::from_secs(42);
        let text = render(&[a]);
        assert!(text.contains("verify"), "{text}");
        assert!(text.contains("pass 1s"), "{text}");
        assert!(text.contains("insns: session_egress"), "{text}");
        assert!(text.contains("99"), "{text}");
        assert!(text.contains("PASS"), "{text}");
    }
}
