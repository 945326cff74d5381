// The SDK's wire codec against the generated @bufbuild/protobuf schemas, the unread formula
// and the backoff rules.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { ClientMessageSchema, ServerMessageSchema } from "../../dist/gen/seqactor/v1/seqactor_pb.js";
import { decodeReadCounts, decodeReaders, encodeClient } from "../../dist/wire.js";
import { Backoff, decodeUpdate, splitServerMessage, unreadOf } from "../../dist/node.js";

const BODIES = [
  { case: "hello", value: { token: "t.o.k", deviceId: "d1", platform: "node", clientVersion: "v" } },
  { case: "getSequences", value: { conversationIds: ["a", "b"], since: new Uint8Array([1, 2, 3]) } },
  { case: "getSequences", value: {} },
  { case: "subscribe", value: { conversationIds: ["x"], all: true } },
  { case: "unsubscribe", value: { all: true } },
  { case: "markRead", value: { conversationId: "c", readSequence: 2n ** 40n } },
  { case: "setBackground", value: { background: true } },
  { case: "setBackground", value: { background: false } },
  { case: "ping", value: { clientTimeMs: 1_700_000_000_000n } },
  { case: "allocateSequences", value: { conversationId: "g", count: 10000, senderUserId: "bob" } },
  { case: "addMembers", value: { conversationId: "g", userIds: ["a", "b", "ü"] } },
  { case: "removeMembers", value: { conversationId: "g", userIds: ["a"], keepHistory: true } },
  { case: "setMinSequence", value: { conversationId: "g", minSequence: 5n } },
  { case: "getReadCounts", value: { conversationId: "g", fromSequence: 3n, toSequence: 9n } },
  { case: "watchReadCounts", value: { conversationId: "g", fromSequence: 1n, stop: true } },
  { case: "getReaders", value: { conversationId: "g", sequence: 4n, unread: true, limit: 2, afterUserId: "bo" } },
];

test("every ClientMessage the SDK encodes is byte-identical to the generated schema's toBinary", () => {
  for (const [i, body] of BODIES.entries()) {
    const ours = encodeClient(i + 1, body);
    const ref = toBinary(ClientMessageSchema, create(ClientMessageSchema, { requestId: BigInt(i + 1), body }));
    assert.deepEqual(Buffer.from(ours), Buffer.from(ref), body.case);
  }
});

test("decodeUpdate reads what the generated schema writes (values, token, full, removed)", () => {
  const conversations = {
    "dm-ü-1": { maxSequence: 2n ** 52n, readSequence: 7n, minSequence: 3n, maxSequenceTimeMs: 1_700_000_000_123n },
    plain: { maxSequence: 5n },
    [`long-${"x".repeat(100)}`]: { readSequence: 300n },
    frozen: { maxSequence: 9n, membership: 2 }, // left with keep_history
    rejoined: { readSequence: 9n, membership: 1 },
  };
  const msg = create(ServerMessageSchema, {
    requestId: 0n,
    body: { case: "update", value: { conversations, syncToken: new Uint8Array([9, 8, 7]), full: true, removed: ["gone", "é"] } },
  });
  const bytes = toBinary(ServerMessageSchema, msg);
  const split = splitServerMessage(bytes);
  assert.equal(split.requestId, 0);
  assert.equal(split.field, 3);
  const u = decodeUpdate(split.body);
  assert.equal(u.full, true);
  assert.deepEqual([...u.syncToken], [9, 8, 7]);
  assert.deepEqual(u.removed, ["gone", "é"]);
  const ref = fromBinary(ServerMessageSchema, bytes).body.value.conversations;
  assert.equal(u.conversations.size, Object.keys(ref).length);
  for (const [id, c] of Object.entries(ref)) {
    assert.deepEqual(u.conversations.get(id), {
      max: Number(c.maxSequence), read: Number(c.readSequence), min: Number(c.minSequence), timeMs: Number(c.maxSequenceTimeMs),
      membership: c.membership,
    }, id);
  }
});

test("unread follows docs/protocol.md#unread: cleared history is never unread, never negative", () => {
  assert.equal(unreadOf(10, 4, 0), 6);
  assert.equal(unreadOf(10, 4, 8), 3); // messages 8..10 readable, none read
  assert.equal(unreadOf(10, 9, 8), 1);
  assert.equal(unreadOf(10, 0, 1), 10); // min 1 = nothing cleared
  assert.equal(unreadOf(10, 10, 11), 0); // everything cleared
  assert.equal(unreadOf(3, 5, 0), 0);
});

function seeded(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test("backoff: full jitter under a ceiling that doubles up to the cap, reset after a stable link", () => {
  const b = new Backoff({ baseMs: 100, capMs: 1000, stableAfterMs: 5000, random: seeded(1) });
  const ceilings = [];
  const delays = [];
  for (let i = 0; i < 8; i++) {
    ceilings.push(b.ceiling());
    delays.push(b.nextDelay());
  }
  assert.deepEqual(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
  delays.forEach((d, i) => assert.ok(d >= 0 && d <= ceilings[i], `delay ${d} within [0, ${ceilings[i]}]`));
  assert.ok(new Set(delays.map((d) => Math.round(d))).size > 4, "jitter spreads the delays");
  // a link that was up for less than stableAfterMs keeps counting
  b.connected(0);
  b.disconnected(4999);
  assert.equal(b.ceiling(), 1000);
  b.connected(0);
  b.disconnected(5000);
  assert.equal(b.ceiling(), 100);
  // GoAway: never less than asked, at most 25 % more
  for (let i = 0; i < 50; i++) {
    const d = b.goawayDelay(800);
    assert.ok(d >= 800 && d <= 1000, String(d));
  }
  // full jitter over many draws covers the whole range, not only the top
  const c = new Backoff({ baseMs: 1000, capMs: 1000, random: seeded(7) });
  const draws = Array.from({ length: 400 }, () => c.nextDelay());
  assert.ok(Math.min(...draws) < 100 && Math.max(...draws) > 900);
});

test("ReadCounts and Readers decode as the generated schema writes them", () => {
  const rc = toBinary(ServerMessageSchema, create(ServerMessageSchema, {
    body: { case: "readCounts", value: { conversationId: "g", fromSequence: 7n, memberCount: 300, counts: [300, 200, 1, 0] } },
  }));
  const a = splitServerMessage(rc);
  assert.equal(a.field, 9);
  assert.deepEqual(decodeReadCounts(a.body), { conversationId: "g", fromSequence: 7, memberCount: 300, counts: [300, 200, 1, 0] });
  const rd = toBinary(ServerMessageSchema, create(ServerMessageSchema, {
    requestId: 5n, body: { case: "readers", value: { userIds: ["a", "ü"], nextAfterUserId: "ü" } },
  }));
  const b = splitServerMessage(rd);
  assert.deepEqual([b.requestId, b.field], [5, 10]);
  assert.deepEqual(decodeReaders(b.body), { userIds: ["a", "ü"], nextAfterUserId: "ü" });
});
