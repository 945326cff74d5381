-- Cluster sequencer (meta slot): reserves the next ``n`` positions (a whole batch in one
-- step) and records the time they were handed out.
-- KEYS: epoch, position, position time. ARGV: epoch, n (default 1).
-- Reply: {'OK', first position, time (µs)}.
local bad = check_epoch(KEYS[1], ARGV[1])
if bad then return bad end
local n = tonumber(ARGV[2] or '1')
local p = redis.call('INCRBY', KEYS[2], n)
local t = now_us()
redis.call('SET', KEYS[3], fmt(t))
return {'OK', p - n + 1, fmt(t)}
