"""The ledger's Lua scripts. Each validates every argument before its first write.

All keys of one script belong to one account and carry its ``{acct:ID}`` hash tag,
so the scripts run unchanged on Redis Cluster. Numbers go back to Redis through
``%d`` formatting because Lua's own number-to-string switches to exponent notation
above 1e14.
"""

PRELUDE = r"""
local f = string.format
local function int(s)
  if type(s) ~= 'string' or #s == 0 or #s > 15 or not string.match(s, '^%d+$') then
    return nil
  end
  return tonumber(s)
end
local function id(s)
  if type(s) ~= 'string' or #s == 0 or #s > 64 or string.find(s, '[^%w%-_.:]') then
    return nil
  end
  return s
end
local function bad(what) return redis.error_reply('ERR ledger: bad argument ' .. what) end
"""

# KEYS: bal, held, holds, log, end_marker (a hold id that has ended is not reused)
# ARGV: hold_id, fixed_ucr, ucr_per_output_token, requested_max_tokens (0 = none),
#       model_cap_tokens, ts, min_tokens (without a request: fewer affordable tokens fail)
# Returns {1, balance_after, amount, max_tokens} or {0, balance, 0, affordable_tokens}.
HOLD = (
    PRELUDE
    + r"""
local hid, fixed, out, req, cap = id(ARGV[1]), int(ARGV[2]), int(ARGV[3]), int(ARGV[4]), int(ARGV[5])
if not hid then return bad('hold_id') end
if not fixed or not out or not req then return bad('amounts') end
if not cap or cap < 1 then return bad('model_cap') end
if not int(ARGV[6]) then return bad('ts') end
if redis.call('HEXISTS', KEYS[3], hid) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then
  return bad('hold_id (duplicate)')
end
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
local affordable = 0
if bal >= fixed then
  if out > 0 then affordable = math.floor((bal - fixed) / out) else affordable = cap end
end
local minimum = math.max(1, int(ARGV[7] or '1') or 1)
local tokens = req
if req == 0 then tokens = math.min(cap, affordable) else minimum = 1 end
if tokens < minimum or tokens > affordable then
  return {0, f('%d', bal), '0', affordable}
end
local amount = fixed + tokens * out
redis.call('DECRBY', KEYS[1], f('%d', amount))
redis.call('INCRBY', KEYS[2], f('%d', amount))
redis.call('HSET', KEYS[3], hid, f('%d', amount))
redis.call('XADD', KEYS[4], '*', 'e', 'hold:' .. hid, 'k', 'hold', 't', '0',
  'h', f('%d', amount), 'hid', hid, 'ts', ARGV[6])
return {1, f('%d', bal - amount), f('%d', amount), tokens}
"""
)

# KEYS: bal, held, holds, log, end_marker
# ARGV: hold_id, charge_ucr, kind (settle|release|expire), ts, receipt_json, marker_ttl
# Returns {1, charged, balance} when this call ended the hold, {2, charged, balance}
# when it had already ended (a replay), {3, '0', balance} for an unknown hold.
END = (
    PRELUDE
    + r"""
local hid, charge, kind, ttl = id(ARGV[1]), int(ARGV[2]), ARGV[3], int(ARGV[6])
if not hid then return bad('hold_id') end
if not charge then return bad('charge') end
if kind ~= 'settle' and kind ~= 'release' and kind ~= 'expire' then return bad('kind') end
if not int(ARGV[4]) then return bad('ts') end
if type(ARGV[5]) ~= 'string' then return bad('receipt') end
if not ttl or ttl < 1 then return bad('marker_ttl') end
local done = redis.call('GET', KEYS[5])
if done then return {2, done, redis.call('GET', KEYS[1]) or '0'} end
local amount = redis.call('HGET', KEYS[3], hid)
if not amount then return {3, '0', redis.call('GET', KEYS[1]) or '0'} end
amount = tonumber(amount)
local charged = math.min(charge, amount)
local bal = redis.call('INCRBY', KEYS[1], f('%d', amount - charged))
redis.call('DECRBY', KEYS[2], f('%d', amount))
redis.call('HDEL', KEYS[3], hid)
redis.call('SET', KEYS[5], f('%d', charged), 'EX', ttl)
redis.call('XADD', KEYS[4], '*', 'e', 'end:' .. hid, 'k', kind, 't', f('%d', -charged),
  'h', f('%d', -amount), 'hid', hid, 'ts', ARGV[4], 'r', ARGV[5])
return {1, f('%d', charged), f('%d', bal)}
"""
)

# KEYS: bal, grant_marker
# ARGV: amount_ucr (> 0), marker_ttl
# Returns {1, balance} when granted, {0, balance} when this grant id was already applied.
GRANT = (
    PRELUDE
    + r"""
local amount, ttl = int(ARGV[1]), int(ARGV[2])
if not amount or amount < 1 then return bad('amount') end
if not ttl or ttl < 1 then return bad('marker_ttl') end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, redis.call('GET', KEYS[1]) or '0'}
end
local bal = redis.call('INCRBY', KEYS[1], f('%d', amount))
redis.call('SET', KEYS[2], '1', 'EX', ttl)
return {1, f('%d', bal)}
"""
)

# KEYS: bal, log, debit_marker
# ARGV: debit_id, amount_ucr (> 0), ts, reason, marker_ttl
# Takes back up to amount, never below zero. Returns {1|0 (replay), taken, balance}.
DEBIT = (
    PRELUDE
    + r"""
local did, amount, ttl = id(ARGV[1]), int(ARGV[2]), int(ARGV[5])
if not did then return bad('debit_id') end
if not amount or amount < 1 then return bad('amount') end
if not int(ARGV[3]) then return bad('ts') end
if type(ARGV[4]) ~= 'string' or #ARGV[4] > 200 then return bad('reason') end
if not ttl or ttl < 1 then return bad('marker_ttl') end
local done = redis.call('GET', KEYS[3])
if done then return {0, done, redis.call('GET', KEYS[1]) or '0'} end
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
local taken = math.min(amount, bal)
redis.call('DECRBY', KEYS[1], f('%d', taken))
redis.call('SET', KEYS[3], f('%d', taken), 'EX', ttl)
redis.call('XADD', KEYS[2], '*', 'e', 'debit:' .. did, 'k', 'debit', 't', f('%d', -taken),
  'h', '0', 'hid', '', 'ts', ARGV[3], 'why', ARGV[4])
return {1, f('%d', taken), f('%d', bal - taken)}
"""
)

# KEYS: bal, held, holds, log
# Returns {balance, held, sum of open holds, stream length, hold ids and amounts...}.
SNAPSHOT = r"""
local out = {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0', '0',
  redis.call('XLEN', KEYS[4])}
local sum = 0
local holds = redis.call('HGETALL', KEYS[3])
for i = 1, #holds, 2 do
  sum = sum + tonumber(holds[i + 1])
  out[#out + 1] = holds[i]
  out[#out + 1] = holds[i + 1]
end
out[3] = string.format('%d', sum)
return out
"""

# KEYS: bal, held, holds, log
# ARGV: ledger_total_ucr (Σ total_delta in SQL, may be 0)
# Sets held = Σ open holds and balance = total − held, only when the stream is fully
# drained (else returns {0}). Returns {1, balance, held}.
REPAIR = r"""
local total = tonumber(ARGV[1])
if not total or not string.match(ARGV[1], '^%-?%d+$') then
  return redis.error_reply('ERR ledger: bad argument total')
end
if redis.call('XLEN', KEYS[4]) > 0 then return {0, '0', '0'} end
local sum = 0
local holds = redis.call('HVALS', KEYS[3])
for i = 1, #holds do sum = sum + tonumber(holds[i]) end
local bal = math.max(0, total - sum)
redis.call('SET', KEYS[1], string.format('%d', bal))
redis.call('SET', KEYS[2], string.format('%d', sum))
return {1, string.format('%d', bal), string.format('%d', sum)}
"""
