-- An operator's adjustments: add an amount to "s" of each counter, or set it to zero (a
-- reset), all or nothing, and journal each one; open reservations ("p") are left alone.
-- KEYS: the counter hashes, then the journal (a list; same hash tag as the counters).
-- ARGV: now (kept as written in the entries), keep, journal time to live in
--       milliseconds, then per counter: amount ('' = reset), time to live in
--       milliseconds, note.
-- Returns {1, added_1, settled_1, pending_1, ...}, or {0, index (0-based), value} when
-- a counter would leave [-(2^53 - 1), 2^53 - 1] (nothing is changed then).
-- Entries are "now \t added \t settled \t pending \t key \t note", newest first.
local max_units = 9007199254740991
local now = ARGV[1]
local keep = tonumber(ARGV[2])
local journal_ttl = tonumber(ARGV[3])
local n = #KEYS - 1
local journal = KEYS[n + 1]
local plan = {}

for i = 1, n do
  local amount = ARGV[3 + 3 * i - 2]
  local settled = tonumber(redis.call('HGET', KEYS[i], 's')) or 0
  local new, added
  if amount == '' then
    new, added = 0, -settled
  else
    added = tonumber(amount)
    new = settled + added
  end
  if new > max_units or new < -max_units then
    return {0, i - 1, string.format('%d', new)}
  end
  plan[i] = {new, added}
end

local out = {1}
for i = 1, n do
  local key = KEYS[i]
  local ttl = ARGV[3 + 3 * i - 1]
  local note = ARGV[3 + 3 * i]
  local new, added = plan[i][1], plan[i][2]
  if new ~= 0 or redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 's', string.format('%d', new))
    if added ~= 0 then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  local pending = tonumber(redis.call('HGET', key, 'p')) or 0
  redis.call('LPUSH', journal, now .. '\t' .. string.format('%d', added) .. '\t'
    .. string.format('%d', new) .. '\t' .. string.format('%d', pending) .. '\t' .. key
    .. '\t' .. note)
  out[3 * i - 1] = added
  out[3 * i] = new
  out[3 * i + 1] = pending
end
redis.call('LTRIM', journal, 0, keep - 1)
if redis.call('PTTL', journal) < journal_ttl then
  redis.call('PEXPIRE', journal, journal_ttl)
end
return out
