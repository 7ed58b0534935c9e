//! `cargo xtask differential`: the kernel path against the host model at scale (issue
//! 6.2). Runs the kernel-path test `kernel_and_model_agree_at_scale_with_mutated_frames`
//! sized by `--packets` and seeded by `--seed`: the same seeded frame mix as the suite's
//! short run, with structurally mutated frames, through BPF_PROG_TEST_RUN and the model.
//! The test prints packets compared, mismatches, XDP_ABORTED count and time, and fails
//! unless mismatches and aborts are both zero.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{cmd, setup};

/// The test that does the work, in session-user/tests/kernel_path.rs.
const TEST: &str = "kernel_and_model_agree_at_scale_with_mutated_frames";

/// Runs the comparison over `packets` frames from `seed` (the test's default when `None`).
pub fn run(root: &Path, packets: u64, seed: Option<u64>) -> Result<()> {
    if packets == 0 {
        bail!("--packets must be at least 1");
    }
    setup::run().context("setup failed")?;
    let mut test = Command::new("cargo");
    test.args([
        "test",
        "-p",
        "session-user",
        "--test",
        "kernel_path",
        "--",
        "--exact",
        TEST,
        "--nocapture",
    ])
    .env("SESSION_DIFF_PACKETS", packets.to_string())
    .env("RUST_BACKTRACE", "1")
    .current_dir(root);
    if let Some(seed) = seed {
        test.env("SESSION_DIFF_SEED", format!("{seed:x}"));
    }
    println!("differential: {packets} packets through the XDP program and the model");
    cmd::run(&mut test).context(
        "kernel and model disagree (or the test could not run): the first mismatching frames \
         and the seed are printed above; rerun with the same --seed to reproduce",
    )
}

/// Parses a seed given in hex, with or without `0x`, as the test prints it.
pub fn parse_seed(text: &str) -> Result<u64, String> {
    u64::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|e| format!("a seed is a hex number like 0x5e551011d1ff0062: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_as_printed() {
        assert_eq!(parse_seed("0x5e551011d1ff0062"), Ok(0x5e55_1011_d1ff_0062));
        assert_eq!(parse_seed("ff"), Ok(255));
        assert!(parse_seed("0xnothex").is_err());
    }
}
