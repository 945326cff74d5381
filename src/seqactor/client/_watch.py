"""``seqactor watch``: a live terminal view of one user's conversations (rich)."""

from __future__ import annotations

import time

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from seqactor.client._client import Client
from seqactor.client._records import Conversation

REFRESH_S = 1.0  # redraw at least this often (connection state, "x s ago")
DEFAULT_LIMIT = 30
FROZEN_MARK = "❄ left"  # after the id of a frozen row (left with keep_history): max stays put


def _ago(time_ms: int, now_ms: int) -> str:
    if not time_ms:
        return "-"
    s = max(0, (now_ms - time_ms) // 1000)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def plural(n: int, noun: str) -> str:
    """``1 conversation``, ``2 conversations``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def by_activity(view: dict[str, Conversation]) -> list[Conversation]:
    """Latest activity first (then id, for a stable order)."""
    return sorted(view.values(), key=lambda c: (-c.time_ms, c.id))


def render(client: Client, limit: int, changed: set[str] | frozenset[str] = frozenset()) -> Group:
    now_ms = time.time_ns() // 1_000_000
    convs = by_activity(client.view)
    state = "connected" if client.connected else f"reconnecting ({client.last_error or '...'})"
    title = (
        f"seqactor · {client.user_id or '?'} · {plural(len(convs), 'conversation')} · "
        f"total unread {client.total_unread} · {state}"
    )
    table = Table(expand=False)
    table.add_column("conversation", overflow="fold")
    table.add_column("max", justify="right")
    table.add_column("read", justify="right")
    table.add_column("unread", justify="right")
    table.add_column("last activity", justify="right")
    for c in convs[:limit]:
        name = Text(c.id, style="bold" if c.id in changed else "")
        if c.frozen:
            name.append(f" {FROZEN_MARK}", style="cyan")
        unread = Text(str(c.unread), style="bold red" if c.unread else "dim")
        table.add_row(
            name, str(c.max_sequence), str(c.read_sequence), unread, _ago(c.time_ms, now_ms),
        )
    parts: list[Table | Text] = [Text(title, style="bold"), table]
    if len(convs) > limit:
        parts.append(Text(f"... and {len(convs) - limit} more (--limit)", style="dim"))
    return Group(*parts)


async def watch(
    url: str, token: str, *, device_id: str, once: bool, limit: int = DEFAULT_LIMIT,
    console: Console | None = None,
) -> None:
    console = console or Console()
    async with Client.connect(url, token, device_id=device_id) as client:
        if once:
            console.print(render(client, limit))
            return
        stream = client.changes()
        with Live(render(client, limit), console=console, auto_refresh=False) as live:
            while True:
                changed: set[str] = set()
                with trio.move_on_after(REFRESH_S):
                    batch = await stream.__anext__()
                    changed = {c.conversation_id for c in batch.changes}
                live.update(render(client, limit, changed), refresh=True)
