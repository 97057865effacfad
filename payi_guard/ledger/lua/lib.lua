-- Shared prelude of the ledger scripts (prepended to reserve.lua, commit.lua, read.lua).
--
-- Counter K is a hash: field "s" = settled, "p" = pending (sum of open reservations),
-- "r:<id>" = amount of open reservation <id>. The sorted set K .. ":x" maps each open
-- reservation id to its deadline (epoch seconds) so expired ones are found in O(log n).
--
-- Arithmetic results are written back with string.format('%d', ...): Lua 5.1 turns a
-- number above 1e14 into "1e+15" with tostring, which HINCRBY refuses.

local function fmt(n)
  return string.format('%d', n)
end

-- Drop the reservations of `key` whose deadline is <= now and take them off "p".
local function purge(key, index, now)
  local expired = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  if #expired == 0 then
    return
  end
  local freed = 0
  for _, id in ipairs(expired) do
    local field = 'r:' .. id
    local held = redis.call('HGET', key, field)
    if held then
      freed = freed + tonumber(held)
      redis.call('HDEL', key, field)
    end
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  if freed ~= 0 then
    redis.call('HINCRBY', key, 'p', fmt(-freed))
  end
end
