/** Connection machinery shared by {@link Client} and {@link ServiceClient}.
 *
 * One endpoint owns a reconnect loop. Each pass opens a WebSocket, sends `Hello`, waits for
 * `Welcome` and then runs the *link*: replies are matched by request id, pushes are handled
 * in arrival order, a heartbeat sends `Ping` only after the heartbeat interval without
 * anything sent, and the subclass's `onOpen` re-subscribes and resumes. When the link ends
 * the loop waits (GoAway delay, or backoff with full jitter) and tries again. Close 4001
 * (authentication) and 4009 (session replaced) stop the loop; the error is surfaced. */

import { Backoff, type BackoffOptions } from "./backoff.js";
import {
  AuthenticationError,
  ClientClosed,
  CloseCode,
  ConnectError,
  ConnectionLost,
  DecodeError,
  ErrorCode,
  SeqactorError,
  ServerError,
  SessionReplaced,
  serverError,
} from "./errors.js";
import {
  F_ERROR, F_GOAWAY, F_READERS, F_READ_COUNTS, F_UPDATE, F_WELCOME, type ClientBody, type Welcome,
  decodeError, decodeGoAway, decodeReadCounts, decodeReaders, decodeWelcome, encodeClient, splitServerMessage,
} from "./wire.js";
import { READERS_PAGE_SIZE, ReadCounts, expectField } from "./readcounts.js";

export const CONNECT_TIMEOUT_MS = 10_000;
export const DEFAULT_HEARTBEAT_MS = 25_000; // until the server's Welcome says otherwise
export const BACKGROUND_PING_FACTOR = 4; // in background the server's idle timeout is 4x
export const DEAD_AFTER_FACTOR = 2.5; // nothing received for 2.5 x the ping interval: dead
export const SDK_VERSION = "0.1.0";

const WS_OPEN = 1;

/** The part of the standard WebSocket API the SDK uses (browsers' `WebSocket` and the `ws`
 * package both provide it). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

let defaultWebSocket: WebSocketConstructor | undefined;

/** Set the WebSocket class used when no `WebSocket` option is given (`@seqactor/client/node`
 * sets the `ws` package's). */
export function setDefaultWebSocket(ctor: WebSocketConstructor): void {
  defaultWebSocket = ctor;
}

export type TokenSource = string | (() => string | Promise<string>);

export interface EndpointOptions {
  /** one session per (user, device): a newer one replaces the older (close 4009) */
  deviceId?: string;
  platform?: string;
  clientVersion?: string;
  connectTimeoutMs?: number;
  backoff?: Backoff | BackoffOptions;
  /** the WebSocket class (default: `globalThis.WebSocket`, or `ws` via `@seqactor/client/node`) */
  WebSocket?: WebSocketConstructor;
  /** resolve `connect()` at once and keep trying in the background (default: the first
   * connection must succeed, else `ConnectError` / `AuthenticationError`) */
  offlineOk?: boolean;
}

/** Counters (wire bytes: WebSocket payload + frame header, as seen by the SDK). */
export interface ClientStats {
  connects: number;
  attempts: number;
  framesIn: number;
  framesOut: number;
  bytesIn: number;
  bytesOut: number;
  pingsSent: number;
  pushes: number;
  goaways: number;
  cacheSaves: number;
}

export type ConnectionState = "connecting" | "syncing" | "online" | "offline" | "closed";

export type { ClientBody };

export interface Reply {
  field: number;
  body: Uint8Array;
  size: number;
}

export function wsHeaderLen(n: number, masked = false): number {
  return (n < 126 ? 2 : n < 65536 ? 4 : 10) + (masked ? 4 : 0);
}

const now = (): number => performance.now();

/** The WebSocket closed (code and reason of the close frame; 1006 when none). */
export class Closed extends Error {
  constructor(readonly code: number, readonly reason: string) {
    super(`connection closed (${code}${reason ? " " + reason : ""})`);
  }
}

/** @internal one request waiting for its reply */
export class Waiter {
  readonly promise: Promise<Reply>;
  sentAt = 0;
  private resolveFn!: (r: Reply) => void;
  private rejectFn!: (e: unknown) => void;
  private settled = false;

  constructor(readonly kind: string, readonly meta: unknown) {
    this.promise = new Promise<Reply>((resolve, reject) => {
      this.resolveFn = resolve;
      this.rejectFn = reject;
    });
    this.promise.catch(() => undefined); // a failed waiter nobody awaits is not an error
  }

  resolve(field: number, body: Uint8Array, size: number): void {
    if (this.settled) return;
    this.settled = true;
    if (field === F_ERROR) {
      const err = decodeError(body);
      this.rejectFn(serverError(err.code, err.message));
    } else this.resolveFn({ field, body, size });
  }

  fail(err: unknown): void {
    if (this.settled) return;
    this.settled = true;
    this.rejectFn(err);
  }
}

/** @internal one authenticated WebSocket connection */
export class Link {
  readonly waiters = new Map<number, Waiter>();
  ready = false; // Client: resumed and synced
  alive = true;
  lastRx = now();
  lastTx = now();
  readonly openedAt = now();
  readonly heartbeatMs: number;
  timer: ReturnType<typeof setTimeout> | undefined;
  finish: (err: Error | null) => void = () => undefined;

  constructor(readonly ws: WebSocketLike, readonly welcome: Welcome) {
    this.heartbeatMs = welcome.heartbeatIntervalMs || DEFAULT_HEARTBEAT_MS;
  }
}

function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof Uint8Array) return data; // ws 'nodebuffer' (Buffer) too
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (Array.isArray(data)) {
    // ws fragments ('fragments' binaryType) — not used, but harmless
    const parts = data as Uint8Array[];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let off = 0;
    for (const p of parts) {
      out.set(p, off);
      off += p.length;
    }
    return out;
  }
  return null; // a text frame: not part of the protocol
}

export function describe(err: unknown): string {
  if (err instanceof Error) return err.message || err.name;
  return String(err);
}

/** Reconnecting connection to one seqactor server (base of the public clients). */
export class Endpoint extends EventTarget {
  readonly url: string;
  readonly deviceId: string;
  readonly platform: string;
  readonly clientVersion: string;
  readonly connectTimeoutMs: number;
  readonly backoff: Backoff;
  readonly stats: ClientStats = {
    connects: 0, attempts: 0, framesIn: 0, framesOut: 0, bytesIn: 0, bytesOut: 0,
    pingsSent: 0, pushes: 0, goaways: 0, cacheSaves: 0,
  };
  userId = "";
  role = "";
  /** one line about the last connection failure */
  lastError: string | null = null;
  /** fatal: the loop stopped (AuthenticationError, SessionReplaced, ConnectError) */
  error: SeqactorError | null = null;
  state: ConnectionState = "connecting";

  protected link: Link | null = null;
  protected closing = false;
  protected background = false;
  protected failFirst = true;
  private readonly tokenSource: TokenSource;
  private readonly WS: WebSocketConstructor;
  private ids = 0;
  private waiting: Array<() => void> = [];
  private goawayMs: number | null = null;
  private everConnected = false;
  private authRetryOk = true;
  private wakeSleep: (() => void) | null = null;
  private loop: Promise<void> | null = null;
  private abortConnect: ((err: Error | null) => void) | null = null; // the connection in progress
  private signalClosed: () => void = () => undefined;
  private readonly closedSignal = new Promise<null>((r) => (this.signalClosed = () => r(null)));

  constructor(url: string, token: TokenSource, opts: EndpointOptions = {}) {
    super();
    let u: URL;
    try {
      u = new URL(url);
    } catch {
      throw new ConnectError(`bad URL ${JSON.stringify(url)}: expected ws://host:port/v1 or wss://...`);
    }
    if (u.protocol !== "ws:" && u.protocol !== "wss:") {
      throw new ConnectError(`bad URL ${JSON.stringify(url)}: expected ws://host:port/v1 or wss://...`);
    }
    if (u.pathname === "/" && !url.endsWith("/")) u.pathname = "/v1";
    this.url = u.toString();
    this.tokenSource = token;
    this.deviceId = opts.deviceId ?? "";
    this.platform = opts.platform ?? (typeof document !== "undefined" ? "web" : "node");
    this.clientVersion = opts.clientVersion ?? `seqactor-js/${SDK_VERSION}`;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? CONNECT_TIMEOUT_MS;
    this.backoff = opts.backoff instanceof Backoff ? opts.backoff : new Backoff(opts.backoff);
    const WS = opts.WebSocket ?? defaultWebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new ConnectError("no WebSocket class: pass {WebSocket} or import '@seqactor/client/node'");
    this.WS = WS;
    this.failFirst = !opts.offlineOk;
  }

  /** connected and (for a Client) in sync */
  get connected(): boolean {
    return this.link !== null && this.link.ready;
  }

  // ------------------------------------------------------------------ state
  protected setState(state: ConnectionState): void {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new Event("state"));
  }

  protected notify(): void {
    const w = this.waiting;
    this.waiting = [];
    for (const f of w) f();
  }

  protected readyLink(): Link | null {
    const l = this.link;
    return l !== null && l.ready && l.alive ? l : null;
  }

  protected async waitLink(): Promise<Link> {
    for (;;) {
      if (this.error) throw this.error;
      if (this.closing) throw new ClientClosed("client closed");
      const link = this.readyLink();
      if (link) return link;
      await new Promise<void>((r) => this.waiting.push(r));
    }
  }

  // ------------------------------------------------------------------ requests
  private send(link: Link, data: Uint8Array): void {
    if (!link.alive || link.ws.readyState !== WS_OPEN) throw new ConnectionLost("not connected");
    link.ws.send(data);
    link.lastTx = now();
    this.stats.framesOut += 1;
    this.stats.bytesOut += data.length + wsHeaderLen(data.length, true);
  }

  /** Send one request on `link`; the returned waiter resolves with its reply. */
  protected start(link: Link, body: ClientBody, meta: unknown = null): Waiter {
    const rid = ++this.ids;
    const waiter = new Waiter(body.case, meta);
    const data = encodeClient(rid, body);
    this.send(link, data);
    link.waiters.set(rid, waiter);
    waiter.sentAt = now();
    return waiter;
  }

  protected request(link: Link, body: ClientBody, meta: unknown = null): Promise<Reply> {
    return this.start(link, body, meta).promise;
  }

  // ------------------------------------------------------------------ the loop
  /** @internal start the reconnect loop; resolves when connected (or per `offlineOk`) */
  protected async begin(): Promise<void> {
    this.loop = this.run();
    if (!this.failFirst) return;
    try {
      await this.waitLink();
    } catch (err) {
      await this.loop;
      throw err;
    }
  }

  private async getToken(): Promise<string> {
    const src = this.tokenSource;
    return typeof src === "string" ? src : await src();
  }

  private async run(): Promise<void> {
    const provider = typeof this.tokenSource !== "string";
    while (!this.closing) {
      let err: unknown = null;
      this.setState("connecting");
      try {
        this.stats.attempts += 1;
        const token = await Promise.race([this.getToken(), this.closedSignal]);
        if (token === null) break; // closed while a token provider was pending
        await this.connectOnce(token);
      } catch (e) {
        err = e;
      }
      if (this.closing) break;
      this.backoff.disconnected(now());
      if (err instanceof AuthenticationError && provider && this.everConnected && this.authRetryOk) {
        this.authRetryOk = false; // a token provider gets one more try, with a fresh token
        continue;
      }
      if (err instanceof AuthenticationError || err instanceof SessionReplaced) {
        this.stop(err);
        return;
      }
      const reason = err ? describe(err) : "connection ended";
      this.lastError = reason;
      if (this.failFirst && !this.everConnected) {
        this.stop(new ConnectError(`cannot connect to ${this.url}: ${reason}`));
        return;
      }
      this.setState("offline");
      let delay: number;
      const goaway = this.goawayMs !== null;
      if (this.goawayMs !== null) {
        delay = this.backoff.goawayDelay(this.goawayMs);
        this.goawayMs = null;
      } else delay = this.backoff.nextDelay();
      this.lastDelayMs = delay;
      this.delays.push({ ms: delay, goaway });
      if (this.delays.length > 16) this.delays.shift();
      await this.sleep(delay);
    }
    this.setState("closed");
  }

  /** the delay chosen before the latest reconnect attempt (ms) */
  lastDelayMs = 0;
  /** the last 16 reconnect delays, and whether each followed a GoAway */
  readonly delays: Array<{ ms: number; goaway: boolean }> = [];
  /** the last GoAway received */
  lastGoAway: { reason: string; reconnectAfterMs: number } | null = null;

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done(): void {
        clearTimeout(t);
        resolve();
      }
      this.wakeSleep = () => {
        this.wakeSleep = null;
        done();
      };
    });
  }

  /** Reconnect now if waiting between attempts (the browser's `online` event calls this);
   * when connected, a Ping checks the link. */
  reconnectNow(): void {
    this.backoff.reset();
    if (this.wakeSleep) this.wakeSleep();
    else if (this.link?.alive) this.ping();
  }

  /** Drop the current connection (as a network failure would); the client reconnects. */
  dropConnection(): void {
    this.link?.finish(new Closed(1006, "dropped by the application"));
  }

  /** A `Ping` round trip on the current link; resolves with the milliseconds it took. */
  async roundTrip(): Promise<number> {
    const link = await this.waitLink();
    const t = now();
    await this.request(link, { case: "ping", value: { clientTimeMs: BigInt(Date.now()) } });
    return now() - t;
  }

  protected ping(): void {
    const link = this.link;
    if (!link) return;
    try {
      this.send(link, encodeClient(++this.ids, { case: "ping", value: { clientTimeMs: BigInt(Date.now()) } }));
      this.stats.pingsSent += 1;
    } catch {
      /* the link is ending */
    }
  }

  private stop(err: SeqactorError): void {
    this.error = err;
    this.setState("closed");
    this.notify();
    this.onFatal(err);
    this.dispatchEvent(new Event("error"));
  }

  private closedError(code: number, reason: string): Error {
    if (code === CloseCode.AUTH_FAILED) return new AuthenticationError(`authentication failed: ${reason || "closed 4001"}`);
    if (code === CloseCode.REPLACED) return new SessionReplaced(reason || "session replaced by a newer one");
    return new Closed(code || 1006, reason);
  }

  private connectOnce(token: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let link: Link | null = null;
      let done = false;
      let ws: WebSocketLike;
      try {
        ws = new this.WS(this.url);
      } catch (e) {
        reject(e);
        return;
      }
      ws.binaryType = "arraybuffer";
      const connectTimer = setTimeout(() => finish(new Closed(1006, "timed out")), this.connectTimeoutMs);
      const finish = (err: Error | null): void => {
        if (done) return;
        done = true;
        if (this.abortConnect === finish) this.abortConnect = null;
        clearTimeout(connectTimer);
        ws.onopen = ws.onmessage = null;
        ws.onclose = null;
        ws.onerror = () => undefined; // `ws` emits an error when closed while connecting
        if (link) this.teardown(link);
        try {
          ws.close(1000, "client closing");
        } catch {
          /* already closed */
        }
        if (err) reject(err);
        else resolve();
      };
      this.abortConnect = finish;
      ws.onerror = () => undefined; // a close event follows
      ws.onclose = (ev) => finish(this.closedError(ev.code, ev.reason));
      ws.onopen = () => {
        const hello = encodeClient(++this.ids, {
          case: "hello",
          value: { token, deviceId: this.deviceId, platform: this.platform, clientVersion: this.clientVersion },
        });
        ws.send(hello);
        this.stats.framesOut += 1;
        this.stats.bytesOut += hello.length + wsHeaderLen(hello.length, true);
      };
      ws.onmessage = (ev) => {
        const data = toBytes(ev.data);
        if (!data) return;
        this.stats.framesIn += 1;
        const size = data.length + wsHeaderLen(data.length);
        this.stats.bytesIn += size;
        try {
          const { requestId, field, body } = splitServerMessage(data);
          if (link) {
            link.lastRx = now();
            this.onFrame(link, requestId, field, body, size);
            return;
          }
          if (field === F_WELCOME) {
            clearTimeout(connectTimer);
            link = new Link(ws, decodeWelcome(body));
            link.finish = finish;
            this.opened(link);
          } else if (field === F_ERROR) {
            const err = decodeError(body);
            finish(
              err.code === ErrorCode.UNAUTHENTICATED
                ? new AuthenticationError(`authentication failed: ${err.message}`)
                : serverError(err.code, err.message),
            );
          } else if (field === F_GOAWAY) this.goaway(body);
        } catch (e) {
          finish(e instanceof Error ? e : new DecodeError(String(e)));
        }
      };
    });
  }

  private opened(link: Link): void {
    this.userId = link.welcome.userId;
    this.role = link.welcome.role;
    this.stats.connects += 1;
    this.everConnected = true;
    this.authRetryOk = true;
    this.backoff.connected(now());
    this.link = link;
    this.setState("syncing");
    this.heartbeat(link);
    this.notify();
    this.onOpen(link).then(
      () => {
        if (link.alive) {
          link.ready = true;
          this.setState("online");
          this.notify();
        }
      },
      (e: unknown) => {
        if (link.alive) link.finish(e instanceof ConnectionLost ? new Closed(1006, e.message) : (e as Error));
      },
    );
  }

  private teardown(link: Link): void {
    link.alive = false;
    clearTimeout(link.timer);
    if (this.link === link) this.link = null;
    const lost = new ConnectionLost(`connection lost while the request was in flight (${this.lastError ?? ""})`);
    this.onClose(link);
    for (const w of link.waiters.values()) w.fail(lost);
    link.waiters.clear();
    this.notify();
  }

  private goaway(body: Uint8Array): void {
    const msg = decodeGoAway(body);
    this.stats.goaways += 1;
    this.goawayMs = msg.reconnectAfterMs;
    this.lastGoAway = msg;
  }

  private onFrame(link: Link, rid: number, field: number, body: Uint8Array, size: number): void {
    if (rid === 0) {
      if (field === F_UPDATE) {
        this.stats.pushes += 1;
        this.onPush(body, size);
      } else if (field === F_GOAWAY) this.goaway(body);
      else if (field === F_READ_COUNTS) this.onReadCounts(body);
      else if (field === F_ERROR) this.lastError = `server error: ${decodeError(body).message}`;
      return;
    }
    const waiter = link.waiters.get(rid);
    if (!waiter) return; // a Pong, or the reply to an abandoned request
    link.waiters.delete(rid);
    if (field !== F_ERROR) this.onReply(waiter, field, body, size);
    waiter.resolve(field, body, size);
  }

  /** Ping only after the interval without anything sent; dead after 2.5x without receiving. */
  protected heartbeat(link: Link): void {
    clearTimeout(link.timer);
    if (!link.alive) return;
    const interval = link.heartbeatMs * (this.background ? BACKGROUND_PING_FACTOR : 1);
    const t = now();
    const deadAt = link.lastRx + interval * DEAD_AFTER_FACTOR;
    if (t >= deadAt) {
      link.finish(new Closed(1006, `nothing received for ${Math.round(interval * DEAD_AFTER_FACTOR)} ms`));
      return;
    }
    if (t >= link.lastTx + interval) this.ping();
    const next = Math.min(link.lastTx + interval, deadAt);
    link.timer = setTimeout(() => this.heartbeat(link), Math.max(1, next - now()));
  }

  // ------------------------------------------------------------------ group read counts (§4.9)
  /** how the subclass sends an op (Client: re-sent after a drop; ServiceClient: a deadline) */
  protected callOp(_body: ClientBody): Promise<Reply> {
    return Promise.reject(new Error("not implemented"));
  }

  /** `GetReadCounts`: members who have read each seq of `[from, to]` (0 = first readable /
   * max; clamped by the server). Errors: `Forbidden` (not a current member, or no such
   * conversation), `NotFound` (service, unknown conversation), `TooLarge` (more than 1 000
   * seqs after clamping). */
  async readCounts(conversationId: string, fromSequence = 0, toSequence = 0): Promise<ReadCounts> {
    const r = await this.callOp({ case: "getReadCounts", value: { conversationId, fromSequence: BigInt(fromSequence), toSequence: BigInt(toSequence) } });
    expectField(r.field, F_READ_COUNTS);
    const m = decodeReadCounts(r.body);
    return new ReadCounts(m.conversationId, m.fromSequence, m.memberCount, m.counts);
  }

  /** `GetReaders` page by page: current members (ordered by user id, bytewise UTF-8) with
   * `read_sequence >= sequence` (`unread`: `<`), at most `pageSize` (1–1 000) per page. */
  async *readers(
    conversationId: string, sequence: number,
    opts: { unread?: boolean; pageSize?: number; afterUserId?: string } = {},
  ): AsyncGenerator<string[], void, undefined> {
    let after = opts.afterUserId ?? "";
    for (;;) {
      const r = await this.callOp({
        case: "getReaders",
        value: { conversationId, sequence: BigInt(sequence), unread: opts.unread ?? false, limit: opts.pageSize ?? READERS_PAGE_SIZE, afterUserId: after },
      });
      expectField(r.field, F_READERS);
      const page = decodeReaders(r.body);
      if (page.userIds.length) yield page.userIds;
      after = page.nextAfterUserId;
      if (!after) return;
    }
  }

  // ------------------------------------------------------------------ subclass hooks
  protected onReadCounts(_body: Uint8Array): void {}
  protected async onOpen(_link: Link): Promise<void> {}
  protected onClose(_link: Link): void {}
  protected onPush(_body: Uint8Array, _size: number): void {}
  protected onReply(_w: Waiter, _field: number, _body: Uint8Array, _size: number): void {}
  protected onFatal(_err: SeqactorError): void {}

  // ------------------------------------------------------------------ closing
  protected async shutdown(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.signalClosed();
    this.abortConnect?.(null);
    this.wakeSleep?.();
    this.notify();
    await this.loop;
    this.setState("closed");
  }
}

export { ServerError };
