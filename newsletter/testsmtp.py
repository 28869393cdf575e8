"""An SMTP server that misbehaves on purpose, for tests and fault drills.

Retry and bounce handling is only trustworthy if it has met real refusals, temporary
failures, dropped connections and slow servers over a real socket; mocks of smtplib do not
show what the client actually sees. Rules are per recipient, so one batch can mix good and
bad addresses, and ``times`` makes a fault transient, so a retry can be seen to succeed.

What each action does, and when one use of its ``times`` is spent:

- reject_rcpt: answers RCPT TO with ``code`` (4xx or 5xx).
- tempfail_data: accepts RCPT, then answers the end of DATA with ``code`` (4xx).
- drop_in_data: accepts RCPT, reads the whole message, then closes the connection without
  replying, so the client cannot know whether the message was delivered.
- slow: waits ``delay`` seconds before answering RCPT TO and again before answering DATA.

A 421 reply, from a rule or a random fault, is followed by closing the connection, as
RFC 5321 requires. Data-phase faults are counted when they fire at DATA, so a client that
gives up before DATA does not use them up. When several recipients of one transaction
have data-phase rules, the first of them (in RCPT order) that still applies decides.
"""

from __future__ import annotations

import asyncio
import random
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from newsletter.sink import BackgroundSMTPServer, envelope_sender

__all__ = ["FaultySMTPServer", "Rule"]

Action = Literal["reject_rcpt", "tempfail_data", "drop_in_data", "slow"]
_ACTIONS = ("reject_rcpt", "tempfail_data", "drop_in_data", "slow")

_NO_RULES: Mapping[str, Rule] = MappingProxyType({})


@dataclass
class Rule:
    action: Action
    code: int = 550  # for reject_rcpt (e.g. 550) / tempfail_data (421 or 451)
    times: int | None = None  # apply only the first N times per recipient (None = always)
    delay: float = 0.0  # for slow

    def __post_init__(self) -> None:
        # Checked up front: a mistyped rule would otherwise quietly test nothing.
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {_ACTIONS}")
        if self.action == "reject_rcpt" and not 400 <= self.code <= 599:
            raise ValueError(f"reject_rcpt needs a 4xx or 5xx code, not {self.code}")
        if self.action == "tempfail_data" and not 400 <= self.code <= 499:
            raise ValueError(f"tempfail_data needs a 4xx code such as 451 or 421, not {self.code}")
        if self.action == "slow" and not self.delay > 0:
            raise ValueError(f"slow needs a positive delay, not {self.delay}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be at least 1 (or None for always), not {self.times}")


@dataclass
class _Transaction:
    """What RCPT decided for the DATA that follows in the same transaction."""

    data_rules: list[tuple[str, Rule]] = field(default_factory=list)
    delay: float = 0.0


_ENHANCED = {421: "4.3.2", 450: "4.2.1", 451: "4.3.0", 452: "4.3.1", 550: "5.1.1", 554: "5.7.1"}


def _reply(code: int, text: str) -> str:
    enhanced = _ENHANCED.get(code, f"{code // 100}.0.0")
    return f"{code} {enhanced} {text}"


async def _hang_up(server: Any, reply: str | None = None) -> NoReturn:
    """Optionally reply, then close the connection and end this SMTP session.

    Returning to aiosmtpd would make it write a reply of its own, so this waits instead:
    closing the transport leads to connection_lost(), which cancels the session's task.
    """
    if reply is not None:
        await server.push(reply)
    server.transport.close()
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the session task is cancelled")


class _FaultyHandler:
    def __init__(
        self,
        rules: Mapping[str, Rule] | Callable[[str], Rule | None],
        random_faults: float,
        seed: int,
    ) -> None:
        if not 0.0 <= random_faults <= 1.0:
            raise ValueError(f"random_faults is a probability, not {random_faults}")
        if callable(rules):
            self._lookup: Callable[[str], Rule | None] = rules
        else:
            table = {address.casefold(): rule for address, rule in rules.items()}
            self._lookup = lambda address: table.get(address.casefold())
        self._random_faults = random_faults
        self._rng = random.Random(seed)
        self._fired: Counter[str] = Counter()
        # Keyed by aiosmtpd's Envelope, which it replaces after every DATA and RSET, so
        # state never leaks into the next transaction.
        self._transactions: weakref.WeakKeyDictionary[Any, _Transaction] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._accepted: list[tuple[str, tuple[str, ...], bytes]] = []

    def _use(self, address: str, rule: Rule) -> bool:
        """Spend one of the rule's uses for this recipient; False once they are all spent."""
        key = address.casefold()
        with self._lock:
            if rule.times is not None and self._fired[key] >= rule.times:
                return False
            self._fired[key] += 1
            return True

    def fired(self, address: str) -> int:
        with self._lock:
            return self._fired[address.casefold()]

    def _transaction(self, envelope: Any) -> _Transaction:
        txn = self._transactions.get(envelope)
        if txn is None:
            txn = self._transactions[envelope] = _Transaction()
        return txn

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        rule = self._lookup(address)
        if rule is not None:
            if rule.action == "reject_rcpt" and self._use(address, rule):
                reply = _reply(rule.code, f"<{address}>: recipient rejected by test rule")
                if rule.code == 421:
                    await _hang_up(server, reply)
                return reply
            if rule.action == "slow" and self._use(address, rule):
                txn = self._transaction(envelope)
                txn.delay = max(txn.delay, rule.delay)
                await asyncio.sleep(rule.delay)
            elif rule.action in ("tempfail_data", "drop_in_data"):
                self._transaction(envelope).data_rules.append((address, rule))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        txn = self._transactions.pop(envelope, None) or _Transaction()
        if txn.delay:
            await asyncio.sleep(txn.delay)
        for address, rule in txn.data_rules:
            if self._use(address, rule):
                return await self._fail_data(server, rule.action, rule.code)
        if self._random_faults:
            with self._lock:
                hit = self._rng.random() < self._random_faults
                fault = self._rng.choice((421, 451, 0)) if hit else None
            if fault is not None:
                action: Action = "drop_in_data" if fault == 0 else "tempfail_data"
                return await self._fail_data(server, action, fault)
        raw: bytes = envelope.original_content
        with self._lock:
            self._accepted.append((envelope_sender(envelope), tuple(envelope.rcpt_tos), raw))
        return "250 2.0.0 OK"

    async def _fail_data(self, server: Any, action: Action, code: int) -> str:
        if action == "drop_in_data":
            await _hang_up(server)
        reply = _reply(code, "temporary failure from test rule, try again later")
        if code == 421:
            await _hang_up(server, reply)
        return reply

    def accepted(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        with self._lock:
            return list(self._accepted)


class FaultySMTPServer(BackgroundSMTPServer):
    """A real SMTP server on a background thread that fails where its rules say.

    rules maps recipient addresses (case-insensitively) to a Rule, or is a function from
    address to Rule or None. random_faults is the probability that a transaction no rule
    failed gets a random transient fault (421, 451 or a dropped connection) at DATA; the
    sequence is fixed by seed, so a run with one client connection can be replayed.
    It advertises PIPELINING unless `pipelining` is False, so both client paths meet faults.
    """

    def __init__(
        self,
        *,
        rules: Mapping[str, Rule] | Callable[[str], Rule | None] = _NO_RULES,
        random_faults: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        pipelining: bool = True,
    ) -> None:
        self._faulty = _FaultyHandler(rules, random_faults, seed)
        super().__init__(self._faulty, host, port, pipelining=pipelining)

    @property
    def accepted(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(mail_from, rcpt_tos, raw) of every message answered 250; a snapshot copy."""
        return self._faulty.accepted()

    def fired_for(self, rcpt: str) -> int:
        """How many times a rule has acted on rcpt so far: a test can wait until a fault is
        under way (a slow reply being held back), not merely until the client claimed it."""
        return self._faulty.fired(rcpt)

    def accepted_for(self, rcpt: str) -> int:
        """How many accepted messages had rcpt (case-insensitively) among their recipients."""
        wanted = rcpt.casefold()
        return sum(
            1 for _, rcpt_tos, _ in self.accepted if any(r.casefold() == wanted for r in rcpt_tos)
        )
