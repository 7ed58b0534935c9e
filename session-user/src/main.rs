//! The `session` command: a stateful eBPF firewall daemon and the tools to inspect it.
//! Everything it does lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    session_user::cli::commands::main()
}
