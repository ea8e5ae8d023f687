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
 * Answers a byte-range request (`Range: bytes=a-b`, as static hosts serve them) for `body` with
 * 206 (416 when it starts past the end); false when the request asks for no range.
 */
export function sendRange(res, p, body) {
  const range = /^bytes=(\d+)-(\d*)$/.exec(res.req.headers.range || '');
  if (!range) return false;
  const start = Number(range[1]);
  const end = Math.min(range[2] ? Number(range[2]) : body.length - 1, body.length - 1);
  if (start > end) {
    send(res, 416, Buffer.from('range not satisfiable'));
    return true;
  }
  res.writeHead(206, {
    'content-type': typeOf(p), 'content-length': end - start + 1, 'cache-control': 'no-store',
    'content-range': `bytes ${start}-${end}/${body.length}`,
  });
  res.end(body.subarray(start, end + 1));
  return true;
}

/**
 * Starts the server on 127.0.0.1, serving `dir`. `route(pathname, res)` may answer a request first (return
 * true); `onFile(pathname, { range })` sees every file served (`range`: only a byte range of it).
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
    const body = fs.readFileSync(file);
    // Byte ranges (`Range: bytes=a-b`), as static hosts serve them: the package reads weight
    // headers this way before it downloads anything.
    onFile(p, { range: /^bytes=(\d+)-(\d*)$/.test(req.headers.range || '') });
    if (!sendRange(res, p, body)) send(res, 200, body, typeOf(p));
  });
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return server;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const server = await serve({ port: Number(process.argv[2] || 8080) });
  console.log(`demo: http://127.0.0.1:${server.address().port}/web/demo/`);
}
