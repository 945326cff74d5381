-- Cluster, one master: the ops of many slots this master serves in one call, run on a
-- direct connection to the master (after common.lua and op.lua; the script carries the
-- allow-cross-slot-keys flag). The keys travel in ARGV: Redis checks each access against
-- the slots this master serves. A slot that moved away fails its op at the first access (the
-- epoch check, before any write): the op answers {'RETRY', 'MOVED'} and the node refreshes
-- its slot map and sends the op again with a new position.
-- ARGV: 'xbatch', n, epoch, mode, position time, deadline, channel, then per op: its slot's
-- epoch key, conversation hash, members hash, op, position, own argument count, own args.
-- Replies: one per op (as op.lua's); in mode 'c' a position that does not commit is
-- published as a skip.
local n = tonumber(ARGV[2])
local epoch, mode, ptime, deadline, channel = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local out = {}
local ai = 8
for i = 1, n do
  local K = {ARGV[ai], ARGV[ai], ARGV[ai + 1], ARGV[ai + 2]}
  local V = {ARGV[ai + 3], epoch, mode, ARGV[ai + 4], ptime, deadline, channel}
  local na = tonumber(ARGV[ai + 5])
  for j = 1, na do V[7 + j] = ARGV[ai + 5 + j] end
  ai = ai + 6 + na
  local ok, r = pcall(run_op, K, V)
  if not ok then r = {'RETRY', 'MOVED'} end
  if mode == 'c' and r[1] ~= 'OK' then
    redis.call('PUBLISH', channel, 'S' .. SEP .. V[4])
  end
  out[i] = r
end
return out
