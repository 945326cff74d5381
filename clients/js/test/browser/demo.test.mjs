// The demo page in real Chromium (playwright-core driving Debian's /usr/bin/chromium, headless)
// against `seqactor demo`: live badges and title, visibility → SetBackground, reload → delta.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { ServiceClient } from "../../dist/node.js";
import { CHROMIUM, CHROMIUM_ARGS } from "./chromium.mjs";
import { GUARD_MS, REPO, SEQACTOR_BIN, mintToken, tempDir } from "../helpers.mjs";

const OUT = join(REPO, "clients/js/test-results");

let demo, context, page, svc, secret, wsUrl, pageUrl, profile;

before(async () => {
  const dir = tempDir();
  const secretFile = join(dir, "secret");
  demo = spawn(SEQACTOR_BIN, ["demo", "--host", "127.0.0.1", "--port", "0", "--rate", "0", "--users", "4", "--groups", "2", "--seed", "3", "--secret-file", secretFile], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  demo.stderr.on("data", (d) => (err += d));
  pageUrl = await new Promise((resolve, reject) => {
    let out = "";
    const guard = setTimeout(() => reject(new Error(`demo did not print its page: ${out} ${err}`)), GUARD_MS);
    demo.stdout.on("data", (d) => {
      out += d;
      const m = /web page[^:]*: (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(guard);
        resolve(m[1]);
      }
    });
    demo.on("exit", (code) => reject(new Error(`demo exited ${code}: ${err}`)));
  });
  wsUrl = decodeURIComponent(/#url=([^&]+)/.exec(pageUrl)[1]);
  secret = readFileSync(secretFile, "utf8").trim();
  svc = await ServiceClient.connect(wsUrl, mintToken(secret, "browser-test", { role: "service" }));
  profile = tempDir("seqactor-chromium-"); // a fresh profile: no state from earlier runs
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport: { width: 520, height: 470 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.seqDemo?.client?.connected, null, { timeout: GUARD_MS });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await svc?.close();
  if (demo && demo.exitCode === null) {
    const exited = new Promise((r) => demo.once("exit", r));
    demo.kill("SIGINT");
    await exited;
  }
});

const state = () =>
  page.evaluate(() => {
    const c = window.seqDemo.client;
    const badges = {};
    for (const li of document.querySelectorAll("#list li")) {
      const b = li.querySelector(".badge");
      badges[li.dataset.id] = b.hidden ? 0 : Number(b.textContent);
    }
    return {
      title: document.title, total: c.totalUnread, pushes: c.stats.pushes, badges,
      order: [...document.querySelectorAll("#list li")].map((li) => li.dataset.id),
      max: Object.fromEntries([...c.view].map(([id, v]) => [id, v.maxSequence])),
      lastSync: c.lastSync, background: c.serverBackground, dot: document.getElementById("dot").className,
    };
  });

test("a service-side allocate updates the badge, the title and the order; a click marks read", async () => {
  const before = await state();
  assert.equal(before.dot, "online");
  assert.ok(before.order.includes("dm-user1-user3"));
  await svc.allocate("dm-user1-user3", 3, "user3");
  await svc.allocate("group-1", 2, "user2");
  const total = before.total + 5;
  await page.waitForFunction((t) => document.title === `(${t}) seqactor demo`, total, { timeout: GUARD_MS });
  const s = await state();
  assert.equal(s.badges["group-1"], before.badges["group-1"] + 2);
  assert.equal(s.badges["dm-user1-user3"], before.badges["dm-user1-user3"] + 3);
  assert.equal(s.order[0], "group-1", "newest activity first");
  mkdirSync(OUT, { recursive: true });
  await page.screenshot({ path: join(OUT, "demo.png") });
  if (process.env.UPDATE_SCREENSHOT) copyFileSync(join(OUT, "demo.png"), join(REPO, "docs/img/js-demo.png"));
  await page.click('li[data-id="dm-user1-user3"]');
  await page.waitForFunction(
    () => !document.querySelector('li[data-id="dm-user1-user3"] .badge')?.textContent || document.querySelector('li[data-id="dm-user1-user3"] .badge').hidden,
    null, { timeout: GUARD_MS },
  );
  const after = await state();
  assert.equal(after.total, total - s.badges["dm-user1-user3"]);
  assert.equal(after.title, after.total ? `(${after.total}) seqactor demo` : "seqactor demo");
});

test("a hidden page sends SetBackground(true): no pushes until visible, then one flush", async () => {
  const setVisibility = (hidden) =>
    page.evaluate((h) => {
      Object.defineProperty(document, "visibilityState", { value: h ? "hidden" : "visible", configurable: true });
      Object.defineProperty(document, "hidden", { value: h, configurable: true });
      document.dispatchEvent(new Event("visibilitychange"));
    }, hidden);
  await setVisibility(true);
  await page.waitForFunction(() => window.seqDemo.client.serverBackground === true, null, { timeout: GUARD_MS });
  const before = await state();
  await svc.allocate("group-2", 1, "user2");
  await svc.allocate("dm-user1-user2", 2, "user2");
  await svc.allocate("group-2", 1, "user2");
  await page.evaluate(() => window.seqDemo.client.roundTrip()); // after the allocations: a push would have come first
  const held = await state();
  assert.equal(held.pushes, before.pushes);
  assert.deepEqual(held.max, before.max);
  await setVisibility(false);
  const want = { g: before.max["group-2"] + 2, d: before.max["dm-user1-user2"] + 2 };
  await page.waitForFunction(
    (w) => {
      const c = window.seqDemo.client;
      return c.get("group-2").maxSequence === w.g && c.get("dm-user1-user2").maxSequence === w.d;
    }, want, { timeout: GUARD_MS },
  );
  assert.equal((await state()).pushes, before.pushes + 1, "one flush");
});

test("a reload resumes from IndexedDB with a delta, not a snapshot", async () => {
  await page.waitForFunction(() => {
    const c = window.seqDemo.client;
    return c.stats.cacheSaves > 0 && !c.cacheDirty;
  }, null, { timeout: GUARD_MS });
  const before = await state();
  await page.reload();
  await page.waitForFunction(() => window.seqDemo?.client?.connected, null, { timeout: GUARD_MS });
  const s = await state();
  assert.equal(s.lastSync.sinceToken, true);
  assert.equal(s.lastSync.full, false);
  assert.equal(s.lastSync.conversations, 0);
  assert.deepEqual(s.max, before.max);
  assert.equal(s.title, before.title);
});
