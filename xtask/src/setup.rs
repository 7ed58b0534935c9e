//! `cargo xtask setup`: brings a fresh Debian machine to the state the build, the tests
//! and the demo need, following /work/shared/TOOLCHAIN.md. Every step checks first and
//! only acts when something is missing, so running it again costs well under two seconds.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd;

/// Debian packages that the integration tests and the lab run.
const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "nftables",
    "conntrack",
    "socat",
    "iperf3",
    // VRRP failover for the state sync tests (tests/ha.rs), and conntrackd, which the
    // state sync benchmark (tests/benches/ha_sync.rs) compares session with.
    "keepalived",
    "conntrackd",
    "tcpdump",
    "netcat-openbsd",
    "hping3",
    "procps",
    "groff-base",
    "systemd",
    // DHCP client and server software for tests/dhcp.rs: busybox (udhcpc, udhcpd; the
    // static build, which `cargo xtask vm-test` also puts in its initramfs, and which
    // Debian will not install beside the dynamic one), dnsmasq (DHCPv6 server), ISC
    // dhclient (DHCPv6 client).
    "dnsmasq-base",
    "isc-dhcp-client",
    // `cargo xtask vm-test`: boots other kernels under qemu with a busybox initramfs.
    "qemu-system-x86",
    "cpio",
    "busybox-static",
];

/// The bpf-linker release known to build and link against nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The bpf-linker feature that must match the LLVM major of the nightly toolchain.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Nightly's libLLVM is `libLLVM.so.22.1-rust-<version>-nightly`; these are the fixed parts.
const LIBLLVM_PREFIX: &str = "libLLVM.so.22.1-rust-";
const LIBLLVM_SUFFIX: &str = "-nightly";

/// Where bpffs must be mounted for the daemon to pin its maps.
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every setup step in order; the first failure stops it with what to do.
pub fn run() -> Result<()> {
    require_root()?;
    check_kernel()?;
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()
}

/// Loading eBPF, creating namespaces and installing packages all need root.
fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "this needs root (effective uid is {euid}): become root (e.g. `sudo -i`) and run the command again"
    );
    println!("ok: running as root");
    Ok(())
}

/// The loader needs BTF and the JIT; nothing installable fixes their absence.
fn check_kernel() -> Result<()> {
    ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "/sys/kernel/btf/vmlinux is missing: this kernel has no BTF; boot a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    );
    ensure!(
        Path::new("/proc/sys/net/core/bpf_jit_enable").exists(),
        "/proc/sys/net/core/bpf_jit_enable is missing: this kernel has no BPF JIT; boot a kernel built with CONFIG_BPF_JIT=y"
    );
    println!("ok: kernel has BTF and the BPF JIT");
    Ok(())
}

/// Installs the missing Debian packages, and touches apt only when some are missing.
fn ensure_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in PACKAGES {
        if !package_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        println!("ok: Debian packages present");
        return Ok(());
    }
    println!("installing: {} (apt-get)", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))
        .context("apt-get update failed: check the network and /etc/apt/sources.list")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {}", missing.join(" ")))?;
    Ok(())
}

/// Asks dpkg whether `package` is installed; an unknown package is simply not installed.
fn package_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("could not run dpkg-query: setup supports Debian-based systems only")?;
    Ok(out.status.success() && dpkg_status_installed(&String::from_utf8_lossy(&out.stdout)))
}

/// dpkg's status is "want flag status", e.g. "install ok installed" or "hold ok installed".
fn dpkg_status_installed(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

/// `-Z build-std=core` for the eBPF target needs nightly's standard library sources.
fn ensure_rust_src() -> Result<()> {
    let installed = cmd::stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "cannot list nightly's components: install it with `rustup toolchain install nightly`",
    )?;
    if has_rust_src(&installed) {
        println!("ok: rust-src present");
        return Ok(());
    }
    println!("installing: rust-src for the nightly toolchain");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("could not add rust-src to nightly: check the network and `rustup show`")
}

/// Whether `rustup component list --installed` output lists rust-src.
fn has_rust_src(components: &str) -> bool {
    components
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
}

/// Builds bpf-linker against nightly's own libLLVM (TOOLCHAIN.md), since no LLVM 22 is
/// packaged for Debian and prebuilt linkers cannot be downloaded. A stamp holding
/// `rustc +nightly -vV` tells when nightly changed and the linker must be rebuilt.
fn ensure_bpf_linker() -> Result<()> {
    let home = env::var_os("HOME").context("HOME is not set: run setup from a login shell")?;
    let cache = PathBuf::from(home).join(".cache/session-toolchain");
    let prefix = cache.join("llvm");
    let nightly = cmd::stdout(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "nightly rustc does not run: install it with `rustup toolchain install nightly`",
    )?;
    let sysroot = cmd::stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("cannot find nightly's sysroot: check `rustup toolchain list`")?;
    let libllvm = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    link_libllvm(&prefix.join("lib"), &libllvm)?;

    let stamp = cache.join("bpf-linker.stamp");
    let stamp_matches = fs::read_to_string(&stamp).is_ok_and(|s| s == nightly);
    if stamp_matches && let Some(version) = bpf_linker_version() {
        println!("ok: {version} (linked against nightly's LLVM)");
        return Ok(());
    }
    println!(
        "installing: bpf-linker {BPF_LINKER_VERSION} against {} (a minute or two)",
        libllvm.display()
    );
    cmd::run(
        Command::new("cargo")
            .args(["+stable", "install", "bpf-linker", "--locked", "--force"])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .args(["--version", BPF_LINKER_VERSION])
            .env("LLVM_PREFIX", &prefix)
            .current_dir(&cache),
    )
    .context("building bpf-linker failed: see cargo's errors above")?;
    let Some(version) = bpf_linker_version() else {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not run: make sure \
             $CARGO_HOME/bin (usually ~/.cargo/bin) is on PATH"
        );
    };
    fs::write(&stamp, &nightly).with_context(|| format!("cannot write {}", stamp.display()))?;
    println!("ok: {version} installed");
    Ok(())
}

/// Finds the single nightly libLLVM in `lib_dir` (the glob `libLLVM.so.22.1-rust-*-nightly`).
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", lib_dir.display()))?;
        if is_nightly_libllvm(&entry.file_name().to_string_lossy()) {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no {LIBLLVM_PREFIX}*{LIBLLVM_SUFFIX} in {}: nightly no longer ships LLVM 22.1, so \
             BPF_LINKER_LLVM_FEATURE and LIBLLVM_PREFIX in xtask/src/setup.rs must follow its LLVM",
            lib_dir.display()
        ),
        many => bail!(
            "several nightly libLLVMs in {}: {many:?}; reinstall nightly with `rustup toolchain install nightly --force`",
            lib_dir.display()
        ),
    }
}

/// Whether `name` matches `libLLVM.so.22.1-rust-*-nightly`.
fn is_nightly_libllvm(name: &str) -> bool {
    name.len() > LIBLLVM_PREFIX.len() + LIBLLVM_SUFFIX.len()
        && name.starts_with(LIBLLVM_PREFIX)
        && name.ends_with(LIBLLVM_SUFFIX)
}

/// Makes `lib_dir` the LLVM prefix bpf-linker builds against and later loads from.
///
/// `libLLVM.so` is what bpf-linker's build links with. The link under the library's own
/// file name (its soname) is what the dynamic loader looks for through the rpath that
/// bpf-linker embeds; without it, `bpf-linker` only runs where rustup happens to put
/// nightly's lib directory on LD_LIBRARY_PATH. Links left from an older nightly go.
fn link_libllvm(lib_dir: &Path, libllvm: &Path) -> Result<()> {
    fs::create_dir_all(lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    let soname = libllvm
        .file_name()
        .context("nightly's libLLVM path has no file name")?;
    for entry in
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", lib_dir.display()))?;
        let name = entry.file_name();
        if is_nightly_libllvm(&name.to_string_lossy()) && name != soname {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove stale {}", entry.path().display()))?;
        }
    }
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib_dir.join(name);
        if fs::read_link(&link).is_ok_and(|target| target == libllvm) {
            continue;
        }
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
        }
        symlink(libllvm, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), libllvm.display()))?;
    }
    Ok(())
}

/// The first line of `bpf-linker --version`, or None when it is missing or cannot load.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .next()
            .unwrap_or("bpf-linker")
            .trim()
            .to_string(),
    )
}

/// The daemon pins its maps under /sys/fs/bpf, which this machine kind does not mount.
fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if bpffs_mounted(&mounts) {
        println!("ok: bpffs mounted on {BPFFS}");
        return Ok(());
    }
    println!("mounting: bpffs on {BPFFS}");
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("cannot mount bpffs: the kernel needs CONFIG_BPF_SYSCALL and you need root")
}

/// Whether /proc/mounts content has a bpf filesystem mounted on /sys/fs/bpf.
fn bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.next();
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_counts_only_installed_packages() {
        assert!(dpkg_status_installed("install ok installed"), "installed");
        assert!(
            dpkg_status_installed("hold ok installed"),
            "held but installed"
        );
        assert!(
            !dpkg_status_installed("deinstall ok config-files"),
            "removed, config left"
        );
        assert!(!dpkg_status_installed(""), "unknown package");
    }

    #[test]
    fn rust_src_is_found_among_components() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_rust_src(list), "rust-src is listed");
        assert!(
            !has_rust_src("rust-std-x86_64-unknown-linux-gnu\n"),
            "rust-std is not rust-src"
        );
    }

    #[test]
    fn libllvm_name_matches_the_nightly_glob() {
        assert!(
            is_nightly_libllvm("libLLVM.so.22.1-rust-1.97.0-nightly"),
            "the nightly library"
        );
        assert!(
            !is_nightly_libllvm("libLLVM-22-rust-1.97.0-nightly.so"),
            "the linker script"
        );
        assert!(
            !is_nightly_libllvm("libLLVM.so.22.1-rust-1.95.0-stable"),
            "stable's library"
        );
        assert!(!is_nightly_libllvm("libLLVM.so"), "the plain link");
    }

    #[test]
    fn bpffs_mount_is_recognised_only_on_sys_fs_bpf() {
        let mounted = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted(mounted), "bpf on /sys/fs/bpf");
        let elsewhere = "sysfs /sys sysfs rw 0 0\nbpf /mnt/bpf bpf rw 0 0\n";
        assert!(!bpffs_mounted(elsewhere), "bpf mounted elsewhere");
        let wrong_fs = "tmpfs /sys/fs/bpf tmpfs rw 0 0\n";
        assert!(!bpffs_mounted(wrong_fs), "something else on /sys/fs/bpf");
    }
}
