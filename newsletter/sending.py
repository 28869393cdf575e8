"""Draining the delivery ledger over SMTP: claim due rows, send each over one of several
reused connections, record every outcome.

Guarantees, and what they rest on:
- A row is claimed (status ``sending``, ``claimed_by``, ``claimed_until``) and committed before
  its message is handed to a server; another worker skips it until the lease runs out.
- Each outcome is committed before the connection that produced it sends the final dot of
  its next message (the moment a server takes a message on), so a crash can leave at most
  ``smtp_connections`` messages accepted by the server but not marked sent: those, and only
  those, may be sent again. Everything else resumes exactly. Everything before that dot
  (rendering, MAIL, RCPT, DATA, the message) overlaps with the commit.
- 4xx replies, timeouts and dropped connections are retried with exponential back-off up to
  ``max_attempts``; 5xx replies fail the delivery at once and, for a refused recipient, count
  towards suppressing the address.
- A run renews the lease of every row it still holds (a heartbeat), so a slow but live worker
  is never taken over; a row whose lease was lost anyway (the process stalled past it) is not
  sent by the old holder.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Table,
    Update,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy import Connection as SAConnection
from sqlalchemy.orm import Session

from newsletter.app import App
from newsletter.compose import Composer, load_deliveries, planned_digest, planned_papers
from newsletter.config import Settings
from newsletter.digests import Claim, Written, WrittenBatch
from newsletter.envelope import envelope_sender
from newsletter.lanes import Connector, Lane, Message
from newsletter.mailer import Outcome, Result, ServerUnreachable, stuffed
from newsletter.models import (
    Delivery,
    DeliveryStatus,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from newsletter.render import Digest, Renderer
from newsletter.tokens import Signer

log = logging.getLogger(__name__)

CLAIM_BATCH = 200
# Messages rendered ahead while every connection waits for replies or commits: enough to
# keep the next round of connections busy; each is a message's worth of memory (~30 KB).
AHEAD = 32
# Plans a share of the period's digests, one committed batch at a time (`digests.iter_plan`).
Plan = Callable[[Claim], Iterator[WrittenBatch]]
GROUP_COMMIT_WAIT = 0.002  # seconds the writer waits for more outcomes to commit together


def make_worker_id(host: str | None = None) -> str:
    """``host:pid:thread``: the host and pid let a process on the same host see that the
    claimant is dead (see `dead_local_claimants`). `host` overrides the hostname for machines
    whose hostnames are not unique."""
    return f"{host or socket.gethostname()}:{os.getpid()}:{threading.get_native_id()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_claimants(claimants: Sequence[str]) -> list[str]:
    """Claims by processes on this host that no longer exist can be taken over at once,
    without waiting for their lease (a crashed `newsletter send` restarted by hand)."""
    host = socket.gethostname()
    dead = []
    for claimant in claimants:
        parts = claimant.split(":")
        if len(parts) >= 2 and parts[0] == host and parts[1].isdigit():
            pid = int(parts[1])
            if pid != os.getpid() and not _pid_alive(pid):
                dead.append(claimant)
    return dead


def _due(session: Session, now: datetime) -> ColumnElement[bool]:
    """Rows a worker may take now: pending and due, or claimed by someone whose lease ran out
    or who died on this host."""
    claimants = list(
        session.scalars(
            select(Delivery.claimed_by)
            .where(Delivery.status == DeliveryStatus.SENDING, Delivery.claimed_until >= now)
            .distinct()
        )
    )
    dead = dead_local_claimants([c for c in claimants if c])
    return or_(
        (Delivery.status == DeliveryStatus.PENDING) & (Delivery.next_attempt_at <= now),
        (Delivery.status == DeliveryStatus.SENDING) & (Delivery.claimed_until < now),
        (Delivery.status == DeliveryStatus.SENDING) & Delivery.claimed_by.in_(dead),
    )


def has_due(session: Session, now: datetime) -> bool:
    """Whether `claim` would find anything: lets an idle worker poll with one cheap query
    instead of starting a whole send run."""
    return session.scalar(select(Delivery.id).where(_due(session, now)).limit(1)) is not None


def claim(session: Session, worker: str, now: datetime, lease: timedelta, limit: int) -> list[int]:
    """Take up to `limit` due rows in one statement (UPDATE … WHERE id IN (SELECT …)
    RETURNING id), so that two claimants can never both take a row: on SQLite the statement
    runs under the database's write lock; on PostgreSQL FOR UPDATE SKIP LOCKED in the
    subquery lets any number of workers claim side by side without waiting on each other."""
    due = select(Delivery.id).where(_due(session, now)).order_by(Delivery.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    taken = session.scalars(
        update(Delivery)
        .where(Delivery.id.in_(due))
        .values(status=DeliveryStatus.SENDING, claimed_by=worker, claimed_until=now + lease)
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(taken)


def backoff(settings: Settings, attempts: int) -> timedelta:
    seconds = min(
        settings.retry_base_seconds * 2 ** max(attempts - 1, 0), settings.retry_max_seconds
    )
    return timedelta(seconds=seconds)


@dataclass
class SendReport:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    suppressed: int = 0
    released: int = 0
    aborted: str | None = None
    failures: list[str] = field(default_factory=list)


def record(
    session: Session, settings: Settings, delivery_id: int, result: Result, now: datetime
) -> str:
    """Write one outcome; returns what became of the delivery (sent, failed, retry)."""
    d = session.get(Delivery, delivery_id)
    if d is None:
        return "gone"
    d.attempts += 1
    d.claimed_by = None
    d.claimed_until = None
    d.smtp_reply = result.describe()
    if result.outcome is Outcome.SENT:
        d.status = DeliveryStatus.SENT
        d.sent_at = now
        d.error = None
        return "sent"
    d.error = result.describe()
    if result.outcome is Outcome.TEMPORARY and d.attempts < settings.max_attempts:
        d.status = DeliveryStatus.PENDING
        d.next_attempt_at = now + backoff(settings, d.attempts)
        return "retry"
    d.status = DeliveryStatus.FAILED
    if result.outcome is Outcome.TEMPORARY:
        d.error = f"gave up after {d.attempts} attempts: {result.describe()}"
        return "failed"
    if result.stage == "rcpt":
        sub = session.get(Subscriber, d.subscriber_id)
        if sub is not None:
            sub.failure_count += 1
            if (
                sub.failure_count >= settings.suppress_after_failures
                and sub.status == SubscriberStatus.ACTIVE
            ):
                sub.status = SubscriberStatus.BOUNCED
                sub.status_reason = (
                    f"suppressed {now:%Y-%m-%d %H:%M} UTC after the server refused the "
                    f"address: {result.describe()}"
                )
                return "suppressed"
    return "failed"


def mark_sent(
    target: Session | SAConnection, outcomes: Sequence[tuple[int, Result | None]], now: datetime
) -> None:
    """`record` for the common case, as a single statement for the whole batch: at hundreds
    of messages a second, loading and flushing each row through the ORM cost more than
    sending it."""
    if not outcomes:
        return
    values: dict[str, object] = {"sent_at": now}
    for n, (delivery_id, result) in enumerate(outcomes):
        values[f"id_{n}"] = delivery_id
        values[f"reply_{n}"] = result.describe() if result else None
    target.execute(_mark_sent_statement(len(outcomes)), values)


@functools.lru_cache(maxsize=64)
def _mark_sent_statement(size: int) -> Update:
    """`mark_sent`'s UPDATE for `size` rows, made once: building and compiling a statement
    per group of outcomes cost more than running it."""
    table = cast(Table, Delivery.__table__)
    ids: list[BindParameter[int]] = [bindparam(f"id_{n}") for n in range(size)]
    replies: list[tuple[ColumnElement[bool], BindParameter[str]]] = [
        (table.c.id == ids[n], bindparam(f"reply_{n}")) for n in range(size)
    ]
    return (
        update(table)
        .where(table.c.id.in_(ids))
        .values(
            status=DeliveryStatus.SENT,
            sent_at=bindparam("sent_at", type_=table.c.sent_at.type),
            error=None,
            smtp_reply=case(*replies),
            attempts=table.c.attempts + 1,
            claimed_by=None,
            claimed_until=None,
        )
    )


def release(session: Session, delivery_ids: Sequence[int], worker: str) -> int:
    """Hand rows back untouched (no attempt counted): used on a clean stop or when the server
    cannot be reached at all."""
    if not delivery_ids:
        return 0
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id.in_(delivery_ids),
            Delivery.status == DeliveryStatus.SENDING,
            Delivery.claimed_by == worker,
        )
        .values(status=DeliveryStatus.PENDING, claimed_by=None, claimed_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def renew(session: Session, delivery_ids: Sequence[int], worker: str, until: datetime) -> set[int]:
    """Extend the lease of rows this worker still holds; returns those it still held."""
    if not delivery_ids:
        return set()
    rows = session.scalars(
        update(Delivery)
        .where(
            Delivery.id.in_(delivery_ids),
            Delivery.status == DeliveryStatus.SENDING,
            Delivery.claimed_by == worker,
        )
        .values(claimed_until=until)
        .returning(Delivery.id)
    )
    return set(rows)


def active_count(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).where(Subscriber.status == SubscriberStatus.ACTIVE))
        or 0
    )


def pending_count(session: Session) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING])
            )
        )
        or 0
    )


@dataclass
class _Job:
    delivery_id: int
    digest: Digest | None = None
    planned: Written | None = None  # just planned: its digest is made when its turn comes


@dataclass(slots=True)
class _Done:
    delivery_id: int
    result: Result | None  # None: not attempted (server unreachable or stopping)
    # Its place in the writer's queue: it is in the ledger once the writer has committed
    # this far (`Sender._committed`), as outcomes are committed in the order they come.
    seq: int = 0


class Sender:
    """One `send` run (or a worker's round). One thread does all the work that needs
    Python's interpreter: planning (with `plan`), claiming, composing, rendering, and every
    SMTP connection at once through non-blocking sockets (`lanes`). Two helper threads wait
    on I/O nearly all the time: the ledger writer, which commits outcomes, and the
    connector, which opens connections. (A thread per connection and one for planning cost,
    in turns at the interpreter's lock, about as much as the work itself.)"""

    def __init__(
        self,
        app: App,
        *,
        on_event: Callable[[str, int], None] | None = None,
        stop: threading.Event | None = None,
        now: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
    ) -> None:
        self.app = app
        self.settings = app.settings
        self.worker = worker_id or make_worker_id()
        self.renderer = Renderer(self.settings)
        self.composer = Composer(self.renderer, Signer(app.secret_key))
        self.secret_key = app.secret_key
        self.on_event = on_event or (lambda kind, n: None)
        self.stop = stop or threading.Event()
        self.now = now
        self.report = SendReport()
        self._done: queue.Queue[_Done | None] = queue.Queue()
        self._queued = 0  # the last outcome's place in `_done` (the SMTP thread's count)
        self._committed = 0  # the writer has committed every outcome up to this place
        # The SMTP thread's own: jobs to send, and what it took but no lane has yet
        # (messages rendered ahead while the lanes wait for replies and commits; first,
        # those to start again after a connection went).
        self._jobs: deque[_Job] = deque()
        self._ahead: deque[_Job | Message[_Job]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._unreachable_since: float | None = None
        self._unreachable_reason = ""
        self._in_hand: set[int] = set()
        self._lost: set[int] = set()  # rows whose lease another worker took over
        self._lock = threading.Lock()
        self._ledger: SAConnection | None = None  # the writer's own autocommit connection
        self._lease = timedelta(seconds=self.settings.lease_seconds)
        # A third of the lease: two renewals can fail (a slow commit, a blip) before it ends.
        self._renew_every = max(self.settings.lease_seconds / 3, 0.05)

    # -- the run ---------------------------------------------------------------------------
    def run(self, plan: Plan | None = None) -> SendReport:
        """Send everything due. With `plan`, first plan digests and send each batch straight
        from memory once it is committed (claimed by this run: see `digests.Claim`); then,
        or without one, claim what is due in the ledger."""
        writer = threading.Thread(target=self._writer_loop, name="ledger-writer", daemon=True)
        writer.start()
        work = self._work(plan)
        try:
            self._pump(work)
        except BaseException:
            log.exception("sending failed; handing back what it held")
            self.stop.set()
            raise
        finally:
            work.close()
            while self._ahead or self._jobs:  # taken and never (wholly) sent: handed back
                item = self._ahead.popleft() if self._ahead else self._jobs.popleft()
                job = item.token if isinstance(item, Message) else item
                self._done.put(_Done(job.delivery_id, None))
            self._done.put(None)
            writer.join()
            self._wake_r.close()
            self._wake_w.close()
        return self.report

    def _work(self, plan: Plan | None) -> Generator[list[_Job] | float, None, None]:
        """Work for the SMTP thread, a batch at a time as it asks: the digests it plans
        (with `plan`), then what is due in the ledger. A number instead: nothing to do for
        that many seconds (retries not yet due, or outcomes not yet written)."""
        if plan is not None:
            for written in plan(Claim(self.worker, self._lease)):
                yield self._planned(written)
        while not self.stop.is_set():
            if self._out_of_patience():
                return
            now = self.now()
            # The claim commits on its own before the batch is composed: on SQLite a write
            # transaction holds the database's only write lock, and composing 200 digests
            # under it kept every writer (this one's, the helpers', the planner) waiting.
            with self.app.sessions() as session:
                with session.begin():
                    ids = claim(session, self.worker, now, self._lease, CLAIM_BATCH)
                if ids:
                    with self._lock:
                        self._in_hand.update(ids)  # from here on the lease is renewed
                try:
                    with session.begin():
                        batch = load_deliveries(session, self.composer, ids, now) if ids else []
                except BaseException:
                    for unsent in ids:  # the writer hands them back
                        self._done.put(_Done(unsent, None))
                    raise
            if batch:
                yield self._claimed(ids, batch)
                continue
            # Nothing due now: wait for what is in flight and for retries that come due.
            with self._lock:
                busy = bool(self._in_hand)
            with self.app.sessions() as session:
                waiting = session.scalar(
                    select(func.min(Delivery.next_attempt_at)).where(
                        Delivery.status == DeliveryStatus.PENDING
                    )
                )
            if waiting is None and not busy:
                return
            delay = 0.05 if waiting is None else (waiting - self.now()).total_seconds()
            yield min(max(delay, 0.05), 1.0)

    def _planned(self, written: WrittenBatch) -> list[_Job]:
        """A batch of the plan, committed and claimed by this run: sent from memory (or,
        should the ledger differ from the plan, read back from the ledger)."""
        ids = [row.delivery_id for row in written.rows]
        with self._lock:
            self._in_hand.update(ids)  # from here on the lease is renewed
        try:
            if written.exact:
                papers = planned_papers(written.rows)
                if self.composer.missing(papers):
                    with self.app.sessions() as session:
                        self.composer.read_papers(session, papers)
                return [_Job(row.delivery_id, planned=row) for row in written.rows]
            with self.app.sessions() as session, session.begin():
                batch = load_deliveries(session, self.composer, ids, self.now())
        except BaseException:
            for unsent in ids:  # the writer hands them back
                self._done.put(_Done(unsent, None))
            raise
        return self._claimed(ids, batch)

    def _claimed(self, ids: Sequence[int], batch: Sequence[tuple[int, Digest]]) -> list[_Job]:
        """Jobs for rows this run holds; rows of `ids` not in `batch` (deleted since) are
        let go."""
        for gone in set(ids) - {delivery_id for delivery_id, _ in batch}:
            self._done.put(_Done(gone, None))
        return [_Job(delivery_id, digest) for delivery_id, digest in batch]

    def _out_of_patience(self) -> bool:
        """A server that cannot be reached at all is retried for a while (it may be
        restarting); then the run gives up (sets `stop`), handing every row back untouched."""
        with self._lock:
            since = self._unreachable_since
        patience = self.settings.smtp_unreachable_patience
        if since is None or time.monotonic() - since <= patience:
            return False
        with self._lock:
            reason = self._unreachable_reason
        self.report.aborted = (
            f"{reason}; gave up after {patience:g}s. Nothing was "
            "lost: run `newsletter send` again when the server is back"
        )
        self.stop.set()
        return True

    # -- the SMTP thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        """Wake the SMTP thread from its wait (a commit, or a connection, is ready)."""
        # BlockingIOError: plenty of wake-ups are pending already; OSError: shutting down.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _take(self, *, new: bool = False) -> _Job | Message[_Job] | None:
        """The next thing to send, without waiting: what was taken already first, unless
        `new`."""
        if self._ahead and not new:
            return self._ahead.popleft()
        return self._jobs.popleft() if self._jobs else None

    def _next_message(self, *, new: bool = False) -> Message[_Job] | None:
        """The next message, rendered and ready for DATA (`new`: from the jobs, not from
        what was taken already). A row is handed back instead when the run is stopping or
        another worker has taken it over."""
        while (item := self._take(new=new)) is not None:
            job = item.token if isinstance(item, Message) else item
            with self._lock:
                lost = job.delivery_id in self._lost
            if self.stop.is_set() or lost:
                self._done.put(_Done(job.delivery_id, None))
                continue
            if isinstance(item, Message):
                return item
            now = self.now()
            if job.digest is None:
                assert job.planned is not None
                job.digest = planned_digest(self.composer, job.planned, now)
                job.planned = None
            data = self.renderer.render_bytes(job.digest, now=now)
            sender = envelope_sender(self.settings, self.secret_key, job.delivery_id)
            return Message(job, sender, job.digest.to, stuffed(data, crlf_only=True))
        return None

    def _pump(self, work: Iterator[list[_Job] | float]) -> None:
        """Every SMTP connection of this run, driven by this one thread (see `lanes`),
        which also plans, composes and renders whenever it would otherwise wait.

        A message's final dot goes out together with the next message's MAIL, RCPT and DATA
        (one round trip per message), and only once the lane's previous outcome is in the
        ledger: this is what bounds the resends after a crash to one message per
        connection. Rendering and everything up to the dot overlap with that commit."""
        settings = self.settings
        count = settings.smtp_connections
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        masks: dict[int, int] = {}  # lane -> events it is registered for

        def detach(index: int) -> Callable[[socket.socket], None]:
            def unregister(sock: socket.socket) -> None:
                if masks.pop(index, None) is not None:
                    selector.unregister(sock)

            return unregister

        previous: list[_Done | None] = [None] * count  # each lane's last outcome

        def reporter(index: int) -> Callable[[Message[_Job], Result | None], None]:
            def report(message: Message[_Job], result: Result | None) -> None:
                if result is None:  # never reached the server whole: start it again
                    self._ahead.appendleft(message)
                    return
                self._queued += 1
                done = previous[index] = _Done(message.token.delivery_id, result, self._queued)
                self._done.put(done)

            return report

        lanes = [Lane(settings, reporter(i), detach(i)) for i in range(count)]
        connector = Connector(settings, self._wake)
        # what waits for its lane's connection to open
        waiting: list[_Job | Message[_Job] | None] = [None] * count
        paused_until = [0.0] * count
        pause = [0.5] * count
        rest_until = 0.0  # the work said: nothing more before then
        more = True  # the work may have more
        try:
            while True:
                now = time.monotonic()
                for index, opened in connector.ready():
                    item, waiting[index] = waiting[index], None
                    if isinstance(opened, ServerUnreachable):
                        with self._lock:
                            if self._unreachable_since is None:
                                self._unreachable_since = now
                            self._unreachable_reason = str(opened)
                        paused_until[index] = now + pause[index]
                        pause[index] = min(pause[index] * 2, 8.0)
                        if item is not None:  # handed back: the run may end meanwhile
                            job = item.token if isinstance(item, Message) else item
                            self._done.put(_Done(job.delivery_id, None))
                        continue
                    pause[index] = 0.5
                    with self._lock:
                        self._unreachable_since = None
                    lanes[index].attach(opened)
                    masks[index] = selectors.EVENT_READ
                    selector.register(lanes[index].sock, selectors.EVENT_READ, index)
                    if item is not None:
                        self._ahead.appendleft(item)
                if self.stop.is_set() or self._out_of_patience():
                    while self._jobs:  # not begun: handed back in one go
                        self._done.put(_Done(self._jobs.popleft().delivery_id, None))
                for index, lane in enumerate(lanes):
                    self._feed(index, lane, previous[index], waiting, paused_until, connector)
                if more and len(self._jobs) < 2 * count and now >= rest_until:
                    got = next(work, None)
                    if got is None:
                        more = False
                    elif isinstance(got, float):
                        rest_until = now + got
                    else:
                        self._jobs.extend(got)
                    continue  # feed the lanes before waiting for anything
                if (
                    not more
                    and not self._jobs
                    and not self._ahead
                    and not any(waiting)
                    and all(not lane.busy and lane.held is None for lane in lanes)
                ):
                    return
                for index, lane in enumerate(lanes):
                    if lane.open:
                        mask = selectors.EVENT_READ
                        if lane.wants_write:
                            mask |= selectors.EVENT_WRITE
                        if masks.get(index) != mask:
                            masks[index] = mask
                            selector.modify(lane.sock, mask, index)
                timeout = 0.05
                deadlines = [lane.deadline for lane in lanes if lane.busy and lane.deadline]
                if deadlines:
                    timeout = min(timeout, min(deadlines) - now)
                if more and len(self._jobs) < 2 * count:
                    timeout = min(timeout, rest_until - now)
                if timeout > 0 and len(self._ahead) < AHEAD:
                    # Rather than wait for replies and commits, render the next message.
                    message = self._next_message(new=True)
                    if message is not None:
                        self._ahead.append(message)
                        timeout = 0
                for key, events in selector.select(max(timeout, 0.0)):
                    if key.data is None:
                        self._wake_r.recv(4096)
                        continue
                    lane = lanes[key.data]
                    if events & selectors.EVENT_WRITE:
                        lane.on_writable()
                    if events & selectors.EVENT_READ:
                        lane.on_readable()
                now = time.monotonic()
                for lane in lanes:
                    lane.check_timeout(now)
        finally:
            for index, lane in enumerate(lanes):
                lane.quit()
                item = waiting[index]
                if item is not None:
                    self._ahead.append(item)
            connector.close()
            selector.close()

    def _feed(
        self,
        index: int,
        lane: Lane[_Job],
        previous: _Done | None,
        waiting: list[_Job | Message[_Job] | None],
        paused_until: list[float],
        connector: Connector,
    ) -> None:
        """Give a lane what it can do now: the dot of its held message (with the next
        message's commands) once its previous outcome is committed, a message to begin
        when it is idle, or a connection to open when it has none and there is work."""
        if lane.held is not None:
            if lane.busy or not (previous is None or previous.seq <= self._committed):
                return
            following = self._next_message()
            if not lane.finish(following) and following is not None:
                self._ahead.appendleft(following)  # begun once a lane is free
            return
        if lane.open:
            if lane.busy:
                return
            if lane.worn:
                lane.quit()
                return
            message = self._next_message()
            if message is not None:
                lane.begin(message)
            return
        if waiting[index] is None and time.monotonic() >= paused_until[index]:
            item = self._take()
            if item is not None:
                waiting[index] = item
                connector.request(index)

    # -- the ledger writer -------------------------------------------------------------------
    def _writer_loop(self) -> None:
        """The one thread that writes outcomes, and so the one that can renew leases without
        racing them: whatever is in hand when it renews has no outcome recorded yet."""
        finished = False
        renew_at = time.monotonic() + self._renew_every
        while not finished:
            if time.monotonic() >= renew_at:
                self._renew_leases()
                renew_at = time.monotonic() + self._renew_every
            try:
                first = self._done.get(timeout=max(renew_at - time.monotonic(), 0.01))
            except queue.Empty:
                continue
            batch = [first]
            # Group commit. A commit costs the same for one outcome as for many (on SQLite
            # an fsync under the one write lock that every process shares), and each sender
            # has at most one outcome waiting for it, so wait briefly for the others' too.
            deadline = time.monotonic() + GROUP_COMMIT_WAIT
            while len(batch) < self.settings.smtp_connections:
                try:
                    batch.append(self._done.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            finished = len(items) != len(batch)
            if not items:
                continue
            now = self.now()
            sent = [i for i in items if i.result and i.result.outcome is Outcome.SENT]
            rest = [i for i in items if not (i.result and i.result.outcome is Outcome.SENT)]
            try:
                if sent:
                    self._mark_sent([(i.delivery_id, i.result) for i in sent], now)
                    for item in sent:
                        self._tally("sent", item)
                if rest:
                    self._record_rest(rest, now)
            except Exception:
                log.exception(
                    "could not record %d outcomes; their rows stay claimed and "
                    "will be taken over when the lease ends",
                    len(items),
                )
            finally:
                with self._lock:
                    for item in items:
                        self._in_hand.discard(item.delivery_id)
                self._committed = max(self._committed, *(item.seq for item in items))
                self._wake()  # lanes waiting for these commits may send their dots
        if self._ledger is not None:
            self._ledger.close()

    def _mark_sent(self, outcomes: Sequence[tuple[int, Result | None]], now: datetime) -> None:
        """The common case, in one round trip: one UPDATE on a connection of its own in
        autocommit mode (a single statement is atomic), instead of BEGIN, UPDATE, COMMIT on a
        pooled connection that is pinged at every checkout."""
        try:
            if self._ledger is None:
                self._ledger = self.app.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            mark_sent(self._ledger, outcomes, now)
        except Exception:
            if self._ledger is not None:
                self._ledger.invalidate()
                self._ledger.close()
                self._ledger = None
            raise

    def _record_rest(self, items: Sequence[_Done], now: datetime) -> None:
        """Retries, failures and rows handed back: few, so through the ORM, one transaction."""
        with self.app.sessions() as session, session.begin():
            unsent = [item.delivery_id for item in items if item.result is None]
            if unsent:
                self.report.released += release(session, unsent, self.worker)
            ids = [item.delivery_id for item in items if item.result is not None]
            # One query loads them; record() then finds each row in the session.
            loaded = list(session.scalars(select(Delivery).where(Delivery.id.in_(ids))))
            fates = [
                (record(session, self.settings, item.delivery_id, item.result, now), item)
                for item in items
                if item.result is not None
            ]
            del loaded  # kept until here: the session holds its rows weakly
        for fate, item in fates:  # counted once committed
            self._tally(fate, item)

    def _renew_leases(self) -> None:
        with self._lock:
            held = list(self._in_hand - self._lost)
        if not held:
            return
        try:
            with self.app.sessions() as session, session.begin():
                renewed = renew(session, held, self.worker, self.now() + self._lease)
        except Exception:
            log.exception("could not renew the lease of %d deliveries; will try again", len(held))
            return
        lost = set(held) - renewed
        if lost:
            # Only possible if this process stalled past its lease: another worker has them.
            log.warning("lost the lease of %d deliveries to another worker", len(lost))
            with self._lock:
                self._lost |= lost

    def _tally(self, fate: str, item: _Done) -> None:
        assert item.result is not None
        if fate == "sent":
            self.report.sent += 1
        elif fate == "retry":
            self.report.retried += 1
        else:
            self.report.failed += 1
            if fate == "suppressed":
                self.report.suppressed += 1
            self.report.failures.append(f"delivery {item.delivery_id}: {item.result.describe()}")
            log.warning("delivery %s failed: %s", item.delivery_id, item.result.describe())
        self.on_event(fate, 1)

    # -- main loop -------------------------------------------------------------------------
