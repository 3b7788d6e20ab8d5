-- Remove a pending action from a lane (it completed without performing, e.g. it
-- was cancelled or timed out while queued). Deletes the lane when it is empty.
-- KEYS[1] lane state hash     (stepped:<namespace>:{<lane key>}:state)
-- KEYS[2] lane pending zset   (stepped:<namespace>:{<lane key>}:pending)
-- ARGV[1] action id
-- Returns the number of removed members (0 or 1)
local removed = redis.call("ZREM", KEYS[2], ARGV[1])
redis.call("HDEL", KEYS[1], "cs:" .. ARGV[1])
if not redis.call("HGET", KEYS[1], "current") and redis.call("ZCARD", KEYS[2]) == 0 then
  redis.call("DEL", KEYS[1], KEYS[2])
end
return removed
