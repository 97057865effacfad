-- Reserve every charge or none.
-- KEYS: per charge, the counter hash and its reservation index (2 keys per charge).
-- ARGV: reservation id, now, deadline, then per charge: amount, max ('' = no max),
--       time to live in milliseconds.
-- Returns {ok (1|0), refused index (0-based, -1 if none), settled_1, pending_1, ...}.
local id = ARGV[1]
local now = ARGV[2]
local deadline = ARGV[3]
local field = 'r:' .. id
local n = #KEYS / 2
local out = {1, -1}
local held = {}

for i = 1, n do
  local key, index = KEYS[2 * i - 1], KEYS[2 * i]
  purge(key, index, now)
  local v = redis.call('HMGET', key, 's', 'p', field)
  local settled = tonumber(v[1]) or 0
  local pending = tonumber(v[2]) or 0
  -- Reserving an id that is already open replaces it: a retried reserve counts once.
  held[i] = tonumber(v[3]) or 0
  local base = 3 + 3 * (i - 1)
  local limit = ARGV[base + 2]
  if out[1] == 1 and limit ~= ''
      and settled + pending - held[i] + tonumber(ARGV[base + 1]) > tonumber(limit) then
    out[1] = 0
    out[2] = i - 1
  end
  out[2 * i + 1] = settled
  out[2 * i + 2] = pending
end

if out[1] == 0 then
  return out
end

for i = 1, n do
  local key, index = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 3 + 3 * (i - 1)
  local amount = ARGV[base + 1]
  local ttl = ARGV[base + 3]
  redis.call('HSET', key, field, amount)
  out[2 * i + 2] = redis.call('HINCRBY', key, 'p', fmt(tonumber(amount) - held[i]))
  redis.call('ZADD', index, deadline, id)
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', index, ttl)
end
return out
