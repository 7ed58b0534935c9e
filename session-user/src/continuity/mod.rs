//! Sessions that outlive the firewall: the saved-table file, importing sessions into
//! the table (takeover at first start, restore) and reading them from the kernel's
//! conntrack and the host's sockets. The record itself is `session_common::record`.

pub mod commands;
pub mod conntrack;
pub mod file;
pub mod import;
pub mod netlink;
pub mod sock_diag;
pub mod takeover;

/// Seeds a table the daemon just created, before the programs attach: first the sessions
/// saved in `restore` (if given), then those the host already has (takeover), which add
/// only flows the file did not hold. Failures are logged, not fatal: a firewall that
/// refused to start over a damaged file or an unreadable conntrack table would leave the
/// host unprotected, which is worse than starting with fewer sessions.
pub fn seed(
    maps: &crate::bpf::pinned::PinnedMaps,
    restore: Option<&std::path::Path>,
    settings: &session_common::wire::Settings,
    protected: &[u32],
) {
    if let Some(file) = restore {
        if file.exists() {
            match commands::restore_into(maps, file) {
                Ok(report) => log::info!("{}", commands::describe(&report, file)),
                Err(error) => log::error!("restore refused, starting without it: {error:#}"),
            }
        } else {
            log::info!(
                "{}: no saved table to restore (none was saved yet)",
                file.display()
            );
        }
    }
    if let Err(error) = takeover::take_over(maps, settings, protected) {
        log::error!("takeover failed, starting without it: {error:#}");
    }
}
