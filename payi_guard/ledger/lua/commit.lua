-- Close a reservation (if still open) and add the actual amounts to "s"; also release.
-- KEYS: per charge, the counter hash and its reservation index (2 keys per charge).
-- ARGV: reservation id, now, then per charge: amount, time to live in milliseconds
--       ('' = leave the expiry alone, as release does).
-- Returns {settled_1, pending_1, settled_2, pending_2, ...}.
local id = ARGV[1]
local now = ARGV[2]
local field = 'r:' .. id
local out = {}

for i = 1, #KEYS / 2 do
  local key, index = KEYS[2 * i - 1], KEYS[2 * i]
  local amount = ARGV[2 * i + 1]
  local ttl = ARGV[2 * i + 2]
  purge(key, index, now)
  local held = redis.call('HGET', key, field)
  if held then
    redis.call('HDEL', key, field)
    redis.call('ZREM', index, id)
    if held ~= '0' then
      redis.call('HINCRBY', key, 'p', fmt(-tonumber(held)))
    end
  end
  local settled
  if amount ~= '0' then
    settled = redis.call('HINCRBY', key, 's', amount)
  else
    settled = tonumber(redis.call('HGET', key, 's')) or 0
  end
  out[2 * i - 1] = settled
  out[2 * i] = tonumber(redis.call('HGET', key, 'p')) or 0
  if ttl ~= '' then
    -- PEXPIRE on a missing key is a no-op, so a zero commit creates nothing.
    redis.call('PEXPIRE', key, ttl)
    redis.call('PEXPIRE', index, ttl)
  end
end
return out
