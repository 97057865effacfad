-- Read counters, dropping expired reservations on the way.
-- KEYS: per counter, its three keys (see lib.lua).
-- ARGV: none.
-- Returns {settled_1, pending_1, refused_1, settled_2, ...}.
local now = store_now()
local out = {}

for i = 1, #KEYS / 3 do
  local key, index = counter_keys(i)
  purge(key, index, now)
  put_totals(out, 0, i, totals(key))
end
return out
