//! The session(1) manual page, generated from the command line's own help so that the two
//! never disagree, plus the sections an operator of the installed daemon needs.

use anyhow::Result;
use clap::CommandFactory as _;
use clap_mangen::{
    Man,
    roff::{Roff, bold, italic, roman},
};

use std::io::Write as _;

use crate::{bpf::pinned::DEFAULT_PIN_DIR, cli::args::Cli};

/// The session(1) manual page: clap_mangen's title, name, synopsis, description and
/// options of `session`; a list of the commands; one section per command with its own
/// synopsis, description and options; then what an operator of the installed daemon
/// needs (signals, files, environment, exit status) and the version.
pub fn man_page() -> Result<Vec<u8>> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let man = Man::new(cli.clone()).manual("session manual");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;

    let commands: Vec<&clap::Command> =
        cli.get_subcommands().filter(|c| !c.is_hide_set()).collect();
    let mut list = Roff::new();
    list.control("SH", ["COMMANDS"]);
    for command in &commands {
        list.control("TP", []);
        list.text([bold(format!("session {}", command.get_name()))]);
        if let Some(about) = command.get_about() {
            list.text([roman(about.to_string())]);
        }
    }
    list.text([roman("Each command is described in its own section below.")]);
    list.to_writer(&mut page)?;

    for command in commands {
        let mut heading = Roff::new();
        heading.control(
            "SH",
            [format!("SESSION {}", command.get_name().to_uppercase()).as_str()],
        );
        heading.to_writer(&mut page)?;
        // The command's own sections become subsections of its section.
        let sub = Man::new(command.clone());
        let mut sections = Vec::new();
        sub.render_synopsis_section(&mut sections)?;
        sub.render_description_section(&mut sections)?;
        sub.render_options_section(&mut sections)?;
        for line in String::from_utf8(sections)?.lines() {
            match line.strip_prefix(".SH ") {
                Some(title) => writeln!(page, ".SS {title}")?,
                None => writeln!(page, "{line}")?,
            }
        }
    }

    operator_sections().to_writer(&mut page)?;
    man.render_version_section(&mut page)?;

    // Every rendered piece starts with roff's apostrophe preamble; keep only the first.
    let preamble = Roff::new().render();
    let body = String::from_utf8(page)?.replace(&preamble, "");
    Ok(format!("{preamble}{body}").into_bytes())
}

/// The man page sections that are not in the command line's help: signals, files,
/// environment, exit status, see also.
fn operator_sections() -> Roff {
    let mut roff = Roff::new();
    let entry = |roff: &mut Roff, term: clap_mangen::roff::Inline, text: &str| {
        roff.control("TP", []);
        roff.text([term]);
        roff.text([roman(text)]);
    };
    roff.control("SH", ["SIGNALS"]);
    roff.text([roman("Handled by "), bold("session run"), roman(":")]);
    entry(
        &mut roff,
        bold("SIGHUP"),
        "Read the config file again and apply it. An invalid file is logged and the running \
         policy stays in force; interface changes need a restart.",
    );
    entry(
        &mut roff,
        bold("SIGINT, SIGTERM"),
        "Exit 0. The programs stay attached through their pinned links and keep enforcing \
         the last applied policy; the next daemon adopts them. session down removes them.",
    );
    roff.control("SH", ["FILES"]);
    entry(
        &mut roff,
        italic("/etc/session/session.toml"),
        "The configuration the packaged systemd unit (session.service) runs. The format is \
         described in the commented example session.toml.example.",
    );
    entry(
        &mut roff,
        italic(DEFAULT_PIN_DIR),
        "The default pin directory: the firewall's maps, pinned on the BPF filesystem.",
    );
    entry(
        &mut roff,
        italic(format!("{DEFAULT_PIN_DIR}/links")),
        "The pinned XDP and TCX links (IFACE-xdp or IFACE-tc-ingress, and IFACE-tc) that \
         keep the programs attached while no daemon runs; session down removes them.",
    );
    entry(
        &mut roff,
        italic("/run/session/*.lock"),
        "One lock file per pin directory, held by the running daemon; it records the \
         daemon's pid and config file for session reload.",
    );
    roff.control("SH", ["ENVIRONMENT"]);
    entry(
        &mut roff,
        bold("SESSION_PIN_DIR"),
        "The pin directory when --pin-dir is not given.",
    );
    entry(
        &mut roff,
        bold("RUST_LOG"),
        "Log level of the messages on stderr: error, warn, info (the default) or debug.",
    );
    roff.control("SH", ["EXIT STATUS"]);
    entry(&mut roff, bold("0"), "Success.");
    entry(
        &mut roff,
        bold("1"),
        "An error, printed on stderr: an invalid config file (as FILE:LINE:COL: message), \
         no running daemon, missing privileges, an interface that does not exist.",
    );
    entry(&mut roff, bold("2"), "Invalid command-line arguments.");
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("conntrack"),
        roman("(8), "),
        bold("nft"),
        roman("(8), "),
        bold("systemctl"),
        roman("(1), "),
        bold("bpftool"),
        roman("(8)"),
    ]);
    roff
}
