//! Attachments that outlive the daemon, so that enforcement does not depend on it.
//!
//! Every protected interface has two attachments, each marked by a pin under
//! `<pin dir>/links/`: on ingress `<iface>-xdp` (an XDP link), or for an interface the
//! config judges on TC ingress instead `<iface>-tc-ingress` (a TCX link); on egress
//! `<iface>-tc` (a TCX link). A pinned link keeps its program attached after the process
//! that created it is gone, so a daemon that exits or is killed leaves the last applied
//! policy in force. A daemon that starts finds the pins and swaps its freshly loaded
//! program into each link with `BPF_LINK_UPDATE`, which the kernel does atomically: there
//! is no instant without a program on the interface.
//!
//! Kernels before 6.6 have no TCX: there the TC programs are cls_bpf filters attached
//! through netlink (see [`tc_netlink`]), which stay on the interface by themselves; their
//! pins, `<iface>-tc-ingress-nl` and `<iface>-tc-nl`, are the programs, kept as markers.

use std::{
    io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    sys::SyscallError,
    util::KernelVersion,
};
use log::{info, warn};

use crate::bpf::tc_netlink;

/// The subdirectory of the pin directory that holds the pinned links.
pub const LINKS_DIR: &str = "links";

/// The directory of pinned links under `pin_dir`.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_DIR)
}

/// Where a program is attached on an interface, and the suffix of its link's pin (the
/// policy's `wire::Hook` says only ingress or egress; this also says by which kind of link).
/// An interface has one of the two ingress hooks, never both: a packet judged twice would
/// be counted and tracked twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attachment {
    XdpIngress,
    TcIngress,
    Egress,
    /// TC ingress as a netlink cls_bpf filter, before TCX.
    NlIngress,
    /// Egress as a netlink cls_bpf filter, before TCX.
    NlEgress,
}

impl Attachment {
    const ALL: [Attachment; 5] = [
        Attachment::XdpIngress,
        Attachment::TcIngress,
        Attachment::Egress,
        Attachment::NlIngress,
        Attachment::NlEgress,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Attachment::XdpIngress => "-xdp",
            Attachment::TcIngress => "-tc-ingress",
            Attachment::Egress => "-tc",
            Attachment::NlIngress => "-tc-ingress-nl",
            Attachment::NlEgress => "-tc-nl",
        }
    }

    /// The TC side of a netlink filter; `None` for an attachment through a BPF link.
    fn netlink_side(self) -> Option<TcAttachType> {
        match self {
            Attachment::NlIngress => Some(TcAttachType::Ingress),
            Attachment::NlEgress => Some(TcAttachType::Egress),
            _ => None,
        }
    }

    fn pin(self, pin_dir: &Path, iface: &str) -> PathBuf {
        links_dir(pin_dir).join(format!("{iface}{}", self.suffix()))
    }
}

/// The oldest kernel the matrix (`cargo xtask vm-test`) verifies.
const OLDEST_SUPPORTED: (u8, u8) = (6, 1);

/// What the programs use that arrived after Linux 5.x, with the version that brought
/// it, newest first: what a kernel older than [`OLDEST_SUPPORTED`] lacks.
const NEEDED: &[((u8, u8), &str)] = &[
    (
        (5, 18),
        "bpf_xdp_load_bytes (the XDP parser reads headers at variable offsets with it)",
    ),
    ((5, 11), "bpf_ktime_get_coarse_ns (the programs' clock)"),
    (
        (5, 9),
        "XDP BPF links (pinned, so the firewall outlives the daemon)",
    ),
    ((5, 8), "the BPF ring buffer (events)"),
];

/// What a kernel of `version` lacks of [`NEEDED`], or that it is simply unverified.
fn missing(version: KernelVersion) -> Vec<&'static str> {
    let older = |(major, minor): (u8, u8)| version < KernelVersion::new(major, minor, 0);
    let mut lacks: Vec<&str> = NEEDED
        .iter()
        .filter(|(since, _)| older(*since))
        .map(|(_, what)| *what)
        .collect();
    if lacks.is_empty() && older(OLDEST_SUPPORTED) {
        lacks.push("nothing known, but no kernel before 6.1 passes the test matrix (its verifier rejects or has not been tried on the programs)");
    }
    lacks
}

/// Refuses kernels older than the oldest one verified, saying what they lack, and says
/// how this one's TC programs will attach.
pub fn check_kernel() -> Result<()> {
    let version = KernelVersion::current().context("reading the kernel version")?;
    let (major, minor) = OLDEST_SUPPORTED;
    if version < KernelVersion::new(major, minor, 0) {
        let lacks = missing(version);
        bail!(
            "kernel {version:?} is not supported: session needs Linux {major}.{minor} or newer, the oldest kernel its test matrix verifies. This one lacks: {}. Upgrade the kernel (Debian 12 ships 6.1, Ubuntu 22.04's HWE kernel is 6.8)",
            lacks.join("; ")
        );
    }
    if tc_netlink::tcx_available()? {
        info!("kernel {version:?}: TC programs attach as TCX links");
    } else {
        info!(
            "kernel {version:?} has no TCX (Linux 6.6): TC programs attach as netlink cls_bpf filters (priority {}, handle {:#x})",
            tc_netlink::PRIORITY,
            tc_netlink::HANDLE
        );
    }
    Ok(())
}

/// The link pinned at `path`, or `None` when there is none.
fn pinned(path: &Path) -> Result<Option<FdLink>> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(error) => Err(error).with_context(|| {
            format!(
                "cannot open the pinned link {} (is something else there? remove it, or run `session down` to remove the whole firewall)",
                path.display()
            )
        }),
    }
}

/// Pins a freshly created link at `path`; on failure the link is closed, which detaches it.
fn pin_new(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map(drop).with_context(|| {
        format!(
            "cannot pin the link at {} (the bpffs may be full or not writable); nothing was left attached",
            path.display()
        )
    })
}

/// Removes a pin that could not be adopted (its interface was deleted and created again,
/// say), so that a fresh link can take its place.
fn discard_stale(path: &Path, iface: &str, error: &anyhow::Error) -> Result<()> {
    warn!(
        "{iface}: the pinned link {} cannot be reused ({error:#}); attaching afresh",
        path.display()
    );
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

fn attach_ingress(ingress: &mut Xdp, iface: &str, path: &Path) -> Result<Option<XdpMode>> {
    if let Some(link) = pinned(path)? {
        let adopted = XdpLink::try_from(link)
            .context("the pin is not an XDP link")
            .and_then(|link| {
                ingress
                    .attach_to_link(link)
                    .context("replacing the program of the XDP link")
            });
        match adopted {
            Ok(id) => {
                // The pin keeps the link; this process's handle is no longer needed.
                drop(ingress.take_link(id)?);
                return Ok(None);
            }
            Err(error) => discard_stale(path, iface, &error)?,
        }
    }
    let (id, mode) = match ingress.attach(iface, XdpMode::Driver) {
        Ok(id) => (id, XdpMode::Driver),
        Err(native_error) => {
            warn!("{iface}: native XDP unavailable ({native_error}); using generic XDP");
            let id = ingress
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching XDP to {iface}"))?;
            (id, XdpMode::Skb)
        }
    };
    let link = FdLink::try_from(ingress.take_link(id)?).map_err(|_| {
        anyhow::anyhow!(
            "{iface}: the kernel attached XDP through netlink, not as a BPF link, so it cannot be pinned (Linux 5.9 or newer is needed)"
        )
    })?;
    pin_new(link, path)?;
    Ok(Some(mode))
}

/// Attaches `program` to `iface` on TCX `side` through the link pinned at `path`,
/// adopting a link a previous daemon pinned there. Returns whether it was adopted.
fn attach_tcx(
    program: &mut SchedClassifier,
    side: TcAttachType,
    iface: &str,
    path: &Path,
) -> Result<bool> {
    if let Some(link) = pinned(path)? {
        let adopted = SchedClassifierLink::try_from(link)
            .context("the pin is not a TCX link")
            .and_then(|link| {
                program
                    .attach_to_link(link)
                    .context("replacing the program of the TCX link")
            });
        match adopted {
            Ok(id) => {
                drop(program.take_link(id)?);
                return Ok(true);
            }
            Err(error) => discard_stale(path, iface, &error)?,
        }
    }
    let id = program
        .attach_with_options(iface, side, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching the TCX {side:?} program to {iface}"))?;
    let link =
        FdLink::try_from(program.take_link(id)?).context("the TCX attachment is not a BPF link")?;
    pin_new(link, path)?;
    Ok(false)
}

/// The program that judges an interface's ingress.
pub enum Ingress<'a> {
    /// XDP, before the kernel builds a socket buffer: the default.
    Xdp(&'a mut Xdp),
    /// TCX ingress, for interfaces where XDP would pay a copy of each socket buffer.
    Tc(&'a mut SchedClassifier),
}

/// Attaches `program` on TC `side` of `iface`: as a TCX link pinned at `link_hook`'s path
/// where the kernel has TCX, else as a netlink filter marked at `nl_hook`'s. Returns the
/// hook used and whether a previous daemon's attachment was adopted.
fn attach_tc(
    pin_dir: &Path,
    program: &mut SchedClassifier,
    side: TcAttachType,
    iface: &str,
    tcx: bool,
) -> Result<(Attachment, bool)> {
    let (link_hook, nl_hook) = match side {
        TcAttachType::Egress => (Attachment::Egress, Attachment::NlEgress),
        _ => (Attachment::TcIngress, Attachment::NlIngress),
    };
    if tcx {
        let adopted = attach_tcx(program, side, iface, &link_hook.pin(pin_dir, iface))?;
        Ok((link_hook, adopted))
    } else {
        let adopted = tc_netlink::attach(program, side, iface, &nl_hook.pin(pin_dir, iface))?;
        Ok((nl_hook, adopted))
    }
}

/// How an attachment is described in the log.
fn describe(hook: Attachment, adopted: bool) -> &'static str {
    match (hook.netlink_side().is_some(), adopted) {
        (false, true) => "adopted pinned link",
        (false, false) => "new link",
        (true, true) => "netlink filter, program replaced",
        (true, false) => "new netlink filter",
    }
}

/// Attaches `ingress` and the egress program to `iface` through pinned links (or, before
/// TCX, netlink filters for the TC programs), adopting those a previous daemon left. If
/// the egress side fails after a fresh ingress attachment was made, that one is removed
/// again, so a failed interface is left as it was found. An ingress attachment of another
/// kind that a previous daemon left (the config moved the interface between XDP and TC)
/// is removed once the new one is attached: for that moment packets are judged twice,
/// never not at all.
pub fn attach(
    pin_dir: &Path,
    ingress: Ingress<'_>,
    egress: &mut SchedClassifier,
    iface: &str,
) -> Result<()> {
    let dir = links_dir(pin_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {} for the pinned links", dir.display()))?;
    let tcx = tc_netlink::tcx_available()?;
    let (hook, fresh, ingress) = match ingress {
        Ingress::Xdp(program) => {
            match attach_ingress(program, iface, &Attachment::XdpIngress.pin(pin_dir, iface))? {
                None => (
                    Attachment::XdpIngress,
                    false,
                    "XDP ingress: adopted pinned link".to_string(),
                ),
                Some(mode) => (
                    Attachment::XdpIngress,
                    true,
                    format!("XDP ingress: new link, {mode:?} mode"),
                ),
            }
        }
        Ingress::Tc(program) => {
            let (hook, adopted) = attach_tc(pin_dir, program, TcAttachType::Ingress, iface, tcx)?;
            (
                hook,
                !adopted,
                format!("TC ingress: {}", describe(hook, adopted)),
            )
        }
    };
    let (egress_hook, egress_adopted) =
        match attach_tc(pin_dir, egress, TcAttachType::Egress, iface, tcx) {
            Ok(attached) => attached,
            Err(error) => {
                if fresh && let Err(undo) = release_hooks(pin_dir, &[hook], iface) {
                    warn!("{iface}: could not remove the new ingress attachment: {undo:#}");
                }
                return Err(error);
            }
        };
    info!(
        "{iface}: attached ({ingress}; TC egress: {})",
        describe(egress_hook, egress_adopted)
    );
    let others: Vec<Attachment> = Attachment::ALL
        .into_iter()
        .filter(|other| *other != hook && *other != egress_hook)
        .filter(|other| other.pin(pin_dir, iface).exists())
        .collect();
    for path in release_hooks(pin_dir, &others, iface)? {
        info!(
            "{iface}: removed the ingress link pinned at {}, which the config no longer asks for",
            path.display()
        );
    }
    Ok(())
}

/// Removes `hooks` of `iface`: pinned links through [`release`], netlink filters
/// directly. Returns the pins removed.
fn release_hooks(pin_dir: &Path, hooks: &[Attachment], iface: &str) -> Result<Vec<PathBuf>> {
    let links: Vec<PathBuf> = hooks
        .iter()
        .filter(|hook| hook.netlink_side().is_none())
        .map(|hook| hook.pin(pin_dir, iface))
        .collect();
    let mut removed = if links.is_empty() {
        Vec::new()
    } else {
        release(&links, iface)?
    };
    removed.extend(detach_netlink(pin_dir, hooks, iface)?);
    Ok(removed)
}

/// Deletes the netlink filters among `hooks` whose markers exist; returns the markers.
fn detach_netlink(pin_dir: &Path, hooks: &[Attachment], iface: &str) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for hook in hooks {
        let marker = hook.pin(pin_dir, iface);
        if let Some(side) = hook.netlink_side()
            && marker.exists()
        {
            tc_netlink::detach(side, iface, &marker)?;
            removed.push(marker);
        }
    }
    Ok(removed)
}

/// How long the kernel may take to release a link after its last pin is gone (it does
/// so from a work queue, after an RCU grace period).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which of `ids` are links the kernel still has.
fn live_links(ids: &[u32]) -> Result<Vec<u32>> {
    let mut live = Vec::new();
    for info in aya::programs::loaded_links() {
        match info {
            Ok(info) if ids.contains(&info.id()) => live.push(info.id()),
            Ok(_) => {}
            // A link released between listing its id and opening it.
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).context("listing the kernel's BPF links"),
        }
    }
    Ok(live)
}

/// Removes the pins at `paths` and returns only once the kernel has released their
/// links, so that the programs are off the interface when the caller says so. Listing
/// links needs CAP_SYS_ADMIN: this is for `session down` and for a daemon that has not
/// dropped its capabilities yet. Returns the pins removed.
fn release(paths: &[PathBuf], iface: &str) -> Result<Vec<PathBuf>> {
    let mut ids = Vec::new();
    for path in paths {
        if let Some(link) = pinned(path)? {
            let info = link
                .info()
                .with_context(|| format!("reading the link pinned at {}", path.display()))?;
            ids.push(info.id());
        }
    }
    let removed = unpin(paths)?;
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let live = live_links(&ids)?;
        if live.is_empty() {
            return Ok(removed);
        }
        if Instant::now() >= deadline {
            bail!(
                "{iface}: links {live:?} are still attached {RELEASE_TIMEOUT:?} after their pins were removed; a process holds them open (see `bpftool link show`)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`detach`], and returns only once the kernel has released the links (see
/// [`release`]).
pub fn detach_and_wait(pin_dir: &Path, iface: &str) -> Result<Vec<PathBuf>> {
    release_hooks(pin_dir, &Attachment::ALL, iface)
}

/// The pin paths of the link hooks of `iface` (not the netlink markers).
fn link_paths(pin_dir: &Path, iface: &str) -> Vec<PathBuf> {
    Attachment::ALL
        .iter()
        .filter(|hook| hook.netlink_side().is_none())
        .map(|hook| hook.pin(pin_dir, iface))
        .collect()
}

/// Removes the pins at `paths` that exist; returns those removed.
fn unpin(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => removed.push(path.clone()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", path.display()));
            }
        }
    }
    Ok(removed)
}

/// Removes the pinned links of `iface`, which detaches its programs once no process
/// holds the links open (the kernel does it shortly after, see [`detach_and_wait`]), and
/// its netlink filters. Returns the pins removed.
pub fn detach(pin_dir: &Path, iface: &str) -> Result<Vec<PathBuf>> {
    let mut removed = unpin(&link_paths(pin_dir, iface))?;
    removed.extend(detach_netlink(pin_dir, &Attachment::ALL, iface)?);
    Ok(removed)
}

/// The interfaces that have pinned links under `pin_dir`, by their pin names.
pub fn pinned_interfaces(pin_dir: &Path) -> Result<Vec<String>> {
    let dir = links_dir(pin_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    let mut ifaces = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let iface = Attachment::ALL
            .iter()
            .find_map(|hook| name.strip_suffix(hook.suffix()));
        if let Some(iface) = iface
            && !ifaces.iter().any(|known| known == iface)
        {
            ifaces.push(iface.to_string());
        }
    }
    ifaces.sort();
    Ok(ifaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_kernel_is_told_what_it_lacks() {
        let lacks = missing(KernelVersion::new(5, 15, 0));
        assert_eq!(lacks.len(), 1, "{lacks:?}");
        assert!(lacks[0].contains("bpf_xdp_load_bytes"), "{lacks:?}");
        assert_eq!(
            missing(KernelVersion::new(5, 4, 0)).len(),
            4,
            "5.4 lacks all four"
        );
        assert!(
            missing(KernelVersion::new(6, 0, 0))[0].contains("no kernel before 6.1"),
            "6.0"
        );
        assert!(
            missing(KernelVersion::new(6, 1, 0)).is_empty(),
            "6.1 is supported"
        );
        assert!(
            missing(KernelVersion::new(6, 12, 0)).is_empty(),
            "6.12 is supported"
        );
    }
}
