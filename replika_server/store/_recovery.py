"""Recovery of the LMDB engine: its in-memory index rebuilt from what LMDB holds, at open and after a failed
commit (see :mod:`.lmdb_engine`). What the records hold is in :mod:`._records`, the index in :mod:`._queue`."""

from __future__ import annotations

import heapq
from typing import Any

import lmdb
import structlog

from replika_server.store._delivery import DEDUP_PRUNE_SLACK
from replika_server.store._engine import (
    QNUM_SEQ,
    QUEUE_PREFIX,
    READABLE_SCHEMAS,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    TOKEN_SEQ,
)
from replika_server.store._history import Historian, migrate_history
from replika_server.store._publishing import BINDING_PREFIX
from replika_server.store._queue import DELAYED, LEASED, READY, Grant, Lane, QueueState, Tracked, options_from_meta
from replika_server.store._records import (
    QNUM,
    STATE,
    VALUE_HEAD_SIZE,
    decode_meta,
    pack_key,
    published_at_of,
    unpack_dedup,
    unpack_key,
    unpack_state,
    unpack_state_ext,
)
from replika_server.store._writes import Writes

__all__ = ["Recovering"]

log = structlog.get_logger("replika.store")


class Recovering(Historian):
    """Loading the index from LMDB."""

    def _load(self) -> None:
        """Rebuild every in-memory structure from LMDB."""
        self._queues.clear()
        self._by_qnum.clear()
        self._owners.clear()
        for heap in (self._lease_heap, self._delay_heap, self._ttl_heap, self._sweeps, self._prunes):
            heap.clear()
        self._bindings.clear()
        self._upgrade()
        now = self._clock.time()
        with self._env.begin() as txn:
            self._token_seq_stored = int(txn.get(TOKEN_SEQ, b"0", db=self._meta_db))
            self._token_seq = max(self._token_seq, self._token_seq_stored)
            self._qnum_seq = max(self._qnum_seq, int(txn.get(QNUM_SEQ, b"0", db=self._meta_db)))
            cur = txn.cursor(db=self._meta_db)
            if cur.set_range(QUEUE_PREFIX):
                for key, value in cur:
                    if not key.startswith(QUEUE_PREFIX):
                        break
                    q = self._load_queue(txn, key[2:].decode(), decode_meta(value))
                    self._queues[q.name] = q
            if cur.set_range(BINDING_PREFIX):
                for key, _ in cur:
                    if not key.startswith(BINDING_PREFIX):
                        break
                    name, pattern = key[len(BINDING_PREFIX) :].decode().split("\0", 1)
                    bound = self._queues.get(name)
                    if bound is not None:
                        bound.bindings.add(pattern)
                        self._bindings.add(name, pattern)
            self._load_dedup(txn)
            self._load_states(txn, now)
            self._load_grants(txn)
            self._load_history(txn)
        heapq.heapify(self._delay_heap)
        heapq.heapify(self._ttl_heap)
        for q in self._queues.values():
            if q.options.message_ttl:
                self._schedule_sweep(q, now)

    def _upgrade(self) -> None:
        """Bring an older store to this schema, in one transaction: a crash in it leaves the old store as it was."""
        with self._env.begin() as txn:
            schema = txn.get(SCHEMA_KEY, db=self._meta_db)
        if schema not in READABLE_SCHEMAS:
            raise RuntimeError(f"store schema {schema!r} is not supported by this version")
        if schema == SCHEMA_VERSION:
            return
        with self._env.begin(write=True) as txn:
            moved = migrate_history(self._env, txn, self._events_db)
            txn.put(SCHEMA_KEY, SCHEMA_VERSION, db=self._meta_db)
        if schema is not None:  # else a new store
            log.info("store_upgraded", old=schema.decode(), new=SCHEMA_VERSION.decode(), history_events_moved=moved)

    def _load_queue(self, txn: lmdb.Transaction, name: str, meta: dict[str, Any]) -> QueueState:
        """A queue's state from its meta record; newer fields (limits, bytes, options, lanes) may be absent."""
        size = meta.get("bytes")
        q = QueueState(name, meta["qnum"], meta["next_id"], meta["count"], size or 0, options_from_meta(meta))
        self._by_qnum[q.qnum] = q
        for prio, qnum in meta.get("lanes") or ():
            q.add_lane(Lane(prio, qnum, q.next_id))
            self._by_qnum[qnum] = q
        q.grants = [Grant(first, last, base) for first, last, base in meta.get("grants") or ()]
        if meta.get("side"):
            q.side = meta["side"]
            self._by_qnum[q.side] = q
        if size is None:
            # Written before byte accounting (and so before lanes): count once, and let the next commit record it.
            prefix = QNUM.pack(q.qnum)
            cur = txn.cursor(db=self._msgs_db)
            if cur.set_range(prefix):
                for key, value in cur:
                    if key[:4] != prefix:
                        break
                    q.bytes += len(value) - VALUE_HEAD_SIZE
            self._touched[q.qnum] = q
        return q

    def _load_dedup(self, txn: lmdb.Transaction) -> None:
        entries: dict[int, list[tuple[float, str, int]]] = {}
        for key, value in txn.cursor(db=self._dedup_db):
            at, mid = unpack_dedup(value)
            entries.setdefault(QNUM.unpack(key[:4])[0], []).append((at, bytes(key[4:]).decode(), mid))
        for qnum, found in entries.items():
            q = self._by_qnum.get(qnum)
            if q is None or q.qnum != qnum:
                continue  # its queue was deleted in a commit that also deleted these; cannot happen
            for at, dedup_id, mid in sorted(found):
                q.dedup.add(dedup_id, at, mid)
            oldest = q.dedup.oldest()
            assert oldest is not None
            self._prunes.append((oldest + q.options.dedup_window + DEDUP_PRUNE_SLACK, q.qnum))
        heapq.heapify(self._prunes)

    def _load_states(self, txn: lmdb.Transaction, now: float) -> None:
        lanes = {lane.qnum: lane for q in self._queues.values() for lane in q.order}
        for key, value in txn.cursor(db=self._state_db):
            qnum, mid = unpack_key(key)
            q = self._by_qnum.get(qnum)
            if q is None:
                continue
            lane = lanes.get(qnum)  # None: the side prefix
            if len(value) == STATE.size:
                attempts, token, due = unpack_state(value)
                expires, prio = 0.0, lane.prio if lane is not None else 0
            else:
                attempts, token, due, expires, prio = unpack_state_ext(value)
            if prio not in q.lanes:  # its lane is recorded in the commit that stored it; cannot happen
                log.error("state_of_unknown_lane", queue=q.name, id=mid, priority=prio)
                prio = 0
            stored = txn.get(key, db=self._msgs_db)
            size = len(stored) - VALUE_HEAD_SIZE if stored is not None else 0
            if lane is not None:
                # A lane's messages are delivered in id order, so every id below a delivered one was delivered
                # (and has a state record) or is gone: the never-delivered run starts after the last of them.
                lane.cursor = max(lane.cursor, mid + 1)
            if due > now:
                t = Tracked(qnum, mid, attempts, token, due, DELAYED, size, prio, expires)
                self._delay_heap.append((due, qnum, mid))
            else:
                t = Tracked(qnum, mid, attempts, token, 0.0, READY, size, prio, expires)
            q.track(mid, t)
            if stored is not None and (expires or q.options.message_ttl):
                self._watch(q, t, published_at_of(stored))

    def _load_grants(self, txn: lmdb.Transaction) -> None:
        """The deliveries recorded by grants (after the state records, which take precedence): each message of a
        grant's range that is still there and has no record of its own was delivered once, with the grant's
        token for it."""
        cur = txn.cursor(db=self._msgs_db)
        for q in self._queues.values():
            lane, tracked = q.lane0, q.tracked
            for g in q.grants:
                lane.cursor = max(lane.cursor, g.last + 1)
                if not cur.set_range(pack_key(q.qnum, g.first)):
                    continue
                for key, value in cur:
                    qnum, mid = unpack_key(key)
                    if qnum != q.qnum or mid > g.last:
                        break
                    if mid in tracked:
                        continue
                    token = g.base + mid - g.first
                    t = Tracked(qnum, mid, 1, token, 0.0, READY, len(value) - VALUE_HEAD_SIZE, 0, 0.0, False)
                    q.track(mid, t)
                    if q.options.message_ttl:
                        self._watch(q, t, published_at_of(value))

    def _recover_after_failure(self) -> None:
        """Reload from LMDB, keeping the leases whose delivery was committed (their token is in LMDB)."""
        leases = [
            (t.qnum, mid, t.token, t.deadline, t.owner)
            for q in self._queues.values()
            for mid, t in q.tracked.items()
            if t.status == LEASED
        ]
        # Ended by the failed batch, so never ended durably:
        # (A nack of this batch already zeroed its record's token; the lease it ended is the one in LMDB.)
        leases += [(t.qnum, t.mid, t.token, t.deadline, t.owner) for t in self._unleased]
        self._unleased = []
        self._writes = Writes()
        self._touched = {}
        self._granted = {}
        self._readied = set()
        # Counters only ever grow (scrapers take a drop for a restart); the failed batch's events stay counted.
        counters = {state.qnum: state.counters for state in self._queues.values()}
        self._load()
        for state in self._queues.values():
            state.counters = counters.get(state.qnum, state.counters)
        for qnum, mid, token, deadline, owner in leases:
            q = self._by_qnum.get(qnum)
            t = q.tracked.get(mid) if q is not None else None
            if q is not None and t is not None and token in (t.token, 0) and t.status == READY:
                self._lease(q, t, deadline, owner)
                self._lease_group(deadline, q, (mid,))
