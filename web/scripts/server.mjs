// A small static file server for the demo and the browser tests (serves the repository root, so
// the demo reaches the bundled tiny models in tests/fixtures/).
//
//   node web/scripts/server.mjs [port]     then open http://127.0.0.1:<port>/web/demo/
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.css': 'text/css', '.wasm': 'application/wasm', '.json': 'application/json',
  '.txt': 'text/plain', '.png': 'image/png', '.safetensors': 'application/octet-stream',
};

export function send(res, status, body, type = 'text/plain') {
  res.writeHead(status, { 'content-type': type, 'content-length': body.length, 'cache-control': 'no-store' });
  res.end(body);
}

export const typeOf = (p) => TYPES[path.extname(p)] || 'application/octet-stream';

/**
 * Starts the server on 127.0.0.1, serving `dir`. `route(pathname, res)` may answer a request first (return
 * true); `onFile(pathname)` sees every file served.
 */
export async function serve({ port = 0, dir = root, route = () => false, onFile = () => {} } = {}) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    let p = decodeURIComponent(url.pathname);
    if (route(p, res)) return;
    if (p.endsWith('/')) p += 'index.html';
    const file = path.join(dir, p);
    if (!file.startsWith(dir + path.sep) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      return send(res, 404, Buffer.from('not found'));
    }
    onFile(p);
    send(res, 200, fs.readFileSync(file), typeOf(p));
  });
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return server;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const server = await serve({ port: Number(process.argv[2] || 8080) });
  console.log(`demo: http://127.0.0.1:${server.address().port}/web/demo/`);
}
