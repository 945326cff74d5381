-- Positions never go back, also across epochs: a node that switches epochs raises the counter
-- to what it has seen. KEYS: position counter. ARGV: floor.
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then
  redis.call('SET', KEYS[1], string.format('%.0f', floor))
  return floor
end
return cur
