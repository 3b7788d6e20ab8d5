-- Join a lane: perform now, queue behind the current action (removing every older
-- pending action, which the caller already marked superseded in SQL), or refuse
-- because the lane's current action is an ancestor (deadlock).
-- The removal is a compare-and-set: when the lane holds a pending action the caller
-- has not superseded yet, nothing changes and the reply lists the pending actions,
-- so the caller supersedes them in SQL first and calls again. A pending action is
-- therefore never dropped from Redis before SQL knows it is superseded.
-- KEYS[1] lane state hash     (stepped:<namespace>:{<lane key>}:state)
-- KEYS[2] lane pending zset   (stepped:<namespace>:{<lane key>}:pending)
-- ARGV[1] action id
-- ARGV[2] checksum of the action, or "" for none
-- ARGV[3] ancestry: comma-framed ancestor ids, e.g. ",3,7,"
-- ARGV[4] comma-framed ids the caller already superseded in SQL, "," for none
-- Returns {"perform"} | {"queued", removed_id...} | {"deadlock", current_id}
--       | {"retry", pending_id...}
-- (the first word is a LaneOutcome of lanes.py)
local id = ARGV[1]
local current = redis.call("HGET", KEYS[1], "current")
if not current then
  redis.call("HSET", KEYS[1], "current", id, "checksum", ARGV[2])
  return {"perform"}
end
if current == id then
  return {"perform"}
end
if redis.call("ZSCORE", KEYS[2], id) then
  return {"queued"}
end
if string.find(ARGV[3], "," .. current .. ",", 1, true) then
  return {"deadlock", current}
end
-- Superseding keeps at most one pending action (plus the few that concurrent joins
-- left behind), so these replies stay small.
local older = redis.call("ZRANGE", KEYS[2], 0, -1)
for _, old in ipairs(older) do
  if not string.find(ARGV[4], "," .. old .. ",", 1, true) then
    local reply = {"retry"}
    for _, pending in ipairs(older) do
      table.insert(reply, pending)
    end
    return reply
  end
end
for _, old in ipairs(older) do
  redis.call("HDEL", KEYS[1], "cs:" .. old)
end
redis.call("DEL", KEYS[2])
local seq = redis.call("HINCRBY", KEYS[1], "seq", 1)
redis.call("ZADD", KEYS[2], seq, id)
redis.call("HSET", KEYS[1], "cs:" .. id, ARGV[2])
local reply = {"queued"}
for _, old in ipairs(older) do
  table.insert(reply, old)
end
return reply
