-- Push the deadline of open reservations to ttl seconds from the store's now (never
-- earlier than it was).
-- KEYS: for each reservation in turn, the three keys of each of its counters.
-- ARGV: ttl in seconds, then per reservation: its id, the number of its counters.
-- Returns {open_1, open_2, ...}: 1 where the reservation was still open on every key.
local now = store_now()
local deadline = now + tonumber(ARGV[1])
local out = {}
local k = 0

for r = 1, (#ARGV - 1) / 2 do
  local field = 'r:' .. ARGV[2 * r]
  local alive = 1
  for _ = 1, tonumber(ARGV[2 * r + 1]) do
    k = k + 1
    local key, index = counter_keys(k)
    purge(key, index, now)
    local current = redis.call('ZSCORE', index, field)
    if current and redis.call('HEXISTS', key, field) == 1 then
      if tonumber(current) < deadline then
        redis.call('ZADD', index, fmt_time(deadline), field)
      end
    else
      alive = 0
    end
  end
  out[r] = alive
end
return out
