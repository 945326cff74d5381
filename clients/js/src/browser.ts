/** Browser integration: the IndexedDB cache, and page lifecycle hooks
 * (`visibilitychange` drives SetBackground, `online` reconnects at once). */

import { fromRecord, toRecord, type CacheData, type CacheStore } from "./cache.js";

const STORE = "cache";

/** The view and sync token in IndexedDB (database `dbName`, one record per `key`). */
export class IndexedDBCache implements CacheStore {
  constructor(readonly key = "default", readonly dbName = "seqactor") {}

  private open(): Promise<IDBDatabase> {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open(this.dbName, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(STORE);
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }

  async load(): Promise<CacheData | null> {
    let db: IDBDatabase;
    try {
      db = await this.open();
    } catch (e) {
      console.warn("seqactor: IndexedDB unavailable, doing a full sync", e);
      return null;
    }
    try {
      const value = await new Promise<unknown>((resolve, reject) => {
        const req = db.transaction(STORE, "readonly").objectStore(STORE).get(this.key);
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
      if (value === undefined) return null;
      try {
        return fromRecord(value);
      } catch (e) {
        console.warn(`seqactor cache ignored: ${(e as Error).message}; doing a full sync`);
        return null;
      }
    } finally {
      db.close();
    }
  }

  async save(data: CacheData): Promise<void> {
    const db = await this.open();
    try {
      await new Promise<void>((resolve, reject) => {
        const tx = db.transaction(STORE, "readwrite");
        tx.objectStore(STORE).put(toRecord(data), this.key);
        tx.oncomplete = () => resolve();
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error);
      });
    } finally {
      db.close();
    }
  }
}

interface HookTarget {
  setBackground(background: boolean): Promise<void>;
  reconnectNow(): void;
  saveCache(): Promise<void>;
}

/** Wire a client to the page: hidden → background (and save the cache), visible →
 * foreground, `online` → reconnect now. Returns a function that removes the hooks. */
export function attachPageHooks(client: HookTarget): () => void {
  if (typeof document === "undefined" || typeof window === "undefined") return () => undefined;
  const onVisibility = (): void => {
    const hidden = document.visibilityState === "hidden";
    client.setBackground(hidden).catch(() => undefined);
    if (hidden) client.saveCache().catch(() => undefined);
  };
  const onOnline = (): void => client.reconnectNow();
  document.addEventListener("visibilitychange", onVisibility);
  window.addEventListener("online", onOnline);
  return () => {
    document.removeEventListener("visibilitychange", onVisibility);
    window.removeEventListener("online", onOnline);
  };
}

/** true while the page is hidden */
export function pageHidden(): boolean {
  return typeof document !== "undefined" && document.visibilityState === "hidden";
}
