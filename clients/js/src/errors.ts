/** Errors the SDK raises: one class per case a caller may want to handle. */

/** `seqactor.v1.Error.Code` (docs/protocol.md, "Messages"). */
export const ErrorCode = {
  UNSPECIFIED: 0,
  BAD_REQUEST: 1,
  UNAUTHENTICATED: 2,
  FORBIDDEN: 3,
  NOT_FOUND: 4,
  TOO_LARGE: 5,
  RATE_LIMITED: 6,
  UNAVAILABLE: 7,
  INTERNAL: 8,
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(ErrorCode).map(([k, v]) => [v, k]),
);

/** WebSocket close codes of the protocol (docs/protocol.md, "Errors and close codes"). */
export const CloseCode = {
  AUTH_FAILED: 4001,
  HELLO_TIMEOUT: 4002,
  RATE_LIMITED: 4008,
  REPLACED: 4009,
} as const;

/** Base of every error the SDK raises. */
export class SeqactorError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The first connection failed (bad URL, refused, timed out, handshake rejected). */
export class ConnectError extends SeqactorError {}

/** The server refused the token (Error UNAUTHENTICATED / close 4001). Not retried. */
export class AuthenticationError extends SeqactorError {
  readonly closeCode = CloseCode.AUTH_FAILED;
}

/** Another session with the same user and device id took over (close 4009). Not retried. */
export class SessionReplaced extends SeqactorError {
  readonly closeCode = CloseCode.REPLACED;
}

/** The connection dropped while the request was in flight (or none came up in time). The
 * request may or may not have been applied: an allocation is not idempotent. */
export class ConnectionLost extends SeqactorError {}

/** The client was closed. */
export class ClientClosed extends SeqactorError {}

/** A frame the SDK cannot decode. */
export class DecodeError extends SeqactorError {}

/** The server answered a request with `Error`. */
export class ServerError extends SeqactorError {
  constructor(readonly code: number, readonly serverMessage: string) {
    super(`${CODE_NAMES[code] ?? String(code)}: ${serverMessage}`);
  }
}
export class BadRequest extends ServerError {}
export class Forbidden extends ServerError {}
export class NotFound extends ServerError {}
export class TooLarge extends ServerError {}
export class RateLimited extends ServerError {}
export class Unavailable extends ServerError {}

const ERROR_TYPES: Record<number, typeof ServerError> = {
  [ErrorCode.BAD_REQUEST]: BadRequest,
  [ErrorCode.FORBIDDEN]: Forbidden,
  [ErrorCode.NOT_FOUND]: NotFound,
  [ErrorCode.TOO_LARGE]: TooLarge,
  [ErrorCode.RATE_LIMITED]: RateLimited,
  [ErrorCode.UNAVAILABLE]: Unavailable,
};

export function serverError(code: number, message: string): ServerError {
  const Type = ERROR_TYPES[code] ?? ServerError;
  return new Type(code, message);
}
