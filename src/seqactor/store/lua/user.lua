-- Cluster: the user-slot steps of a membership change (see redis.py, "cluster layout").
-- KEYS: epoch key of the user's slot, view index, tombstones, horizon.
-- ARGV: step, epoch, conversation id, position, max_view | max_tombs.
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
