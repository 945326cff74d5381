-- The OP script's entry (after common.lua and op.lua, which defines run_op).
-- 'batch': several operations in one call, each atomic on its own (standalone: any keys;
-- cluster: every op's keys in this slot). What all ops share comes once, and each op's
-- arguments come packed in one string (fewer arguments for the client to encode):
-- KEYS: [1] the epoch key, [2] the position counter (cluster: [1] again), then each op's own
-- keys in order (conversation, members, and standalone membership ops' user keys).
-- ARGV: 'batch', n, epoch, mode, position time, deadline, channel, then one string per op:
-- its own key count, op, position (cluster; 0 standalone), its own arguments, joined by SEP.
-- Replies: one per op. In cluster mode ('c') a position that does not commit (NOOP raced,
-- RETRY, ERR) is published as a skip here, so readers need no second call to close the hole.
if ARGV[1] == 'batch' then
  local n = tonumber(ARGV[2])
  local epoch, mode, ptime, deadline, channel = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local out = {}
  local ki = 3
  for i = 1, n do
    local F = split(ARGV[7 + i])
    local nk = tonumber(F[1])
    local K = {KEYS[1], KEYS[2]}
    for j = 1, nk do K[j + 2] = KEYS[ki + j - 1] end
    ki = ki + nk
    local V = {F[2], epoch, mode, F[3], ptime, deadline, channel}
    for j = 4, #F do V[j + 4] = F[j] end
    local r = run_op(K, V)
    if mode == 'c' and r[1] ~= 'OK' then
      redis.call('PUBLISH', channel, 'S' .. SEP .. V[4])
    end
    out[i] = r
  end
  return out
end
return run_op(KEYS, ARGV)
