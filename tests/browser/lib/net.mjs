// A static HTTP server for the test pages (another origin than Kometa, so
// the client's cross-origin requests and CORS are exercised), and a TCP proxy
// in front of Kometa that can refuse WebSocket upgrades (or SSE streams), cut
// every connection, refuse new ones, and switch to another upstream.
import http from "node:http";
import net from "node:net";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { ROOT } from "./kometa.mjs";

const TYPES = { ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8", ".ts": "text/plain; charset=utf-8" };
const ROUTES = {
  "/kometa.js": "client/kometa.js",
  "/kometa.mjs": "client/kometa.mjs",
  "/kometa.d.ts": "client/kometa.d.ts",
  // The stock SockJS client, installed by scripts/install-browser-deps.sh.
  "/sockjs.js": "tests/browser/node_modules/sockjs-client/dist/sockjs.min.js",
};

export function startStatic() {
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://x");
    let file = ROUTES[url.pathname];
    if (!file && /^\/pages\/[\w.-]+\.html$/.test(url.pathname)) file = "tests/browser" + url.pathname;
    if (!file) {
      res.writeHead(404, { "Content-Type": "text/plain" });
      return res.end("not found");
    }
    try {
      const body = await readFile(path.join(ROOT, file));
      res.writeHead(200, { "Content-Type": TYPES[path.extname(file)] || "application/octet-stream", "Cache-Control": "no-store" });
      res.end(body);
    } catch (e) {
      res.writeHead(500);
      res.end(String(e));
    }
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      resolve({ url: `http://127.0.0.1:${port}`, port, close: () => new Promise((r) => { server.closeAllConnections(); server.close(r); }) });
    });
  });
}

// mode: "pass" | "block-ws" (403 to WebSocket upgrades) | "block-ws-sse"
// (also 403 to GET /sse) | "down" (accept and drop at once). stall(): the
// open connections stay open but carry nothing more (a silent network drop).
export function startProxy(upstreamPort) {
  const sockets = new Set();
  const pairs = new Set();
  const state = { mode: "pass", upstream: upstreamPort, upgrades: 0, refused: 0 };
  const server = net.createServer((client) => {
    if (state.mode === "down") return client.destroy();
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    let head = Buffer.alloc(0);
    const onData = (d) => {
      head = Buffer.concat([head, d]);
      const end = head.indexOf("\r\n\r\n");
      if (end < 0 && head.length < 16384) return;
      client.off("data", onData);
      client.pause();
      const text = head.subarray(0, end < 0 ? head.length : end).toString("latin1");
      const isWs = /^upgrade:\s*websocket/im.test(text);
      const isSse = /^GET \/sse[?\s]/.test(text);
      if (isWs) state.upgrades++;
      if ((isWs && state.mode.startsWith("block-ws")) || (isSse && state.mode === "block-ws-sse")) {
        state.refused++;
        client.end("HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 18\r\nConnection: close\r\n\r\nblocked by a proxy");
        return;
      }
      const up = net.connect(state.upstream, "127.0.0.1");
      sockets.add(up);
      up.on("close", () => { sockets.delete(up); client.destroy(); });
      up.on("error", () => client.destroy());
      client.on("close", () => up.destroy());
      up.write(head);
      up.pipe(client);
      client.pipe(up);
      client.resume();
      pairs.add({ client, up });
      client.on("close", () => { for (const pr of pairs) if (pr.client === client) pairs.delete(pr); });
    };
    client.on("data", onData);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      resolve({
        port,
        url: `http://127.0.0.1:${port}`,
        state,
        setMode(mode) { state.mode = mode; },
        setUpstream(p) { state.upstream = p; },
        // Drop every open connection (both directions, no goodbye).
        cut() { for (const s of sockets) s.destroy(); sockets.clear(); pairs.clear(); },
        stall() {
          for (const { client, up } of pairs) {
            client.unpipe(up);
            up.unpipe(client);
            client.pause();
            up.pause();
          }
          pairs.clear();
        },
        close() {
          for (const s of sockets) s.destroy();
          return new Promise((r) => server.close(r));
        },
      });
    });
  });
}
