/** @seqactor/client — the seqactor SDK for browsers and Node (see docs/client-js.md). */
export { Client, ChangeEvent, CACHE_SAVE_INTERVAL_MS, type ClientOptions, type SyncInfo } from "./client.js";
export { ServiceClient, SERVICE_REQUEST_TIMEOUT_MS, type Allocation, type ServiceClientOptions } from "./service.js";
export {
  setDefaultWebSocket,
  type ClientStats,
  type ConnectionState,
  type EndpointOptions,
  type TokenSource,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./conn.js";
export { Backoff, type BackoffOptions } from "./backoff.js";
export { ReadCounts, ReadCountsWatch, READERS_PAGE_SIZE } from "./readcounts.js";
export { MemoryCache, type CacheData, type CacheStore } from "./cache.js";
export { IndexedDBCache, attachPageHooks } from "./browser.js";
export { applyUpdate, unreadOf, type Change, type ChangeBatch, type ChangeStream, type Conversation } from "./view.js";
export { decodeUpdate, splitServerMessage, type Row, type Update } from "./wire.js";
export {
  AuthenticationError,
  BadRequest,
  ClientClosed,
  CloseCode,
  ConnectError,
  ConnectionLost,
  DecodeError,
  ErrorCode,
  Forbidden,
  NotFound,
  RateLimited,
  SeqactorError,
  ServerError,
  SessionReplaced,
  TooLarge,
  Unavailable,
} from "./errors.js";
