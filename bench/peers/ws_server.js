// Node + ws WebSocket server, for bench/connect.py (handshakes per second) on this machine.
// Usage: node ws_server.js [PORT]   (0 or none: any free port)
// Prints "listening on PORT" once it accepts; upgrades /v1 (ws answers 400 elsewhere);
// ignores messages; exits when stdin closes (the benchmark's pipe) or on SIGTERM.
"use strict";
const { WebSocketServer } = require("ws");

const LISTEN_BACKLOG = 4096;
const wss = new WebSocketServer({
  host: "127.0.0.1",
  port: Number(process.argv[2] || 0),
  path: "/v1",
  backlog: LISTEN_BACKLOG,
  perMessageDeflate: false,
  clientTracking: false,
});
wss.on("listening", () => console.log(`listening on ${wss.address().port}`));
wss.on("connection", (ws) => {
  ws.on("message", () => {});
  ws.on("error", () => {});
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
