-- Position counter, time the last position was handed out, and the server time (µs).
-- KEYS: position counter, position time.
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0', fmt(now_us())}
