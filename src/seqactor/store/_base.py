"""The store contract: what every backend (memory, SQLite, Redis) provides.

The store is the durable truth behind every number seqactor serves (docs/protocol.md,
"Invariants" and "Stores"):

* **Positions.** Every committed operation that changes state takes the next *position*
  (``store.position + 1``; a global, durable, gap-free counter). Operations that change
  nothing (MarkRead at or below the current read, SetMin not raising, AddMembers of existing
  members only, RemoveMembers of non-members) take no position, notify no listener, and return
  ``changed=False`` with the current position.
* **Epoch.** 16 random bytes made when the store is first created, never changed afterwards.
  A sync token is (epoch, position): see :mod:`seqactor._token`.
* **Listeners.** ``add_listener(fn)``: after each commit ``fn(change)`` is called synchronously,
  once per change, in position order. The hub is the listener in the server.
* **Durability.** An ``await`` of a write returns only after the change is committed (SQLite:
  fsync'd, group commit). Reads (``load_view``, ``removed_since``, ``view_contains``,
  ``conversation``) never see uncommitted state.

Views (docs/protocol.md, "Data model"): a user's view = conversations they are a member of,
plus those they left with ``keep_history`` (frozen: max, min and time fixed at the moment they
left; later allocations and min changes do not touch the row; MarkRead still works, clamped to
the frozen max). A row's change position is the position of the last change that altered any of its
values (conversation max/min/time for active members, or the member's own read/join/freeze).
"""

from __future__ import annotations

import abc
import logging
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from seqactor.protocol import (
    MAX_ALLOCATE_COUNT,
    MAX_CONVERSATION_MEMBERS,
    MAX_ID_BYTES,
    MAX_SEQ,
    MAX_VIEW_CONVERSATIONS,
    now_ms,
)

DEFAULT_MAX_VIEW_CONVERSATIONS = MAX_VIEW_CONVERSATIONS
DEFAULT_MAX_CONVERSATION_MEMBERS = MAX_CONVERSATION_MEMBERS
EPOCH_BYTES = 16
MAX_UINT64 = MAX_SEQ

log = logging.getLogger("seqactor.store")

# C0 controls, DEL and C1 controls (same set as ``ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0``).
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


wall_clock_ms = now_ms  # the stores' default clock (``Store.clock_ms``)


# ------------------------------------------------------------------ errors


class StoreError(Exception):
    """Base of every error a store raises; ``code`` names the protocol's ``Error.Code``."""

    code = "INTERNAL"


class InvalidArgument(StoreError):
    """Bad id (empty, > 128 bytes, control characters) or other malformed argument."""

    code = "BAD_REQUEST"


class TooLarge(StoreError):
    """A count or size above its limit (allocate count > 10 000, view or group too big)."""

    code = "TOO_LARGE"


class NotFound(StoreError):
    """Unknown conversation (MarkRead, SetMinSequence, RemoveMembers)."""

    code = "NOT_FOUND"


class NotMember(StoreError):
    """The user's view does not contain the conversation (server maps to FORBIDDEN)."""

    code = "FORBIDDEN"


class Unavailable(StoreError):
    """The store cannot take writes now (failed commit, lost data guard, closed)."""

    code = "UNAVAILABLE"


class IncompatibleStore(StoreError):
    """The database is not a seqactor store or has a newer schema: refuse to start."""

    code = "UNAVAILABLE"


def validate_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid conversation/user id, else raise InvalidArgument."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not value:
        raise InvalidArgument(f"{what} is empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None
    if size > MAX_ID_BYTES:
        raise InvalidArgument(f"{what} is {size} bytes; the limit is {MAX_ID_BYTES}")
    if _CONTROL_CHARS.search(value) is not None:
        raise InvalidArgument(f"{what} contains a control character")
    return value


def normalize_count(count: int) -> int:
    """``count`` 1–10000, 0 means 1 (docs/protocol.md, "AllocateSequences")."""
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidArgument("count must be an integer")
    if count < 0:
        raise InvalidArgument("count must not be negative")
    if count == 0:
        return 1
    if count > MAX_ALLOCATE_COUNT:
        raise TooLarge(f"count {count} is above the limit of {MAX_ALLOCATE_COUNT}")
    return count


def check_uint64(value: object, what: str) -> int:
    """Return ``value`` if it is an int in 0..2^64-1 (a seq or a position), else raise
    InvalidArgument naming ``what``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer")
    if value < 0:
        raise InvalidArgument(f"{what} must not be negative")
    if value > MAX_UINT64:
        raise InvalidArgument(f"{what} is above the uint64 range")
    return value


def check_user_ids(user_ids: Sequence[str]) -> list[str]:
    """The valid, de-duplicated user ids of ``user_ids`` in their order; a bad id or a plain
    string instead of a sequence: InvalidArgument."""
    if isinstance(user_ids, str | bytes):
        raise InvalidArgument("user_ids must be a sequence of ids, not a string")
    return list(dict.fromkeys(validate_id(u, "user_id") for u in user_ids))


# ------------------------------------------------------------------ change records
# Not mutated after creation, but not ``frozen``: a frozen dataclass costs ~0.7 µs more to
# build, once per write on the store's hot path.


@dataclass(slots=True)
class Allocated:
    conversation_id: str
    first: int
    last: int
    time_ms: int
    position: int
    sender_user_id: str | None = None  # set when the sender is an active member (I6 applied)
    sender_read: int = 0  # the sender's read seq after the allocation (== last when applied)
    changed: bool = True


@dataclass(slots=True)
class ReadMarked:
    conversation_id: str
    user_id: str
    read_sequence: int  # effective value (I2)
    position: int
    changed: bool


@dataclass(slots=True)
class MembersAdded:
    conversation_id: str
    user_ids: tuple[str, ...]  # the users that actually joined (already-members left out)
    max_sequence: int  # conversation state at the join; new members' read = max_sequence
    min_sequence: int
    time_ms: int
    position: int
    changed: bool


@dataclass(slots=True)
class MembersRemoved:
    conversation_id: str
    user_ids: tuple[str, ...]  # the users that actually left (non-members left out)
    keep_history: bool
    position: int
    changed: bool


@dataclass(slots=True)
class MinChanged:
    conversation_id: str
    min_sequence: int  # effective value
    position: int
    changed: bool


@dataclass(frozen=True, slots=True)
class StoreReset:
    """Published by a networked store that may have missed changes (its connection dropped,
    events were lost): listeners must reload what they hold from the store. Not a change of
    state itself; ``position`` is the store position when it was detected."""

    position: int
    conversation_id: str = ""


Change = Allocated | ReadMarked | MembersAdded | MembersRemoved | MinChanged | StoreReset
Listener = Callable[[Change], None]


@dataclass(frozen=True, slots=True)
class ConversationState:
    conversation_id: str
    max_sequence: int
    min_sequence: int
    time_ms: int
    member_count: int


@dataclass(slots=True)
class ViewData:
    """A user's view as columns (row i of every column belongs to ``conversation_ids[i]``)."""

    position: int  # the store position this view is consistent with
    conversation_ids: list[str] = field(default_factory=list)
    max_seq: array[int] = field(default_factory=lambda: array("Q"))
    read_seq: array[int] = field(default_factory=lambda: array("Q"))
    min_seq: array[int] = field(default_factory=lambda: array("Q"))
    time_ms: array[int] = field(default_factory=lambda: array("q"))
    pos: array[int] = field(default_factory=lambda: array("Q"))
    frozen: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class MemberReads:
    """The current (not frozen) members of one conversation and their read seqs, as of store
    position ``position``: every change of this conversation at or below it is included, none
    above (``user_ids[i]`` has read ``read_seq[i]``; unordered)."""

    conversation_id: str
    position: int
    max_sequence: int
    min_sequence: int
    user_ids: list[str] = field(default_factory=list)
    read_seq: array[int] = field(default_factory=lambda: array("Q"))


# ------------------------------------------------------------------ the interface


class Store(abc.ABC):
    """Async (Trio) store. Open with ``await store.open()``; close with ``await store.aclose()``."""

    epoch: bytes
    position: int
    max_view_conversations: int = DEFAULT_MAX_VIEW_CONVERSATIONS
    max_conversation_members: int = DEFAULT_MAX_CONVERSATION_MEMBERS

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        #: The wall clock allocations are stamped with, in ms since the Unix epoch. A
        #: conversation's ``max_sequence_time_ms`` is ``max(previous, clock_ms())``, so it never
        #: decreases when this clock steps back (tests replace it to step it).
        self.clock_ms: Callable[[], int] = wall_clock_ms

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _publish(self, change: Change) -> None:
        """Hand a committed change to every listener, in the order they were added. Every
        store calls this (once per change, in position order); a listener that raises is
        logged and does not keep the change from the others."""
        for fn in self._listeners[:] if self._listeners else ():
            try:
                fn(change)
            except Exception:
                log.exception("store listener %r failed on %r", fn, change)

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @abc.abstractmethod
    async def allocate(
        self, conversation_id: str, count: int, sender_user_id: str | None = None
    ) -> Allocated:
        """Next ``count`` seqs (0 means 1; > 10 000: TooLarge); creates the conversation.

        I6: if ``sender_user_id`` is an active member, their read seq becomes ``last`` in the
        same durable step (non-members: nothing happens to them).
        """

    @abc.abstractmethod
    async def add_members(self, conversation_id: str, user_ids: Sequence[str]) -> MembersAdded:
        """Creates the conversation if new. New members (also users who left, frozen or not)
        join with read = current max; active members are unchanged."""

    @abc.abstractmethod
    async def remove_members(
        self, conversation_id: str, user_ids: Sequence[str], keep_history: bool
    ) -> MembersRemoved:
        """Unknown conversation: NotFound. Without keep_history the conversation leaves the
        users' views (a tombstone records it for ``removed_since``); with it their rows freeze."""

    @abc.abstractmethod
    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> MinChanged:
        """Raise min (never lower it, clamp to max). Unknown conversation: NotFound."""

    @abc.abstractmethod
    async def mark_read(self, conversation_id: str, user_id: str, read_sequence: int) -> ReadMarked:
        """I2: effective = max(current, min(requested, max)). Unknown conversation: NotFound;
        not in the user's view: NotMember."""

    @abc.abstractmethod
    async def load_view(self, user_id: str) -> ViewData:
        """The user's whole view at the current position (unknown user: empty view)."""

    @abc.abstractmethod
    async def removed_since(self, user_id: str, position: int) -> list[str] | None:
        """Conversations that left the user's view after ``position`` and are not in it now;
        ``None`` when ``position`` is older than what the store can answer (full sync)."""

    @abc.abstractmethod
    async def view_contains(self, user_id: str, conversation_id: str) -> bool: ...

    @abc.abstractmethod
    async def conversation(self, conversation_id: str) -> ConversationState | None: ...

    async def load_members(self, conversation_id: str) -> MemberReads | None:
        """Current members' read seqs (group read counts, docs/protocol.md "Group read counts"); None when the
        conversation does not exist. A change with a position above ``MemberReads.position``
        reaches the listeners after the call started (a reader buffers changes while loading)."""
        raise NotImplementedError(f"{type(self).__name__} does not provide load_members")

    async def sync(self) -> None:
        """Return once every change committed before the call (on any node sharing the store)
        has been handed to this store's listeners (docs/protocol.md, "Group read counts":
        consistency). A single-process store publishes each change as it commits: nothing to
        wait for."""
        await trio.lowlevel.checkpoint()
