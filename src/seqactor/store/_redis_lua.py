"""Lua scripts of the Redis store (run with EVALSHA; each touches one hash slot in a cluster).

``OP`` is every write on a conversation. Its keys: ``KEYS[1]`` the epoch key of the slot,
``KEYS[2]`` the position counter (standalone) or ``KEYS[1]`` again (cluster), ``KEYS[3]`` the
conversation hash, ``KEYS[4]`` the members hash and, standalone only, for membership ops three
keys per user (view index, tombstones, tombstone horizon). Its arguments: op, expected epoch,
mode, position, position time (µs), deadline (µs), channel, then the op's own.

Modes:

* ``s`` standalone: one script does everything — position (INCR), state, user index,
  tombstones, PUBLISH — atomically.
* ``d`` dry run (cluster): answers ``NOOP`` (with the current values) or ``NEED`` (the op
  changes something: get a position), writes nothing.
* ``c`` cluster: applies the op with the position the sequencer handed out; refuses a
  position older than the conversation's last (``STALE``) or one handed out longer than the
  deadline ago (``EXPIRED``), so positions of one conversation commit in order and a position
  the readers gave up on (see ``redis.py``) never commits later.

Replies: ``{'OK', payload}`` (the payload is also PUBLISHed), ``{'NOOP', position, ...}``,
``{'NEED', users...}``, ``{'RETRY', why}``, ``{'ERR', kind, message}``.

Sequences are uint64 over the whole SPEC range: Lua numbers are doubles (exact only up to
2^53 - 1), so the scripts keep sequences as canonical decimal strings and compare and add them
exactly (``ucmp``, ``uadd``). Positions and times stay numbers (they grow by one per change
and are µs/ms clocks: far below 2^53).
"""

from __future__ import annotations

_COMMON = r"""
local SEP = '\31'
local USEP = '\30'
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
"""

OP = _COMMON + r"""
local function run_op(K, V)

local op, epoch, mode = V[1], V[2], V[3]
local cpos, ptime, deadline, channel = tonumber(V[4]), tonumber(V[5]), tonumber(V[6]), V[7]
local A = 8
local bad = check_epoch(K[1], epoch)
if bad then return bad end
local ck, mk = K[3], K[4]

local function getconv()
  local v = redis.call('HMGET', ck, 'mx', 'mn', 'tm', 'ps', 'ac', 'lp')
  if not v[4] then return nil end
  return {mx = v[1], mn = v[2], tm = tonumber(v[3]), ps = tonumber(v[4]),
          ac = tonumber(v[5]), lp = tonumber(v[6] or '0')}
end
local function take_pos(c)
  if mode == 's' then return redis.call('INCR', K[2]) end
  if c and c.lp >= cpos then return nil, 'STALE' end
  if now_us() - ptime > deadline then return nil, 'EXPIRED' end
  return cpos
end
local function publish(parts)
  local payload = table.concat(parts, SEP)
  redis.call('PUBLISH', channel, payload)
  return {'OK', payload}
end
local function ukey(i, j) return K[4 + 3 * (i - 1) + j] end
-- the position a no-op answer is consistent with (standalone: the counter; cluster: the
-- conversation's last position, combined by the caller with what it had delivered)
local function noop(c, ...)
  local p = 0
  if mode == 's' then p = tonumber(redis.call('GET', K[2]) or '0')
  elseif c then p = c.lp end
  return {'NOOP', fmt(p), ...}
end

if op == 'alloc' then
  local cid, count, sender, clock = V[A], tonumber(V[A + 1]), V[A + 2], V[A + 3]
  local c = getconv()
  local mx = c and c.mx or '0'
  local last = uadd(mx, count)
  if ucmp(last, UMAX) > 0 then
    return {'ERR', 'TOOLARGE', "the conversation's sequence space is exhausted"}
  end
  if mode == 'd' then return {'NEED'} end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  local tm
  if clock and clock ~= '' then
    tm = tonumber(clock)  -- the node's injected clock (tests); else Redis' own
  else
    local t = redis.call('TIME')
    tm = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  -- max_sequence_time_ms never decreases, also when a clock steps back
  if c and c.tm > tm then tm = c.tm end
  if c then
    redis.call('HSET', ck, 'mx', last, 'tm', fmt(tm), 'ps', fmt(pos), 'lp', fmt(pos))
  else
    redis.call('HSET', ck, 'mx', last, 'mn', '0', 'tm', fmt(tm), 'ps', fmt(pos),
               'ac', '0', 'lp', fmt(pos))
  end
  local s, sread = '', '0'
  if sender ~= '' then
    local m = mdecode(redis.call('HGET', mk, sender))
    if m and not m.frozen then
      m.read = last
      m.pos = pos
      redis.call('HSET', mk, sender, mencode(m))
      s, sread = sender, last
    end
  end
  return publish({'A', fmt(pos), cid, uadd(mx, 1), last, fmt(tm), s, sread})
end

if op == 'read' then
  local cid, uid, req = V[A], V[A + 1], ucanon(V[A + 2])
  local c = getconv()
  if not c then return {'ERR', 'NOTFOUND', 'conversation not found'} end
  local m = mdecode(redis.call('HGET', mk, uid))
  if not m then return {'ERR', 'NOTMEMBER', 'the conversation is not in the view'} end
  local cap = c.mx
  if m.frozen then cap = m.fmax end
  local eff = cap
  if ucmp(req, cap) < 0 then eff = req end
  if ucmp(eff, m.read) <= 0 then return noop(c, m.read) end
  if mode == 'd' then return {'NEED'} end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  m.read = eff
  m.pos = pos
  redis.call('HSET', mk, uid, mencode(m))
  redis.call('HSET', ck, 'lp', fmt(pos))
  return publish({'R', fmt(pos), cid, uid, eff})
end

if op == 'min' then
  local cid, req = V[A], ucanon(V[A + 1])
  local c = getconv()
  if not c then return {'ERR', 'NOTFOUND', 'conversation not found'} end
  local eff = c.mx
  if ucmp(req, c.mx) < 0 then eff = req end
  if ucmp(eff, c.mn) <= 0 then return noop(c, c.mn) end
  if mode == 'd' then return {'NEED'} end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  redis.call('HSET', ck, 'mn', eff, 'ps', fmt(pos), 'lp', fmt(pos))
  return publish({'M', fmt(pos), cid, eff})
end

if op == 'add' then
  local cid, max_view, max_members = V[A], tonumber(V[A + 1]), tonumber(V[A + 2])
  local c = getconv()
  local joiners = {}
  for i = A + 3, #V do
    local uid = V[i]
    local m = mdecode(redis.call('HGET', mk, uid))
    if not m or m.frozen then joiners[#joiners + 1] = {uid, m, i - A - 2} end
  end
  local active = 0
  if c then active = c.ac end
  if active + #joiners > max_members then
    return {'ERR', 'TOOLARGE', string.format(
      'the conversation would have %d members; the limit is %d', active + #joiners, max_members)}
  end
  if mode == 's' then
    for _, j in ipairs(joiners) do
      if not j[2] and redis.call('HLEN', ukey(j[3], 1)) + 1 > max_view then
        return {'ERR', 'TOOLARGE', string.format(
          'the view of %s would exceed %d conversations', j[1], max_view)}
      end
    end
  end
  if c and #joiners == 0 then return noop(c, c.mx, c.mn, fmt(c.tm)) end
  if mode == 'd' then
    local out = {'NEED'}
    for _, j in ipairs(joiners) do
      if not j[2] then out[#out + 1] = j[1] end
    end
    return out
  end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  if not c then
    c = {mx = '0', mn = '0', tm = 0, ps = pos, ac = 0}
    redis.call('HSET', ck, 'mx', '0', 'mn', '0', 'tm', '0', 'ps', fmt(pos))
  end
  redis.call('HSET', ck, 'ac', fmt(active + #joiners), 'lp', fmt(pos))
  local users = {}
  for _, j in ipairs(joiners) do
    users[#users + 1] = j[1]
    redis.call('HSET', mk, j[1], mencode({read = c.mx, pos = pos, frozen = false,
                                           fmax = '0', fmin = '0', ftime = 0}))
    if mode == 's' then redis.call('HSET', ukey(j[3], 1), cid, fmt(pos)) end
  end
  return publish({'J', fmt(pos), cid, c.mx, c.mn, fmt(c.tm), table.concat(users, USEP)})
end

if op == 'rm' then
  local cid, keep, max_tombs = V[A], V[A + 1] == '1', tonumber(V[A + 2])
  local c = getconv()
  if not c then return {'ERR', 'NOTFOUND', 'conversation not found'} end
  local leavers = {}
  for i = A + 3, #V do
    local uid = V[i]
    local m = mdecode(redis.call('HGET', mk, uid))
    if m and (not m.frozen or not keep) then leavers[#leavers + 1] = {uid, m, i - A - 2} end
  end
  if #leavers == 0 then return noop(c) end
  if mode == 'd' then
    local out = {'NEED'}
    for _, l in ipairs(leavers) do out[#out + 1] = l[1] end
    return out
  end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  local active = c.ac
  local users = {}
  for _, l in ipairs(leavers) do
    local uid, m = l[1], l[2]
    users[#users + 1] = uid
    if not m.frozen then active = active - 1 end
    if keep then
      m.frozen = true
      m.fmax, m.fmin, m.ftime, m.pos = c.mx, c.mn, c.tm, pos
      redis.call('HSET', mk, uid, mencode(m))
    else
      redis.call('HDEL', mk, uid)
      if mode == 's' then
        redis.call('HDEL', ukey(l[3], 1), cid)
        redis.call('ZADD', ukey(l[3], 2), pos, cid)
        prune_tombs(ukey(l[3], 2), ukey(l[3], 3), max_tombs)
      end
    end
  end
  redis.call('HSET', ck, 'ac', fmt(active), 'lp', fmt(pos))
  return publish({'L', fmt(pos), cid, keep and '1' or '0', table.concat(users, USEP)})
end

return {'ERR', 'BADOP', op or ''}
end

-- 'batch': several operations in one call, each atomic on its own (standalone: any keys;
-- cluster: every op's keys in this slot). ARGV: 'batch', n, then n pairs (key count, arg
-- count), then each op's args; KEYS: each op's keys in order. Replies: one per op. In
-- cluster mode ('c') a position that does not commit (NOOP raced, RETRY, ERR) is published
-- as a skip here, so readers need no second call to close the hole.
if ARGV[1] == 'batch' then
  local n = tonumber(ARGV[2])
  local out = {}
  local ki, ai = 1, 3 + 2 * n
  for i = 1, n do
    local nk, na = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
    local K, V = {}, {}
    for j = 1, nk do K[j] = KEYS[ki + j - 1] end
    for j = 1, na do V[j] = ARGV[ai + j - 1] end
    ki, ai = ki + nk, ai + na
    local r = run_op(K, V)
    if V[3] == 'c' and r[1] ~= 'OK' then
      redis.call('PUBLISH', V[7], 'S' .. SEP .. V[4])
    end
    out[i] = r
  end
  return out
end
return run_op(KEYS, ARGV)
"""

# One row of a view: conversation values + the member's row (read-only, one slot).
# KEYS: conversation hash, members hash; ARGV: user id.
ROW = r"""
local v = redis.call('HMGET', KEYS[1], 'mx', 'mn', 'tm', 'ps')
local m = redis.call('HGET', KEYS[2], ARGV[1])
if not v[4] or not m then return false end
return {v[1], v[2], v[3], v[4], m}
"""

# Cluster: the user-slot steps of a membership change (see redis.py, "cluster layout").
# KEYS: epoch key of the user's slot, view index, tombstones, horizon.
# ARGV: step, epoch, conversation id, position, max_view | max_tombs.
USER = _COMMON + r"""
local step, epoch, cid, pos = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local bad = check_epoch(KEYS[1], epoch)
if bad then return bad end
local vk, tk, hk = KEYS[2], KEYS[3], KEYS[4]
if step == 'join' then  -- before the conversation step: the index may hold a candidate
  local cur = redis.call('HGET', vk, cid)
  if not cur then
    if redis.call('HLEN', vk) + 1 > tonumber(ARGV[5]) then
      return {'ERR', 'TOOLARGE', string.format('the view would exceed %s conversations', ARGV[5])}
    end
    redis.call('HSET', vk, cid, fmt(pos))
  elseif tonumber(cur) < pos then
    redis.call('HSET', vk, cid, fmt(pos))
  end
  return {'OK'}
end
if step == 'unjoin' then  -- the conversation step failed: drop our candidate
  if tonumber(redis.call('HGET', vk, cid) or '-1') == pos then redis.call('HDEL', vk, cid) end
  return {'OK'}
end
if step == 'tomb' then  -- before the conversation step of a removal
  redis.call('ZADD', tk, 'GT', pos, cid)
  prune_tombs(tk, hk, tonumber(ARGV[5]))
  return {'OK'}
end
if step == 'untomb' then  -- the user was not removed after all
  if tonumber(redis.call('ZSCORE', tk, cid) or '-1') == pos then redis.call('ZREM', tk, cid) end
  return {'OK'}
end
if step == 'left' then  -- after the conversation step: unless a later join indexed it again
  local cur = redis.call('HGET', vk, cid)
  if cur and tonumber(cur) < pos then redis.call('HDEL', vk, cid) end
  return {'OK'}
end
return {'ERR', 'BADOP', step}
"""

# Cluster sequencer (meta slot): reserves the next ``n`` positions (a whole batch in one
# step) and records the time they were handed out.
# KEYS: epoch, position, position time. ARGV: epoch, n (default 1).
# Reply: {'OK', first position, time (µs)}.
SEQUENCE = _COMMON + r"""
local bad = check_epoch(KEYS[1], ARGV[1])
if bad then return bad end
local n = tonumber(ARGV[2] or '1')
local p = redis.call('INCRBY', KEYS[2], n)
local t = now_us()
redis.call('SET', KEYS[3], fmt(t))
return {'OK', p - n + 1, fmt(t)}
"""

# Positions never go back, also across epochs: a node that switches epochs raises the counter
# to what it has seen. KEYS: position counter. ARGV: floor.
FLOOR = r"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then
  redis.call('SET', KEYS[1], string.format('%.0f', floor))
  return floor
end
return cur
"""

# Position counter, time the last position was handed out, and the server time (µs).
# KEYS: position counter, position time.
POSINFO = _COMMON + r"""
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0', fmt(now_us())}
"""

# Cluster: write the epoch copies of many slots of one master in one call (keys as ARGV,
# run on a direct connection to that master). ARGV: epoch, force (1/0), keys...
SLOT_EPOCHS = r"""#!lua flags=allow-cross-slot-keys
local n = 0
for i = 3, #ARGV do
  if ARGV[2] == '1' then
    redis.call('SET', ARGV[i], ARGV[1])
    n = n + 1
  elseif redis.call('SET', ARGV[i], ARGV[1], 'NX') then
    n = n + 1
  end
end
return n
"""
