"""The connection stream's published direct-write descriptor: the fan-out writes to ``fd``
without asking anything else, so it must be -1 whenever a write could interleave with
another or reach a closed (and possibly reused) descriptor."""

from __future__ import annotations

import trio

from seqactor.server.stream import ActivityStream
from seqactor.server.ws import ServerWebSocket


class _Sink:
    fd = 12345  # replaced on attach


async def _pair() -> tuple[ActivityStream, trio.SocketStream, int]:
    a, b = trio.socket.socketpair()
    stream = ActivityStream(trio.SocketStream(a))
    return stream, trio.SocketStream(b), a.fileno()


async def test_fd_is_published_while_idle() -> None:
    stream, peer, fd = await _pair()
    sink = _Sink()
    stream.attach(sink)
    assert stream.fd == sink.fd == fd
    await stream.send_all(b"\x82\x01x")
    assert sink.fd == fd  # back after the send
    assert await peer.receive_some(10) == b"\x82\x01x"


async def test_fd_hidden_during_a_send_and_while_a_rest_is_held() -> None:
    stream, peer, fd = await _pair()
    sink = _Sink()
    stream.attach(sink)
    stream.hold(b"rest")
    assert sink.fd == -1  # the rest must go before any other byte
    seen: list[int] = []

    async def big_send() -> None:
        await stream.send_all(b"y" * 4_000_000)  # more than the socket buffers take

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big_send)
        await trio.sleep(0.05)
        seen.append(sink.fd)  # blocked inside send_all
        received = 0
        while received < 4 + 4_000_000:
            received += len(await peer.receive_some(1 << 20))
    assert seen == [-1]
    assert sink.fd == fd and stream.held is None


async def test_fd_gone_for_good_after_close_frame_or_aclose() -> None:
    stream, peer, fd = await _pair()
    sink = _Sink()
    stream.attach(sink)
    ws = ServerWebSocket(stream, 1024)
    with trio.move_on_after(0.2):  # the peer never answers the Close: the caller's deadline
        await ws.close(1000, "bye")
    assert sink.fd == -1  # no data frame after a Close frame
    assert await peer.receive_some(100) == b"\x88\x05\x03\xe8bye"
    assert ws.write_nowait(b"late") is None
    await stream.send_all(b"")  # anything later keeps it hidden
    assert sink.fd == -1

    stream2, peer2, fd2 = await _pair()
    sink2 = _Sink()
    stream2.attach(sink2)
    await stream2.aclose()  # the descriptor number may be reused by the kernel after this
    assert sink2.fd == -1 and stream2.fd == -1
    await peer.aclose()
    await peer2.aclose()
