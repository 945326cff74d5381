/** {@link ServiceClient}: a backend's connection (service token). */

import { Endpoint, type ClientBody, type EndpointOptions, type Reply, type TokenSource } from "./conn.js";
import { ConnectionLost, ErrorCode, ServerError } from "./errors.js";
import { F_ALLOCATED, decodeAllocated } from "./wire.js";

export const SERVICE_REQUEST_TIMEOUT_MS = 30_000; // waiting for a connection + the reply

export interface Allocation {
  firstSequence: number;
  lastSequence: number;
  timeMs: number;
}

export interface ServiceClientOptions extends EndpointOptions {
  requestTimeoutMs?: number;
}

/** Allocate seqs and manage membership. Requests run concurrently on one connection,
 * matched by request id. A request in flight when the connection drops rejects with
 * `ConnectionLost` (it may or may not have been applied; an allocation is not idempotent:
 * the caller decides). Server errors reject with `ServerError` subclasses carrying `code`. */
export class ServiceClient extends Endpoint {
  readonly requestTimeoutMs: number;

  constructor(url: string, token: TokenSource, opts: ServiceClientOptions = {}) {
    super(url, token, { platform: "service", ...opts });
    this.requestTimeoutMs = opts.requestTimeoutMs ?? SERVICE_REQUEST_TIMEOUT_MS;
  }

  static async connect(url: string, token: TokenSource, opts: ServiceClientOptions = {}): Promise<ServiceClient> {
    const svc = new ServiceClient(url, token, opts);
    try {
      await svc.begin();
    } catch (err) {
      await svc.close();
      throw err;
    }
    return svc;
  }

  protected override callOp(body: ClientBody): Promise<Reply> {
    return this.call(body);
  }

  private async call(body: ClientBody): Promise<Reply> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new ConnectionLost(`no reply within ${this.requestTimeoutMs} ms${this.lastError ? ` (last error: ${this.lastError})` : ""}`)),
        this.requestTimeoutMs,
      );
    });
    try {
      return await Promise.race([this.waitLink().then((link) => this.request(link, body)), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Allocate the next `count` seqs (creating the conversation if new); I6 for the sender. */
  async allocate(conversationId: string, count = 1, senderUserId = ""): Promise<Allocation> {
    const r = await this.call({ case: "allocateSequences", value: { conversationId, count, senderUserId } });
    if (r.field !== F_ALLOCATED) throw new ServerError(ErrorCode.INTERNAL, `unexpected reply (field ${r.field})`);
    return decodeAllocated(r.body);
  }

  async addMembers(conversationId: string, userIds: Iterable<string>): Promise<void> {
    await this.call({ case: "addMembers", value: { conversationId, userIds: [...userIds] } });
  }

  async removeMembers(conversationId: string, userIds: Iterable<string>, keepHistory = false): Promise<void> {
    await this.call({ case: "removeMembers", value: { conversationId, userIds: [...userIds], keepHistory } });
  }

  async setMinSequence(conversationId: string, minSequence: number): Promise<void> {
    await this.call({ case: "setMinSequence", value: { conversationId, minSequence: BigInt(minSequence) } });
  }

  async close(): Promise<void> {
    await this.shutdown();
  }
}
