//! The process's file-descriptor budget, checked once at start-up.
//!
//! A node that runs out of descriptors cannot accept connections, open a checkpoint
//! or answer REST. So before anything is opened, dosd makes sure `RLIMIT_NOFILE`
//! covers what the configuration can use at most: it raises the soft limit (and, if
//! it must and may, the hard one), or refuses to start and says what to change.
//!
//! The budget, written down once:
//!
//! - one descriptor per connection, `connections_max`;
//! - [`DESCRIPTORS_PER_DISK`] per disk: a file disk holds its file and an io_uring
//!   ring; an NVMe disk its VFIO container, group and device, an eventfd and a few
//!   sysfs handles while it binds;
//! - [`DESCRIPTORS_FIXED`] for the rest of the process: standard streams, the data
//!   directory's lock, the dataplane's listener, two UDP sockets, epoll, its reserve
//!   and probe descriptors, the management core's runtime, listener and REST
//!   connections, the announcer's socket, signal pipes — with slack.
//!
//! The dataplane still copes when the budget is exceeded anyway (REST connections are
//! not bounded): it sheds new connections with BUSY on a reserve descriptor and says
//! so in `/v1/health` (dataplane/src/server/accept.rs).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors one disk may hold (see the module docs).
pub const DESCRIPTORS_PER_DISK: u64 = 8;
/// Descriptors the process holds besides connections and disks (see the module docs).
pub const DESCRIPTORS_FIXED: u64 = 128;

/// Descriptors a node with this configuration can use at most.
pub fn descriptors_needed(connections_max: usize, disks: u16) -> u64 {
    connections_max as u64 + u64::from(disks) * DESCRIPTORS_PER_DISK + DESCRIPTORS_FIXED
}

/// What start-up did about the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The soft limit already covered the budget.
    Enough { soft: u64 },
    /// The soft limit was raised to the budget, within the hard limit.
    RaisedSoft { from: u64, to: u64 },
    /// Both limits were raised to the budget (the process may raise its hard limit).
    RaisedHard { from: u64, to: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "connections_max = {connections_max} with {disks} disks needs {needed} file descriptors, \
         but RLIMIT_NOFILE is {soft} (hard {hard}) and cannot be raised ({source}): \
         raise it (ulimit -n, or LimitNOFILE= in a systemd unit) or lower connections_max \
         to at most {fits}"
    )]
    TooLow {
        connections_max: usize,
        disks: u16,
        needed: u64,
        soft: u64,
        hard: u64,
        /// The largest `connections_max` the hard limit allows.
        fits: u64,
        source: std::io::Error,
    },
}

/// `None` in an rlimit means unlimited.
fn finite(v: Option<u64>) -> u64 {
    v.unwrap_or(u64::MAX)
}

/// Makes `RLIMIT_NOFILE` cover [`descriptors_needed`], or says why it cannot.
pub fn ensure(connections_max: usize, disks: u16) -> Result<Outcome, LimitError> {
    let needed = descriptors_needed(connections_max, disks);
    let now = getrlimit(Resource::Nofile);
    let (soft, hard) = (finite(now.current), finite(now.maximum));
    if soft >= needed {
        return Ok(Outcome::Enough { soft });
    }
    let raise_hard = hard < needed;
    let new = Rlimit {
        current: Some(needed),
        maximum: if raise_hard {
            Some(needed)
        } else {
            now.maximum
        },
    };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) if raise_hard => Ok(Outcome::RaisedHard {
            from: soft,
            to: needed,
        }),
        Ok(()) => Ok(Outcome::RaisedSoft {
            from: soft,
            to: needed,
        }),
        Err(e) => {
            // Raising the hard limit takes CAP_SYS_RESOURCE (and stays under
            // fs.nr_open); raising the soft one within it never fails.
            let others = needed - connections_max as u64;
            Err(LimitError::TooLow {
                connections_max,
                disks,
                needed,
                soft,
                hard,
                fits: hard.saturating_sub(others),
                source: e.into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_adds_up() {
        assert_eq!(descriptors_needed(1024, 4), 1024 + 4 * 8 + 128);
        assert_eq!(descriptors_needed(1, 1), 1 + 8 + 128);
    }

    #[test]
    fn a_limit_that_already_covers_the_budget_is_left_alone() {
        let now = getrlimit(Resource::Nofile);
        let soft = finite(now.current);
        // A configuration that fits under whatever the test runs with.
        let conns = soft
            .saturating_sub(DESCRIPTORS_FIXED + DESCRIPTORS_PER_DISK)
            .max(1);
        if descriptors_needed(conns as usize, 1) <= soft {
            assert_eq!(ensure(conns as usize, 1).unwrap(), Outcome::Enough { soft });
            assert_eq!(getrlimit(Resource::Nofile), now, "nothing changed");
        }
    }
}
