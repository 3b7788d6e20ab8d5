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
-- KEYS[3] lane lock           (stepped:<namespace>:{<lane key>}:lock), optional:
-- ARGV[5] the caller's lock token, "" for none
-- ARGV[6] milliseconds the lock lives
-- ARGV[7] "take": on "retry", take the lock if it is free (a redis-py Lock's value
--         and expiry); "drop": on any other outcome, drop the lock if it holds the
--         token. Either saves a round trip of taking or releasing it apart.
-- ARGV[8] flags, optional ("" for none): "b": a lane whose current action is another
--         one answers {"busy", current_id} and changes nothing (the caller checks that
--         the current action does not wait on it, then joins without "b"); "e": the
--         caller's SQL saw an action performing in this lane, so a lane without a
--         current action was lost by Redis: answer {"lost"} and change nothing (the
--         caller rebuilds it from SQL). Either saves the caller a read of the lane first.
-- Returns {"perform"} | {"queued", removed_id...} | {"deadlock", current_id}
--       | {"retry", pending_id...} | {"retry", "locked", pending_id...}
--       | {"busy", current_id} | {"lost"}
-- (the first word is a LaneOutcome of lanes.py)
local id = ARGV[1]
local function done(reply)
  if ARGV[7] == "drop" and redis.call("GET", KEYS[3]) == ARGV[5] then
    redis.call("DEL", KEYS[3])
  end
  return reply
end
local flags = ARGV[8] or ""
local current = redis.call("HGET", KEYS[1], "current")
if not current then
  if string.find(flags, "e", 1, true) then
    return {"lost"}
  end
  redis.call("HSET", KEYS[1], "current", id, "checksum", ARGV[2])
  return done({"perform"})
end
if current == id then
  return done({"perform"})
end
if string.find(flags, "b", 1, true) then
  return {"busy", current}
end
if redis.call("ZSCORE", KEYS[2], id) then
  return done({"queued"})
end
if string.find(ARGV[3], "," .. current .. ",", 1, true) then
  return done({"deadlock", current})
end
-- Superseding keeps at most one pending action (plus the few that concurrent joins
-- left behind), so these replies stay small.
local older = redis.call("ZRANGE", KEYS[2], 0, -1)
for _, old in ipairs(older) do
  if not string.find(ARGV[4], "," .. old .. ",", 1, true) then
    local reply = {"retry"}
    if ARGV[7] == "take" and redis.call("SET", KEYS[3], ARGV[5], "NX", "PX", ARGV[6]) then
      table.insert(reply, "locked")
    end
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
return done(reply)
