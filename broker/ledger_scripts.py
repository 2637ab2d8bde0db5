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

# KEYS: bal, held, holds, log, end_marker (a hold id that has ended is not reused),
#       holdspend (hold id -> the spend counter it reserved on), spend (the key's spend of the day)
# ARGV: hold_id, fixed_ucr, ucr_per_output_token, requested_max_tokens (0 = none),
#       model_cap_tokens, ts, min_tokens (without a request: fewer affordable tokens fail),
#       spend_cap_ucr (0 = none), spend_ttl, give_up_ms (0 = none)
# A hold is sized to what both the balance and the key's daily spend cap still allow, and
# reserves its amount on the key's spend of the day (the end replaces it with the charge).
# A script that runs after give_up_ms (Redis' own clock) belongs to a request that already
# answered (its Redis call timed out): it holds nothing.
# Returns {1, balance_after, amount, max_tokens} or {0, balance, 0, affordable_tokens, why}
# with why 'balance', 'cap' or 'late'.
HOLD = (
    PRELUDE
    + r"""
local hid, fixed, out, req, cap = id(ARGV[1]), int(ARGV[2]), int(ARGV[3]), int(ARGV[4]), int(ARGV[5])
local spend_cap, spend_ttl, give_up = int(ARGV[8] or '0'), int(ARGV[9] or '1'), int(ARGV[10] or '0')
if not hid then return bad('hold_id') end
if not fixed or not out or not req then return bad('amounts') end
if not cap or cap < 1 then return bad('model_cap') end
if not int(ARGV[6]) then return bad('ts') end
if not spend_cap or not spend_ttl or spend_ttl < 1 or not give_up then return bad('spend') end
if redis.call('HEXISTS', KEYS[3], hid) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then
  return bad('hold_id (duplicate)')
end
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
if give_up > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > give_up then
    return {0, f('%d', bal), '0', 0, 'late'}
  end
end
local function affords(avail)
  if avail < fixed then return 0 end
  if out > 0 then return math.floor((avail - fixed) / out) end
  return cap
end
local avail = bal
if spend_cap > 0 then
  avail = math.min(bal, math.max(0, spend_cap - tonumber(redis.call('GET', KEYS[7]) or '0')))
end
local affordable = affords(avail)
local minimum = math.max(1, int(ARGV[7] or '1') or 1)
local tokens = req
if req == 0 then tokens = math.min(cap, affordable) else minimum = 1 end
if tokens < minimum or tokens > affordable then
  local why = 'balance'
  local by_balance = affords(bal)
  if avail < bal and (req == 0 and math.min(cap, by_balance) >= minimum or req > 0 and req <= by_balance) then
    why = 'cap'
  end
  return {0, f('%d', bal), '0', affordable, why}
end
local amount = fixed + tokens * out
redis.call('DECRBY', KEYS[1], f('%d', amount))
redis.call('INCRBY', KEYS[2], f('%d', amount))
redis.call('HSET', KEYS[3], hid, f('%d', amount))
redis.call('XADD', KEYS[4], '*', 'e', 'hold:' .. hid, 'k', 'hold', 't', '0',
  'h', f('%d', amount), 'hid', hid, 'ts', ARGV[6])
if amount > 0 then
  redis.call('INCRBY', KEYS[7], f('%d', amount))
  redis.call('EXPIRE', KEYS[7], spend_ttl)
  redis.call('HSET', KEYS[6], hid, KEYS[7])
end
return {1, f('%d', bal - amount), f('%d', amount), tokens}
"""
)

# KEYS: bal, held, holds, log, end_marker, holdspend, estimates, debts, debt_queue, expired_marker
# ARGV: hold_id, charge_ucr, kind (settle|release|expire), ts, receipt_json, marker_ttl
# An expiry charges the estimate a live stream recorded on its hold (0 without one) and
# leaves a marker, so a settle arriving after it books the rest as a late charge (never
# more than the hold, never below zero). The credits a hold returns pay the account's
# refund debts first (oldest first); a debt the remaining holds can no longer cover is
# given up (an 'unpaid' entry: the purchase's shortfall).
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
if done then
  local hold_amount = redis.call('GET', KEYS[10])
  if kind ~= 'settle' or not hold_amount then
    return {2, done, redis.call('GET', KEYS[1]) or '0'}
  end
  -- the settle of a request whose hold expired while it ran: charge the rest now
  redis.call('DEL', KEYS[10])
  redis.call('HDEL', KEYS[7], hid)  -- a progress beat that came after the expiry
  local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
  local late = math.min(math.min(charge, tonumber(hold_amount)) - tonumber(done), bal)
  if late <= 0 then return {2, done, f('%d', bal)} end
  redis.call('DECRBY', KEYS[1], f('%d', late))
  redis.call('SET', KEYS[5], f('%d', tonumber(done) + late), 'EX', ttl)
  redis.call('XADD', KEYS[4], '*', 'e', 'late:' .. hid, 'k', 'late', 't', f('%d', -late),
    'h', '0', 'hid', '', 'ts', ARGV[4], 'r', ARGV[5])
  return {1, f('%d', tonumber(done) + late), f('%d', bal - late)}
end
local amount = redis.call('HGET', KEYS[3], hid)
if not amount then return {3, '0', redis.call('GET', KEYS[1]) or '0'} end
amount = tonumber(amount)
local receipt = ARGV[5]
if kind == 'expire' then
  charge = tonumber(redis.call('HGET', KEYS[7], hid) or '0')
  local r = cjson.decode(receipt)
  r['hold_ucr'] = amount
  r['estimated'] = charge > 0
  receipt = cjson.encode(r)
  redis.call('SET', KEYS[10], f('%d', amount), 'EX', ttl)
end
redis.call('HDEL', KEYS[7], hid)
local charged = math.min(charge, amount)
local back = amount - charged
local held = tonumber(redis.call('DECRBY', KEYS[2], f('%d', amount)))
redis.call('HDEL', KEYS[3], hid)
redis.call('SET', KEYS[5], f('%d', charged), 'EX', ttl)
redis.call('XADD', KEYS[4], '*', 'e', 'end:' .. hid, 'k', kind, 't', f('%d', -charged),
  'h', f('%d', -amount), 'hid', hid, 'ts', ARGV[4], 'r', receipt)
local spend = redis.call('HGET', KEYS[6], hid)
if spend then
  redis.call('HDEL', KEYS[6], hid)
  if back > 0 and redis.call('EXISTS', spend) == 1 then redis.call('DECRBY', spend, f('%d', back)) end
end
-- refund debts: paid from what this hold gives back, oldest first
local n = 0
while back > 0 do
  local debt = redis.call('LINDEX', KEYS[9], 0)
  if not debt then break end
  local owed = tonumber(redis.call('HGET', KEYS[8], debt) or '0')
  local pay = math.min(owed, back)
  back = back - pay
  if pay < owed then
    redis.call('HSET', KEYS[8], debt, f('%d', owed - pay))
  else
    redis.call('HDEL', KEYS[8], debt)
    redis.call('LPOP', KEYS[9])
  end
  if pay > 0 then
    n = n + 1
    redis.call('XADD', KEYS[4], '*', 'e', 'debt:' .. hid .. ':' .. n, 'k', 'debit', 't', f('%d', -pay),
      'h', '0', 'hid', '', 'ts', ARGV[4], 'why', 'refund owed', 'ref', debt)
  end
end
-- what the open holds can no longer cover is given up, newest debt first
local total = 0
for _, owed in ipairs(redis.call('HVALS', KEYS[8])) do total = total + tonumber(owed) end
while total > held do
  local debt = redis.call('LINDEX', KEYS[9], -1)
  if not debt then break end
  local owed = tonumber(redis.call('HGET', KEYS[8], debt) or '0')
  local drop = math.min(owed, total - held)
  total = total - drop
  if drop < owed then
    redis.call('HSET', KEYS[8], debt, f('%d', owed - drop))
  else
    redis.call('HDEL', KEYS[8], debt)
    redis.call('RPOP', KEYS[9])
  end
  n = n + 1
  redis.call('XADD', KEYS[4], '*', 'e', 'unpaid:' .. hid .. ':' .. n, 'k', 'unpaid', 't', '0',
    'h', '0', 'hid', '', 'ts', ARGV[4], 'why', 'already spent: ' .. f('%d', drop), 'ref', debt, 'u', f('%d', drop))
end
local bal = redis.call('INCRBY', KEYS[1], f('%d', back))
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

# KEYS: bal, log, debit_marker, held, debts, debt_queue
# ARGV: debit_id, amount_ucr (> 0), ts, reason, marker_ttl, ref ('' = none)
# Takes back up to amount, never below zero. With a ref (a refund's purchase), what the
# balance lacks is owed from the open holds' unused parts as they end (the END script
# pays it), as far as the holds not already owed to earlier debts could cover; the rest
# was spent and is given up at once (an 'unpaid' entry). Entries carry the ref, so the
# drain books them on the purchase.
# Returns {1|0 (replay), taken, balance, owed}.
DEBIT = (
    PRELUDE
    + r"""
local did, amount, ttl = id(ARGV[1]), int(ARGV[2]), int(ARGV[5])
if not did then return bad('debit_id') end
if not amount or amount < 1 then return bad('amount') end
if not int(ARGV[3]) then return bad('ts') end
if type(ARGV[4]) ~= 'string' or #ARGV[4] > 200 then return bad('reason') end
if not ttl or ttl < 1 then return bad('marker_ttl') end
local ref = ARGV[6] or ''
if ref ~= '' and not id(ref) then return bad('ref') end
local done = redis.call('GET', KEYS[3])
if done then return {0, done, redis.call('GET', KEYS[1]) or '0', '0'} end
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
local taken = math.min(amount, bal)
local owed = 0
if ref ~= '' and taken < amount then
  local total = 0
  for _, o in ipairs(redis.call('HVALS', KEYS[5])) do total = total + tonumber(o) end
  owed = math.max(0, math.min(amount - taken, tonumber(redis.call('GET', KEYS[4]) or '0') - total))
  if owed > 0 then
    if redis.call('HEXISTS', KEYS[5], ref) == 0 then redis.call('RPUSH', KEYS[6], ref) end
    redis.call('HINCRBY', KEYS[5], ref, f('%d', owed))
  end
end
redis.call('DECRBY', KEYS[1], f('%d', taken))
redis.call('SET', KEYS[3], f('%d', taken), 'EX', ttl)
redis.call('XADD', KEYS[2], '*', 'e', 'debit:' .. did, 'k', 'debit', 't', f('%d', -taken),
  'h', '0', 'hid', '', 'ts', ARGV[3], 'why', ARGV[4], 'ref', ref)
local unpaid = amount - taken - owed
if ref ~= '' and unpaid > 0 then
  redis.call('XADD', KEYS[2], '*', 'e', 'unpaid:' .. did, 'k', 'unpaid', 't', '0',
    'h', '0', 'hid', '', 'ts', ARGV[3], 'why', 'already spent: ' .. f('%d', unpaid), 'ref', ref, 'u', f('%d', unpaid))
end
return {1, f('%d', taken), f('%d', bal - taken), f('%d', owed)}
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
