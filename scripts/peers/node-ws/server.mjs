// A Node `ws` broadcast server for scripts/bench-peers.sh, written the way
// users of `ws` write one: WebSocket subscribers on /sub/CHANNEL, and
// POST /pub/CHANNEL sends the body to every subscriber of the channel with
// client.send() (the broadcast loop from the ws README).
//
//   node server.mjs [PORT]      prints "node-ws ready listen=127.0.0.1:PORT"
import http from "node:http";
import { WebSocketServer, WebSocket } from "ws";

const channels = new Map();
const server = http.createServer((req, res) => {
  const match = /^\/pub\/([\w.-]+)$/.exec(req.url || "");
  if (req.method !== "POST" || !match) {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const data = Buffer.concat(chunks).toString("utf8");
    const subscribers = channels.get(match[1]) || new Set();
    for (const client of subscribers) {
      if (client.readyState === WebSocket.OPEN) client.send(data);
    }
    res.writeHead(200, { "Content-Type": "text/plain" }).end(String(subscribers.size));
  });
});

const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on("connection", (ws, req) => {
  const match = /^\/sub\/([\w.-]+)$/.exec(req.url || "");
  if (!match) {
    ws.close(1008, "use /sub/CHANNEL");
    return;
  }
  const channel = match[1];
  if (!channels.has(channel)) channels.set(channel, new Set());
  channels.get(channel).add(ws);
  ws.on("close", () => channels.get(channel).delete(ws));
  ws.on("error", () => {});
});

const port = Number(process.argv[2] || 0);
server.listen(port, "127.0.0.1", () => {
  console.log(`node-ws ready listen=127.0.0.1:${server.address().port}`);
});
