"""Sync benchmark: snapshot and delta of a 10 000-conversation view, and push vs HTTP polling.

Run from the repo root: ``.venv/bin/python bench/sync.py [--quick]``. Prints a table and writes
``bench/results/sync.json``. Everything runs in this process on 127.0.0.1 (memory:// store).

* snapshot / delta: a :class:`seqactor.Client` connects without (snapshot) or with (delta,
  1 % of the conversations changed) a cache; bytes = the reply frame on the wire (WebSocket
  header + protobuf), ms = client-observed (request sent -> reply decoded and applied).
* push vs polling, one change per minute per user: bytes per delivered change, computed from
  sizes measured in this run (see docs/client.md, "Benchmark"):
  - polling every 5 s: 12 polls per change, 11 empty and 1 carrying the change; each poll is a
    real HTTP/1.1 keep-alive exchange with an h11 endpoint built here that returns the same
    protobuf (``SequenceUpdate``), with the headers of a typical mobile client and API server;
  - push: the measured push frame per change, plus the idle heartbeat (Ping/Pong every 25 s,
    2.4 per minute) that keeps the WebSocket alive.
  Latency: polling p50 = half the poll interval + the measured request time (p50); push p50 is
  measured end to end (allocate issued by a backend -> change applied in the client).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from email.utils import formatdate
from pathlib import Path

import h11
import trio
from _common import git_head, percentile

from seqactor import Client, ServiceClient
from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor.auth import issue_token
from seqactor.client._connection import ws_header_len
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store import open_store

SECRET = b"bench-secret-0123456789abcdef0123456789"
VIEW_CONVERSATIONS = 10_000
DELTA_FRACTION = 0.01
POLL_INTERVAL_S = 5.0
CHANGE_INTERVAL_S = 60.0
HEARTBEAT_S = 25.0
TCPIP_HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamps option 12, per segment
RESULTS = Path(__file__).parent / "results" / "sync.json"


def token(user: str, role: str = "user") -> str:
    return issue_token(SECRET, user, role=role, ttl_s=3600)


# ----------------------------------------------------------------------------- HTTP polling


class PollState:
    """What the polling endpoint serves: a position and the rows changed at each position."""

    def __init__(self, epoch: bytes) -> None:
        self.epoch = epoch
        self.position = 1
        self.changed: dict[int, tuple[str, int, int]] = {}  # position -> (cid, max, time_ms)

    def token(self, position: int) -> bytes:
        from seqactor._synctoken import make_token

        return make_token(self.epoch, position)

    def bump(self, cid: str, max_seq: int) -> None:
        self.position += 1
        self.changed[self.position] = (cid, max_seq, time.time_ns() // 1_000_000)

    def response(self, since: bytes) -> bytes:
        from seqactor._synctoken import token_position

        pos = token_position(since, self.epoch, self.position) or 0
        update = pb.SequenceUpdate(sync_token=self.token(self.position))
        for p in range(pos + 1, self.position + 1):
            if p not in self.changed:
                continue
            cid, mx, tm = self.changed[p]
            update.conversations[cid].max_sequence = mx
            update.conversations[cid].max_sequence_time_ms = tm
        return update.SerializeToString()


async def http_endpoint(stream: trio.SocketStream, state: PollState) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data:
                return
            continue
        if isinstance(event, h11.Request):
            query = event.target.split(b"since=", 1)[1] if b"since=" in event.target else b""
            since = base64.urlsafe_b64decode(query + b"=" * (-len(query) % 4)) if query else b""
            body = state.response(since)
            headers = [
                ("Date", formatdate(usegmt=True)),
                ("Content-Type", "application/x-protobuf"),
                ("Content-Length", str(len(body))),
                ("Connection", "keep-alive"),
                ("Cache-Control", "no-cache, no-store, must-revalidate"),
                ("Vary", "Accept-Encoding, Authorization"),
                ("X-Request-Id", str(uuid.uuid4())),
                ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
                ("Server", "nginx"),
            ]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers,
                                                         reason=b"OK")))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            continue
        if isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return


class Poller:
    """A mobile client polling over one keep-alive connection; counts bytes both ways."""

    def __init__(self, stream: trio.SocketStream, jwt: str) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.jwt = jwt
        self.token = b""
        self.device = str(uuid.uuid4())
        self.sent = self.received = 0

    async def poll(self) -> tuple[int, bytes]:
        since = base64.urlsafe_b64encode(self.token).rstrip(b"=").decode()
        headers = [
            ("Host", "im-api.example.com"),
            ("User-Agent", "ExampleChat/8.12.0 (iPhone15,3; iOS 17.4.1; Scale/3.00) "
                           "Alamofire/5.8.1"),
            ("Accept", "application/x-protobuf"),
            ("Accept-Encoding", "br;q=1.0, gzip;q=0.9, deflate;q=0.8"),
            ("Accept-Language", "en-US;q=1.0"),
            ("Authorization", f"Bearer {self.jwt}"),
            ("Connection", "keep-alive"),
            ("X-Device-Id", self.device),
            ("X-Request-Id", str(uuid.uuid4())),
        ]
        out = self.conn.send(h11.Request(method="GET", target=f"/v1/sequences?since={since}",
                                          headers=headers))
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        sent = len(out)
        received = 0
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                received += len(data)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                body += event.data
            if isinstance(event, h11.EndOfMessage):
                break
        self.conn.start_next_cycle()
        self.token = pb.SequenceUpdate.FromString(body).sync_token
        self.sent += sent
        self.received += received
        return sent + received, body


# ----------------------------------------------------------------------------- the run


def progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


async def run(quick: bool) -> dict[str, object]:
    reps = 3 if quick else 10
    samples = 100 if quick else 500
    rng = random.Random(1)
    cfg = ServerConfig(host="127.0.0.1", port=0, rate_limit_ops_per_s=1e9, rate_limit_burst_ops=10**9)
    server = Server(cfg, open_store("memory://"), SECRET)
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        url = server.url
        store = server.store
        t0 = time.perf_counter()
        cids = [f"conversation-{i:05d}" for i in range(VIEW_CONVERSATIONS)]
        for i, cid in enumerate(cids):
            await store.add_members(cid, ["bench", f"peer{i % 97}"])
            await store.allocate(cid, rng.randint(1, 500), f"peer{i % 97}")
            if rng.random() < 0.7:
                await store.mark_read(cid, "bench", rng.randint(0, 400))
        setup_s = time.perf_counter() - t0

        progress('snapshot of 10k conv')
        # --- snapshot of 10k conversations
        snap_ms, snap_bytes = [], 0
        for _ in range(reps):
            async with Client.connect(url, token("bench")) as c:
                sync = c.last_sync
                assert sync is not None and sync.full and sync.conversations == VIEW_CONVERSATIONS
                snap_ms.append(sync.ms)
                snap_bytes = sync.bytes
        results["snapshot_10k_bytes"] = snap_bytes
        results["snapshot_10k_ms"] = round(statistics.median(snap_ms), 2)
        results["snapshot_10k_ms_min"] = round(min(snap_ms), 2)

        progress('delta: 1 % changed')
        # --- delta: 1 % changed while the client was away, resumed from its cache
        n_changed = int(VIEW_CONVERSATIONS * DELTA_FRACTION)
        delta_ms, delta_bytes = [], 0
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "bench.cache"
            async with Client.connect(url, token("bench"), cache_path=cache):
                pass
            for _ in range(reps):
                for cid in rng.sample(cids, n_changed):
                    await store.allocate(cid, 1, "peer1")
                async with Client.connect(url, token("bench"), cache_path=cache) as c:
                    sync = c.last_sync
                    assert sync is not None and not sync.full and sync.conversations == n_changed
                    delta_ms.append(sync.ms)
                    delta_bytes = sync.bytes
        results["delta_10k_1pct_bytes"] = delta_bytes
        results["delta_10k_1pct_ms"] = round(statistics.median(delta_ms), 2)
        results["snapshot_over_delta_bytes"] = round(snap_bytes / delta_bytes, 1)

        progress('push: one change')
        # --- push: one change in a direct chat, bytes on the wire and end-to-end latency
        await store.add_members("dm-alice-bob", ["alice", "bob"])
        push_lat, push_bytes = [], []
        async with ServiceClient.connect(url, token("backend", "service")) as svc, \
                Client.connect(url, token("alice")) as alice:
            stream = alice.changes()
            for _ in range(samples):
                before = alice.stats.bytes_in
                async with trio.open_nursery() as n:
                    start = time.perf_counter()
                    n.start_soon(svc.allocate, "dm-alice-bob", 1, "bob")
                    await stream.__anext__()
                    push_lat.append((time.perf_counter() - start) * 1000)
                push_bytes.append(alice.stats.bytes_in - before)
        push_frame = statistics.median(push_bytes)
        now_ms = time.time_ns() // 1_000_000
        ping = pb.ClientMessage(request_id=123, ping=pb.Ping(client_time_ms=now_ms))
        pong = pb.ServerMessage(request_id=123, pong=pb.Pong(client_time_ms=now_ms,
                                                             server_time_ms=now_ms))
        ping_bytes = ping.ByteSize() + ws_header_len(ping.ByteSize(), masked=True)
        pong_bytes = pong.ByteSize() + ws_header_len(pong.ByteSize())
        heartbeats = CHANGE_INTERVAL_S / HEARTBEAT_S
        push_per_change = push_frame + heartbeats * (ping_bytes + pong_bytes)
        # segments: push + its ACK; each heartbeat: ping, pong, ACK
        push_tcpip = push_per_change + TCPIP_HEADER_BYTES * (2 + 3 * heartbeats)

        progress('polling over HTTP')
        # --- polling over HTTP/1.1 keep-alive (h11 on both sides)
        state = PollState(server.hub.epoch)
        async with trio.open_nursery() as http:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            http.start_soon(trio.serve_listeners, lambda s: http_endpoint(s, state), listeners)
            port = listeners[0].socket.getsockname()[1]
            stream_http = await trio.open_tcp_stream("127.0.0.1", port)
            poller = Poller(stream_http, token("alice"))
            await poller.poll()  # first poll: gets a token
            empty_sizes, change_sizes, req_ms = [], [], []
            for i in range(samples):
                if i % 2:
                    state.bump("dm-alice-bob", 1000 + i)
                start = time.perf_counter()
                size, body = await poller.poll()
                req_ms.append((time.perf_counter() - start) * 1000)
                changed = bool(pb.SequenceUpdate.FromString(body).conversations)
                assert changed == bool(i % 2)
                (change_sizes if changed else empty_sizes).append(size)
            await stream_http.aclose()
            http.cancel_scope.cancel()
        polls = CHANGE_INTERVAL_S / POLL_INTERVAL_S
        poll_empty, poll_change = statistics.median(empty_sizes), statistics.median(change_sizes)
        polling_per_change = (polls - 1) * poll_empty + poll_change
        # segments per poll: request, response, ACK
        polling_tcpip = polling_per_change + TCPIP_HEADER_BYTES * 3 * polls

        results.update({
            "polling_bytes_per_change": round(polling_per_change),
            "push_bytes_per_change": round(push_per_change),
            "polling_over_push_bytes": round(polling_per_change / push_per_change, 1),
            "polling_bytes_per_change_with_tcpip": round(polling_tcpip),
            "push_bytes_per_change_with_tcpip": round(push_tcpip),
            "polling_over_push_bytes_with_tcpip": round(polling_tcpip / push_tcpip, 1),
            "polling_latency_p50_ms": round(POLL_INTERVAL_S * 1000 / 2 + percentile(req_ms, 0.5), 1),
            "push_latency_p50_ms": round(percentile(push_lat, 0.5), 3),
            "push_latency_p99_ms": round(percentile(push_lat, 0.99), 3),
            "http_request_ms_p50": round(percentile(req_ms, 0.5), 3),
            "poll_empty_bytes": round(poll_empty),
            "poll_with_change_bytes": round(poll_change),
            "push_frame_bytes": round(push_frame),
            "ping_bytes": ping_bytes,
            "pong_bytes": pong_bytes,
            "model": {
                "poll_interval_s": POLL_INTERVAL_S, "change_interval_s": CHANGE_INTERVAL_S,
                "heartbeat_interval_s": HEARTBEAT_S, "tcpip_header_bytes": TCPIP_HEADER_BYTES,
                "method": "analytic from sizes measured in this run",
            },
            "setup_s": round(setup_s, 2),
        })
        server.stop()
    return results


def print_table(r: dict[str, object]) -> None:
    rows = [
        ("snapshot, 10 000 conversations", f"{r['snapshot_10k_bytes']:,} B",
         f"{r['snapshot_10k_ms']} ms"),
        ("delta after 1 % changed (100 conv.)", f"{r['delta_10k_1pct_bytes']:,} B",
         f"{r['delta_10k_1pct_ms']} ms"),
        ("  snapshot / delta", f"{r['snapshot_over_delta_bytes']}x", ""),
        ("HTTP polling every 5 s, per change", f"{r['polling_bytes_per_change']:,} B",
         f"p50 {r['polling_latency_p50_ms']} ms"),
        ("seqactor push, per change", f"{r['push_bytes_per_change']:,} B",
         f"p50 {r['push_latency_p50_ms']} ms"),
        ("  polling / push (bytes)", f"{r['polling_over_push_bytes']}x", ""),
        ("  same, with TCP/IP headers", f"{r['polling_bytes_per_change_with_tcpip']:,} B vs "
         f"{r['push_bytes_per_change_with_tcpip']:,} B",
         f"{r['polling_over_push_bytes_with_tcpip']}x"),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    print(f"{'measure':<{w0}}  {'bytes':>{w1}}  time")
    print("-" * (w0 + w1 + 20))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    print(f"(one poll: {r['poll_empty_bytes']} B empty, {r['poll_with_change_bytes']} B with a "
          f"change; one push: {r['push_frame_bytes']} B; ping+pong: "
          f"{r['ping_bytes']}+{r['pong_bytes']} B)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    started = time.perf_counter()
    results = trio.run(run, args.quick)
    results["meta"] = {
        "quick": args.quick, "git_head": git_head(), "python": platform.python_version(),
        "compiled_kernel": kernel.COMPILED, "cpus": os.cpu_count(),
        "duration_s": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
