// Real Kometa servers for the browser tests: start, stop, restart, and a
// small admin-protocol client (docs/admin-protocol.md) to publish, send to
// users and read stats without spawning a process per request.
import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = path.join(ROOT, "target/debug/kometa");

const servers = new Set();

// `config`: TOML for a config file (sections such as [sockjs]).
export async function startKometa({ listen = "127.0.0.1:0", tokenSecret = null, shards = 2, env = {}, config = null } = {}) {
  const dir = mkdtempSync(path.join(os.tmpdir(), "kometa-browser-"));
  const admin = "unix:" + path.join(dir, "admin.sock");
  const args = ["serve", "--listen", listen, "--admin", admin, "--shards", String(shards)];
  if (tokenSecret) args.push("--token-secret", tokenSecret);
  if (config) {
    writeFileSync(path.join(dir, "kometa.toml"), config);
    args.push("--config", path.join(dir, "kometa.toml"));
  }
  const proc = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn", ...env } });
  let stderr = "";
  proc.stderr.on("data", (d) => { stderr = (stderr + d).slice(-20000); });
  const addr = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error("kometa did not start in 10 s: " + stderr)), 10000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /kometa ready listen=(\S+)/.exec(out);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on("exit", (code) => { clearTimeout(timer); reject(new Error(`kometa exited (${code}): ${stderr}`)); });
  });
  const server = {
    addr,
    port: Number(addr.split(":").pop()),
    url: "http://" + addr,
    admin,
    proc,
    log: () => stderr,
    adminClient: null,
    async stop() {
      servers.delete(server);
      if (server.adminClient) server.adminClient.close();
      server.adminClient = null;
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
    async client() {
      if (!server.adminClient) server.adminClient = await AdminClient.connect(admin.slice(5));
      return server.adminClient;
    },
    async publish(channel, event, data) { return (await server.client()).publish(channel, event, data); },
    async sendUser(users, event, data) { return (await server.client()).sendUser(users, event, data); },
    async stats() { return (await server.client()).stats(); },
    // The CLI, as a backend operator would use it.
    cli(...cmd) {
      return new Promise((resolve, reject) => {
        execFile(BIN, [...cmd, "--admin", admin], { timeout: 10000 }, (err, stdout, stderr2) => {
          if (err) reject(new Error(`kometa ${cmd.join(" ")}: ${stderr2 || err.message}`));
          else resolve(stdout.trim());
        });
      });
    },
  };
  servers.add(server);
  return server;
}

export async function stopAll() {
  await Promise.all([...servers].map((s) => s.stop()));
}

export function token(secret, sub, ttl = 3600) {
  return new Promise((resolve, reject) => {
    execFile(BIN, ["token", "--secret", secret, "--sub", String(sub), "--ttl", String(ttl)], { timeout: 10000 }, (err, stdout) => {
      if (err) reject(err);
      else resolve(stdout.trim());
    });
  });
}

// ---- admin protocol (binary, length-prefixed, pipelined, replies in order)

const OP = { PUBLISH: 0x02, STATS: 0x03, SEND_USER: 0x04 };

function str16(s) {
  const b = Buffer.from(s, "utf8");
  const out = Buffer.alloc(2 + b.length);
  out.writeUInt16BE(b.length, 0);
  b.copy(out, 2);
  return out;
}
function bytes32(b) {
  const out = Buffer.alloc(4 + b.length);
  out.writeUInt32BE(b.length, 0);
  b.copy(out, 4);
  return out;
}

class AdminClient {
  static connect(sockPath) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(sockPath);
      sock.once("connect", () => resolve(new AdminClient(sock)));
      sock.once("error", reject);
    });
  }
  constructor(sock) {
    this.sock = sock;
    this.nextId = 1;
    this.waiting = new Map();
    this.buf = Buffer.alloc(0);
    sock.on("data", (d) => this._data(d));
    sock.on("error", () => {});
    sock.on("close", () => {
      for (const w of this.waiting.values()) w.reject(new Error("admin socket closed"));
      this.waiting.clear();
    });
  }
  close() { this.sock.destroy(); }
  _data(d) {
    this.buf = Buffer.concat([this.buf, d]);
    while (this.buf.length >= 4) {
      const len = this.buf.readUInt32BE(0);
      if (this.buf.length < 4 + len) return;
      const frame = this.buf.subarray(4, 4 + len);
      this.buf = this.buf.subarray(4 + len);
      const status = frame[0];
      const id = frame.readUInt32BE(2);
      const payload = frame.subarray(6);
      const w = this.waiting.get(id);
      if (!w) continue;
      this.waiting.delete(id);
      if (status === 0) w.resolve(payload);
      else {
        const code = payload.readUInt16BE(0);
        const n = payload.readUInt16BE(2);
        w.reject(new Error(`admin error ${code}: ${payload.subarray(4, 4 + n).toString()}`));
      }
    }
  }
  _request(op, payload) {
    const id = this.nextId++;
    const head = Buffer.alloc(10);
    head.writeUInt32BE(6 + payload.length, 0);
    head[4] = op;
    head[5] = 0;
    head.writeUInt32BE(id, 6);
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.sock.write(Buffer.concat([head, payload]));
    });
  }
  async publish(channel, event, data) {
    const p = await this._request(OP.PUBLISH, Buffer.concat([str16(channel), str16(event), bytes32(Buffer.from(JSON.stringify(data)))]));
    const n = p.readUInt16BE(16);
    return { offset: Number(p.readBigUInt64BE(0)), subscribers: Number(p.readBigUInt64BE(8)), epoch: p.subarray(18, 18 + n).toString() };
  }
  async stats() {
    const p = await this._request(OP.STATS, Buffer.alloc(0));
    return JSON.parse(p.subarray(4, 4 + p.readUInt32BE(0)).toString());
  }
  async sendUser(users, event, data) {
    const count = Buffer.alloc(2);
    count.writeUInt16BE(users.length, 0);
    const p = await this._request(OP.SEND_USER, Buffer.concat([count, ...users.map(str16), str16(event), bytes32(Buffer.from(JSON.stringify(data)))]));
    return JSON.parse(p.subarray(4, 4 + p.readUInt32BE(0)).toString());
  }
}
