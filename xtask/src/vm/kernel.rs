//! The kernels the VM matrix boots: Debian's cloud kernel packages, downloaded once with
//! `apt-get download` and unpacked with `dpkg-deb -x` into a cache, so that a second run
//! costs nothing and needs no network.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// A kernel of the matrix: the name the operator types and the Debian package that has it.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    /// What `--kernel` accepts and the matrix prints.
    pub name: &'static str,
    /// The Debian binary package with the image, its config and its modules.
    pub package: &'static str,
}

/// The kernels Debian's registry serves that the matrix knows: Debian 12's LTS kernel and
/// its backported 6.12. Pinned to exact ABI versions so that a run is reproducible.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        package: "linux-image-6.1.0-57-cloud-amd64",
    },
    KernelSpec {
        name: "6.12",
        package: "linux-image-6.12.118+deb12-cloud-amd64",
    },
];

/// The spec called `name`, or an error that lists the known ones.
pub fn spec(name: &str) -> Result<KernelSpec> {
    KERNELS
        .iter()
        .find(|k| k.name == name)
        .copied()
        .with_context(|| {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            format!(
                "unknown kernel {name:?}: the matrix knows {} and `host`",
                known.join(", ")
            )
        })
}

/// Modules the guest loads (with their dependencies) when the kernel has them as modules:
/// veth pairs, the clsact qdisc and cls_bpf for TC attachment before TCX, and the
/// nftables and conntrack pieces that the integration tests use as the reference, and
/// the netlink families takeover reads (a Debian host loads these on first use).
pub const WANTED_MODULES: &[&str] = &[
    "veth",
    "nf_conntrack_netlink",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nf_conntrack",
    "nft_ct",
    "nft_reject_inet",
    "nft_log",
    "nf_log_syslog",
    "nft_numgen",
    "nft_limit",
    "nft_nat",
    "nft_masq",
];

/// An unpacked kernel package in the cache.
pub struct Kernel {
    /// The spec it was made from.
    pub spec: KernelSpec,
    /// `boot/vmlinuz-*`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// The cache directory: `$XDG_CACHE_HOME/session-vm`, else `~/.cache/session-vm`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("session-vm"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set: set it or XDG_CACHE_HOME")?;
    Ok(PathBuf::from(home).join(".cache/session-vm"))
}

/// Downloads and unpacks `spec`'s package unless the cache has it already.
pub fn fetch(spec: KernelSpec) -> Result<Kernel> {
    let dir = cache_dir()?.join(spec.package);
    let done = dir.join(".unpacked");
    if !done.exists() {
        let download = cache_dir()?.join(format!("{}.download", spec.package));
        if download.exists() {
            fs::remove_dir_all(&download)
                .with_context(|| format!("removing the half-done {}", download.display()))?;
        }
        fs::create_dir_all(&download)
            .with_context(|| format!("creating {}", download.display()))?;
        println!("vm: downloading {} (apt-get download)", spec.package);
        cmd::run(
            Command::new("apt-get")
                // As root into root's cache: apt's sandbox user could not write there.
                .args(["-o", "APT::Sandbox::User=root", "download", spec.package])
                .current_dir(&download),
        )
        .with_context(|| {
            format!(
                "could not download {}: run `apt-get update`, and check that the Debian bookworm and bookworm-security sources are configured",
                spec.package
            )
        })?;
        let deb = only_deb(&download)?;
        let unpacked = download.join("root");
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))
            .with_context(|| format!("could not unpack {}", deb.display()))?;
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::rename(&unpacked, &dir)
            .with_context(|| format!("moving the unpacked kernel to {}", dir.display()))?;
        fs::remove_dir_all(&download).ok();
        fs::write(&done, spec.package).with_context(|| format!("writing {}", done.display()))?;
    }
    let vmlinuz = only_entry(&dir.join("boot"), "vmlinuz-")?;
    let modules = only_entry(&dir.join("lib/modules"), "")?;
    Ok(Kernel {
        spec,
        vmlinuz,
        modules,
    })
}

fn only_deb(dir: &Path) -> Result<PathBuf> {
    only_entry(dir, "").and_then(|path| {
        if path.extension().is_some_and(|e| e == "deb") {
            Ok(path)
        } else {
            bail!("apt-get download left {} instead of a .deb", path.display())
        }
    })
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one {prefix}* in {}, found {found:?}: remove the directory to download it again",
            dir.display()
        ),
    }
}

/// A module file of the kernel and the modules it needs.
struct ModuleFile {
    path: PathBuf,
    depends: Vec<String>,
}

/// The files of `wanted` and of everything they depend on, dependencies first, so that
/// the guest can `insmod` them in this order. Modules built into the kernel
/// (`modules.builtin`) are left out; a wanted module the kernel has neither way is an error.
/// The dependencies come from each module's own `depends=` field (there is no
/// `modules.dep` in the package: depmod runs at install time).
pub fn module_load_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .with_context(|| format!("reading modules.builtin of {}", kernel.spec.package))?;
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let mut files = BTreeMap::new();
    index_modules(&kernel.modules.join("kernel"), &mut files)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        visit(&name, &files, &mut seen, &mut order, kernel)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    seen: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
    kernel: &Kernel,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = files.get(name).with_context(|| {
        format!(
            "{} has no module {name} and does not build it in: the VM tests need it",
            kernel.spec.package
        )
    })?;
    let module = read_module(path)?;
    for dep in &module.depends {
        visit(dep, files, seen, order, kernel)?;
    }
    order.push(module.path);
    Ok(())
}

/// `kernel/net/sched/cls_bpf.ko.xz` → `cls_bpf` (module names use `_` for `-`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, files)?;
        } else if path.to_string_lossy().contains(".ko") {
            files.insert(module_name(&path.to_string_lossy()), path);
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<ModuleFile> {
    let bytes = module_bytes(path)?;
    Ok(ModuleFile {
        path: path.to_path_buf(),
        depends: depends_field(&bytes),
    })
}

/// The uncompressed bytes of a module file (`.ko`, or `.ko.xz` through `xz -dc`).
pub fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let mut xz = Command::new("xz");
        xz.arg("-dc").arg(path);
        let out = xz
            .output()
            .with_context(|| format!("could not run `xz -dc {}`", path.display()))?;
        if !out.status.success() {
            bail!("`xz -dc {}` failed ({})", path.display(), out.status);
        }
        Ok(out.stdout)
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}

/// The module names in the `depends=` entry of a module's `.modinfo` section.
fn depends_field(bytes: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = bytes.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &bytes[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_drop_the_path_and_the_compression() {
        assert_eq!(module_name("kernel/net/sched/cls_bpf.ko.xz"), "cls_bpf");
        assert_eq!(module_name("kernel/net/nf-foo.ko"), "nf_foo", "dashes");
    }

    #[test]
    fn depends_are_read_from_modinfo() {
        let blob = b"junk\0license=GPL\0depends=nf_conntrack,nf_tables\0vermagic=6.1\0";
        assert_eq!(depends_field(blob), ["nf_conntrack", "nf_tables"]);
        assert!(
            depends_field(b"\0depends=\0name=veth\0").is_empty(),
            "an empty field"
        );
        assert!(depends_field(b"no modinfo").is_empty(), "no field at all");
    }
}
