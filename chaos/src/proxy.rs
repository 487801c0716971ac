//! A TCP proxy in front of ClickHouse's HTTP port that misbehaves on demand (scenario 7).
//!
//! It runs on a tokio runtime of its own, so the runner stays synchronous. Each accepted
//! connection gets its own upstream connection and two pumps; the mode is read for every chunk,
//! so a change takes effect on connections already open:
//! - `Pass` forwards bytes as they come;
//! - `Latency` delays every chunk, in both directions, by [`LATENCY_MS`];
//! - `Stall` holds every response chunk until the mode changes, which the runner keeps for
//!   longer than the relay's insert timeout, so the relay's own timeout ends the request;
//! - `Reset` forwards the first half of a request chunk, then closes the client's socket with
//!   an RST (linger 0) and drops the upstream connection: a connection reset mid-request.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::schedule::ProxyMode;

/// Delay added to each chunk in `Latency` mode: a slow network, well under the insert timeout
/// for one round trip, so inserts slow down without timing out.
pub const LATENCY_MS: u64 = 300;

/// How often a stalled pump looks at the mode again.
const STALL_POLL_MS: u64 = 20;

/// Size of one read; a bound on the memory a connection holds.
const CHUNK_BYTES: usize = 64 * 1024;

/// Worker threads of the proxy's runtime: two pumps per connection need little CPU, and the
/// machine has two cores shared with the servers.
const RUNTIME_THREADS: usize = 1;

/// How many connections the proxy served and what its modes did to them.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub delayed_chunks: AtomicU64,
    pub stalled_chunks: AtomicU64,
    pub resets: AtomicU64,
}

/// The proxy: listening on a free port of 127.0.0.1 until dropped.
pub struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    stats: Arc<ProxyStats>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on 127.0.0.1:`port` and forwards to 127.0.0.1:`upstream_port`, in `Pass` mode.
    pub fn start(port: u16, upstream_port: u16) -> io::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("prism-chaos-proxy")
            .enable_all()
            .build()?;
        let listener =
            runtime.block_on(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))))?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(AtomicU8::new(encode(ProxyMode::Pass)));
        let stats = Arc::new(ProxyStats::default());
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        runtime.spawn(accept_loop(listener, upstream, mode.clone(), stats.clone()));
        Ok(Proxy {
            port,
            mode,
            stats,
            runtime: Some(runtime),
        })
    }

    /// The port the relay connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the mode for every connection, open ones included.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.store(encode(mode), Ordering::SeqCst);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn encode(mode: ProxyMode) -> u8 {
    match mode {
        ProxyMode::Pass => 0,
        ProxyMode::Latency => 1,
        ProxyMode::Stall => 2,
        ProxyMode::Reset => 3,
    }
}

fn decode(value: u8) -> ProxyMode {
    match value {
        1 => ProxyMode::Latency,
        2 => ProxyMode::Stall,
        3 => ProxyMode::Reset,
        _ => ProxyMode::Pass,
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: Arc<AtomicU8>,
    stats: Arc<ProxyStats>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or the like: the client retries, so does the loop.
            tokio::time::sleep(Duration::from_millis(STALL_POLL_MS)).await;
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(client, upstream, mode.clone(), stats.clone()));
    }
}

/// Which way a pump carries bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// How a connection ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// One side closed or failed.
    Closed,
    /// The mode asked for a reset mid-request.
    Reset,
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mode: Arc<AtomicU8>,
    stats: Arc<ProxyStats>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        // ClickHouse is down: the client sees its connection closed, as it would see a refusal.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let request = pump(
            &mut client_read,
            &mut server_write,
            Direction::Request,
            &mode,
            &stats,
        );
        let response = pump(
            &mut server_read,
            &mut client_write,
            Direction::Response,
            &mode,
            &stats,
        );
        // Either side ending (a close, an error, a reset) ends the connection.
        tokio::select! {
            end = request => end,
            end = response => end,
        }
    };
    if end == End::Reset {
        // Linger 0 makes the close an RST: the client sees "connection reset" mid-request.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies `from` to `to` chunk by chunk under the current mode.
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    direction: Direction,
    mode: &AtomicU8,
    stats: &ProxyStats,
) -> End {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return End::Closed,
            Ok(n) => n,
        };
        match (decode(mode.load(Ordering::SeqCst)), direction) {
            (ProxyMode::Latency, _) => {
                stats.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(LATENCY_MS)).await;
            }
            (ProxyMode::Stall, Direction::Response) => {
                stats.stalled_chunks.fetch_add(1, Ordering::Relaxed);
                while decode(mode.load(Ordering::SeqCst)) == ProxyMode::Stall {
                    tokio::time::sleep(Duration::from_millis(STALL_POLL_MS)).await;
                }
            }
            (ProxyMode::Reset, Direction::Request) => {
                stats.resets.fetch_add(1, Ordering::Relaxed);
                let _ = to.write_all(&buf[..n / 2]).await;
                return End::Reset;
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every byte back and counts what it received.
    fn echo_upstream(rt: &tokio::runtime::Runtime) -> (u16, Arc<AtomicU64>) {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the echo server");
        let port = listener.local_addr().expect("echo address").port();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        rt.spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (port, received)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("test runtime")
    }

    async fn round_trip(port: u16, message: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(message).await?;
        let mut back = vec![0u8; message.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    }

    async fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn pass_and_latency_modes_forward_every_byte_and_latency_delays_each_chunk() {
        let rt = runtime();
        let (upstream, _) = echo_upstream(&rt);
        let proxy = Proxy::start(0, upstream).expect("proxy");
        let port = proxy.port();
        let back = rt.block_on(round_trip(port, b"SELECT 1")).expect("pass");
        assert_eq!(back, b"SELECT 1");
        assert_eq!(proxy.stats().delayed_chunks.load(Ordering::SeqCst), 0);
        proxy.set_mode(ProxyMode::Latency);
        let back = rt
            .block_on(round_trip(port, b"INSERT rows"))
            .expect("latency");
        assert_eq!(back, b"INSERT rows");
        assert!(proxy.stats().delayed_chunks.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn stall_holds_the_response_until_the_mode_changes_then_delivers_it_whole() {
        let rt = runtime();
        let (upstream, received) = echo_upstream(&rt);
        let proxy = Proxy::start(0, upstream).expect("proxy");
        proxy.set_mode(ProxyMode::Stall);
        let port = proxy.port();
        let answer = rt.spawn(round_trip(port, b"held answer"));
        rt.block_on(wait_for("the response stalls", || {
            proxy.stats().stalled_chunks.load(Ordering::SeqCst) >= 1
        }));
        // The request went through: only the answer is held.
        assert_eq!(received.load(Ordering::SeqCst), 11);
        assert!(!answer.is_finished(), "a stalled answer must not arrive");
        proxy.set_mode(ProxyMode::Pass);
        let back = rt
            .block_on(answer)
            .expect("join")
            .expect("the answer after the stall");
        assert_eq!(back, b"held answer");
    }

    #[test]
    fn reset_forwards_half_a_request_and_resets_the_client_connection() {
        let rt = runtime();
        let (upstream, received) = echo_upstream(&rt);
        let proxy = Proxy::start(0, upstream).expect("proxy");
        proxy.set_mode(ProxyMode::Reset);
        let outcome = rt.block_on(round_trip(proxy.port(), b"0123456789"));
        assert!(
            outcome.is_err(),
            "the client sees its request fail: {outcome:?}"
        );
        assert_eq!(proxy.stats().resets.load(Ordering::SeqCst), 1);
        rt.block_on(wait_for("half the request upstream", || {
            received.load(Ordering::SeqCst) == 5
        }));
    }
}
