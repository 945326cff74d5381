// Bun's own WebSocket server, for bench/connect.py (handshakes per second) on this machine.
// Usage: bun bun_server.js [PORT]   (0 or none: any free port)
// Prints "listening on PORT" once it accepts; upgrades GET /v1, 404 otherwise; ignores
// messages; exits when stdin closes (the benchmark's pipe) or on SIGTERM.
const server = Bun.serve({
  hostname: "127.0.0.1",
  port: Number(process.argv[2] || 0),
  fetch(req, srv) {
    if (new URL(req.url).pathname === "/v1" && srv.upgrade(req)) return undefined;
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    perMessageDeflate: false,
    message() {},
  },
});
console.log(`listening on ${server.port}`);
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
