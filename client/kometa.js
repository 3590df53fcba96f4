/*!
 * kometa.js: the browser client of the Kometa push server (client protocol v1).
 * Plain JavaScript, no dependencies, no build step. MIT OR Apache-2.0.
 *
 *   <script src="https://push.example.com/kometa.js"></script>
 *   const k = Kometa.connect("https://push.example.com", {token});
 *   k.subscribe("news.update", (msg) => show(msg.data));
 *
 * or as a module: import Kometa from "https://push.example.com/kometa.mjs";
 *
 * Layout (top to bottom):
 *   helpers          errors, an event emitter, URLs, backoff, JWT claims
 *   WsLink           one WebSocket
 *   SseLink/PollLink one HTTP session: EventSource or long-poll fetches,
 *                    commands as POST /cmd batches (HttpLink)
 *   Core             the connection: transport choice and fallback, reconnect
 *                    with backoff, handshake, resubscribe from positions,
 *                    requests with ids and timeouts, the offline queue,
 *                    liveness pings, upgrade probes back to a better transport
 *   Hub              the consumers of one Core: the tab that runs it and, when
 *                    the connection is shared, the other tabs (over
 *                    BroadcastChannel); inbox acknowledgements
 *   Shared           leader election (Web Locks, or BroadcastChannel when
 *                    Web Locks are missing) and the tab-to-tab messages
 *   Client           the public object (Kometa.connect): subscriptions with
 *                    ordered, duplicate-free delivery per channel (gaps filled
 *                    from history), requests, user messages, state events
 *
 * Server data is only ever parsed with JSON.parse and handed to callbacks; it
 * is never evaluated, never used as code, and never written as HTML.
 */
(function (root) {
  "use strict";

  if (root.Kometa && root.Kometa.version) return; // loaded twice: keep the first

  const VERSION = "1.0.0";
  const TRANSPORTS = ["websocket", "sse", "longpoll"];
  // Safe to send again after a lost connection (they change nothing).
  const IDEMPOTENT = new Set(["ping", "presence", "presence_stats", "history"]);
  const DEFAULTS = Object.freeze({
    token: null,
    transports: TRANSPORTS,
    share: true,
    timeout: 10000,
    queueSize: 100,
    queueTimeout: 30000,
    openTimeout: 6000,
    reconnectDelayMin: 500,
    reconnectDelayMax: 30000,
    upgradeDelay: 60000,
    pingInterval: 25000,
    pingTimeout: 10000,
    pollTimeout: 40000,
    inboxTimeout: 15000,
    debug: false,
  });
  const UPGRADE_DELAY_MAX_MS = 10 * 60000;
  const HTTP_BATCH_BYTES_MAX = 60000; // under the server's http_body_bytes_max (64 KiB)
  const HTTP_BATCH_COMMANDS_MAX = 64; // = session_commands_pending_max
  const INBOX_BUFFER_MAX = 100; // user messages held until a tab handles them
  const REORDER_BUFFER_MAX = 5000; // pushes held per channel while a gap is filled
  const HISTORY_PAGE = 100;

  // ------------------------------------------------------------------ helpers

  const now = () => Date.now();

  function randomId() {
    const bytes = new Uint8Array(8);
    if (root.crypto && root.crypto.getRandomValues) root.crypto.getRandomValues(bytes);
    else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // An exception thrown by application code (a callback) must not break the
  // client, but must not vanish either.
  function report(err) {
    if (typeof root.reportError === "function") root.reportError(err);
    else setTimeout(() => { throw err; });
  }

  class KometaError extends Error {
    constructor(code, message) {
      super(message || code);
      this.name = "KometaError";
      this.code = code;
    }
  }

  const errorOf = (e) =>
    e instanceof KometaError ? e : new KometaError(String((e && e.code) || "internal"), String((e && e.message) || e));
  const errorJSON = (e) => ({ code: e.code || "internal", message: String(e.message || e.code) });

  // A server message: one JSON object, or null for anything else.
  function parseObject(text) {
    try {
      const v = JSON.parse(text);
      return v !== null && typeof v === "object" && !Array.isArray(v) ? v : null;
    } catch (_) {
      return null;
    }
  }

  function utf8Length(s) {
    let n = s.length;
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c >= 0x80) n += c >= 0x800 && (c < 0xd800 || c > 0xdfff) ? 2 : 1;
    }
    return n;
  }

  class Emitter {
    constructor() { this._handlers = new Map(); }
    on(name, fn) {
      if (typeof fn !== "function") throw new TypeError("Kometa: a callback function is required");
      if (!this._handlers.has(name)) this._handlers.set(name, new Set());
      this._handlers.get(name).add(fn);
      return () => this.off(name, fn);
    }
    off(name, fn) {
      const set = this._handlers.get(name);
      if (set) set.delete(fn);
    }
    emit(name, value) {
      const set = this._handlers.get(name);
      if (!set) return;
      for (const fn of [...set]) {
        try { fn(value); } catch (e) { report(e); }
      }
    }
  }

  // "http://h:p", "https://h/prefix", "ws://h:p/ws", "" (this page's origin)
  // → the four endpoints.
  function endpoints(url) {
    const base = root.location && root.location.href ? root.location.href : undefined;
    const u = new URL(url || "/", base);
    const secure = u.protocol === "https:" || u.protocol === "wss:";
    if (!/^(https?|wss?):$/.test(u.protocol)) throw new TypeError("Kometa: unsupported URL " + u.href);
    const path = u.pathname.replace(/\/+$/, "").replace(/\/(ws|sse|poll|cmd|demo|kometa\.m?js)$/, "");
    const http = (secure ? "https://" : "http://") + u.host + path;
    return {
      base: http,
      ws: (secure ? "wss://" : "ws://") + u.host + path + "/ws",
      sse: http + "/sse",
      poll: http + "/poll",
      cmd: http + "/cmd",
    };
  }

  // "Equal jitter": half the capped exponential delay, plus up to as much again.
  function backoff(attempt, min, max) {
    const cap = Math.min(max, min * Math.pow(2, Math.min(attempt, 30)));
    return Math.round(cap / 2 + (Math.random() * cap) / 2);
  }

  // The claims of a JWT (unverified: only to read `sub` and `exp`).
  function jwtClaims(token) {
    try {
      const part = String(token).split(".")[1];
      const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
      const bin = atob(b64);
      const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
      return parseObject(new TextDecoder().decode(bytes));
    } catch (_) {
      return null;
    }
  }

  // ------------------------------------------------------------------ links
  //
  // A link is one attempt at a connection over one transport. The Core sets
  // onopen(info), onmessage(obj) and onclose(info) and calls open(),
  // send(texts), fail(reason) and close(). onclose is called once, only when
  // the link ends by itself or through fail(); never after close().

  class WsLink {
    constructor(env, token) {
      this.kind = "websocket";
      this.env = env;
      this.token = token;
      this.ws = null;
      this.dead = false;
      this.lastRecv = now();
    }
    open() {
      let ws;
      try {
        ws = new this.env.WebSocket(this.env.ep.ws, "kometa.v1");
      } catch (e) {
        Promise.resolve().then(() => this._end({ code: 0, reason: String((e && e.message) || e) }));
        return;
      }
      this.ws = ws;
      ws.onopen = () => { if (!this.dead) this.onopen({ resumed: false }); };
      ws.onmessage = (e) => {
        if (this.dead) return;
        this.lastRecv = now();
        const m = typeof e.data === "string" ? parseObject(e.data) : null;
        if (m) this.onmessage(m);
      };
      ws.onerror = () => {};
      ws.onclose = (e) => this._end({ code: e.code, reason: e.reason || "" });
    }
    send(texts) {
      if (this.dead || !this.ws || this.ws.readyState !== 1) return;
      for (const t of texts) this.ws.send(t);
    }
    fail(reason) {
      this._teardown();
      this._end({ code: 0, reason });
    }
    close() {
      this._teardown();
      this.dead = true;
    }
    _teardown() {
      const ws = this.ws;
      if (!ws) return;
      ws.onopen = ws.onmessage = ws.onclose = null;
      try { ws.close(1000); } catch (_) { /* already closing */ }
    }
    _end(info) {
      if (this.dead) return;
      this.dead = true;
      this.onclose(info);
    }
  }

  // An HTTP session (SSE or long-poll): its id and the last seq received, so
  // a new link can resume it; commands are POSTed in order, in batches.
  class HttpLink {
    constructor(env, token, resume) {
      this.env = env;
      this.token = token;
      this.session = resume ? resume.session : null;
      this.seq = resume ? resume.seq : 0;
      this.resuming = !!resume;
      this.opened = false;
      this.dead = false;
      this.out = [];
      this.posting = false;
      this.lastRecv = now();
      this.aborts = new Set();
    }
    query(extra) {
      const q = new URLSearchParams();
      for (const k of Object.keys(extra)) q.set(k, extra[k]);
      if (this.token) q.set("token", this.token);
      return q.toString();
    }
    // Every message of the stream; session announcements decide open/resumed.
    handle(m) {
      this.lastRecv = now();
      if (typeof m.session === "string" && "resumed" in m && m.id === undefined && m.channel === undefined) {
        const resumed = m.resumed === true && m.session === this.session;
        this.session = m.session;
        this.opened = true;
        this.onopen({ resumed, reason: m.reason, user: m.user === undefined ? null : m.user, session: m.session });
        return;
      }
      if (!this.opened) {
        // A resumed session went straight on with its messages.
        this.opened = true;
        this.onopen({ resumed: true, session: this.session });
      }
      if (!this.dead) this.onmessage(m);
    }
    send(texts) {
      if (this.dead) return;
      for (const t of texts) this.out.push(t);
      if (!this.posting) {
        this.posting = true;
        Promise.resolve().then(() => this._drain());
      }
    }
    async _drain() {
      while (!this.dead && this.out.length && this.session) {
        const batch = [];
        let bytes = 2;
        while (this.out.length && batch.length < HTTP_BATCH_COMMANDS_MAX) {
          const n = utf8Length(this.out[0]) + 1;
          if (batch.length && bytes + n > HTTP_BATCH_BYTES_MAX) break;
          batch.push(this.out.shift());
          bytes += n;
        }
        if (!(await this._post(batch, false))) return;
      }
      this.posting = false;
    }
    // POST /cmd. `probe`: failures are ignored (the stream decides).
    async _post(batch, probe) {
      const url = this.env.ep.cmd + "?session=" + encodeURIComponent(this.session);
      for (let attempt = 0; ; attempt++) {
        let res;
        const ctl = new AbortController();
        this.aborts.add(ctl);
        const timer = setTimeout(() => ctl.abort(), this.env.opts.timeout);
        try {
          // text/plain keeps the request "simple": no CORS preflight per batch.
          res = await this.env.fetch(url, {
            method: "POST",
            body: "[" + batch.join(",") + "]",
            headers: { "Content-Type": "text/plain;charset=UTF-8" },
            cache: "no-store",
            credentials: "omit",
            signal: ctl.signal,
          });
        } catch (_) {
          res = null;
        } finally {
          clearTimeout(timer);
          this.aborts.delete(ctl);
        }
        if (this.dead) return false;
        if (probe) return true;
        if (!res) { this.fail("command request failed"); return false; }
        if (res.status >= 200 && res.status < 300) return true;
        if (res.status === 429 && attempt < 30) {
          await new Promise((ok) => setTimeout(ok, Math.min(2000, 50 * Math.pow(2, attempt))));
          if (this.dead) return false;
          continue;
        }
        if (res.status === 400 || res.status === 413) {
          // The server refused the batch: answer each command with an error.
          const code = res.status === 413 ? "message_too_large" : "bad_request";
          for (const text of batch) {
            const cmd = parseObject(text);
            if (cmd && cmd.id !== undefined) {
              this.onmessage({ id: cmd.id, error: { code, message: "POST /cmd answered " + res.status } });
            }
          }
          return true;
        }
        this.fail("POST /cmd answered " + res.status);
        return false;
      }
    }
    fail(reason) {
      this._end({ code: 0, reason });
    }
    // Intentional close; `disconnect` also ends the server session at once.
    close(disconnect) {
      const session = this.session;
      this.dead = true;
      this._teardown();
      if (disconnect && session) {
        try {
          this.env.fetch(this.env.ep.cmd + "?session=" + encodeURIComponent(session), {
            method: "POST",
            body: '[{"op":"disconnect"}]',
            headers: { "Content-Type": "text/plain;charset=UTF-8" },
            credentials: "omit",
            keepalive: true,
          }).catch(() => {});
        } catch (_) { /* page going away */ }
      }
    }
    _teardown() {
      for (const ctl of this.aborts) ctl.abort();
      this.aborts.clear();
    }
    _end(info) {
      if (this.dead) return;
      this.dead = true;
      this._teardown();
      this.onclose(info);
    }
  }

  class SseLink extends HttpLink {
    constructor(env, token, resume) {
      super(env, token, resume);
      this.kind = "sse";
      this.es = null;
    }
    open() {
      const q = this.session ? { session: this.session, last_event_id: this.session + ":" + this.seq } : {};
      let es;
      try {
        es = new this.env.EventSource(this.env.ep.sse + "?" + this.query(q));
      } catch (e) {
        Promise.resolve().then(() => this._end({ code: 0, reason: String((e && e.message) || e) }));
        return;
      }
      this.es = es;
      es.onopen = () => {
        if (this.dead) return;
        this.streamOpen = true;
        this.lastRecv = now();
        // A resumed session may have nothing to say: a ping proves the stream
        // carries messages (a buffering proxy would hold them back).
        if (this.resuming && !this.opened) this._post(['{"op":"ping","id":"kometa-probe"}'], true);
      };
      es.onmessage = (e) => {
        if (this.dead) return;
        const id = String(e.lastEventId || "");
        const colon = id.lastIndexOf(":");
        if (colon > 0) {
          const seq = Number(id.slice(colon + 1));
          if (Number.isSafeInteger(seq)) this.seq = seq;
        }
        const m = parseObject(e.data);
        if (m) this.handle(m);
      };
      // EventSource would reconnect by itself; the Core decides instead (with
      // backoff, fallback and this session's position).
      es.onerror = () => this._end({ code: 0, reason: this.streamOpen ? "stream lost" : "stream refused" });
    }
    _teardown() {
      super._teardown();
      if (this.es) {
        this.es.onopen = this.es.onmessage = this.es.onerror = null;
        this.es.close();
      }
    }
  }

  class PollLink extends HttpLink {
    constructor(env, token, resume) {
      super(env, token, resume);
      this.kind = "longpoll";
    }
    open() {
      this._loop();
    }
    async _loop() {
      while (!this.dead) {
        const q = this.session ? { session: this.session, cursor: String(this.seq) } : {};
        const ctl = new AbortController();
        this.aborts.add(ctl);
        const timer = setTimeout(() => ctl.abort(), this.env.opts.pollTimeout);
        let res = null;
        let body = null;
        try {
          res = await this.env.fetch(this.env.ep.poll + "?" + this.query(q), {
            cache: "no-store",
            credentials: "omit",
            signal: ctl.signal,
          });
          body = parseObject(await res.text());
        } catch (_) {
          res = null;
        } finally {
          clearTimeout(timer);
          this.aborts.delete(ctl);
        }
        if (this.dead) return;
        if (!res) return this._end({ code: 0, reason: "poll failed" });
        if (res.status === 200 && body && Array.isArray(body.messages)) {
          this.lastRecv = now();
          if (this.session && body.session === this.session && !this.opened) {
            this.opened = true;
            this.onopen({ resumed: true, session: this.session });
          }
          for (const m of body.messages) {
            if (this.dead) return;
            if (m !== null && typeof m === "object" && !Array.isArray(m)) this.handle(m);
          }
          if (typeof body.session === "string") this.session = body.session;
          if (Number.isSafeInteger(body.cursor)) this.seq = body.cursor;
          continue;
        }
        const err = body && body.error ? body.error : null;
        if ((res.status === 410 || res.status === 404) && this.session) {
          // The session is gone. Resuming: start a new one (its announcement
          // says resumed:false, and the Core resubscribes from its positions).
          // Already open: this link ends, the Core reconnects.
          if (this.opened) return this._end({ code: res.status, reason: (err && err.code) || "session_expired" });
          this.session = null;
          this.seq = 0;
          continue;
        }
        if (res.status === 401 || res.status === 403) {
          const code = err && err.code ? String(err.code) : res.status === 401 ? "unauthorized" : "forbidden";
          return this._end({ code: res.status, reason: err && err.message ? String(err.message) : code, fatal: code });
        }
        return this._end({ code: res.status, reason: "poll answered " + res.status });
      }
    }
  }

  const LINKS = { websocket: WsLink, sse: SseLink, longpoll: PollLink };

  // ------------------------------------------------------------------ Core

  // One connection to the server, whatever the transport. Consumers register
  // interest in channels (per tab); the Core keeps the union subscribed and
  // the position of each channel, and reports to its hub.
  class Core {
    constructor(ep, opts, env) {
      this.ep = ep;
      this.opts = opts;
      this.env = { ep, opts, WebSocket: env.WebSocket, EventSource: env.EventSource, fetch: env.fetch };
      this.hub = null;
      this.order = opts.transports.filter((k) => {
        if (k === "websocket") return typeof env.WebSocket === "function";
        if (k === "sse") return typeof env.EventSource === "function" && typeof env.fetch === "function";
        if (k === "longpoll") return typeof env.fetch === "function";
        return false;
      });
      this.status = { state: "connecting", transport: null, user: null };
      this.link = null; // the connected link
      this.trying = null; // the link being opened
      this.probing = null; // a better transport being tried while connected
      this.draining = new Set(); // links replaced by an upgrade, answering their last requests
      this.demoted = new Set(); // transports that failed while a worse one worked
      this.tried = [];
      this.round = 0;
      this.gen = 0;
      this.upgradeFails = 0;
      this.shortLived = Object.create(null);
      this.channels = new Map();
      this.pending = new Map();
      this.nextId = 1;
      this.queue = [];
      this.resume = null;
      this.token = null;
      this.authRetried = false;
      this.inboxAcked = 0;
      this.timers = {};
      this.stopped = false;
      this.started = false;
      this._online = () => this._retryNow();
    }

    log(...args) {
      if (this.opts.debug && root.console) root.console.debug("[kometa]", ...args);
    }

    start() {
      if (this.started || this.stopped) return;
      this.started = true;
      if (typeof root.addEventListener === "function") root.addEventListener("online", this._online);
      if (!this.order.length) return this._terminate("not_available", "no usable transport in this environment");
      this._setState({ state: "connecting" });
      this._next();
    }

    stop(code, reason) {
      if (this.stopped) return;
      this.stopped = true;
      if (typeof root.removeEventListener === "function") root.removeEventListener("online", this._online);
      for (const t of Object.values(this.timers)) clearTimeout(t);
      for (const l of [this.link, this.trying, this.probing, ...this.draining]) if (l) l.close(true);
      this.link = this.trying = this.probing = null;
      this.draining.clear();
      const err = new KometaError("closed", "the client was closed");
      for (const p of this.pending.values()) { clearTimeout(p.timer); p.cb(err); }
      this.pending.clear();
      for (const e of this.queue) { clearTimeout(e.qtimer); e.reject(err); }
      this.queue = [];
      this._setState(code ? { state: "closed", code, reason } : { state: "closed" });
    }

    _setState(st) {
      if (!("user" in st)) st.user = this.status.user;
      if (!("transport" in st)) st.transport = st.state === "connected" ? this.status.transport : null;
      this.status = st;
      this.log("state", st);
      if (this.hub) this.hub.state(st);
    }

    _clear(name) {
      clearTimeout(this.timers[name]);
      delete this.timers[name];
    }

    // ---- transport choice

    _candidates() {
      let list = this.order.filter((k) => !this.demoted.has(k));
      if (!list.length) {
        this.demoted.clear();
        list = this.order.slice();
      }
      return list;
    }

    _next() {
      if (this.stopped) return;
      const kind = this._candidates().find((k) => !this.tried.includes(k));
      if (!kind) return this._scheduleRound("no transport could connect");
      this.tried.push(kind);
      this._attempt(kind);
    }

    _scheduleRound(reason) {
      this.tried = [];
      const delay = backoff(this.round, this.opts.reconnectDelayMin, this.opts.reconnectDelayMax);
      this.round++;
      this._setState({ state: "reconnecting", attempt: this.round, delay, reason });
      this._clear("retry");
      this.timers.retry = setTimeout(() => {
        delete this.timers.retry;
        this._next();
      }, delay);
    }

    _retryNow() {
      if (this.stopped || !this.timers.retry) return;
      this._clear("retry");
      this.round = 0;
      this._next();
    }

    async _getToken() {
      const t = this.opts.token;
      if (!t) return null;
      if (typeof t === "string") return t;
      if (this.token) {
        const claims = jwtClaims(this.token);
        if (!claims || typeof claims.exp !== "number" || claims.exp * 1000 > now() + 15000) return this.token;
      }
      const v = await t();
      if (typeof v !== "string" || !v) throw new KometaError("unauthorized", "the token function returned no token");
      this.token = v;
      this._scheduleRefresh(v);
      return v;
    }

    // With a token function, fetch a new token before the current one
    // expires and present it (`connect`) on the open connection.
    _scheduleRefresh(token) {
      this._clear("refresh");
      const claims = jwtClaims(token);
      if (!claims || typeof claims.exp !== "number") return;
      const delay = Math.max(1000, claims.exp * 1000 - now() - 30000);
      if (delay > 0x7fffffff) return;
      this.timers.refresh = setTimeout(async () => {
        delete this.timers.refresh;
        this.token = null;
        let fresh;
        try { fresh = await this._getToken(); } catch (e) { this.log("token refresh failed", e); return; }
        if (this.link && !this.stopped) this._send(this.link, { op: "connect", token: fresh }, () => {}, this.opts.timeout);
      }, delay);
    }

    async _attempt(kind) {
      const gen = ++this.gen;
      let token = null;
      try {
        token = await this._getToken();
      } catch (e) {
        // The app's token function failed (its backend unreachable?): tell
        // the app and try again later.
        if (gen !== this.gen || this.stopped) return;
        if (this.hub) this.hub.error(new KometaError("unauthorized", "no token: " + ((e && e.message) || e)));
        return this._scheduleRound("no token");
      }
      if (gen !== this.gen || this.stopped) return;
      const resume = kind !== "websocket" ? this.resume : null;
      const link = new LINKS[kind](this.env, token, resume);
      this.trying = link;
      link.onopen = (info) => this._onOpen(link, info);
      link.onmessage = (m) => this._onMessage(link, m);
      link.onclose = (info) => this._onClose(link, info);
      this._clear("open");
      this.timers.open = setTimeout(() => {
        delete this.timers.open;
        if (this.trying === link) link.fail("no answer within " + this.opts.openTimeout + " ms");
      }, this.opts.openTimeout);
      this.log("trying", kind, resume ? "resuming " + resume.session : "");
      link.open();
    }

    // The first message proves the transport works: `connect` (WebSocket
    // with a token) or `ping`.
    _handshake(link, info, done) {
      const cmd = link.kind === "websocket" && link.token ? { op: "connect", token: link.token } : { op: "ping" };
      this._send(link, cmd, (err, reply) => {
        if (err) return done(err);
        if (reply && reply.user !== undefined) this.status.user = reply.user;
        else if (info.user !== undefined) this.status.user = info.user;
        done(null);
      }, this.opts.openTimeout);
    }

    _onOpen(link, info) {
      if (link === this.probing) {
        return this._handshake(link, info, (err) => {
          if (this.probing !== link) return;
          if (err) return link.fail("handshake: " + err.message);
          this._adopt(link);
        });
      }
      if (link === this.link) {
        // The session was replaced while connected (links end instead; kept
        // for safety): what was sent on the old one is lost.
        if (!info.resumed) {
          if (info.user !== undefined) this.status.user = info.user;
          this._failPending(link);
          this._reset(link);
          this._resubscribe();
          this._flush();
        }
        return;
      }
      if (link !== this.trying) return;
      this._handshake(link, info, (err) => {
        if (this.trying !== link) return;
        if (err) {
          if (err.code === "unauthorized" || err.code === "token_expired") {
            this.trying = null;
            this._clear("open");
            link.close();
            return this._authFailed(err.code, err.message);
          }
          return link.fail("handshake: " + err.message);
        }
        this._connected(link, info);
      });
    }

    _connected(link, info) {
      this._clear("open");
      this.trying = null;
      this.link = link;
      this.connectedAt = now();
      this.authRetried = false;
      for (const k of this.tried) if (k !== link.kind) this.demoted.add(k);
      this.tried = [];
      if (link.kind === "websocket") this.resume = null;
      if (!info.resumed) this._reset(link);
      this._setState({ state: "connected", transport: link.kind, resumed: !!info.resumed });
      this._resubscribe();
      this._flush();
      this._startPing();
      this._scheduleUpgrade();
    }

    _onClose(link, info) {
      this.log("link closed", link.kind, info);
      if (link === this.probing) {
        this.probing = null;
        this._clear("probe");
        this.upgradeFails++;
        this._failPending(link);
        return this._scheduleUpgrade();
      }
      if (this.draining.has(link)) {
        this.draining.delete(link);
        return this._failPending(link);
      }
      const wasConnected = link === this.link;
      if (!wasConnected && link !== this.trying) return;
      this._clear("open");
      this._clear("ping");
      this._clear("upgrade");
      this.link = this.trying = null;
      if (link.kind !== "websocket" && link.session) this.resume = { session: link.session, seq: link.seq };
      if (link.kind === "websocket") this._failPending(link);
      if (this.stopped) return;
      const code = info.code;
      if (code === 4001 || code === 4002 || info.fatal === "unauthorized" || info.fatal === "token_expired") {
        return this._authFailed(code === 4002 || info.fatal === "token_expired" ? "token_expired" : "unauthorized", info.reason);
      }
      if (info.fatal) return this._terminate(info.fatal, info.reason);
      if (code === 4003) return this._terminate("disconnected", info.reason || "disconnected by the server");
      if (wasConnected) {
        const lived = now() - this.connectedAt;
        if (lived > 10000) {
          this.round = 0;
          this.shortLived[link.kind] = 0;
        } else if (code === 1006 || code === 0) {
          // Dropped again and again right after opening: treat the transport
          // as blocked for now (an upgrade probe tries it later).
          this.shortLived[link.kind] = (this.shortLived[link.kind] || 0) + 1;
          if (this.shortLived[link.kind] >= 3 && this._candidates().length > 1) {
            this.demoted.add(link.kind);
            this.shortLived[link.kind] = 0;
          }
        }
        this._setState({ state: "disconnected", transport: link.kind, code, reason: info.reason });
        return this._scheduleRound(info.reason);
      }
      this._next();
    }

    _authFailed(code, message) {
      if (typeof this.opts.token === "function" && !this.authRetried) {
        this.authRetried = true;
        this.token = null;
        this._setState({ state: "disconnected", code, reason: message });
        return this._scheduleRound(code);
      }
      this._terminate(code, message);
    }

    _terminate(code, message) {
      const err = new KometaError(code, message || code);
      if (this.hub) this.hub.error(err);
      this.stop(code, message || code);
    }

    // ---- upgrade back to a better transport

    _scheduleUpgrade() {
      this._clear("upgrade");
      if (!this.link || !this.opts.upgradeDelay) return;
      const rank = this.order.indexOf(this.link.kind);
      const better = this.order.filter((k, i) => i < rank && this.demoted.has(k));
      if (!better.length) return;
      const base = Math.min(UPGRADE_DELAY_MAX_MS, this.opts.upgradeDelay * Math.pow(2, Math.min(this.upgradeFails, 10)));
      const delay = Math.round(base * (0.8 + Math.random() * 0.4));
      this.timers.upgrade = setTimeout(() => {
        delete this.timers.upgrade;
        this._probe(better[0]);
      }, delay);
    }

    async _probe(kind) {
      if (!this.link || this.probing || this.stopped) return;
      let token;
      try { token = await this._getToken(); } catch (_) { return this._scheduleUpgrade(); }
      if (!this.link || this.probing || this.stopped) return;
      const link = new LINKS[kind](this.env, token, null);
      this.probing = link;
      link.onopen = (info) => this._onOpen(link, info);
      link.onmessage = (m) => this._onMessage(link, m);
      link.onclose = (info) => this._onClose(link, info);
      this.timers.probe = setTimeout(() => {
        delete this.timers.probe;
        if (this.probing === link) link.fail("probe timed out");
      }, this.opts.openTimeout);
      this.log("probing", kind);
      link.open();
    }

    // The probe works: make it the connection. The old link only answers the
    // requests already sent on it; every channel is subscribed again on the
    // new link from its position, so nothing is lost at the seam.
    _adopt(link) {
      this._clear("probe");
      this.probing = null;
      const old = this.link;
      this.demoted.delete(link.kind);
      this.upgradeFails = 0;
      this.link = link;
      this.connectedAt = now();
      if (link.kind === "websocket") this.resume = null;
      for (const ch of this.channels.values()) {
        ch.gen++;
        if (ch.status !== "idle") ch.status = "idle";
      }
      if (old) {
        this.draining.add(old);
        const closeOld = () => {
          if (!this.draining.has(old)) return;
          this.draining.delete(old);
          this._failPending(old);
          old.close(true);
        };
        const waitFor = [...this.pending.values()].some((p) => p.link === old && p.entry);
        setTimeout(closeOld, waitFor ? this.opts.timeout : 0);
      }
      this._setState({ state: "connected", transport: link.kind, upgraded: true });
      this._resubscribe();
      this._flush();
      this._startPing();
      this._scheduleUpgrade();
    }

    // ---- liveness

    _startPing() {
      this._clear("ping");
      const every = Math.max(1000, Math.floor(this.opts.pingInterval / 2));
      const tick = () => {
        const link = this.link;
        if (!link || this.stopped) return;
        if (!this.pingOut && now() - link.lastRecv >= this.opts.pingInterval) {
          this.pingOut = true;
          this._send(link, { op: "ping" }, (err) => {
            this.pingOut = false;
            if (err && err.code === "timeout" && this.link === link) link.fail("no answer to ping");
          }, this.opts.pingTimeout);
        }
        this.timers.ping = setTimeout(tick, every);
      };
      this.pingOut = false;
      this.timers.ping = setTimeout(tick, every);
    }

    // ---- requests

    // Sends one command with a fresh id; cb(err, reply) is called exactly
    // once, synchronously with the reply's arrival (so that pushes following
    // a reply in the same batch see its effect).
    _send(link, cmd, cb, timeout, entry) {
      const id = this.nextId++;
      const body = JSON.stringify(cmd);
      const p = { id, link, cmd, cb, entry, timer: null };
      p.timer = setTimeout(() => {
        if (this.pending.get(id) !== p) return;
        this.pending.delete(id);
        cb(new KometaError("timeout", "no reply to " + cmd.op + " within " + timeout + " ms"));
      }, timeout);
      this.pending.set(id, p);
      link.send(['{"id":' + id + "," + body.slice(1)]);
    }

    // Requests of a lost link: reads go out again, the rest fail.
    _failPending(link) {
      const lost = new KometaError("connection_lost", "the connection was lost before the reply");
      const again = [];
      for (const p of [...this.pending.values()]) {
        if (p.link !== link) continue;
        this.pending.delete(p.id);
        clearTimeout(p.timer);
        if (p.entry && IDEMPOTENT.has(p.cmd.op) && !this.stopped) again.push(p.entry);
        else p.cb(lost);
      }
      for (const e of again.reverse()) this._enqueue(e, true);
      if (this.link && again.length) this._flush();
    }

    // Forget what the server held for earlier links (a new connection, or an
    // HTTP session that could not be resumed).
    _reset(link) {
      const others = new Set();
      for (const p of this.pending.values()) if (p.link !== link) others.add(p.link);
      for (const l of others) this._failPending(l);
      for (const ch of this.channels.values()) {
        ch.gen++;
        ch.status = "idle";
      }
    }

    request(cmd, timeout) {
      return new Promise((resolve, reject) => {
        if (this.stopped) return reject(new KometaError("closed", "the client was closed"));
        try {
          JSON.stringify(cmd);
        } catch (e) {
          return reject(new KometaError("bad_request", "data is not JSON: " + e.message));
        }
        const entry = { cmd, resolve, reject, timeout: timeout || this.opts.timeout };
        if (this.link) return this._sendEntry(entry);
        if (this.queue.length >= this.opts.queueSize) {
          return reject(new KometaError("queue_full", "offline queue full (" + this.opts.queueSize + " commands)"));
        }
        this._enqueue(entry, false);
      });
    }

    _enqueue(entry, front) {
      clearTimeout(entry.qtimer);
      entry.qtimer = setTimeout(() => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) this.queue.splice(i, 1);
        entry.reject(new KometaError("timeout", "not connected within " + this.opts.queueTimeout + " ms"));
      }, this.opts.queueTimeout);
      if (front) this.queue.unshift(entry);
      else this.queue.push(entry);
    }

    _sendEntry(entry) {
      this._send(this.link, entry.cmd, (err, reply) => (err ? entry.reject(err) : entry.resolve(reply)), entry.timeout, entry);
    }

    _flush() {
      const q = this.queue;
      this.queue = [];
      for (const e of q) {
        clearTimeout(e.qtimer);
        if (this.link) this._sendEntry(e);
        else this.queue.push(e);
      }
    }

    // ---- channels

    // cb(err, {epoch, base, recovered?, reason?}): publications after `base`
    // follow, in order. `counts`: the channel's presence counts are pushed
    // too (presence_counts events), for as long as it stays subscribed.
    interest(tab, name, since, cb, counts) {
      let ch = this.channels.get(name);
      if (!ch) {
        ch = { name, pos: since ? { epoch: since.epoch, offset: since.offset } : null, status: "idle", tabs: new Set(), waiters: [], gen: 0, counts: !!counts, quiet: false };
        this.channels.set(name, ch);
      } else if (counts && !ch.counts) {
        // Asked for on a channel subscribed without them: subscribe again
        // (`_subscribed` does, once a subscribe in flight is answered).
        ch.counts = true;
        if (ch.status === "subscribed") this._resubscribeQuietly(ch);
      } else if (ch.status === "idle" && since) {
        // Not subscribed yet: start from the oldest position any tab needs.
        if (!ch.pos || (since.epoch === ch.pos.epoch && since.offset < ch.pos.offset)) {
          ch.pos = { epoch: since.epoch, offset: since.offset };
        }
      }
      ch.tabs.add(tab);
      if (ch.status === "subscribed") return cb(null, { epoch: ch.pos.epoch, base: ch.pos.offset });
      ch.waiters.push({ tab, cb });
      this._subscribe(ch);
    }

    uninterest(tab, name) {
      const ch = this.channels.get(name);
      if (!ch) return;
      ch.tabs.delete(tab);
      ch.waiters = ch.waiters.filter((w) => w.tab !== tab);
      if (ch.tabs.size) return;
      if (ch.status === "subscribing") return; // the reply unsubscribes it
      this.channels.delete(name);
      if (ch.status === "subscribed" && this.link) {
        this._send(this.link, { op: "unsubscribe", channel: name }, () => {}, this.opts.timeout);
      }
    }

    dropTab(tab) {
      for (const ch of [...this.channels.values()]) if (ch.tabs.has(tab)) this.uninterest(tab, ch.name);
    }

    _resubscribe() {
      for (const ch of this.channels.values()) if (ch.status === "idle") this._subscribe(ch);
    }

    // Subscribes a subscribed channel again, from its position (what is
    // published meanwhile comes from history), without a recovery event
    // unless something was lost: for presence counts asked for later.
    _resubscribeQuietly(ch) {
      if (!this.link) return;
      this._send(this.link, { op: "unsubscribe", channel: ch.name }, () => {}, this.opts.timeout);
      ch.status = "idle";
      ch.quiet = true;
      this._subscribe(ch);
    }

    _subscribe(ch) {
      if (!this.link || ch.status !== "idle" || this.stopped) return;
      ch.status = "subscribing";
      const since = ch.pos ? { epoch: ch.pos.epoch, offset: ch.pos.offset } : null;
      const cmd = { op: "subscribe", channel: ch.name };
      if (since) cmd.since = since;
      if (ch.counts) cmd.presence_counts = true;
      ch.sentCounts = ch.counts;
      const gen = ch.gen;
      const link = this.link;
      this._send(link, cmd, (err, reply) => this._subscribed(ch, gen, link, since, err, reply), this.opts.timeout);
    }

    _subscribed(ch, gen, link, since, err, r) {
      if (ch.gen !== gen || this.channels.get(ch.name) !== ch) return; // a newer connection took over
      if (!err && !ch.tabs.size) {
        this.channels.delete(ch.name);
        if (this.link === link) this._send(link, { op: "unsubscribe", channel: ch.name }, () => {}, this.opts.timeout);
        return;
      }
      if (err) {
        ch.status = "idle";
        if (!ch.tabs.size) {
          this.channels.delete(ch.name);
          if (err.code === "already_subscribed" && this.link === link) {
            this._send(link, { op: "unsubscribe", channel: ch.name }, () => {}, this.opts.timeout);
          }
          return;
        }
        if (err.code === "connection_lost") return;
        if (err.code === "timeout") {
          if (this.link === link) link.fail("no answer to subscribe");
          return;
        }
        if (err.code === "overloaded" || err.code === "internal" || err.code === "unavailable") {
          setTimeout(() => this._subscribe(ch), 1000 + Math.random() * 2000);
          return;
        }
        if (err.code === "already_subscribed" && this.link === link) {
          // A subscribe we gave up on went through after all (a resumed HTTP
          // session): start this subscription again, from its position.
          this._send(link, { op: "unsubscribe", channel: ch.name }, () => {}, this.opts.timeout);
          this._subscribe(ch);
          return;
        }
        this.channels.delete(ch.name);
        const waiting = new Set(ch.waiters.map((w) => w.tab));
        for (const w of ch.waiters) w.cb(err);
        ch.waiters = [];
        if (this.hub) this.hub.subError(ch.name, err, [...waiting]);
        return;
      }
      ch.status = "subscribed";
      const epoch = String(r.epoch);
      const offset = Number(r.offset) || 0;
      let res;
      if (since && r.recovered !== false && epoch === since.epoch) {
        res = { epoch, base: since.offset, recovered: true };
      } else if (since) {
        ch.pos = { epoch, offset };
        res = { epoch, base: offset, recovered: false, reason: r.reason || (epoch !== since.epoch ? "epoch_changed" : "not_recovered") };
      } else {
        ch.pos = { epoch, offset };
        res = { epoch, base: offset };
      }
      const waiters = ch.waiters;
      ch.waiters = [];
      for (const w of waiters) w.cb(null, res);
      // A resubscribe of our own (for presence counts) that lost nothing is no news.
      const quiet = ch.quiet && res.recovered;
      ch.quiet = false;
      if (since && this.hub && !quiet) this.hub.recovery(ch.name, res, waiters.map((w) => w.tab));
      // Counts were asked for while this subscribe (without them) was on its way.
      if (ch.counts && !ch.sentCounts && this.link === link) this._resubscribeQuietly(ch);
    }

    // ---- incoming

    _onMessage(link, m) {
      if (m.id !== undefined && (m.ok !== undefined || m.error !== undefined)) {
        const p = this.pending.get(m.id);
        if (p && p.link === link) {
          this.pending.delete(m.id);
          clearTimeout(p.timer);
          if (m.error) p.cb(new KometaError(String(m.error.code || "internal"), String(m.error.message || m.error.code)));
          else p.cb(null, m);
        }
        return;
      }
      // Pushes only from the connection (or the one being opened: a resumed
      // session and the inbox may speak before the handshake reply is read).
      if (link !== this.link && link !== this.trying) return;
      if (typeof m.channel === "string") return this._push(m);
      if (m.event !== undefined && (m.inbox !== undefined || "data" in m)) return this._inbox(m);
    }

    _push(m) {
      const ch = this.channels.get(m.channel);
      if (!ch || ch.status !== "subscribed") return;
      if (m.recovered === false) {
        // Cluster: the server lost publications it cannot get back (a Redis
        // outage); follow on from its position and tell the app.
        const res = { epoch: String(m.epoch), base: Number(m.offset) || 0, recovered: false, reason: String(m.reason || "not_recovered") };
        ch.pos = { epoch: res.epoch, offset: res.base };
        if (this.hub) this.hub.recovery(m.channel, res, []);
        return;
      }
      if (typeof m.offset === "number") {
        if (ch.pos && m.offset <= ch.pos.offset) return; // seen already (upgrade or resume seam)
        ch.pos = { epoch: ch.pos ? ch.pos.epoch : "", offset: m.offset };
      }
      if (this.hub) this.hub.push(m.channel, ch.pos ? ch.pos.epoch : "", m);
    }

    _inbox(m) {
      if (typeof m.inbox === "number" && m.inbox <= this.inboxAcked) {
        // Acknowledged already (the ack was lost with a connection): again.
        if (this.link && this.lastAckLink !== this.link) this._sendAck(this.inboxAcked);
        return;
      }
      if (this.hub) this.hub.inbox(m);
    }

    ack(seq) {
      if (seq > this.inboxAcked) this.inboxAcked = seq;
      this._sendAck(seq);
    }

    _sendAck(seq) {
      if (!this.link) return; // a reconnect sends the message again; it is acknowledged then
      this.lastAckLink = this.link;
      this._send(this.link, { op: "ack", inbox: seq }, () => {}, this.opts.timeout);
    }
  }

  // ------------------------------------------------------------------ Hub

  // The consumers of a Core: the local Client and, when shared, the other
  // tabs. Routes results to the tab that asked, pushes to every tab (each
  // keeps what it subscribed to), and acknowledges a user message once every
  // tab with a message handler has run it.
  class Hub {
    constructor(core, local, shared) {
      this.core = core;
      this.local = local;
      this.shared = shared;
      core.hub = this;
      this.inboxTabs = new Set();
      this.inboxHeld = [];
      this.outstanding = new Map();
      this.seen = new Map();
    }

    _to(tab, msg) {
      if (tab === this.local.id) this.local._fromLeader(msg);
      else if (this.shared) { msg.to = tab; this.shared.post(msg); }
    }

    _all(msg, remoteOnly) {
      if (!remoteOnly) this.local._fromLeader(msg);
      if (this.shared) this.shared.post(msg);
    }

    _remoteInterested(channel) {
      if (!this.shared) return false;
      const ch = this.core.channels.get(channel);
      if (!ch) return false;
      for (const t of ch.tabs) if (t !== this.local.id) return true;
      return false;
    }

    interest(tab, channel, since, rid, counts) {
      this.core.interest(tab, channel, since, (err, res) => {
        this._to(tab, { t: "sub-r", channel, rid, err: err ? errorJSON(err) : null, res: res || null });
      }, counts);
    }

    uninterest(tab, channel) { this.core.uninterest(tab, channel); }

    request(tab, rid, cmd, timeout) {
      this.core.request(cmd, timeout).then(
        (reply) => this._to(tab, { t: "res", rid, reply }),
        (err) => this._to(tab, { t: "res", rid, err: errorJSON(err) })
      );
    }

    // ---- from the Core

    push(channel, epoch, msg) {
      const ch = this.core.channels.get(channel);
      if (ch && ch.tabs.has(this.local.id)) this.local._fromLeader({ t: "push", channel, epoch, msg });
      if (this._remoteInterested(channel)) this.shared.post({ t: "push", channel, epoch, msg });
    }

    recovery(channel, res, except) { this._all({ t: "recovery", channel, res, except }); }

    subError(channel, err, except) { this._all({ t: "suberror", channel, err: errorJSON(err), except }); }

    state(st) { this._all({ t: "state", state: st }); }

    error(err) { this._all({ t: "error", err: errorJSON(err) }); }

    // ---- user messages

    setInbox(tab, on) {
      if (on) this.inboxTabs.add(tab);
      else {
        this.inboxTabs.delete(tab);
        for (const seq of [...this.outstanding.keys()]) this.inboxDone(tab, seq);
      }
      if (on && this.inboxHeld.length) {
        const held = this.inboxHeld;
        this.inboxHeld = [];
        for (const m of held) this.inbox(m);
      }
    }

    inbox(msg) {
      const seq = typeof msg.inbox === "number" ? msg.inbox : null;
      if (seq === null) {
        // Not kept by the server (its inbox was full): deliver, nothing to ack.
        if (this.inboxTabs.size) this._all({ t: "inbox", msg });
        return;
      }
      if (this.outstanding.has(seq)) return;
      if (!this.inboxTabs.size) {
        // Nobody handles user messages yet: hold them (unacknowledged).
        if (this.inboxHeld.length < INBOX_BUFFER_MAX && !this.inboxHeld.some((m) => m.inbox === seq)) this.inboxHeld.push(msg);
        return;
      }
      const o = { seq, waiting: new Set(this.inboxTabs), done: false, timer: null };
      // A tab that never answers (hung handler) does not hold the inbox forever.
      o.timer = setTimeout(() => { o.waiting.clear(); o.done = true; this._ackReady(); }, this.core.opts.inboxTimeout);
      this.outstanding.set(seq, o);
      this._all({ t: "inbox", msg }, !this.inboxTabs.has(this.local.id));
    }

    inboxDone(tab, seq) {
      const o = this.outstanding.get(seq);
      if (!o || o.done) return;
      o.waiting.delete(tab);
      if (!o.waiting.size) {
        o.done = true;
        clearTimeout(o.timer);
        this._ackReady();
      }
    }

    // Acknowledge up to the highest sequence whose predecessors are all done
    // (an ack covers every earlier message).
    _ackReady() {
      let top = null;
      for (const seq of [...this.outstanding.keys()].sort((a, b) => a - b)) {
        const o = this.outstanding.get(seq);
        if (!o.done) break;
        clearTimeout(o.timer);
        this.outstanding.delete(seq);
        top = seq;
      }
      if (top !== null) {
        this.core.ack(top);
        this._all({ t: "inbox-acked", seq: top });
      }
    }

    // ---- tabs

    hello(tab, m) {
      this.track(tab);
      for (const s of Array.isArray(m.subs) ? m.subs : []) this.interest(tab, s.channel, s.since || null, s.rid, !!s.counts);
      this.setInbox(tab, !!m.inbox);
    }

    track(tab) {
      if (this.seen.has(tab)) { this.seen.set(tab, now()); return; }
      this.seen.set(tab, now());
      if (this.shared) this.shared.watch(tab, () => this.dropTab(tab));
    }

    dropTab(tab) {
      if (!this.seen.has(tab)) return;
      this.seen.delete(tab);
      this.core.dropTab(tab);
      this.setInbox(tab, false);
    }

    stop() {
      for (const o of this.outstanding.values()) clearTimeout(o.timer);
      this.outstanding.clear();
      this.core.stop();
    }
  }

  // ------------------------------------------------------------------ Shared

  // One connection per browser and origin: tabs elect a leader (Web Locks:
  // the lock holder; otherwise a BroadcastChannel election with heartbeats)
  // and followers talk to it over a BroadcastChannel.
  class Shared {
    constructor(client, key) {
      this.client = client;
      this.id = client.id;
      this.key = key;
      this.leaderId = null;
      this.closed = false;
      this.locks = root.navigator && root.navigator.locks && typeof root.navigator.locks.request === "function" ? root.navigator.locks : null;
      this.abort = typeof AbortController === "function" ? new AbortController() : null;
      this.releases = [];
      this.watched = new Map();
      this.timers = [];
      this.bc = new BroadcastChannel(key);
      this.bc.onmessage = (e) => this._recv(e.data);
      if (this.locks) this._lockElection();
      else this._bcElection();
    }

    post(msg) {
      if (this.closed) return;
      msg.from = this.id;
      try { this.bc.postMessage(msg); } catch (e) { report(e); }
    }

    _hold(name, signal) {
      return new Promise((granted) => {
        const opts = signal ? { signal } : {};
        this.locks.request(name, opts, () => {
          if (this.closed) return granted(false); // released at once
          granted(true);
          return new Promise((release) => this.releases.push(release));
        }).catch(() => granted(false));
      });
    }

    async _lockElection() {
      // Hold this tab's own lock first: the leader waits on it to learn when
      // this tab is gone (closed or crashed), without heartbeats that hidden
      // tabs would throttle.
      await this._hold(this.key + "|tab|" + this.id, this.abort && this.abort.signal);
      if (this.closed) return;
      this.post({ t: "who" });
      const granted = await this._hold(this.key + "|leader", this.abort && this.abort.signal);
      if (granted && !this.closed) this.client._becomeLeader();
    }

    // Leader side: fn() once tab `id` is gone.
    watch(id, fn) {
      if (this.watched.has(id)) return;
      if (this.locks) {
        this.watched.set(id, fn);
        this.locks.request(this.key + "|tab|" + id, this.abort ? { signal: this.abort.signal } : {}, () => {
          this.watched.delete(id);
          if (!this.closed) fn();
        }).catch(() => {});
      } else {
        this.watched.set(id, fn);
      }
    }

    // Without Web Locks: ask for a leader; claim after a silence; the lowest
    // id among simultaneous claims wins; the leader beats every second.
    _bcElection() {
      this.lastLeader = 0;
      this.lastAlive = 0;
      this.post({ t: "who" });
      this.startedAt = now();
      const tick = () => {
        if (this.closed) return;
        const t = now();
        if (this.client._hub) {
          this.post({ t: "leader", state: this.client._hub.core.status });
          for (const [tab, seen] of this.client._hub.seen) if (t - seen > 30000) this.client._hub.dropTab(tab);
        } else {
          const silence = this.leaderId ? 4000 : 500;
          if (!this.claiming && t - Math.max(this.lastLeader, this.startedAt) > silence) this._claim();
          if (this.leaderId && t - this.lastAlive > 5000) {
            this.lastAlive = t;
            this.post({ t: "alive" });
          }
        }
        this.timers[0] = setTimeout(tick, 1000);
      };
      this.timers[0] = setTimeout(tick, 300);
    }

    _claim() {
      this.claiming = true;
      this.claims = new Set([this.id]);
      this.post({ t: "claim" });
      this.timers[1] = setTimeout(() => {
        this.claiming = false;
        if (this.closed || this.client._hub) return;
        if (this.leaderId && now() - this.lastLeader < 2500) return;
        if ([...this.claims].sort()[0] === this.id) this.client._becomeLeader();
      }, 400);
    }

    _recv(m) {
      if (this.closed || !m || typeof m !== "object" || m.from === this.id) return;
      const hub = this.client._hub;
      if (hub) {
        if (!this.locks && hub.seen.has(m.from)) hub.seen.set(m.from, now());
        switch (m.t) {
          case "who":
          case "claim":
            this.post({ t: "leader", state: hub.core.status });
            break;
          case "leader":
            // Two leaders (BroadcastChannel election only): the lower id stays.
            if (!this.locks && String(m.from) < this.id) this.client._stepDown(m.from, m.state);
            break;
          case "hello": hub.hello(m.from, m); break;
          case "sub": hub.track(m.from); hub.interest(m.from, m.channel, m.since || null, m.rid, !!m.counts); break;
          case "unsub": hub.uninterest(m.from, m.channel); break;
          case "req": hub.track(m.from); hub.request(m.from, m.rid, m.cmd, m.timeout); break;
          case "inbox-on": hub.track(m.from); hub.setInbox(m.from, !!m.on); break;
          case "inbox-done": hub.inboxDone(m.from, m.seq); break;
          case "bye": hub.dropTab(m.from); break;
        }
        return;
      }
      switch (m.t) {
        case "leader":
          this.lastLeader = now();
          if (m.from !== this.leaderId) {
            this.leaderId = m.from;
            this.client._leaderChanged(m.state);
          }
          break;
        case "leader-bye":
          if (m.from === this.leaderId) {
            this.leaderId = null;
            this.lastLeader = 0;
            this.client._state({ state: "reconnecting", transport: null, reason: "the leader tab closed" });
          }
          break;
        case "claim":
          if (this.claiming) this.claims.add(m.from);
          break;
        case "state":
          if (m.from === this.leaderId || !this.leaderId) this.client._fromLeader(m);
          break;
        default:
          if (m.to !== undefined && m.to !== this.id) return;
          if (m.except && m.except.includes(this.id)) return;
          this.client._fromLeader(m);
      }
    }

    resign() {
      // Release the leader lock (Web Locks hands it to the next tab).
      if (this.client._hub) this.post({ t: "leader-bye" });
    }

    close() {
      if (this.closed) return;
      this.closed = true;
      for (const t of this.timers) clearTimeout(t);
      if (this.abort) this.abort.abort();
      for (const release of this.releases) release();
      this.releases = [];
      try { this.bc.close(); } catch (_) { /* closed */ }
    }
  }

  // ------------------------------------------------------------------ Client

  class Subscription {
    constructor(client, channel, event, cb) {
      this.channel = channel;
      this.event = event;
      this._client = client;
      this._cb = cb;
      this.active = true;
      this.ready = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      this.ready.catch(() => {}); // the app may not look at it
    }
    get position() {
      const s = this._client._subs.get(this.channel);
      return s && s.pos ? { epoch: s.pos.epoch, offset: s.pos.offset } : null;
    }
    unsubscribe() {
      this._client._unsubscribe(this);
    }
  }

  function channelState(since, counts) {
    return {
      status: "pending",
      pos: since ? { epoch: String(since.epoch), offset: Number(since.offset) } : null,
      explicit: !!since,
      counts: !!counts,
      handles: new Set(),
      buffer: [],
      repairing: false,
      repairGen: 0,
      target: 0,
      rid: 0,
    };
  }

  class Client {
    constructor(url, options) {
      const opts = Object.assign({}, DEFAULTS, options || {});
      opts.transports = (Array.isArray(opts.transports) ? opts.transports : [opts.transports]).map(String);
      for (const t of opts.transports) if (!TRANSPORTS.includes(t)) throw new TypeError("Kometa: unknown transport " + t);
      this.options = opts;
      this.id = randomId();
      this.state = "connecting";
      this.transport = null;
      this.user = null;
      this.role = null;
      this._ep = endpoints(url);
      this._ev = new Emitter();
      this._subs = new Map();
      this._inboxHandlers = new Set();
      this._inboxHigh = 0;
      this._inboxChain = Promise.resolve();
      this._remote = new Map();
      this._rid = 0;
      this._hub = null;
      this._shared = null;
      this._closed = false;
      this._env = {
        WebSocket: opts.WebSocket || root.WebSocket,
        EventSource: opts.EventSource || root.EventSource,
        fetch: opts.fetch || (typeof root.fetch === "function" ? root.fetch.bind(root) : undefined),
      };
      this._onPageHide = (e) => { if (!e || !e.persisted) this.close(); };
      if (typeof root.addEventListener === "function") root.addEventListener("pagehide", this._onPageHide);
      if (opts.share !== false && typeof root.BroadcastChannel === "function") {
        let user = "";
        if (typeof opts.token === "string") {
          const claims = jwtClaims(opts.token);
          user = claims && claims.sub !== undefined ? String(claims.sub) : "?";
        } else if (opts.token) user = "fn";
        const name = typeof opts.share === "string" ? opts.share : "";
        this.role = "follower";
        this._shared = new Shared(this, "kometa|" + this._ep.base + "|" + name + "|" + user);
      } else {
        this._becomeLeader();
      }
    }

    // ---- public API

    subscribe(spec, callback, options) {
      if (this._closed) throw new KometaError("closed", "the client was closed");
      if (typeof callback !== "function") throw new TypeError("Kometa: subscribe needs a callback");
      const o = options || {};
      let channel = String(spec);
      let event = o.event;
      if (event === undefined) {
        const dot = channel.lastIndexOf(".");
        if (dot > 0 && dot < channel.length - 1) {
          event = channel.slice(dot + 1);
          channel = channel.slice(0, dot);
        }
      }
      if (event === undefined || event === null || event === "") event = "*";
      const h = new Subscription(this, channel, String(event), callback);
      let s = this._subs.get(channel);
      if (!s) {
        s = channelState(o.since, o.presenceCounts);
        this._subs.set(channel, s);
        s.handles.add(h);
        this._interest(channel, s);
      } else {
        s.handles.add(h);
        if (s.status === "active") h._resolve({ epoch: s.pos.epoch, offset: s.pos.offset });
        if (o.presenceCounts && !s.counts) {
          s.counts = true;
          this._interest(channel, s);
        }
      }
      return h;
    }

    publish(channel, event, data) {
      return this._request({ op: "publish", channel: String(channel), event: event == null ? "message" : String(event), data: data === undefined ? null : data });
    }

    presence(channel, options) {
      const o = options || {};
      const cmd = { op: "presence", channel: String(channel) };
      if (o.cursor != null) cmd.cursor = String(o.cursor);
      if (o.limit !== undefined) cmd.limit = Number(o.limit);
      return this._request(cmd);
    }

    presenceStats(channel) { return this._request({ op: "presence_stats", channel: String(channel) }); }

    history(channel, options) {
      const o = options || {};
      const cmd = { op: "history", channel: String(channel) };
      if (o.since) cmd.since = { epoch: String(o.since.epoch), offset: Number(o.since.offset) };
      if (o.limit !== undefined) cmd.limit = Number(o.limit);
      return this._request(cmd);
    }

    ping() { return this._request({ op: "ping" }); }

    // Asks the backend (server config `[rpc]`): resolves with its `result`,
    // rejects with a KometaError (`unavailable`, `timeout`, `backend_error`).
    rpc(method, data) {
      const cmd = { op: "rpc", method: String(method) };
      if (data !== undefined) cmd.data = data;
      return this._request(cmd).then((reply) => reply.result);
    }

    on(name, callback) { return this._ev.on(name, callback); }

    off(name, callback) { this._ev.off(name, callback); }

    onMessage(callback) {
      if (typeof callback !== "function") throw new TypeError("Kometa: onMessage needs a callback");
      this._inboxHandlers.add(callback);
      if (this._inboxHandlers.size === 1) this._setInbox(true);
      return () => {
        if (this._inboxHandlers.delete(callback) && !this._inboxHandlers.size) this._setInbox(false);
      };
    }

    close() {
      if (this._closed) return;
      this._closed = true;
      if (typeof root.removeEventListener === "function") root.removeEventListener("pagehide", this._onPageHide);
      const closed = new KometaError("closed", "the client was closed");
      for (const s of this._subs.values()) for (const h of s.handles) { h.active = false; h._reject(closed); }
      this._subs.clear();
      for (const p of this._remote.values()) { clearTimeout(p.timer); p.reject(closed); }
      this._remote.clear();
      if (this._hub) {
        const hub = this._hub;
        this._hub = null;
        if (this._shared) this._shared.post({ t: "leader-bye" });
        hub.stop();
      } else if (this._shared) {
        this._shared.post({ t: "bye" });
      }
      if (this._shared) this._shared.close();
      this._state({ state: "closed", transport: null, user: this.user });
    }

    // ---- the connection, here or in the leader tab

    _becomeLeader() {
      if (this._closed || this._hub) return;
      this.role = this._shared ? "leader" : "standalone";
      const core = new Core(this._ep, this.options, this._env);
      const hub = (this._hub = new Hub(core, this, this._shared));
      for (const [channel, s] of this._subs) {
        s.rid = ++this._rid;
        hub.interest(this.id, channel, s.pos, s.rid, s.counts);
      }
      if (this._inboxHandlers.size) hub.setInbox(this.id, true);
      for (const p of this._remote.values()) {
        clearTimeout(p.timer);
        if (p.sent && !IDEMPOTENT.has(p.cmd.op)) p.reject(new KometaError("connection_lost", "the leader tab went away"));
        else core.request(p.cmd, p.timeout).then(p.resolve, p.reject);
      }
      this._remote.clear();
      if (this._shared) {
        this._shared.leaderId = this.id;
        this._shared.post({ t: "leader", state: core.status });
      }
      this._ev.emit("role", { role: this.role });
      core.start();
    }

    // BroadcastChannel election only: another leader with a lower id exists.
    _stepDown(leaderId, state) {
      const hub = this._hub;
      if (!hub) return;
      this._hub = null;
      hub.stop();
      this.role = "follower";
      this._shared.leaderId = leaderId;
      this._ev.emit("role", { role: this.role });
      this._leaderChanged(state);
    }

    _leaderChanged(state) {
      const sh = this._shared;
      const subs = [];
      for (const [channel, s] of this._subs) {
        s.rid = ++this._rid;
        subs.push({ channel, since: s.pos, rid: s.rid, counts: s.counts });
      }
      sh.post({ t: "hello", subs, inbox: this._inboxHandlers.size > 0 });
      for (const [rid, p] of [...this._remote]) {
        if (p.sent && !IDEMPOTENT.has(p.cmd.op)) {
          this._remote.delete(rid);
          clearTimeout(p.timer);
          p.reject(new KometaError("connection_lost", "the leader tab went away"));
        } else {
          p.sent = true;
          sh.post({ t: "req", rid, cmd: p.cmd, timeout: p.timeout });
        }
      }
      if (state) this._state(state);
    }

    _interest(channel, s) {
      s.rid = ++this._rid;
      if (this._hub) this._hub.interest(this.id, channel, s.pos, s.rid, s.counts);
      else if (this._shared && this._shared.leaderId) this._shared.post({ t: "sub", channel, since: s.pos, rid: s.rid, counts: s.counts });
      // else: sent with the hello once a leader answers
    }

    _uninterest(channel) {
      if (this._hub) this._hub.uninterest(this.id, channel);
      else if (this._shared && this._shared.leaderId) this._shared.post({ t: "unsub", channel });
    }

    _setInbox(on) {
      if (this._hub) this._hub.setInbox(this.id, on);
      else if (this._shared && this._shared.leaderId) this._shared.post({ t: "inbox-on", on });
    }

    _inboxDone(seq) {
      if (this._hub) this._hub.inboxDone(this.id, seq);
      else if (this._shared && this._shared.leaderId) this._shared.post({ t: "inbox-done", seq });
    }

    _request(cmd, timeout) {
      if (this._closed) return Promise.reject(new KometaError("closed", "the client was closed"));
      const t = timeout || this.options.timeout;
      if (this._hub) return this._hub.core.request(cmd, t);
      return new Promise((resolve, reject) => {
        try {
          JSON.stringify(cmd);
        } catch (e) {
          return reject(new KometaError("bad_request", "data is not JSON: " + e.message));
        }
        if (this._remote.size >= this.options.queueSize) {
          return reject(new KometaError("queue_full", "offline queue full (" + this.options.queueSize + " commands)"));
        }
        const rid = ++this._rid;
        const p = { cmd, timeout: t, resolve, reject, sent: false, timer: null };
        p.timer = setTimeout(() => {
          if (this._remote.delete(rid)) reject(new KometaError("timeout", "no reply to " + cmd.op));
        }, this.options.queueTimeout + t);
        this._remote.set(rid, p);
        if (this._shared && this._shared.leaderId) {
          p.sent = true;
          this._shared.post({ t: "req", rid, cmd, timeout: t });
        }
      });
    }

    _unsubscribe(h) {
      if (!h.active) return;
      h.active = false;
      h._reject(new KometaError("unsubscribed", "unsubscribed"));
      const s = this._subs.get(h.channel);
      if (!s || !s.handles.delete(h) || s.handles.size) return;
      this._subs.delete(h.channel);
      s.repairGen++;
      if (!this._closed) this._uninterest(h.channel);
    }

    // ---- from the leader (this tab's Hub, or another tab's over BroadcastChannel)

    _fromLeader(m) {
      if (this._closed) return;
      switch (m.t) {
        case "push": return this._onPush(m.channel, m.epoch, m.msg);
        case "sub-r": return this._onInterest(m.channel, m.rid, m.err, m.res);
        case "res": {
          const p = this._remote.get(m.rid);
          if (!p) return;
          this._remote.delete(m.rid);
          clearTimeout(p.timer);
          if (m.err) p.reject(errorOf(m.err));
          else p.resolve(m.reply);
          return;
        }
        case "state": return this._state(m.state);
        case "recovery": return this._onRecovery(m.channel, m.res);
        case "suberror": {
          const s = this._subs.get(m.channel);
          if (s) this._subFailed(m.channel, s, errorOf(m.err));
          return;
        }
        case "error": return this._ev.emit("error", errorOf(m.err));
        case "inbox": return this._onInbox(m.msg);
        case "inbox-acked":
          if (m.seq > this._inboxHigh) this._inboxHigh = m.seq;
          return;
      }
    }

    _state(st) {
      if (this._closed && st.state !== "closed") return;
      if (this.state === "closed" && st.state === "closed") return;
      this.state = st.state;
      this.transport = st.transport || null;
      if (st.user !== undefined) this.user = st.user;
      this._ev.emit("state", Object.assign({}, st, { role: this.role }));
    }

    _onInterest(channel, rid, err, res) {
      const s = this._subs.get(channel);
      if (!s || s.rid !== rid) return;
      if (err) return this._subFailed(channel, s, errorOf(err));
      const first = s.status === "pending";
      s.status = "active";
      const had = s.pos;
      if (!had) {
        s.pos = { epoch: res.epoch, offset: res.base };
      } else if (res.recovered === false || had.epoch !== res.epoch) {
        this._lost(channel, s, res.epoch, res.base, res.reason || "epoch_changed");
      } else {
        if (had.offset < res.base) this._repair(channel, s, res.base);
        if (first && s.explicit) this._ev.emit("recovery", { channel, recovered: true, epoch: res.epoch, offset: s.pos.offset });
      }
      if (first) for (const h of s.handles) h._resolve({ epoch: s.pos.epoch, offset: s.pos.offset });
    }

    _onRecovery(channel, res) {
      const s = this._subs.get(channel);
      if (!s || s.status !== "active") return;
      if (res.recovered === false) this._lost(channel, s, res.epoch, res.base, res.reason);
      else this._ev.emit("recovery", { channel, recovered: true, epoch: res.epoch, offset: res.base });
    }

    // Publications were missed and cannot be had: start again at the server's
    // position and tell the app (it should reload its state).
    _lost(channel, s, epoch, offset, reason) {
      s.pos = { epoch, offset };
      s.buffer = [];
      s.repairGen++;
      s.repairing = false;
      s.target = 0;
      this._ev.emit("recovery", { channel, recovered: false, reason: reason || "not_recovered", epoch, offset });
    }

    _subFailed(channel, s, err) {
      if (this._subs.get(channel) !== s) return;
      this._subs.delete(channel);
      s.repairGen++;
      for (const h of s.handles) {
        h.active = false;
        h._reject(err);
      }
      err.channel = channel;
      this._ev.emit("error", err);
    }

    _onPush(channel, epoch, msg) {
      const s = this._subs.get(channel);
      if (!s || s.status !== "active") return;
      if (typeof msg.offset !== "number") return this._deliver(s, msg);
      if (epoch && s.pos.epoch !== epoch) {
        // A new epoch without word of it (should not happen): do not hide it.
        this._lost(channel, s, epoch, msg.offset - 1, "epoch_changed");
      }
      if (s.repairing) {
        if (s.buffer.length >= REORDER_BUFFER_MAX) return this._lost(channel, s, s.pos.epoch, msg.offset, "buffer_full");
        s.buffer.push(msg);
        return;
      }
      if (msg.offset <= s.pos.offset) return;
      if (msg.offset === s.pos.offset + 1) {
        s.pos = { epoch: s.pos.epoch, offset: msg.offset };
        return this._deliver(s, msg);
      }
      s.buffer.push(msg);
      this._repair(channel, s, msg.offset - 1);
    }

    // Fill the gap after s.pos up to `target` from history, then deliver the
    // pushes held meanwhile, in order.
    _repair(channel, s, target) {
      if (target > s.target) s.target = target;
      if (s.repairing) return;
      s.repairing = true;
      const gen = ++s.repairGen;
      const alive = () => this._subs.get(channel) === s && s.repairGen === gen;
      (async () => {
        let failed = null;
        try {
          while (s.pos.offset < s.target) {
            const r = await this._request({ op: "history", channel, since: { epoch: s.pos.epoch, offset: s.pos.offset }, limit: HISTORY_PAGE });
            if (!alive()) return;
            if (r.epoch_changed || String(r.epoch) !== s.pos.epoch) { failed = "epoch_changed"; break; }
            const pubs = (Array.isArray(r.publications) ? r.publications : [])
              .filter((p) => p && typeof p.offset === "number" && p.offset > s.pos.offset)
              .sort((a, b) => a.offset - b.offset);
            if (!pubs.length) { failed = "history_too_short"; break; }
            if (pubs[0].offset !== s.pos.offset + 1) failed = "history_too_short";
            for (const p of pubs) {
              if (!alive()) return;
              if (p.offset <= s.pos.offset) continue;
              s.pos = { epoch: s.pos.epoch, offset: p.offset };
              if (p.channel === undefined) p.channel = channel;
              this._deliver(s, p);
            }
            if (failed || r.next === null || r.next === undefined) break;
          }
        } catch (e) {
          if (!alive()) return;
          failed = (e && e.code) || "error";
        }
        if (!alive()) return;
        s.repairing = false;
        if (failed) this._ev.emit("recovery", { channel, recovered: false, reason: failed, epoch: s.pos.epoch, offset: s.pos.offset });
        const held = s.buffer.sort((a, b) => a.offset - b.offset);
        s.buffer = [];
        for (let i = 0; i < held.length; i++) {
          const m = held[i];
          if (m.offset <= s.pos.offset) continue;
          if (m.offset !== s.pos.offset + 1 && !failed) {
            // Another gap: repair again from here.
            s.buffer = held.slice(i);
            return this._repair(channel, s, m.offset - 1);
          }
          s.pos = { epoch: s.pos.epoch, offset: m.offset };
          this._deliver(s, m);
          if (!alive()) return;
        }
        if (s.target <= s.pos.offset) s.target = 0;
      })();
    }

    _deliver(s, msg) {
      for (const h of [...s.handles]) {
        if (!h.active || (h.event !== "*" && h.event !== msg.event)) continue;
        try { h._cb(msg); } catch (e) { report(e); }
      }
    }

    _onInbox(msg) {
      this._inboxChain = this._inboxChain.then(async () => {
        if (this._closed) return;
        const seq = typeof msg.inbox === "number" ? msg.inbox : null;
        if (seq !== null && seq <= this._inboxHigh) return this._inboxDone(seq); // delivered once already
        for (const fn of [...this._inboxHandlers]) {
          try { await fn(msg); } catch (e) { report(e); }
        }
        if (seq !== null) {
          if (seq > this._inboxHigh) this._inboxHigh = seq;
          this._inboxDone(seq);
        }
      });
    }
  }

  const Kometa = {
    version: VERSION,
    protocol: "kometa.v1",
    defaults: DEFAULTS,
    /** Opens (or joins, in another tab) the connection to a Kometa server. */
    connect(url, options) { return new Client(url, options); },
    Client,
    KometaError,
    endpoints,
  };
  Kometa.Kometa = Kometa; // import { Kometa } / require(...).Kometa
  Kometa.default = Kometa; // import Kometa / require(...).default
  Object.freeze(Kometa);

  root.Kometa = Kometa;
  if (typeof module === "object" && module && module.exports) module.exports = Kometa;
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this);
