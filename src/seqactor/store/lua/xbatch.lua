-- Cluster, one master: the ops of many slots this master serves in one call, run on a
-- direct connection to the master (after common.lua and op.lua; the script carries the
-- allow-cross-slot-keys flag). The keys travel in ARGV: Redis checks each access against
-- the slots this master serves. A slot that moved away fails its op at the first access (the
-- epoch check, before any write): the op answers {'RETRY', 'MOVED'} and the node refreshes
-- its slot map and sends the op again with a new position.
-- ARGV: 'xbatch', n, epoch, mode, position time, deadline, channel, then per op: the number
-- of its arguments that follow, its slot's epoch key, conversation hash, members hash, op,
-- position, its own arguments.
-- Reply: one string, a record per op (common.lua, reply_record). In mode 'c' the committed
-- ops' changes and the skips of positions that do not commit are PUBLISHed in one message
-- (records joined by RS, in position order).
local n = tonumber(ARGV[2])
local epoch, mode, ptime, deadline, channel = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local X = {ok = {}}
local out, pub = {}, {}
local a = 8
for i = 1, n do
  local nf = tonumber(ARGV[a])
  local K = {ARGV[a + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]}
  local V = {ARGV[a + 4], epoch, mode, ARGV[a + 5], ptime, deadline, channel}
  for j = 6, nf do V[j + 2] = ARGV[a + j] end
  a = a + nf + 1
  local ok, r = pcall(run_op, K, V, X)
  if not ok then r = {'RETRY', 'MOVED'} end
  if mode == 'c' then
    if r[1] == 'OK' then
      pub[#pub + 1] = r[2]
    else
      pub[#pub + 1] = 'S' .. SEP .. V[4]
    end
  end
  out[i] = reply_record(r)
end
if #pub > 0 then redis.call('PUBLISH', channel, table.concat(pub, RS)) end
return table.concat(out, RS)
