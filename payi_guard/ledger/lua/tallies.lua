-- Read tallies: KEYS are their keys; returns one {field, value, field, value, ...} per key.
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
