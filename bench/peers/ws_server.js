// Node + ws WebSocket server, for bench/connect.py (handshakes per second) and
// bench/fanout.py (broadcast to N connections) on this machine.
// Usage: node ws_server.js [PORT] [PAYLOAD_HEX]   (port 0 or none: any free port)
// Prints "listening on PORT" once it accepts; upgrades /v1 (ws answers 400 elsewhere);
// ignores messages; exits when stdin closes (the benchmark's pipe) or on SIGTERM.
// With PAYLOAD_HEX (fan-out): the server tracks its clients, and a "blast" on the control
// channel (control.js) is ws's broadcast idiom per round: for each open client,
// client.send(payload) (binary). A client with more than BACKPRESSURE_LIMIT bytes unsent
// (bufferedAmount) skips the message (as the raw baseline skips a full socket).
"use strict";
const { WebSocketServer, WebSocket } = require("ws");
const { control } = require("./control.js");

const LISTEN_BACKLOG = 4096;
const BACKPRESSURE_LIMIT = 64 * 1024;
const payload = process.argv[3] ? Buffer.from(process.argv[3], "hex") : null;
let connected = 0;

const wss = new WebSocketServer({
  host: "127.0.0.1",
  port: Number(process.argv[2] || 0),
  path: "/v1",
  backlog: LISTEN_BACKLOG,
  perMessageDeflate: false,
  clientTracking: payload !== null, // the handshake bench keeps no client set
});
wss.on("listening", () => console.log(`listening on ${wss.address().port}`));
wss.on("connection", (ws) => {
  connected++;
  ws.on("close", () => connected--);
  ws.on("message", () => {});
  ws.on("error", () => {});
});
control({
  count: () => connected,
  round: () => {
    let sent = 0;
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN && client.bufferedAmount <= BACKPRESSURE_LIMIT) {
        client.send(payload, { binary: true });
        sent++;
      }
    }
    return sent;
  },
});
