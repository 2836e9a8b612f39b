//! Client connections for [`crate::serve`]: the accept loop and the limits that keep slow, idle or
//! hostile clients from tying the server up. `axum::serve` sets none of them (hyper's header read
//! timeout needs a timer that axum does not give it), so a client sending one byte a second, or
//! connecting and sending nothing, would hold a task and a file descriptor forever.
//!
//! - at most [`ConnLimits::max_connections`] open connections; past that a new one is closed at
//!   once (shedding load beats letting the kernel backlog fill while nobody is served);
//! - a connection must send its first byte within [`ConnLimits::read_timeout`] (hyper's protocol
//!   sniffing waits forever otherwise), and each request head (first or between keep-alive
//!   requests) must be complete within it (hyper's HTTP/1 header read timeout);
//! - a request head is at most [`ConnLimits::max_header_bytes`] (bigger is a 431);
//! - a request body that sends nothing for [`ConnLimits::read_timeout`] fails, so a stalled upload
//!   does not keep its temp file and task (bodies without Content-Length included).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What one client connection may cost the server.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open client connections at most; a new connection past it is closed at once.
    pub max_connections: usize,
    /// Longest silence allowed while the server waits for a request head or request body bytes.
    pub read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
}

/// Request heads above this are refused: Nix and our client send well under 1 KiB, and hyper's
/// default (~400 KiB a connection) would let idle connections pin a lot of memory.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            read_timeout: Duration::from_secs(30),
            max_header_bytes: MAX_HEADER_BYTES,
        }
    }
}

/// Accepts connections on `listener` and serves `app` on each until `shutdown` resolves, then
/// stops accepting and waits for the open requests to finish (as `axum::serve` does).
pub async fn serve_tcp(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    accept_loop(
        listener,
        limits,
        shutdown,
        move |stream, addr, watcher, stop| {
            let app = app.clone();
            async move {
                tokio::select! {
                    _ = serve_connection(stream, addr, app, limits, watcher) => {}
                    // Connections that never sent a byte have no request to finish.
                    _ = stop.cancelled() => {}
                }
            }
        },
    )
    .await
}

/// The accept loop shared by plain HTTP and HTTPS: at most `max_connections` open connections
/// (newer ones are closed at once), each handled by `handle` in its own task. On `shutdown` it
/// stops accepting, cancels `stop` for connections with no request yet, and waits for the rest.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    handle: F,
) -> std::io::Result<()>
where
    F: Fn(TcpStream, SocketAddr, Watcher, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(client = %addr, limit = limits.max_connections,
                "too many open connections: closing a new one");
            continue;
        };
        // Small responses (narinfo) should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let work = handle(stream, addr, graceful.watcher(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            work.await;
        });
    }
    drop(listener);
    stop.cancel();
    graceful.shutdown().await;
    Ok(())
}

/// Serves one accepted TCP connection: waits (bounded) for its first byte, then serves HTTP/1 or
/// HTTP/2 with the limits. A TLS layer can call [`serve_io`] after its handshake instead.
pub async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    app: Router,
    limits: ConnLimits,
    watcher: Watcher,
) {
    // `peek`, not `readable()`: a fresh socket can report readiness before any byte arrived.
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.read_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => serve_io(stream, addr, app, limits, watcher).await,
        Ok(_) => {}
        Err(_) => tracing::debug!(client = %addr, "closed a connection that sent nothing"),
    }
}

/// Serves HTTP on an established byte stream (plain TCP or TLS) with the limits.
pub async fn serve_io<I>(io: I, addr: SocketAddr, app: Router, limits: ConnLimits, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::ServiceBuilder::new()
        .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
            // What `into_make_service_with_connect_info` would insert: handlers log the client.
            req.extensions_mut().insert(ConnectInfo(addr));
            req
        })
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.read_timeout,
        ))
        .map_request(|req: http::Request<_>| req.map(axum::body::Body::new))
        .service(app);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(limits.read_timeout)
        .keep_alive_timeout(limits.read_timeout);
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::trace!(client = %addr, error = %e, "connection ended with an error");
    }
}
