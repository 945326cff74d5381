/** Node entry point: everything in the main entry, the `ws` package as the WebSocket, and a
 * file cache. `import { Client, ServiceClient, FileCache } from "@seqactor/client/node"`. */

import { mkdir, open, readFile, rename, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import WebSocket from "ws";
import { fromRecord, toRecord, type CacheData, type CacheStore } from "./cache.js";
import { setDefaultWebSocket, type WebSocketConstructor } from "./conn.js";

setDefaultWebSocket(WebSocket as unknown as WebSocketConstructor);

export * from "./index.js";

/** The view and token in one JSON file, written atomically (temp file in the same
 * directory, fsync, rename): a crash leaves the old or the new cache, never a torn one. */
export class FileCache implements CacheStore {
  constructor(readonly path: string) {}

  async load(): Promise<CacheData | null> {
    let raw: string;
    try {
      raw = await readFile(this.path, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") {
        console.warn(`seqactor cache ${this.path} unreadable (${(e as Error).message}); doing a full sync`);
      }
      return null;
    }
    try {
      return fromRecord(JSON.parse(raw));
    } catch (e) {
      console.warn(`seqactor cache ${this.path} ignored: ${(e as Error).message}; doing a full sync`);
      return null;
    }
  }

  async save(data: CacheData): Promise<void> {
    const dir = dirname(this.path);
    await mkdir(dir, { recursive: true });
    const tmp = join(dir, `.${basename(this.path)}.${process.pid}.${Date.now()}.tmp`);
    const fh = await open(tmp, "w");
    try {
      await fh.writeFile(JSON.stringify(toRecord(data)));
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      await rename(tmp, this.path);
    } catch (e) {
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
  }
}
