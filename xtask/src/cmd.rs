//! Running external programs so that every failure names the command that failed.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// The command line as the operator would type it, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with the terminal as its stdin/stdout/stderr and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`: is it installed and on PATH?"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (quoting its stderr) unless it exits 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`: is it installed and on PATH?"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed invalid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_joins_program_and_arguments() {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "-p", "session-user"]);
        assert_eq!(
            describe(&cmd),
            "cargo build -p session-user",
            "the command line must read as typed"
        );
    }

    #[test]
    fn stdout_reports_a_failing_command_with_its_stderr() {
        let err = stdout(Command::new("sh").args(["-c", "echo broken >&2; exit 3"]))
            .expect_err("a command exiting 3 must be an error");
        let msg = format!("{err:#}");
        assert!(msg.contains("broken"), "stderr must be quoted, got: {msg}");
        assert!(
            msg.contains("sh -c"),
            "the command must be named, got: {msg}"
        );
    }
}
