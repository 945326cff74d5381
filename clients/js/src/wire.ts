/** Frame codec. Client frames are built with the generated `@bufbuild/protobuf` schemas.
 * Server frames are split by hand (request id, body field, body bytes), and `SequenceUpdate`
 * bodies — snapshots of whole views, the hot path — are decoded by {@link decodeUpdate}
 * straight into plain numbers, without protobuf message objects or BigInts. Small bodies
 * (`Welcome`, `Ack`, `Error`, `Allocated`, `GoAway`) go through the generated schemas. */

import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { ClientMessageSchema } from "./gen/seqactor/v1/seqactor_pb.js";
import { DecodeError } from "./errors.js";

// ServerMessage body field numbers (docs/protocol.md#messages)
export const F_WELCOME = 2;
export const F_UPDATE = 3;
export const F_ACK = 4;
export const F_ERROR = 5;
export const F_PONG = 6;
export const F_ALLOCATED = 7;
export const F_GOAWAY = 8;
export const F_READ_COUNTS = 9; // v1.1 (docs/protocol.md#group-read-counts); request id 0: a watch's push
export const F_READERS = 10;

/** One conversation as held by the client: plain numbers (seqs above 2^53 are refused). */
export interface Row {
  max: number;
  read: number;
  min: number;
  timeMs: number;
  /** docs/protocol.md#messages `membership`: in an update 0 = not sent (unchanged), 1 = member,
   * 2 = frozen (left with keep_history); in the client's view 0 = member, 2 = frozen */
  membership: number;
}

export interface Update {
  conversations: Map<string, Row>;
  syncToken: Uint8Array<ArrayBufferLike>;
  full: boolean;
  removed: string[];
}

/** The body of a `ClientMessage`, typed by the generated code (a renamed or renumbered field
 * in the .proto breaks the build here, not on the wire). */
export type ClientBody = Exclude<NonNullable<MessageInitShape<typeof ClientMessageSchema>["body"]>, { case: undefined }>;

type Kind = "s" | "S" | "b" | "u" | "i" | "y"; // string, repeated string, bool, uint, int64, bytes
type FieldSpec = readonly [name: string, no: number, kind: Kind];

/** ClientMessage body: field number and the body's fields (docs/protocol.md#messages). A unit test checks the
 * bytes against `toBinary` with the generated schema for every op. */
const CLIENT_BODIES: Record<ClientBody["case"], readonly [number, readonly FieldSpec[]]> = {
  hello: [2, [["token", 1, "s"], ["deviceId", 2, "s"], ["platform", 3, "s"], ["clientVersion", 4, "s"]]],
  getSequences: [3, [["conversationIds", 1, "S"], ["since", 2, "y"]]],
  subscribe: [4, [["conversationIds", 1, "S"], ["all", 2, "b"]]],
  unsubscribe: [5, [["conversationIds", 1, "S"], ["all", 2, "b"]]],
  markRead: [6, [["conversationId", 1, "s"], ["readSequence", 2, "u"]]],
  setBackground: [7, [["background", 1, "b"]]],
  ping: [8, [["clientTimeMs", 1, "i"]]],
  allocateSequences: [20, [["conversationId", 1, "s"], ["count", 2, "u"], ["senderUserId", 3, "s"]]],
  addMembers: [21, [["conversationId", 1, "s"], ["userIds", 2, "S"]]],
  removeMembers: [22, [["conversationId", 1, "s"], ["userIds", 2, "S"], ["keepHistory", 3, "b"]]],
  setMinSequence: [23, [["conversationId", 1, "s"], ["minSequence", 2, "u"]]],
  getReadCounts: [9, [["conversationId", 1, "s"], ["fromSequence", 2, "u"], ["toSequence", 3, "u"]]],
  watchReadCounts: [10, [["conversationId", 1, "s"], ["fromSequence", 2, "u"], ["stop", 3, "b"]]],
  getReaders: [11, [["conversationId", 1, "s"], ["sequence", 2, "u"], ["unread", 3, "b"], ["limit", 4, "u"], ["afterUserId", 5, "s"]]],
};

/** Encode a `ClientMessage` with the protobuf runtime's `BinaryWriter` (proto3: default
 * values are not written, as `toBinary` does). */
export function encodeClient(requestId: number, body: ClientBody): Uint8Array {
  const w = new BinaryWriter();
  if (requestId) w.tag(1, WireType.Varint).uint64(requestId);
  const [no, fields] = CLIENT_BODIES[body.case];
  const value = (body.value ?? {}) as Record<string, unknown>;
  w.tag(no, WireType.LengthDelimited).fork();
  for (const [name, fno, kind] of fields) {
    const v = value[name];
    if (v === undefined || v === null) continue;
    switch (kind) {
      case "s":
        if (v !== "") w.tag(fno, WireType.LengthDelimited).string(v as string);
        break;
      case "S":
        for (const item of v as string[]) w.tag(fno, WireType.LengthDelimited).string(item);
        break;
      case "b":
        if (v) w.tag(fno, WireType.Varint).bool(true);
        break;
      case "u":
        if (v !== 0 && v !== 0n) w.tag(fno, WireType.Varint).uint64(v as number | bigint);
        break;
      case "i":
        if (v !== 0 && v !== 0n) w.tag(fno, WireType.Varint).int64(v as number | bigint);
        break;
      case "y":
        if ((v as Uint8Array).length) w.tag(fno, WireType.LengthDelimited).bytes(v as Uint8Array);
        break;
    }
  }
  w.join();
  return w.finish();
}

const TWO_32 = 4294967296;

class Reader {
  pos: number;
  constructor(readonly buf: Uint8Array, start: number, readonly end: number) {
    this.pos = start;
  }

  /** A varint as a number; above 2^53 - 1 (or a negative int64) it is refused. */
  varint(): number {
    const buf = this.buf;
    let b = buf[this.pos++]!;
    if (b < 0x80) return b;
    let lo = b & 0x7f;
    let shift = 7;
    while (shift < 28) {
      b = buf[this.pos++]!;
      lo |= (b & 0x7f) << shift;
      if (b < 0x80) return lo;
      shift += 7;
    }
    b = buf[this.pos++]!; // bits 28..34
    lo = (lo | ((b & 0x0f) << 28)) >>> 0;
    let hi = (b & 0x7f) >> 4;
    if (b >= 0x80) {
      shift = 3;
      for (;;) {
        if (this.pos >= this.end || shift > 31) throw new DecodeError("malformed varint");
        b = buf[this.pos++]!;
        hi |= (b & 0x7f) << shift;
        if (b < 0x80) break;
        shift += 7;
      }
    }
    if (this.pos > this.end) throw new DecodeError("truncated varint");
    hi >>>= 0;
    if (hi > 0x1fffff) throw new DecodeError("a value above 2^53 - 1 (or negative)");
    return hi * TWO_32 + lo;
  }

  skip(wire: number): void {
    switch (wire) {
      case 0:
        while (this.buf[this.pos++]! >= 0x80);
        break;
      case 1:
        this.pos += 8;
        break;
      case 2: {
        const n = this.varint();
        this.pos += n;
        break;
      }
      case 5:
        this.pos += 4;
        break;
      default:
        throw new DecodeError(`wire type ${wire} not supported`);
    }
    if (this.pos > this.end) throw new DecodeError("truncated field");
  }

  bytesEnd(): number {
    const n = this.varint();
    const end = this.pos + n;
    if (end > this.end) throw new DecodeError("truncated length-delimited field");
    return end;
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

function str(buf: Uint8Array, start: number, end: number): string {
  // Conversation ids are short and mostly ASCII: fromCharCode beats TextDecoder per call.
  if (end - start <= 64) {
    let ascii = true;
    for (let i = start; i < end; i++) {
      if (buf[i]! >= 0x80) {
        ascii = false;
        break;
      }
    }
    if (ascii) return String.fromCharCode.apply(null, buf.subarray(start, end) as unknown as number[]);
  }
  try {
    return utf8.decode(buf.subarray(start, end));
  } catch {
    throw new DecodeError("invalid UTF-8 in a string");
  }
}

export interface Split {
  requestId: number;
  field: number;
  body: Uint8Array;
}

/** Split a `ServerMessage` into request id, body field number and body bytes. */
export function splitServerMessage(data: Uint8Array): Split {
  const r = new Reader(data, 0, data.length);
  let requestId = 0;
  let field = 0;
  let body: Uint8Array = new Uint8Array(0);
  while (r.pos < r.end) {
    const tag = r.varint();
    const num = tag >>> 3;
    const wire = tag & 7;
    if (num === 1 && wire === 0) requestId = r.varint();
    else if (num >= 2 && wire === 2) {
      const end = r.bytesEnd();
      field = num;
      body = data.subarray(r.pos, end);
      r.pos = end;
    } else r.skip(wire);
  }
  return { requestId, field, body };
}

/** Decode a `SequenceUpdate` body. Fields equal to 0 are kept as 0 (= unchanged in deltas). */
export function decodeUpdate(body: Uint8Array): Update {
  const conversations = new Map<string, Row>();
  const removed: string[] = [];
  let syncToken: Uint8Array = new Uint8Array(0);
  let full = false;
  const r = new Reader(body, 0, body.length);
  while (r.pos < r.end) {
    const tag = r.varint();
    if (tag === 10) {
      // map entry: key = 1 (string), value = 2 (ConversationSequence)
      const entryEnd = r.bytesEnd();
      let key = "";
      let max = 0, read = 0, min = 0, timeMs = 0, membership = 0;
      while (r.pos < entryEnd) {
        const t = r.varint();
        if (t === 10) {
          const e = r.bytesEnd();
          key = str(body, r.pos, e);
          r.pos = e;
        } else if (t === 18) {
          const e = r.bytesEnd();
          while (r.pos < e) {
            const f = r.varint();
            if (f === 8) max = r.varint();
            else if (f === 16) read = r.varint();
            else if (f === 24) min = r.varint();
            else if (f === 32) timeMs = r.varint();
            else if (f === 40) membership = r.varint() >>> 0; // uint32: the low 32 bits, as protobuf
            else r.skip(f & 7);
          }
          if (r.pos !== e) throw new DecodeError("malformed ConversationSequence");
        } else r.skip(t & 7);
      }
      if (r.pos !== entryEnd) throw new DecodeError("malformed map entry");
      conversations.set(key, { max, read, min, timeMs, membership });
    } else if (tag === 18) {
      const e = r.bytesEnd();
      syncToken = body.slice(r.pos, e);
      r.pos = e;
    } else if (tag === 24) {
      full = r.varint() !== 0;
    } else if (tag === 34) {
      const e = r.bytesEnd();
      removed.push(str(body, r.pos, e));
      r.pos = e;
    } else r.skip(tag & 7);
  }
  if (r.pos !== r.end) throw new DecodeError("truncated SequenceUpdate");
  return { conversations, syncToken, full, removed };
}

// ------------------------------------------------------------------ small server bodies

function fields(body: Uint8Array, each: (no: number, r: Reader, wire: number) => boolean): void {
  const r = new Reader(body, 0, body.length);
  while (r.pos < r.end) {
    const tag = r.varint();
    if (!each(tag >>> 3, r, tag & 7)) r.skip(tag & 7);
  }
}

function strField(r: Reader, body: Uint8Array): string {
  const e = r.bytesEnd();
  const v = str(body, r.pos, e);
  r.pos = e;
  return v;
}

export interface Welcome {
  userId: string;
  sessionId: string;
  heartbeatIntervalMs: number;
  maxFrameBytes: number;
  serverTimeMs: number;
  role: string;
}

export function decodeWelcome(body: Uint8Array): Welcome {
  const m: Welcome = { userId: "", sessionId: "", heartbeatIntervalMs: 0, maxFrameBytes: 0, serverTimeMs: 0, role: "" };
  fields(body, (no, r, wire) => {
    if (no === 1 && wire === 2) m.userId = strField(r, body);
    else if (no === 2 && wire === 2) m.sessionId = strField(r, body);
    else if (no === 3 && wire === 0) m.heartbeatIntervalMs = r.varint();
    else if (no === 4 && wire === 0) m.maxFrameBytes = r.varint();
    else if (no === 5 && wire === 0) m.serverTimeMs = r.varint();
    else if (no === 6 && wire === 2) m.role = strField(r, body);
    else return false;
    return true;
  });
  return m;
}

/** `Ack.read_sequence` */
export function decodeAck(body: Uint8Array): number {
  let read = 0;
  fields(body, (no, r, wire) => (no === 1 && wire === 0 ? ((read = r.varint()), true) : false));
  return read;
}

export function decodeError(body: Uint8Array): { code: number; message: string } {
  const m = { code: 0, message: "" };
  fields(body, (no, r, wire) => {
    if (no === 1 && wire === 0) m.code = r.varint();
    else if (no === 2 && wire === 2) m.message = strField(r, body);
    else return false;
    return true;
  });
  return m;
}

export function decodeAllocated(body: Uint8Array): { firstSequence: number; lastSequence: number; timeMs: number } {
  const m = { firstSequence: 0, lastSequence: 0, timeMs: 0 };
  fields(body, (no, r, wire) => {
    if (wire !== 0 || no < 1 || no > 3) return false;
    const v = r.varint();
    if (no === 1) m.firstSequence = v;
    else if (no === 2) m.lastSequence = v;
    else m.timeMs = v;
    return true;
  });
  return m;
}

export function decodeGoAway(body: Uint8Array): { reason: string; reconnectAfterMs: number } {
  const m = { reason: "", reconnectAfterMs: 0 };
  fields(body, (no, r, wire) => {
    if (no === 1 && wire === 2) m.reason = strField(r, body);
    else if (no === 2 && wire === 0) m.reconnectAfterMs = r.varint();
    else return false;
    return true;
  });
  return m;
}

export interface ReadCountsBody {
  conversationId: string;
  fromSequence: number;
  memberCount: number;
  counts: number[];
}

export function decodeReadCounts(body: Uint8Array): ReadCountsBody {
  const m: ReadCountsBody = { conversationId: "", fromSequence: 0, memberCount: 0, counts: [] };
  fields(body, (no, r, wire) => {
    if (no === 1 && wire === 2) m.conversationId = strField(r, body);
    else if (no === 2 && wire === 0) m.fromSequence = r.varint();
    else if (no === 3 && wire === 0) m.memberCount = r.varint();
    else if (no === 4 && wire === 2) {
      const e = r.bytesEnd(); // packed
      while (r.pos < e) m.counts.push(r.varint());
      if (r.pos !== e) throw new DecodeError("malformed packed counts");
    } else if (no === 4 && wire === 0) m.counts.push(r.varint());
    else return false;
    return true;
  });
  return m;
}

export function decodeReaders(body: Uint8Array): { userIds: string[]; nextAfterUserId: string } {
  const m = { userIds: [] as string[], nextAfterUserId: "" };
  fields(body, (no, r, wire) => {
    if (no === 1 && wire === 2) m.userIds.push(strField(r, body));
    else if (no === 2 && wire === 2) m.nextAfterUserId = strField(r, body);
    else return false;
    return true;
  });
  return m;
}
