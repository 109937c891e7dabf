-- Cycles ledger on Redis: one script per protocol operation, applying the rules of cycles_ledger/rules.py.
--
-- Every script works on the keys of ONE top-level scope (its hash tag), all passed in KEYS:
--   KEYS[1] budgets hash      field "<scope>|<unit>" -> budget JSON {a,s,r,d,o,x,st,c}
--   KEYS[2] reservations hash field "<rid>" -> live record JSON, "<rid>|s" -> static JSON (from the client)
--   KEYS[3] due zset          rid scored by deadline (expires_at + grace), ACTIVE only
--   KEYS[4] events stream     one entry per event, trimmed to about ARGV[3] entries
--   KEYS[5] finalized zset    rid scored by finalization time (for pruning after the retention)
--   KEYS[6] ids zset          every rid scored by creation time (for listing)
--   KEYS[7] idempotency key   string "<payload hash>\n<response JSON>" with a TTL (reserve, extend, event)
-- ARGV: [1] now in ms, or "" for Redis TIME; [2] overdue holds to expire first; [3] event stream length;
--       [4] retention of idempotency records and finalized reservations, ms; [5] the command as JSON.
--
-- Lua numbers are doubles: the client refuses amounts above 2^53 - 1, and every integer leaves this
-- script through `enc`, which prints integers exactly (cjson would round them to 14 digits).
-- A script never raises after its first write: a refusal is returned as {"err": CODE, ...} so that the
-- writes it made on purpose (expiring overdue holds) stay, and nothing else was written.

local KB, KR, KDUE, KE, KFIN, KIDS, KI = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local SWEEP = tonumber(ARGV[2])
local MAXLEN = ARGV[3]
local RETAIN = tonumber(ARGV[4])
local CMD = cjson.decode(ARGV[5])
local NULL = cjson.null
local MAX_EXACT = 9007199254740991

local NOW
if ARGV[1] ~= '' then
  NOW = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local UNITS = {'CREDITS', 'RISK_POINTS', 'TOKENS', 'USD_MICROCENTS'} -- sorted, like the SQLite store's order
local LIST_CAPS = {tool_denylist = true, tool_allowlist = true}

-- --- JSON out, with exact integers ---------------------------------------------------------------
local RAW, ARR = {}, {}
local function raw(s) return setmetatable({s}, RAW) end
local function arr(t) return setmetatable(t, ARR) end

local enc
enc = function(v)
  if v == nil or v == NULL then return 'null' end
  local t = type(v)
  if t == 'number' then
    if v == math.floor(v) then return string.format('%d', v) end
    return string.format('%.17g', v)
  elseif t == 'boolean' then
    return v and 'true' or 'false'
  elseif t == 'string' then
    return cjson.encode(v)
  end
  local mt = getmetatable(v)
  if mt == RAW then return v[1] end
  local parts = {}
  if mt == ARR or #v > 0 then
    for i = 1, #v do parts[i] = enc(v[i]) end
    return '[' .. table.concat(parts, ',') .. ']'
  end
  for k, x in pairs(v) do parts[#parts + 1] = cjson.encode(k) .. ':' .. enc(x) end
  return '{' .. table.concat(parts, ',') .. '}'
end

local function I(n) return string.format('%d', n) end
local function present(v) return v ~= nil and v ~= NULL end
local function nonempty(t) return t ~= nil and t ~= NULL and next(t) ~= nil end
local function fail(code, message, details)
  return enc({err = code, message = message, details = details or {}})
end

-- --- budgets --------------------------------------------------------------------------------------
local function rem(b) return b.a - b.s - b.r - b.d end

local function caps_of(c)
  if not present(c) then return nil end
  for k, v in pairs(c) do
    if LIST_CAPS[k] and type(v) == 'table' then arr(v) end
  end
  return c
end

local function decode_budget(scope, unit, text)
  local j = cjson.decode(text)
  return {scope = scope, unit = unit, a = j.a, s = j.s, r = j.r, d = j.d, o = j.o, x = j.x == 1,
          st = j.st, c = caps_of(j.c)}
end

-- Budgets at `scopes` in `unit` (or in every unit), in scope order then unit order.
local function load_budgets(scopes, unit)
  local fields, meta = {}, {}
  for _, s in ipairs(scopes) do
    if unit then
      fields[#fields + 1] = s .. '|' .. unit
      meta[#meta + 1] = {s, unit}
    else
      for _, u in ipairs(UNITS) do
        fields[#fields + 1] = s .. '|' .. u
        meta[#meta + 1] = {s, u}
      end
    end
  end
  if #fields == 0 then return {} end
  local vals = redis.call('HMGET', KB, unpack(fields))
  local out = {}
  for i = 1, #fields do
    if vals[i] then out[#out + 1] = decode_budget(meta[i][1], meta[i][2], vals[i]) end
  end
  return out
end

local function save_budgets(budgets)
  local args = {}
  for _, b in ipairs(budgets) do
    args[#args + 1] = b.scope .. '|' .. b.unit
    args[#args + 1] = enc({a = b.a, s = b.s, r = b.r, d = b.d, o = b.o, x = b.x and 1 or 0, st = b.st, c = b.c})
  end
  if #args > 0 then redis.call('HSET', KB, unpack(args)) end
end

local function balance(b)
  return {scope = b.scope, unit = b.unit, allocated = b.a, spent = b.s, reserved = b.r, debt = b.d,
          overdraft_limit = b.o, remaining = rem(b), is_over_limit = b.x, status = b.st, caps = b.c or NULL}
end

local function balances(budgets)
  local out = arr({})
  for i, b in ipairs(budgets) do out[i] = balance(b) end
  return out
end

-- --- events and records ---------------------------------------------------------------------------
local function emit(typ, scope, unit, amount, rid, reason, data)
  local f = {'ts', I(NOW), 'type', typ}
  if scope then f[#f + 1] = 'scope'; f[#f + 1] = scope end
  if unit then f[#f + 1] = 'unit'; f[#f + 1] = unit end
  if amount then f[#f + 1] = 'amount'; f[#f + 1] = I(amount) end
  if rid then f[#f + 1] = 'rid'; f[#f + 1] = rid end
  if reason then f[#f + 1] = 'reason'; f[#f + 1] = reason end
  if data then f[#f + 1] = 'data'; f[#f + 1] = enc(data) end
  return redis.call('XADD', KE, 'MAXLEN', '~', MAXLEN, '*', unpack(f))
end

local function load_rec(rid)
  local text = redis.call('HGET', KR, rid)
  if not text then return nil end
  local rec = cjson.decode(text)
  arr(rec.bs)
  rec.caps = caps_of(rec.caps)
  return rec
end

local function save_rec(rec) redis.call('HSET', KR, rec.id, enc(rec)) end

local function finalize(rec, status)
  rec.st = status
  rec.fin = NOW
  save_rec(rec)
  redis.call('ZREM', KDUE, rec.id)
  redis.call('ZADD', KFIN, NOW, rec.id)
end

local function expire_rec(rec)
  local budgets = load_budgets(rec.bs, rec.u)
  for _, b in ipairs(budgets) do b.r = b.r - rec.e end
  save_budgets(budgets)
  finalize(rec, 'EXPIRED')
  emit('expired', rec.sp, rec.u, rec.e, rec.id)
end

-- Expire up to `limit` ACTIVE reservations whose deadline has passed; returns how many.
local function expire_due(limit)
  if limit <= 0 then return 0 end
  local due = redis.call('ZRANGEBYSCORE', KDUE, '-inf', '(' .. I(NOW), 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    local rec = load_rec(rid)
    if rec and rec.st == 'ACTIVE' then
      expire_rec(rec)
      n = n + 1
    else
      redis.call('ZREM', KDUE, rid)
    end
  end
  return n
end

-- The stored answer for an idempotency key: nil, the response text, or a mismatch failure.
local function replay(hash)
  local stored = redis.call('GET', KI)
  if not stored then return nil end
  local nl = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, nl - 1) ~= hash then
    return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. cjson.encode(CMD.key) ..
      ' was already used for a different ' .. CMD.op .. ' request', {idempotency_key = CMD.key})
  end
  return string.sub(stored, nl + 1)
end

local function remember(hash, body)
  redis.call('SET', KI, hash .. '\n' .. enc(body), 'PX', RETAIN)
end

-- --- rules (mirror cycles_ledger/rules.py) ----------------------------------------------------------
local function hard_denial(b)
  if b.st == 'CLOSED' then return 'BUDGET_CLOSED' end
  if b.st == 'FROZEN' then return 'BUDGET_FROZEN' end
  if b.x then return 'OVERDRAFT_LIMIT_EXCEEDED' end
  if b.d > 0 then return 'DEBT_OUTSTANDING' end
  return nil
end

local function sorted_keys(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return arr(out)
end

local function merge_caps(budgets)
  local m, any = {}, false
  for _, b in ipairs(budgets) do
    if b.c then
      for k, v in pairs(b.c) do
        if present(v) then
          if m[k] == nil then
            if LIST_CAPS[k] then
              local copy = arr({})
              for i = 1, #v do copy[i] = v[i] end
              m[k] = copy
            else
              m[k] = v
            end
            any = true
          elseif k == 'tool_denylist' then
            local set = {}
            for _, x in ipairs(m[k]) do set[x] = true end
            for _, x in ipairs(v) do set[x] = true end
            m[k] = sorted_keys(set)
          elseif k == 'tool_allowlist' then
            local theirs, set = {}, {}
            for _, x in ipairs(v) do theirs[x] = true end
            for _, x in ipairs(m[k]) do if theirs[x] then set[x] = true end end
            m[k] = sorted_keys(set)
          elseif k == 'cooldown_ms' then
            m[k] = math.max(m[k], v)
          else
            m[k] = math.min(m[k], v)
          end
        end
      end
    end
  end
  if any then return m end
  return nil
end

-- floor(x * 10^6 / d) exactly, keeping every intermediate below 2^53 (d > 0).
local function per_million(x, d)
  local neg = x < 0
  if neg then x = -x end
  local q = math.floor(x / d)
  local r = x - q * d
  for _ = 1, 6 do
    r = r * 10
    local digit = math.floor(r / d)
    q = q * 10 + digit
    r = r - digit * d
  end
  if neg then
    if r > 0 then return -(q + 1) end
    return -q
  end
  return q
end

local function evaluate(budgets, estimate, soft)
  for _, b in ipairs(budgets) do
    local reason = hard_denial(b)
    if reason then return {decision = 'DENY', reason = reason, scope = b.scope, remaining = rem(b)} end
  end
  local caps = merge_caps(budgets)
  if #budgets == 0 then return {decision = 'ALLOW', amount = estimate} end
  local tight = budgets[1]
  for i = 2, #budgets do
    if rem(budgets[i]) < rem(tight) then tight = budgets[i] end
  end
  local left = rem(tight)
  if left >= estimate then
    return {decision = caps and 'ALLOW_WITH_CAPS' or 'ALLOW', amount = estimate, scope = tight.scope,
            remaining = left, caps = caps}
  end
  if soft and left >= math.max(soft.min_amount, 1) then
    caps = caps or {}
    local apm = soft.amount_per_million_tokens
    if present(apm) and apm > 0 then
      local tokens = per_million(left - (soft.fixed_amount or 0), apm)
      if caps.max_tokens == nil or tokens < caps.max_tokens then caps.max_tokens = tokens end
    end
    return {decision = 'ALLOW_WITH_CAPS', amount = left, scope = tight.scope, remaining = left, caps = caps}
  end
  return {decision = 'DENY', reason = 'BUDGET_EXCEEDED', scope = tight.scope, remaining = left}
end

-- Turn a hold of `held` into a charge of `actual`; returns charged, flagged scopes, or nil, failure.
local function settle(budgets, held, actual, policy, is_commit)
  local delta = actual - held
  if delta <= 0 then
    for _, b in ipairs(budgets) do
      b.r = b.r - held
      b.s = b.s + actual
    end
    return actual, {}
  end
  if policy == 'REJECT' then
    local short = {}
    for _, b in ipairs(budgets) do
      if rem(b) < delta then short[#short + 1] = b end
    end
    if is_commit or #short > 0 then
      local worst = short[1] or budgets[1]
      local message
      if is_commit then
        message = 'actual ' .. I(actual) .. ' exceeds the reserved ' .. I(held) .. ' and the overage policy is REJECT'
      else
        message = 'actual ' .. I(actual) .. ' exceeds the remaining ' .. I(worst and rem(worst) or 0)
      end
      return nil, fail('BUDGET_EXCEEDED', message,
        {scope = worst and worst.scope or NULL, remaining = worst and rem(worst) or NULL})
    end
    for _, b in ipairs(budgets) do
      b.r = b.r - held
      b.s = b.s + actual
    end
    return actual, {}
  end
  if policy == 'ALLOW_IF_AVAILABLE' then
    local available = delta
    if #budgets > 0 then
      available = nil
      for _, b in ipairs(budgets) do
        local r = math.max(rem(b), 0)
        if available == nil or r < available then available = r end
      end
    end
    local extra = math.min(delta, available)
    local flagged = {}
    for _, b in ipairs(budgets) do
      local short = rem(b) < delta
      if short and not b.x then flagged[#flagged + 1] = b.scope end
      if short then b.x = true end
      b.r = b.r - held
      b.s = b.s + held + extra
    end
    return held + extra, flagged
  end
  local plan = {}
  for i, b in ipairs(budgets) do
    local covered = math.min(delta, math.max(rem(b), 0))
    local shortfall = delta - covered
    if shortfall > 0 and b.d + shortfall > b.o then
      return nil, fail('OVERDRAFT_LIMIT_EXCEEDED',
        'overage of ' .. I(delta) .. ' would take debt on ' .. b.scope .. ' to ' .. I(b.d + shortfall) ..
        ', past its overdraft limit ' .. I(b.o),
        {scope = b.scope, remaining = rem(b), debt = b.d, overdraft_limit = b.o})
    end
    plan[i] = {covered, shortfall}
  end
  for i, b in ipairs(budgets) do
    b.r = b.r - held
    b.s = b.s + held + plan[i][1]
    b.d = b.d + plan[i][2]
  end
  return actual, {}
end

local function fund(b, amount)
  local repaid = math.min(b.d, amount)
  b.d = b.d - repaid
  b.s = b.s + repaid
  b.a = b.a + amount
  if b.d == 0 and rem(b) >= 0 then b.x = false end
  return repaid
end

-- --- shared by reserve, decide and event ------------------------------------------------------------
local function unit_mismatch(all, in_unit)
  if #all > 0 and #in_unit == 0 and not CMD.allow_unbudgeted then
    local set = {}
    for _, b in ipairs(all) do set[b.unit] = true end
    local units = sorted_keys(set)
    return fail('UNIT_MISMATCH', 'no budget in ' .. CMD.unit .. ' for ' .. CMD.scopes[#CMD.scopes] ..
      '; budgets there are in ' .. table.concat(units, ', '),
      {scope = all[#all].scope, requested_unit = CMD.unit, expected_units = units})
  end
  return nil
end

local function split_units(all)
  local in_unit = {}
  for _, b in ipairs(all) do
    if b.unit == CMD.unit then in_unit[#in_unit + 1] = b end
  end
  return in_unit
end

local function evaluate_cmd()
  local all = load_budgets(CMD.scopes, nil)
  local in_unit = split_units(all)
  if #all == 0 and not CMD.allow_unbudgeted then
    return {decision = 'DENY', reason = 'BUDGET_NOT_FOUND', scope = CMD.scopes[#CMD.scopes]}, {}
  end
  local bad = unit_mismatch(all, in_unit)
  if bad then return nil, nil, bad end
  local soft = nil
  if present(CMD.soft_landing) then soft = CMD.soft_landing end
  return evaluate(in_unit, CMD.estimate, soft), in_unit
end

local function decision_body(ev)
  return {decision = ev.decision, scope_path = CMD.scopes[#CMD.scopes], affected_scopes = arr(CMD.scopes),
          caps = ev.caps or NULL, reason_code = ev.reason or NULL, scope = ev.scope or NULL,
          remaining = ev.remaining or NULL}
end

local function settle_target(op)
  local rec = load_rec(CMD.rid)
  if not rec then
    return nil, fail('NOT_FOUND', 'reservation ' .. cjson.encode(CMD.rid) .. ' not found', {reservation_id = CMD.rid})
  end
  if rec.sk and rec.sk == CMD.key then
    if rec.so ~= op or rec.sh ~= CMD.hash then
      return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. cjson.encode(CMD.key) ..
        ' was already used for a different ' .. rec.so .. ' request', {idempotency_key = CMD.key})
    end
    return nil, enc({replay = raw(rec.sr), now = NOW, balances = balances(load_budgets(rec.bs, rec.u))})
  end
  if rec.st == 'EXPIRED' then
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. CMD.rid .. ' expired', {reservation_id = CMD.rid})
  end
  if rec.st ~= 'ACTIVE' then
    return nil, fail('RESERVATION_FINALIZED', 'reservation ' .. CMD.rid .. ' is already ' .. rec.st,
      {reservation_id = CMD.rid, status = rec.st})
  end
  if NOW > rec.dl then
    expire_rec(rec)
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. CMD.rid .. ' expired at ' .. I(rec.x) ..
      ' (+' .. I(rec.g) .. ' ms grace)', {reservation_id = CMD.rid})
  end
  return rec
end

local function settled(rec, status, charged, op, body)
  rec.ch = charged
  rec.so, rec.sk, rec.sh = op, CMD.key, CMD.hash
  rec.sr = enc(body)
  finalize(rec, status)
end

local OPS = {}
--@@ prelude-end

--@@ reserve
OPS.reserve = function()
  expire_due(SWEEP)
  if CMD.hash ~= '' then
    local prior, bad = replay(CMD.hash)
    if bad then return bad end
    if prior then
      local j = cjson.decode(prior)
      local scopes = j.budgeted_scopes or {}
      return enc({replay = raw(prior), now = NOW, balances = balances(load_budgets(scopes, CMD.unit))})
    end
  end
  local ev, budgets, bad = evaluate_cmd()
  if bad then return bad end
  if ev.reason == 'BUDGET_EXCEEDED' and expire_due(1000) > 0 then
    ev, budgets, bad = evaluate_cmd()  -- overdue holds were still counted; look again without them
    if bad then return bad end
  end
  local body = decision_body(ev)
  body.dry_run = CMD.dry_run
  if CMD.dry_run or ev.decision == 'DENY' then
    body.balances = balances(budgets)
    local kind = 'denied'
    if CMD.dry_run then kind = (ev.decision == 'DENY') and 'would_deny' or 'would_allow' end
    local info = {subject = raw(CMD.subject), action = raw(CMD.action), key = CMD.key,
                  remaining = ev.remaining or NULL}
    if nonempty(ev.caps) then info.caps = ev.caps end
    emit(kind, ev.scope or CMD.scopes[#CMD.scopes], CMD.unit, CMD.estimate, nil, ev.reason, info)
    if CMD.dry_run and CMD.hash ~= '' then
      local slim = {}
      for k, v in pairs(body) do if k ~= 'balances' then slim[k] = v end end
      remember(CMD.hash, slim)
    end
    return enc(body)
  end
  for _, b in ipairs(budgets) do b.r = b.r + ev.amount end
  save_budgets(budgets)
  local rid = CMD.rid
  local expires = NOW + CMD.ttl_ms
  local budgeted = arr({})
  for i, b in ipairs(budgets) do budgeted[i] = b.scope end
  local rec = {id = rid, st = 'ACTIVE', u = CMD.unit, e = ev.amount, op = CMD.policy, c0 = NOW, x = expires,
               g = CMD.grace_ms, dl = expires + CMD.grace_ms, sp = CMD.scopes[#CMD.scopes], bs = budgeted, n = 0,
               caps = nonempty(ev.caps) and ev.caps or nil}
  save_rec(rec)
  redis.call('HSET', KR, rid .. '|s', CMD.static)
  redis.call('ZADD', KDUE, rec.dl, rid)
  redis.call('ZADD', KIDS, NOW, rid)
  local data = nil
  if nonempty(ev.caps) then data = {decision = ev.decision, caps = ev.caps} end
  emit('reserved', CMD.scopes[#CMD.scopes], CMD.unit, ev.amount, rid, nil, data)
  body.reservation_id = rid
  body.reserved = {unit = CMD.unit, amount = ev.amount}
  body.expires_at_ms = expires
  body.remaining_ttl_ms = CMD.ttl_ms
  if CMD.hash ~= '' then
    local slim = {budgeted_scopes = budgeted}
    for k, v in pairs(body) do slim[k] = v end
    remember(CMD.hash, slim)
  end
  body.balances = balances(budgets)
  return enc(body)
end

--@@ decide
OPS.decide = function()
  local ev, budgets, bad = evaluate_cmd()
  if bad then return bad end
  local body = decision_body(ev)
  body.balances = balances(budgets)
  return enc(body)
end

--@@ commit
OPS.commit = function()
  expire_due(SWEEP)
  local rec, out = settle_target('commit')
  if not rec then return out end
  if CMD.unit ~= rec.u then
    return fail('UNIT_MISMATCH', 'commit in ' .. CMD.unit .. ' for a reservation in ' .. rec.u,
      {requested_unit = CMD.unit, expected_units = arr({rec.u})})
  end
  local budgets = load_budgets(rec.bs, rec.u)
  local charged, flagged = settle(budgets, rec.e, CMD.actual, rec.op, true)
  if not charged then return flagged end
  save_budgets(budgets)
  local released = math.max(rec.e - CMD.actual, 0)
  local body = {reservation_id = CMD.rid, status = 'COMMITTED', charged = {unit = rec.u, amount = charged}}
  if released > 0 then body.released = {unit = rec.u, amount = released} else body.released = NULL end
  settled(rec, 'COMMITTED', charged, 'commit', body)
  local data = {actual = CMD.actual, released = released}
  if #flagged > 0 then data.over_limit = arr(flagged) end
  if present(CMD.metrics) then data.metrics = raw(CMD.metrics) end
  if present(CMD.metadata) then data.metadata = raw(CMD.metadata) end
  emit('committed', rec.sp, rec.u, charged, rec.id, nil, data)
  for _, scope in ipairs(flagged) do emit('over_limit', scope, rec.u, nil, rec.id) end
  body.balances = balances(budgets)
  return enc(body)
end

--@@ release
OPS.release = function()
  expire_due(SWEEP)
  local rec, out = settle_target('release')
  if not rec then return out end
  local budgets = load_budgets(rec.bs, rec.u)
  for _, b in ipairs(budgets) do b.r = b.r - rec.e end
  save_budgets(budgets)
  local body = {reservation_id = CMD.rid, status = 'RELEASED', released = {unit = rec.u, amount = rec.e}}
  settled(rec, 'RELEASED', nil, 'release', body)
  local data = nil
  if present(CMD.reason) then data = {reason = CMD.reason} end
  emit('released', rec.sp, rec.u, rec.e, rec.id, nil, data)
  body.balances = balances(budgets)
  return enc(body)
end

--@@ extend
OPS.extend = function()
  expire_due(SWEEP)
  local rec = load_rec(CMD.rid)
  if not rec then
    return fail('NOT_FOUND', 'reservation ' .. cjson.encode(CMD.rid) .. ' not found', {reservation_id = CMD.rid})
  end
  local prior, bad = replay(CMD.hash)
  if bad then return bad end
  if prior then
    return enc({replay = raw(prior), now = NOW, balances = balances(load_budgets(rec.bs, rec.u))})
  end
  if rec.st == 'EXPIRED' or (rec.st == 'ACTIVE' and NOW > rec.x) then
    if rec.st == 'ACTIVE' and NOW > rec.dl then
      expire_rec(rec)
      return fail('RESERVATION_EXPIRED', 'reservation ' .. CMD.rid .. ' expired', {})
    end
    return fail('RESERVATION_EXPIRED', 'reservation ' .. CMD.rid ..
      ' passed its expiry; in the grace period only commit or release', {reservation_id = CMD.rid})
  end
  if rec.st ~= 'ACTIVE' then
    return fail('RESERVATION_FINALIZED', 'reservation ' .. CMD.rid .. ' is already ' .. rec.st,
      {reservation_id = CMD.rid, status = rec.st})
  end
  if present(CMD.max_extensions) and rec.n >= CMD.max_extensions then
    return fail('MAX_EXTENSIONS_EXCEEDED', 'reservation ' .. CMD.rid .. ' was already extended ' .. I(rec.n) ..
      ' times', {reservation_id = CMD.rid})
  end
  rec.x = rec.x + CMD.extend_by_ms
  rec.dl = rec.x + rec.g
  rec.n = rec.n + 1
  save_rec(rec)
  redis.call('ZADD', KDUE, rec.dl, rec.id)
  emit('extended', rec.sp, rec.u, nil, rec.id, nil, {expires_at_ms = rec.x, extend_by_ms = CMD.extend_by_ms})
  local body = {reservation_id = CMD.rid, status = 'ACTIVE', expires_at_ms = rec.x, remaining_ttl_ms = rec.x - NOW}
  remember(CMD.hash, body)
  body.balances = balances(load_budgets(rec.bs, rec.u))
  return enc(body)
end

--@@ event
OPS.event = function()
  expire_due(SWEEP)
  local prior, bad = replay(CMD.hash)
  if bad then return bad end
  if prior then
    local j = cjson.decode(prior)
    return enc({replay = raw(prior), now = NOW, balances = balances(load_budgets(j.budgeted_scopes or {}, CMD.unit))})
  end
  local all = load_budgets(CMD.scopes, nil)
  local budgets = split_units(all)
  if #all == 0 and not CMD.allow_unbudgeted then
    return fail('NOT_FOUND', 'no budget for ' .. CMD.scopes[#CMD.scopes] .. ' or its parents',
      {scope = CMD.scopes[#CMD.scopes]})
  end
  bad = unit_mismatch(all, budgets)
  if bad then return bad end
  for _, b in ipairs(budgets) do
    if b.st == 'CLOSED' then return fail('BUDGET_CLOSED', 'budget ' .. b.scope .. ' is closed', {scope = b.scope}) end
    if b.st == 'FROZEN' then return fail('BUDGET_FROZEN', 'budget ' .. b.scope .. ' is frozen', {scope = b.scope}) end
  end
  local charged, flagged = settle(budgets, 0, CMD.actual, CMD.policy, false)
  if not charged then return flagged end
  save_budgets(budgets)
  local scopes = arr({})
  for i, b in ipairs(budgets) do scopes[i] = b.scope end
  local data = {scopes = scopes, actual = CMD.actual, subject = raw(CMD.subject), action = raw(CMD.action),
                over_limit = arr(flagged), metrics = present(CMD.metrics) and raw(CMD.metrics) or NULL,
                metadata = present(CMD.metadata) and raw(CMD.metadata) or NULL, key = CMD.key}
  local id = emit('debited', CMD.scopes[#CMD.scopes], CMD.unit, charged, nil, nil, data)
  for _, scope in ipairs(flagged) do emit('over_limit', scope, CMD.unit) end
  local body = {status = 'APPLIED', event_id = id, charged = {unit = CMD.unit, amount = charged}}
  local slim = {budgeted_scopes = scopes}
  for k, v in pairs(body) do slim[k] = v end
  remember(CMD.hash, slim)
  body.balances = balances(budgets)
  return enc(body)
end

--@@ budget
OPS.budget = function()
  expire_due(SWEEP)
  local found = load_budgets({CMD.scope}, CMD.unit)
  local b = found[1]
  local data = {}
  if CMD.op == 'set' then
    if not b then
      b = {scope = CMD.scope, unit = CMD.unit, a = CMD.amount, s = 0, r = 0, d = 0, o = CMD.overdraft_limit or 0,
           x = false, st = 'ACTIVE', c = nil}
      if present(CMD.caps) and next(CMD.caps) ~= nil then b.c = caps_of(CMD.caps) end
    else
      data.previous_allocated = b.a
      b.a = CMD.amount
      if present(CMD.overdraft_limit) then b.o = CMD.overdraft_limit end
      if present(CMD.caps) then
        if next(CMD.caps) ~= nil then b.c = caps_of(CMD.caps) else b.c = nil end
      end
      if b.d > b.o then
        b.x = true
      elseif rem(b) >= 0 then
        b.x = false
      end
    end
    if b.a > MAX_EXACT or b.a < 0 then
      return fail('INVALID_REQUEST', 'allocation ' .. I(b.a) .. ' is beyond what the Redis store keeps exactly (2^53 - 1)')
    end
    save_budgets({b})
    emit('budget_set', CMD.scope, CMD.unit, CMD.amount, nil, nil, data)
    return enc(balance(b))
  end
  if not b then
    return fail('NOT_FOUND', 'no ' .. CMD.unit .. ' budget at ' .. CMD.scope, {scope = CMD.scope})
  end
  if b.st == 'CLOSED' then return fail('BUDGET_CLOSED', 'budget ' .. b.scope .. ' is closed', {scope = b.scope}) end
  local kind, amount
  if CMD.op == 'fund' then
    if b.a + CMD.amount > MAX_EXACT then
      return fail('INVALID_REQUEST', 'allocation would pass what the Redis store keeps exactly (2^53 - 1)')
    end
    data.debt_repaid = fund(b, CMD.amount)
    kind, amount = 'funded', CMD.amount
  else
    b.st = ({freeze = 'FROZEN', unfreeze = 'ACTIVE', close = 'CLOSED'})[CMD.op]
    kind = ({freeze = 'frozen', unfreeze = 'unfrozen', close = 'closed'})[CMD.op]
  end
  save_budgets({b})
  emit(kind, CMD.scope, CMD.unit, amount, nil, nil, data)
  return enc(balance(b))
end

--@@ sweep
OPS.sweep = function()
  local n = expire_due(CMD.limit)
  -- Finalized reservations older than the retention go, with their static part and listing entry.
  local old = redis.call('ZRANGEBYSCORE', KFIN, '-inf', '(' .. I(NOW - RETAIN), 'LIMIT', 0, 1000)
  for _, rid in ipairs(old) do
    redis.call('HDEL', KR, rid, rid .. '|s')
    redis.call('ZREM', KIDS, rid)
    redis.call('ZREM', KFIN, rid)
  end
  return enc({expired = n, pruned = #old})
end
