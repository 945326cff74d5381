"""The SDK's value types: a conversation as the client holds it, changes, sync and allocation
results (frozen dataclasses), and ``Row``, the client's internal record of a conversation."""

from __future__ import annotations

from dataclasses import dataclass

from seqactor.protocol import unread_count

Row = tuple[int, int, int, int, bool]  # max, read, min, time_ms, frozen


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation of the view, as the client holds it."""

    id: str
    max_sequence: int
    read_sequence: int
    min_sequence: int
    time_ms: int
    # True: the user left with keep_history; max, min and time stay as they were when they left
    # (it can still be marked read). A re-add makes it a member again (False).
    frozen: bool = False

    @property
    def unread(self) -> int:
        """Messages not yet read, cleared history excluded (see :func:`unread_count`)."""
        return unread_count(self.max_sequence, self.read_sequence, self.min_sequence)


@dataclass(frozen=True, slots=True)
class Change:
    """A conversation that changed: ``old`` is None when it joined the view, ``new`` is None
    when it left."""

    conversation_id: str
    old: Conversation | None
    new: Conversation | None


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """The changes since the previous batch (coalesced per conversation), and the total."""

    changes: tuple[Change, ...]
    total_unread: int

    def __len__(self) -> int:
        return len(self.changes)


@dataclass(frozen=True, slots=True)
class SyncInfo:
    """What the last resume/snapshot (``GetSequences`` of the whole view) brought."""

    full: bool  # True: a snapshot; False: a delta since our token
    conversations: int  # conversations in the reply
    removed: int
    bytes: int  # the reply frame on the wire (payload + WebSocket header)
    ms: float  # request sent -> reply applied
    since_token: bool  # we sent a token


@dataclass(frozen=True, slots=True)
class Allocation:
    first_sequence: int
    last_sequence: int
    time_ms: int


def conversation_of(cid: str, row: Row | None) -> Conversation | None:
    return None if row is None else Conversation(cid, *row)


def unread_of(row: Row | None) -> int:
    return 0 if row is None else unread_count(row[0], row[1], row[2])
