//! Request handlers that answer with a single Out structure (no stream), shared by the
//! TCP sessions and the UDP (unicast and multicast) cluster services.

use std::sync::Arc;
use std::time::Instant;

use dosp::wire::*;
use dosp::Fingerprint;
use zerocopy::IntoBytes;

use super::shards::Shards;
use crate::node::NodeCache;
use crate::stats::{NodeStats, StatsSet};
use crate::store::{DiskState, Mismatched, ObjectMeta, StoreError};

/// What a loop's handlers know beyond their own loop: the node's published state
/// (refreshed once per turn, see [`NodeCache`]) and every loop's counters, summed for
/// GET_LOAD and HEARTBEAT.
#[derive(Debug)]
pub struct NodeView {
    pub node: NodeCache,
    pub all: Arc<StatsSet>,
    /// Largest STORE chunk accepted, as reported by NULL.
    pub chunk_max: u32,
    /// The signature gate's state on a node with a cluster key.
    pub auth: Option<Arc<super::auth::NodeAuth>>,
}

/// What a handler needs from the node.
pub struct Ctx<'a> {
    pub store: &'a mut Shards,
    pub stats: &'a NodeStats,
    pub id: &'a NodeView,
}

/// Maps a store error to the status the peer sees.
pub fn status_of(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::NotFound,
        StoreError::Busy => Status::Busy,
        StoreError::NoSpace => Status::NoSpace,
        StoreError::TooLarge { .. } => Status::TooLarge,
        StoreError::DiskFailed { .. } | StoreError::NoUsableDisk => Status::DiskFailed,
        StoreError::DiskOffline(_) => Status::DiskOffline,
        StoreError::Corrupt { .. } => Status::ChecksumMismatch,
        StoreError::OutOfRange { .. } => Status::OutOfRange,
        StoreError::Mismatch { .. } => Status::ChecksumMismatch,
        _ => Status::Internal,
    }
}

/// The `detail` that goes with [`status_of`]: which promise a refused STORE broke
/// (dosp/PROTOCOL.md, STORE); 0 for every other error.
pub fn detail_of(e: &StoreError) -> u32 {
    match e {
        StoreError::Mismatch {
            what: Mismatched::Len,
            ..
        } => MISMATCH_LEN,
        StoreError::Mismatch {
            what: Mismatched::Md5,
            ..
        } => MISMATCH_MD5,
        _ => 0,
    }
}

pub fn wire_disk_state(s: DiskState) -> WireDiskState {
    match s {
        DiskState::Online => WireDiskState::Online,
        DiskState::Offline => WireDiskState::Offline,
        DiskState::Down => WireDiskState::Down,
    }
}

/// The error-only Out body: just the common head.
pub fn error_body(out: &mut Vec<u8>, status: Status, detail: u32) {
    out.extend_from_slice(OutHead::new(status, detail).as_bytes());
}

/// Handles NULL, LOCATE, HEARTBEAT, GET_DISK_STATE, GET_DISK_STATUS and GET_LOAD:
/// appends the Out body to `out` and returns its status. Streaming opcodes (STORE,
/// RETRIEVE, RETRIEVE_RANGE, GET_CONTENTS) and DELETE (answered when durable) are the
/// session's; over UDP they get BAD_REQUEST.
pub fn small_op(ctx: &mut Ctx<'_>, op: Opcode, body: &[u8], out: &mut Vec<u8>) -> Status {
    let status = match small_op_inner(ctx, op, body, out) {
        Ok(()) => Status::Success,
        Err((status, detail)) => {
            error_body(out, status, detail);
            status
        }
    };
    if status != Status::Success {
        NodeStats::error(ctx.stats, status);
    }
    status
}

fn small_op_inner(
    ctx: &mut Ctx<'_>,
    op: Opcode,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), (Status, u32)> {
    let bad = |_| (Status::BadRequest, body.len() as u32);
    let ok = || OutHead::new(Status::Success, 0);
    match op {
        Opcode::Null => {
            parse_exact::<NullIn>(op, body).map_err(bad)?;
            let reply = NullOut {
                head: ok(),
                body_max: BODY_MAX.into(),
                chunk_max: ctx.id.chunk_max.into(),
                object_max: ctx.store.config().max_object_bytes.into(),
            };
            out.extend_from_slice(reply.as_bytes());
        }
        // LOCATE may need another loop's shard: its callers answer it through
        // `Shards::locate` and `locate_answer`, never through here.
        Opcode::Locate => {
            parse_exact::<LocateIn>(op, body).map_err(bad)?;
            return Err((Status::Internal, op as u32));
        }
        Opcode::Heartbeat => {
            parse_exact::<HeartbeatIn>(op, body).map_err(bad)?;
            out.extend_from_slice(heartbeat(ctx).as_bytes());
        }
        Opcode::GetDiskState | Opcode::GetDiskStatus => {
            let want = parse_exact::<DiskQueryIn>(op, body)
                .map_err(bad)?
                .disk
                .get();
            let disks: Vec<_> = ctx
                .store
                .node_disks()
                .into_iter()
                .filter(|d| want == ALL_DISKS || d.id.0 == want)
                .take(DISKS_MAX)
                .collect();
            if disks.is_empty() {
                return Err((Status::NotFound, u32::from(want)));
            }
            let head = DiskListOut {
                head: ok(),
                count: (disks.len() as u16).into(),
                reserved: 0.into(),
                reserved1: 0.into(),
            };
            out.extend_from_slice(head.as_bytes());
            if op == Opcode::GetDiskState {
                for d in &disks {
                    let e = DiskStateEntry {
                        disk: d.id.0.into(),
                        state: wire_disk_state(d.state) as u8,
                        reserved: 0,
                    };
                    out.extend_from_slice(e.as_bytes());
                }
            } else {
                for d in &disks {
                    let e = DiskStatusEntry {
                        disk: d.id.0.into(),
                        state: wire_disk_state(d.state) as u8,
                        reserved: 0,
                        outstanding_ops: d.outstanding_ops.into(),
                        identity: d.identity,
                        bytes_total: d.bytes_total.into(),
                        bytes_free: d.bytes_free.into(),
                        bytes_available: d.bytes_available.into(),
                        objects_used: d.objects_used.into(),
                        objects_available: d.objects_available.into(),
                    };
                    out.extend_from_slice(e.as_bytes());
                }
            }
        }
        Opcode::GetLoad => {
            parse_exact::<LoadIn>(op, body).map_err(bad)?;
            let load = ctx.id.all.load();
            let reply = LoadOut {
                head: ok(),
                connections: (load.connections as u32).into(),
                ops_outstanding: (load.ops_outstanding as u32).into(),
                ops_total: load.ops_total.into(),
                bytes_in: load.bytes_in.into(),
                bytes_out: load.bytes_out.into(),
                uptime_ms: ctx.id.node.get().uptime_ms(Instant::now()).into(),
                errors_total: load.errors_total.into(),
            };
            out.extend_from_slice(reply.as_bytes());
        }
        // An announcement is something a node sends, never something it is asked.
        Opcode::Announce => return Err((Status::BadRequest, op as u32)),
        // Streaming operations need a connection; DELETE changes state and must be
        // answered exactly once, which a datagram cannot promise (a lost reply and a
        // retry would drop two references): over UDP they are a client error. (Over
        // TCP the session handles all four itself.)
        Opcode::Store
        | Opcode::Retrieve
        | Opcode::RetrieveRange
        | Opcode::GetContents
        | Opcode::Delete => {
            return Err((Status::BadRequest, op as u32));
        }
    }
    Ok(())
}

/// The LOCATE answer for `fp`, which this node holds as `meta` says.
pub fn locate_answer(ctx: &Ctx<'_>, fp: &Fingerprint, meta: &ObjectMeta) -> LocateOut {
    let node = ctx.id.node.get();
    LocateOut {
        head: OutHead::new(Status::Success, 0),
        fingerprint: *fp,
        node_id: node.node_id.into(),
        object_len: meta.len.into(),
        disk: meta.disk.0.into(),
        port: node.addrs.dosp.port().into(),
        addr: node.addrs.dosp.ip().octets(),
        name: node.name_field(),
    }
}

/// This node's heartbeat (built by the one builder, [`crate::node::heartbeat`]).
pub fn heartbeat(ctx: &Ctx<'_>) -> HeartbeatOut {
    crate::node::heartbeat(
        ctx.id.node.get(),
        &ctx.store.node_disks(),
        &ctx.id.all.load(),
        Instant::now(),
    )
}
