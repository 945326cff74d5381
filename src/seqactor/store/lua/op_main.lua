-- The OP script's entry (after common.lua and op.lua, which defines run_op).
-- 'batch': several operations in one call, each atomic on its own (standalone: any keys;
-- cluster: every op's keys in this slot). What all ops share comes once, and each op's
-- arguments come packed in one string (fewer arguments for the client to encode):
-- KEYS: [1] the epoch key, [2] the position counter (cluster: [1] again), then each op's own
-- keys in order (conversation, members, and standalone membership ops' user keys).
-- ARGV: 'batch', n, epoch, mode, position time, deadline, channel, then one string per op:
-- its own key count, op, position (cluster; 0 standalone), its own arguments, joined by SEP.
-- Reply: one string, a record per op (common.lua, reply_record). The committed ops' changes
-- are PUBLISHed in one message, their records joined by RS in position order; in cluster
-- mode ('c') a position that does not commit (NOOP raced, RETRY, ERR) is published in it as
-- a skip, so readers need no second call to close the hole.
if ARGV[1] == 'batch' then
  local n = tonumber(ARGV[2])
  local epoch, mode, ptime, deadline, channel = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local X = {ok = {}}
  local out, pub = {}, {}
  local ki = 3
  for i = 1, n do
    local F = split(ARGV[7 + i])
    local nk = tonumber(F[1])
    local K = {KEYS[1], KEYS[2]}
    for j = 1, nk do K[j + 2] = KEYS[ki + j - 1] end
    ki = ki + nk
    local V = {F[2], epoch, mode, F[3], ptime, deadline, channel}
    for j = 4, #F do V[j + 4] = F[j] end
    local r = run_op(K, V, X)
    if r[1] == 'OK' then
      pub[#pub + 1] = r[2]
    elseif mode == 'c' then
      pub[#pub + 1] = 'S' .. SEP .. V[4]
    end
    out[i] = reply_record(r)
  end
  if #pub > 0 then redis.call('PUBLISH', channel, table.concat(pub, RS)) end
  return table.concat(out, RS)
end
return run_op(KEYS, ARGV)
