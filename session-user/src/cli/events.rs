//! `session events`: follows the daemon's event stream. The daemon sends typed
//! [`EventRecord`](crate::daemon::events::record::EventRecord)s as JSON lines; `--json` passes them through as they are, otherwise each
//! is read back into the record and printed as its human line.

use std::path::Path;

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::daemon::events::{record::StreamLine, socket_path};

/// The human form of one line of the stream.
fn human(line: &str) -> Result<String> {
    let line: StreamLine = serde_json::from_str(line)
        .with_context(|| format!("the daemon sent an event this client cannot read: {line}"))?;
    Ok(match line {
        StreamLine::Lost(lost) => {
            format!("-- {} events lost: this client read too slowly", lost.lost)
        }
        StreamLine::SetChange(change) => change.human_line(),
        StreamLine::Event(event) => event.human_line(),
    })
}

/// Prints the daemon's event stream until interrupted.
pub async fn follow(pin_dir: &Path, json: bool) -> Result<()> {
    let socket = socket_path(pin_dir);
    let stream = UnixStream::connect(&socket).await.map_err(|error| {
        let hint = match error.kind() {
            std::io::ErrorKind::PermissionDenied => "the events socket is root's: run this command as root".to_string(),
            _ => format!(
                "no session daemon serves events for pin directory {}: start one with `session run --config FILE` (or pass the --pin-dir it uses)",
                pin_dir.display()
            ),
        };
        anyhow::anyhow!("{hint} ({}: {error})", socket.display())
    })?;
    let mut lines = BufReader::new(stream).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines
        .next_line()
        .await
        .context("reading the event stream")?
    {
        let out = if json { line } else { human(&line)? };
        stdout.write_all(out.as_bytes()).await?;
        stdout.write_all(b"\n").await?;
        stdout.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_of_the_stream_prints_as_text() {
        assert_eq!(
            human(r#"{"lost":7}"#).expect("a lost line"),
            "-- 7 events lost: this client read too slowly"
        );
        let event = r#"{"time":"2026-11-23T17:06:10.568Z","events":["closed"],"family":"ipv6",
            "proto":"udp","src":"2001:2::1","sport":53,"dst":"2001:2::2","dport":5353,
            "state":"established","action":"accept","direction":"out","iface":"eth0","rule":"dns"}"#;
        assert_eq!(
            human(event).expect("an event"),
            "2026-11-23T17:06:10.568Z [CLOSED] udp [2001:2::1]:53 -> [2001:2::2]:5353 out eth0 established accept rule=dns"
        );
    }

    #[test]
    fn a_line_this_client_cannot_read_is_an_error_not_an_empty_line() {
        let error = human(r#"{"events":["new"]}"#).expect_err("fields are missing");
        assert!(format!("{error:#}").contains("cannot read"), "{error:#}");
    }
}
