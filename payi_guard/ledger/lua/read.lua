-- Read counters, dropping expired reservations on the way.
-- KEYS: per counter, the counter hash and its reservation index (2 keys per counter).
-- ARGV: now.
-- Returns {settled_1, pending_1, settled_2, pending_2, ...}.
local now = ARGV[1]
local out = {}

for i = 1, #KEYS / 2 do
  local key, index = KEYS[2 * i - 1], KEYS[2 * i]
  purge(key, index, now)
  local v = redis.call('HMGET', key, 's', 'p')
  out[2 * i - 1] = tonumber(v[1]) or 0
  out[2 * i] = tonumber(v[2]) or 0
end
return out
