-- Close a reservation (if still open), add the actual amounts to "s", and remember the
-- id as closed on every key; also release (amounts of 0). An id already closed on a
-- key changes nothing there: a retried commit or release is applied once.
-- Tallies are added only when the id was closed here on at least one key (not a retry).
-- KEYS: per charge, the three keys of its counter (see lib.lua); then the tallies' keys.
-- ARGV: reservation id, seconds to remember the id, the number of charges, then per
--       charge: amount, time to live of the counter in milliseconds, set only if this
--       commit makes the counter ('' = never, as release does); then the tallies (see
--       add_tallies in lib.lua).
-- Returns {settled_1, pending_1, refused_1, settled_2, ...}.
local id = ARGV[1]
local keep = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local applied = false
local now = store_now()
local field = 'r:' .. id
local out = {}

for i = 1, n do
  local key, index, closed = counter_keys(i)
  local amount = ARGV[2 * i + 2]
  local ttl = ARGV[2 * i + 3]
  purge(key, index, now)
  trim_closed(closed, now)
  if is_closed(closed, id, now) then
    put_totals(out, 0, i, totals(key))
  else
    -- The totals are read with the reservation, and what changes them is HINCRBY,
    -- whose replies are the new values: no second read.
    local v = redis.call('HMGET', key, field, 's', 'p', 'f')
    local held = v[1]
    local settled = tonumber(v[2]) or 0
    local pending = tonumber(v[3]) or 0
    local refused = tonumber(v[4]) or 0
    if held then
      redis.call('HDEL', key, field)
      redis.call('ZREM', index, field)
      if held ~= '0' then
        pending = redis.call('HINCRBY', key, 'p', fmt(-tonumber(held)))
      end
    end
    if amount ~= '0' then
      settled = redis.call('HINCRBY', key, 's', amount)
    end
    close_id(closed, id, now, keep)
    applied = true
    if ttl ~= '' and not (held or v[2] or v[3] or v[4]) then
      -- A counter that existed has its expiry (every script that creates one sets it),
      -- and a commit never creates the index. PEXPIRE on a missing key is a no-op, so
      -- a zero commit creates no counter.
      redis.call('PEXPIRE', key, ttl)
    end
    -- Even when that deleted a counter past its expiry: what the commit made of it, as
    -- the other ledgers report.
    put_totals(out, 0, i, settled, pending, refused)
  end
end
if applied then
  add_tallies(3 * n, 2 * n + 4)
end
return out
