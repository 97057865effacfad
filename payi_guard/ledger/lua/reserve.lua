-- Reserve every charge or none.
-- KEYS: per charge, the three keys of its counter (see lib.lua); then the tallies' keys.
-- ARGV: reservation id, ttl in seconds, the number of charges, then per charge: amount,
--       max ('' = no max), time to live of the counter in milliseconds; then the tallies
--       (see add_tallies in lib.lua), added only when the reserve refuses.
-- Returns {status, refused index (0-based, -1 if none), settled_1, pending_1, refused_1,
-- ...}; status 1 = reserved, 0 = refused, -1 = the id is already closed on one of the
-- keys (nothing reserved). A refusal changes no total: the counter that refused records
-- what the charge needed (field "f"), and a reserve that fits clears it.
local id = ARGV[1]
local now = store_now()
local deadline = fmt_time(now + tonumber(ARGV[2]))
local field = 'r:' .. id
local n = tonumber(ARGV[3])
local out = {1, -1}
local held = {}
local noted = {}  -- whether counter i has an "f" to clear
-- The script that makes a key sets its expiry (every charge of a counter's window has
-- the same one): the hash when it does not exist yet, the index when no reservation is
-- open ("p" is their sum, so an index exists only where it is above 0, or where every
-- open amount is 0, and then setting it again is harmless).
local fresh = {}  -- whether counter i's hash does not exist yet
local idle = {}  -- whether counter i has no open reservation to keep its index
local closed_here = false

for i = 1, n do
  local key, index, closed = counter_keys(i)
  purge(key, index, now)
  -- Closed ids are trimmed by commit.lua, the only script that adds them; is_closed
  -- ignores those whose time is over.
  if is_closed(closed, id, now) then
    closed_here = true
  end
  local v = redis.call('HMGET', key, 's', 'p', 'f', field)
  local settled = tonumber(v[1]) or 0
  local pending = tonumber(v[2]) or 0
  -- Reserving an id that is already open replaces it: a retried reserve counts once.
  held[i] = tonumber(v[4]) or 0
  noted[i] = v[3] ~= false
  fresh[i] = not (v[1] or v[2] or v[3] or v[4])
  idle[i] = pending <= 0
  local base = 3 + 3 * (i - 1)
  local limit = ARGV[base + 2]
  if out[1] == 1 and limit ~= ''
      and settled + pending - held[i] + tonumber(ARGV[base + 1]) > tonumber(limit) then
    out[1] = 0
    out[2] = i - 1
  end
  put_totals(out, 2, i, settled, pending, tonumber(v[3]) or 0)
end

if closed_here then
  out[1] = -1
  out[2] = -1
  return out
end

if out[1] == 0 then
  local i = out[2] + 1
  local key = counter_keys(i)
  local base = 3 + 3 * (i - 1)
  redis.call('HSET', key, 'f', ARGV[base + 1])
  if fresh[i] then
    redis.call('PEXPIRE', key, ARGV[base + 3])
  end
  out[2 + 3 * i] = tonumber(ARGV[base + 1])
  add_tallies(3 * n, 3 * n + 4)
  return out
end

for i = 1, n do
  local key, index = counter_keys(i)
  local base = 3 + 3 * (i - 1)
  local amount = ARGV[base + 1]
  local ttl = ARGV[base + 3]
  redis.call('HSET', key, field, amount)
  if noted[i] then
    redis.call('HDEL', key, 'f')
  end
  out[2 + 3 * i - 1] = redis.call('HINCRBY', key, 'p', fmt(tonumber(amount) - held[i]))
  out[2 + 3 * i] = 0
  redis.call('ZADD', index, deadline, field)
  if fresh[i] then
    redis.call('PEXPIRE', key, ttl)
  end
  if idle[i] then
    redis.call('PEXPIRE', index, ttl)
  end
end
return out
