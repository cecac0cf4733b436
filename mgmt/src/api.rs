//! The REST API (`/v1`), its JSON shapes and its OpenAPI document.
//!
//! Handlers only read what the dataplane published (counters, disk reports) or send it
//! a typed command through the handle; the blocking wait for a command's answer runs
//! on tokio's blocking pool so that other requests keep being served meanwhile.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use dataplane::store::{DiskId, DiskReport, DiskState};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::{json_errors, ApiError, ErrorBody};
use crate::health::{self, Health};
use crate::update::{self, BootView, Slot, UpdateView};
use crate::{auth, metrics, Shared};

/// Largest request body accepted (the only bodies are small JSON objects).
const BODY_MAX: usize = 4096;
/// Longest `reason` an operator may attach to a state change.
const REASON_MAX: usize = 256;

/// A disk's state, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskStateView {
    Online,
    Offline,
    Down,
}

impl From<DiskState> for DiskStateView {
    fn from(s: DiskState) -> Self {
        match s {
            DiskState::Online => DiskStateView::Online,
            DiskState::Offline => DiskStateView::Offline,
            DiskState::Down => DiskStateView::Down,
        }
    }
}

/// One disk: identity, where it is, its state and capacity.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DiskView {
    pub id: u16,
    /// The identity written in the disk's superblock (32 hex digits).
    pub identity: String,
    /// Block backend: `file`, `memory`, …
    pub backend: String,
    /// Path or PCI address.
    pub location: String,
    pub state: DiskStateView,
    pub bytes_total: u64,
    /// Not used by live or dead records.
    pub bytes_free: u64,
    /// Free plus reclaimable dead bytes.
    pub bytes_available: u64,
    /// Bytes of deleted or superseded records awaiting compaction.
    pub bytes_dead: u64,
    /// Bytes of the log in use: live, dead and open records, and the bytes packing
    /// skipped. Divided by `objects_used`, what an object costs on this disk.
    pub bytes_used: u64,
    pub objects_used: u64,
    pub objects_available: u64,
    /// Open writes on the disk.
    pub outstanding_ops: u32,
    /// Errors since start: device errors, blocks failing their checksum, a disk that
    /// could not be opened.
    pub errors: u64,
    /// The most recent error, or null if there was none since start. An object that
    /// failed its checksum is named here by its fingerprint.
    #[schema(required = true)]
    pub last_error: Option<LastErrorView>,
    /// Objects of this disk found failing their checksum since start (by a read or by
    /// compaction) and still stored, each counted once however often it fails. Any
    /// makes the node `degraded`: restore them from a replica, then delete and store
    /// them again.
    pub corrupt_objects: u64,
    /// Blocks found failing their checksum since start, each time one is met.
    pub corrupt_blocks: u64,
    /// Reads completed on the device since start (failed ones count as errors).
    pub read_ops: u64,
    pub read_bytes: u64,
    /// Writes completed on the device since start.
    pub write_ops: u64,
    pub write_bytes: u64,
    /// Flushes (cache flush / FUA barriers) completed since start.
    pub flushes: u64,
    /// The device's own health data (NVMe SMART / health log). Null when the backend
    /// has none: the `file` and `memory` backends never do, and nothing is made up
    /// in its place.
    #[schema(required = true)]
    pub health: Option<DiskHealthView>,
}

/// A disk's most recent error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LastErrorView {
    pub message: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Device health as NVMe reports it in its SMART / health information log page
/// (NVMe 2.0 §5.16.1.3). Only a backend that talks to the device itself can fill it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DiskHealthView {
    /// Critical warning bits (0: none).
    pub critical_warning: u8,
    /// Composite temperature in kelvins.
    pub temperature_kelvin: u16,
    /// Spare capacity left, in percent.
    pub available_spare: u8,
    /// Vendor estimate of life used, in percent (may exceed 100).
    pub percentage_used: u8,
    /// Unrecovered data integrity errors over the device's life.
    pub media_errors: u64,
    pub power_on_hours: u64,
    /// Times the device lost power without a shutdown notification.
    pub unsafe_shutdowns: u64,
    /// Entries the device has logged in its Error Information log over its life
    /// (NVMe "Number of Error Information Log Entries").
    pub error_log_entries: u64,
}

impl From<&DiskReport> for DiskView {
    fn from(d: &DiskReport) -> Self {
        DiskView {
            id: d.id.0,
            identity: hex::encode(d.identity),
            backend: d.backend.to_string(),
            location: d.location.clone(),
            state: d.state.into(),
            bytes_total: d.bytes_total,
            bytes_free: d.bytes_free,
            bytes_available: d.bytes_available,
            bytes_dead: d.bytes_dead,
            bytes_used: d.bytes_used,
            objects_used: d.objects_used,
            objects_available: d.objects_available,
            outstanding_ops: d.outstanding_ops,
            errors: d.errors,
            last_error: d.last_error.as_ref().map(|e| LastErrorView {
                message: e.message.clone(),
                at_unix_ms: e.at_unix_ms,
            }),
            corrupt_objects: d.corrupt_objects,
            corrupt_blocks: d.corrupt_blocks,
            read_ops: d.io.read_ops,
            read_bytes: d.io.read_bytes,
            write_ops: d.io.write_ops,
            write_bytes: d.io.write_bytes,
            flushes: d.io.flushes,
            // Only the NVMe backend reads a health log; files and memory have none,
            // and say so (null) rather than invent numbers.
            health: d.health.as_ref().map(|h| DiskHealthView {
                critical_warning: h.critical_warning,
                temperature_kelvin: h.temperature_kelvin,
                available_spare: h.available_spare,
                percentage_used: h.percentage_used,
                media_errors: u64::try_from(h.media_errors).unwrap_or(u64::MAX),
                power_on_hours: u64::try_from(h.power_on_hours).unwrap_or(u64::MAX),
                unsafe_shutdowns: u64::try_from(h.unsafe_shutdowns).unwrap_or(u64::MAX),
                error_log_entries: u64::try_from(h.error_log_entries).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// Every disk of the node.
#[derive(Debug, Serialize, ToSchema)]
pub struct DisksView {
    pub disks: Vec<DiskView>,
}

/// Where the node can be reached.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Addresses {
    /// DOSP, TCP and UDP (HOST:PORT).
    pub dosp: String,
    /// The cluster's multicast group (GROUP:PORT).
    pub multicast_group: String,
    /// The local interface multicast is sent from.
    pub multicast_if: String,
    /// This REST endpoint.
    pub mgmt: String,
}

/// Backends in use.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Backends {
    /// Network: `kernel` (sockets) or `dpdk`.
    pub network: String,
    /// Block backends of the disks, each named once.
    pub disks: Vec<String>,
}

/// The node's role in a failover pair.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Standalone,
    Active,
    Passive,
}

impl From<dataplane::node::Role> for Role {
    fn from(r: dataplane::node::Role) -> Role {
        match r {
            dataplane::node::Role::Standalone => Role::Standalone,
            dataplane::node::Role::Active => Role::Active,
            dataplane::node::Role::Passive => Role::Passive,
        }
    }
}

/// Who the node is.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    /// 16 hex digits: the 64-bit id the node has on the wire (for a named node, the
    /// first 8 bytes of the MD5 of its name, little-endian).
    pub node_id: String,
    /// The name the operator gave the node (1 to 32 printable ASCII characters, no
    /// spaces), or null if it was given a number or none.
    #[schema(required = true)]
    pub node_name: Option<String>,
    /// Increments on each start.
    pub epoch: u64,
    pub version: String,
    pub uptime_ms: u64,
    pub role: Role,
    pub addresses: Addresses,
    pub backends: Backends,
    /// Whether POST endpoints are enabled (a token is configured).
    pub mutations_enabled: bool,
    /// The A/B boot slots, or null when the node does not run as the appliance
    /// (no `--boot-esp`: `POST /v1/update` answers 409).
    #[schema(required = true)]
    pub boot: Option<BootView>,
    /// Runs of dosd that ended and were restarted by its supervisor (the appliance's
    /// init, which records them in `<data dir>/restarts`); zero with none, null when
    /// that file could not be read.
    #[schema(required = true)]
    pub restarts: Option<crate::supervisor::RestartsView>,
}

/// Optional body of a state change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateChangeRequest {
    /// Why, for the log (at most 256 bytes).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The dataplane port's addresses.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AddressesView {
    /// Whether the node owns its data-path addresses (`--net dpdk`); with the kernel
    /// backend they are the host's (`ip addr`) and the list is empty.
    pub managed: bool,
    /// `ADDR/PREFIX`, the port's own address first, then the service addresses.
    pub addresses: Vec<String>,
}

/// A service address to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddAddressRequest {
    /// `ADDR/PREFIX`, e.g. `10.0.0.9/24` (IPv4).
    #[schema(
        pattern = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])$"
    )]
    pub addr: String,
    /// Send a gratuitous ARP for it (default true), so neighbours learn at once.
    #[serde(default)]
    pub announce: Option<bool>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dosd management API",
        description = "Node identity, disk state and status, health and metrics of a dosd storage node."
    ),
    paths(
        node, disks, disk, disk_offline, disk_online, addresses_get, address_add,
        address_remove, update::update_post, health_get, metrics_get, openapi_get
    ),
    components(schemas(
        NodeView, Addresses, Backends, Role, DisksView, DiskView, DiskStateView,
        LastErrorView, DiskHealthView,
        StateChangeRequest, AddressesView, AddAddressRequest, ErrorBody, Health, health::Reason, health::ReasonKind,
        health::Status, health::Thresholds, BootView, Slot, UpdateView, update::UkiImage,
        crate::supervisor::RestartsView, crate::supervisor::ExitView
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The router, with JSON errors for everything that fails.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        // The operator's status page: HTML, not API (not in the OpenAPI document).
        .route("/", get(crate::status::page))
        .route("/v1/node", get(node))
        .route("/v1/disks", get(disks))
        .route("/v1/disks/{id}", get(disk))
        .route("/v1/disks/{id}/offline", post(disk_offline))
        .route("/v1/disks/{id}/online", post(disk_online))
        .route("/v1/addresses", get(addresses_get).post(address_add))
        .route("/v1/addresses/{addr}", delete(address_remove))
        .route("/v1/update", post(update::update_post))
        .route("/v1/health", get(health_get))
        .route("/metrics", get(metrics_get))
        .route("/openapi.json", get(openapi_get))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(shared)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such resource: {} (see /openapi.json)",
        uri.path()
    ))
}

/// Parses a disk id from the path and finds its report.
fn find_disk(reports: &[DiskReport], id: &str) -> Result<DiskId, ApiError> {
    let n: u16 = id.parse().map_err(|_| {
        ApiError::BadRequest(format!("bad disk id {id:?}: expected a number 0..=65535"))
    })?;
    if reports.iter().any(|d| d.id.0 == n) {
        Ok(DiskId(n))
    } else {
        Err(ApiError::NotFound(format!(
            "no disk {n}: this node has {} disks, 0 to {}",
            reports.len(),
            reports.len().saturating_sub(1)
        )))
    }
}

/// Node identity, addresses and backends.
#[utoipa::path(get, path = "/v1/node", responses((status = 200, body = NodeView)))]
async fn node(State(s): State<Arc<Shared>>) -> Json<NodeView> {
    let mut disk_backends: Vec<String> = s
        .handle
        .disks
        .snapshot()
        .iter()
        .map(|d| d.backend.to_string())
        .collect();
    disk_backends.sort_unstable();
    disk_backends.dedup();
    let node = s.handle.node.snapshot();
    Json(NodeView {
        node_id: format!("{:016x}", node.node_id),
        node_name: node.name.as_ref().map(ToString::to_string),
        epoch: node.epoch,
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: node.uptime_ms(Instant::now()),
        role: node.role.into(),
        addresses: Addresses {
            dosp: node.addrs.dosp.to_string(),
            multicast_group: node.addrs.multicast_group.to_string(),
            multicast_if: node.addrs.multicast_if.to_string(),
            mgmt: node.addrs.mgmt.unwrap_or(s.local).to_string(),
        },
        backends: Backends {
            network: s.cfg.network_backend.clone(),
            disks: disk_backends,
        },
        mutations_enabled: s.cfg.token.is_some(),
        boot: s.boot.as_ref().map(|b| b.view()),
        restarts: s.restarts.clone(),
    })
}

/// Every disk, in id order.
#[utoipa::path(get, path = "/v1/disks", responses((status = 200, body = DisksView)))]
async fn disks(State(s): State<Arc<Shared>>) -> Json<DisksView> {
    Json(DisksView {
        disks: s
            .handle
            .disks
            .snapshot()
            .iter()
            .map(DiskView::from)
            .collect(),
    })
}

/// One disk.
#[utoipa::path(
    get,
    path = "/v1/disks/{id}",
    params(("id" = u16, Path, minimum = 0, maximum = 65535, description = "Disk id, 0 to the number of disks less one")),
    responses(
        (status = 200, body = DiskView),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
    )
)]
async fn disk(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<DiskView>, ApiError> {
    let reports = s.handle.disks.snapshot();
    let id = find_disk(&reports, &id)?;
    let d = reports
        .iter()
        .find(|d| d.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("no disk {}", id.0)))?;
    Ok(Json(DiskView::from(d)))
}

/// Takes a disk out of service: it accepts no new objects and its objects are reported
/// unavailable (DISK_OFFLINE); nothing on it is lost.
#[utoipa::path(
    post,
    path = "/v1/disks/{id}/offline",
    params(("id" = u16, Path, minimum = 0, maximum = 65535, description = "Disk id")),
    request_body(content = Option<StateChangeRequest>, description = "Optional: why", content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The disk as it is now", body = DiskView),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "No token configured: mutations disabled", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The dataplane refused the change", body = ErrorBody),
        (status = 503, description = "The dataplane is busy or did not answer in time", body = ErrorBody),
    )
)]
async fn disk_offline(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DiskView>, ApiError> {
    change_state(s, &headers, &id, &body, DiskState::Offline).await
}

/// Puts a disk back into service with its index intact. A disk that failed stays down
/// until the node restarts (409).
#[utoipa::path(
    post,
    path = "/v1/disks/{id}/online",
    params(("id" = u16, Path, minimum = 0, maximum = 65535, description = "Disk id")),
    request_body(content = Option<StateChangeRequest>, description = "Optional: why", content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The disk as it is now", body = DiskView),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "No token configured: mutations disabled", body = ErrorBody),
        (status = 404, description = "No such disk", body = ErrorBody),
        (status = 409, description = "The dataplane refused the change", body = ErrorBody),
        (status = 503, description = "The dataplane is busy or did not answer in time", body = ErrorBody),
    )
)]
async fn disk_online(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DiskView>, ApiError> {
    change_state(s, &headers, &id, &body, DiskState::Online).await
}

async fn change_state(
    s: Arc<Shared>,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
    state: DiskState,
) -> Result<Json<DiskView>, ApiError> {
    // Authentication first: an unauthenticated caller learns nothing about disks.
    auth::check(
        s.cfg.token.as_deref(),
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
    )?;
    let disk = find_disk(&s.handle.disks.snapshot(), id)?;
    // No body, or JSON `null`, is no request body (the document says it is optional).
    let request: StateChangeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StateChangeRequest::default()
    } else {
        // Through a Value first: serde's derived struct decoder also takes the fields
        // as a JSON array (so `[]` would pass as an empty request), and the document
        // promises an object.
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))?;
        if !(value.is_object() || value.is_null()) {
            return Err(ApiError::BadRequest(
                "bad JSON body: expected an object (or null)".to_string(),
            ));
        }
        serde_json::from_value::<Option<StateChangeRequest>>(value)
            .map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))?
            .unwrap_or_default()
    };
    let reason = request.reason.unwrap_or_default();
    if reason.len() > REASON_MAX {
        return Err(ApiError::BadRequest(format!(
            "reason is {} bytes, at most {REASON_MAX}",
            reason.len()
        )));
    }
    let handle = s.handle.clone();
    let wait = s.cfg.command_wait;
    let report = tokio::task::spawn_blocking(move || handle.set_disk_state(disk, state, wait))
        .await
        .map_err(|_| ApiError::Dataplane(dataplane::handle::CommandError::Stopped))??;
    if report.state != state {
        return Err(ApiError::Conflict(format!(
            "disk {} is {:?} and stays so: a disk that failed stays down until the node restarts",
            disk.0,
            DiskStateView::from(report.state)
        )));
    }
    tracing::info!(disk = disk.0, ?state, %reason, "disk state changed over REST");
    Ok(Json(DiskView::from(&report)))
}

/// Asks every dataplane loop for its addresses, or to change them.
async fn addresses_command(
    s: &Arc<Shared>,
    change: Option<dataplane::server::port::AddressChange>,
) -> Result<Json<AddressesView>, ApiError> {
    let handle = s.handle.clone();
    let wait = s.cfg.command_wait;
    let list = tokio::task::spawn_blocking(move || handle.change_address(change, wait))
        .await
        .map_err(|_| ApiError::Dataplane(dataplane::handle::CommandError::Stopped))??;
    Ok(Json(AddressesView {
        managed: true,
        addresses: list.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
    }))
}

/// The data port's addresses: its own, then the service addresses (those a failover
/// pair moves between its nodes). With the kernel network backend the node owns none.
#[utoipa::path(get, path = "/v1/addresses", responses(
    (status = 200, description = "The addresses", body = AddressesView),
    (status = 503, description = "The dataplane is busy or did not answer in time", body = ErrorBody),
))]
async fn addresses_get(State(s): State<Arc<Shared>>) -> Result<Json<AddressesView>, ApiError> {
    if s.cfg.network_backend == "kernel" {
        return Ok(Json(AddressesView {
            managed: false,
            addresses: Vec::new(),
        }));
    }
    addresses_command(&s, None).await
}

/// Adds a service address to the data port (every dataplane loop answers on it) and,
/// unless `announce` is false, sends a gratuitous ARP for it. Adding an address the
/// port has already changes only its prefix (and announces it again). `--net dpdk` only.
#[utoipa::path(
    post,
    path = "/v1/addresses",
    request_body(content = AddAddressRequest, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The addresses after the change", body = AddressesView),
        (status = 400, description = "Bad body or address", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "No token configured: mutations disabled", body = ErrorBody),
        (status = 409, description = "The port refused: the kernel backend, the port's own address, or no room", body = ErrorBody),
        (status = 503, description = "The dataplane is busy or did not answer in time", body = ErrorBody),
    )
)]
async fn address_add(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AddressesView>, ApiError> {
    auth::check(
        s.cfg.token.as_deref(),
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
    )?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "bad JSON body: expected an object".to_string(),
        ));
    }
    let request: AddAddressRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))?;
    let (addr, prefix_len) = parse_cidr(&request.addr)?;
    let change = dataplane::server::port::AddressChange::Add {
        addr,
        prefix_len,
        announce: request.announce.unwrap_or(true),
    };
    let view = addresses_command(&s, Some(change)).await?;
    tracing::info!(addr = %request.addr, "service address added over REST");
    Ok(view)
}

/// Removes a service address from the data port. `--net dpdk` only.
#[utoipa::path(
    delete,
    path = "/v1/addresses/{addr}",
    params(("addr" = String, Path, description = "The IPv4 address (no prefix)",
        pattern = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The addresses after the change", body = AddressesView),
        (status = 400, description = "Bad address", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "No token configured: mutations disabled", body = ErrorBody),
        (status = 409, description = "The port refused: the kernel backend, its own address, or not one of its addresses", body = ErrorBody),
        (status = 503, description = "The dataplane is busy or did not answer in time", body = ErrorBody),
    )
)]
async fn address_remove(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(addr): Path<String>,
) -> Result<Json<AddressesView>, ApiError> {
    auth::check(
        s.cfg.token.as_deref(),
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
    )?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| {
        ApiError::BadRequest(format!("bad address {addr:?}: expected IPv4 like 10.0.0.9"))
    })?;
    let view = addresses_command(
        &s,
        Some(dataplane::server::port::AddressChange::Remove { addr }),
    )
    .await?;
    tracing::info!(%addr, "service address removed over REST");
    Ok(view)
}

/// `ADDR/PREFIX` (IPv4, prefix 0..=32).
fn parse_cidr(text: &str) -> Result<(std::net::Ipv4Addr, u8), ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "bad address {text:?}: expected IPv4 ADDR/PREFIX like 10.0.0.9/24"
        ))
    };
    let (a, p) = text.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// Overall health with its reasons and the thresholds in force.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
async fn health_get(State(s): State<Arc<Shared>>) -> Json<Health> {
    Json(s.monitor.assess(Instant::now()))
}

/// Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus exposition format 0.0.4", body = String, content_type = "text/plain"))
)]
async fn metrics_get(State(s): State<Arc<Shared>>) -> Response {
    let mut text = metrics::render(&s.handle.stats.sum(), &s.handle.disks.snapshot());
    metrics::render_mgmt(&mut text, &s.counters);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
async fn openapi_get(State(s): State<Arc<Shared>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::store::DiskIo;

    fn report(health: Option<nvme::driver::SmartLog>) -> DiskReport {
        DiskReport {
            id: DiskId(2),
            identity: [7; 16],
            state: DiskState::Online,
            backend: "nvme",
            location: "0000:01:00.0 serial X".into(),
            bytes_total: 1 << 30,
            bytes_free: 1 << 29,
            bytes_available: 1 << 29,
            objects_used: 1,
            objects_available: 2,
            outstanding_ops: 0,
            bytes_dead: 0,
            bytes_used: 0,
            errors: 0,
            io: DiskIo::default(),
            last_error: None,
            corrupt_objects: 0,
            corrupt_blocks: 0,
            health,
        }
    }

    #[test]
    fn disk_view_carries_the_health_log_and_saturates_wide_counters() {
        assert_eq!(DiskView::from(&report(None)).health, None);
        let h = nvme::driver::SmartLog {
            critical_warning: 4,
            temperature_kelvin: 318,
            available_spare: 97,
            percentage_used: 3,
            media_errors: u128::MAX,
            power_on_hours: 1234,
            unsafe_shutdowns: 2,
            error_log_entries: 9,
            ..Default::default()
        };
        let v = DiskView::from(&report(Some(h))).health.unwrap();
        assert_eq!(
            v,
            DiskHealthView {
                critical_warning: 4,
                temperature_kelvin: 318,
                available_spare: 97,
                percentage_used: 3,
                media_errors: u64::MAX,
                power_on_hours: 1234,
                unsafe_shutdowns: 2,
                error_log_entries: 9,
            }
        );
    }
}
