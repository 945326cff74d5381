// Bun's own WebSocket server, for bench/connect.py (handshakes per second) and
// bench/fanout.py (server.publish to N connections) on this machine.
// Usage: bun bun_server.js [PORT] [PAYLOAD_HEX]   (port 0 or none: any free port)
// Prints "listening on PORT" once it accepts; upgrades GET /v1, 404 otherwise; ignores
// messages; exits when stdin closes (the benchmark's pipe) or on SIGTERM.
// With PAYLOAD_HEX (fan-out): every connection subscribes to one topic, and a "blast" on the
// control channel (control.js) is one server.publish(topic, payload) per round: Bun frames
// it once and writes it to every subscriber. A subscriber with more than BACKPRESSURE_LIMIT
// bytes unsent skips the message (as the raw baseline skips a full socket).
"use strict";
const { control } = require("./control.js");

const TOPIC = "fanout";
const BACKPRESSURE_LIMIT = 64 * 1024;
const payload = process.argv[3] ? Buffer.from(process.argv[3], "hex") : null;
let connected = 0;

const server = Bun.serve({
  hostname: "127.0.0.1",
  port: Number(process.argv[2] || 0),
  fetch(req, srv) {
    if (new URL(req.url).pathname === "/v1" && srv.upgrade(req)) return undefined;
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    perMessageDeflate: false,
    backpressureLimit: BACKPRESSURE_LIMIT,
    closeOnBackpressureLimit: false,
    open(ws) {
      connected++;
      if (payload) ws.subscribe(TOPIC);
    },
    close() {
      connected--;
    },
    message() {},
  },
});
console.log(`listening on ${server.port}`);
control({
  count: () => connected,
  round: () => {
    server.publish(TOPIC, payload);
    return connected;
  },
});
