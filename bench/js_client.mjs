// JS SDK benchmark: decode of a 10 000-conversation snapshot in Node and in Chromium (the
// SDK's decoder against @bufbuild/protobuf's generic fromBinary with the generated schema,
// same bytes, same run), apply of a 1 % delta to a 10k view in Chromium, and the min+gz size
// of the browser bundle. The snapshot and delta are real reply frames of a `seqactor serve`.
// Writes bench/results/js.json; prints a table. `make bench-js` (or node bench/js_client.mjs
// after `npm ci && npm run build` in clients/js). --quick: fewer repetitions.
import { readFileSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createRequire } from "node:module";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const JS = join(REPO, "clients/js");
const need = (p) => import(pathToFileURL(join(JS, p)).href);
const require = createRequire(join(JS, "package.json"));
const { build } = require("esbuild");
const { chromium } = require("playwright-core");
const { fromBinary, toBinary, create } = await import(pathToFileURL(require.resolve("@bufbuild/protobuf")).href);
const { ServerMessageSchema, ClientMessageSchema } = await need("dist/gen/seqactor/v1/seqactor_pb.js");
const sdk = await need("dist/node.js");
const { Server, tempDir } = await need("test/helpers.mjs");
const { CHROMIUM, CHROMIUM_ARGS } = await import(pathToFileURL(join(JS, "test/browser/chromium.mjs")).href);

const QUICK = process.argv.includes("--quick");
const N_CONV = 10_000;
const DELTA_FRACTION = 0.01;
const REPS = QUICK ? 16 : 60; // even: two blocks each
const WARMUP = QUICK ? 5 : 20;
const GOAL_SNAPSHOT_CHROMIUM_MS = 10;
const GOAL_BUNDLE_BYTES = 25 * 1024;

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const progress = (m) => process.stderr.write(`  ${m}\n`);

// ------------------------------------------------------------------ real frames from a server
async function frames() {
  const server = await new Server().start();
  try {
    const svc = await sdk.ServiceClient.connect(server.url, server.token("bench", "service"));
    progress(`adding ${N_CONV} conversations to one user's view`);
    const ids = Array.from({ length: N_CONV }, (_, i) => `conversation-${String(i).padStart(5, "0")}`);
    const BATCH = 500;
    for (let i = 0; i < N_CONV; i += BATCH) {
      const part = ids.slice(i, i + BATCH);
      await Promise.all(part.map((id) => svc.addMembers(id, ["reader", "peer"])));
      await Promise.all(part.map((id, j) => svc.allocate(id, 1 + ((i + j) * 7919) % 200, "peer")));
    }
    // the raw frames, captured with a plain WebSocket (the bytes the SDK gets)
    const WebSocket = require("ws");
    const raw = async (since) => {
      const ws = new WebSocket(server.url);
      await new Promise((r, j) => { ws.once("open", r); ws.once("error", j); });
      const replies = [];
      const next = () => new Promise((r) => ws.once("message", (d) => r(new Uint8Array(d))));
      const send = (id, body) => ws.send(toBinary(ClientMessageSchema, create(ClientMessageSchema, { requestId: BigInt(id), body })));
      send(1, { case: "hello", value: { token: server.token("reader") } });
      replies.push(await next());
      send(2, { case: "getSequences", value: { since } });
      replies.push(await next());
      ws.close();
      return replies[1];
    };
    const snapshot = await raw(new Uint8Array(0));
    const token = fromBinary(ServerMessageSchema, snapshot).body.value.syncToken;
    const changed = ids.filter((_, i) => i % Math.round(1 / DELTA_FRACTION) === 0);
    await Promise.all(changed.map((id) => svc.allocate(id, 1, "peer")));
    const delta = await raw(token);
    await svc.close();
    return { snapshot, delta, changed: changed.length };
  } finally {
    await server.stop();
  }
}

// ------------------------------------------------------------------ Node
function samples(fn, n) {
  for (let i = 0; i < WARMUP; i++) fn();
  const ms = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    fn();
    ms.push(performance.now() - t);
  }
  return ms;
}

function timeAlternating(a, b) {
  const sa = [], sb = [];
  for (let round = 0; round < 2; round++) {
    sa.push(...samples(a, REPS / 2));
    sb.push(...samples(b, REPS / 2));
  }
  return [median(sa), median(sb)];
}

// ------------------------------------------------------------------ Chromium
async function inChromium(snapshot, delta) {
  const dir = tempDir("seqactor-bench-");
  const entry = join(dir, "entry.mjs");
  writeFileSync(entry, `
    export { decodeUpdate, splitServerMessage, applyUpdate } from ${JSON.stringify(join(JS, "dist/index.js"))};
    export { fromBinary } from "@bufbuild/protobuf";
    export { ServerMessageSchema } from ${JSON.stringify(join(JS, "dist/gen/seqactor/v1/seqactor_pb.js"))};
  `);
  const out = await build({ entryPoints: [entry], bundle: true, format: "iife", globalName: "B", minify: true, write: false, nodePaths: [join(JS, "node_modules")], platform: "browser" });
  const profile = tempDir("seqactor-chromium-");
  const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    await page.setContent("<!doctype html><title>bench</title>");
    await page.addScriptTag({ content: out.outputFiles[0].text });
    return await page.evaluate(({ snap, del, reps, warmup }) => {
      const snapshot = new Uint8Array(snap);
      const delta = new Uint8Array(del);
      const med = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
      // performance.now() is coarse in a page (100 µs): each sample runs `inner` calls
      const blockSamples = (fn, n, setup = () => undefined, inner = 5) => {
        for (let i = 0; i < warmup; i++) fn(setup());
        const ms = [];
        for (let i = 0; i < n; i++) {
          const args = Array.from({ length: inner }, setup);
          const t = performance.now();
          for (const a of args) fn(a);
          ms.push((performance.now() - t) / inner);
        }
        return ms;
      };
      const time = (fn, setup, inner) => med(blockSamples(fn, reps, setup, inner));
      // blocks A B A B: each decoder pays for its own garbage, both see the same load drift
      const alternating = (a, b) => {
        const sa = [], sb = [];
        for (let round = 0; round < 2; round++) {
          sa.push(...blockSamples(a, reps / 2));
          sb.push(...blockSamples(b, reps / 2));
        }
        return [med(sa), med(sb)];
      };
      const sdkDecode = () => B.decodeUpdate(B.splitServerMessage(snapshot).body);
      const generic = () => B.fromBinary(B.ServerMessageSchema, snapshot);
      const snapshotApply = () => { const u = sdkDecode(); const view = new Map(); B.applyUpdate(view, u.conversations, u.full, u.removed); return view; };
      const base = snapshotApply();
      const deltaApply = (view) => { const u = B.decodeUpdate(B.splitServerMessage(delta).body); B.applyUpdate(view, u.conversations, u.full, u.removed); };
      const [sdkMs, genericMs] = alternating(sdkDecode, generic);
      return {
        sdk: sdkMs,
        generic: genericMs,
        snapshotApply: time(snapshotApply),
        delta: time(deltaApply, () => new Map(base), 50),
        entries: sdkDecode().conversations.size,
        changed: (() => { const v = new Map(base); const u = B.decodeUpdate(B.splitServerMessage(delta).body); return B.applyUpdate(v, u.conversations, u.full, u.removed).size; })(),
        ua: navigator.userAgent,
      };
    }, { snap: [...snapshot], del: [...delta], reps: REPS, warmup: WARMUP });
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ run
progress("real snapshot and delta frames from seqactor serve");
const { snapshot, delta, changed } = await frames();
progress("Node");
// blocks A B A B: each decoder pays for its own garbage, and both see the same load drift
const [nodeSdk, nodeGeneric] = timeAlternating(
  () => sdk.decodeUpdate(sdk.splitServerMessage(snapshot).body),
  () => fromBinary(ServerMessageSchema, snapshot),
);
progress("Chromium");
const chrome = await inChromium(snapshot, delta);
const bundle = readFileSync(join(JS, "dist/seqactor.min.js"));
const gz = gzipSync(bundle, { level: 9 }).length;

const r2 = (x) => Math.round(x * 1000) / 1000;
const results = {
  snapshot_10k_decode_ms_node: r2(nodeSdk),
  generic_snapshot_10k_decode_ms_node: r2(nodeGeneric),
  snapshot_10k_decode_ms_chromium: r2(chrome.sdk),
  generic_snapshot_10k_decode_ms_chromium: r2(chrome.generic),
  generic_over_sdk_chromium: Math.round((chrome.generic / chrome.sdk) * 10) / 10,
  generic_over_sdk_node: Math.round((nodeGeneric / nodeSdk) * 10) / 10,
  snapshot_10k_decode_apply_ms_chromium: r2(chrome.snapshotApply),
  delta_1pct_apply_ms_chromium: r2(chrome.delta),
  bundle_min_bytes: bundle.length,
  bundle_min_gz_bytes: gz,
  snapshot_10k_bytes: snapshot.length,
  delta_1pct_bytes: delta.length,
  delta_1pct_conversations: changed,
  chromium: /Chrome\/[\d.]+/.exec(chrome.ua)?.[0] ?? chrome.ua,
  node: process.version,
  reps: REPS,
};
mkdirSync(join(REPO, "bench/results"), { recursive: true });
writeFileSync(join(REPO, "bench/results/js.json"), JSON.stringify(results, null, 2) + "\n");

const rows = [
  ["snapshot 10k decode, Node (SDK)", `${results.snapshot_10k_decode_ms_node} ms`, `generic fromBinary ${results.generic_snapshot_10k_decode_ms_node} ms (${results.generic_over_sdk_node}x)`],
  ["snapshot 10k decode, Chromium (SDK)", `${results.snapshot_10k_decode_ms_chromium} ms`, `goal <= ${GOAL_SNAPSHOT_CHROMIUM_MS} ms: ${chrome.sdk <= GOAL_SNAPSHOT_CHROMIUM_MS ? "met" : "NOT met"}`],
  ["snapshot 10k decode, Chromium (generic)", `${results.generic_snapshot_10k_decode_ms_chromium} ms`, `SDK is ${results.generic_over_sdk_chromium}x faster`],
  ["snapshot 10k decode + apply, Chromium", `${results.snapshot_10k_decode_apply_ms_chromium} ms`, ""],
  ["delta 1 % (100 conv.) decode + apply, Chromium", `${results.delta_1pct_apply_ms_chromium} ms`, `${chrome.changed} conversations changed`],
  ["browser bundle min+gz", `${gz} B`, `goal <= ${GOAL_BUNDLE_BYTES} B: ${gz <= GOAL_BUNDLE_BYTES ? "met" : "NOT met"} (min ${bundle.length} B)`],
  ["snapshot / delta frame", `${snapshot.length} B / ${delta.length} B`, ""],
];
const w = [Math.max(...rows.map((r) => r[0].length)), Math.max(...rows.map((r) => r[1].length))];
console.log(`JS SDK (${results.node}, ${results.chromium}, median of ${REPS})`);
for (const [a, b, c] of rows) console.log(`  ${a.padEnd(w[0])}  ${b.padStart(w[1])}  ${c}`);
console.log("wrote bench/results/js.json");
