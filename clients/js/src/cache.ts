/** Where a Client keeps its view and sync token between runs (so a restart resumes with a
 * delta, not a snapshot). Browsers: {@link IndexedDBCache} (browser.ts); Node: `FileCache`
 * (node.ts); tests: {@link MemoryCache}. */

import type { Row } from "./wire.js";

export const CACHE_FORMAT = "seqactor-client-cache";
export const CACHE_VERSION = 2; // 2: rows carry `frozen` (version 1 caches are ignored)

export interface CacheData {
  user: string;
  url: string;
  token: Uint8Array;
  view: Map<string, Row>;
}

export interface CacheStore {
  /** the saved data, or null (missing, corrupt, foreign: the client then does a full sync) */
  load(): Promise<CacheData | null>;
  save(data: CacheData): Promise<void>;
}

/** A serialisable form (JSON-safe: the token in base64, rows as [max, read, min, timeMs, frozen],
 * frozen 1 for a row left with keep_history, else 0). */
export interface CacheRecord {
  format: string;
  version: number;
  user: string;
  url: string;
  token: string;
  view: Record<string, [number, number, number, number, number]>;
}

export function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]!);
  return btoa(s);
}

export function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function toRecord(d: CacheData): CacheRecord {
  const view: CacheRecord["view"] = {};
  for (const [cid, r] of d.view) view[cid] = [r.max, r.read, r.min, r.timeMs, r.membership === 2 ? 1 : 0];
  return { format: CACHE_FORMAT, version: CACHE_VERSION, user: d.user, url: d.url, token: toBase64(d.token), view };
}

/** Parse a record; throws on anything that is not a valid cache of this format. */
export function fromRecord(obj: unknown): CacheData {
  const o = obj as Partial<CacheRecord> | null;
  if (!o || typeof o !== "object" || o.format !== CACHE_FORMAT) throw new Error("not a seqactor client cache");
  if (o.version !== CACHE_VERSION) throw new Error(`cache version ${String(o.version)} is not ${CACHE_VERSION}`);
  if (typeof o.user !== "string" || typeof o.url !== "string" || typeof o.token !== "string") throw new Error("malformed cache header");
  if (!o.view || typeof o.view !== "object") throw new Error("malformed cache view");
  const view = new Map<string, Row>();
  for (const [cid, row] of Object.entries(o.view)) {
    if (!Array.isArray(row) || row.length !== 5 || !row.every((v) => Number.isSafeInteger(v) && v >= 0) || row[4] > 1) {
      throw new Error("malformed cache row");
    }
    view.set(cid, { max: row[0], read: row[1], min: row[2], timeMs: row[3], membership: row[4] === 1 ? 2 : 0 });
  }
  return { user: o.user, url: o.url, token: fromBase64(o.token), view };
}

/** Keeps the data in memory (survives a reconnect or a new Client in the same process). */
export class MemoryCache implements CacheStore {
  private record: CacheRecord | null = null;
  async load(): Promise<CacheData | null> {
    return this.record ? fromRecord(this.record) : null;
  }
  async save(data: CacheData): Promise<void> {
    this.record = toRecord(data);
  }
}
