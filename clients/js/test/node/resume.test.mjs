// Orderings a real server produces only by chance, driven exactly by a scripted in-process
// WebSocket peer: a push overtaking the resume reply, GoAway, heartbeat.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { ClientMessageSchema, ServerMessageSchema } from "../../dist/gen/seqactor/v1/seqactor_pb.js";
import { Client } from "../../dist/node.js";
import { GUARD_MS, until } from "../helpers.mjs";

/** A scripted server: each socket the client opens is handed to the test. */
class FakeNet {
  constructor() {
    this.sockets = [];
    this.pending = [];
    const net = this;
    this.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.inbox = [];
        this.waiters = [];
        this.log = []; // every ClientMessage sent, in order
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
        setImmediate(() => {
          this.readyState = 1;
          this.onopen?.({});
          net.sockets.push(this);
          net.pending.shift()?.(this);
        });
      }
      send(data) {
        const msg = fromBinary(ClientMessageSchema, data);
        msg.sentAt = performance.now();
        this.log.push(msg);
        const w = this.waiters.shift();
        w ? w(msg) : this.inbox.push(msg);
      }
      close(code = 1005, reason = "") {
        if (this.readyState === 3) return;
        this.readyState = 3;
        setImmediate(() => this.onclose?.({ code, reason }));
      }
      /** the next ClientMessage the client sent */
      recv() {
        if (this.inbox.length) return Promise.resolve(this.inbox.shift());
        return new Promise((r) => this.waiters.push(r));
      }
      reply(requestId, body) {
        const bytes = toBinary(ServerMessageSchema, create(ServerMessageSchema, { requestId, body }));
        this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
      }
      /** the server closes (close frame with code) */
      serverClose(code, reason = "") {
        this.readyState = 3;
        this.onclose?.({ code, reason });
      }
    };
  }
  /** the next socket the client opens */
  next() {
    return new Promise((r) => this.pending.push(r));
  }
}

const conv = (max, read = 0) => ({ maxSequence: BigInt(max), readSequence: BigInt(read) });

async function welcome(ws, heartbeatIntervalMs = 0) {
  const hello = await ws.recv();
  assert.equal(hello.body.case, "hello");
  ws.reply(hello.requestId, { case: "welcome", value: { userId: "u", sessionId: "s", heartbeatIntervalMs } });
}

/** Serve a resume: answer Subscribe, hand back GetSequences (for the test to answer). */
async function resumeRequests(ws) {
  const sub = await ws.recv();
  assert.equal(sub.body.case, "subscribe");
  ws.reply(sub.requestId, { case: "ack", value: {} });
  const get = await ws.recv();
  assert.equal(get.body.case, "getSequences");
  return get;
}

test("a push that overtakes the resume reply does not move the resume point", async () => {
  const net = new FakeNet();
  const first = net.next();
  const connecting = Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket, backoff: { baseMs: 1, capMs: 2 } });
  let ws = await first;
  await welcome(ws);
  let get = await resumeRequests(ws);
  assert.equal(get.body.value.since.length, 0);
  ws.reply(get.requestId, { case: "update", value: { conversations: { a: conv(1), b: conv(1) }, syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    assert.deepEqual([...c.syncToken], [1]);
    // link 2: the resume is sent with token 1; a push with token 3 arrives before the reply,
    // then the link drops: the next resume must still start from token 1.
    let nextWs = net.next();
    ws.serverClose(1006);
    ws = await nextWs;
    await welcome(ws);
    get = await resumeRequests(ws);
    assert.deepEqual([...get.body.value.since], [1]);
    ws.reply(0n, { case: "update", value: { conversations: { a: conv(5) }, syncToken: new Uint8Array([3]) } });
    await until(() => c.get("a").maxSequence === 5, c, "push applied");
    assert.deepEqual([...c.syncToken], [1], "the push's token is not adopted while the resume is unanswered");
    nextWs = net.next();
    ws.serverClose(1006);
    ws = await nextWs;
    await welcome(ws);
    get = await resumeRequests(ws);
    assert.deepEqual([...get.body.value.since], [1]);
    // this time the reply comes (with the `removed` the push's token would have skipped)
    ws.reply(get.requestId, { case: "update", value: { conversations: { a: conv(5) }, syncToken: new Uint8Array([4]), removed: ["b"] } });
    await until(() => c.connected, c, "resumed");
    assert.equal(c.get("b"), null);
    assert.deepEqual([...c.syncToken], [4]);
    // after the resume, pushes' tokens are adopted again
    ws.reply(0n, { case: "update", value: { conversations: { a: conv(6) }, syncToken: new Uint8Array([5]) } });
    await until(() => c.get("a").maxSequence === 6, c, "push");
    assert.deepEqual([...c.syncToken], [5]);
  } finally {
    await c.close();
  }
});

test("GoAway: the reconnect waits at least reconnect_after_ms (at most 25 % more)", async () => {
  const net = new FakeNet();
  const first = net.next();
  const connecting = Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket, backoff: { baseMs: 1, capMs: 2 } });
  let ws = await first;
  await welcome(ws);
  let get = await resumeRequests(ws);
  ws.reply(get.requestId, { case: "update", value: { syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    const asked = 40;
    const nextWs = net.next();
    ws.reply(0n, { case: "goAway", value: { reason: "restart", reconnectAfterMs: asked } });
    ws.serverClose(1001);
    ws = await nextWs;
    assert.deepEqual(c.delays.map((d) => d.goaway), [true]);
    assert.ok(c.lastDelayMs >= asked && c.lastDelayMs <= asked * 1.25, String(c.lastDelayMs));
    assert.equal(c.stats.goaways, 1);
  } finally {
    await c.close();
  }
});

test("a Ping goes out only after the heartbeat interval without traffic from the client", async () => {
  const net = new FakeNet();
  const first = net.next();
  const connecting = Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket });
  const ws = await first;
  const heartbeat = 30;
  await welcome(ws, heartbeat);
  const get = await resumeRequests(ws);
  ws.reply(get.requestId, { case: "update", value: { syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    const m = await ws.recv();
    assert.equal(m.body.case, "ping");
    const previous = ws.log[ws.log.indexOf(m) - 1].sentAt; // the resume's last request
    assert.ok(m.sentAt - previous >= heartbeat, `a Ping ${m.sentAt - previous} ms after the last frame sent`);
    assert.equal(c.stats.pingsSent, 1);
  } finally {
    await c.close();
  }
});

test("failed reconnects wait uniform(0, min(cap, base * 2^attempt)) each, and a success resets", async () => {
  const net = new FakeNet();
  // the same seeded source drives the client's backoff and the expectation
  const seeded = (seed) => () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
  const rng = seeded(42);
  const expectRng = seeded(42);
  const backoff = { baseMs: 2, capMs: 16, random: rng };
  const first = net.next();
  const connecting = Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket, backoff });
  let ws = await first;
  await welcome(ws);
  const get = await resumeRequests(ws);
  ws.reply(get.requestId, { case: "update", value: { syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    const delays = [];
    let nextWs = net.next();
    ws.serverClose(1006);
    for (let i = 0; i < 6; i++) {
      ws = await nextWs; // attempt i + 1: refused before Welcome
      delays.push(c.lastDelayMs);
      nextWs = net.next();
      ws.serverClose(1006);
    }
    ws = await nextWs;
    delays.push(c.lastDelayMs);
    const want = [2, 4, 8, 16, 16, 16, 16].map((ceiling) => expectRng() * ceiling);
    assert.deepEqual(delays, want);
    assert.ok(new Set(delays).size === delays.length, "jittered");
  } finally {
    await c.close();
  }
});

test("reconnectNow (the browser's `online` event) ends the backoff wait at once", async () => {
  const net = new FakeNet();
  const first = net.next();
  // a backoff so long that only reconnectNow can bring the next attempt within the test
  const connecting = Client.connect("ws://fake/v1", "tok", {
    WebSocket: net.WebSocket, backoff: { baseMs: 3_600_000, capMs: 3_600_000, random: () => 0.5 },
  });
  let ws = await first;
  await welcome(ws);
  const get = await resumeRequests(ws);
  ws.reply(get.requestId, { case: "update", value: { syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    const nextWs = net.next();
    ws.serverClose(1006);
    await until(() => c.state === "offline", c, "offline");
    assert.equal(c.lastDelayMs, 1_800_000);
    c.reconnectNow();
    ws = await nextWs;
    await welcome(ws);
    const again = await resumeRequests(ws);
    assert.deepEqual([...again.body.value.since], [1]);
  } finally {
    await c.close();
  }
});

test("a link with nothing received for 2.5 heartbeat intervals is replaced", async () => {
  const net = new FakeNet();
  const first = net.next();
  const connecting = Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket, backoff: { baseMs: 1, capMs: 2 } });
  let ws = await first;
  await welcome(ws, 20);
  const get = await resumeRequests(ws);
  ws.reply(get.requestId, { case: "update", value: { syncToken: new Uint8Array([1]), full: true } });
  const c = await connecting;
  try {
    const nextWs = net.next(); // the peer goes silent: Pings get no Pong
    const silentFrom = ws.log[ws.log.length - 1].sentAt;
    ws = await nextWs;
    assert.ok(c.stats.pingsSent >= 1);
    assert.match(c.lastError, /nothing received/);
    assert.ok(performance.now() - silentFrom >= 20 * 2.5);
    await welcome(ws, 20);
    assert.deepEqual([...(await resumeRequests(ws)).body.value.since], [1]);
  } finally {
    await c.close();
  }
});

test("close() while connecting (no Welcome yet, or a token provider still pending) returns", async () => {
  const net = new FakeNet();
  const first = net.next();
  const c = await Client.connect("ws://fake/v1", "tok", { WebSocket: net.WebSocket, offlineOk: true });
  const ws = await first;
  await ws.recv(); // the Hello, never answered
  await c.close();
  assert.equal(c.state, "closed");
  const pending = await Client.connect("ws://fake/v1", () => new Promise(() => undefined), { WebSocket: net.WebSocket, offlineOk: true });
  await pending.close();
  assert.equal(pending.state, "closed");
});
