//! The Lua scripts that make each cluster operation one atomic step in
//! Redis (Redis runs a script to the end before any other command). Keys
//! and layout: `keys.rs`; message formats: `payload.rs`.
//!
//! Numbers that may pass 10^14 (inbox sequences) are written with
//! `string.format('%.0f', n)`: Redis's Lua 5.1 prints larger numbers in
//! exponent form. Time comes in as an argument (`now_ms`), never from the
//! script, so every node's clock is used the same way.

use std::sync::LazyLock;

/// One script: its source and SHA-1 (for EVALSHA after SCRIPT LOAD).
pub struct Script {
    pub name: &'static str,
    pub source: &'static str,
    pub sha: String,
}

impl Script {
    fn new(name: &'static str, source: &'static str) -> Script {
        Script { name, source, sha: redis::Script::new(source).get_hash().to_owned() }
    }
}

/// Assigns the next offset, keeps the publication in history and
/// publishes it. A channel gets a new epoch when it has none, or when its
/// epoch was written before Redis last started (`b`, Redis's run id: a
/// restart from a snapshot or a failover to a replica may have taken its
/// offsets back, and reused offsets must never look like ones clients saw).
/// History is trimmed approximately (`MAXLEN ~`: whole stream nodes, 1.5x
/// the publications/s of exact trimming, measured); readers keep only the
/// last `history size` offsets. Subscriber counts per node live in the meta
/// hash (`s:MEMBER`), so one HGETALL gives the epoch, the count for the
/// reply, and the nodes to ask about load: a publication is refused (load
/// shedding) when a node with subscribers of the channel says it is behind
/// (`P:busy`, by Redis's clock).
/// KEYS: meta, history, busy nodes. ARGV: topic, publish command, event,
/// data, user ("" none), history size, history ttl ms, meta ttl ms, only if
/// exists ("1"), now ms (the stored time), new epoch, sheddable ("1"),
/// Redis run id.
/// Returns {0} (no such channel, only-if-exists), {2} (a subscribed node is
/// overloaded) or {1, epoch, offset, subscribers}.
const PUBLISH: &str = r#"
local meta = redis.call('HGETALL', KEYS[1])
local epoch, boot, subscribers, members = nil, nil, 0, {}
for i = 1, #meta, 2 do
  local field = meta[i]
  if field == 'e' then
    epoch = meta[i + 1]
  elseif field == 'b' then
    boot = meta[i + 1]
  elseif string.sub(field, 1, 2) == 's:' then
    local count = tonumber(meta[i + 1])
    subscribers = subscribers + count
    if count > 0 then members[string.sub(field, 3)] = true end
  end
end
if ARGV[12] == '1' and subscribers > 0 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local busy = redis.call('HGETALL', KEYS[3])
  for i = 1, #busy, 2 do
    if members[busy[i]] and tonumber(busy[i + 1]) > now then return {2} end
  end
end
if not epoch and subscribers == 0 and ARGV[9] == '1' then return {0} end
if not epoch or boot ~= ARGV[13] then
  epoch = ARGV[11]
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', ARGV[13])
  redis.call('DEL', KEYS[2])
end
local offset = string.format('%.0f', redis.call('HINCRBY', KEYS[1], 'o', 1))
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], offset .. '-0', 'e', ARGV[3], 'd', ARGV[4], 'u', ARGV[5], 't', ARGV[10])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
redis.call(ARGV[2], ARGV[1], 'p\n' .. epoch .. '\n' .. offset .. '\n' .. ARGV[3] .. '\n' .. ARGV[5] .. '\n' .. ARGV[4])
return {1, epoch, tonumber(offset), subscribers}
"#;

/// A node's subscriber counts: in its own hash (for CHANNELS and reaping)
/// and in each channel's meta hash (for publish replies and shedding). A
/// followed channel's meta is kept alive this way, quiet or not (nodes
/// report their counts again well within the meta TTL).
/// KEYS: this node's subscriber counts. ARGV: member, meta key prefix, meta
/// ttl ms, then channel, count pairs (count 0: none left).
const SUBSCRIBER_COUNTS: &str = r#"
for i = 4, #ARGV, 2 do
  local channel, count = ARGV[i], tonumber(ARGV[i + 1])
  if count > 0 then
    redis.call('HSET', KEYS[1], channel, count)
    redis.call('HSET', ARGV[2] .. channel, 's:' .. ARGV[1], count)
    redis.call('PEXPIRE', ARGV[2] .. channel, ARGV[3])
  else
    redis.call('HDEL', KEYS[1], channel)
    redis.call('HDEL', ARGV[2] .. channel, 's:' .. ARGV[1])
  end
end
return 0
"#;

/// A channel's epoch and last offset (creating, or renewing as PUBLISH
/// does, the epoch, so subscribers and publishers agree on it), and the
/// history after `after` when the epoch is the known one: at most the last
/// `history size` offsets (approximate trimming keeps more).
/// KEYS: meta, history. ARGV: new epoch, meta ttl ms, after (-1: position
/// only), known epoch, history size, Redis run id. Returns {epoch, top, entries}.
const CATCH_UP: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'e', 'o', 'b')
local epoch, top = meta[1], tonumber(meta[2] or '0')
if not epoch or meta[3] ~= ARGV[6] then
  epoch = ARGV[1]
  top = 0
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', ARGV[6])
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local after = tonumber(ARGV[3])
local entries = {}
if after >= 0 and epoch == ARGV[4] and top > after then
  local first = math.max(after + 1, top - tonumber(ARGV[5]) + 1)
  entries = redis.call('XRANGE', KEYS[2], string.format('%.0f', first) .. '-0', '+', 'COUNT', ARGV[5])
end
return {epoch, top, entries}
"#;

/// One node's presence in a channel changes; joins and leaves over the
/// whole cluster are published as events when asked.
/// KEYS: presence users, presence list, anonymous count, connection count,
/// this node's presence, this node's presence channels. ARGV: user (""
/// anonymous), mode ("d" delta, "s" set), value, channel, join/leave ("1"),
/// publish command, topic. Returns 1 joined, -1 left, 0 neither.
const PRESENCE: &str = r#"
local old = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
local new = tonumber(ARGV[3])
if ARGV[2] == 'd' then new = old + new end
if new < 0 then new = 0 end
if new == old then return 0 end
if new == 0 then redis.call('HDEL', KEYS[5], ARGV[1]) else redis.call('HSET', KEYS[5], ARGV[1], new) end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('SADD', KEYS[6], ARGV[4])
else
  redis.call('SREM', KEYS[6], ARGV[4])
end
local change = new - old
if redis.call('INCRBY', KEYS[4], change) <= 0 then redis.call('DEL', KEYS[4]) end
if ARGV[1] == '' then
  if redis.call('INCRBY', KEYS[3], change) <= 0 then redis.call('DEL', KEYS[3]) end
  return 0
end
local total = redis.call('HINCRBY', KEYS[1], ARGV[1], change)
local event = nil
local result = 0
if total <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if total - change > 0 then event = 'leave' result = -1 end
elseif total == change then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  event = 'join'
  result = 1
end
if event and ARGV[5] == '1' then
  redis.call(ARGV[6], ARGV[7], 'e\n' .. event .. '\n{"user":"' .. ARGV[1] .. '"}')
end
return result
"#;

/// One page of a channel's members.
/// KEYS: presence users, presence list, anonymous count. ARGV: cursor (""
/// from the start), limit. Returns {users (limit + 1 at most), counts, anonymous}.
const PRESENCE_PAGE: &str = r#"
local min = '-'
if ARGV[1] ~= '' then min = '(' .. ARGV[1] end
local users = redis.call('ZRANGEBYLEX', KEYS[2], min, '+', 'LIMIT', 0, tonumber(ARGV[2]) + 1)
local counts = {}
if #users > 0 then counts = redis.call('HMGET', KEYS[1], unpack(users)) end
return {users, counts, tonumber(redis.call('GET', KEYS[3]) or '0')}
"#;

/// KEYS: presence users, anonymous count, connection count.
/// Returns {users, connections, anonymous}.
const PRESENCE_STATS: &str = r#"
return {redis.call('HLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"#;

/// KEYS: meta, history, presence users. ARGV: history size, Redis run id.
/// Returns {epoch or nil, offset, history length, presence users, subscribers}.
const CHANNEL_INFO: &str = r#"
local meta = redis.call('HGETALL', KEYS[1])
local epoch, offset, boot, subscribers = false, 0, nil, 0
for i = 1, #meta, 2 do
  if meta[i] == 'e' then epoch = meta[i + 1]
  elseif meta[i] == 'o' then offset = tonumber(meta[i + 1])
  elseif meta[i] == 'b' then boot = meta[i + 1]
  elseif string.sub(meta[i], 1, 2) == 's:' then subscribers = subscribers + tonumber(meta[i + 1]) end
end
if boot ~= ARGV[2] then epoch = false offset = 0 end
local history = 0
if epoch then history = math.min(redis.call('XLEN', KEYS[2]), tonumber(ARGV[1]), offset) end
return {epoch, offset, history, redis.call('HLEN', KEYS[3]), subscribers}
"#;

/// A page of history, without creating anything: at most `limit` entries
/// among the last `history size` offsets, after `after`. With another epoch
/// than the known one, the page starts at the oldest entry. An epoch from
/// before Redis last started counts as none (it will be renewed).
/// KEYS: meta, history. ARGV: after, limit, known epoch ("" any), history
/// size, Redis run id. Returns {epoch or nil, top, entries, epoch changed (1/0)}.
const HISTORY: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'e', 'o', 'b')
if not meta[1] or meta[3] ~= ARGV[5] then return {false, 0, {}, 0} end
local top = tonumber(meta[2] or '0')
local after = tonumber(ARGV[1])
local changed = 0
if ARGV[3] ~= '' and ARGV[3] ~= meta[1] then after = 0 changed = 1 end
local first = math.max(after + 1, top - tonumber(ARGV[4]) + 1)
local entries = {}
if top >= first then
  entries = redis.call('XRANGE', KEYS[2], string.format('%.0f', first) .. '-0', '+', 'COUNT', ARGV[2])
end
return {meta[1], top, entries, changed}
"#;

/// Channels with subscribers on live nodes, by name prefix, after a cursor.
/// KEYS: nodes. ARGV: subscriber-count key prefix, name prefix, cursor
/// ("" none), limit. Returns a flat list {name, subscribers, ...}
/// of at most limit + 1 channels in name order. Reads every live node's
/// counts (admin use; see docs/cluster.md).
const CHANNELS_BODY: &str = r#"
local counts = {}
local pattern = ARGV[2] .. '*'
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], redis_now(), '+inf')) do
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', ARGV[1] .. member, cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = page[1]
    local fields = page[2]
    for i = 1, #fields, 2 do
      local name = fields[i]
      if ARGV[3] == '' or name > ARGV[3] then
        counts[name] = (counts[name] or 0) + tonumber(fields[i + 1])
      end
    end
  until cursor == '0'
end
local names = {}
for name, _ in pairs(counts) do table.insert(names, name) end
table.sort(names)
local result = {}
for i = 1, math.min(#names, tonumber(ARGV[4]) + 1) do
  table.insert(result, names[i])
  table.insert(result, counts[names[i]])
end
return result
"#;

/// Every live node's last STATS. KEYS: nodes. ARGV: stats key prefix. Returns a flat list {member, stats JSON, ...}.
const NODE_STATS_BODY: &str = r#"
local result = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], redis_now(), '+inf')) do
  local stats = redis.call('GET', ARGV[1] .. member)
  if stats then
    table.insert(result, member)
    table.insert(result, stats)
  end
end
return result
"#;

/// Node liveness and load flags use Redis's clock (TIME), never a node's:
/// nodes whose clocks differ by more than `node_timeout_ms` must not take
/// each other for dead.
const REDIS_NOW: &str = r#"
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"#;

/// A node says it is behind with its fan-out until Redis's now plus a
/// timeout (it lapses by itself if the node dies), or that it no longer is.
/// KEYS: busy nodes. ARGV: member, timeout ms ("0": not behind).
const BUSY_BODY: &str = r#"
if ARGV[2] == '0' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], redis_now() + tonumber(ARGV[2]))
end
return 0
"#;

/// Shared by the inbox scripts: drops inbox entries stored at or before
/// `cutoff` (they are in time order), 16 at a time.
const EXPIRE_INBOX: &str = r#"
local function expire_inbox(key, cutoff)
  while true do
    local batch = redis.call('XRANGE', key, '-', '+', 'COUNT', 16)
    local last = nil
    for _, entry in ipairs(batch) do
      local fields, stored = entry[2], nil
      for i = 1, #fields, 2 do if fields[i] == 't' then stored = tonumber(fields[i + 1]) end end
      if stored and stored <= cutoff then last = entry[1] else break end
    end
    if not last then return end
    redis.call('XTRIM', key, 'MINID', string.sub(last, 1, -2) .. '1')
    if #batch < 16 then return end
  end
end
"#;

/// Registers a connection of a user on a node, unless its token was revoked.
/// KEYS: user, user nodes, inbox, node users, inbox users. ARGV: member,
/// token issued at (s), now ms, inbox ttl ms, user.
/// Returns {0} (revoked) or {1, came online (1/0), inbox entries}.
const USER_CONNECT_BODY: &str = r#"
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if tonumber(ARGV[2]) < rev then return {0} end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SADD', KEYS[4], ARGV[5])
local total = redis.call('HINCRBY', KEYS[1], 'c', 1)
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
expire_inbox(KEYS[3], tonumber(ARGV[3]) - tonumber(ARGV[4]))
local entries = redis.call('XRANGE', KEYS[3], '-', '+')
if #entries == 0 then redis.call('ZREM', KEYS[5], ARGV[5]) end
local online = 0
if total == 1 then online = 1 end
return {1, online, entries}
"#;

/// A node's connection count of a user changes.
/// KEYS: user, user nodes, node users. ARGV: member, mode ("d"/"s"), value,
/// now ms, last seen ttl ms, user.
/// Returns {1} came online, {-1, last seen ms} went offline, {0} neither.
const USER_COUNT: &str = r#"
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local new = tonumber(ARGV[3])
if ARGV[2] == 'd' then new = old + new end
if new < 0 then new = 0 end
if new == old then return {0} end
if new == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[6])
else
  redis.call('HSET', KEYS[2], ARGV[1], new)
  redis.call('SADD', KEYS[3], ARGV[6])
end
local change = new - old
local total = redis.call('HINCRBY', KEYS[1], 'c', change)
if total <= 0 then
  redis.call('HSET', KEYS[1], 'c', 0, 'seen', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  if total - change > 0 then return {-1, tonumber(ARGV[4])} end
  return {0}
end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
if total == change then return {1} end
return {0}
"#;

/// A message to a user: kept in the inbox unless it is full, and published
/// to every live node holding a connection of the user.
/// KEYS: user, user nodes, inbox, inbox users, nodes. ARGV: user, event,
/// data, now ms, inbox messages max, inbox ttl ms, inbox users max, first
/// sequence (from the clock), node topic prefix, publish command, last
/// seen ttl ms. Returns {connections, seq ("" not stored), full (1/0)}.
const USER_SEND_BODY: &str = r#"
local now = tonumber(ARGV[4])
expire_inbox(KEYS[3], now - tonumber(ARGV[6]))
local length = redis.call('XLEN', KEYS[3])
if length == 0 then redis.call('ZREM', KEYS[4], ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local full = tonumber(ARGV[5]) == 0 or length >= tonumber(ARGV[5])
if not full and length == 0 and redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7]) then full = true end
local seq = ''
if not full then
  local next = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
  if next < tonumber(ARGV[8]) then next = tonumber(ARGV[8]) end
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local after_last = tonumber(string.sub(last[1][1], 1, -3)) + 1
    if next < after_last then next = after_last end
  end
  seq = string.format('%.0f', next)
  redis.call('HSET', KEYS[1], 's', string.format('%.0f', next + 1))
  redis.call('XADD', KEYS[3], seq .. '-0', 'e', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[1])
end
local connections = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
if connections == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[11]) end
local payload = 'u\n' .. ARGV[1] .. '\n' .. seq .. '\n' .. ARGV[2] .. '\n' .. ARGV[3]
local nodes = redis.call('HGETALL', KEYS[2])
local alive_after = redis_now()
for i = 1, #nodes, 2 do
  if tonumber(nodes[i + 1]) > 0 and tonumber(redis.call('ZSCORE', KEYS[5], nodes[i]) or '0') >= alive_after then
    redis.call(ARGV[10], ARGV[9] .. nodes[i], payload)
  end
end
local stored_full = 0
if full then stored_full = 1 end
return {connections, seq, stored_full}
"#;

/// Acknowledges a user's inbox up to and including a sequence.
/// KEYS: inbox, inbox users. ARGV: seq, user.
const USER_ACK: &str = r#"
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1] .. '-1')
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 0
"#;

/// Closes a user's connections on every node, optionally refusing tokens
/// issued before a time from now on.
/// KEYS: user, user nodes, nodes. ARGV: user, revoke before (s, 0 none),
/// close code, reason, node topic prefix, publish command, last seen ttl ms. Returns the user's connections.
const DISCONNECT_BODY: &str = r#"
if tonumber(ARGV[2]) > 0 then
  local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
  if tonumber(ARGV[2]) > rev then redis.call('HSET', KEYS[1], 'rev', ARGV[2]) end
  if tonumber(redis.call('HGET', KEYS[1], 'c') or '0') == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
end
local now = redis_now()
local payload = 'x\n' .. ARGV[1] .. '\n' .. ARGV[3] .. '\n' .. ARGV[4]
local nodes = redis.call('HGETALL', KEYS[2])
for i = 1, #nodes, 2 do
  if tonumber(nodes[i + 1]) > 0 and tonumber(redis.call('ZSCORE', KEYS[3], nodes[i]) or '0') >= now then
    redis.call(ARGV[6], ARGV[5] .. nodes[i], payload)
  end
end
return tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
"#;

/// A node says it is alive (and, on the first Redis, leaves its stats).
/// KEYS: nodes, (unused), this node's stats.
/// ARGV: member, node timeout ms, stats ("" none), most dead to list.
/// Returns {newly registered (1/0), dead members}.
const HEARTBEAT_BODY: &str = r#"
local now = redis_now()
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3], 'PX', 2 * tonumber(ARGV[2])) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, ARGV[4])
return {added, dead}
"#;

/// Removes one batch of a dead node's presence and connections. The caller
/// holds the reap lock (SET NX) and runs this until it says done.
/// KEYS: nodes, dead node's presence channels, dead node's users, dead
/// node's subscriber counts, reap lock. ARGV: dead member, batch size, key
/// prefix ("P:"), now ms, last seen ttl ms, lock value.
/// Returns {0} (lock lost) or {1, done, left (channel, user pairs), offline users}.
const REAP_BODY: &str = r#"
if redis.call('GET', KEYS[5]) ~= ARGV[6] then return {0} end
-- Alive again (it heartbeated since it was listed as dead): not reaped.
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') >= redis_now() then
  redis.call('DEL', KEYS[5])
  return {0}
end
redis.call('ZREM', KEYS[1], ARGV[1])
local prefix, dead = ARGV[3], ARGV[1]
local left, offline = {}, {}
for _, channel in ipairs(redis.call('SPOP', KEYS[2], ARGV[2])) do
  local node_presence = prefix .. 'pn:' .. channel .. ':' .. dead
  local members = redis.call('HGETALL', node_presence)
  for i = 1, #members, 2 do
    local user, n = members[i], tonumber(members[i + 1])
    if redis.call('INCRBY', prefix .. 'pc:' .. channel, -n) <= 0 then redis.call('DEL', prefix .. 'pc:' .. channel) end
    if user == '' then
      if redis.call('INCRBY', prefix .. 'pa:' .. channel, -n) <= 0 then redis.call('DEL', prefix .. 'pa:' .. channel) end
    else
      local total = redis.call('HINCRBY', prefix .. 'pu:' .. channel, user, -n)
      if total <= 0 then
        redis.call('HDEL', prefix .. 'pu:' .. channel, user)
        redis.call('ZREM', prefix .. 'pl:' .. channel, user)
        table.insert(left, channel)
        table.insert(left, user)
      end
    end
  end
  redis.call('DEL', node_presence)
end
for _, user in ipairs(redis.call('SPOP', KEYS[3], ARGV[2])) do
  local user_nodes, user_key = prefix .. 'un:' .. user, prefix .. 'u:' .. user
  local n = tonumber(redis.call('HGET', user_nodes, dead) or '0')
  redis.call('HDEL', user_nodes, dead)
  if n > 0 then
    local total = redis.call('HINCRBY', user_key, 'c', -n)
    if total <= 0 then
      redis.call('HSET', user_key, 'c', 0, 'seen', ARGV[4])
      redis.call('PEXPIRE', user_key, ARGV[5])
      redis.call('PEXPIRE', user_nodes, ARGV[5])
      table.insert(offline, user)
    end
  end
end
local counts = redis.call('HSCAN', KEYS[4], 0, 'COUNT', ARGV[2])
for i = 1, #counts[2], 2 do
  redis.call('HDEL', prefix .. 'm:' .. counts[2][i], 's:' .. dead)
  redis.call('HDEL', KEYS[4], counts[2][i])
end
local done = 0
if redis.call('SCARD', KEYS[2]) == 0 and redis.call('SCARD', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 0 then
  done = 1
  redis.call('DEL', KEYS[5])
  redis.call('HDEL', prefix .. 'busy', dead)
end
return {1, done, left, offline}
"#;

/// Every script, loaded with SCRIPT LOAD on each new connection.
pub struct Scripts {
    pub publish: Script,
    pub catch_up: Script,
    pub presence: Script,
    pub presence_page: Script,
    pub presence_stats: Script,
    pub channel_info: Script,
    pub user_connect: Script,
    pub user_count: Script,
    pub user_send: Script,
    pub user_ack: Script,
    pub disconnect: Script,
    pub heartbeat: Script,
    pub reap: Script,
    pub history: Script,
    pub channels: Script,
    pub node_stats: Script,
    pub subscriber_counts: Script,
    pub busy: Script,
}

impl Scripts {
    pub fn all(&self) -> [&Script; 18] {
        [
            &self.publish,
            &self.catch_up,
            &self.presence,
            &self.presence_page,
            &self.presence_stats,
            &self.channel_info,
            &self.user_connect,
            &self.user_count,
            &self.user_send,
            &self.user_ack,
            &self.disconnect,
            &self.heartbeat,
            &self.reap,
            &self.history,
            &self.channels,
            &self.node_stats,
            &self.subscriber_counts,
            &self.busy,
        ]
    }
}

/// Sources that share the inbox helper, built once.
static USER_CONNECT: LazyLock<String> = LazyLock::new(|| format!("{EXPIRE_INBOX}{USER_CONNECT_BODY}"));
static USER_SEND: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{EXPIRE_INBOX}{USER_SEND_BODY}"));
static CHANNELS: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{CHANNELS_BODY}"));
static NODE_STATS: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{NODE_STATS_BODY}"));
static DISCONNECT: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{DISCONNECT_BODY}"));
static HEARTBEAT: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{HEARTBEAT_BODY}"));
static REAP: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{REAP_BODY}"));
static BUSY: LazyLock<String> = LazyLock::new(|| format!("{REDIS_NOW}{BUSY_BODY}"));

pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    publish: Script::new("publish", PUBLISH),
    catch_up: Script::new("catch_up", CATCH_UP),
    presence: Script::new("presence", PRESENCE),
    presence_page: Script::new("presence_page", PRESENCE_PAGE),
    presence_stats: Script::new("presence_stats", PRESENCE_STATS),
    channel_info: Script::new("channel_info", CHANNEL_INFO),
    user_connect: Script::new("user_connect", USER_CONNECT.as_str()),
    user_count: Script::new("user_count", USER_COUNT),
    user_send: Script::new("user_send", USER_SEND.as_str()),
    user_ack: Script::new("user_ack", USER_ACK),
    disconnect: Script::new("disconnect", DISCONNECT.as_str()),
    heartbeat: Script::new("heartbeat", HEARTBEAT.as_str()),
    reap: Script::new("reap", REAP.as_str()),
    history: Script::new("history", HISTORY),
    channels: Script::new("channels", CHANNELS.as_str()),
    node_stats: Script::new("node_stats", NODE_STATS.as_str()),
    subscriber_counts: Script::new("subscriber_counts", SUBSCRIBER_COUNTS),
    busy: Script::new("busy", BUSY.as_str()),
});
