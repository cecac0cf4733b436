//! Shards: one store shard per dataplane loop, and the protocol that keeps the index
//! exact across them.
//!
//! # Who owns what
//! Each loop owns one [`Store`]: its own region of every disk (`store::label`), its
//! own queue pair or ring on each, and the objects whose bytes arrived on its
//! connections — their records live in its log space and its index says where. The
//! *authority* for a fingerprint is the loop `owner_of(fp)`: the first byte of the
//! fingerprint split into `n` contiguous ranges, so that listing the index in
//! fingerprint order is listing the shards in turn. The authority decides, for its
//! range, whether a new STORE commits or deduplicates, and knows where every object
//! of its range lives: in its own store, or in its *directory* (fingerprint → holder
//! loop, length, disk) for objects another loop holds. A fingerprint is held by at
//! most one loop at any time; the authority is what makes that so.
//!
//! # A STORE
//! Its bytes are hashed and written where they arrive (loop `j`: its log space, as
//! uncommitted segments); only at the last chunk is the fingerprint known. Then:
//! - `j` holds it already: a reference +1 in `j`'s log (no one else can hold it).
//! - `j` is the authority: it decides locally, as below.
//! - otherwise `j` sends CLAIM(fp) to the authority `k`, which answers
//!   - HELD(h) if `h` (its own store or its directory) holds the object: `j` asks `h`
//!     for a reference (ADD_REF; `h` appends a REF +1 and answers once durable), and
//!     drops its own copy when that succeeded. Should `h` have lost the object in
//!     between (deleted to zero), `j` claims again.
//!   - RETRY while another loop's claim of the same fingerprint is being committed;
//!   - COMMIT otherwise, noting the claim as pending: `j` commits the object in its own
//!     log (group commit), acknowledges the client once durable, and sends SETTLED
//!     (committed or not) to `k`, which moves the fingerprint from pending to its
//!     directory.
//!
//! So the same bytes stored concurrently through two loops give one object with
//! refcount 2: the second claim waits (RETRY) until the first is durable, then refers.
//!
//! # Durability and recovery
//! Durable means what it meant before shards: an acknowledged STORE's COMMIT (or
//! REF) record and everything before it in its log were flushed. Claims, pending
//! entries and directories are memory only. At start-up every shard recovers its own
//! regions from their logs, then the directories are rebuilt from what the shards
//! hold (`build_directories`). Data whose commit never reached its shard — a claim
//! that crashed before its COMMIT record was durable — is an uncommitted write in the
//! log of the loop it arrived on: recovery drops it like any aborted write and
//! compaction reclaims the space; it was never acknowledged. An object found in two
//! shards (which the protocol prevents) is served from the first and counted.
//!
//! # Other operations
//! RETRIEVE/RANGE and LOCATE look in the loop's own store first, then ask the
//! authority (LOOKUP → FOUND with the holder), then read from the holder (READ →
//! READ_DONE carrying the holder's own verified device buffers, or its cache entry,
//! as a [`Piece`]: never copied on the way; the requesting loop sends from them and
//! hands the device buffers back to the holder's read pool with READ_RETURN). DELETE goes to the holder through the authority; a holder that
//! drops an object to zero references tells the authority (GONE). GET_CONTENTS asks
//! each authority in turn for a page of its range (own store and directory merged).
//! With one loop none of this happens: every call goes straight to the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dosp::Fingerprint;

use super::mesh::MeshEnd;
use crate::handle::DiskBoard;
use crate::store::{
    Committed, DiskId, DiskReport, Expect, ObjectMeta, Piece, ReadId, ReadStart, Store, StoreError,
    StoreEvent, WriteId,
};

/// The loop whose shard decides for `fp`, of `n`.
pub fn owner_of(fp: &Fingerprint, n: u16) -> u16 {
    ((u32::from(fp.0[0]) * u32::from(n)) / 256) as u16
}

/// The fingerprints shard `k` of `n` is the authority for: `[lo, below)`, `None` as
/// the open end.
pub fn range_of(k: u16, n: u16) -> (Option<Fingerprint>, Option<Fingerprint>) {
    // The smallest first byte b with owner_of(b) >= k is ceil(256 k / n).
    let first = |k: u16| -> Option<Fingerprint> {
        let b = (256 * u32::from(k)).div_ceil(u32::from(n));
        (b < 256).then(|| {
            let mut fp = [0u8; 16];
            fp[0] = b as u8;
            Fingerprint(fp)
        })
    };
    let lo = if k == 0 { None } else { first(k) };
    (lo, if k + 1 >= n { None } else { first(k + 1) })
}

/// Where an object of the authority's range lives, when another loop holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub holder: u16,
    pub len: u64,
    pub disk: DiskId,
}

/// The authority's answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Commit it in your own log, then say SETTLED.
    Commit,
    /// Another claim of this fingerprint is being committed: ask again.
    Retry,
    /// This loop holds it: ask it for a reference.
    Held(u16),
}

/// A page of GET_CONTENTS entries.
pub type Page = Vec<(Fingerprint, DiskId)>;

/// A message between loops. `token` names the operation at the loop that started it
/// (`from`), and comes back in the answer.
#[derive(Debug)]
pub enum Msg {
    Claim {
        from: u16,
        token: u64,
        fp: Fingerprint,
    },
    ClaimAnswer {
        token: u64,
        fp: Fingerprint,
        verdict: Verdict,
    },
    /// A claim that got COMMIT ended: the object is durable at `holder`, or not.
    Settled {
        fp: Fingerprint,
        holder: u16,
        held: Option<Held>,
    },
    /// `holder` dropped the last reference to `fp`.
    Gone { fp: Fingerprint, holder: u16 },
    AddRef {
        from: u16,
        token: u64,
        fp: Fingerprint,
    },
    Stored {
        token: u64,
        result: Result<Committed, StoreError>,
    },
    Delete {
        from: u16,
        token: u64,
        fp: Fingerprint,
    },
    Deleted {
        token: u64,
        result: Result<u32, StoreError>,
    },
    Lookup {
        from: u16,
        token: u64,
        fp: Fingerprint,
    },
    Found {
        token: u64,
        found: Option<(u16, ObjectMeta)>,
    },
    Read {
        from: u16,
        token: u64,
        fp: Fingerprint,
        offset: u64,
        len: usize,
    },
    /// The bytes of a READ, in the holder's own buffers.
    ReadDone {
        token: u64,
        result: Result<Piece, StoreError>,
    },
    /// A piece lent with READ_DONE, sent: its buffers go back to the holder's pool.
    ReadReturn { piece: Piece },
    Contents {
        from: u16,
        token: u64,
        after: Option<Fingerprint>,
        max: usize,
    },
    ContentsPage {
        token: u64,
        page: Page,
        /// The authority's range has nothing after this page.
        end: bool,
    },
}

/// What finished, for the session (or datagram) that started it (`user`).
#[derive(Debug)]
pub enum Event {
    Store(StoreEvent),
    /// A lookup finished: the holder and what it holds, or nothing.
    Located {
        user: u64,
        found: Option<(u16, ObjectMeta)>,
    },
    /// A page of the index walk: entries of shard `shard` after the cursor, and
    /// whether that shard has nothing more.
    Page {
        user: u64,
        page: Page,
        end: bool,
    },
}

impl Event {
    pub fn user(&self) -> u64 {
        match self {
            Event::Store(e) => e.user(),
            Event::Located { user, .. } | Event::Page { user, .. } => *user,
        }
    }
}

/// What [`Shards::locate`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Locate {
    /// Known at once: the holder loop and the object, or absent.
    Now(Option<(u16, ObjectMeta)>),
    /// Asked the authority: [`Event::Located`] follows.
    Later,
}

/// What [`Shards::contents_page`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum PageStart {
    /// Listed now through the callback: whether the shard's range is exhausted.
    Now { end: bool },
    /// Asked the shard: [`Event::Page`] follows.
    Later,
}

/// Users of the store reserved for work done on behalf of another loop.
const REMOTE_USER: u64 = 1 << 62;
/// Read ids of reads served by another loop.
const REMOTE_READ: u32 = 1 << 31;

/// A STORE of this loop waiting on another.
#[derive(Debug)]
struct Claim {
    write: WriteId,
    fp: Fingerprint,
}

/// Work this loop does for another: who asked, and for what.
#[derive(Debug)]
enum Work {
    AddRef {
        from: u16,
        token: u64,
    },
    Delete {
        from: u16,
        token: u64,
        fp: Fingerprint,
    },
    Read {
        from: u16,
        token: u64,
    },
}

/// A read another loop serves for this one.
#[derive(Debug)]
struct RemoteRead {
    user: u64,
    arrived: Option<Result<Piece, StoreError>>,
    released: bool,
}

/// Shard-crossing counters (this loop's).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardCounters {
    /// Messages sent to other loops.
    pub sent: u64,
    /// Operations that needed another loop.
    pub remote_ops: u64,
    /// Claims answered RETRY (a concurrent store of the same bytes).
    pub retries: u64,
    /// Reads of objects another loop holds (served from its buffers).
    pub remote_reads: u64,
    /// Objects found held by two shards at start-up.
    pub duplicates: u64,
}

/// One loop's view of the sharded store: its own shard and the way to the others.
#[derive(Debug)]
pub struct Shards {
    pub store: Store,
    me: u16,
    n: u16,
    mesh: Option<MeshEnd>,
    /// Objects of this loop's range that another loop holds.
    dir: BTreeMap<Fingerprint, Held>,
    /// Claims of this loop's range that were told COMMIT and have not settled.
    pending: HashMap<Fingerprint, u16>,
    /// This loop's STOREs waiting on another loop, by user.
    claims: HashMap<u64, Claim>,
    /// Claims to send again next turn (answered RETRY).
    retry: Vec<u64>,
    /// Commits told COMMIT by another authority: SETTLED goes there when they end.
    settling: HashMap<u64, Fingerprint>,
    /// Deletes in this store, by user: GONE goes to the authority at zero.
    deleting: HashMap<u64, Fingerprint>,
    works: Vec<Option<Work>>,
    free_works: Vec<usize>,
    reads: Vec<Option<RemoteRead>>,
    free_reads: Vec<u32>,
    events: Vec<Event>,
    store_events: Vec<StoreEvent>,
    msgs: Vec<(u16, Msg)>,
    board: Option<Arc<DiskBoard>>,
    counters: ShardCounters,
}

impl Shards {
    /// Loop `me` of the loops `mesh` connects (`None`: the only loop).
    pub fn new(store: Store, mesh: Option<MeshEnd>) -> Shards {
        let (me, n) = mesh.as_ref().map_or((0, 1), |m| (m.me(), m.loops()));
        Shards {
            store,
            me,
            n,
            mesh,
            dir: BTreeMap::new(),
            pending: HashMap::new(),
            claims: HashMap::new(),
            retry: Vec::new(),
            settling: HashMap::new(),
            deleting: HashMap::new(),
            works: Vec::new(),
            free_works: Vec::new(),
            reads: Vec::new(),
            free_reads: Vec::new(),
            events: Vec::new(),
            store_events: Vec::new(),
            msgs: Vec::new(),
            board: None,
            counters: ShardCounters::default(),
        }
    }

    pub fn me(&self) -> u16 {
        self.me
    }

    pub fn loops(&self) -> u16 {
        self.n
    }

    pub fn mesh(&self) -> Option<&MeshEnd> {
        self.mesh.as_ref()
    }

    /// Where this loop's reports go and the node's merged ones come from.
    pub fn set_board(&mut self, board: Arc<DiskBoard>) {
        self.board = Some(board);
    }

    /// Every disk of the node as a whole (all loops' regions merged, as last
    /// published; this loop's own regions only before anything was published).
    pub fn node_disks(&self) -> Vec<DiskReport> {
        match (&self.mesh, &self.board) {
            (Some(_), Some(b)) => {
                let merged = b.snapshot();
                if merged.is_empty() {
                    self.store.disks()
                } else {
                    merged.to_vec()
                }
            }
            _ => self.store.disks(),
        }
    }

    pub fn counters(&self) -> ShardCounters {
        self.counters
    }

    /// Objects of this loop's range another loop holds.
    pub fn directory_len(&self) -> usize {
        self.dir.len()
    }

    fn send(&mut self, to: u16, msg: Msg) {
        self.counters.sent += 1;
        match self.mesh.as_mut() {
            Some(m) => m.send(to, msg),
            None => tracing::error!(?msg, "no other loop to send to"),
        }
    }

    fn owner(&self, fp: &Fingerprint) -> u16 {
        owner_of(fp, self.n)
    }

    // ----- STORE -----

    /// Finishes a write (see the module docs): [`StoreEvent::Committed`] with `user`
    /// follows, from this store or from the loop that holds the object.
    pub fn commit_start(
        &mut self,
        write: WriteId,
        expect: &Expect,
        user: u64,
    ) -> Result<(), StoreError> {
        let fp = self.store.commit_prepare(write, expect)?;
        if self.store.holds(&fp) {
            return self.store.commit_finish(write, user);
        }
        let k = self.owner(&fp);
        if k == self.me {
            return match self.decide(&fp, self.me) {
                Verdict::Commit => self.store.commit_finish(write, user),
                v => {
                    self.claims.insert(user, Claim { write, fp });
                    self.on_verdict(user, v);
                    Ok(())
                }
            };
        }
        self.counters.remote_ops += 1;
        self.claims.insert(user, Claim { write, fp });
        self.send(
            k,
            Msg::Claim {
                from: self.me,
                token: user,
                fp,
            },
        );
        Ok(())
    }

    /// The authority's decision on a claim of `fp` by loop `by`.
    fn decide(&mut self, fp: &Fingerprint, by: u16) -> Verdict {
        if self.store.holds(fp) {
            return Verdict::Held(self.me);
        }
        if let Some(h) = self.dir.get(fp) {
            return Verdict::Held(h.holder);
        }
        if self.pending.contains_key(fp) {
            self.counters.retries += 1;
            return Verdict::Retry;
        }
        if by != self.me {
            self.pending.insert(*fp, by);
        }
        Verdict::Commit
    }

    fn on_verdict(&mut self, user: u64, verdict: Verdict) {
        let Some(claim) = self.claims.get(&user) else {
            return;
        };
        let (write, fp) = (claim.write, claim.fp);
        match verdict {
            Verdict::Commit => {
                self.claims.remove(&user);
                match self.store.commit_finish(write, user) {
                    Ok(()) => {
                        if self.owner(&fp) != self.me {
                            self.settling.insert(user, fp);
                        }
                    }
                    Err(e) => {
                        self.settle(fp, None);
                        self.events.push(Event::Store(StoreEvent::Committed {
                            user,
                            result: Err(e),
                        }));
                    }
                }
            }
            Verdict::Retry => self.retry.push(user),
            Verdict::Held(h) if h == self.me => {
                self.claims.remove(&user);
                if let Err(e) = self.store.commit_finish(write, user) {
                    self.events.push(Event::Store(StoreEvent::Committed {
                        user,
                        result: Err(e),
                    }));
                }
            }
            Verdict::Held(h) => self.send(
                h,
                Msg::AddRef {
                    from: self.me,
                    token: user,
                    fp,
                },
            ),
        }
    }

    /// A claim that was told COMMIT ended: tell its authority.
    fn settle(&mut self, fp: Fingerprint, held: Option<Held>) {
        let k = self.owner(&fp);
        if k == self.me {
            self.pending.remove(&fp);
            if let Some(h) = held {
                if h.holder != self.me {
                    self.dir.insert(fp, h);
                }
            }
        } else {
            self.send(
                k,
                Msg::Settled {
                    fp,
                    holder: self.me,
                    held,
                },
            );
        }
    }

    /// Drops a write (its session went away), wherever it waits.
    pub fn abort(&mut self, write: WriteId) {
        let user = self
            .claims
            .iter()
            .find(|(_, c)| c.write == write)
            .map(|(u, _)| *u);
        if let Some(u) = user {
            // An answer may still come: it finds no claim and is dropped; a reference
            // a holder added meanwhile stays (the client saw no answer, like any
            // STORE cut off before its reply).
            self.claims.remove(&u);
            self.retry.retain(|r| *r != u);
        }
        self.store.abort(write);
    }

    // ----- DELETE -----

    /// Drops one reference to `fp` wherever it is held: [`StoreEvent::Deleted`] with
    /// `user` follows.
    pub fn delete_start(&mut self, fp: &Fingerprint, user: u64) -> Result<(), StoreError> {
        if self.store.holds(fp) {
            self.store.delete_start(fp, user)?;
            self.deleting.insert(user, *fp);
            return Ok(());
        }
        let k = self.owner(fp);
        self.counters.remote_ops += 1;
        if k == self.me {
            let h = self.dir.get(fp).ok_or(StoreError::NotFound(*fp))?.holder;
            self.send(
                h,
                Msg::Delete {
                    from: self.me,
                    token: user,
                    fp: *fp,
                },
            );
        } else {
            self.send(
                k,
                Msg::Delete {
                    from: self.me,
                    token: user,
                    fp: *fp,
                },
            );
        }
        Ok(())
    }

    // ----- lookups and reads -----

    /// Where `fp` is and what it is: at once when this loop holds it or is its
    /// authority, otherwise by asking the authority ([`Event::Located`]).
    pub fn locate(&mut self, fp: &Fingerprint, user: u64) -> Locate {
        let k = self.owner(fp);
        if k == self.me || self.store.holds(fp) {
            return Locate::Now(self.lookup_here(fp));
        }
        self.counters.remote_ops += 1;
        self.send(
            k,
            Msg::Lookup {
                from: self.me,
                token: user,
                fp: *fp,
            },
        );
        Locate::Later
    }

    /// What this loop knows of `fp`: its own store's object, else (as the authority
    /// for `fp`) where its directory says another loop holds it.
    fn lookup_here(&self, fp: &Fingerprint) -> Option<(u16, ObjectMeta)> {
        if let Some(m) = self.store.get(fp) {
            return Some((self.me, m));
        }
        self.dir.get(fp).map(|h| {
            (
                h.holder,
                ObjectMeta {
                    len: h.len,
                    disk: h.disk,
                    refcount: 0,
                },
            )
        })
    }

    /// [`Store::read_start`] at loop `holder`: a read another loop serves comes back
    /// as [`StoreEvent::Read`] like a local one.
    pub fn read_start(
        &mut self,
        holder: u16,
        fp: &Fingerprint,
        offset: u64,
        len: usize,
        user: u64,
    ) -> Result<ReadStart, StoreError> {
        if holder == self.me || self.mesh.is_none() {
            return self.store.read_start(fp, offset, len, user);
        }
        self.counters.remote_reads += 1;
        let slot = match self.free_reads.pop() {
            Some(s) => s,
            None => {
                self.reads.push(None);
                (self.reads.len() - 1) as u32
            }
        };
        self.reads[slot as usize] = Some(RemoteRead {
            user,
            arrived: None,
            released: false,
        });
        self.send(
            holder,
            Msg::Read {
                from: self.me,
                token: u64::from(slot),
                fp: *fp,
                offset,
                len,
            },
        );
        Ok(ReadStart::Pending(ReadId(REMOTE_READ | slot)))
    }

    /// [`Store::read_take`], for local and remote reads alike: a remote read lends
    /// the holder's buffers, as they came.
    pub fn read_take(&mut self, id: ReadId) -> Result<Piece, StoreError> {
        if id.0 & REMOTE_READ == 0 {
            return self.store.read_take(id);
        }
        let slot = (id.0 & !REMOTE_READ) as usize;
        let Some(r) = self.reads.get_mut(slot).and_then(Option::take) else {
            return Err(StoreError::UnknownWrite);
        };
        self.free_reads.push(slot as u32);
        match r.arrived {
            Some(result) => result,
            None => Err(StoreError::Format("remote read finished early".into())),
        }
    }

    /// [`Store::read_give`], for local and remote pieces alike: another loop's
    /// buffers go back to its pool.
    pub fn read_give(&mut self, mut piece: Piece) {
        match piece.lender.take() {
            Some(h) if h != self.me && self.mesh.is_some() => {
                self.send(h, Msg::ReadReturn { piece })
            }
            _ => self.store.read_give(piece),
        }
    }

    /// [`Store::read_release`], for local and remote reads alike.
    pub fn read_release(&mut self, id: ReadId) {
        if id.0 & REMOTE_READ == 0 {
            return self.store.read_release(id);
        }
        let slot = (id.0 & !REMOTE_READ) as usize;
        let done = match self.reads.get_mut(slot) {
            Some(Some(r)) if r.arrived.is_some() => true,
            Some(Some(r)) => {
                r.released = true;
                false
            }
            _ => return,
        };
        if done {
            if let Some(Some(r)) = self.reads.get_mut(slot).map(Option::take) {
                if let Some(Ok(piece)) = r.arrived {
                    self.read_give(piece);
                }
            }
            self.free_reads.push(slot as u32);
        }
    }

    // ----- GET_CONTENTS -----

    /// Objects the index walk will find, for the count GET_CONTENTS promises: this
    /// loop's shard from its store, the others' from what they last published.
    pub fn objects(&self) -> u64 {
        match &self.mesh {
            Some(m) => {
                m.publish_held(self.store.objects());
                m.held_total()
            }
            None => self.store.objects(),
        }
    }

    /// Up to `max` entries of shard `shard`'s range after `after`: through `each`
    /// at once when `shard` is this loop, otherwise as [`Event::Page`].
    pub fn contents_page(
        &mut self,
        shard: u16,
        after: Option<Fingerprint>,
        max: usize,
        user: u64,
        each: impl FnMut(Fingerprint, DiskId),
    ) -> PageStart {
        if shard == self.me || self.mesh.is_none() {
            let n = self.list_range(after, max, each);
            return PageStart::Now { end: n < max };
        }
        self.counters.remote_ops += 1;
        self.send(
            shard,
            Msg::Contents {
                from: self.me,
                token: user,
                after,
                max,
            },
        );
        PageStart::Later
    }

    /// This loop's range after `after`: its own store's objects of the range merged
    /// with its directory, in fingerprint order. Returns how many were listed.
    fn list_range(
        &self,
        after: Option<Fingerprint>,
        max: usize,
        mut each: impl FnMut(Fingerprint, DiskId),
    ) -> usize {
        use std::ops::Bound;
        let (lo, below) = if self.mesh.is_none() {
            (None, None)
        } else {
            range_of(self.me, self.n)
        };
        let from = match (after, lo) {
            (Some(a), Some(l)) if a < l => Bound::Included(l),
            (Some(a), _) => Bound::Excluded(a),
            (None, Some(l)) => Bound::Included(l),
            (None, None) => Bound::Unbounded,
        };
        let to = below.map_or(Bound::Unbounded, Bound::Excluded);
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b)) = (from, to) {
            if a >= b {
                return 0;
            }
        }
        let mut mine = self.store.objects_between(from, to).peekable();
        let mut theirs = self
            .dir
            .range((from, to))
            .map(|(fp, h)| (*fp, h.disk))
            .peekable();
        let mut n = 0;
        while n < max {
            let next = match (mine.peek(), theirs.peek()) {
                (Some(a), Some(b)) if a.0 <= b.0 => mine.next(),
                (Some(_), Some(_)) => theirs.next(),
                (Some(_), None) => mine.next(),
                (None, Some(_)) => theirs.next(),
                (None, None) => None,
            };
            let Some((fp, disk)) = next else { break };
            each(fp, disk);
            n += 1;
        }
        n
    }

    // ----- the turn -----

    /// One turn: the store's completions, the other loops' messages, retried
    /// claims. What finished for this loop's sessions is appended to `out`.
    pub fn poll(&mut self, out: &mut Vec<Event>) {
        let mut evs = std::mem::take(&mut self.store_events);
        self.store.poll(&mut evs);
        for ev in evs.drain(..) {
            self.on_store_event(ev);
        }
        self.store_events = evs;
        if let Some(mut mesh) = self.mesh.take() {
            mesh.publish_held(self.store.objects());
            let mut msgs = std::mem::take(&mut self.msgs);
            mesh.recv(|from, m| msgs.push((from, m)));
            self.mesh = Some(mesh);
            for (from, m) in msgs.drain(..) {
                self.on_msg(from, m);
            }
            self.msgs = msgs;
            for user in std::mem::take(&mut self.retry) {
                if let Some(c) = self.claims.get(&user) {
                    let fp = c.fp;
                    let k = self.owner(&fp);
                    if k == self.me {
                        let v = self.decide(&fp, self.me);
                        self.on_verdict(user, v);
                    } else {
                        self.send(
                            k,
                            Msg::Claim {
                                from: self.me,
                                token: user,
                                fp,
                            },
                        );
                    }
                }
            }
            if let Some(m) = self.mesh.as_mut() {
                m.flush();
            }
        }
        out.append(&mut self.events);
    }

    /// Whether the loop may sleep: nothing to retry and the store allows it.
    pub fn can_sleep(&self) -> bool {
        self.retry.is_empty() && self.store.can_sleep()
    }

    fn on_store_event(&mut self, ev: StoreEvent) {
        let user = ev.user();
        if user & REMOTE_USER != 0 && user != u64::MAX {
            return self.on_work_event(ev);
        }
        match &ev {
            StoreEvent::Committed { result, .. } => {
                if let Some(fp) = self.settling.remove(&user) {
                    let held = result.as_ref().ok().map(|c| Held {
                        holder: self.me,
                        len: c.len,
                        disk: c.disk,
                    });
                    self.settle(fp, held);
                }
            }
            StoreEvent::Deleted { result, .. } => {
                if let Some(fp) = self.deleting.remove(&user) {
                    if matches!(result, Ok(0)) {
                        self.gone(fp);
                    }
                }
            }
            StoreEvent::Read { .. } => {}
        }
        self.events.push(Event::Store(ev));
    }

    /// This store dropped the last reference to `fp`.
    fn gone(&mut self, fp: Fingerprint) {
        let k = self.owner(&fp);
        if k != self.me {
            self.send(
                k,
                Msg::Gone {
                    fp,
                    holder: self.me,
                },
            );
        }
    }

    fn work_user(&mut self, w: Work) -> u64 {
        let slot = match self.free_works.pop() {
            Some(s) => {
                self.works[s] = Some(w);
                s
            }
            None => {
                self.works.push(Some(w));
                self.works.len() - 1
            }
        };
        REMOTE_USER | slot as u64
    }

    fn take_work(&mut self, user: u64) -> Option<Work> {
        let slot = (user & !REMOTE_USER) as usize;
        let w = self.works.get_mut(slot)?.take()?;
        self.free_works.push(slot);
        Some(w)
    }

    fn on_work_event(&mut self, ev: StoreEvent) {
        let Some(work) = self.take_work(ev.user()) else {
            return;
        };
        match (work, ev) {
            (Work::AddRef { from, token }, StoreEvent::Committed { result, .. }) => {
                self.send(from, Msg::Stored { token, result })
            }
            (Work::Delete { from, token, fp }, StoreEvent::Deleted { result, .. }) => {
                if matches!(result, Ok(0)) {
                    self.gone(fp);
                }
                self.send(from, Msg::Deleted { token, result });
            }
            (Work::Read { from, token }, StoreEvent::Read { id, .. }) => {
                let result = self.store.read_take(id);
                self.send(from, Msg::ReadDone { token, result });
            }
            (w, ev) => tracing::error!(?w, ?ev, "store event does not match its work"),
        }
    }

    fn on_msg(&mut self, from: u16, m: Msg) {
        match m {
            Msg::Claim { from, token, fp } => {
                let verdict = self.decide(&fp, from);
                self.send(from, Msg::ClaimAnswer { token, fp, verdict });
            }
            Msg::ClaimAnswer { token, fp, verdict } => {
                if self.claims.get(&token).is_some_and(|c| c.fp == fp) {
                    self.on_verdict(token, verdict);
                } else if verdict == Verdict::Commit {
                    // The STORE went away (its connection closed) while the claim
                    // travelled: release the fingerprint, or other claims of it would
                    // be told RETRY for ever.
                    self.settle(fp, None);
                }
            }
            Msg::Settled { fp, holder, held } => {
                if self.pending.get(&fp) == Some(&holder) {
                    self.pending.remove(&fp);
                }
                if let Some(h) = held {
                    self.dir.insert(fp, h);
                }
            }
            Msg::Gone { fp, holder } => {
                if self.dir.get(&fp).is_some_and(|h| h.holder == holder) {
                    self.dir.remove(&fp);
                }
            }
            Msg::AddRef { from, token, fp } => {
                let user = self.work_user(Work::AddRef { from, token });
                if let Err(e) = self.store.ref_start(&fp, user) {
                    self.take_work(user);
                    self.send(
                        from,
                        Msg::Stored {
                            token,
                            result: Err(e),
                        },
                    );
                }
            }
            Msg::Stored { token, result } => self.on_stored(token, result),
            Msg::Delete { from, token, fp } => {
                if self.store.holds(&fp) {
                    let user = self.work_user(Work::Delete { from, token, fp });
                    if let Err(e) = self.store.delete_start(&fp, user) {
                        self.take_work(user);
                        self.send(
                            from,
                            Msg::Deleted {
                                token,
                                result: Err(e),
                            },
                        );
                    }
                } else if self.owner(&fp) == self.me {
                    match self.dir.get(&fp) {
                        Some(h) if h.holder != self.me => {
                            let h = h.holder;
                            self.send(h, Msg::Delete { from, token, fp });
                        }
                        _ => self.send(
                            from,
                            Msg::Deleted {
                                token,
                                result: Err(StoreError::NotFound(fp)),
                            },
                        ),
                    }
                } else {
                    self.send(
                        from,
                        Msg::Deleted {
                            token,
                            result: Err(StoreError::NotFound(fp)),
                        },
                    );
                }
            }
            Msg::Deleted { token, result } => self.events.push(Event::Store(StoreEvent::Deleted {
                user: token,
                result,
            })),
            Msg::Lookup { from, token, fp } => {
                let found = self.lookup_here(&fp);
                self.send(from, Msg::Found { token, found });
            }
            Msg::Found { token, found } => self.events.push(Event::Located { user: token, found }),
            Msg::Read {
                from,
                token,
                fp,
                offset,
                len,
            } => {
                let user = self.work_user(Work::Read { from, token });
                match self.store.read_start(&fp, offset, len, user) {
                    Ok(ReadStart::Pending(_)) => {}
                    Ok(ReadStart::Ready(piece)) => {
                        self.take_work(user);
                        self.send(
                            from,
                            Msg::ReadDone {
                                token,
                                result: Ok(piece),
                            },
                        );
                    }
                    Err(e) => {
                        self.take_work(user);
                        self.send(
                            from,
                            Msg::ReadDone {
                                token,
                                result: Err(e),
                            },
                        );
                    }
                }
            }
            Msg::ReadDone { token, result } => {
                // The piece's device buffers belong to the sender's pool.
                let result = result.map(|mut p| {
                    p.lender = Some(from);
                    p
                });
                let slot = token as usize;
                match self.reads.get_mut(slot) {
                    Some(Some(r)) if !r.released => {
                        let user = r.user;
                        r.arrived = Some(result);
                        self.events.push(Event::Store(StoreEvent::Read {
                            user,
                            id: ReadId(REMOTE_READ | slot as u32),
                        }));
                    }
                    Some(Some(_)) => {
                        self.reads[slot] = None;
                        self.free_reads.push(slot as u32);
                        if let Ok(piece) = result {
                            self.read_give(piece);
                        }
                    }
                    _ => {
                        if let Ok(piece) = result {
                            self.read_give(piece);
                        }
                    }
                }
            }
            Msg::ReadReturn { piece } => self.store.read_give(piece),
            Msg::Contents {
                from,
                token,
                after,
                max,
            } => {
                let mut page = Vec::with_capacity(max.min(4096));
                let n = self.list_range(after, max.min(4096), |fp, disk| page.push((fp, disk)));
                self.send(
                    from,
                    Msg::ContentsPage {
                        token,
                        page,
                        end: n < max.min(4096),
                    },
                );
            }
            Msg::ContentsPage { token, page, end } => self.events.push(Event::Page {
                user: token,
                page,
                end,
            }),
        }
        let _ = from;
    }

    fn on_stored(&mut self, token: u64, result: Result<Committed, StoreError>) {
        let Some(claim) = self.claims.get(&token) else {
            return;
        };
        let fp = claim.fp;
        match result {
            // The holder dropped it to zero meanwhile: claim again.
            Err(StoreError::NotFound(_)) => {
                self.retry.push(token);
            }
            result => {
                if let Some(c) = self.claims.remove(&token) {
                    self.store.drop_write(c.write);
                }
                let _ = fp;
                self.events.push(Event::Store(StoreEvent::Committed {
                    user: token,
                    result,
                }));
            }
        }
    }
}

/// The loop's own shard, for everything that needs no routing (writes while they
/// arrive, room, compaction, checkpoints, probes, reports).
impl std::ops::Deref for Shards {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl std::ops::DerefMut for Shards {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.store
    }
}

/// Fills each shard's directory from what the others hold: run once at start-up,
/// after every shard has recovered and before the loops start. Returns how many
/// objects were found held twice (kept at the first holder, counted).
pub fn build_directories(shards: &mut [Shards]) -> u64 {
    let n = shards.len() as u16;
    let mut found: Vec<(Fingerprint, Held)> = Vec::new();
    for (j, s) in shards.iter().enumerate() {
        s.store.each_object(|fp, meta| {
            if owner_of(&fp, n) != j as u16 {
                found.push((
                    fp,
                    Held {
                        holder: j as u16,
                        len: meta.len,
                        disk: meta.disk,
                    },
                ));
            }
        });
    }
    let mut dups = 0;
    for (fp, h) in found {
        let k = usize::from(owner_of(&fp, n));
        if shards[k].store.holds(&fp) || shards[k].dir.contains_key(&fp) {
            dups += 1;
            tracing::error!(%fp, holder = h.holder, "object held by two shards; serving the first");
            continue;
        }
        shards[k].dir.insert(fp, h);
    }
    for s in shards.iter_mut() {
        s.counters.duplicates = dups;
    }
    dups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::mesh::mesh;
    use crate::store::StoreConfig;
    use nvme::mem::MemDisk;

    /// `n` shards over regions of one memory disk, connected by a mesh.
    fn shards(n: u16) -> Vec<Shards> {
        let disk = MemDisk::new(u64::from(n) * (32 << 20) + (1 << 20), 3);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let l = crate::store::label::open_or_label(&mut disk.device(), Some(n), &mut rng)
            .expect("label");
        let mut ends = mesh(n).expect("mesh").into_iter();
        (0..n)
            .map(|k| {
                let (base, len) = l.region(k);
                let r = nvme::Region::new(disk.device(), base, len).expect("region");
                let store =
                    Store::open(vec![Box::new(r)], StoreConfig::default(), 1).expect("store");
                Shards::new(store, ends.next())
            })
            .collect()
    }

    /// Polls every shard in turn until shard `at` reports something for `user`; what
    /// shards report meanwhile for others waits in `seen` (one list per shard).
    fn wait(all: &mut [Shards], seen: &mut Vec<Vec<Event>>, at: usize, user: u64) -> Event {
        seen.resize_with(all.len(), Vec::new);
        for _ in 0..100_000 {
            if let Some(p) = seen[at].iter().position(|e| e.user() == user) {
                return seen[at].swap_remove(p);
            }
            for (i, s) in all.iter_mut().enumerate() {
                s.poll(&mut seen[i]);
            }
        }
        panic!("no event for user {user} at shard {at}");
    }

    /// Bytes whose fingerprint another shard than `not` owns (of `n`).
    fn data_owned_elsewhere(n: u16, not: u16) -> Vec<u8> {
        (0u32..)
            .map(|i| i.to_le_bytes().repeat(300))
            .find(|d| owner_of(&Fingerprint::of(d), n) != not)
            .expect("some bytes")
    }

    fn store(s: &mut Shards, data: &[u8], user: u64) -> WriteId {
        let w = s.store.begin().expect("begin");
        s.store.append(w, data).expect("append");
        s.commit_start(w, &Expect::NONE, user).expect("commit");
        w
    }

    fn committed(ev: Event) -> Committed {
        match ev {
            Event::Store(StoreEvent::Committed { result, .. }) => result.expect("committed"),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn a_claim_abandoned_in_flight_does_not_block_its_fingerprint() {
        let mut all = shards(2);
        let data = data_owned_elsewhere(2, 0);
        // Shard 0 claims; its STORE goes away before the authority's COMMIT arrives.
        let w = store(&mut all[0], &data, 7);
        all[0].abort(w);
        let mut evs = Vec::new();
        for _ in 0..20 {
            for s in all.iter_mut() {
                s.poll(&mut evs);
            }
        }
        // The same bytes again, through either shard: committed, not RETRY for ever.
        store(&mut all[0], &data, 8);
        let c = committed(wait(&mut all, &mut Vec::new(), 0, 8));
        assert_eq!((c.refcount, c.deduplicated), (1, false));
        store(&mut all[1], &data, 9);
        let c = committed(wait(&mut all, &mut Vec::new(), 1, 9));
        assert_eq!((c.refcount, c.deduplicated), (2, true));
    }

    #[test]
    fn the_same_bytes_claimed_by_two_shards_at_once_become_one_object() {
        for n in [2u16, 3] {
            let mut all = shards(n);
            for round in 0..8u32 {
                let data = round.to_le_bytes().repeat(1000 + round as usize);
                for (k, s) in all.iter_mut().enumerate() {
                    store(s, &data, 100 + k as u64);
                }
                let mut seen = Vec::new();
                let mut refs: Vec<(u32, bool)> = (0..usize::from(n))
                    .map(|k| committed(wait(&mut all, &mut seen, k, 100 + k as u64)))
                    .map(|c| (c.refcount, c.deduplicated))
                    .collect();
                refs.sort();
                let want: Vec<(u32, bool)> = (1..=u32::from(n)).map(|r| (r, r > 1)).collect();
                assert_eq!(refs, want, "n={n} round={round}");
                let holders = all
                    .iter()
                    .filter(|s| s.store.holds(&Fingerprint::of(&data)))
                    .count();
                assert_eq!(holders, 1, "one copy");
            }
        }
    }

    #[test]
    fn ranges_partition_the_first_byte_in_order() {
        for n in 1..=8u16 {
            let mut last = 0u16;
            for b in 0..=255u8 {
                let mut fp = [0u8; 16];
                fp[0] = b;
                let k = owner_of(&Fingerprint(fp), n);
                assert!(k < n && k >= last, "n={n} b={b}");
                last = k;
                let (lo, below) = range_of(k, n);
                let f = Fingerprint(fp);
                assert!(lo.is_none_or(|l| l <= f) && below.is_none_or(|h| f < h));
            }
            assert_eq!(last, n - 1);
        }
    }
}
