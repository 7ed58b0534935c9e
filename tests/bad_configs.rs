//! The hostile config corpus in tests/bad-configs: syntax errors, wrong types, bad CIDRs,
//! impossible port ranges, empty and undefined sets, duplicate names, unknown keys, huge
//! lists, too many rules for the maps, deep nesting, a NUL byte. Each file starts with
//! `# expect: line N: TEXT` (or `line *` where the line depends on the map size).
//!
//! Every file must be refused by `session check` and by `session reload` with
//! `FILE:LINE:COL: message` at the expected line, and a daemon that is asked to reload each
//! of them in turn (and once by SIGHUP) must keep its policy, its generation and its
//! traffic exactly as they were.

use std::path::{Path, PathBuf};
use std::time::Duration;

use session_tests::{Family, Lab, Side, WEB_POLICY, counter, describe};

/// One corpus file and what it must be refused for.
struct Case {
    path: PathBuf,
    /// The line the error must point at, when it does not depend on the build.
    line: Option<usize>,
    /// Text the message must contain.
    says: String,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bad-configs");
    let mut cases: Vec<Case> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a corpus file");
            let header = String::from_utf8_lossy(&bytes)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let rest = header
                .strip_prefix("# expect: line ")
                .unwrap_or_else(|| panic!("{}: no `# expect: line` header", path.display()));
            let (line, says) = rest
                .split_once(": ")
                .unwrap_or_else(|| panic!("{}: malformed header {header:?}", path.display()));
            Case {
                line: (line != "*").then(|| line.parse().unwrap_or_else(|_| panic!("{header:?}"))),
                says: says.to_string(),
                path,
            }
        })
        .collect();
    cases.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(
        cases.len() >= 30,
        "the corpus has only {} files",
        cases.len()
    );
    cases
}

/// Checks that `stderr` reports `case` as `FILE:LINE:COL: message`.
fn assert_located(stderr: &str, file: &Path, case: &Case) {
    let prefix = format!("{}:", file.display());
    let located = stderr
        .lines()
        .find_map(|line| line.split_once(&prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "{}: no `{prefix}LINE:COL` in:\n{stderr}",
                case.path.display()
            )
        });
    let mut parts = located.splitn(3, ':');
    let line: usize = parts
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("{}: no line number in {located:?}", case.path.display()));
    let column_ok = parts.next().is_some_and(|c| c.parse::<usize>().is_ok());
    let message = parts.next().unwrap_or_default().trim();
    assert!(
        column_ok,
        "{}: no column in {located:?}",
        case.path.display()
    );
    if let Some(expected) = case.line {
        assert_eq!(line, expected, "{}: {located}", case.path.display());
    }
    assert!(
        message.contains(&case.says),
        "{}: expected {:?} in {message:?}",
        case.path.display(),
        case.says
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn every_hostile_config_is_refused_where_it_is_wrong_and_changes_nothing() {
    let cases = corpus();
    let lab = Lab::new("badcfg");
    let daemon = lab.daemon(WEB_POLICY);
    let (client, fw) = (Family::V4.addr(Side::Client), Family::V4.addr(Side::Fw));
    let _web = lab.tcp_listen(Side::Fw, Family::V4, 8080);
    let _other = lab.tcp_listen(Side::Fw, Family::V4, 8081);
    let generation_before = daemon.cli(&["reload"]);
    let before = daemon.stats_json();

    for case in &cases {
        let check = lab.session_as(&[], &["check", &case.path.to_string_lossy()]);
        assert_eq!(
            check.status.code(),
            Some(1),
            "{}: `session check` did not refuse it: {}",
            case.path.display(),
            describe(&check)
        );
        assert_located(&String::from_utf8_lossy(&check.stderr), &case.path, case);

        let bytes = std::fs::read(&case.path).expect("a corpus file");
        std::fs::write(lab.config_path(), bytes).expect("writing the daemon's config");
        let reload = daemon.cli_output(&["reload"]);
        assert_eq!(
            reload.status.code(),
            Some(1),
            "{}: `session reload` accepted it: {}",
            case.path.display(),
            describe(&reload)
        );
        assert_located(
            &String::from_utf8_lossy(&reload.stderr),
            &lab.config_path(),
            case,
        );
    }

    // SIGHUP reads the file without the CLI's check: the daemon refuses it itself.
    let mut daemon = daemon;
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("reload refused", Duration::from_secs(5));
    daemon.assert_running();

    let after = daemon.stats_json();
    assert_eq!(
        counter(&after, "policy_applies"),
        counter(&before, "policy_applies"),
        "a bad config was applied"
    );
    let to = |port| Family::V4.sock(Side::Fw, port);
    let allowed = lab.tcp_connect(Side::Client, to(8080), Duration::from_secs(3));
    assert!(
        allowed.is_ok(),
        "the policy no longer admits web: {allowed:?}"
    );
    let blocked = lab.tcp_connect(Side::Client, to(8081), Duration::from_millis(800));
    assert!(blocked.is_err(), "the policy no longer blocks 8081");
    daemon.wait_session("tcp", client, fw, 8080, "ESTABLISHED");

    std::fs::write(lab.config_path(), WEB_POLICY).expect("restoring the config");
    let generation_after = daemon.cli(&["reload"]);
    let number = |text: &str| {
        text.split_whitespace()
            .filter_map(|word| word.parse::<u64>().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no generation in {text:?}"))
    };
    assert_eq!(
        number(&generation_after),
        number(&generation_before) + 1,
        "{} bad reloads changed the policy generation",
        cases.len()
    );
}
