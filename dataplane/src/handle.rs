//! The management core's handle on the dataplane.
//!
//! The management core never touches a disk or a data-path socket. It reads what the
//! dataplane publishes — atomic counters (a [`NodeStats`] per loop, in a [`StatsSet`]),
//! each loop's turn counter ([`LoopBeats`]) and a snapshot of every disk's report,
//! refreshed by the dataplane a few times a second and after every change — and asks
//! for changes with typed [`Command`]s over a bounded channel, which the dataplane
//! drains a few at a time each loop turn and answers on a reply channel. The other way,
//! the management core publishes the node's state ([`NodeBoard`]) for the loops to read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::node::NodeBoard;
use crate::server::port::AddressChange;
#[cfg(doc)]
use crate::stats::NodeStats;
use crate::stats::{LoopBeats, StatsSet};
use crate::store::{DiskId, DiskReport, DiskState};

/// Commands the management core may send. Each carries where to send the answer.
#[derive(Debug)]
pub enum Command {
    /// Take a disk out of service (Offline), put it back (Online), or mark it Down.
    SetDiskState {
        disk: DiskId,
        state: DiskState,
        reply: Sender<Result<DiskReport, CommandError>>,
    },
    /// Add or remove a service address on the loop's network port (`None`: just list
    /// them); the answer is the port's addresses after the change, its own first.
    Addresses {
        change: Option<AddressChange>,
        reply: Sender<Result<Vec<(Ipv4Addr, u8)>, CommandError>>,
    },
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no disk {0}")]
    NoSuchDisk(u16),
    #[error("the dataplane is busy: try again")]
    Busy,
    #[error("the dataplane did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the dataplane has stopped")]
    Stopped,
    #[error("{0}")]
    Refused(String),
}

/// Commands waiting for the dataplane at most; a full queue answers Busy at once.
pub const COMMAND_QUEUE: usize = 16;
/// Commands the dataplane takes per loop turn.
pub const COMMANDS_PER_TURN: usize = 4;

/// The latest disk reports, published by the dataplane loops.
///
/// Each loop publishes the reports of its own regions (its shard's log space on every
/// disk); readers see one report per disk, merged: sizes, objects and counters summed,
/// the worst state, the most recent error.
#[derive(Debug, Default)]
pub struct DiskBoard {
    inner: Mutex<Board>,
}

#[derive(Debug, Default)]
struct Board {
    per_loop: Vec<Vec<DiskReport>>,
    merged: Arc<Vec<DiskReport>>,
}

impl DiskBoard {
    /// The latest snapshot (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<Vec<DiskReport>> {
        Arc::clone(
            &self
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .merged,
        )
    }

    /// Replaces loop 0's reports (the only loop's, with one).
    pub fn publish(&self, reports: Vec<DiskReport>) {
        self.publish_from(0, reports)
    }

    /// Replaces loop `from`'s reports. The lock is held for the merge: a few disks,
    /// a few times a second per loop.
    pub fn publish_from(&self, from: u16, reports: Vec<DiskReport>) {
        let mut b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let from = usize::from(from);
        if b.per_loop.len() <= from {
            b.per_loop.resize_with(from + 1, Vec::new);
        }
        b.per_loop[from] = reports;
        let merged = merge_reports(&b.per_loop);
        b.merged = Arc::new(merged);
    }
}

/// One report per disk from each loop's reports of its region of it.
pub fn merge_reports(per_loop: &[Vec<DiskReport>]) -> Vec<DiskReport> {
    let mut out: Vec<DiskReport> = Vec::new();
    for reports in per_loop {
        for r in reports {
            match out.iter_mut().find(|m| m.id == r.id) {
                None => out.push(r.clone()),
                Some(m) => {
                    m.state = worst(m.state, r.state);
                    m.bytes_total += r.bytes_total;
                    m.bytes_free += r.bytes_free;
                    m.bytes_available += r.bytes_available;
                    m.objects_used += r.objects_used;
                    m.objects_available += r.objects_available;
                    m.outstanding_ops += r.outstanding_ops;
                    m.bytes_dead += r.bytes_dead;
                    m.bytes_used += r.bytes_used;
                    m.errors += r.errors;
                    m.io.read_ops += r.io.read_ops;
                    m.io.read_bytes += r.io.read_bytes;
                    m.io.write_ops += r.io.write_ops;
                    m.io.write_bytes += r.io.write_bytes;
                    m.io.flushes += r.io.flushes;
                    m.corrupt_objects += r.corrupt_objects;
                    m.corrupt_blocks += r.corrupt_blocks;
                    if r.last_error.as_ref().map(|e| e.at_unix_ms)
                        > m.last_error.as_ref().map(|e| e.at_unix_ms)
                    {
                        m.last_error = r.last_error.clone();
                    }
                    if m.health.is_none() {
                        m.health = r.health;
                    }
                }
            }
        }
    }
    out.sort_by_key(|r| r.id);
    out
}

/// The state a disk shows when its regions disagree: any region down makes it down.
fn worst(a: DiskState, b: DiskState) -> DiskState {
    let rank = |s: DiskState| match s {
        DiskState::Online => 0,
        DiskState::Offline => 1,
        DiskState::Down => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// What the management core holds.
#[derive(Debug, Clone)]
pub struct DataplaneHandle {
    pub stats: Arc<StatsSet>,
    pub beats: Arc<LoopBeats>,
    pub disks: Arc<DiskBoard>,
    /// The node's state: the management core publishes it here.
    pub node: Arc<NodeBoard>,
    /// One command queue per dataplane loop.
    commands: Vec<Sender<Command>>,
    /// Datagrams for loop 0 to send to the cluster group (see [`Outgoing`]).
    outbox: Sender<Outgoing>,
}

/// A datagram the management core hands to the dataplane to send from the node's
/// multicast endpoint: heartbeats and announcements, when the node's network is the
/// dataplane's own (`--net dpdk`) and the management core has no socket on it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: SocketAddrV4,
    pub bytes: Vec<u8>,
}

/// Datagrams waiting for loop 0 at most; the management core drops (and logs) more.
pub const OUTBOX: usize = 64;

/// A dataplane loop's end of the handle. Every loop takes its own counters
/// (`stats.of_loop(loop_index)`) and beats `beats` with its own index.
#[derive(Debug)]
pub struct DataplaneEnd {
    /// Which loop this end belongs to.
    pub loop_index: u16,
    pub stats: Arc<StatsSet>,
    pub beats: Arc<LoopBeats>,
    pub disks: Arc<DiskBoard>,
    /// The node's state, read by the loops (see [`crate::node::NodeCache`]).
    pub node: Arc<NodeBoard>,
    pub commands: Receiver<Command>,
    /// Loop 0's: the datagrams the management core asks it to send.
    pub outbox: Option<Receiver<Outgoing>>,
}

/// Creates both ends for one dataplane loop.
pub fn handle_pair() -> (DataplaneHandle, DataplaneEnd) {
    let (h, mut ends) = handle_for(1);
    (h, ends.remove(0))
}

/// Creates the management core's handle and one end per dataplane loop, with
/// counters and beats for each.
pub fn handle_for(loops: u16) -> (DataplaneHandle, Vec<DataplaneEnd>) {
    let loops = loops.max(1);
    let stats = Arc::new(StatsSet::new(usize::from(loops)));
    let beats = Arc::new(LoopBeats::new(usize::from(loops)));
    let disks = Arc::new(DiskBoard::default());
    let node = Arc::new(NodeBoard::default());
    let mut commands = Vec::new();
    let mut ends = Vec::new();
    let (outbox, outbox_rx) = bounded(OUTBOX);
    let mut outbox_rx = Some(outbox_rx);
    for i in 0..loops {
        let (tx, rx) = bounded(COMMAND_QUEUE);
        commands.push(tx);
        ends.push(DataplaneEnd {
            loop_index: i,
            stats: Arc::clone(&stats),
            beats: Arc::clone(&beats),
            disks: Arc::clone(&disks),
            node: Arc::clone(&node),
            commands: rx,
            outbox: outbox_rx.take(),
        });
    }
    (
        DataplaneHandle {
            stats,
            beats,
            disks,
            node,
            commands,
            outbox,
        },
        ends,
    )
}

impl DataplaneHandle {
    /// Asks every dataplane loop to change a disk's state (each its own region of the
    /// disk) and waits (bounded) for all of them; the answer is the merged report.
    pub fn set_disk_state(
        &self,
        disk: DiskId,
        state: DiskState,
        wait: Duration,
    ) -> Result<DiskReport, CommandError> {
        let deadline = std::time::Instant::now() + wait;
        let mut answers = Vec::with_capacity(self.commands.len());
        for tx in &self.commands {
            let (reply, answer) = bounded(1);
            tx.try_send(Command::SetDiskState { disk, state, reply })
                .map_err(|e| match e {
                    crossbeam_channel::TrySendError::Full(_) => CommandError::Busy,
                    crossbeam_channel::TrySendError::Disconnected(_) => CommandError::Stopped,
                })?;
            answers.push(answer);
        }
        let mut reports = Vec::with_capacity(answers.len());
        for answer in answers {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match answer.recv_timeout(left) {
                Ok(result) => reports.push(vec![result?]),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(CommandError::Timeout(wait))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(CommandError::Stopped)
                }
            }
        }
        merge_reports(&reports)
            .into_iter()
            .next()
            .ok_or(CommandError::NoSuchDisk(disk.0))
    }
}

impl DataplaneHandle {
    /// Hands loop 0 a datagram to send (see [`Outgoing`]); false when its queue is full
    /// or the dataplane stopped.
    pub fn send_datagram(&self, out: Outgoing) -> bool {
        self.outbox.try_send(out).is_ok()
    }

    /// Asks every dataplane loop to change its port's service addresses (each loop owns
    /// its own view of the NIC), and waits (bounded) for all of them. Only loop 0 sends
    /// the gratuitous ARP of an added address. The answer is loop 0's list; any loop's
    /// refusal is the answer (loops that carried it out keep the change: asking again is
    /// how to converge, as every change is idempotent but for its error).
    pub fn change_address(
        &self,
        change: Option<AddressChange>,
        wait: Duration,
    ) -> Result<Vec<(Ipv4Addr, u8)>, CommandError> {
        let deadline = std::time::Instant::now() + wait;
        let mut answers = Vec::with_capacity(self.commands.len());
        for tx in &self.commands {
            let (reply, answer) = bounded(1);
            tx.try_send(Command::Addresses { change, reply })
                .map_err(|e| match e {
                    crossbeam_channel::TrySendError::Full(_) => CommandError::Busy,
                    crossbeam_channel::TrySendError::Disconnected(_) => CommandError::Stopped,
                })?;
            answers.push(answer);
        }
        let mut first = None;
        for answer in answers {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let list = match answer.recv_timeout(left) {
                Ok(result) => result?,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(CommandError::Timeout(wait))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(CommandError::Stopped)
                }
            };
            first.get_or_insert(list);
        }
        first.ok_or(CommandError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_travel_and_a_full_queue_says_busy() {
        let (handle, end) = handle_pair();
        let worker = std::thread::spawn(move || {
            let Command::SetDiskState { disk, reply, .. } = end.commands.recv().unwrap() else {
                panic!("not a disk command")
            };
            reply.send(Err(CommandError::NoSuchDisk(disk.0))).unwrap();
            end
        });
        let r = handle.set_disk_state(DiskId(7), DiskState::Offline, Duration::from_secs(5));
        assert_eq!(r, Err(CommandError::NoSuchDisk(7)));
        let end = worker.join().unwrap();
        // Nobody drains the queue now: it fills, then answers Busy at once.
        for _ in 0..COMMAND_QUEUE {
            let (reply, _keep) = bounded(1);
            handle.commands[0]
                .try_send(Command::SetDiskState {
                    disk: DiskId(0),
                    state: DiskState::Online,
                    reply,
                })
                .unwrap();
        }
        let r = handle.set_disk_state(DiskId(0), DiskState::Online, Duration::from_millis(10));
        assert_eq!(r, Err(CommandError::Busy));
        drop(end);
        let (handle2, end2) = handle_pair();
        drop(end2);
        assert_eq!(
            handle2.set_disk_state(DiskId(0), DiskState::Online, Duration::from_millis(10)),
            Err(CommandError::Stopped)
        );
    }

    #[test]
    fn board_publishes_snapshots() {
        let board = DiskBoard::default();
        assert!(board.snapshot().is_empty());
        board.publish(Vec::new());
        assert!(board.snapshot().is_empty());
    }
}
