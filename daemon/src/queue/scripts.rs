//! The queue's Lua scripts. Each touches only `{jobs}` keys (declared in
//! KEYS), so each runs atomically on one Redis Cluster slot.

use redis::Script;

/// Strict-priority batch fetch: `XREADGROUP` the lanes in order, each with
/// the COUNT left over by the lanes above, in one round trip. Re-creates
/// the group (MKSTREAM, from id 0 so nothing already queued is skipped)
/// when Redis lost it.
///
/// KEYS: lane streams, highest priority first.
/// ARGV: group, consumer, count.
/// Returns `[[lane_index(1-based), entry_id, [field, value, …]], …]`.
const FETCH: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local remaining = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  if remaining <= 0 then break end
  local res = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
  if type(res) == 'table' and res.err then
    if string.find(res.err, 'NOGROUP', 1, true) then
      redis.pcall('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
      res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
    else
      return redis.error_reply(res.err)
    end
  end
  if res then
    for _, e in ipairs(res[1][2]) do
      out[#out + 1] = {i, e[1], e[2]}
      remaining = remaining - 1
    end
  end
end
return out
"#;

/// Reclaims entries idle for longer than the visibility timeout
/// (`XAUTOCLAIM`) and reads each one's delivery counter (`XPENDING`), which
/// counts crashed deliveries too.
///
/// KEYS: lane streams, highest priority first.
/// ARGV: group, consumer, min_idle_ms, count, cursor per lane.
/// Returns `[[cursor per lane], [[lane_index, entry_id, [field, value, …], deliveries], …]]`.
const RECLAIM: &str = r#"
local group, consumer, idle = ARGV[1], ARGV[2], ARGV[3]
local remaining = tonumber(ARGV[4])
local out, cursors = {}, {}
for i, key in ipairs(KEYS) do
  local cursor = ARGV[4 + i] or '0-0'
  if remaining > 0 then
    local res = redis.pcall('XAUTOCLAIM', key, group, consumer, idle, cursor, 'COUNT', remaining)
    if type(res) == 'table' and res.err then
      cursor = '0-0'
    else
      cursor = res[1]
      for _, e in ipairs(res[2]) do
        if e and e[2] then
          local p = redis.call('XPENDING', key, group, e[1], e[1], 1)
          local n = 1
          if p[1] then n = p[1][4] end
          out[#out + 1] = {i, e[1], e[2], n}
          remaining = remaining - 1
        end
      end
    end
  end
  cursors[i] = cursor
end
return {cursors, out}
"#;

/// Moves due delayed retries back to their lane: ZRANGEBYSCORE + XADD + ZREM,
/// atomically. A member is `lane \n attempts \n enqueued_ms \n nonce \n
/// history_json \n job` (the job last: it may contain newlines).
///
/// KEYS[1]: the delayed ZSET; KEYS[2..]: lane streams.
/// ARGV[1]: now (ms); ARGV[2]: max entries to move; ARGV[3]: 1-based index of
/// the lane used when a member names an unknown lane; ARGV[4..]: lane names
/// aligned with KEYS[2..].
/// Returns `[moved, next_due_score_or_nil]`.
const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local lanes = {}
for i = 4, #ARGV do lanes[ARGV[i]] = KEYS[i - 2] end
local fallback = KEYS[1 + tonumber(ARGV[3])]
for _, m in ipairs(due) do
  local f = {}
  local pos = 1
  for k = 1, 5 do
    local nl = string.find(m, '\n', pos, true)
    if not nl then break end
    f[k] = string.sub(m, pos, nl - 1)
    pos = nl + 1
  end
  if #f == 5 then
    local key = lanes[f[1]] or fallback
    redis.call('XADD', key, '*', 'job', string.sub(m, pos), 'attempts', f[2], 'enqueued_ms', f[3], 'history', f[5])
  else
    redis.call('XADD', fallback, '*', 'job', m)
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"#;

/// Extends the lease of entries this consumer still owns: `XCLAIM … JUSTID`
/// with min-idle 0 resets their idle time without bumping the delivery
/// counter. Entries another consumer has taken over are left alone.
///
/// KEYS[1]: a lane stream. ARGV: group, consumer, entry ids….
/// Returns how many leases were extended.
const LEASE: &str = r#"
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"#;

/// The loaded scripts (their SHA1s are computed once).
pub(crate) struct Scripts {
    pub fetch: Script,
    pub reclaim: Script,
    pub move_due: Script,
    pub lease: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            fetch: Script::new(FETCH),
            reclaim: Script::new(RECLAIM),
            move_due: Script::new(MOVE_DUE),
            lease: Script::new(LEASE),
        }
    }
}
