//! The management core: the node's window for operators, never on the data path.
//!
//! It runs on its own thread (unpinned: the dataplane loops take cores 1, 2, …; see
//! ARCHITECTURE.md) with a tokio current-thread runtime serving a REST API with axum (see [`api`] for the endpoints, `/openapi.json` for the
//! document; over HTTPS only when given a certificate, see [`tls`]) and an operator's status page at `/` ([`status`]). It reads only what the dataplane publishes through the
//! [`DataplaneHandle`] — atomic counters, loop beats and disk reports — and changes
//! disk state by sending the dataplane a bounded command. It owns the node's state
//! ([`dataplane::node::NodeState`]): it publishes it at start and whenever the health
//! verdict changes ([`health::Monitor`]). What it must never do: touch a disk or a
//! data-path socket, or block the dataplane.
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod health;
pub mod metrics;
pub mod status;
pub mod supervisor;
pub mod tls;
pub mod update;

use std::future::{Future, IntoFuture};
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::handle::DataplaneHandle;
use dataplane::node::NodeState;
use tokio::sync::watch;
use utoipa::OpenApi;

pub use health::Thresholds;

/// How the management core runs (who the node is comes in its [`NodeState`]).
#[derive(Debug, Clone)]
pub struct MgmtConfig {
    /// Where the REST API listens.
    pub listen: SocketAddr,
    /// The certificate and key to serve the REST API over HTTPS only; `None`: plain
    /// HTTP.
    pub tls: Option<tls::TlsFiles>,
    /// Network backend name reported by `/v1/node` (`kernel` or `dpdk`).
    pub network_backend: String,
    /// Bearer token for the mutating endpoints; `None` disables them.
    pub token: Option<String>,
    pub thresholds: Thresholds,
    /// How long a request waits for the dataplane to carry out a command.
    pub command_wait: Duration,
    /// The A/B boot slots (`--boot-esp`); `None`: not the appliance, updates disabled.
    pub boot: Option<update::BootConfig>,
    /// The file where a supervisor that restarts dosd (the appliance's init) records
    /// the runs that ended ([`supervisor`]); read once at start.
    pub restarts_file: Option<std::path::PathBuf>,
}

/// Why the management core could not start.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the management thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot render the OpenAPI document: {0}")]
    OpenApi(String),
    #[error("boot slots (--boot-esp): {0}")]
    Boot(String),
    #[error("management TLS (--mgmt-tls-cert/--mgmt-tls-key): {0}")]
    Tls(#[from] tls::TlsError),
}

/// State shared by the handlers.
pub struct Shared {
    pub(crate) handle: DataplaneHandle,
    pub(crate) cfg: MgmtConfig,
    pub(crate) local: SocketAddr,
    pub(crate) monitor: Arc<health::Monitor>,
    /// The boot slots, when the node runs as the A/B appliance.
    pub(crate) boot: Option<Arc<update::Boot>>,
    /// What the supervisor recorded of earlier runs (`restarts_file`).
    pub(crate) restarts: Option<supervisor::RestartsView>,
    /// Rendered once at start: it never changes while the node runs.
    pub(crate) openapi: String,
    /// The management core's own counters (exported on `/metrics`).
    pub(crate) counters: Arc<metrics::MgmtCounters>,
}

/// How often the dataplane loops' turn counters are sampled for the stall rule. Well under
/// the stall threshold, so a stall is measured to within this much.
const LIVENESS_SAMPLE: Duration = Duration::from_millis(100);
/// How long a stop waits for requests in flight before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Threads for blocking waits on dataplane commands; more requests queue.
const BLOCKING_THREADS: usize = 2;

/// A running management core.
#[derive(Debug)]
pub struct Mgmt {
    addr: SocketAddr,
    https: bool,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    monitor: Arc<health::Monitor>,
}

impl Mgmt {
    /// Binds the REST address (so errors surface here, before the node says it is
    /// ready), publishes the node's state with that address in it, and starts serving
    /// on a thread of its own.
    pub fn start(
        cfg: MgmtConfig,
        handle: DataplaneHandle,
        mut node: NodeState,
    ) -> Result<Mgmt, MgmtError> {
        // The certificate first: a bad one stops the node before anything listens.
        let tls = cfg.tls.as_ref().map(tls::load).transpose()?;
        let listen_err = |source| MgmtError::Listen {
            addr: cfg.listen,
            source,
        };
        let listener = TcpListener::bind(cfg.listen).map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        if cfg.token.is_none() {
            tracing::warn!(
                "management: no --mgmt-token (mgmt_token) configured; POST endpoints \
                 (disk offline/online) are disabled"
            );
        }
        let boot = match cfg.boot.clone() {
            None => None,
            Some(b) => {
                let boot = update::Boot::open(b).map_err(MgmtError::Boot)?;
                let v = boot.view();
                tracing::info!(
                    slot = %v.slot,
                    file = v.booted_file.as_deref().unwrap_or("-"),
                    marked_good = v.marked_good,
                    tries_left = ?v.tries_left,
                    image_version = v.image_version.as_deref().unwrap_or("-"),
                    "boot slot"
                );
                Some(Arc::new(boot))
            }
        };
        let restarts = cfg.restarts_file.as_deref().and_then(|path| {
            match supervisor::read(path) {
                Ok(view) => {
                    if let Some(last) = view.recent.last() {
                        tracing::warn!(
                            restarts = view.total,
                            last_exit = %last.exit,
                            last_ran_s = last.ran_s,
                            "dosd was restarted by its supervisor after an earlier run ended"
                        );
                    }
                    Some(view)
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the supervisor's restarts");
                    None
                }
            }
        });
        let openapi = api::ApiDoc::openapi()
            .to_json()
            .map_err(|e| MgmtError::OpenApi(e.to_string()))?;
        node.addrs.mgmt = Some(local);
        handle.node.publish(node);
        let monitor = Arc::new(health::Monitor::new(
            handle.clone(),
            cfg.thresholds,
            Instant::now(),
        ));
        let shared = Arc::new(Shared {
            handle,
            cfg,
            local,
            monitor: Arc::clone(&monitor),
            boot,
            restarts,
            openapi,
            counters: Arc::new(metrics::MgmtCounters::default()),
        });
        let https = tls.is_some();
        let (stop, stopped) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(BLOCKING_THREADS)
            .thread_name("mgmt-blocking")
            .build()
            .map_err(MgmtError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("mgmt".into())
            .spawn(move || runtime.block_on(serve(listener, tls, shared, stopped)))
            .map_err(MgmtError::Thread)?;
        Ok(Mgmt {
            addr: local,
            https,
            stop,
            thread: Some(thread),
            monitor,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the REST API is served over HTTPS (and only HTTPS).
    pub fn https(&self) -> bool {
        self.https
    }

    /// The REST API's base URL, e.g. `https://127.0.0.1:7380`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The node's health monitor, for the announcer's heartbeats.
    pub fn monitor(&self) -> Arc<health::Monitor> {
        Arc::clone(&self.monitor)
    }

    /// Stops serving: requests in flight get `SHUTDOWN_GRACE` to finish.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "management: cannot serve the REST listener");
            return;
        }
    };
    // Sample the loops' counters on a timer, so a stall is measured even when nobody
    // asks for /v1/health in the meantime.
    let sampler = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            let mut tick = tokio::time::interval(LIVENESS_SAMPLE);
            loop {
                tick.tick().await;
                shared.monitor.observe(Instant::now());
            }
        }
    });
    // Once per boot, on the appliance: mark the running slot good when healthy.
    let marker = shared
        .boot
        .clone()
        .map(|boot| tokio::spawn(update::mark_when_healthy(Arc::clone(&shared), boot)));
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let counters = Arc::clone(&shared.counters);
    let app = api::router(shared);
    let shutdown = until_stopped(stopped.clone());
    // The same server either way; with TLS its listener yields only connections whose
    // handshake completed (see [`tls::TlsListener`]).
    let server: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match tls {
        None => Box::pin(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        ),
        Some(config) => Box::pin(
            axum::serve(tls::TlsListener::new(listener, config, counters), app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        ),
    };
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "management: REST server failed");
            }
        }
        () = async {
            until_stopped(stopped).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("management: stopped with requests still in flight"),
    }
    sampler.abort();
    if let Some(m) = marker {
        m.abort();
    }
}
