//! The command line a newcomer meets: `--help` of every command explains it with an
//! example, the generated man page is valid roff, the generated shell completions load,
//! and wrong arguments fail with exit status 2 and a message that says what is wrong.
//!
//! None of this needs root or a namespace: it runs the built binary directly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn session_bin() -> PathBuf {
    let bin = std::env::var_os("SESSION_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/session"));
    assert!(
        bin.is_file(),
        "session binary {} not found: build it with `cargo build -p session-user` or set SESSION_BIN",
        bin.display()
    );
    bin
}

fn session(args: &[&str]) -> Output {
    Command::new(session_bin())
        .args(args)
        .env_remove("SESSION_PIN_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run session {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("session prints UTF-8")
}

/// The output of a command that must succeed.
fn stdout_of(args: &[&str]) -> String {
    let out = session(args);
    assert!(
        out.status.success(),
        "session {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The commands `session --help` lists, without clap's own `help`.
fn commands() -> Vec<String> {
    let help = stdout_of(&["--help"]);
    let section = help
        .split("Commands:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Commands section in --help:\n{help}"));
    let names: Vec<String> = section
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 8, "too few commands in --help: {names:?}");
    names
}

#[test]
fn top_level_help_says_how_to_start() {
    let help = stdout_of(&["--help"]);
    for needle in [
        "session run --config FILE",
        "session list",
        "session check FILE",
        "need root",
    ] {
        assert!(
            help.contains(needle),
            "--help should mention {needle:?}:\n{help}"
        );
    }
    for name in [
        "run",
        "list",
        "flush",
        "stats",
        "reload",
        "check",
        "completions",
        "man",
    ] {
        assert!(
            commands().iter().any(|listed| listed == name),
            "--help does not list `{name}`"
        );
    }
}

#[test]
fn every_command_help_explains_itself_with_an_example() {
    for name in commands() {
        let help = stdout_of(&[&name, "--help"]);
        assert!(
            help.contains("Example"),
            "`session {name} --help` has no example:\n{help}"
        );
        let example = format!("session {name}");
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(&example)),
            "`session {name} --help` shows no `{example} ...` line:\n{help}"
        );
        assert!(
            help.contains(&format!("Usage: session {name}")),
            "`session {name} --help` has no usage line:\n{help}"
        );
        let short = stdout_of(&[&name, "-h"]);
        assert!(
            short.len() < help.len(),
            "`-h` should be the short summary of `--help` for {name}"
        );
    }
}

#[test]
fn man_page_is_valid_roff_documenting_every_command() {
    let page = stdout_of(&["man"]);
    assert!(page.contains("\n.TH session 1 "), "no .TH header:\n{page}");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "COMMANDS",
        "SIGNALS",
        "FILES",
        "EXIT STATUS",
    ] {
        assert!(
            page.lines().any(
                |line| line == format!(".SH {section}") || line == format!(".SH \"{section}\"")
            ),
            "man page has no {section} section"
        );
    }
    for name in commands() {
        let heading = format!(".SH \"SESSION {}\"", name.to_uppercase());
        let plain = format!(".SH SESSION {}", name.to_uppercase());
        assert!(
            page.lines().any(|line| line == heading || line == plain),
            "man page has no section for `{name}`"
        );
    }
    // groff with all warnings on: a roff mistake (an unknown macro, a bad escape) shows up
    // on stderr.
    let mut groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run groff (Debian package groff-base; `cargo xtask setup` installs it): {e}"
            )
        });
    groff
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("feeding groff");
    let rendered = groff.wait_with_output().expect("groff runs");
    assert!(
        rendered.status.success(),
        "groff failed: {}",
        text(&rendered.stderr)
    );
    assert!(
        rendered.stderr.is_empty(),
        "groff warns about the man page: {}",
        text(&rendered.stderr)
    );
    let shown = text(&rendered.stdout);
    for example in [
        "session run --config /etc/session/session.toml --iface eth0",
        "session stats --json",
    ] {
        assert!(
            shown.contains(example),
            "the rendered page lacks {example:?}:\n{shown}"
        );
    }
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    let commands = commands();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef session"),
        ("fish", "complete -c session"),
    ] {
        let script = stdout_of(&["completions", shell]);
        assert!(
            script.contains(marker),
            "{shell} completions lack {marker:?}"
        );
        for name in &commands {
            assert!(
                script.contains(name.as_str()),
                "{shell} completions do not offer `{name}`"
            );
        }
        assert!(
            script.contains("pin-dir"),
            "{shell} completions lack options"
        );
    }
    let dir = std::env::temp_dir().join(format!("session-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("session.bash");
    std::fs::write(&file, stdout_of(&["completions", "bash"])).expect("write completions");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .expect("bash runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        check.status.success(),
        "bash -n rejects the completions: {}",
        text(&check.stderr)
    );
}

/// Asserts that `args` fail with exit status `code` and a message containing `says`.
fn assert_fails(args: &[&str], code: i32, says: &str) {
    let out = session(args);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "session {args:?} should exit {code}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(says),
        "session {args:?} should say {says:?}, said:\n{stderr}"
    );
    assert!(out.stdout.is_empty(), "session {args:?} printed on stdout");
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    assert_fails(&["frobnicate"], 2, "unrecognized subcommand 'frobnicate'");
    assert_fails(&["run"], 2, "--config <CONFIG>");
    assert_fails(
        &["list", "--port", "70000"],
        2,
        "invalid value '70000' for '--port <PORT>'",
    );
    assert_fails(
        &["list", "--addr", "not-an-ip"],
        2,
        "invalid value 'not-an-ip'",
    );
    assert_fails(&["completions", "tcsh"], 2, "possible values");
    assert_fails(&["check"], 2, "<FILE>");
    assert_fails(&[], 2, "Usage: session <COMMAND>");
}

#[test]
fn runtime_errors_exit_1_and_say_what_to_do() {
    assert_fails(
        &["check", "/nonexistent/session.toml"],
        1,
        "cannot read /nonexistent/session.toml",
    );
    let pin = std::env::temp_dir().join(format!("session-cli-nopin-{}", std::process::id()));
    let pin = pin.to_string_lossy();
    assert_fails(
        &["stats", "--pin-dir", &pin],
        1,
        "start the daemon with `session run --config FILE`",
    );
}

#[test]
fn readme_config_examples_pass_session_check() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", readme_path.display()));
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or(""))
        .collect();
    assert!(
        blocks.len() >= 2,
        "README.md should show the config format with examples"
    );
    let dir = std::env::temp_dir().join(format!("session-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for (i, block) in blocks.iter().enumerate() {
        let file = dir.join(format!("example-{i}.toml"));
        std::fs::write(&file, block).expect("write example");
        let out = session(&["check", &file.to_string_lossy()]);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "README.md's TOML example {i} does not pass `session check` cleanly: {}\n{block}",
            text(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/session.service");
    let unit = std::fs::read_to_string(&unit_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", unit_path.display()));
    for line in [
        "ExecStart=/usr/local/bin/session run --config /etc/session/session.toml --restore /var/lib/session/sessions.table",
        "ExecStop=/usr/local/bin/session save /var/lib/session/sessions.table",
        "StateDirectory=session",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN CAP_PERFMON",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    // systemd-analyze checks that ExecStart's binary exists, so verify a copy that runs
    // the binary under test; every other line is checked as shipped.
    let dir = std::env::temp_dir().join(format!("session-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let copy = dir.join("session.service");
    let bin = session_bin();
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/session", &bin.to_string_lossy()),
    )
    .expect("write the unit copy");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify rejects packaging/session.service: {}",
        text(&out.stderr)
    );
}
