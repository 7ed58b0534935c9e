//! Named sets end to end, through the real daemon and the `session set` commands: a
//! blocklist read from a file drops its members' new connections; `session set add` and
//! `delete` change that for the next connection without a reload; a replace from a file
//! with a bad line is refused with FILE:LINE and changes nothing; a reload re-reads the
//! set's file (dropping live changes), and a bad line there refuses the reload.

use std::{path::Path, time::Duration};

use serde_json::Value;
use session_testkit::{accept_new_rule, inbound_drop_policy, return_traffic_rule};
use session_tests::{Family, Lab, Side, counter, describe};

fn policy(set_file: &Path) -> String {
    format!(
        concat!(
            inbound_drop_policy!(),
            r#"
[sets]
block = {{ file = "{}" }}
"#,
            return_traffic_rule!("return-traffic"),
            r#"
[[rule]]
name = "blocklist"
state = ["new"]
src = ["@block"]
action = "drop"
"#,
            accept_new_rule!("web", "tcp", 8080),
        ),
        set_file.display()
    )
}

/// The set's prefixes as `session set show` prints them, sorted.
fn shown(daemon: &session_tests::Daemon<'_>) -> Vec<String> {
    let mut lines: Vec<String> = daemon
        .cli(&["set", "show", "block"])
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn sets_block_from_a_file_change_live_and_refuse_bad_files_with_file_and_line() {
    let lab = Lab::new("sets");
    let client = Family::V4.addr(Side::Client);
    let set_file = lab.scratch_path("block.txt");
    std::fs::write(
        &set_file,
        "# blocklist\n198.18.200.0/24\n2001:2:0:99::/64  # not the client\n",
    )
    .expect("writing the set file");
    let daemon = lab.daemon(&policy(&set_file));
    let _listener = lab.tcp_listen(Side::Fw, Family::V4, 8080);
    let web = Family::V4.sock(Side::Fw, 8080);
    let connects = |wait: Duration| lab.tcp_connect(Side::Client, web, wait).is_ok();
    assert!(
        connects(Duration::from_secs(3)),
        "the client is not in the set"
    );

    let list: Value = serde_json::from_str(&daemon.cli(&["set", "list", "--json"]))
        .expect("set list --json is JSON");
    assert_eq!(list[0]["name"], "block", "{list}");
    assert_eq!(list[0]["entries"], 2, "{list}");

    let before = daemon.stats_json();
    daemon.cli(&["set", "add", "block", client]);
    assert!(
        !connects(Duration::from_millis(800)),
        "the next connection after `set add` must be dropped"
    );
    assert_eq!(
        counter(&daemon.stats_json(), "set_changes") - counter(&before, "set_changes"),
        1
    );
    daemon.wait_log("set block changed", Duration::from_secs(5));

    daemon.cli(&["set", "delete", "block", client]);
    assert!(
        connects(Duration::from_secs(3)),
        "the next connection after `set delete` must pass"
    );

    // A replacement file with a bad line is refused with its file and line, and the set
    // keeps what it held.
    let bad = lab.scratch_path("bad.txt");
    std::fs::write(&bad, format!("{client}\n198.18.0.0/33\n")).expect("writing the bad file");
    let shown_before = shown(&daemon);
    let refused = daemon.cli_output(&["set", "replace", "block", &bad.to_string_lossy()]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("{}:2: ", bad.display())),
        "the error must name the file and line: {stderr}"
    );
    assert_eq!(shown(&daemon), shown_before);
    assert!(
        connects(Duration::from_secs(3)),
        "the bad file changed the set"
    );

    // A good replacement takes effect at once; a reload re-reads the configured file,
    // dropping it.
    let good = lab.scratch_path("good.txt");
    std::fs::write(&good, format!("{client}\n198.18.201.0/24\n")).expect("writing the file");
    daemon.cli(&["set", "replace", "block", &good.to_string_lossy()]);
    assert!(
        !connects(Duration::from_millis(800)),
        "replaced set must drop the client"
    );
    daemon.cli(&["reload"]);
    assert!(
        connects(Duration::from_secs(3)),
        "a reload re-reads the set's file, which does not hold the client"
    );
    assert_eq!(shown(&daemon), shown_before);

    // A bad line in the configured set file refuses the reload with file:line.
    std::fs::write(&set_file, "198.18.200.0/24\nnonsense\n").expect("breaking the set file");
    let reload = daemon.cli_output(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", describe(&reload));
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert!(
        stderr.contains(&format!("{}:2: ", set_file.display())),
        "the refused reload must name the set file and line: {stderr}"
    );
    assert_eq!(shown(&daemon), shown_before);
}

/// `count` (at most 65,536) distinct /32s of `prefix`.0.0/16, one a line.
fn host_lines(prefix: &str, count: u32) -> String {
    (0..count)
        .map(|i| format!("{prefix}.{}.{}\n", i / 256, i % 256))
        .collect()
}

#[test]
fn a_set_replace_racing_a_reload_leaves_one_whole_set() {
    let lab = Lab::new("setrace");
    let configured = lab.scratch_path("configured.txt");
    let replacement = lab.scratch_path("replacement.txt");
    std::fs::write(&configured, host_lines("198.18", 65_000)).expect("writing the set file");
    std::fs::write(&replacement, host_lines("198.19", 65_000)).expect("writing the replacement");
    let daemon = lab.daemon(&policy(&configured));
    let whole = |path: &Path| {
        let mut lines: Vec<String> = std::fs::read_to_string(path)
            .expect("reading a set file")
            .lines()
            .map(|line| format!("{line}/32"))
            .collect();
        lines.sort();
        lines
    };
    let (configured_set, replacement_set) = (whole(&configured), whole(&replacement));
    let bin = std::env::var_os("SESSION_BIN").expect("SESSION_BIN names the session binary");
    for round in 0..6 {
        // The replace runs beside the reload, started a little later each round so that
        // its fill meets each step of the reload's apply in some round. The sets live in
        // the pinned maps, so the command needs no namespace.
        let delay = Duration::from_millis(50 * round);
        let mut replace = std::process::Command::new(&bin);
        replace
            .args(["set", "replace", "block"])
            .arg(&replacement)
            .arg("--pin-dir")
            .arg(daemon.pin_dir());
        let replacing = std::thread::spawn(move || {
            std::thread::sleep(delay);
            replace.output()
        });
        daemon.cli(&["reload"]);
        let replaced = replacing
            .join()
            .expect("the replace thread")
            .expect("running set replace");
        assert!(
            replaced.status.success(),
            "round {round}: {}",
            describe(&replaced)
        );
        let now = shown(&daemon);
        assert!(
            now == configured_set || now == replacement_set,
            "round {round}: the set holds {} prefixes that are neither the configured set nor the replacement (first: {:?})",
            now.len(),
            now.first()
        );
        let list: Value = serde_json::from_str(&daemon.cli(&["set", "list", "--json"]))
            .expect("set list --json is JSON");
        assert_eq!(
            list.as_array().map(Vec::len),
            Some(1),
            "round {round}: one set in use: {list}"
        );
        assert_eq!(list[0]["entries"], 65_000, "round {round}: {list}");
    }
}
