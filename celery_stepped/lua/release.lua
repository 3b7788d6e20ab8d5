-- Release a lane after its current action completed: promote the oldest pending
-- action, or delete the lane when nothing waits. Idempotent: releasing an action
-- that is not current changes nothing and reports the current one.
-- KEYS[1] lane state hash     (stepped:<namespace>:{<lane key>}:state)
-- KEYS[2] lane pending zset   (stepped:<namespace>:{<lane key>}:pending)
-- ARGV[1] id of the action that completed
-- Returns {"next", id} | {"empty"} | {"other", current_id} | {"absent"}
-- (the first word is a LaneOutcome of lanes.py)
local current = redis.call("HGET", KEYS[1], "current")
if not current then
  return {"absent"}
end
if current ~= ARGV[1] then
  return {"other", current}
end
local head = redis.call("ZRANGE", KEYS[2], 0, 0)
if #head == 0 then
  redis.call("DEL", KEYS[1], KEYS[2])
  return {"empty"}
end
local nxt = head[1]
redis.call("ZREM", KEYS[2], nxt)
local checksum = redis.call("HGET", KEYS[1], "cs:" .. nxt) or ""
redis.call("HDEL", KEYS[1], "cs:" .. nxt)
redis.call("HSET", KEYS[1], "current", nxt, "checksum", checksum)
return {"next", nxt}
