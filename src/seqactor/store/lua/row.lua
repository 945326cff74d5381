-- One row of a view: conversation values + the member's row (read-only, one slot).
-- KEYS: conversation hash, members hash; ARGV: user id.
local v = redis.call('HMGET', KEYS[1], 'mx', 'mn', 'tm', 'ps')
local m = redis.call('HGET', KEYS[2], ARGV[1])
if not v[4] or not m then return false end
return {v[1], v[2], v[3], v[4], m}
