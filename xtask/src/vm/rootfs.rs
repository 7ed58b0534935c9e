//! The guest's root file system: a cpio initramfs with busybox, the host's own copies of
//! the tools the tests run (each with the shared libraries `ldd` names), the test binaries,
//! the kernel's modules and an `/init` that runs the checks and prints their results on
//! the console in lines the host parses (see [`super::matrix`]).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{Check, kernel};
use crate::cmd;

/// Tools the checks run, copied from the host: what `tests/src/lib.rs` requires on PATH
/// (busybox's versions differ in options and output), plus `tc` and `bash`.
pub const HOST_TOOLS: &[&str] = &[
    "ip", "tc", "ss", "nft", "nsenter", "unshare", "setpriv", "timeout", "kill", "sysctl", "socat",
    "ping", "tcpdump", "id", "bash",
];

/// Where busybox-static installs it.
const BUSYBOX: &str = "/bin/busybox";

/// Directory in the guest that holds the test binaries and the tools.
pub const GUEST_BIN: &str = "/usr/bin";

/// The console line that starts each check's result: name, exit code, start and end
/// (seconds since boot).
pub const RESULT_MARK: &str = "SESSION-VM-RESULT";
/// Printed once the guest has booted and loaded its modules: kernel release, seconds since boot.
pub const BOOTED_MARK: &str = "SESSION-VM-BOOTED";
/// Prefix of the lines that say how each test of a check went, as it goes.
pub const PROGRESS_MARK: &str = "SESSION-VM-PROGRESS";
/// Printed when the guest could not load a module, with the module.
pub const MODULE_FAILED_MARK: &str = "SESSION-VM-MODULE-FAILED";
/// Printed after the last check.
pub const DONE_MARK: &str = "SESSION-VM-DONE";
/// Prefix of the lines of a failed check's output, so they cannot be mistaken for marks.
pub const OUTPUT_PREFIX: &str = "| ";

/// Builds `<dir>/initramfs.cpio` for `kernel` with `binaries` (name in the guest → host
/// file) and the `checks`; returns its path.
pub fn build(
    dir: &Path,
    kernel: &kernel::Kernel,
    binaries: &[(String, PathBuf)],
    checks: &[Check],
) -> Result<PathBuf> {
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for sub in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var",
        "lib/modules",
    ] {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.join(sub).display()))?;
    }
    std::os::unix::fs::symlink("/run", root.join("var/run")).context("linking /var/run")?;
    copy(Path::new(BUSYBOX), &root.join("bin/busybox")).with_context(|| {
        format!("{BUSYBOX} is missing: install busybox-static (`cargo xtask setup` does)")
    })?;
    // tcpdump drops its privileges to the user of its name.
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:100:100::/nonexistent:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\ntcpdump:x:100:\n")?;
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    let mut libs = Vec::new();
    for tool in HOST_TOOLS {
        let path = which(tool)?;
        copy(&path, &root.join("usr/bin").join(tool))?;
        libs.extend(shared_libraries(&path)?);
    }
    for (name, path) in binaries {
        let to = root.join("usr/bin").join(name);
        strip_copy(path, &to)?;
        libs.extend(shared_libraries(path)?);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        let to = root.join(lib.strip_prefix("/").unwrap_or(lib));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        copy(lib, &to)?;
    }
    let modules = kernel::module_load_order(kernel, kernel::WANTED_MODULES)?;
    let mut insmod = String::new();
    for (i, module) in modules.iter().enumerate() {
        let name = format!("lib/modules/{i:02}-{}.ko", module_stem(module));
        fs::write(root.join(&name), kernel::module_bytes(module)?)
            .with_context(|| format!("writing {name}"))?;
        insmod.push_str(&format!("/{name}\n"));
    }
    fs::write(root.join("etc/modules.order"), insmod)?;
    write_executable(&root.join("init"), INIT)?;
    write_executable(&root.join("etc/checks.sh"), &checks_script(checks))?;
    let cpio = dir.join("initramfs.cpio");
    pack(&root, &cpio)?;
    Ok(cpio)
}

/// The guest's `/init`: mounts what the tests need, loads the modules in order, runs
/// `/etc/checks.sh` and powers off. `check NAME SECS CMD...` runs one check under a
/// timeout and prints its result mark; a failed check's panics and last output lines follow,
/// prefixed.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
while read -r module; do
    insmod "$module" || echo "SESSION-VM-MODULE-FAILED $module"
done < /etc/modules.order
echo
echo "SESSION-VM-BOOTED $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
check() {
    name=$1; secs=$2; shift 2
    start=$(cut -d' ' -f1 /proc/uptime)
    set -o pipefail
    timeout -k 5 "$secs" "$@" 2>&1 | tee "/tmp/$name.log" | while read -r line; do
        case "$line" in
            "test "*" ok" | "test "*" FAILED") echo "SESSION-VM-PROGRESS $name $line" ;;
        esac
    done
    rc=$?
    set +o pipefail
    end=$(cut -d' ' -f1 /proc/uptime)
    grep -o 'SESSION-INSNS .*' "/tmp/$name.log"
    if [ "$rc" != 0 ]; then
        grep -A6 -e "panicked at" -e "^test .* FAILED" "/tmp/$name.log" | head -n 120 | sed 's/^/| /'
        tail -n 40 "/tmp/$name.log" | sed 's/^/| /'
    fi
    echo "SESSION-VM-RESULT $name $rc $start $end"
}
. /etc/checks.sh
echo SESSION-VM-DONE
poweroff -f
"#;

/// How long the tests wait for the daemon to be ready in the guest, where loading the
/// programs takes about 25 s under software emulation (30 s on the host).
const GUEST_READY_SECS: u32 = 240;

/// One `check` line per check, with its environment exported first.
fn checks_script(checks: &[Check]) -> String {
    let mut script = format!(
        "export SESSION_BIN=/usr/bin/session RUST_BACKTRACE=1 SESSION_TEST_READY_SECS={GUEST_READY_SECS}\n"
    );
    for check in checks {
        let mut line = String::new();
        for (key, value) in &check.env {
            line.push_str(&format!("{key}={} ", shell_quote(value)));
        }
        line.push_str(&format!(
            "check {} {} {GUEST_BIN}/{}",
            check.name, check.timeout_secs, check.binary
        ));
        for arg in &check.args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        script.push_str(&line);
        script.push('\n');
    }
    script
}

/// `text` in single quotes for sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn module_stem(path: &Path) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    file.split(".ko").next().unwrap_or(&file).to_string()
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

/// The file `tool` resolves to on the host's PATH.
fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("`{tool}` is not installed on the host: run `cargo xtask setup`"))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Copies a binary without its debug information: the test binaries are hundreds of MB
/// with it, and the guest unpacks the initramfs into memory.
fn strip_copy(from: &Path, to: &Path) -> Result<()> {
    cmd::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(to),
    )
    .with_context(|| format!("could not copy {} into the guest", from.display()))
}

/// The shared libraries (and the dynamic loader) that `binary` needs, as `ldd` resolves
/// them on the host; none for a static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("could not run `ldd {}`", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("`ldd {}` failed: {text}", binary.display());
    }
    Ok(parse_ldd(&text))
}

/// The absolute paths in `ldd`'s output.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Writes `root` as a newc cpio archive (uncompressed: the guest unpacks it faster than
/// it would decompress it under emulation).
fn pack(root: &Path, cpio: &Path) -> Result<()> {
    let file = fs::File::create(cpio).with_context(|| format!("creating {}", cpio.display()))?;
    let status = Command::new("sh")
        .args(["-c", "find . -print0 | cpio --null -o -H newc --quiet"])
        .current_dir(root)
        .stdout(Stdio::from(file))
        .status()
        .context("could not run find | cpio: install cpio (`cargo xtask setup` does)")?;
    if !status.success() {
        bail!("packing {} with cpio failed ({status})", root.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_absolute_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
