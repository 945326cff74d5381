// Test helpers: a real `seqactor serve` child process, JWTs signed with its secret, and
// waiting on observable client state (events), never on sleeps.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = fileURLToPath(new URL("../../..", import.meta.url));
export const SEQACTOR_BIN = process.env.SEQACTOR_BIN ?? (existsSync(join(REPO, ".venv/bin/seqactor")) ? join(REPO, ".venv/bin/seqactor") : "seqactor");
/** a guard against hangs, not a timing expectation */
export const GUARD_MS = Number(process.env.SEQACTOR_TEST_GUARD_MS ?? 20_000);

export function tempDir(prefix = "seqactor-js-") {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** A JWT HS256 as `seqactor token` makes it (docs/protocol.md#authentication-and-sessions). */
export function mintToken(secret, user, { role = "user", ttlS = 3600 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: user, exp: now + ttlS, iat: now };
  if (role !== "user") claims.role = role;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A `seqactor serve` child. `store`: memory:// or sqlite:///abs/path. */
export class Server {
  constructor({ store = "memory://", dir = tempDir(), args = [] } = {}) {
    this.store = store;
    this.dir = dir;
    this.args = args;
    this.secretFile = join(dir, "secret");
    if (!existsSync(this.secretFile)) writeFileSync(this.secretFile, "js-test-secret-0123456789abcdef0123456789\n", { mode: 0o600 });
    this.secret = readFileSync(this.secretFile, "utf8").trim();
    this.port = 0;
    this.proc = null;
  }

  async start() {
    const proc = spawn(SEQACTOR_BIN, ["serve", "--host", "127.0.0.1", "--port", String(this.port), "--store", this.store, "--secret-file", this.secretFile, ...this.args], { stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    let err = "";
    proc.stderr.on("data", (d) => (err += d));
    this.url = await new Promise((resolve, reject) => {
      let out = "";
      const guard = setTimeout(() => reject(new Error(`server did not start: ${err}`)), GUARD_MS);
      proc.stdout.on("data", (d) => {
        out += d;
        const m = /listening on (ws:\/\/\S+)/.exec(out);
        if (m) {
          clearTimeout(guard);
          resolve(m[1]);
        }
      });
      proc.on("exit", (code) => reject(new Error(`server exited ${code}: ${err}`)));
    });
    this.port = Number(new URL(this.url).port);
    return this;
  }

  /** SIGTERM: the server sends GoAway to every session, closes 1001 and exits. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGTERM");
    await exited;
    this.proc = null;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  token(user, role = "user") {
    return mintToken(this.secret, user, { role });
  }
}

/** Wait until `check()` is true, re-checking on the targets' events. */
export function until(check, targets, what = "condition") {
  return new Promise((resolve, reject) => {
    const list = Array.isArray(targets) ? targets : [targets];
    const names = ["change", "state", "sync", "error"];
    const done = (ok, err) => {
      clearTimeout(guard);
      for (const t of list) for (const n of names) t.removeEventListener(n, probe);
      ok ? resolve() : reject(err);
    };
    const probe = () => {
      try {
        if (check()) done(true);
      } catch (e) {
        done(false, e);
      }
    };
    const guard = setTimeout(() => done(false, new Error(`timed out waiting for ${what}`)), GUARD_MS);
    for (const t of list) for (const n of names) t.addEventListener(n, probe);
    probe();
  });
}

/** Plain view {id: {max, read, min, unread, frozen?}} for comparisons (`frozen: true` only on
 * frozen rows, as tests/scenarios/*.json write it). */
export function plainView(client) {
  const out = {};
  for (const [id, c] of client.view) {
    out[id] = { max: c.maxSequence, read: c.readSequence, min: c.minSequence, unread: c.unread };
    if (c.frozen) out[id].frozen = true;
  }
  return out;
}
