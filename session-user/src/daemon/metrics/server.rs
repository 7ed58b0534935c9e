//! The metrics endpoint's HTTP side, deliberately tiny (one path, one request per
//! connection, `Connection: close`): that is all a Prometheus scraper needs, and it keeps
//! the daemon free of a web stack.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::{
    bpf::pinned::PinnedMaps,
    daemon::metrics::{families::CONTENT_TYPE, snapshot::Snapshot},
};

/// Longest request head read; a scraper's GET is a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request, so an idle connection cannot pin a slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once, so a misbehaving client cannot
/// make the daemon read the maps in a tight loop.
const MAX_CONNECTIONS: usize = 8;

/// The running endpoint; dropping it stops the server, so it lives as long as the daemon.
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the metrics of the instance pinned under `pin_dir` in a
/// background task. Binding happens here so that a taken port stops the daemon before it
/// attaches to anything.
pub async fn start(addr: SocketAddr, pin_dir: &Path) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for metrics on {addr} (`[metrics] listen` in the config): \
             is the address local to this host and the port free?"
        )
    })?;
    info!("metrics: serving http://{addr}/metrics");
    let task = tokio::spawn(accept_loop(listener, pin_dir.to_path_buf()));
    Ok(MetricsServer { task })
}

async fn accept_loop(listener: TcpListener, pin_dir: PathBuf) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Without a free slot the stream is dropped, which closes it.
                if let Ok(permit) = slots.clone().try_acquire_owned() {
                    let pin_dir = pin_dir.clone();
                    tokio::spawn(async move {
                        if let Err(error) = serve_one(stream, pin_dir).await {
                            log::debug!("metrics: {error:#}");
                        }
                        drop(permit);
                    });
                }
            }
            Err(error) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!("metrics: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (or `HEAD`, which gets the headers only).
    Metrics { head: bool },
    /// `GET /`: a pointer to `/metrics` for someone trying the address in a browser.
    Index { head: bool },
    /// Another path.
    NotFound,
    /// A method other than GET and HEAD.
    MethodNotAllowed,
    /// Not an HTTP request line.
    BadRequest,
}

/// Routes a request by its first line; headers do not matter for one read-only path.
fn route(head: &str) -> Route {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => Route::Metrics { head },
        "/" => Route::Index { head },
        _ => Route::NotFound,
    }
}

/// Reads the request head: up to the blank line, [`MAX_REQUEST`] bytes or end of stream.
async fn read_head(stream: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await.context("reading a request")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn serve_one(mut stream: TcpStream, pin_dir: PathBuf) -> Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .context("the client sent no complete request in time")??;
    let (status, content_type, body, head_only) = match route(&head) {
        Route::Metrics { head } => {
            // Reading the maps is blocking syscalls (a big table takes a while): keep it
            // off the thread that runs the daemon's signal handling and reaper.
            let scraped = tokio::task::spawn_blocking(move || {
                let maps = PinnedMaps::open(&pin_dir)?;
                Snapshot::read(&maps).map(|snapshot| snapshot.render())
            })
            .await
            .context("the metrics reader panicked")?;
            match scraped {
                Ok(text) => ("200 OK", CONTENT_TYPE, text, head),
                Err(error) => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("cannot read the firewall's maps: {error:#}\n"),
                    head,
                ),
            }
        }
        Route::Index { head } => (
            "200 OK",
            "text/plain; charset=utf-8",
            "session firewall: metrics are at /metrics\n".to_string(),
            head,
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD are supported\n".to_string(),
            false,
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "expected an HTTP/1.x request\n".to_string(),
            false,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    stream
        .write_all(response.as_bytes())
        .await
        .context("writing the response")?;
    stream.shutdown().await.context("closing the connection")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("GET /metrics?name[]=x HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(
            route("GET / HTTP/1.1\r\n\r\n"),
            Route::Index { head: false }
        );
        assert_eq!(route("GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route("hello\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }
}
