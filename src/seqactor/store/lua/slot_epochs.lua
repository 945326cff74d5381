#!lua flags=allow-cross-slot-keys
-- Cluster: write the epoch copies of many slots of one master in one call (keys as ARGV,
-- run on a direct connection to that master). ARGV: epoch, force (1/0), keys...
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
