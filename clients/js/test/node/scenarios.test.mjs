// The cross-language scenarios (tests/scenarios/*.json), run with the TypeScript SDK against
// a real `seqactor serve`. tests/test_scenarios.py runs the same files with the Python SDK.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Client, ErrorCode, MemoryCache, ServerError, ServiceClient } from "../../dist/node.js";
import { REPO, Server, plainView, tempDir, until } from "../helpers.mjs";

const DIR = join(REPO, "tests/scenarios");
const BACKOFF = { baseMs: 5, capMs: 50 }; // reconnects in tests need not wait long

async function run(scenario) {
  const dir = tempDir();
  const store = scenario.store === "sqlite" ? `sqlite:///${join(dir, "db.sqlite")}` : "memory://";
  const server = await new Server({ store, dir }).start();
  const svc = await ServiceClient.connect(server.url, server.token("backend", "service"), { backoff: BACKOFF });
  const clients = new Map();
  const open = async (name) => {
    const c = clients.get(name);
    c.client = await Client.connect(server.url, server.token(c.user), {
      deviceId: c.device, subscribeAll: c.subscribeAll, cache: c.cache, backoff: BACKOFF,
    });
  };
  const client = (name) => clients.get(name).client;
  try {
    for (const [i, step] of scenario.steps.entries()) {
      const where = `${scenario.name} step ${i + 1} (${step.do})`;
      switch (step.do) {
        case "add_members":
          await svc.addMembers(step.conversation, step.users);
          break;
        case "remove_members":
          await svc.removeMembers(step.conversation, step.users, step.keep_history ?? false);
          break;
        case "allocate": {
          const a = await svc.allocate(step.conversation, step.count ?? 1, step.sender ?? "");
          if (step.expect) assert.deepEqual({ first: a.firstSequence, last: a.lastSequence }, step.expect, where);
          break;
        }
        case "set_min":
          await svc.setMinSequence(step.conversation, step.min);
          break;
        case "connect":
          clients.set(step.client, { user: step.user, device: step.device ?? "", subscribeAll: step.subscribe_all ?? true, cache: new MemoryCache() });
          await open(step.client);
          break;
        case "mark_read":
          assert.equal(await client(step.client).markRead(step.conversation, step.seq), step.expect, where);
          break;
        case "background":
          await client(step.client).setBackground(step.on);
          break;
        case "fetch": {
          const got = await client(step.client).fetch(step.conversations);
          assert.deepEqual([...got.keys()].sort(), [...step.expect].sort(), where);
          break;
        }
        case "subscribe":
          await client(step.client).subscribe(step.conversations);
          break;
        case "read_counts": {
          const who = step.client === "service" ? svc : client(step.client);
          const rc = await who.readCounts(step.conversation, step.from ?? 0, step.to ?? 0);
          assert.deepEqual({ from: rc.fromSequence, members: rc.memberCount, counts: [...rc.counts] }, step.expect, where);
          break;
        }
        case "readers": {
          const who = step.client === "service" ? svc : client(step.client);
          const pages = [];
          for await (const page of who.readers(step.conversation, step.sequence, { unread: step.unread ?? false, pageSize: step.page_size })) pages.push(page);
          assert.deepEqual(pages, step.expect, where);
          break;
        }
        case "go_offline":
          await client(step.client).close();
          break;
        case "come_online":
          await open(step.client);
          break;
        case "drop": {
          const c = client(step.client);
          const n = c.stats.connects;
          c.dropConnection();
          await until(() => c.stats.connects > n && c.connected, c, `${where}: reconnect`);
          break;
        }
        case "restart_server":
          await server.restart();
          break;
        case "expect_view": {
          const c = client(step.client);
          const matches = () => {
            try {
              assert.deepEqual(plainView(c), step.view);
              return step.total_unread === undefined || c.totalUnread === step.total_unread;
            } catch {
              return false;
            }
          };
          await until(() => c.connected && matches(), c, where).catch(() => undefined);
          assert.deepEqual(plainView(c), step.view, where);
          if (step.total_unread !== undefined) assert.equal(c.totalUnread, step.total_unread, where);
          break;
        }
        case "expect_sync": {
          const c = client(step.client);
          await until(() => c.connected, c, where);
          const s = c.lastSync;
          assert.equal(s.full, step.full, where);
          if (step.conversations !== undefined) assert.equal(s.conversations, step.conversations, where);
          if (step.removed !== undefined) assert.equal(s.removed, step.removed, where);
          break;
        }
        case "expect_error": {
          const c = client(step.client);
          const call = step.op === "mark_read" ? c.markRead(step.conversation, 1) : c.subscribe([step.conversation]);
          await assert.rejects(call, (e) => e instanceof ServerError && e.code === ErrorCode[step.error], where);
          break;
        }
        default:
          throw new Error(`${where}: unknown step`);
      }
    }
  } finally {
    for (const c of clients.values()) await c.client?.close();
    await svc.close();
    await server.stop();
  }
}

for (const file of readdirSync(DIR).filter((f) => f.endsWith(".json")).sort()) {
  const scenario = JSON.parse(readFileSync(join(DIR, file), "utf8"));
  test(`scenario ${scenario.name}: ${scenario.about}`, () => run(scenario));
}
