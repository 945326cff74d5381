// The control channel bench/fanout.py drives the peer servers with (bun_server.js and
// ws_server.js in fan-out mode): JSON lines on stdin, one JSON line answered on stdout.
//   {"cmd": "count"}                -> {"connected": n}
//   {"cmd": "blast", "seconds": S}  -> broadcast the frame round after round for S seconds
//                                      (one round per event-loop turn, so writes drain in
//                                      between), then {"sent": frames offered, "secs": elapsed}
//   {"cmd": "exit"}
// The process exits when stdin closes (the benchmark's pipe).
"use strict";

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// count(): open connections; round(): broadcast once, returns the frames offered.
function control({ count, round }) {
  function blast(seconds) {
    const t0 = performance.now();
    const deadline = t0 + seconds * 1000;
    let sent = 0;
    const step = () => {
      sent += round();
      const now = performance.now();
      if (now < deadline) setImmediate(step);
      else reply({ sent, secs: (now - t0) / 1000 });
    };
    step();
  }

  let buf = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk) => {
    buf += chunk;
    for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
      const cmd = JSON.parse(buf.slice(0, i));
      buf = buf.slice(i + 1);
      if (cmd.cmd === "count") reply({ connected: count() });
      else if (cmd.cmd === "blast") blast(cmd.seconds);
      else if (cmd.cmd === "exit") process.exit(0);
      else reply({ error: `unknown command ${cmd.cmd}` });
    }
  });
  process.stdin.on("end", () => process.exit(0));
}

module.exports = { control };
