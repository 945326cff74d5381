-- Every write on a conversation (run with EVALSHA; each call touches one hash slot in a
-- cluster). Prefixed with common.lua when loaded.
--
-- KEYS: [1] the epoch key of the slot, [2] the position counter (standalone) or [1] again
-- (cluster), [3] the conversation hash, [4] the members hash and, standalone only, for
-- membership ops three keys per user (view index, tombstones, tombstone horizon).
-- ARGV: op, expected epoch, mode, position, position time (µs), deadline (µs), channel,
-- then the op's own arguments.
--
-- Modes:
-- * 's' standalone: one script does everything — position (INCR), state, user index,
--   tombstones, PUBLISH — atomically.
-- * 'd' dry run (cluster): answers NOOP (with the current values) or NEED (the op changes
--   something: get a position), writes nothing.
-- * 'c' cluster: applies the op with the position the sequencer handed out; refuses a
--   position older than the conversation's last (STALE) or one handed out longer than the
--   deadline ago (EXPIRED), so positions of one conversation commit in order and a position
--   the readers gave up on never commits later.
--
-- Replies: {'OK', payload} (the payload is also PUBLISHed; in a batch the caller publishes
-- the batch's payloads in one message), {'NOOP', position, ...}, {'NEED', users...},
-- {'RETRY', why}, {'ERR', kind, message}.
--
-- X: nil for a single call, or the batch's shared state: X.ok holds the epoch keys already
-- checked (a script runs alone: the epoch cannot change between its ops), X.t the server
-- time (TIME is read once per call).
-- Sequences are uint64 decimal strings (common.lua: ucmp, uadd); positions and times are
-- numbers (far below 2^53).

-- The op being run: set by run_op, read by the helpers below, which are made once per
-- script call rather than once per op (six closures per op cost Lua ~0.5 µs).
local K, V, X, mode, cpos, ptime, deadline, channel, ck, mk

local function time()
  if not X then return redis.call('TIME') end
  if not X.t then X.t = redis.call('TIME') end
  return X.t
end
local function getconv()
  local v = redis.call('HMGET', ck, 'mx', 'mn', 'tm', 'ps', 'ac', 'lp')
  if not v[4] then return nil end
  return {mx = v[1], mn = v[2], tm = tonumber(v[3]), ps = tonumber(v[4]),
          ac = tonumber(v[5]), lp = tonumber(v[6] or '0')}
end
local function take_pos(c)
  if mode == 's' then
    if not X then return redis.call('INCR', K[2]) end
    -- a batch counts its positions here and writes the counter once (op_main.lua)
    if not X.pos then X.pos = tonumber(redis.call('GET', K[2]) or '0') end
    X.pos = X.pos + 1
    return X.pos
  end
  if c and c.lp >= cpos then return nil, 'STALE' end
  local t = time()
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - ptime > deadline then
    return nil, 'EXPIRED'
  end
  return cpos
end
local function publish(parts)
  local payload = table.concat(parts, SEP)
  if not X then redis.call('PUBLISH', channel, payload) end
  return {'OK', payload}
end
local function ukey(i, j) return K[4 + 3 * (i - 1) + j] end
-- the position a no-op answer is consistent with (standalone: the counter; cluster: the
-- conversation's last position, combined by the caller with what it had delivered)
local function noop(c, ...)
  local p = 0
  if mode == 's' then
    if X and X.pos then p = X.pos else p = tonumber(redis.call('GET', K[2]) or '0') end
  elseif c then p = c.lp end
  return {'NOOP', fmt(p), ...}
end

-- Reads first: Redis does not undo a script's writes when a command fails, and a command
-- fails on a key of the wrong type (a hand-edited Redis) at its first access. So each op
-- reads every key it will write before its first write: an op that fails, fails whole.
local function run_op(K_, V_, X_)

K, V, X = K_, V_, X_
local op, epoch = V[1], V[2]
mode = V[3]
cpos, ptime, deadline, channel = tonumber(V[4]), tonumber(V[5]), tonumber(V[6]), V[7]
ck, mk = K[3], K[4]
local A = 8
if not (X and X.ok[K[1]]) then
  local bad = check_epoch(K[1], epoch)
  if bad then return bad end
  if X then X.ok[K[1]] = true end
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
  local m = nil  -- the sender's row (read before any write: see "Reads first" above)
  if sender ~= '' then m = mdecode(redis.call('HGET', mk, sender)) end
  local pos, why = take_pos(c)
  if not pos then return {'RETRY', why} end
  local tm
  if clock and clock ~= '' then
    tm = tonumber(clock)  -- the node's injected clock (tests); else Redis' own
  else
    local t = time()
    tm = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  -- max_sequence_time_ms never decreases, also when a clock steps back
  if c and c.tm > tm then tm = c.tm end
  local ps, ts = fmt(pos), fmt(tm)
  if c then
    redis.call('HSET', ck, 'mx', last, 'tm', ts, 'ps', ps, 'lp', ps)
  else
    redis.call('HSET', ck, 'mx', last, 'mn', '0', 'tm', ts, 'ps', ps, 'ac', '0', 'lp', ps)
  end
  local s, sread = '', '0'
  if m and not m.frozen then
    m.read = last
    m.pos = pos
    redis.call('HSET', mk, sender, mencode(m))
    s, sread = sender, last
  end
  return publish({'A', ps, cid, uadd(mx, 1), last, ts, s, sread})
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
      if redis.call('HLEN', ukey(j[3], 1)) + 1 > max_view and not j[2] then
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
  if mode == 's' and not keep then
    for _, l in ipairs(leavers) do  -- (reads first: their types are checked here)
      redis.call('HLEN', ukey(l[3], 1))
      redis.call('ZCARD', ukey(l[3], 2))
      redis.call('GET', ukey(l[3], 3))
    end
  end
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

