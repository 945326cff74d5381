"""``memory://``: the shared in-memory model with nothing durable (tests, demos)."""

from __future__ import annotations

import os

import trio

from seqactor.store._base import EPOCH_BYTES
from seqactor.store._state import Op, Sink, StateStore


class MemoryStore(StateStore):
    """Every change commits at once; nothing survives the process.

    Keyword arguments: ``max_view_conversations``, ``max_conversation_members``,
    ``max_tombstones`` (see :class:`~seqactor.store._state.StateStore`).
    """

    async def open(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._opened:
            self.epoch = os.urandom(EPOCH_BYTES)
            self._opened = True
            self._writable = not self._closed

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        self._writable = False

    def _sink(self) -> Sink | None:
        return None

    async def _commit(self, op: Op) -> None:
        self._apply(op)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _settle(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()
