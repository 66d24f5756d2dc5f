//! A TCP proxy in front of the broker or the database that a test cuts, freezes and restores, to
//! simulate an outage without touching the shared services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::services::{broker_address, database_address, with_port};

/// Proxies `127.0.0.1:port` to an upstream. Cut, it drops every connection and refuses new ones;
/// frozen, it keeps the connections open but forwards nothing, like a server that stopped
/// answering; restored, it forwards again.
pub struct CuttableProxy {
    /// The port it listens on.
    pub port: u16,
    state: watch::Sender<State>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Frozen,
    Cut,
}

impl CuttableProxy {
    /// Proxies to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, watcher) = watch::channel(State::Open);
        let refused = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&refused);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *watcher.borrow() == State::Cut {
                    counted.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                tokio::spawn(forward(inbound, upstream, watcher.clone()));
            }
        });
        Self {
            port,
            state,
            refused,
            task,
        }
    }

    /// Proxies to the broker of `AMQP_URL`.
    pub async fn to_broker() -> Self {
        Self::start(broker_address()).await
    }

    /// Proxies to the Postgres server of a `postgres://` URL.
    pub async fn to_database(database_url: &str) -> Self {
        Self::start(database_address(database_url)).await
    }

    /// Drops every proxied connection and refuses new ones until [`CuttableProxy::restore`].
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Keeps the connections but forwards nothing until [`CuttableProxy::restore`].
    pub fn freeze(&self) {
        self.state.send_replace(State::Frozen);
    }

    /// Forwards again; connections dropped while cut stay dropped.
    pub fn restore(&self) {
        self.state.send_replace(State::Open);
    }

    /// How many connections were refused while cut.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// A broker URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `database_url` with its host and port replaced by this proxy's.
    pub fn database_url(&self, database_url: &str) -> String {
        with_port(database_url, self.port)
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Forwards one connection both ways until either side closes or the proxy is cut.
async fn forward(inbound: TcpStream, upstream: SocketAddr, state: watch::Receiver<State>) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let (from_client, to_client) = inbound.into_split();
    let (from_server, to_server) = outbound.into_split();
    let mut cut = state.clone();
    tokio::select! {
        () = pump(from_client, to_server, state.clone()) => {}
        () = pump(from_server, to_client, state) => {}
        _ = cut.wait_for(|state| *state == State::Cut) => {}
    }
}

/// Copies one direction, holding the data back while frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut state: watch::Receiver<State>) {
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if state.wait_for(|state| *state == State::Open).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
