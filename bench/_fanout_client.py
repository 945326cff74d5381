"""Fan-out benchmark: one client process holding many WebSocket sessions (see bench/fanout.py).

Run by ``bench/fanout.py`` as a subprocess; it is driven by JSON lines on stdin and answers
with one JSON line per command on stdout. Kept lean on purpose: on a 2-core machine its CPU
competes with the server's. Sessions are set up with trio (handshake, Hello, GetSequences,
Subscribe) over a minimal WebSocket client (``RawConn``); then one plain epoll thread reads
all of them: one ``os.read`` per readiness, every complete frame counted (not copied), and
for the sampled sessions the compiled kernel's ``split_server_message`` / ``decode_update``
and an append of ``(max, time.monotonic(), socket time)``. The socket time is the kernel's
receive timestamp of the read's newest byte (``SO_TIMESTAMPNS``, one ``recvmsg`` per readiness
on the sampled sessions): when the frame reached the member's socket, before this process,
which shares the machine's cores with the server, got a core to read it. ``transport: "tws"``
instead reads with a trio-websocket ``get_message`` loop per session (about 5x the client CPU
per frame: wsproto parsing and a memory-channel hop per frame), kept for comparison.

Commands (one JSON object per line):

* ``{"cmd": "connect", "mode": "seqactor"|"plain", "port": P, "users": [first, last),
  "concurrency": C, "sample_every": K, "group": G, "secret_file": F}`` — open one session per
  user (``seqactor``: Hello, GetSequences snapshot, Subscribe{all}; ``plain``: handshake only,
  for the baseline servers) with at most C handshakes in flight. Every K-th session records
  its pushes for the staleness figures (in every mode, so that each server under test leaves
  the clients the same work per frame). With ``"probe_every": K`` instead, the process holds
  only the users whose number is a multiple of K and records all of them (``"probe": true``:
  the probe process, lightly loaded, so that a push is read soon after it reached the
  socket) or only the others, recording none (a load process). ``"nice": N`` sets the
  process's nice value first (the load processes': see ``LOAD_NICE`` in bench/fanout.py).
  ``"poll_interval_s": T`` makes the reader sleep T between polls (the probe's: a timer
  wakes it, not every push, so its wake-ups do not preempt the server; the socket times are
  the kernel's, and a read may come up to T after the push reached the socket).
* ``{"cmd": "mark"}`` — ``{"t": monotonic, "frames": pushes received so far}``.
* ``{"cmd": "reset"}`` — drop the sampled records, then as ``mark``.
* ``{"cmd": "dump", "path": F}`` — pickle the sampled records ``[(maxes, times,
  socket_times), ...]`` (array bytes: Q, d, d; times on ``time.monotonic``'s clock) to F.
* ``{"cmd": "close"}`` — drop every connection (forcefully), ready for the next phase.
* ``{"cmd": "exit"}``.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from array import array
from typing import Any

import trio
import trio_websocket as tws
from _common import raise_nofile

from seqactor._kernel import decode_update, split_server_message
from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import issue_token

UPDATE_FIELD = 3  # ServerMessage.update
SETUP_TIMEOUT_S = 60.0
TOKEN_TTL_S = 3600.0
RECEIVE_BYTES = 262_144
# Linux <asm-generic/socket.h> (the socket module has no name for them): a receive timestamp,
# CLOCK_REALTIME as a struct timespec, with every recvmsg
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TIMESPEC = struct.Struct("@qq")  # tv_sec, tv_nsec
ANCILLARY_BYTES = socket.CMSG_SPACE(TIMESPEC.size)


class Phase:
    """The connections of one benchmark phase and what they received."""

    def __init__(self) -> None:
        self.frames = 0
        self.records: list[tuple[array, array, array]] = []  # (maxes, times, socket times)
        self.conns: list[RawConn | TwsConn] = []
        self.errors: list[str] = []
        self.nursery: trio.Nursery | None = None
        # raw transport: after the setup, one plain epoll thread reads every socket
        self.pollable: list[tuple[RawConn, bool]] = []  # (connection, records its pushes)
        self.lock = threading.Lock()  # records: the reader thread appends, reset clears
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.group = ""
        self.poll_interval_s = 0.0  # the probe's pause between polls (see "connect")

    def start_reader(self) -> None:
        if self.pollable:
            self.thread = threading.Thread(target=self._epoll_reader, daemon=True)
            self.thread.start()

    def _epoll_reader(self) -> None:
        """Read every session's socket: one ``os.read`` per readiness, every complete frame
        counted, sampled sessions' group max recorded with the read time."""
        ep = select.epoll()
        conns: dict[int, tuple[RawConn, tuple[array, array, array] | None, list[int]]] = {}
        timed: dict[int, socket.socket] = {}  # sampled sessions: read with recvmsg
        for conn, record in self.pollable:
            fd = conn.stream.socket.fileno()
            rec = None
            if record:
                rec = (array("Q"), array("d"), array("d"))
                self.records.append(rec)
                sock = timed[fd] = socket.socket(fileno=os.dup(fd))
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            conns[fd] = (conn, rec, [0])
            ep.register(fd, select.EPOLLIN)
            t = time.monotonic()
            self._consume(conn, conn.frames(), rec, [0], t, t)
        read, mono, wall, stop = os.read, time.monotonic, time.time, self.stop
        try:
            pause = self.poll_interval_s
            while not stop.is_set():
                if pause:  # at most one wake-up per pause, however many pushes came
                    time.sleep(pause)
                for fd, _ in ep.poll(0.1):
                    conn, rec, top = conns[fd]
                    ts = 0.0
                    try:
                        if rec is None:
                            data = read(fd, RECEIVE_BYTES)
                        else:
                            data, ancillary, _, _ = timed[fd].recvmsg(RECEIVE_BYTES, ANCILLARY_BYTES)
                            for level, kind, value in ancillary:
                                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                                    sec, nsec = TIMESPEC.unpack(value[:TIMESPEC.size])
                                    ts = sec + nsec * 1e-9
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        ep.unregister(fd)
                        self.errors.append("connection lost")
                        continue
                    if rec is None:  # counted, not copied: most sessions only count
                        conn.buf += data
                        try:
                            self.frames += conn.count_frames()
                        except ConnectionError as exc:
                            ep.unregister(fd)
                            self.errors.append(str(exc))
                        continue
                    t = mono()
                    # the socket time on the monotonic clock (the wall clock's offset now)
                    ts = ts - (wall() - t) if ts else t
                    conn.buf += data
                    try:
                        frames = conn.frames()
                    except ConnectionError as exc:
                        ep.unregister(fd)
                        self.errors.append(str(exc))
                        continue
                    self._consume(conn, frames, rec, top, t, min(ts, t))
        finally:
            ep.close()
            for sock in timed.values():
                sock.close()

    def _consume(
        self, conn: RawConn, frames: list[bytes], rec: tuple[array, array, array] | None,
        top: list[int], t: float, ts: float,
    ) -> None:
        self.frames += len(frames)
        if rec is None:
            return
        with self.lock:
            for data in frames:
                _, field, body = split_server_message(data)
                if field != UPDATE_FIELD:
                    continue
                entry = decode_update(body)[0].get(self.group)
                if entry is not None and entry[0] > top[0]:
                    top[0] = entry[0]
                    rec[0].append(top[0])
                    rec[1].append(t)
                    rec[2].append(ts)


class RawConn:
    """A minimal WebSocket client over a trio stream: handshake, masked sends, and a reader
    that parses every frame that one ``receive_some`` brought (no per-frame task hop)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawConn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            f"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        conn = cls(stream)
        while b"\r\n\r\n" not in conn.buf:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("closed during the handshake")
            conn.buf += data
        head, _, rest = bytes(conn.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head[:80]!r}")
        conn.buf = bytearray(rest)
        return conn

    async def send(self, payload: bytes) -> None:
        """A client frame must be masked; the all-zero key leaves the payload as it is."""
        n = len(payload)
        if n < 126:
            header = bytes((0x82, 0x80 | n))
        elif n < 1 << 16:
            header = bytes((0x82, 0xFE)) + struct.pack(">H", n)
        else:
            header = bytes((0x82, 0xFF)) + struct.pack(">Q", n)
        await self.stream.send_all(header + b"\0\0\0\0" + payload)

    def _take(self, out: list[bytes] | None) -> int:
        """Consume the complete frames in the buffer; count the binary ones, and append
        their payloads to ``out`` when given (a load process only counts: no bytes object
        per frame). Raises on a close frame."""
        buf = self.buf
        count = i = 0
        n = len(buf)
        while n - i >= 2:
            length = buf[i + 1] & 0x7F
            if length < 126:
                start = i + 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (buf[i + 2] << 8) | buf[i + 3]
                start = i + 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(buf[i + 2:i + 10], "big")
                start = i + 10
            if n < start + length:
                break
            opcode = buf[i] & 0x0F
            if opcode == 2:
                count += 1
                if out is not None:
                    out.append(bytes(buf[start:start + length]))
            elif opcode == 8:
                raise ConnectionError("server closed the WebSocket")
            i = start + length
        if i:
            del buf[:i]
        return count

    def frames(self) -> list[bytes]:
        """Complete binary frames in the buffer (consumed); raises on a close frame."""
        out: list[bytes] = []
        self._take(out)
        return out

    def count_frames(self) -> int:
        """How many complete binary frames the buffer held (consumed, not copied)."""
        return self._take(None)

    async def receive(self) -> list[bytes]:
        while True:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionError("connection lost")
            self.buf += data
            frames = self.frames()
            if frames:
                return frames

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class TwsConn:
    """The same interface over trio-websocket (one ``get_message`` per frame)."""

    def __init__(self, conn: tws.WebSocketConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, port: int, nursery: trio.Nursery) -> TwsConn:
        return cls(await tws.connect_websocket(nursery, "127.0.0.1", port, "/v1", use_ssl=False))

    async def send(self, payload: bytes) -> None:
        await self.conn.send_message(payload)

    async def receive(self) -> list[bytes]:
        return [await self.conn.get_message()]  # type: ignore[list-item]

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.conn._stream)  # noqa: SLF001 - no close handshake


async def _request(conn: RawConn | TwsConn, msg: pb.ClientMessage) -> pb.ServerMessage:
    await conn.send(msg.SerializeToString())
    while True:
        for data in await conn.receive():
            reply = pb.ServerMessage.FromString(data)
            if reply.request_id == msg.request_id:
                return reply


async def _open_session(
    phase: Phase, nursery: trio.Nursery, limiter: trio.CapacityLimiter, port: int, mode: str,
    transport: str, user: str, secret: bytes, group: str, record: bool, task_status: Any,
) -> None:
    async with limiter:
        if transport == "tws":
            conn: RawConn | TwsConn = await TwsConn.connect(port, nursery)
        else:
            conn = await RawConn.connect(port)
        phase.conns.append(conn)
        if mode == "seqactor":
            tok = issue_token(secret, user, role="user", ttl_s=TOKEN_TTL_S)
            r = await _request(conn, pb.ClientMessage(request_id=1, hello=pb.Hello(token=tok)))
            if r.WhichOneof("body") != "welcome":
                raise RuntimeError(f"{user}: Hello -> {r}")
            r = await _request(conn, pb.ClientMessage(request_id=2, get_sequences=pb.GetSequences()))
            snapshot, _, full, _ = decode_update(r.update.SerializeToString())
            if not full or group not in snapshot:
                raise RuntimeError(f"{user}: snapshot without the group: {r}")
            r = await _request(conn, pb.ClientMessage(request_id=3, subscribe=pb.Subscribe(all=True)))
            if r.WhichOneof("body") != "ack":
                raise RuntimeError(f"{user}: Subscribe -> {r}")
    task_status.started()
    if isinstance(conn, RawConn):
        # every phase's sampled sessions are read and decoded alike (the baselines' records
        # are not used): each server under test leaves the clients the same work per frame
        phase.pollable.append((conn, record))
        return  # read by the phase's epoll thread
    if mode == "seqactor" and record:
        await _record_pushes(phase, conn, group)
    else:
        await _count_frames(phase, conn)


async def _count_frames(phase: Phase, conn: RawConn | TwsConn) -> None:
    receive = conn.receive
    while True:
        batch = await receive()  # (not `phase.frames += len(await ...)`: that loads first)
        phase.frames += len(batch)


async def _record_pushes(phase: Phase, conn: RawConn | TwsConn, group: str) -> None:
    """Every push's group max with the time its bytes were read (only when the max grows)."""
    maxes = array("Q")
    times = array("d")
    phase.records.append((maxes, times, times))  # (no socket time through trio-websocket)
    mono = time.monotonic
    top = 0
    while True:
        batch = await conn.receive()
        t = mono()
        for data in batch:
            _, field, body = split_server_message(data)
            if field != UPDATE_FIELD:
                continue
            phase.frames += 1
            entry = decode_update(body)[0].get(group)
            if entry is not None and entry[0] > top:
                top = entry[0]
                maxes.append(top)
                times.append(t)


async def _guarded(phase: Phase, fn: Any, *args: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await fn(phase, *args, task_status=task_status)
    except tws.ConnectionClosed as exc:
        phase.errors.append(f"closed: {exc.reason}")
    except trio.ClosedResourceError:
        pass  # closed by the "close" command
    except (OSError, trio.BrokenResourceError, tws.HandshakeError, RuntimeError) as exc:
        phase.errors.append(repr(exc))


async def _start(nursery: trio.Nursery, *args: Any) -> None:
    try:
        await nursery.start(*args)
    except RuntimeError:
        pass  # the session failed during setup; _guarded recorded why


async def connect(phase: Phase, cmd: dict[str, Any], nursery: trio.Nursery) -> dict[str, Any]:
    first, last = cmd["users"]
    secret = open(cmd["secret_file"], "rb").read().strip() if cmd.get("secret_file") else b""
    limiter = trio.CapacityLimiter(cmd.get("concurrency", 100))
    sample_every = max(1, int(cmd.get("sample_every", 1)))
    probe_every = int(cmd.get("probe_every", 0))
    if "nice" in cmd:  # this thread's, inherited by the reader thread started after the setup
        os.setpriority(os.PRIO_PROCESS, 0, int(cmd["nice"]))
    t0 = time.monotonic()
    with trio.fail_after(cmd.get("timeout_s", 600)):
        async with trio.open_nursery() as setup:
            for i in range(first, last):
                if probe_every:  # the probe process holds (and records) every K-th user only
                    record = i % probe_every == 0
                    if record != bool(cmd.get("probe")):
                        continue
                else:
                    record = (i - first) % sample_every == 0
                setup.start_soon(
                    _start, nursery, _guarded, phase, _open_session, nursery, limiter, cmd["port"],
                    cmd["mode"], cmd.get("transport", "raw"), f"u{i:06d}", secret,
                    cmd.get("group", ""), record,
                )
    return {"connected": len(phase.conns) - len(phase.errors), "secs": time.monotonic() - t0,
            "errors": phase.errors[:5]}


async def close(phase: Phase) -> None:
    phase.stop.set()
    if phase.thread is not None:
        await trio.to_thread.run_sync(phase.thread.join)
    if phase.nursery is not None:
        phase.nursery.cancel_scope.cancel()
    for conn in phase.conns:
        await conn.aclose()


async def _hold(phase: Phase, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The phase's nursery: its sessions' tasks live here until ``close`` cancels it."""
    async with trio.open_nursery() as n:
        phase.nursery = n
        task_status.started()
        await trio.sleep_forever()


async def main() -> None:
    raise_nofile()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    phase = Phase()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async with trio.open_nursery() as root:
        while True:
            while b"\n" not in buf:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    root.cancel_scope.cancel()
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            name = cmd["cmd"]
            try:
                if name == "connect":
                    await root.start(_hold, phase)
                    assert phase.nursery is not None
                    phase.group = cmd.get("group", "")
                    phase.poll_interval_s = float(cmd.get("poll_interval_s", 0.0))
                    answer = await connect(phase, cmd, phase.nursery)
                    phase.start_reader()
                    reply(answer)
                elif name == "mark":
                    reply({"t": time.monotonic(), "frames": phase.frames})
                elif name == "reset":
                    with phase.lock:
                        for record in phase.records:
                            for column in record:
                                del column[:]
                    reply({"t": time.monotonic(), "frames": phase.frames})
                elif name == "dump":
                    with phase.lock, open(cmd["path"], "wb") as f:
                        pickle.dump([tuple(c.tobytes() for c in r) for r in phase.records], f)
                    reply({"sessions": len(phase.records), "errors": phase.errors[:5],
                           "closed": len(phase.errors)})
                elif name == "close":
                    await close(phase)
                    phase = Phase()
                    reply({"ok": True})
                elif name == "exit":
                    await close(phase)
                    root.cancel_scope.cancel()
                    return
                else:
                    reply({"error": f"unknown command {name}"})
            except Exception as exc:  # reported to the driver, which fails the run
                reply({"error": repr(exc), "errors": phase.errors[:5]})


if __name__ == "__main__":
    trio.run(main)
