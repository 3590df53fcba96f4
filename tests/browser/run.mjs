// Browser tests of client/kometa.js: Debian's Chromium (headless) driven by
// playwright-core, against real Kometa servers (target/debug/kometa).
//
//   node tests/browser/run.mjs [NAME_SUBSTRING...]
//
// Each test starts what it needs (servers, a proxy, browser contexts) and
// everything is torn down after it, pass or fail. Prints one line per test
// and a summary; exits 1 when any test failed.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { chromium } from "playwright-core";
import { ROOT, startKometa, stopAll, token } from "./lib/kometa.mjs";
import { startProxy, startStatic } from "./lib/net.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-background-timer-throttling",
  "--disable-renderer-backgrounding",
  "--disable-backgrounding-occluded-windows",
];
const TRANSPORTS = ["websocket", "sse", "longpoll"];
const FAST = { reconnectDelayMin: 200, reconnectDelayMax: 1000 };

const tests = [];
const test = (name, fn, timeoutMs = 30000) => tests.push({ name, fn, timeoutMs });

let browser;
let statik;

// ---- per-test fixtures

class Fixture {
  constructor() { this.cleanups = []; }
  defer(fn) { this.cleanups.push(fn); }
  async server(opts) {
    const s = await startKometa(opts);
    this.defer(() => s.stop());
    return s;
  }
  async proxy(port) {
    const p = await startProxy(port);
    this.defer(() => p.close());
    return p;
  }
  async context(initScript) {
    const ctx = await browser.newContext();
    if (initScript) await ctx.addInitScript(initScript);
    this.defer(() => ctx.close().catch(() => {}));
    return ctx;
  }
  // A harness page (served by the static server: another origin than Kometa).
  async page(ctx) {
    const c = ctx || (await this.context());
    const page = await c.newPage();
    page.on("console", (m) => { if (process.env.VERBOSE) console.log(`    [page] ${m.text()}`); });
    await page.goto(statik.url + "/pages/harness.html");
    return page;
  }
  async cleanup() {
    for (const fn of this.cleanups.reverse()) {
      try { await fn(); } catch (e) { console.error("    cleanup:", e.message); }
    }
  }
}

// ---- helpers

const until = (page, fn, arg, timeout = 10000) => page.waitForFunction(fn, arg, { timeout, polling: 50 });

async function connect(page, url, options) {
  await page.evaluate(([u, o]) => T.connect(u, o), [url, options || {}]);
  await until(page, () => T.connected());
}

function range(from, to) {
  const out = [];
  for (let i = from; i <= to; i++) out.push(i);
  return out;
}

async function noPageErrors(...pages) {
  for (const p of pages) {
    if (p.isClosed()) continue;
    assert.deepEqual(await p.evaluate(() => T.pageErrors), [], "errors in the page");
  }
}

// Publishes `channel` messages numbered from `first`, one every `everyMs`,
// until stop() is called; resolves to the last number sent.
function publisher(server, channel, first = 1, everyMs = 25) {
  let n = first - 1;
  let running = true;
  const done = (async () => {
    while (running) {
      await server.publish(channel, "tick", { n: n + 1 });
      n++;
      await sleep(everyMs);
    }
    return n;
  })();
  return { stop: async () => { running = false; return done; }, get count() { return n; } };
}

// ---- tests

test("kometa.js never evaluates server data (static check)", async () => {
  const src = readFileSync(path.join(ROOT, "client/kometa.js"), "utf8").replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, "");
  for (const bad of [/\beval\s*\(/, /\bnew\s+Function\b/, /\bFunction\s*\(/, /innerHTML|outerHTML|insertAdjacentHTML|document\.write/, /setTimeout\(\s*["'`]/, /\bimport\s*\(/]) {
    assert.doesNotMatch(src, bad);
  }
  const demo = readFileSync(path.join(ROOT, "client/demo.html"), "utf8");
  assert.doesNotMatch(demo, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\s*\(/);
  assert.doesNotMatch(demo, /(src|href)="(https?:)?\/\//, "the demo loads nothing from elsewhere");
});

for (const kind of TRANSPORTS) {
  test(`messages arrive over ${kind} (forced)`, async (t) => {
    const srv = await t.server();
    const page = await t.page();
    await connect(page, srv.url, { transports: [kind], share: false });
    assert.equal(await page.evaluate(() => T.k.transport), kind);
    const start = await page.evaluate(() => T.sub("news"));
    assert.equal(start.offset, 0);
    await page.evaluate(() => T.sub("news.special"));
    for (let i = 1; i <= 5; i++) await srv.publish("news", i === 3 ? "special" : "update", { i });
    await until(page, () => T.offsets("news").length === 5);
    const got = await page.evaluate(() => T.got.news);
    assert.deepEqual(got.map((m) => m.offset), range(1, 5));
    assert.deepEqual(got.map((m) => m.data.i), range(1, 5));
    assert.deepEqual(await page.evaluate(() => T.offsets("news.special")), [3], "the event filter of the shorthand");

    // Client publish on a web_ channel comes back to its subscriber, anonymous.
    await page.evaluate(() => T.sub("web_chat"));
    const pub = await page.evaluate(() => T.call("publish", "web_chat", "msg", { text: "hi" }));
    assert.equal(pub.ok.offset, 1);
    await until(page, () => (T.got.web_chat || []).length === 1);
    const chat = await page.evaluate(() => T.got.web_chat[0]);
    assert.equal(chat.event, "msg");
    assert.equal(chat.data.text, "hi");
    assert.equal(chat.user, undefined);
    assert.equal((await page.evaluate(() => T.call("publish", "news", "x", 1))).error, "forbidden");

    await page.evaluate(() => T.sub("track_room"));
    const stats = await page.evaluate(() => T.call("presenceStats", "track_room"));
    assert.equal(stats.ok.anonymous, 1);
    const presence = await page.evaluate(() => T.call("presence", "track_room"));
    assert.deepEqual(presence.ok.members, []);
    const hist = await page.evaluate(() => T.call("history", "news", { since: null, limit: 2 }));
    assert.deepEqual(hist.ok.publications.map((p) => p.offset), [1, 2]);

    // A handle unsubscribed gets nothing more; the other one on the channel still does.
    await page.evaluate(() => T.unsub("news"));
    await srv.publish("news", "special", { i: 6 });
    await until(page, () => T.offsets("news.special").length === 2);
    assert.equal(await page.evaluate(() => T.offsets("news").length), 5);
    // The last handle unsubscribed: the server drops the subscription.
    await page.evaluate(() => T.unsub("news.special"));
    for (let i = 0; i < 40; i++) {
      const r = await srv.publish("news", "special", { i: 7 });
      if (r.subscribers === 0) break;
      await sleep(50);
      assert.ok(i < 39, "the server still has a subscriber after unsubscribe");
    }
    assert.deepEqual(await page.evaluate(() => T.errors), []);
    await noPageErrors(page);
  });
}

test("WebSocket blocked by a proxy: falls back to SSE, upgrades when allowed, no gap", async (t) => {
  const srv = await t.server();
  const px = await t.proxy(srv.port);
  px.setMode("block-ws");
  const page = await t.page();
  await connect(page, px.url, { share: false, upgradeDelay: 1500 });
  assert.equal(await page.evaluate(() => T.k.transport), "sse");
  assert.ok(px.state.refused >= 1, "the WebSocket was tried first");
  await page.evaluate(() => T.sub("news"));
  const pub = publisher(srv, "news");
  await until(page, () => T.offsets("news").length >= 10);
  px.setMode("pass");
  await until(page, () => T.k.transport === "websocket", null, 15000);
  await sleep(300);
  const last = await pub.stop();
  await until(page, (n) => T.offsets("news").length >= n, last);
  await sleep(200);
  assert.deepEqual(await page.evaluate(() => T.offsets("news")), range(1, last), "every message once, in order");
  assert.deepEqual(await page.evaluate(() => T.transports()), ["sse", "websocket"]);
  // The SSE session was ended when the WebSocket took over: one subscription
  // left. (`connections` also counts the browser's idle keep-alive sockets.)
  let stats;
  for (let i = 0; i < 50; i++) {
    stats = await srv.stats();
    if (stats.subscriptions === 1) break;
    await sleep(100);
  }
  assert.equal(stats.websockets, 1, JSON.stringify(stats));
  assert.equal(stats.subscriptions, 1, "the SSE session is gone");
  await noPageErrors(page);
});

test("WebSocket and SSE blocked: falls back to long-polling and receives", async (t) => {
  const srv = await t.server();
  const px = await t.proxy(srv.port);
  px.setMode("block-ws-sse");
  const page = await t.page();
  await connect(page, px.url, { share: false });
  assert.equal(await page.evaluate(() => T.k.transport), "longpoll");
  await page.evaluate(() => T.sub("news"));
  for (let i = 1; i <= 3; i++) await srv.publish("news", "update", { i });
  await until(page, () => T.offsets("news").length === 3);
  assert.deepEqual(await page.evaluate(() => T.offsets("news")), [1, 2, 3]);
  await noPageErrors(page);
});

for (const kind of TRANSPORTS) {
  test(`connection cut (${kind}): reconnects and resumes without gaps`, async (t) => {
    const srv = await t.server();
    const px = await t.proxy(srv.port);
    const page = await t.page();
    await connect(page, px.url, { transports: [kind], share: false, ...FAST });
    await page.evaluate(() => T.sub("news"));
    for (let i = 1; i <= 5; i++) await srv.publish("news", "update", { i });
    await until(page, () => T.offsets("news").length === 5);
    px.setMode("down");
    px.cut();
    await until(page, () => T.k.state !== "connected");
    for (let i = 6; i <= 15; i++) await srv.publish("news", "update", { i });
    await sleep(600);
    px.setMode("pass");
    await until(page, () => T.k.state === "connected" && T.offsets("news").length === 15, null, 15000);
    for (let i = 16; i <= 20; i++) await srv.publish("news", "update", { i });
    await until(page, () => T.offsets("news").length >= 20);
    await sleep(200);
    assert.deepEqual(await page.evaluate(() => T.offsets("news")), range(1, 20), "every message once, in order");
    const states = await page.evaluate(() => T.states.map((s) => s.state));
    assert.ok(states.includes("disconnected") && states.includes("reconnecting"), states.join(","));
    const rec = await page.evaluate(() => T.recoveries);
    assert.ok(!rec.some((r) => r.recovered === false), JSON.stringify(rec));
    if (kind === "websocket") {
      assert.ok(rec.some((r) => r.channel === "news" && r.recovered === true), "resubscribed from its position");
    } else {
      const last = await page.evaluate(() => T.states.filter((s) => s.state === "connected").pop());
      assert.equal(last.resumed, true, "the HTTP session was resumed");
    }
    await noPageErrors(page);
  });
}

test("silent network drop: a ping goes unanswered, the client reconnects and resumes", async (t) => {
  const srv = await t.server();
  const px = await t.proxy(srv.port);
  const page = await t.page();
  await connect(page, px.url, { share: false, pingInterval: 1000, pingTimeout: 1000, ...FAST });
  await page.evaluate(() => T.sub("news"));
  for (let i = 1; i <= 3; i++) await srv.publish("news", "update", { i });
  await until(page, () => T.offsets("news").length === 3);
  px.stall();
  for (let i = 4; i <= 6; i++) await srv.publish("news", "update", { i });
  await until(page, () => T.states.some((s) => s.state === "disconnected"), null, 8000);
  await until(page, () => T.k.state === "connected" && T.offsets("news").length === 6, null, 8000);
  assert.deepEqual(await page.evaluate(() => T.offsets("news")), range(1, 6));
  await noPageErrors(page);
});

test("server restarted: reconnects, reports not recovered (new epoch), keeps receiving", async (t) => {
  const a = await t.server();
  const px = await t.proxy(a.port);
  const page = await t.page();
  await connect(page, px.url, { share: false, ...FAST });
  await page.evaluate(() => T.sub("news"));
  for (let i = 1; i <= 3; i++) await a.publish("news", "update", { i });
  await until(page, () => T.offsets("news").length === 3);
  await a.stop();
  await until(page, () => T.k.state !== "connected");
  const b = await t.server();
  px.setUpstream(b.port);
  await until(page, () => T.recoveries.some((r) => r.channel === "news" && r.recovered === false), null, 15000);
  const rec = await page.evaluate(() => T.recoveries.find((r) => r.recovered === false));
  assert.equal(rec.reason, "epoch_changed");
  assert.equal(await page.evaluate(() => T.k.transport), "websocket");
  for (let i = 1; i <= 2; i++) await b.publish("news", "update", { i: 100 + i });
  await until(page, () => T.offsets("news").length === 5);
  assert.deepEqual(await page.evaluate(() => T.got.news.map((m) => m.data.i)), [1, 2, 3, 101, 102]);
  await noPageErrors(page);
});

test("commands issued while offline are queued (bounded) and sent on reconnect", async (t) => {
  const srv = await t.server();
  const px = await t.proxy(srv.port);
  const page = await t.page();
  await connect(page, px.url, { share: false, queueSize: 3, ...FAST });
  await page.evaluate(() => T.sub("web_q"));
  px.setMode("down");
  px.cut();
  await until(page, () => T.k.state !== "connected");
  await page.evaluate(() => {
    T.queued = [1, 2, 3].map((n) => T.call("publish", "web_q", "m", { n }));
    return T.call("publish", "web_q", "m", { n: 4 }).then((r) => (T.fourth = r));
  });
  assert.equal(await page.evaluate(() => T.fourth.error), "queue_full");
  px.setMode("pass");
  const results = await page.evaluate(() => Promise.all(T.queued));
  assert.deepEqual(results.map((r) => r.ok && r.ok.offset), [1, 2, 3]);
  await until(page, () => (T.got.web_q || []).length === 3);
  assert.deepEqual(await page.evaluate(() => T.got.web_q.map((m) => m.data.n)), [1, 2, 3]);
  await noPageErrors(page);
});

// A server and two connected tabs of one browser context (they share one
// connection: p1 leads).
async function sharedTabs(t) {
  const srv = await t.server();
  const ctx = await t.context();
  const p1 = await t.page(ctx);
  const p2 = await t.page(ctx);
  await connect(p1, srv.url);
  await connect(p2, srv.url);
  return { srv, p1, p2 };
}

test("two tabs share one server connection; each receives what it subscribed to", async (t) => {
  const { srv, p1, p2 } = await sharedTabs(t);
  assert.equal(await p1.evaluate(() => T.k.role), "leader");
  assert.equal(await p2.evaluate(() => T.k.role), "follower");
  assert.equal(await p2.evaluate(() => T.k.transport), "websocket");
  await p1.evaluate(() => T.sub("alpha"));
  await p2.evaluate(() => T.sub("beta"));
  await p2.evaluate(() => T.sub("web_room"));
  await p1.evaluate(() => T.sub("web_room"));
  const stats = await srv.stats();
  assert.equal(stats.websockets, 1, "one WebSocket for both tabs");
  assert.equal(stats.connections, 1);
  assert.equal(stats.subscriptions, 3, "alpha, beta and web_room once each");
  for (let i = 1; i <= 3; i++) {
    await srv.publish("alpha", "a", { i });
    await srv.publish("beta", "b", { i });
  }
  await until(p1, () => T.offsets("alpha").length === 3);
  await until(p2, () => T.offsets("beta").length === 3);
  // A follower's command goes through the leader's connection.
  const pub = await p2.evaluate(() => T.call("publish", "web_room", "say", { from: "tab2" }));
  assert.equal(pub.ok.offset, 1);
  await until(p1, () => (T.got.web_room || []).length === 1);
  await until(p2, () => (T.got.web_room || []).length === 1);
  const ps = await p2.evaluate(() => T.call("presenceStats", "track_x"));
  assert.equal(ps.ok.channel, "track_x");
  assert.deepEqual(await p1.evaluate(() => [T.got.beta, T.offsets("alpha")]), [undefined, [1, 2, 3]]);
  assert.deepEqual(await p2.evaluate(() => [T.got.alpha, T.offsets("beta")]), [undefined, [1, 2, 3]]);
  // The follower drops beta: the leader unsubscribes it on the server.
  await p2.evaluate(() => T.unsub("beta"));
  for (let i = 0; ; i++) {
    if ((await srv.stats()).subscriptions === 2) break;
    assert.ok(i < 50, "beta still subscribed on the server");
    await sleep(50);
  }
  await noPageErrors(p1, p2);
});

test("presence counts are pushed to the tab that asks (shared connection), and presence pages", async (t) => {
  const { srv, p1, p2 } = await sharedTabs(t);
  // The leader subscribes without counts; the follower then asks for them on
  // the same channel: the leader subscribes again, with them.
  await p1.evaluate(() => T.sub("track_room", { event: "*" }));
  await p2.evaluate(() => T.sub("track_room.presence_counts", { presenceCounts: true }));
  const counts = (page) => page.evaluate(() => (T.got["track_room.presence_counts"] || []).map((m) => m.data));
  await until(p2, () => (T.got["track_room.presence_counts"] || []).length > 0);
  // Another visitor (its own connection) arrives: the counts follow.
  const other = await t.page();
  await connect(other, srv.url, { share: false });
  await other.evaluate(() => T.sub("track_room"));
  await until(p2, () => (T.got["track_room.presence_counts"] || []).some((m) => m.data.connections === 2));
  assert.deepEqual((await counts(p2)).at(-1), { users: 0, connections: 2, anonymous: 2 });
  assert.deepEqual(await p1.evaluate(() => T.recoveries), [], "the resubscribe for counts is no news");
  // Publications still arrive once each on the leader's subscription.
  await srv.publish("track_room", "msg", { n: 1 });
  await srv.publish("track_room", "msg", { n: 2 });
  await until(p1, () => T.offsets("track_room").filter((o) => o !== undefined).length === 2);
  assert.deepEqual(await p1.evaluate(() => T.offsets("track_room").filter((o) => o !== undefined)), [1, 2]);
  const page = await p1.evaluate(() => T.call("presence", "track_room", { limit: 1 }));
  assert.deepEqual([page.ok.members, page.ok.anonymous, page.ok.next], [[], 2, null]);
  await noPageErrors(p1, p2, other);
});

test("a tab joining a shared channel from an older position gets the missed publications from history", async (t) => {
  const { srv, p1, p2 } = await sharedTabs(t);
  await p1.evaluate(() => T.sub("news"));
  let epoch;
  for (let i = 1; i <= 8; i++) epoch = (await srv.publish("news", "update", { i })).epoch;
  await until(p1, () => T.offsets("news").length === 8);
  // p2 saved position 3 earlier (say, in sessionStorage) and resumes from it.
  const start = await p2.evaluate((e) => T.sub("news", { since: { epoch: e, offset: 3 } }), epoch);
  assert.equal(start.offset, 3);
  await until(p2, () => T.offsets("news").length === 5);
  await srv.publish("news", "update", { i: 9 });
  await until(p2, () => T.offsets("news").length === 6);
  await until(p1, () => T.offsets("news").length === 9);
  assert.deepEqual(await p2.evaluate(() => T.offsets("news")), range(4, 9));
  assert.deepEqual(await p2.evaluate(() => T.recoveries.map((r) => [r.channel, r.recovered])), [["news", true]]);
  // From a position of another epoch: reported as not recovered, live ones follow.
  await p2.evaluate(() => T.unsub("news"));
  await p2.evaluate(() => { T.got.news = []; T.recoveries = []; });
  await p2.evaluate(() => T.sub("news", { since: { epoch: "0000000000000000", offset: 2 } }));
  await until(p2, () => T.recoveries.length === 1);
  assert.deepEqual(await p2.evaluate(() => [T.recoveries[0].recovered, T.recoveries[0].reason]), [false, "epoch_changed"]);
  await srv.publish("news", "update", { i: 10 });
  await until(p2, () => T.offsets("news").length === 1);
  assert.deepEqual(await p2.evaluate(() => T.offsets("news")), [10]);
  await noPageErrors(p1, p2);
});

test("three tabs, leader closed: a follower of the new leader resumes without gaps too", async (t) => {
  const srv = await t.server();
  const ctx = await t.context();
  const pages = [];
  for (let i = 0; i < 3; i++) {
    const p = await t.page(ctx);
    await connect(p, srv.url, FAST);
    await p.evaluate(() => T.sub("news"));
    pages.push(p);
  }
  assert.equal(await pages[0].evaluate(() => T.k.role), "leader");
  const pub = publisher(srv, "news", 1, 15);
  await until(pages[2], () => T.offsets("news").length >= 20);
  await pages[0].close();
  const rest = pages.slice(1);
  for (let i = 0; ; i++) {
    const roles = await Promise.all(rest.map((p) => p.evaluate(() => T.k.role + ":" + T.k.state)));
    if (roles.includes("leader:connected")) break;
    assert.ok(i < 150, "no tab took over: " + roles.join(", "));
    await sleep(100);
  }
  await sleep(600);
  const last = await pub.stop();
  for (const p of rest) {
    await until(p, (n) => T.offsets("news").length >= n, last);
  }
  await sleep(200);
  const roles = [];
  for (const p of rest) {
    assert.deepEqual(await p.evaluate(() => T.offsets("news")), range(1, last), "every message once, in order");
    roles.push(await p.evaluate(() => T.k.role));
  }
  assert.deepEqual(roles.sort(), ["follower", "leader"]);
  assert.equal((await srv.stats()).websockets, 1);
  await noPageErrors(...rest);
});

async function takeover(t, initScript) {
  const srv = await t.server();
  const ctx = await t.context(initScript);
  const p1 = await t.page(ctx);
  await connect(p1, srv.url, FAST);
  const p2 = await t.page(ctx);
  await connect(p2, srv.url, FAST);
  assert.equal(await p1.evaluate(() => T.k.role), "leader");
  assert.equal(await p2.evaluate(() => T.k.role), "follower");
  await p1.evaluate(() => T.sub("news"));
  await p2.evaluate(() => T.sub("news"));
  await p2.evaluate(() => T.sub("other"));
  const pub = publisher(srv, "news");
  await until(p2, () => T.offsets("news").length >= 15);
  await p1.close();
  await until(p2, () => T.k.role === "leader" && T.k.state === "connected", null, 15000);
  await srv.publish("other", "o", { i: 1 });
  await sleep(500);
  const last = await pub.stop();
  await until(p2, (n) => T.offsets("news").length >= n, last);
  await until(p2, () => T.offsets("other").length === 1);
  await sleep(200);
  assert.deepEqual(await p2.evaluate(() => T.offsets("news")), range(1, last), "every message once, in order, across the takeover");
  let stats;
  for (let i = 0; i < 50; i++) {
    stats = await srv.stats();
    if (stats.connections === 1) break;
    await sleep(100);
  }
  assert.equal(stats.connections, 1);
  assert.equal(stats.subscriptions, 2);
  await noPageErrors(p2);
}

test("leader tab closed: the other tab takes over and resumes without gaps", (t) => takeover(t));

test("without Web Locks: BroadcastChannel election, one connection, takeover", (t) =>
  takeover(t, () => { Object.defineProperty(Navigator.prototype, "locks", { get: () => undefined, configurable: true }); }));

const SECRET = "browser-test-secret-0123456789";

for (const kind of ["websocket", "longpoll"]) {
  test(`user messages with a token (${kind}): delivered once, acknowledged, not again after a reload`, async (t) => {
    const srv = await t.server({ tokenSecret: SECRET });
    const tok = await token(SECRET, 42);
    const opts = { token: tok, share: false, transports: [kind] };
    const ctx = await t.context();
    let page = await t.page(ctx);
    await connect(page, srv.url, opts);
    assert.equal(await page.evaluate(() => T.k.user), "42");
    await page.evaluate(() => T.onMessage(150));
    const r1 = await srv.sendUser(["42"], "notice", { n: 1 });
    assert.equal(r1.results[0].delivered, 1);
    await srv.sendUser(["42"], "notice", { n: 2 });
    await until(page, () => T.inbox.length === 2);
    const seq = r1.results[0].inbox;
    assert.deepEqual(await page.evaluate(() => T.inbox.map((m) => [m.inbox, m.event, m.data.n])), [[seq, "notice", 1], [seq + 1, "notice", 2]]);
    await sleep(400); // the acks reach the server
    await page.reload();
    await connect(page, srv.url, opts);
    await page.evaluate(() => T.onMessage(0));
    await sleep(1200);
    assert.deepEqual(await page.evaluate(() => T.inbox), [], "acknowledged messages came again");
    // Sent while no page is open: delivered on the next visit, once.
    await page.close();
    for (let i = 0; ; i++) {
      const status = JSON.parse(await srv.cli("user-status", "42"));
      if (status.results[0].status !== "online") break;
      assert.ok(i < 100, "user 42 still online after its page closed");
      await sleep(100);
    }
    const r3 = await srv.sendUser(["42"], "notice", { n: 3 });
    assert.equal(r3.results[0].delivered, 0);
    assert.equal(r3.results[0].stored, true);
    page = await t.page(ctx);
    await connect(page, srv.url, opts);
    await sleep(300); // the message arrives before the app handles user messages: it is held
    await page.evaluate(() => T.onMessage(0));
    await until(page, () => T.inbox.length === 1);
    await sleep(500);
    assert.deepEqual(await page.evaluate(() => T.inbox.map((m) => m.data.n)), [3]);
    await noPageErrors(page);
  });
}

test("shared tabs and user messages: every tab with a handler runs it once; acknowledged once", async (t) => {
  const srv = await t.server({ tokenSecret: SECRET });
  const tok = await token(SECRET, 7);
  const ctx = await t.context();
  const p1 = await t.page(ctx);
  const p2 = await t.page(ctx);
  await connect(p1, srv.url, { token: tok });
  await connect(p2, srv.url, { token: tok });
  assert.equal(await p2.evaluate(() => T.k.role), "follower");
  await p1.evaluate(() => T.onMessage(0));
  await p2.evaluate(() => T.onMessage(300));
  await sleep(200);
  await srv.sendUser(["7"], "notice", { n: 1 });
  await until(p1, () => T.inbox.length === 1);
  await until(p2, () => T.inbox.length === 1);
  await sleep(300);
  // Both tabs gone and a new one opens: nothing comes again.
  await p1.close();
  await p2.close();
  const p3 = await t.page(ctx);
  await connect(p3, srv.url, { token: tok });
  await p3.evaluate(() => T.onMessage(0));
  await srv.sendUser(["7"], "notice", { n: 2 });
  await until(p3, () => T.inbox.length === 1);
  await sleep(500);
  assert.deepEqual(await p3.evaluate(() => T.inbox.map((m) => m.data.n)), [2]);
  await noPageErrors(p3);
});

test("a bad token is reported and the client stops (no reconnect loop)", async (t) => {
  const srv = await t.server({ tokenSecret: SECRET });
  const page = await t.page();
  await page.evaluate((u) => T.connect(u, { token: "not.a.token", share: false }), srv.url);
  await until(page, () => T.k.state === "closed");
  assert.equal(await page.evaluate(() => T.errors[0] && T.errors[0].code), "unauthorized");
  const last = await page.evaluate(() => T.states[T.states.length - 1]);
  assert.equal(last.code, "unauthorized");
});

test("tokens: a token function is called again before expiry; an expired string token closes the client", async (t) => {
  const srv = await t.server({ tokenSecret: SECRET });
  const page = await t.page();
  let minted = 0;
  // 32 s tokens: the client refreshes 30 s before expiry, so after about 2 s.
  await page.exposeFunction("mintToken", async () => { minted++; return token(SECRET, 42, 32); });
  await page.evaluate((u) => T.connect(u, { share: false, token: () => window.mintToken() }), srv.url);
  await until(page, () => T.connected());
  assert.equal(await page.evaluate(() => T.k.user), "42");
  for (let i = 0; minted < 2; i++) {
    assert.ok(i < 60, "the token function was not called again");
    await sleep(100);
  }
  await sleep(300);
  assert.equal(await page.evaluate(() => T.k.state), "connected");
  assert.deepEqual(await page.evaluate(() => T.errors), []);

  const page2 = await t.page();
  await page2.evaluate(([u, tok]) => T.connect(u, { share: false, token: tok }), [srv.url, await token(SECRET, 43, 2)]);
  await until(page2, () => T.connected());
  await until(page2, () => T.k.state === "closed", null, 8000);
  const last = await page2.evaluate(() => T.states[T.states.length - 1]);
  assert.equal(last.code, "token_expired");
  assert.equal(await page2.evaluate(() => T.errors[0].code), "token_expired");
});

test("kometa.mjs works as an ES module; the server serves the current client files", async (t) => {
  const srv = await t.server();
  const ctx = await t.context();
  const page = await ctx.newPage();
  await page.goto(statik.url + "/pages/module.html?server=" + encodeURIComponent(srv.url));
  await until(page, () => window.MOD && window.MOD.state === "connected");
  assert.equal(await page.evaluate(() => window.MOD.same), true);
  await sleep(100);
  await srv.publish("news", "update", { hello: "module" });
  await until(page, () => window.MOD.got.length === 1);
  for (const [route, file, type] of [["/kometa.js", "client/kometa.js", /javascript/], ["/kometa.mjs", "client/kometa.mjs", /javascript/], ["/kometa.d.ts", "client/kometa.d.ts", /./], ["/demo", "client/demo.html", /text\/html/]]) {
    const res = await fetch(srv.url + route);
    assert.equal(res.status, 200, route);
    assert.match(res.headers.get("content-type") || "", type, route);
    assert.equal(await res.text(), readFileSync(path.join(ROOT, file), "utf8"), `${route} differs from ${file}: rebuild the server (cargo build --bins)`);
  }
});

test("demo page: two visitors chat and see each other online", async (t) => {
  const srv = await t.server();
  const pages = [];
  for (let i = 0; i < 2; i++) {
    const ctx = await t.context();
    const p = await ctx.newPage();
    const errors = [];
    p.on("pageerror", (e) => errors.push(e.message));
    p.errors = errors;
    await p.goto(srv.url + "/demo");
    pages.push(p);
  }
  const [a, b] = pages;
  for (const p of pages) await p.waitForFunction(() => document.querySelector("#online").textContent.trim() === "2", null, { timeout: 15000, polling: 100 });
  await a.fill("#nick", "alice");
  await a.fill("#text", "hello <b>bob</b>");
  await a.press("#text", "Enter");
  await b.waitForFunction(() => document.querySelector("#log").textContent.includes("hello <b>bob</b>"), null, { timeout: 10000, polling: 50 });
  assert.equal(await b.evaluate(() => document.querySelector("#log b")), null, "chat text is shown as text, never as HTML");
  assert.ok((await b.textContent("#log")).includes("alice"));
  await b.fill("#nick", "bob");
  await b.fill("#text", "hi alice");
  await b.click("#send");
  await a.waitForFunction(() => document.querySelector("#log").textContent.includes("hi alice"), null, { timeout: 10000, polling: 50 });
  assert.equal(await a.inputValue("#text"), "");
  await b.context().close();
  await a.waitForFunction(() => document.querySelector("#online").textContent.trim() === "1", null, { timeout: 15000, polling: 100 });
  for (const p of pages) assert.deepEqual(p.errors, []);
});

// ---- SockJS: the stock sockjs-client (pinned in package.json, installed by
// scripts/install-browser-deps.sh) against /sockjs and /comet

async function waitFor(check, what, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function sockjsPage(t) {
  const ctx = await t.context();
  const page = await ctx.newPage();
  page.on("console", (m) => { if (process.env.VERBOSE) console.log(`    [page] ${m.text()}`); });
  await page.goto(statik.url + "/pages/sockjs.html");
  return page;
}

const WS_OFF = "[sockjs]\nwebsocket = false\n";
for (const [name, config, options, transport] of [
  ["websocket", null, { transports: ["websocket"] }, "websocket"],
  ["xhr-streaming (WebSocket off)", WS_OFF, {}, "xhr-streaming"],
  ["xhr-polling (WebSocket off)", WS_OFF, { transports: ["xhr-polling"] }, "xhr-polling"],
  ["eventsource", null, { transports: ["eventsource"] }, "eventsource"],
  ["jsonp-polling", null, { transports: ["jsonp-polling"] }, "jsonp-polling"],
]) {
  test(`sockjs-client subscribes and receives over ${name}`, async (t) => {
    const srv = await t.server({ config });
    const page = await sockjsPage(t);
    // sockjs-client gives a transport a few round trips of /info to open;
    // a loaded CI machine needs longer (its documented `timeout` option).
    await page.evaluate(([u, o]) => S.connect(u, o), [srv.url + "/sockjs", { timeout: 10000, ...options }]);
    await until(page, () => S.opened || S.closed);
    assert.equal(await page.evaluate(() => S.closed), null, "the session opens");
    assert.equal(await page.evaluate(() => S.transport()), transport);
    const reply = (id) => until(page, (i) => S.json().some((m) => m.id === i), id).then(() =>
      page.evaluate((i) => S.json().find((m) => m.id === i), id));

    await page.evaluate(() => S.send(JSON.stringify({ op: "subscribe", channel: "news", id: 1 })));
    assert.equal((await reply(1)).ok, true);
    for (let i = 1; i <= 5; i++) await srv.publish("news", "update", { i, text: "zażółć \u2028 😀" });
    await until(page, () => S.json().filter((m) => m.event === "update").length === 5);
    const news = await page.evaluate(() => S.json().filter((m) => m.event === "update"));
    assert.deepEqual(news.map((m) => m.offset), range(1, 5));
    assert.equal(news[0].data.text, "zażółć \u2028 😀");

    // A client publication comes back through the same session.
    await page.evaluate(() => S.send(JSON.stringify({ op: "subscribe", channel: "web_chat", id: 2 })));
    assert.equal((await reply(2)).ok, true);
    await page.evaluate(() => S.send(JSON.stringify({ op: "publish", channel: "web_chat", data: { text: "hi </script>" }, id: 3 })));
    assert.equal((await reply(3)).ok, true);
    await until(page, () => S.json().some((m) => m.channel === "web_chat" && m.event));
    assert.equal(await page.evaluate(() => S.json().find((m) => m.channel === "web_chat" && m.event).data.text), "hi </script>");

    assert.equal(await page.evaluate(() => S.closed), null);
    assert.deepEqual(await page.evaluate(() => S.pageErrors), []);
    // Closing from the page aborts the receiving request, which ends the
    // session on the server (a JSONP script cannot be aborted: that
    // session ends after its next heartbeat and session_grace_ms).
    await page.evaluate(() => S.sock.close());
    if (transport !== "jsonp-polling") {
      await waitFor(async () => (await srv.stats()).http_sessions === 0, "the session ends");
    }
  });
}

test("Jii-comet through sockjs-client at /comet", async (t) => {
  const srv = await t.server();
  const page = await sockjsPage(t);
  await page.evaluate((u) => S.connect(u, { timeout: 10000 }), srv.url + "/comet");
  await until(page, () => S.opened);
  // Commands run in order: the refused unsubscribe comes after the subscribe.
  await page.evaluate(() => { S.send("subscribe news"); S.send("unsubscribe not-subscribed"); });
  await until(page, () => S.got.some((m) => m.startsWith("error ") && m.includes("not_subscribed")));
  await srv.publish("news", "update", { x: 1 });
  await until(page, () => S.got.includes('channel news {"x":1}'));
  await page.evaluate(() => S.send('action site/ping {"requestUid":"u-1"}'));
  await until(page, () => S.got.some((m) => m.startsWith("action ")));
  const answer = JSON.parse(await page.evaluate(() => S.got.find((m) => m.startsWith("action ")).slice(7)));
  assert.equal(answer.requestUid, "u-1");
  assert.equal(answer.error, "rpc_unavailable");
  assert.deepEqual(await page.evaluate(() => S.pageErrors), []);
});

// ---- runner

async function main() {
  const only = process.argv.slice(2);
  const selected = only.length ? tests.filter((x) => only.some((o) => x.name.includes(o))) : tests;
  const started = Date.now();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, timeout: 30000 });
  statik = await startStatic();
  let passed = 0;
  const failed = [];
  for (const tc of selected) {
    const t = new Fixture();
    const t0 = Date.now();
    let timer;
    try {
      await Promise.race([
        tc.fn(t),
        new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${tc.timeoutMs} ms`)), tc.timeoutMs); }),
      ]);
      passed++;
      console.log(`ok   ${tc.name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed.push(tc.name);
      console.log(`FAIL ${tc.name} (${Date.now() - t0} ms)\n     ${String((e && e.stack) || e).split("\n").slice(0, 8).join("\n     ")}`);
    } finally {
      clearTimeout(timer);
      await t.cleanup();
    }
  }
  await browser.close();
  await statik.close();
  await stopAll();
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  console.log(`\nbrowser tests: ${passed} passed, ${failed.length} failed (${secs} s)`);
  for (const name of failed) console.log(`  failed: ${name}`);
  process.exit(failed.length ? 1 : 0);
}

main().catch(async (e) => {
  console.error(e);
  await stopAll().catch(() => {});
  process.exit(1);
});
