-- Rebuild one lane from SQL after Redis lost it (repair).
-- KEYS[1] lane state hash     (stepped:<namespace>:{<lane key>}:state)
-- KEYS[2] lane pending zset   (stepped:<namespace>:{<lane key>}:pending)
-- ARGV[1] current action id, or "" for none
-- ARGV[2] checksum of the current action, or ""
-- ARGV[3] pending action id, or "" for none
-- ARGV[4] checksum of the pending action, or ""
-- ARGV[5] "1": only when the lane does not exist (a worker's lane recovery), marking
--         it "recovered" until repair rewrites it; else ""
-- Returns 1 when the lane was written, 0 when it existed and ARGV[5] is "1"
if ARGV[5] == "1" and redis.call("EXISTS", KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call("DEL", KEYS[1], KEYS[2])
if ARGV[1] ~= "" then
  redis.call("HSET", KEYS[1], "current", ARGV[1], "checksum", ARGV[2])
end
if ARGV[5] == "1" then
  redis.call("HSET", KEYS[1], "recovered", "1")
end
if ARGV[3] ~= "" then
  local seq = redis.call("HINCRBY", KEYS[1], "seq", 1)
  redis.call("ZADD", KEYS[2], seq, ARGV[3])
  redis.call("HSET", KEYS[1], "cs:" .. ARGV[3], ARGV[4])
end
return 1
