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

use crate::node::NodeBoard;
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

/// The latest disk reports, published by the dataplane.
#[derive(Debug, Default)]
pub struct DiskBoard {
    reports: Mutex<Arc<Vec<DiskReport>>>,
}

impl DiskBoard {
    /// The latest snapshot (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<Vec<DiskReport>> {
        Arc::clone(&self.reports.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the snapshot. The lock is held only for a pointer swap.
    pub fn publish(&self, reports: Vec<DiskReport>) {
        let fresh = Arc::new(reports);
        *self.reports.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
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
    commands: Sender<Command>,
}

/// The dataplane's end of the handle. Every loop takes its own counters
/// (`stats.of_loop(i)`) and beats `beats` with its own index.
#[derive(Debug)]
pub struct DataplaneEnd {
    pub stats: Arc<StatsSet>,
    pub beats: Arc<LoopBeats>,
    pub disks: Arc<DiskBoard>,
    /// The node's state, read by the loops (see [`crate::node::NodeCache`]).
    pub node: Arc<NodeBoard>,
    pub commands: Receiver<Command>,
}

/// Creates both ends, with counters and beats for `loops` dataplane loops.
pub fn handle_pair(loops: usize) -> (DataplaneHandle, DataplaneEnd) {
    let stats = Arc::new(StatsSet::new(loops));
    let beats = Arc::new(LoopBeats::new(loops));
    let disks = Arc::new(DiskBoard::default());
    let node = Arc::new(NodeBoard::default());
    let (tx, rx) = bounded(COMMAND_QUEUE);
    (
        DataplaneHandle {
            stats: Arc::clone(&stats),
            beats: Arc::clone(&beats),
            disks: Arc::clone(&disks),
            node: Arc::clone(&node),
            commands: tx,
        },
        DataplaneEnd {
            stats,
            beats,
            disks,
            node,
            commands: rx,
        },
    )
}

impl DataplaneHandle {
    /// Asks the dataplane to change a disk's state and waits (bounded) for the result.
    pub fn set_disk_state(
        &self,
        disk: DiskId,
        state: DiskState,
        wait: Duration,
    ) -> Result<DiskReport, CommandError> {
        let (reply, answer) = bounded(1);
        self.commands
            .try_send(Command::SetDiskState { disk, state, reply })
            .map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => CommandError::Busy,
                crossbeam_channel::TrySendError::Disconnected(_) => CommandError::Stopped,
            })?;
        match answer.recv_timeout(wait) {
            Ok(result) => result,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(CommandError::Timeout(wait)),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(CommandError::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_travel_and_a_full_queue_says_busy() {
        let (handle, end) = handle_pair(1);
        let worker = std::thread::spawn(move || {
            let Command::SetDiskState { disk, reply, .. } = end.commands.recv().unwrap();
            reply.send(Err(CommandError::NoSuchDisk(disk.0))).unwrap();
            end
        });
        let r = handle.set_disk_state(DiskId(7), DiskState::Offline, Duration::from_secs(5));
        assert_eq!(r, Err(CommandError::NoSuchDisk(7)));
        let end = worker.join().unwrap();
        // Nobody drains the queue now: it fills, then answers Busy at once.
        for _ in 0..COMMAND_QUEUE {
            let (reply, _keep) = bounded(1);
            handle
                .commands
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
        let (handle2, end2) = handle_pair(1);
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
