-- Helpers shared by the scripts that include them (op, user, sequence, posinfo):
-- separators, number formatting, exact uint64 sequences as decimal strings, the epoch
-- check, the member row codec, tombstone pruning.
local SEP = '\31'
local USEP = '\30'
local RS = '\29'  -- between the records of a batch (its replies; its published changes)
local UMAX = '18446744073709551615'  -- 2^64 - 1, the largest sequence
local function fmt(x) return string.format('%.0f', x) end
-- uint64 sequences as canonical decimal strings (no sign, no leading zeros)
local function ucanon(s)
  s = string.gsub(s, '^0+', '')
  if s == '' then return '0' end
  return s
end
local function ucmp(a, b)  -- -1, 0 or 1
  if #a ~= #b then return (#a < #b) and -1 or 1 end
  if a == b then return 0 end
  return (a < b) and -1 or 1
end
local function uadd(a, n)  -- a + n for 0 <= n < 10^9, exact at any length of a
  if #a <= 15 then return fmt(tonumber(a) + n) end
  local lo = tonumber(string.sub(a, -9)) + n
  local hi = string.sub(a, 1, -10)
  if lo >= 1000000000 then
    lo = lo - 1000000000
    hi = uadd(hi, 1)
  end
  return hi .. string.format('%09d', lo)
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function check_epoch(key, epoch)
  local e = redis.call('GET', key)
  if not e then return {'ERR', 'NOEPOCH', 'the store has no epoch (data lost?)'} end
  if e ~= epoch then return {'ERR', 'EPOCH', e} end
  return nil
end
local function mdecode(v)
  if not v then return nil end
  local r, p, f, a, b, c = string.match(v, '^([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*)$')
  return {read = r, pos = tonumber(p), frozen = (f == '1'),
          fmax = a, fmin = b, ftime = tonumber(c)}
end
local function mencode(m)  -- read, fmax, fmin: sequence strings
  return string.format('%s,%.0f,%d,%s,%s,%.0f', m.read, m.pos, m.frozen and 1 or 0,
                       m.fmax, m.fmin, m.ftime)
end
local function prune_tombs(tk, hk, max_tombs)
  local n = redis.call('ZCARD', tk)
  if n <= max_tombs then return end
  local keep = math.floor(max_tombs * 0.9)
  local drop = n - keep
  local last = redis.call('ZRANGE', tk, drop - 1, drop - 1, 'WITHSCORES')
  local h = tonumber(redis.call('GET', hk) or '0')
  if tonumber(last[2]) > h then redis.call('SET', hk, last[2]) end
  redis.call('ZREMRANGEBYRANK', tk, 0, drop - 1)
end
-- A batch's replies and its changes travel as one string each: records joined by RS, a
-- record's fields by SEP. A committed op's record is its change payload (kind: one letter);
-- any other reply is its fields ('NOOP', 'NEED', 'RETRY', 'ERR' first). An EPOCH error drops
-- the epoch value (random bytes, which may hold a separator).
local function reply_record(r)
  if r[1] == 'OK' then return r[2] end
  if r[1] == 'ERR' and r[2] == 'EPOCH' then return 'ERR' .. SEP .. 'EPOCH' end
  return table.concat(r, SEP)
end
