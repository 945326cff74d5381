// Browser bundles (esbuild): the SDK alone (dist/seqactor.min.js, whose min+gz size the
// bench reports) and the demo page (demo/dist/demo.js).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const common = { bundle: true, format: "esm", minify: true, target: "es2022", platform: "browser", absWorkingDir: root, logLevel: "warning" };

await build({ ...common, entryPoints: ["dist/index.js"], outfile: "dist/seqactor.min.js" });
await build({ ...common, entryPoints: ["demo/demo.ts"], outfile: "demo/dist/demo.js", sourcemap: true });

const min = readFileSync(`${root}/dist/seqactor.min.js`);
console.log(`browser bundle: ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} bytes min+gz`);
