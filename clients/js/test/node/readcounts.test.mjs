// Group read counts (docs/protocol.md, "Group read counts") against a real `seqactor serve`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, Forbidden, NotFound, ServiceClient } from "../../dist/node.js";
import { GUARD_MS, Server } from "../helpers.mjs";

let server, svc;
before(async () => {
  server = await new Server().start();
  svc = await ServiceClient.connect(server.url, server.token("backend", "service"));
  await svc.addMembers("grp", ["ana", "ben", "cat", "dan"]);
  await svc.allocate("grp", 5, "ben"); // ben has read 1..5 (I6)
});
after(async () => {
  await svc?.close();
  await server?.stop();
});

const collect = async (gen) => {
  const pages = [];
  for await (const page of gen) pages.push(page);
  return pages;
};

test("readCounts and readers (paged, read and unread) for a member and for the service", async () => {
  const ana = await Client.connect(server.url, server.token("ana"));
  const cat = await Client.connect(server.url, server.token("cat"));
  try {
    await cat.markRead("grp", 3);
    const rc = await ana.readCounts("grp");
    assert.equal(rc.memberCount, 4);
    assert.equal(rc.fromSequence, 1);
    assert.equal(rc.toSequence, 5);
    assert.deepEqual([...rc.counts], [2, 2, 2, 1, 1]); // ben read all; cat up to 3
    assert.equal(rc.count(4), 1);
    assert.equal(rc.count(6), null);
    const part = await svc.readCounts("grp", 3, 4);
    assert.deepEqual([part.fromSequence, [...part.counts]], [3, [2, 1]]);
    assert.deepEqual(await collect(ana.readers("grp", 3, { pageSize: 1 })), [["ben"], ["cat"]]);
    assert.deepEqual(await collect(svc.readers("grp", 3, { unread: true })), [["ana", "dan"]]);
    await assert.rejects(ana.readCounts("not-mine"), Forbidden);
    await assert.rejects(svc.readCounts("no-such-conversation"), NotFound);
  } finally {
    await ana.close();
    await cat.close();
  }
});

test("watchReadCounts: the current counts first, then an update when a member reads", { timeout: GUARD_MS }, async () => {
  const ana = await Client.connect(server.url, server.token("ana"));
  const dan = await Client.connect(server.url, server.token("dan"));
  try {
    const watch = await ana.watchReadCounts("grp");
    const first = (await watch.next()).value;
    assert.equal(first.memberCount, 4);
    const before = first.count(5);
    await dan.markRead("grp", 5);
    let update = (await watch.next()).value;
    while (update.count(5) === before) update = (await watch.next()).value; // latest wins
    assert.equal(update.count(5), before + 1);
    await watch.close();
    assert.equal((await watch.next()).done, true);
  } finally {
    await ana.close();
    await dan.close();
  }
});
