// The SDK against a real `seqactor serve`: every method, resume with a delta, cache reload,
// a server restart on SQLite, typed errors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  AuthenticationError, Client, ConnectError, FileCache, Forbidden, NotFound, ServiceClient, MemoryCache,
} from "../../dist/node.js";
import { GUARD_MS, Server, plainView, tempDir, until } from "../helpers.mjs";

let server;
let svc;
const fastBackoff = { baseMs: 5, capMs: 50 };

before(async () => {
  server = await new Server().start();
  svc = await ServiceClient.connect(server.url, server.token("backend", "service"));
});
after(async () => {
  await svc?.close();
  await server?.stop();
});

test("connect syncs the whole view; unread and total follow docs/protocol.md#unread", async () => {
  await svc.addMembers("v-a", ["ann", "bo"]);
  await svc.allocate("v-a", 5, "bo");
  await svc.addMembers("v-b", ["ann"]);
  await svc.allocate("v-b", 10);
  await svc.setMinSequence("v-b", 8);
  const c = await Client.connect(server.url, server.token("ann"), { deviceId: "t1" });
  try {
    assert.equal(c.userId, "ann");
    assert.deepEqual(plainView(c), {
      "v-a": { max: 5, read: 0, min: 0, unread: 5 },
      "v-b": { max: 10, read: 0, min: 8, unread: 3 },
    });
    assert.equal(c.totalUnread, 8);
    assert.equal(c.lastSync.full, true);
    assert.ok(c.syncToken.length > 0);
    assert.equal(c.get("nope"), null);
    assert.deepEqual(c.conversations().map((x) => x.id).sort(), ["v-a", "v-b"]);
  } finally {
    await c.close();
  }
});

test("pushes: change events and the change stream carry old and new values", async () => {
  await svc.addMembers("p-1", ["cy", "dee"]);
  const c = await Client.connect(server.url, server.token("cy"));
  try {
    const events = [];
    c.addEventListener("change", (e) => events.push(...e.changes));
    const stream = c.changes();
    await svc.allocate("p-1", 3, "dee");
    const batch = (await stream.next()).value;
    const ch = batch.changes.find((x) => x.conversationId === "p-1");
    assert.equal(ch.old.maxSequence, 0);
    assert.equal(ch.new.maxSequence, 3);
    assert.equal(ch.new.unread, 3);
    assert.equal(batch.totalUnread, c.totalUnread);
    assert.ok(events.some((x) => x.conversationId === "p-1" && x.new?.maxSequence === 3));
    // joining and leaving the view
    await svc.addMembers("p-2", ["cy"]);
    await until(() => c.get("p-2") !== null, c, "p-2 joins");
    await svc.removeMembers("p-2", ["cy"]);
    await until(() => c.get("p-2") === null, c, "p-2 leaves");
    assert.ok(events.some((x) => x.conversationId === "p-2" && x.old !== null && x.new === null));
    stream.close();
    assert.equal((await stream.next()).done, true);
  } finally {
    await c.close();
  }
});

test("markRead returns the effective read seq (clamped, monotonic) and applies it", async () => {
  await svc.addMembers("m-1", ["eve"]);
  await svc.allocate("m-1", 4);
  const c = await Client.connect(server.url, server.token("eve"));
  try {
    assert.equal(await c.markRead("m-1", 2), 2);
    assert.equal(c.get("m-1").unread, 2);
    assert.equal(await c.markRead("m-1", 99), 4); // clamped to max
    assert.equal(await c.markRead("m-1", 1), 4); // never lower
    assert.equal(c.get("m-1").readSequence, 4);
    assert.equal(c.totalUnread, 0);
    await assert.rejects(c.markRead("not-mine", 1), Forbidden);
  } finally {
    await c.close();
  }
});

test("keep_history: the row is frozen (pushed, in a resume, a snapshot and the cache); a re-add ends it", async () => {
  const path = join(tempDir(), "frozen.json");
  await svc.addMembers("f-1", ["fritz", "gil"]);
  await svc.addMembers("f-2", ["fritz"]);
  await svc.allocate("f-1", 5);
  const away = await Client.connect(server.url, server.token("fritz"), { cache: new FileCache(path), deviceId: "away" });
  assert.equal(away.get("f-1").frozen, false);
  await away.close(); // its cache holds a token from before the freeze
  const c = await Client.connect(server.url, server.token("fritz"), { deviceId: "live" });
  try {
    const stream = c.changes();
    await svc.removeMembers("f-1", ["fritz"], true);
    const ch = (await stream.next()).value.changes.find((x) => x.conversationId === "f-1");
    assert.equal(ch.old.frozen, false);
    assert.equal(ch.new.frozen, true);
    assert.equal(c.get("f-1").maxSequence, 5);
    await svc.allocate("f-1", 3); // does not reach the frozen row
    await svc.allocate("f-2", 1);
    await until(() => c.get("f-2").maxSequence === 1, c, "f-2 pushed");
    assert.equal(c.get("f-1").maxSequence, 5);
    assert.equal(await c.markRead("f-1"), 5); // a frozen row can still be read
    assert.equal(c.get("f-1").frozen, true);
    // a resume across the freeze, then the cache keeps it
    const back = await Client.connect(server.url, server.token("fritz"), { cache: new FileCache(path), deviceId: "away" });
    try {
      assert.equal(back.lastSync.full, false);
      assert.equal(back.get("f-1").frozen, true);
      assert.equal(back.get("f-2").frozen, false);
    } finally {
      await back.close();
    }
    assert.equal((await new FileCache(path).load()).view.get("f-1").membership, 2);
    // a fresh client's snapshot
    const fresh = await Client.connect(server.url, server.token("fritz"), { deviceId: "fresh" });
    try {
      assert.equal(fresh.lastSync.full, true);
      assert.deepEqual(plainView(fresh)["f-1"], { max: 5, read: 5, min: 0, unread: 0, frozen: true });
    } finally {
      await fresh.close();
    }
    // re-added: a member again at the current max, and pushes resume
    await svc.addMembers("f-1", ["fritz"]);
    await until(() => !c.get("f-1").frozen, c, "f-1 re-added");
    assert.equal(c.get("f-1").maxSequence, 8);
    await svc.allocate("f-1", 1);
    await until(() => c.get("f-1").maxSequence === 9, c, "f-1 pushed again");
  } finally {
    await c.close();
  }
});

test("fetch, subscribe and unsubscribe with subscribeAll off", async () => {
  await svc.addMembers("s-1", ["fay"]);
  await svc.addMembers("s-2", ["fay"]);
  const c = await Client.connect(server.url, server.token("fay"), { subscribeAll: false });
  try {
    assert.deepEqual(Object.keys(plainView(c)).sort(), ["s-1", "s-2"]);
    await c.subscribe(["s-1"]);
    await svc.allocate("s-2", 2); // not followed: no push
    await svc.allocate("s-1", 1); // followed: pushed
    await until(() => c.get("s-1").maxSequence === 1, c, "push for s-1");
    assert.equal(c.get("s-2").maxSequence, 0);
    const got = await c.fetch(["s-2", "outside"]);
    assert.deepEqual([...got.keys()], ["s-2"]);
    assert.equal(c.get("s-2").maxSequence, 2);
    await c.unsubscribe(["s-1"]);
    await svc.allocate("s-1", 1);
    await c.roundTrip(); // a round trip after the allocation: a push would have come first
    assert.equal(c.stats.pushes, 1);
    assert.equal(c.get("s-1").maxSequence, 1);
    assert.equal((await c.fetch(["s-1"])).get("s-1").maxSequence, 2);
    await assert.rejects(c.subscribe(["outside"]), Forbidden);
  } finally {
    await c.close();
  }
});

test("setBackground holds pushes until foreground, then one flush", async () => {
  await svc.addMembers("bg-1", ["gus"]);
  await svc.addMembers("bg-2", ["gus"]);
  const c = await Client.connect(server.url, server.token("gus"));
  try {
    await c.setBackground(true);
    const pushes = c.stats.pushes;
    await svc.allocate("bg-1", 1);
    await svc.allocate("bg-2", 2);
    await svc.allocate("bg-1", 1);
    await c.roundTrip(); // a round trip after the allocations: nothing was pushed meanwhile
    assert.equal(c.stats.pushes, pushes);
    assert.equal(c.get("bg-1").maxSequence, 0);
    await c.setBackground(false);
    await until(() => c.get("bg-1").maxSequence === 2 && c.get("bg-2").maxSequence === 2, c, "flush");
    assert.equal(c.stats.pushes, pushes + 1);
  } finally {
    await c.close();
  }
});

test("a dropped link resumes with a delta: full = false and only the changed conversations", async () => {
  for (const id of ["r-1", "r-2", "r-3", "r-4"]) await svc.addMembers(id, ["hal"]);
  // the token provider gates the reconnect: drop, change while offline, then let it go
  let release = () => undefined;
  let gate = Promise.resolve();
  const provider = async () => {
    await gate;
    return server.token("hal");
  };
  const c = await Client.connect(server.url, provider, { backoff: fastBackoff });
  try {
    const connects = c.stats.connects;
    gate = new Promise((r) => (release = r));
    c.dropConnection();
    await svc.allocate("r-2", 3);
    await svc.removeMembers("r-4", ["hal"]);
    release();
    await until(() => c.stats.connects === connects + 1 && c.connected, c, "reconnect");
    const s = c.lastSync;
    assert.equal(s.sinceToken, true);
    assert.equal(s.full, false);
    assert.deepEqual(s.conversationIds, ["r-2"]);
    assert.equal(s.removed, 1);
    await until(() => c.get("r-2")?.maxSequence === 3 && c.get("r-4") === null, c, "converged");
    assert.deepEqual(Object.keys(plainView(c)).sort(), ["r-1", "r-2", "r-3"]);
  } finally {
    await c.close();
  }
});

test("a file cache: a new client resumes from it with a delta", async () => {
  const path = join(tempDir(), "cache.json");
  await svc.addMembers("c-1", ["ida"]);
  await svc.addMembers("c-2", ["ida"]);
  const a = await Client.connect(server.url, server.token("ida"), { cache: new FileCache(path), deviceId: "x" });
  assert.equal(a.lastSync.full, true);
  await a.close();
  await svc.allocate("c-2", 4);
  const b = await Client.connect(server.url, server.token("ida"), { cache: new FileCache(path), deviceId: "x" });
  try {
    assert.equal(b.lastSync.full, false);
    assert.deepEqual(b.lastSync.conversationIds, ["c-2"]);
    assert.deepEqual(plainView(b), { "c-1": { max: 0, read: 0, min: 0, unread: 0 }, "c-2": { max: 4, read: 0, min: 0, unread: 4 } });
  } finally {
    await b.close();
  }
  // a cache of another user is not resumed
  const other = await Client.connect(server.url, server.token("jon"), { cache: new FileCache(path) });
  try {
    assert.equal(other.lastSync.full, true);
    assert.equal(other.size, 0);
  } finally {
    await other.close();
  }
});

test("ServiceClient: many requests in flight on one connection; typed server errors", async () => {
  const n = 200;
  const results = await Promise.all(Array.from({ length: n }, () => svc.allocate("svc-many", 1)));
  const seqs = results.map((r) => r.firstSequence).sort((x, y) => x - y);
  assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => i + 1));
  const user = await ServiceClient.connect(server.url, server.token("kim"));
  try {
    await assert.rejects(user.allocate("x"), Forbidden);
  } finally {
    await user.close();
  }
});

test("a bad token is a typed AuthenticationError with close code 4001", async () => {
  const bad = server.token("lee").replace(/.$/, (ch) => (ch === "A" ? "B" : "A"));
  const err = await Client.connect(server.url, bad).then(() => null, (e) => e);
  assert.ok(err instanceof AuthenticationError, String(err));
  assert.equal(err.closeCode, 4001);
  const refused = await Client.connect("ws://127.0.0.1:1/v1", "t").then(() => null, (e) => e);
  assert.ok(refused instanceof ConnectError, String(refused));
});

test("server restart on SQLite: GoAway honoured, then resume with a delta", async () => {
  const dir = tempDir();
  const sq = await new Server({ store: `sqlite:///${join(dir, "db.sqlite")}`, dir }).start();
  const s2 = await ServiceClient.connect(sq.url, sq.token("backend", "service"), { backoff: fastBackoff });
  const c = await Client.connect(sq.url, sq.token("max"), { backoff: fastBackoff, cache: new MemoryCache() });
  try {
    await s2.addMembers("q-1", ["max"]);
    await s2.addMembers("q-2", ["max"]);
    await s2.allocate("q-1", 2);
    await until(() => c.get("q-1")?.maxSequence === 2 && c.get("q-2"), c, "initial state");
    await sq.stop();
    assert.equal(c.stats.goaways, 1);
    await until(() => c.state === "offline" || c.state === "connecting", c, "offline");
    await sq.start(); // same port
    await until(() => c.connected, c, "reconnected");
    const asked = c.lastGoAway.reconnectAfterMs;
    const afterGoAway = c.delays.filter((d) => d.goaway);
    assert.equal(afterGoAway.length, 1);
    assert.ok(afterGoAway[0].ms >= asked && afterGoAway[0].ms <= asked * 1.25, `${afterGoAway[0].ms} vs GoAway ${asked}`);
    assert.equal(c.lastSync.full, false);
    await until(() => s2.connected, s2, "service reconnected");
    await s2.allocate("q-2", 5);
    await until(() => c.get("q-2").maxSequence === 5, c, "push after restart");
    assert.equal(c.get("q-1").maxSequence, 2);
  } finally {
    await c.close();
    await s2.close();
    await sq.stop();
  }
});

test("a newer session on the same device replaces the older: SessionReplaced (4009), not retried", async () => {
  await svc.addMembers("dev-1", ["nia"]);
  const old = await Client.connect(server.url, server.token("nia"), { deviceId: "tablet", backoff: fastBackoff });
  const stream = old.changes();
  const newer = await Client.connect(server.url, server.token("nia"), { deviceId: "tablet" });
  try {
    await until(() => old.error !== null, old, "replaced");
    assert.equal(old.error.name, "SessionReplaced");
    assert.equal(old.error.closeCode, 4009);
    assert.equal(old.state, "closed");
    await assert.rejects(old.markRead("dev-1", 1), (e) => e.name === "SessionReplaced");
    await assert.rejects(stream.next(), (e) => e.name === "SessionReplaced");
    assert.equal(newer.connected, true);
  } finally {
    await old.close();
    await newer.close();
  }
});

test("offlineOk: the cached view at once while the server is down; a new store epoch brings a snapshot", async () => {
  const mem = await new Server().start();
  const s3 = await ServiceClient.connect(mem.url, mem.token("backend", "service"));
  await s3.addMembers("o-1", ["ola"]);
  await s3.allocate("o-1", 2);
  await s3.close();
  const cache = new MemoryCache();
  const a = await Client.connect(mem.url, mem.token("ola"), { cache });
  await a.close();
  await mem.stop();
  const b = await Client.connect(mem.url, mem.token("ola"), { cache, offlineOk: true, backoff: fastBackoff });
  try {
    assert.equal(b.connected, false);
    assert.equal(b.get("o-1").maxSequence, 2); // from the cache
    await mem.start(); // same port, a fresh memory:// store: another epoch
    await until(() => b.connected, b, "connected");
    assert.equal(b.lastSync.sinceToken, true);
    assert.equal(b.lastSync.full, true);
    assert.equal(b.size, 0); // the new store has nothing for ola: the snapshot dropped o-1
  } finally {
    await b.close();
    await mem.stop();
  }
});
