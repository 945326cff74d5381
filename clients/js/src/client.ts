/** {@link Client}: one user's live view of their conversations. */

import { attachPageHooks, pageHidden } from "./browser.js";
import type { CacheStore } from "./cache.js";
import { Endpoint, Link, Waiter, type ClientBody, type EndpointOptions, type TokenSource } from "./conn.js";
import { ConnectionLost, Forbidden, type SeqactorError } from "./errors.js";
import { ChangeStream, applyUpdate, rowUnread, toConversation, type Change, type ChangeBatch, type Conversation, type Pair } from "./view.js";
import { F_ACK, F_UPDATE, decodeAck, decodeReadCounts, decodeUpdate, type Row } from "./wire.js";
import { ReadCounts, ReadCountsWatch } from "./readcounts.js";
import { ServerError } from "./errors.js";

export const CACHE_SAVE_INTERVAL_MS = 1000; // a changed view is written at most this often (and on close)

export interface ClientOptions extends EndpointOptions {
  /** keep the view + token between runs: `IndexedDBCache`, `FileCache` (Node), `MemoryCache` */
  cache?: CacheStore;
  /** follow the whole view (default true); else only what you `subscribe()` to */
  subscribeAll?: boolean;
  /** browsers: visibility drives setBackground, `online` reconnects (default true) */
  pageHooks?: boolean;
}

/** What the last resume/snapshot (`GetSequences` of the whole view) brought. */
export interface SyncInfo {
  /** true: a snapshot; false: a delta since our token */
  full: boolean;
  /** conversations in the reply */
  conversations: number;
  conversationIds: string[];
  removed: number;
  /** bytes of the reply frame (payload + WebSocket header) */
  bytes: number;
  /** request sent -> reply applied */
  ms: number;
  /** we sent a token */
  sinceToken: boolean;
}

/** The `change` event: the conversations an update changed (old and new values). */
export class ChangeEvent extends Event {
  private list: Change[] | null = null;
  constructor(private readonly pairs: Map<string, Pair>, readonly totalUnread: number) {
    super("change");
  }
  /** built on first access (a snapshot's 10 000 entries cost nothing unless read) */
  get changes(): readonly Change[] {
    if (!this.list) {
      this.list = [];
      for (const [cid, [old, next]] of this.pairs) {
        this.list.push({ conversationId: cid, old: toConversation(cid, old), new: toConversation(cid, next) });
      }
    }
    return this.list;
  }
}

type Meta = { what: "sync"; since: boolean } | { what: "get"; ids: string[] } | { what: "markRead"; id: string };

const EMPTY: Uint8Array = new Uint8Array(0);

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A user's live view. Create with {@link Client.connect}. */
export class Client extends Endpoint {
  readonly cache: CacheStore | undefined;
  /** the last resume/snapshot */
  lastSync: SyncInfo | null = null;
  /** the last 16 of them */
  readonly syncs: SyncInfo[] = [];
  /** true once the server acknowledged SetBackground(true) on the current link */
  serverBackground = false;

  private readonly rows = new Map<string, Row>();
  private token: Uint8Array = EMPTY;
  private total = 0;
  private subAll: boolean;
  private readonly subIds = new Set<string>();
  private readonly recheck = new Set<string>();
  private readonly streams = new Set<ChangeStream>();
  private resuming = false; // a resume GetSequences(since) is unanswered: push tokens are not adopted
  private dirty = false;
  private cacheUser = "";
  private cacheTimer: ReturnType<typeof setInterval> | undefined;
  private detachHooks: () => void = () => undefined;
  private readonly watches = new Map<string, ReadCountsWatch[]>(); // read-count watches (§4.9)

  constructor(url: string, token: TokenSource, opts: ClientOptions = {}) {
    super(url, token, opts);
    this.cache = opts.cache;
    this.subAll = opts.subscribeAll ?? true;
    if (opts.pageHooks ?? true) {
      this.background = pageHidden();
      this.detachHooks = attachPageHooks(this);
    }
  }

  /** Connect, authenticate and sync the whole view (from the cache's token when there is
   * one: then only a delta comes). Rejects with `ConnectError` / `AuthenticationError`
   * when the first connection fails, unless `offlineOk`. */
  static async connect(url: string, token: TokenSource, opts: ClientOptions = {}): Promise<Client> {
    const client = new Client(url, token, opts);
    await client.loadCache();
    if (client.cache) client.cacheTimer = setInterval(() => void client.flushCache(), CACHE_SAVE_INTERVAL_MS);
    try {
      await client.begin();
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  // ------------------------------------------------------------------ the view
  /** the local state of one conversation (null: not in the view) */
  get(conversationId: string): Conversation | null {
    return toConversation(conversationId, this.rows.get(conversationId));
  }

  /** a copy of the whole view */
  get view(): Map<string, Conversation> {
    const out = new Map<string, Conversation>();
    for (const [cid, row] of this.rows) out.set(cid, toConversation(cid, row)!);
    return out;
  }

  /** the view's conversations, newest activity first */
  conversations(): Conversation[] {
    return [...this.view.values()].sort((a, b) => b.timeMs - a.timeMs || (a.id < b.id ? -1 : 1));
  }

  get size(): number {
    return this.rows.size;
  }

  /** Σ unread over the view (docs/protocol.md#unread per conversation) */
  get totalUnread(): number {
    return this.total;
  }

  /** the resume point (opaque) */
  get syncToken(): Uint8Array {
    return this.token;
  }

  /** A new change stream (async iterator); it sees every change applied after this call. */
  changes(): ChangeStream {
    const s = new ChangeStream(() => this.total, () => this.error, (x) => this.streams.delete(x));
    this.streams.add(s);
    return s;
  }

  /** until connected and in sync */
  async waitSynced(): Promise<void> {
    await this.waitLink();
  }

  // ------------------------------------------------------------------ operations
  /** send when synced; a drop re-sends on the next link (user ops are idempotent) */
  private async call(body: ClientBody, meta: Meta | null = null) {
    for (;;) {
      const link = await this.waitLink();
      try {
        return await this.request(link, body, meta);
      } catch (err) {
        if (err instanceof ConnectionLost) continue;
        throw err;
      }
    }
  }

  protected override callOp(body: ClientBody) {
    return this.call(body);
  }

  /** `WatchReadCounts`: an async iterator of {@link ReadCounts} for `[fromSequence, max]`
   * (at most the newest 1 000 seqs): the current counts first, then on every change, at most
   * once per server interval (250 ms by default). Re-watched after a reconnect. Errors as for
   * `readCounts`; `TooLarge` beyond 16 watches per session. */
  async watchReadCounts(conversationId: string, fromSequence = 0): Promise<ReadCountsWatch> {
    const watch = new ReadCountsWatch(conversationId, fromSequence, (w) => this.unwatch(w));
    const list = this.watches.get(conversationId) ?? [];
    list.push(watch);
    this.watches.set(conversationId, list);
    try {
      await this.call({ case: "watchReadCounts", value: { conversationId, fromSequence: BigInt(fromSequence) } });
    } catch (err) {
      this.forget(watch);
      throw err;
    }
    return watch;
  }

  /** drop `watch`; true when it was its conversation's last one */
  private forget(watch: ReadCountsWatch): boolean {
    const list = (this.watches.get(watch.conversationId) ?? []).filter((w) => w !== watch);
    if (list.length) {
      this.watches.set(watch.conversationId, list);
      return false;
    }
    this.watches.delete(watch.conversationId);
    return true;
  }

  private async unwatch(watch: ReadCountsWatch): Promise<void> {
    if (this.closing || this.error) {
      this.forget(watch);
      return;
    }
    if (this.forget(watch)) {
      try {
        await this.call({ case: "watchReadCounts", value: { conversationId: watch.conversationId, stop: true } });
      } catch (err) {
        if (!(err instanceof ServerError)) throw err; // the server ended it already
      }
    } else {
      const others = this.watches.get(watch.conversationId)!;
      const from = others[others.length - 1]!.fromSequence;
      await this.call({ case: "watchReadCounts", value: { conversationId: watch.conversationId, fromSequence: BigInt(from) } });
    }
  }

  protected override onReadCounts(body: Uint8Array): void {
    const m = decodeReadCounts(body);
    const update = new ReadCounts(m.conversationId, m.fromSequence, m.memberCount, m.counts);
    for (const w of this.watches.get(update.conversationId) ?? []) w.put(update);
  }

  private endWatches(err: Error | null): void {
    for (const list of this.watches.values()) for (const w of list) w.end(err);
    this.watches.clear();
  }

  /** `GetSequences` for these ids, applied to the view; ids outside the view are absent
   * from the result (and dropped locally). */
  async fetch(conversationIds: Iterable<string>): Promise<Map<string, Conversation>> {
    const ids = [...new Set(conversationIds)];
    await this.call({ case: "getSequences", value: { conversationIds: ids } }, { what: "get", ids });
    const out = new Map<string, Conversation>();
    for (const id of ids) {
      const c = this.get(id);
      if (c) out.set(id, c);
    }
    return out;
  }

  /** follow these conversations (or the whole view with `{all: true}`); kept across reconnects */
  async subscribe(conversationIds: Iterable<string> = [], opts: { all?: boolean } = {}): Promise<void> {
    const ids = [...conversationIds];
    const all = opts.all ?? false;
    await this.call({ case: "subscribe", value: { conversationIds: ids, all } });
    for (const id of ids) this.subIds.add(id);
    this.subAll ||= all;
  }

  async unsubscribe(conversationIds: Iterable<string> = [], opts: { all?: boolean } = {}): Promise<void> {
    const ids = [...conversationIds];
    const all = opts.all ?? false;
    if (all) {
      this.subAll = false;
      this.subIds.clear();
    }
    for (const id of ids) this.subIds.delete(id);
    await this.call({ case: "unsubscribe", value: { conversationIds: ids, all } });
  }

  /** Mark read up to `readSequence` (default: the local max); returns the effective read
   * seq from the server's `Ack` (clamped to max, never lower; already applied). */
  async markRead(conversationId: string, readSequence?: number): Promise<number> {
    const seq = readSequence ?? this.rows.get(conversationId)?.max ?? 0;
    const reply = await this.call(
      { case: "markRead", value: { conversationId, readSequence: BigInt(seq) } },
      { what: "markRead", id: conversationId },
    );
    return decodeAck(reply.body);
  }

  /** In background the server holds (and coalesces) pushes and flushes them at once on
   * `false`; pings are 4x less frequent. While offline the flag is sent on the next link. */
  async setBackground(background: boolean): Promise<void> {
    this.background = background;
    const link = this.readyLink();
    if (link) this.heartbeat(link);
    if (!link) return; // the resume sends it
    await this.call({ case: "setBackground", value: { background } });
    if (this.background === background) this.serverBackground = background;
  }

  // ------------------------------------------------------------------ link hooks
  protected override async onOpen(link: Link): Promise<void> {
    this.serverBackground = false;
    const user = link.welcome.userId;
    if (this.cacheUser && this.cacheUser !== user) {
      console.warn(`seqactor cache belongs to user ${this.cacheUser}, not ${user}: ignored; doing a full sync`);
      this.token = EMPTY;
    }
    this.cacheUser = user;
    // Subscribe first, then sync: the server runs a session's user ops in order, so nothing
    // falls between them. Until the sync reply arrives, pushes are applied but their token
    // is not adopted (a push that overtook the reply must not move the resume point past a
    // `removed` the reply has not brought yet).
    let sub: Waiter | null = null;
    if (this.subAll || this.subIds.size) {
      sub = this.start(link, { case: "subscribe", value: { all: this.subAll, conversationIds: [...this.subIds].sort() } });
    }
    const since = this.token;
    this.resuming = true;
    const get = this.start(link, { case: "getSequences", value: { since } }, { what: "sync", since: since.length > 0 });
    const bg = this.background ? this.start(link, { case: "setBackground", value: { background: true } }) : null;
    let forbidden = false;
    if (sub) {
      try {
        await sub.promise;
      } catch (err) {
        if (!(err instanceof Forbidden)) throw err;
        forbidden = true; // a listed conversation left the view meanwhile
      }
    }
    await get.promise;
    if (bg) {
      await bg.promise;
      this.serverBackground = true;
    }
    if (forbidden) {
      for (const id of [...this.subIds]) if (!this.rows.has(id)) this.subIds.delete(id);
      if (this.subIds.size || this.subAll) {
        await this.request(link, { case: "subscribe", value: { all: this.subAll, conversationIds: [...this.subIds].sort() } });
      }
    }
    // read-count watches: watch again what was watched (a refusal ends those watches)
    for (const [cid, list] of [...this.watches]) {
      try {
        await this.request(link, { case: "watchReadCounts", value: { conversationId: cid, fromSequence: BigInt(list[list.length - 1]!.fromSequence) } });
      } catch (err) {
        if (!(err instanceof ServerError)) throw err;
        for (const w of list) w.end(err);
        this.watches.delete(cid);
      }
    }
    const recheck = [...new Set([...this.recheck, ...(forbidden ? this.subIds : [])])].sort();
    if (recheck.length) {
      await this.request(link, { case: "getSequences", value: { conversationIds: recheck } }, { what: "get", ids: recheck });
      this.recheck.clear();
    }
    // the page was hidden or shown while the resume ran: tell the server the current state
    while (this.background !== this.serverBackground) {
      const want: boolean = this.background;
      await this.request(link, { case: "setBackground", value: { background: want } });
      this.serverBackground = want;
    }
  }

  protected override onClose(link: Link): void {
    this.resuming = false;
    // MarkReads without an Ack: re-read those conversations after the resume.
    for (const w of link.waiters.values()) {
      const meta = w.meta as Meta | null;
      if (meta?.what === "markRead") this.recheck.add(meta.id);
    }
  }

  protected override onPush(body: Uint8Array): void {
    const u = decodeUpdate(body);
    this.apply(u.conversations, this.resuming ? EMPTY : u.syncToken, u.full, u.removed);
  }

  protected override onReply(waiter: Waiter, field: number, body: Uint8Array, size: number): void {
    const meta = waiter.meta as Meta | null;
    if (!meta) return;
    if (meta.what === "markRead" && field === F_ACK) {
      const read = decodeAck(body);
      const row = this.rows.get(meta.id);
      if (row && read > row.read) this.apply(new Map([[meta.id, { max: 0, read, min: 0, timeMs: 0, membership: 0 }]]), EMPTY, false, []);
    } else if (meta.what === "sync" && field === F_UPDATE) {
      const u = decodeUpdate(body);
      this.resuming = false;
      this.apply(u.conversations, u.syncToken, u.full, u.removed);
      const info: SyncInfo = {
        full: u.full,
        conversations: u.conversations.size,
        conversationIds: [...u.conversations.keys()].sort(),
        removed: u.removed.length,
        bytes: size,
        ms: performance.now() - waiter.sentAt,
        sinceToken: meta.since,
      };
      this.lastSync = info;
      this.syncs.push(info);
      if (this.syncs.length > 16) this.syncs.shift();
      this.dispatchEvent(new Event("sync"));
    } else if (meta.what === "get" && field === F_UPDATE) {
      const u = decodeUpdate(body);
      const gone = meta.ids.filter((id) => !u.conversations.has(id) && this.rows.has(id));
      this.apply(u.conversations, EMPTY, false, [...u.removed, ...gone]);
    }
  }

  protected override onFatal(err: SeqactorError): void {
    this.endWatches(err);
    for (const s of this.streams) s.notify();
  }

  // ------------------------------------------------------------------ applying updates
  private apply(convs: Map<string, Row>, token: Uint8Array, full: boolean, removed: string[]): void {
    const changed = applyUpdate(this.rows, convs, full, removed);
    if (token.length) {
      if (!sameBytes(token, this.token)) this.dirty = true;
      this.token = token;
    }
    if (!changed.size) return;
    let total = this.total;
    for (const [before, after] of changed.values()) total += rowUnread(after) - rowUnread(before);
    this.total = total;
    this.dirty = true;
    for (const s of this.streams) s.add(changed);
    this.dispatchEvent(new ChangeEvent(changed, total));
  }

  // ------------------------------------------------------------------ cache
  private async loadCache(): Promise<void> {
    if (!this.cache) return;
    const data = await this.cache.load();
    if (!data) return;
    for (const [cid, row] of data.view) this.rows.set(cid, row);
    this.token = data.token;
    this.cacheUser = data.user;
    let total = 0;
    for (const row of this.rows.values()) total += rowUnread(row);
    this.total = total;
  }

  /** true while the view or token changed since the last cache write */
  get cacheDirty(): boolean {
    return this.dirty;
  }

  /** Write the view and token now; a no-op without a cache. */
  async saveCache(): Promise<void> {
    if (!this.cache || !this.cacheUser) return;
    const data = { user: this.cacheUser, url: this.url, token: this.token, view: new Map(this.rows) };
    this.dirty = false;
    await this.cache.save(data);
    this.stats.cacheSaves += 1;
  }

  private async flushCache(): Promise<void> {
    if (!this.dirty) return;
    try {
      await this.saveCache();
    } catch (e) {
      console.warn(`seqactor cache not written: ${(e as Error).message}`);
    }
  }

  /** Close the connection, end the change streams, write the cache. */
  async close(): Promise<void> {
    this.detachHooks();
    clearInterval(this.cacheTimer);
    await this.shutdown();
    this.endWatches(null);
    for (const s of this.streams) s.close();
    await this.flushCache();
  }
}

export type { ChangeBatch };
