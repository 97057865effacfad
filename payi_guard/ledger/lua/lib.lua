-- Shared prelude of the ledger scripts (prepended to each of them).
--
-- Counter K is a hash: field "s" = settled, "p" = pending (sum of open reservations),
-- "f" = what the last reserve this counter refused needed (absent once one fits),
-- "r:<id>" = amount of open reservation <id>. The sorted set K .. ":x" maps each open
-- reservation's field name ("r:<id>") to its deadline, so expired ones are found in
-- O(log n). The sorted set K .. ":d" maps each closed (committed or released) id to
-- the time until which it is remembered. Every script receives the three keys of each
-- counter, in this order, in KEYS.
--
-- Deadlines are on the store's clock (TIME), never the caller's: hosts whose clocks
-- disagree still agree on when a reservation ends.
--
-- Arithmetic results are written back with string.format('%d', ...): Lua 5.1 turns a
-- number above 1e14 into "1e+15" with tostring, which HINCRBY refuses. Times are
-- written with '%.6f' (tostring keeps only 14 significant digits).

if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim unless told otherwise; TIME needs effects.
  redis.replicate_commands()
end

local function fmt(n)
  return string.format('%d', n)
end

local function fmt_time(t)
  return string.format('%.6f', t)
end

-- The store's clock, in epoch seconds.
local function store_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The keys of counter i (1-based) in KEYS: the hash, its reservations, its closed ids.
local function counter_keys(i)
  return KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
end

-- Drop the reservations of `key` whose deadline is <= now and take them off "p".
local function purge(key, index, now)
  local expired = redis.call('ZRANGEBYSCORE', index, '-inf', fmt_time(now))
  if #expired == 0 then
    return
  end
  local freed = 0
  for _, field in ipairs(expired) do
    local held = redis.call('HGET', key, field)
    if held then
      freed = freed + tonumber(held)
      redis.call('HDEL', key, field)
    end
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', fmt_time(now))
  if freed ~= 0 then
    redis.call('HINCRBY', key, 'p', fmt(-freed))
  end
end

-- Forget up to 64 closed ids whose time is over (enough to keep up: each close adds one;
-- run where ids are added, by commit.lua).
local function trim_closed(closed, now)
  local over = redis.call('ZCOUNT', closed, '-inf', fmt_time(now))
  if over > 0 then
    redis.call('ZREMRANGEBYRANK', closed, 0, math.min(over, 64) - 1)
  end
end

local function is_closed(closed, id, now)
  local until_ = redis.call('ZSCORE', closed, id)
  return until_ ~= false and tonumber(until_) > now
end

-- Remember that `id` is closed on this counter for `keep` seconds (0: remember nothing,
-- as the rollback of a reserve does). The set's expiry is only ever pushed later: the
-- other ids in it are remembered as long as they were promised.
local function close_id(closed, id, now, keep)
  if keep <= 0 then
    return
  end
  redis.call('ZADD', closed, fmt_time(now + keep), id)
  local ms = math.ceil(keep * 1000)
  if redis.call('PTTL', closed) < ms then
    redis.call('PEXPIRE', closed, ms)
  end
end

-- settled, pending, refused of a counter.
local function totals(key)
  local v = redis.call('HMGET', key, 's', 'p', 'f')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
end

-- Put the state of counter i (1-based) into a reply, from index `base` + 1 on.
local function put_totals(out, base, i, settled, pending, refused)
  out[base + 3 * i - 2] = settled
  out[base + 3 * i - 1] = pending
  out[base + 3 * i] = refused
end

-- Add tallies (usage analytics hashes): KEYS[first + 1], KEYS[first + 2], ... and, from
-- ARGV[at] on, per tally: its time to live in milliseconds, the number of fields, then
-- (field, increment) pairs. A tally's expiry is only ever pushed later.
local function add_tallies(first, at)
  local j = 1
  while at <= #ARGV do
    local key = KEYS[first + j]
    local ttl = tonumber(ARGV[at])
    local count = tonumber(ARGV[at + 1])
    for k = 1, count do
      redis.call('HINCRBY', key, ARGV[at + 2 * k], ARGV[at + 2 * k + 1])
    end
    local current = redis.call('PTTL', key)
    if current < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
    at = at + 2 + 2 * count
    j = j + 1
  end
end
