"""The server's own WebSocket layer (seqactor.server.ws): the upgrade handshake as bytes in and
out, and a connection fed the bytes a client sends, split anywhere, answering what RFC 6455
says on the wire."""

from __future__ import annotations

import gc
import weakref

import h11
import pytest
import trio
import trio.testing
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from seqactor.server.handshake import (
    MAX_REQUEST_HEAD_BYTES,
    HandshakeRefused,
    accept_response,
    parse_upgrade_request,
    read_request_head,
    refusal_response,
)
from seqactor.server.stream import ActivityStream
from seqactor.server.ws import ConnectionClosed, ServerWebSocket
from tests._harness import running_server

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example
GOOD = (
    b"GET /v1?x=1 HTTP/1.1\r\nHost: example\r\nUpgrade: WebSocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13"
)


class ChunkStream(trio.abc.Stream):
    """A peer that delivers ``chunks`` one per read (then EOF) and records what is sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def client_bytes(*events: object) -> bytes:
    """What a client sends for ``events`` (masked frames, as RFC 6455 requires)."""
    conn = Connection(ConnectionType.CLIENT)
    return b"".join(conn.send(e) for e in events)  # type: ignore[arg-type]


def server_events(data: bytes) -> list[object]:
    """The frames the server wrote, as a client parses them."""
    conn = Connection(ConnectionType.CLIENT)
    conn.receive_data(bytes(data))
    return list(conn.events())


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_accept_token_is_rfc6455s_example() -> None:
    assert parse_upgrade_request(GOOD).path == "/v1"
    assert parse_upgrade_request(GOOD).target == "/v1?x=1"
    assert accept_response(KEY) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


@pytest.mark.parametrize(("head", "status"), [
    (GOOD.replace(b"GET", b"POST"), 405),
    (GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    (GOOD.replace(b"GET /v1?x=1 HTTP/1.1", b"GET /v1"), 400),
    (GOOD.replace(b"Upgrade: WebSocket\r\n", b""), 400),
    (GOOD.replace(b"keep-alive, Upgrade", b"keep-alive"), 400),
    (GOOD.replace(b"Version: 13", b"Version: 8"), 426),
    (GOOD.replace(KEY, b"not base64!"), 400),
    (GOOD.replace(KEY, b"c2hvcnQ="), 400),  # decodes to 5 bytes, not 16
    (GOOD.replace(b"Host: example", b"Host example"), 400),
    (GOOD.replace(b"Host: example", b" folded: header"), 400),
    (GOOD.replace(b"Host: example", b"\tfolded: header"), 400),
    (GOOD.replace(b"Host: example", b"Host : example"), 400),  # space before the colon
    (GOOD.replace(b"Host: example", b"Host\t: example"), 400),
    (GOOD.replace(b"Host: example", b": example"), 400),  # no name
])
def test_bad_upgrade_requests_get_the_http_answer(head: bytes, status: int) -> None:
    with pytest.raises(HandshakeRefused) as info:
        parse_upgrade_request(head)
    refused = info.value
    assert refused.status == status
    # The refusal is a well-formed HTTP response (as an HTTP client parses it).
    assert refused.status is not None
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/v1", headers=[("Host", "x")]))
    client.receive_data(refusal_response(refused.status, refused.message, refused.headers))
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    if status == 426:
        assert (b"sec-websocket-version", b"13") in response.headers
    data = client.next_event()
    assert isinstance(data, h11.Data) and refused.message.encode() in data.data


async def test_request_head_is_read_across_reads_and_bounded() -> None:
    stream = ChunkStream(split(GOOD + b"\r\n\r\n" + b"\x82", 5))
    head, rest = await read_request_head(stream)
    assert head == GOOD and rest == b"\x82"
    huge = ChunkStream([b"GET / HTTP/1.1\r\nX: " + b"y" * MAX_REQUEST_HEAD_BYTES])
    with pytest.raises(HandshakeRefused) as info:
        await read_request_head(huge)
    assert info.value.status == 431
    with pytest.raises(HandshakeRefused) as info:
        await read_request_head(ChunkStream([b"GET / HT"]))  # then EOF
    assert info.value.status is None


async def test_a_tls_client_hello_on_the_plain_port_is_refused_at_once() -> None:
    """wss:// against a plain server: the ClientHello never ends in a blank line, so waiting
    for one would hold the client until the handshake timeout; it gets a 400 at once."""
    client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
    with pytest.raises(HandshakeRefused) as info:
        await read_request_head(ChunkStream([client_hello]))  # no EOF: the peer waits
    assert info.value.status == 400 and "TLS" in info.value.message


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 64, 1 << 20])
async def test_messages_split_anywhere_arrive_whole_and_pings_are_answered(chunk: int) -> None:
    medium = bytes(range(256)) * 2  # 512 bytes: a 2-byte length
    large = b"L" * 70_000  # an 8-byte length
    wire = client_bytes(
        BytesMessage(b"hello"),
        BytesMessage(b"frag-1|", message_finished=False),
        Ping(b"in the middle"),  # control frames may come between fragments
        BytesMessage(b"frag-2", message_finished=True),
        BytesMessage(medium),
        BytesMessage(b""),
        BytesMessage(large),
        Ping(b"last"),
    )
    peer = ChunkStream(split(wire, chunk))
    ws = ServerWebSocket(ActivityStream(peer), max_message_bytes=100_000)
    got = [await ws.receive() for _ in range(5)]
    assert got == [b"hello", b"frag-1|frag-2", medium, b"", large]
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()  # the last ping is answered on the way to EOF
    assert info.value.code == 1006
    assert server_events(peer.sent) == [Pong(b"in the middle"), Pong(b"last")]


async def test_an_idle_connection_holds_no_frame_parser() -> None:
    wire = client_bytes(BytesMessage(b"one"), BytesMessage(b"two" * 100))
    peer = ChunkStream([wire[:4], wire[4:12], wire[12:]])
    ws = ServerWebSocket(ActivityStream(peer), max_message_bytes=1024)
    assert not ws.parsing
    assert await ws.receive() == b"one"
    assert ws.parsing  # the second message's first bytes are already in
    assert await ws.receive() == b"two" * 100
    peer.chunks = [b""]  # nothing more for now; EOF on the read after
    with pytest.raises(ConnectionClosed):
        await ws.receive()
    half = client_bytes(BytesMessage(b"x" * 300))
    peer = ChunkStream([half[:150], half[150:]])
    ws = ServerWebSocket(ActivityStream(peer), max_message_bytes=1024)
    assert await ws.receive() == b"x" * 300
    peer.chunks = [client_bytes(BytesMessage(b"after idle"))]
    assert await ws.receive() == b"after idle"  # a fresh parser takes the next message
    assert not ws.parsing


async def test_bytes_after_the_handshake_are_the_first_frames() -> None:
    first = client_bytes(BytesMessage(b"pipelined"))
    ws = ServerWebSocket(ActivityStream(ChunkStream([])), 1024, trailing=first)
    assert await ws.receive() == b"pipelined"


async def test_text_messages_are_returned_as_text() -> None:
    peer = ChunkStream(split(client_bytes(TextMessage("héllo wörld")), 3))
    ws = ServerWebSocket(ActivityStream(peer), 1024)
    assert await ws.receive() == "héllo wörld"


async def test_a_message_over_the_limit_closes_1009_even_in_fragments() -> None:
    wire = client_bytes(
        BytesMessage(b"a" * 600, message_finished=False), BytesMessage(b"b" * 600),
    )
    peer = ChunkStream([wire])
    ws = ServerWebSocket(ActivityStream(peer), max_message_bytes=1000)
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert info.value.code == 1009
    (close,) = server_events(peer.sent)
    assert isinstance(close, CloseConnection) and close.code == 1009
    assert ws.write_nowait(b"no more") is None


async def test_protocol_errors_close_with_wsprotos_code() -> None:
    unmasked = b"\x82\x02hi"  # a client frame without a mask
    peer = ChunkStream([unmasked])
    ws = ServerWebSocket(ActivityStream(peer), 1024)
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert info.value.code == CloseReason.PROTOCOL_ERROR == 1002
    (close,) = server_events(peer.sent)
    assert isinstance(close, CloseConnection) and close.code == 1002


async def test_peer_close_is_answered_and_reported() -> None:
    peer = ChunkStream([client_bytes(BytesMessage(b"last words"), CloseConnection(4321, "bye"))])
    ws = ServerWebSocket(ActivityStream(peer), 1024)
    assert await ws.receive() == b"last words"
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert (info.value.code, info.value.reason) == (4321, "bye")
    (close,) = server_events(peer.sent)
    assert isinstance(close, CloseConnection) and close.code == 4321
    with pytest.raises(ConnectionClosed):
        await ws.send_message(b"after close")


async def test_server_close_waits_for_the_peers_close_dropping_data() -> None:
    peer = ChunkStream([client_bytes(BytesMessage(b"ignored"), CloseConnection(4009, "ok"))])
    ws = ServerWebSocket(ActivityStream(peer), 1024)
    await ws.send_message(b"final")
    await ws.close(4009, "replaced")
    assert ws.closed == (4009, "ok")
    final, close = server_events(peer.sent)
    assert isinstance(final, BytesMessage) and final.data == b"final"
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (4009, "replaced")


async def test_server_refuses_other_versions_and_methods_over_http() -> None:
    async with running_server() as server:
        for request, status in [
            (GOOD.replace(b"Version: 13", b"Version: 8"), b"426"),
            (GOOD.replace(b"GET", b"PUT"), b"405"),
            (GOOD.replace(b"/v1?x=1", b"/v2"), b"404"),
        ]:
            with trio.socket.socket() as s:
                await s.connect(("127.0.0.1", server.port))
                await s.send(request + b"\r\n\r\n")
                answer = b""
                while chunk := await s.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 " + status)


async def test_a_reader_waiting_for_bytes_keeps_no_parser_alive() -> None:
    """What an idle session costs: nothing of wsproto's while it waits."""
    a, b = trio.socket.socketpair()
    ws = ServerWebSocket(ActivityStream(trio.SocketStream(a)), 1024)
    peer = trio.SocketStream(b)
    wire = client_bytes(BytesMessage(b"m" * 200))
    got: list[bytes | str] = []

    async def reader() -> None:
        while True:
            got.append(await ws.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await peer.send_all(wire[:100])
        await trio.testing.wait_all_tasks_blocked()
        assert ws.parsing  # half a message in
        parser = weakref.ref(ws._ws)  # type: ignore[arg-type]
        await peer.send_all(wire[100:] + client_bytes(Ping(b"after it")))
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"m" * 200]
        assert server_events(await peer.receive_some(100)) == [Pong(b"after it")]
        gc.collect()
        assert parser() is None and not ws.parsing
        nursery.cancel_scope.cancel()
    await peer.aclose()
    await ws.stream.aclose()


def test_simple_frames_are_parsed_as_wsproto_parses_them() -> None:
    """The fast path for simple frames (seqactor.server.ws.simple_frame) takes exactly the
    frames it names, with wsproto's payload; anything else is left to wsproto."""
    import os
    import random
    import struct

    from seqactor.server.ws import simple_frame

    def frame(first: int, payload: bytes, mask: bytes | None, length_bytes: int = 0) -> bytes:
        n = len(payload)
        if length_bytes == 2 or (not length_bytes and 125 < n <= 65_535):
            head = bytes((first, 126 | (0x80 if mask else 0))) + struct.pack(">H", n)
        elif length_bytes == 8 or n > 65_535:
            head = bytes((first, 127 | (0x80 if mask else 0))) + struct.pack(">Q", n)
        else:
            head = bytes((first, n | (0x80 if mask else 0)))
        if mask is None:
            return head + payload
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    rng = random.Random(12)
    for size in (0, 1, 3, 4, 5, 125, 126, 127, 1000, 65_535):
        payload = os.urandom(size)
        for mask in (bytes(4), os.urandom(4), bytes((rng.randrange(256),)) * 4):
            wire = frame(0x82, payload, mask)
            assert simple_frame(wire + b"rest", 0, 1 << 20) == (payload, len(wire))
            assert simple_frame(b"xx" + wire, 2, 1 << 20) == (payload, len(wire) + 2)
            ws = Connection(ConnectionType.SERVER)
            ws.receive_data(wire)
            events = list(ws.events())
            assert len(events) == 1 and bytes(events[0].data) == payload
            for cut in range(len(wire)):  # incomplete: never taken
                assert simple_frame(wire[:cut], 0, 1 << 20) is None
            if size:
                assert simple_frame(wire, 0, size - 1) is None  # above the limit: wsproto's 1009
    mask = os.urandom(4)
    left_to_wsproto = [
        frame(0x02, b"not final", mask),  # a first fragment
        frame(0x81, b"text", mask),
        frame(0x89, b"ping", mask),
        frame(0x88, b"\x03\xe8", mask),
        frame(0xC2, b"rsv1", mask),  # a reserved bit
        frame(0x82, b"unmasked", None),
        frame(0x82, b"short in 2 bytes", mask, length_bytes=2),  # not minimal
        frame(0x82, b"x" * 200, mask, length_bytes=8),
    ]
    for wire in left_to_wsproto:
        assert simple_frame(wire, 0, 1 << 20) is None


async def test_simple_and_other_frames_keep_their_order() -> None:
    """Simple frames taken by the fast path, then a ping and a fragmented message (wsproto),
    then simple frames again, all in one read: delivered in order, the ping answered."""
    wire = client_bytes(
        BytesMessage(b"one"), BytesMessage(b"two"), Ping(b"p"),
        BytesMessage(b"fr", message_finished=False), BytesMessage(b"ag"), BytesMessage(b"three"),
    )
    peer = ChunkStream([wire])
    ws = ServerWebSocket(ActivityStream(peer), max_message_bytes=1024)
    assert [await ws.receive() for _ in range(4)] == [b"one", b"two", b"frag", b"three"]
    assert server_events(peer.sent) == [Pong(b"p")]


async def test_a_batch_goes_out_in_one_write_before_the_next_read() -> None:
    """begin_batch: what write_nowait writes meanwhile is held back (no direct write by
    others: the descriptor reads -1) and written in one go before the connection waits to
    read; a send through the send path takes it first."""
    a, b = trio.socket.socketpair()
    stream = ActivityStream(trio.SocketStream(a))
    pipelined = client_bytes(BytesMessage(b"q1"), BytesMessage(b"q2"))
    ws = ServerWebSocket(stream, 1024, trailing=pipelined)
    peer = trio.SocketStream(b)
    rests: list[int] = []
    assert await ws.receive() == b"q1" and ws.buffered
    ws.begin_batch(lambda: rests.append(1))
    assert stream.fd == -1  # nobody else writes directly meanwhile
    assert ws.write_nowait(b"r1") == b""
    assert await ws.receive() == b"q2" and not ws.buffered
    assert ws.write_nowait(b"r2") == b""  # still held: the batch ends before the next read
    with trio.move_on_after(0.1):
        await ws.receive()  # writes the batch, then waits for bytes that never come
    assert stream.fd >= 0 and not rests
    got = await peer.receive_some(1024)
    assert got == b"\x82\x02r1\x82\x02r2"  # both replies, in one write
    ws.begin_batch(lambda: rests.append(1))
    assert ws.write_nowait(b"r3") == b""
    await ws.flush()  # a send through the send path takes the batch first
    assert await peer.receive_some(1024) == b"\x82\x02r3" and stream.fd >= 0
    await peer.aclose()
    await stream.aclose()
