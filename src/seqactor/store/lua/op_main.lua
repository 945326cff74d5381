-- The OP script's entry (after common.lua and op.lua, which defines run_op).
-- 'batch': several operations in one call, each atomic on its own (standalone: any keys;
-- cluster: every op's keys in this slot). What all ops share comes once, and each op's
-- arguments follow their count:
-- KEYS: [1] the epoch key, [2] the position counter (cluster: [1] again), then each op's own
-- keys in order (conversation, members, and standalone membership ops' user keys).
-- ARGV: 'batch', n, epoch, mode, position time, deadline, channel, then per op: the number
-- of its arguments that follow, its own key count, op, position (cluster; 0 standalone), its
-- own arguments (separate arguments: splitting one packed string cost Lua ~1.4 µs per op).
-- Reply: one string, a record per op (common.lua, reply_record). The committed ops' changes
-- are PUBLISHed in one message, their records joined by RS in position order; in cluster
-- mode ('c') a position that does not commit (NOOP raced, RETRY, ERR) is published in it as
-- a skip, so readers need no second call to close the hole. An op that raises a Redis error
-- answers {'ERR', 'FAILED', message}; the batch goes on. Standalone, the position counter
-- is read once and written once per batch (X.pos), not INCRed per op.
if ARGV[1] == 'batch' then
  local n = tonumber(ARGV[2])
  local epoch, mode, ptime, deadline, channel = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local X = {ok = {}}
  local out, pub = {}, {}
  local ki, a = 3, 8
  for i = 1, n do
    local nf, nk = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local K = {KEYS[1], KEYS[2]}
    for j = 1, nk do K[j + 2] = KEYS[ki + j - 1] end
    ki = ki + nk
    local V = {ARGV[a + 2], epoch, mode, ARGV[a + 3], ptime, deadline, channel}
    for j = 4, nf do V[j + 4] = ARGV[a + j] end
    a = a + nf + 1
    local took = X.pos
    local done, r = pcall(run_op, K, V, X)
    if not done then
      -- A broken key (one of the wrong type, say) fails this op alone, not the batch: the
      -- ops before it committed. A position it had taken goes out as a skip, so readers
      -- have no hole to wait for.
      if mode == 's' and X.pos ~= took then pub[#pub + 1] = 'S' .. SEP .. fmt(X.pos) end
      r = {'ERR', 'FAILED', (string.gsub(tostring(r), '%c', ' '))}
    end
    if r[1] == 'OK' then
      pub[#pub + 1] = r[2]
    elseif mode == 'c' then
      pub[#pub + 1] = 'S' .. SEP .. V[4]
    end
    out[i] = reply_record(r)
  end
  if X.pos then redis.call('SET', KEYS[2], fmt(X.pos)) end
  if #pub > 0 then redis.call('PUBLISH', channel, table.concat(pub, RS)) end
  return table.concat(out, RS)
end
return run_op(KEYS, ARGV)
