-- Cycles ledger on Redis: one script per protocol operation, applying the rules of cycles_ledger/rules.py.
-- One call of a script runs a batch of operations of its kind, in order, each as if it were alone; the
-- client sends the calls of one loop tick that share a tenant and an operation this way (one EVALSHA
-- instead of one each, and the shared setup below runs once per batch).
--
-- Every script works on the keys of ONE top-level scope (its hash tag), all passed in KEYS:
--   KEYS[1] budgets hash       "<scope>|<unit>" -> "allocated spent reserved debt overdraft over(0|1) STATUS [caps JSON]"
--   KEYS[2] reservations hash  "<rid>"   -> "STATUS unit estimate policy created expires grace deadline
--                                            extensions charged(-1) finalized(-1) scope_path scope,scope,…"
--                              "<rid>|s" -> static JSON from the client (subject, action, key, metadata)
--                              "<rid>|c" -> caps JSON (when the decision had caps)
--                              "<rid>|k" -> "op\nhash\n<key length>\n<key><answer>" once settled
--   KEYS[3] due zset           rid scored by deadline (expires_at + grace), ACTIVE only
--   KEYS[4] events stream      one entry per event, trimmed to about the configured length
--   KEYS[5] finalized zset     rid scored by finalization time (pruned after the retention)
--   KEYS[6] ids zset           every rid scored by creation time (for listing)
--   KEYS[7…] idempotency keys  "<payload hash>\n<answer>" with a TTL (reserve, extend, event)
-- ARGV: [1] now in ms, or "" for Redis TIME; [2] "<overdue holds to expire first>\31<event stream length>\31
--       <retention of idempotency records and finalized reservations, ms>"; then four per operation:
--       the index in KEYS of its idempotency key (1 when it has none), the idempotency key (any text), the
--       operation's fields joined by \31 (JSON in them escapes control characters), free text (a release
--       reason). Few arguments keep the client's command packing cheap.
--
-- The reply is one entry per operation, in order. Each is a flat array the client turns into the same
-- dict the SQLite store returns; answers kept for replay are those arrays joined by \31. Lua numbers
-- are doubles: the client refuses amounts above 2^53 - 1 and integers are printed with %d. An operation
-- never raises after its first write: a refusal is the entry {"err", CODE, message, details JSON}, so
-- the writes made on purpose (expiring overdue holds) stay and nothing else was written. A Lua error
-- (a bug) is caught per operation and comes back as {"raise", message}, for that operation's caller only.
-- The operations' writes to the two hashes and the three zsets are gathered and made once, at the end of
-- the script call (see the write-back cache below); events and idempotency records are written at once.

local KB, KR, KDUE, KE, KFIN, KIDS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- Globals read often, as locals (a global is a table lookup each time).
local rcall, tonumber, tostring, type, pairs, ipairs, unpack, pcall, error =
  redis.call, tonumber, tostring, type, pairs, ipairs, unpack, pcall, error
local rawget, rawset, setmetatable = rawget, rawset, setmetatable
local max, min, floor, match = math.max, math.min, math.floor, string.match
local KI, KEY, F, TEXT -- the current operation's idempotency key name, key, fields and text (set by run_batch)
local NOW
if ARGV[1] ~= '' then
  NOW = tonumber(ARGV[1])
else
  local t = rcall('TIME')
  NOW = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
local NOW_S = string.format('%d', NOW)
local MAX_EXACT = 9007199254740991
local UNITS = {'CREDITS', 'RISK_POINTS', 'TOKENS', 'USD_MICROCENTS'} -- sorted, like the SQLite store's order
local SEP = '\31'
local fmt, concat, find, sub = string.format, table.concat, string.find, string.sub

-- Integers as text (%d); a batch prints the same amounts and times again and again.
local ITEXT = {}
local function I(n)
  local text = ITEXT[n]
  if text == nil then
    text = fmt('%d', n)
    if n == n then ITEXT[n] = text end -- not NaN
  end
  return text
end
local function opt(s) if s == '' then return nil end return s end
local function num(s) if s == nil or s == '' then return nil end return tonumber(s) end
-- JSON string literals; a batch quotes the same scopes and units again and again.
local QUOTED = {}
local function q(s)
  local text = QUOTED[s]
  if text == nil then
    text = cjson.encode(s)
    QUOTED[s] = text
  end
  return text
end

local function fail(code, message, details)
  local parts = {}
  for k, v in pairs(details or {}) do
    local text
    if type(v) == 'number' then text = I(v) elseif type(v) == 'table' then text = v[1] else text = q(v) end
    parts[#parts + 1] = q(k) .. ':' .. text
  end
  return {'err', code, message, '{' .. concat(parts, ',') .. '}'}
end

local function split(s, sep)
  local out, i = {}, 1
  while true do
    local j = find(s, sep, i, true)
    if not j then out[#out + 1] = sub(s, i); return out end
    out[#out + 1] = sub(s, i, j - 1)
    i = j + #sep
  end
end

local CFG = split(ARGV[2], SEP)
local SWEEP, MAXLEN, RETAIN = tonumber(CFG[1]), CFG[2], tonumber(CFG[3])

-- --- write-back cache -------------------------------------------------------------------------------
-- A script call is atomic, so the states between its operations are seen by no one: the budgets and
-- reservations hashes are read through a cache (field -> stored text, false when absent) and written back,
-- like the changes to the zsets, once at the end of the batch (run_batch). Only the save helpers change the
-- cache, with finished texts, so an operation that computes and then refuses leaves no trace. Events and
-- idempotency records go straight to Redis. A read of a zset first writes out its pending changes.
local CHUNK = 1000 -- (field, value) or (score, member) pairs per command when writing back
local function new_hash(key) return {key = key, val = {}, dirty = {}, order = {}} end
local HB, HR = new_hash(KB), new_hash(KR)

local function hash_get(h, field)
  local v = h.val[field]
  if v == nil then
    v = rcall('HGET', h.key, field)
    h.val[field] = v
  end
  return v
end

-- Read the fields not read yet, with one HMGET per CHUNK.
local function hash_fetch(h, fields)
  local val, miss = h.val, nil
  for i = 1, #fields do
    if val[fields[i]] == nil then
      miss = miss or {}
      miss[#miss + 1] = fields[i]
    end
  end
  if miss == nil then return end
  for from = 1, #miss, CHUNK do
    local to = min(from + CHUNK - 1, #miss)
    local got = rcall('HMGET', h.key, unpack(miss, from, to))
    for i = from, to do val[miss[i]] = got[i - from + 1] end
  end
end

local function hash_set(h, field, text)
  if not h.dirty[field] then
    h.dirty[field] = true
    h.order[#h.order + 1] = field
  end
  h.val[field] = text
end

-- `cmd key args…` in commands of at most `per` of the flat list's arguments each.
local function in_chunks(cmd, key, args, per)
  for from = 1, #args, per do
    rcall(cmd, key, unpack(args, from, min(from + per - 1, #args)))
  end
end

local function hash_flush(h)
  local order, val = h.order, h.val
  if #order == 0 then return end
  h.order, h.dirty = {}, {}
  local args = {}
  for _, field in ipairs(order) do
    args[#args + 1] = field
    args[#args + 1] = val[field]
  end
  in_chunks('HSET', h.key, args, 2 * CHUNK)
end

local function new_zset(key) return {key = key, score = {}, order = {}} end
local ZDUE, ZFIN, ZIDS = new_zset(KDUE), new_zset(KFIN), new_zset(KIDS)

-- ZADD (a number) or ZREM (false) of `member`, pending; the last change of a member is the one that counts.
local function zset_put(z, member, score)
  if z.score[member] == nil then z.order[#z.order + 1] = member end
  z.score[member] = score
end

local function zset_flush(z)
  local order, score = z.order, z.score
  if #order == 0 then return end
  z.order, z.score = {}, {}
  local add, del = {}, {}
  for _, m in ipairs(order) do
    local s = score[m]
    if s then
      add[#add + 1] = s
      add[#add + 1] = m
    else
      del[#del + 1] = m
    end
  end
  in_chunks('ZADD', z.key, add, 2 * CHUNK)
  in_chunks('ZREM', z.key, del, CHUNK)
end

-- Write back everything pending; each part is tried even when another fails. Returns the first error.
local function flush()
  local first
  for _, part in ipairs({{hash_flush, HB}, {hash_flush, HR}, {zset_flush, ZDUE}, {zset_flush, ZFIN},
                         {zset_flush, ZIDS}}) do
    local ok, err = pcall(part[1], part[2])
    if not ok and first == nil then first = err end
  end
  return first
end

-- --- budgets --------------------------------------------------------------------------------------
local function rem(b) return b.a - b.s - b.r - b.d end

-- A budget is a table {scope, unit, f (its field), a, s, r, d, o, x, st, c, text}. Decoding a text is dear,
-- so a batch keeps the budget of each field it decoded (DEC[field], good while its text is the field's
-- cached text) and hands the same table out again: operations change budgets in place, then save them,
-- which sets their text. A refusal or an error may leave a changed budget unsaved, so after one the batch
-- forgets them all (run_batch) and decodes the cached texts again.
local DEC = {}

local function decode_budget(scope, unit, text)
  local a, s, r, d, o, x, st, c = match(text, '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%d) (%u+) ?(.*)$')
  return {scope = scope, unit = unit, a = tonumber(a), s = tonumber(s), r = tonumber(r), d = tonumber(d),
          o = tonumber(o), x = x == '1', st = st, c = c}
end

-- The text of b: "a s r d o x st[ c]", printed as head .. "s r" .. tail where head and tail are kept per field
-- with the values they print (most operations change only spent and reserved).
local AROUND = {}
local function encode_budget(b)
  local h = AROUND[b.f]
  if h == nil or h.a ~= b.a or h.d ~= b.d or h.o ~= b.o or h.x ~= b.x or h.st ~= b.st or h.c ~= b.c then
    local tail = fmt(' %d %d %d %s', b.d, b.o, b.x and 1 or 0, b.st)
    if b.c ~= '' then tail = tail .. ' ' .. b.c end
    h = {a = b.a, d = b.d, o = b.o, x = b.x, st = b.st, c = b.c, head = fmt('%d ', b.a), tail = tail}
    AROUND[b.f] = h
  end
  local text = h.head .. fmt('%d %d', b.s, b.r) .. h.tail
  b.text = text
  return text
end

-- The fields of `scopes` in `unit` (or in every unit), in scope order then unit order, with the scope and
-- unit of each; kept per list of scopes (lists of scopes are never changed once made).
local FIELDS = {}
local function budget_fields(scopes, unit)
  local per = FIELDS[scopes]
  if per == nil then
    per = {}
    FIELDS[scopes] = per
  end
  local got = per[unit or '']
  if got == nil then
    local fields, ss, us = {}, {}, {}
    for _, s in ipairs(scopes) do
      for _, u in ipairs(unit and {unit} or UNITS) do
        fields[#fields + 1] = s .. '|' .. u
        ss[#fields], us[#fields] = s, u
      end
    end
    got = {fields, ss, us}
    per[unit or ''] = got
  end
  return got[1], got[2], got[3]
end

-- Budgets at `scopes` in `unit` (or in every unit), in scope order then unit order.
local function load_budgets(scopes, unit)
  local fields, ss, us = budget_fields(scopes, unit)
  if #fields == 0 then return {} end
  hash_fetch(HB, fields)
  local vals = HB.val
  local out = {nil, nil, nil} -- (room for three)
  for i = 1, #fields do
    local f = fields[i]
    local text = vals[f]
    if text then
      local b = DEC[f]
      if b == nil or b.text ~= text then
        b = decode_budget(ss[i], us[i], text)
        b.f, b.text = f, text
        DEC[f] = b
      end
      out[#out + 1] = b
    end
  end
  return out
end

local function save_budgets(budgets)
  for _, b in ipairs(budgets) do
    hash_set(HB, b.f, encode_budget(b))
    DEC[b.f] = b
  end
end

-- Balances go back as pairs of field and stored text; the client parses them like HGETALL output.
local function push_balances(out, budgets)
  for _, b in ipairs(budgets) do
    out[#out + 1] = b.f
    out[#out + 1] = b.text
  end
  return out
end

-- --- events ----------------------------------------------------------------------------------------
local function emit(typ, scope, unit, amount, rid, reason, data)
  if scope and unit and amount and rid and not reason then -- reserved, committed, released, expired: no table
    if data then
      return rcall('XADD', KE, 'MAXLEN', '~', MAXLEN, '*', 'ts', NOW_S, 'type', typ, 'scope', scope, 'unit', unit,
        'amount', I(amount), 'rid', rid, 'data', data)
    end
    return rcall('XADD', KE, 'MAXLEN', '~', MAXLEN, '*', 'ts', NOW_S, 'type', typ, 'scope', scope, 'unit', unit,
      'amount', I(amount), 'rid', rid)
  end
  local f = {'ts', NOW_S, 'type', typ}
  if scope then f[#f + 1] = 'scope'; f[#f + 1] = scope end
  if unit then f[#f + 1] = 'unit'; f[#f + 1] = unit end
  if amount then f[#f + 1] = 'amount'; f[#f + 1] = I(amount) end
  if rid then f[#f + 1] = 'rid'; f[#f + 1] = rid end
  if reason then f[#f + 1] = 'reason'; f[#f + 1] = reason end
  if data then f[#f + 1] = 'data'; f[#f + 1] = data end
  return rcall('XADD', KE, 'MAXLEN', '~', MAXLEN, '*', unpack(f))
end

-- --- reservations ----------------------------------------------------------------------------------
-- The lists of budgeted scopes of the records read, by their text (shared: never change one).
local LISTS = {}

-- A record as a table. `mid` and `tail` are its text between the status and `charged` and after
-- `finalized`, kept to write it back around a new status, charged and finalized while the rest is as read
-- (charged and finalized stay as read, text, until set: they are only written). Settling needs few
-- fields, so created, expires, grace and extensions (c0, x, g, n) are read from `mid` on first use.
local REC_MORE = {__index = function(rec, k)
  if k ~= 'c0' and k ~= 'x' and k ~= 'g' and k ~= 'n' then return nil end
  local c0, x, g, n = match(rawget(rec, 'mid'), '^%S+ %d+ %S+ (%d+) (%d+) (%d+) %d+ (%d+)$')
  x, n = tonumber(x), tonumber(n)
  rawset(rec, 'c0', c0)
  rawset(rec, 'x', x)
  rawset(rec, 'g', tonumber(g))
  rawset(rec, 'n', n)
  rawset(rec, 'x0', x)
  rawset(rec, 'n0', n)
  return rawget(rec, k)
end}

local function load_rec(rid)
  local text = hash_get(HR, rid)
  if not text then return nil end
  local st, mid, u, e, op, dl, ch, fin, tail, sp, bs = match(text,
    '^(%u+) ((%S+) (%d+) (%S+) %d+ %d+ %d+ (%d+) %d+) (%-?%d+) (%-?%d+) ((%S+) ?(.*))$')
  local scopes = LISTS[bs]
  if scopes == nil then
    scopes = {}
    if bs ~= '' then scopes = split(bs, ',') end
    LISTS[bs] = scopes
  end
  e, dl = tonumber(e), tonumber(dl)
  return setmetatable({id = rid, st = st, u = u, e = e, op = op, dl = dl, ch = ch, fin = fin, sp = sp, bs = scopes,
                       mid = mid, tail = tail, e0 = e, dl0 = dl}, REC_MORE)
end

-- Write the record, and a further (field, value) of the reservation, in one HSET.
local function save_rec(rec, field, value)
  local text
  if rec.mid and rec.e == rec.e0 and rec.dl == rec.dl0 and (rawget(rec, 'x0') == nil or
      (rec.x == rec.x0 and rec.n == rec.n0)) then
    text = rec.st .. ' ' .. rec.mid .. ' ' .. I(rec.ch) .. ' ' .. I(rec.fin) .. ' ' .. rec.tail
  else
    text = fmt('%s %s %d %s %s %d %d %d %d %d %d %s %s', rec.st, rec.u, rec.e, rec.op, rec.c0, rec.x, rec.g, rec.dl,
      rec.n, rec.ch, rec.fin, rec.sp, concat(rec.bs, ','))
  end
  hash_set(HR, rec.id, text)
  if field then hash_set(HR, field, value) end
end

local function finalize(rec, status, field, value)
  rec.st = status
  rec.fin = NOW
  save_rec(rec, field, value)
  zset_put(ZDUE, rec.id, false)
  zset_put(ZFIN, rec.id, NOW)
end

local function expire_rec(rec)
  local budgets = load_budgets(rec.bs, rec.u)
  for _, b in ipairs(budgets) do b.r = b.r - rec.e end
  save_budgets(budgets)
  finalize(rec, 'EXPIRED')
  emit('expired', rec.sp, rec.u, rec.e, rec.id)
end

-- Expire up to `limit` ACTIVE reservations whose deadline has passed; returns how many, and whether
-- that was every overdue one.
local function expire_due(limit)
  if limit <= 0 then return 0, false end
  zset_flush(ZDUE)
  local due = rcall('ZRANGEBYSCORE', KDUE, '-inf', '(' .. NOW_S, 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    local rec = load_rec(rid)
    if rec and rec.st == 'ACTIVE' then
      expire_rec(rec)
      n = n + 1
    else
      zset_put(ZDUE, rid, false)
    end
  end
  return n, #due < limit
end

-- Every write operation first expires overdue holds. NOW is one instant for the whole batch and no
-- operation moves a deadline to before it, so once nothing is left overdue the rest of the batch skips this.
local none_due = false
local function expire_overdue()
  if none_due then return end
  local _, all = expire_due(SWEEP)
  none_due = all
end

-- --- idempotency ------------------------------------------------------------------------------------
-- The stored answer for this key: nil, its text, or a mismatch failure.
local function replay(op, key, hash)
  local stored = rcall('GET', KI)
  if not stored then return nil end
  local nl = find(stored, '\n', 1, true)
  if sub(stored, 1, nl - 1) ~= hash then
    return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. q(key) .. ' was already used for a different ' ..
      op .. ' request', {idempotency_key = key})
  end
  return sub(stored, nl + 1)
end

local function joined(reply, from, to)
  local parts = {}
  for i = from, to do
    local v = reply[i]
    if v == false then v = '' end
    parts[#parts + 1] = v
  end
  return concat(parts, SEP)
end

-- The replay of a stored answer whose last field lists its budgeted scopes, with today's balances.
local function replayed(prior, unit)
  local budgeted = match(prior, '([^\31]*)$')
  local list = {}
  if budgeted ~= '' then list = split(budgeted, ',') end
  return push_balances({'replay', prior, NOW_S}, load_budgets(list, unit))
end

local function remember(hash, answer)
  rcall('SET', KI, hash .. '\n' .. answer, 'PX', RETAIN)
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
  return out
end

local LIST_CAPS = {tool_denylist = true, tool_allowlist = true}

-- Operator caps of several scopes combined (strictest number, deny lists add up, allow lists intersect),
-- as a Lua table, or nil when no scope has caps.
local function merge_caps(budgets)
  local m, any = {}, false
  for _, b in ipairs(budgets) do
    if b.c ~= '' then
      for k, v in pairs(cjson.decode(b.c)) do
        if v ~= cjson.null then
          if m[k] == nil then
            if LIST_CAPS[k] then
              local copy = {}
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
            m[k] = max(m[k], v)
          else
            m[k] = min(m[k], v)
          end
        end
      end
    end
  end
  if any then return m end
  return nil
end

local function caps_json(caps)
  if caps == nil then return false end
  local parts = {}
  for k, v in pairs(caps) do
    local text
    if LIST_CAPS[k] then
      local items = {}
      for i, x in ipairs(v) do items[i] = q(x) end
      text = '[' .. concat(items, ',') .. ']'
    elseif type(v) == 'number' and v == floor(v) then
      text = I(v)
    else
      text = cjson.encode(v)
    end
    parts[#parts + 1] = q(k) .. ':' .. text
  end
  return '{' .. concat(parts, ',') .. '}'
end

-- floor(x * 10^6 / d) exactly, keeping every intermediate below 2^53 (d > 0).
local function per_million(x, d)
  local neg = x < 0
  if neg then x = -x end
  local quot = floor(x / d)
  local r = x - quot * d
  for _ = 1, 6 do
    r = r * 10
    local digit = floor(r / d)
    quot = quot * 10 + digit
    r = r - digit * d
  end
  if neg then
    if r > 0 then return -(quot + 1) end
    return -quot
  end
  return quot
end

-- soft: nil or {min, fixed, apm|nil}
local function evaluate(budgets, estimate, soft)
  local n, caps = #budgets, nil
  for i = 1, n do
    local b = budgets[i]
    if b.st == 'CLOSED' or b.st == 'FROZEN' or b.x or b.d > 0 then
      return {decision = 'DENY', reason = hard_denial(b), scope = b.scope, remaining = rem(b)}
    end
    if b.c ~= '' then caps = true end
  end
  if caps then caps = merge_caps(budgets) end -- nil when no budget has caps
  if n == 0 then return {decision = 'ALLOW', amount = estimate} end
  local tight = budgets[1]
  local left = rem(tight)
  for i = 2, n do
    local r = rem(budgets[i])
    if r < left then tight, left = budgets[i], r end
  end
  if left >= estimate then
    return {decision = caps and 'ALLOW_WITH_CAPS' or 'ALLOW', amount = estimate, scope = tight.scope,
            remaining = left, caps = caps}
  end
  if soft and left >= max(soft[1], 1) then
    caps = caps or {}
    if soft[3] then
      local tokens = max(0, per_million(left - soft[2], soft[3]))
      if caps.max_tokens == nil or tokens < caps.max_tokens then caps.max_tokens = tokens end
    end
    return {decision = 'ALLOW_WITH_CAPS', amount = left, scope = tight.scope, remaining = left, caps = caps}
  end
  return {decision = 'DENY', reason = 'BUDGET_EXCEEDED', scope = tight.scope, remaining = left}
end

-- Turn a hold of `held` into a charge of `actual`; returns charged and flagged scopes, or nil and a failure.
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
      local details = {}
      if worst then details = {scope = worst.scope, remaining = rem(worst)} end
      return nil, fail('BUDGET_EXCEEDED', message, details)
    end
    for _, b in ipairs(budgets) do
      b.r = b.r - held
      b.s = b.s + actual
    end
    return actual, {}
  end
  if policy == 'ALLOW_IF_AVAILABLE' then
    local available = delta
    for i, b in ipairs(budgets) do
      local r = max(rem(b), 0)
      if i == 1 or r < available then available = r end
    end
    local extra = min(delta, available)
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
  local flagged = {}
  local record_all = policy == 'RECORD_ALL' -- no overdraft limit; the uncovered part is debt, over-limit
  for i, b in ipairs(budgets) do
    local covered = min(delta, max(rem(b), 0))
    local shortfall = delta - covered
    if record_all then
      if shortfall > 0 and not b.x then flagged[#flagged + 1] = b.scope end
    elseif shortfall > 0 and b.d + shortfall > b.o then
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
    if record_all and plan[i][2] > 0 then b.x = true end
  end
  return actual, flagged
end

-- --- shared by reserve, decide and event ------------------------------------------------------------
-- Budgets at `scopes` in `unit` (mine) and, only when there are none, in every unit (all): the other
-- units matter only to tell "no budget" from "budgets in another unit".
local function budgets_for(scopes, unit)
  local mine = load_budgets(scopes, unit)
  if #mine > 0 then return mine, mine end
  return load_budgets(scopes, nil), mine
end

local function unit_mismatch(all, mine, unit, scopes, allow_unbudgeted)
  if #all > 0 and #mine == 0 and not allow_unbudgeted then
    local set = {}
    for _, b in ipairs(all) do set[b.unit] = true end
    local units = sorted_keys(set)
    local quoted = {}
    for i, u in ipairs(units) do quoted[i] = q(u) end
    return fail('UNIT_MISMATCH', 'no budget in ' .. unit .. ' for ' .. scopes[#scopes] ..
      '; budgets there are in ' .. concat(units, ', '),
      {scope = all[#all].scope, requested_unit = unit, expected_units = {'[' .. concat(quoted, ',') .. ']'}})
  end
  return nil
end

-- Settlement target: the live reservation, or nil and the reply (a replay or a failure).
local function settle_target(op, rid, key, hash)
  local rec = load_rec(rid)
  if not rec then
    return nil, fail('NOT_FOUND', 'reservation ' .. q(rid) .. ' not found', {reservation_id = rid})
  end
  if rec.st ~= 'ACTIVE' and rec.st ~= 'EXPIRED' then
    local stored = hash_get(HR, rid .. '|k')
    if stored then
      -- "op\nhash\n<key length>\n<key><answer>": the key may hold any character
      local sop, shash, len, rest = match(stored, '^(%a+)\n([^\n]*)\n(%d+)\n(.*)$')
      len = tonumber(len)
      if sub(rest, 1, len) == key then
        if sop ~= op or shash ~= hash then
          return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. q(key) ..
            ' was already used for a different ' .. sop .. ' request', {idempotency_key = key})
        end
        return nil, push_balances({'replay', sub(rest, len + 1), NOW_S}, load_budgets(rec.bs, rec.u))
      end
    end
  end
  if rec.st == 'EXPIRED' then
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. rid .. ' expired', {reservation_id = rid})
  end
  if rec.st ~= 'ACTIVE' then
    return nil, fail('RESERVATION_FINALIZED', 'reservation ' .. rid .. ' is already ' .. rec.st,
      {reservation_id = rid, status = rec.st})
  end
  if NOW > rec.dl then
    expire_rec(rec)
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. rid .. ' expired at ' .. I(rec.x) ..
      ' (+' .. I(rec.g) .. ' ms grace)', {reservation_id = rid})
  end
  return rec
end

local function settled(rec, status, charged, op, key, hash, answer)
  rec.ch = charged
  finalize(rec, status, rec.id .. '|k', op .. '\n' .. hash .. '\n' .. I(#key) .. '\n' .. key .. answer)
end

local OPS = {}

-- The fields of an operation: its first HEAD (0, 1 or 2) fields are its own (ids, hashes); the rest is most
-- often the same for many operations of a batch, so it is split once per batch and the table shared (HEAD
-- is set by the operation's section). Shared tables are never changed but for their head, so what an
-- operation derives from the rest alone may be kept in them under a name (F.scopes).
local HEAD = 0
local TAILS, LAST_TAIL, LAST_F = {}, nil, nil
local function fields_of(joined)
  if HEAD == 0 then return split(joined, SEP) end
  local j = find(joined, SEP, 1, true)
  if not j then return split(joined, SEP) end
  local h1, h2, at = sub(joined, 1, j - 1), nil, j + 1
  if HEAD == 2 then
    j = find(joined, SEP, at, true)
    if not j then return split(joined, SEP) end
    h2, at = sub(joined, at, j - 1), j + 1
  end
  local f
  if LAST_TAIL and #joined - at + 1 == #LAST_TAIL and find(joined, LAST_TAIL, at, true) == at then
    f = LAST_F -- the same rest as the operation before: no new string to make (and hash) for it
  else
    local tail = sub(joined, at)
    f = TAILS[tail]
    if f == nil then
      f = split(tail, SEP)
      for i = #f, 1, -1 do f[i + HEAD] = f[i] end
      TAILS[tail] = f
    end
    LAST_TAIL, LAST_F = tail, f
  end
  f[1] = h1
  if HEAD == 2 then f[2] = h2 end
  return f
end

local function raised(err)
  if type(err) == 'table' then err = err.err end
  return {'raise', tostring(err)}
end

-- Run the batch in ARGV (four arguments per operation) with `op`; one reply entry per operation. Then
-- write back the cache, whatever the operations answered: an operation that raised keeps the writes it made
-- before, as it would without the cache. Should that fail, no answer can be trusted (a refusal too may
-- rest on a write that did not happen): every caller gets the error.
local function run_batch(op)
  local out = {}
  for i = 3, #ARGV, 4 do
    local ki = ARGV[i]
    KI, KEY, F, TEXT = ki == '1' and KB or KEYS[tonumber(ki)], ARGV[i + 1], fields_of(ARGV[i + 2]), ARGV[i + 3]
    local ok, reply = pcall(op)
    if not ok then reply = raised(reply) end
    if reply[1] == 'err' or reply[1] == 'raise' then DEC = {} end -- it may have changed budgets it did not save
    out[#out + 1] = reply
  end
  local err = flush()
  if err ~= nil then
    for i = 1, #out do out[i] = raised(err) end
  end
  return out
end
--@@ prelude-end

--@@ reserve
-- F: hash, rid, unit, estimate, ttl, grace, policy, dry_run, allow_unbudgeted, soft_min, soft_fixed, soft_apm,
-- subject JSON, action JSON, metadata JSON, scopes…
-- Reply: {"reserve", decision, reason, scope, remaining, caps JSON, dry_run, rid, amount, expires_at,
--         ttl, budgeted scopes, balances…}; a replay: {"replay", stored reply, now, balances…}.
-- The decision on a reserve at `scopes` and the budgets it counted, or nil, nil and a failure.
local function look(scopes, unit, allow_unbudgeted, estimate, soft)
  local all, mine = budgets_for(scopes, unit)
  if #all == 0 and not allow_unbudgeted then
    return {decision = 'DENY', reason = 'BUDGET_NOT_FOUND', scope = scopes[#scopes]}, {}
  end
  local bad = unit_mismatch(all, mine, unit, scopes, allow_unbudgeted)
  if bad then return nil, nil, bad end
  return evaluate(mine, estimate, soft), mine
end

HEAD = 2
OPS.reserve = function(decide_only)
  local key, hash, rid, unit = KEY, F[1], F[2], F[3]
  local nums = F.nums
  if nums == nil then
    nums = {tonumber(F[4]), tonumber(F[5]), tonumber(F[6])}
    F.nums = nums
  end
  local estimate, ttl, grace, policy = nums[1], nums[2], nums[3], F[7]
  local dry_run, allow_unbudgeted = F[8] == '1', F[9] == '1'
  local soft = nil
  if F[10] ~= '' then soft = {tonumber(F[10]), tonumber(F[11]), num(F[12])} end
  local scopes = F.scopes
  if scopes == nil then
    scopes = {}
    for i = 16, #F do scopes[#scopes + 1] = F[i] end
    F.scopes = scopes
  end
  local path = scopes[#scopes]

  if not decide_only then
    expire_overdue()
    if hash ~= '' then
      local prior, bad = replay('reserve', key, hash)
      if bad then return bad end
      if prior then return replayed(prior, unit) end
    end
  end

  local ev, budgets, bad = look(scopes, unit, allow_unbudgeted, estimate, soft)
  if bad then return bad end
  if not decide_only and ev.reason == 'BUDGET_EXCEEDED' and expire_due(1000) > 0 then
    -- overdue holds were still counted; look again without them
    ev, budgets, bad = look(scopes, unit, allow_unbudgeted, estimate, soft)
    if bad then return bad end
  end
  local caps = caps_json(ev.caps)
  -- (the trailing nils make room for the balances of three budgets: the table need not grow)
  local reply = {'reserve', ev.decision, ev.reason or false, ev.scope or false, ev.remaining and I(ev.remaining) or false,
                 caps, dry_run and '1' or '0', false, false, false, false, '', nil, nil, nil, nil, nil, nil}
  if decide_only then return push_balances(reply, budgets) end
  if dry_run or ev.decision == 'DENY' then
    local kind = 'denied'
    if dry_run then kind = (ev.decision == 'DENY') and 'would_deny' or 'would_allow' end
    local info = '{"subject":' .. F[13] .. ',"action":' .. F[14] .. ',"key":' .. q(key) .. ',"remaining":' ..
      (ev.remaining and I(ev.remaining) or 'null')
    if caps and caps ~= '{}' then info = info .. ',"caps":' .. caps end
    emit(kind, ev.scope or path, unit, estimate, nil, ev.reason, info .. '}')
    if dry_run and hash ~= '' then remember(hash, joined(reply, 2, #reply)) end
    return push_balances(reply, budgets)
  end
  for _, b in ipairs(budgets) do b.r = b.r + ev.amount end
  save_budgets(budgets)
  local expires = NOW + ttl
  local budgeted = {}
  for i, b in ipairs(budgets) do budgeted[i] = b.scope end
  local amount_s, expires_s, budgeted_s = I(ev.amount), I(expires), concat(budgeted, ',')
  -- the record, as save_rec would write {ACTIVE, unit, amount, policy, now, expires, grace, deadline, 0, -1, -1,
  -- path, budgeted}
  hash_set(HR, rid, 'ACTIVE ' .. unit .. ' ' .. amount_s .. ' ' .. policy .. ' ' .. NOW_S .. ' ' .. expires_s .. ' ' ..
    I(grace) .. ' ' .. I(expires + grace) .. ' 0 -1 -1 ' .. path .. ' ' .. budgeted_s)
  local static = F.static -- the static JSON after the key
  if static == nil then
    local quoted = {}
    for i, s in ipairs(scopes) do quoted[i] = q(s) end
    static = ',"subject":' .. F[13] .. ',"action":' .. F[14] .. ',"affected_scopes":[' .. concat(quoted, ',') ..
      '],"metadata":' .. (F[15] ~= '' and F[15] or 'null') .. '}'
    F.static = static
  end
  hash_set(HR, rid .. '|s', '{"idempotency_key":' .. q(key) .. static)
  local data = nil
  if caps and caps ~= '{}' then
    hash_set(HR, rid .. '|c', caps)
    data = '{"decision":' .. q(ev.decision) .. ',"caps":' .. caps .. '}'
  end
  zset_put(ZDUE, rid, expires + grace)
  zset_put(ZIDS, rid, NOW)
  emit('reserved', path, unit, ev.amount, rid, nil, data)
  reply[8], reply[9], reply[10], reply[11], reply[12] = rid, amount_s, expires_s, I(ttl), budgeted_s
  if hash ~= '' then remember(hash, joined(reply, 2, #reply)) end
  return push_balances(reply, budgets)
end

--@@ decide
--@include reserve
OPS.decide = function() return OPS.reserve(true) end

--@@ commit
-- F: rid, hash, unit, actual, metrics JSON, metadata JSON.
-- Reply: {"commit", charged, released, balances…}; a replay: {"replay", stored reply, now, balances…}.
HEAD = 2
OPS.commit = function()
  local rid, key, hash, unit, actual = F[1], KEY, F[2], F[3], F.actual
  if actual == nil then
    actual = tonumber(F[4])
    F.actual = actual
  end
  expire_overdue()
  local rec, out = settle_target('commit', rid, key, hash)
  if not rec then return out end
  if unit ~= rec.u then
    return fail('UNIT_MISMATCH', 'commit in ' .. unit .. ' for a reservation in ' .. rec.u,
      {requested_unit = unit, expected_units = {'[' .. q(rec.u) .. ']'}})
  end
  local budgets = load_budgets(rec.bs, rec.u)
  local charged, flagged = settle(budgets, rec.e, actual, rec.op, true)
  if not charged then return flagged end
  save_budgets(budgets)
  local released = max(rec.e - actual, 0)
  local reply = {'commit', I(charged), I(released), nil, nil, nil, nil, nil, nil} -- room for three balances
  settled(rec, 'COMMITTED', charged, 'commit', key, hash, reply[2] .. SEP .. reply[3])
  local over, metrics, metadata = '', '', ''
  if #flagged > 0 then
    local quoted = {}
    for i, s in ipairs(flagged) do quoted[i] = q(s) end
    over = ',"over_limit":[' .. concat(quoted, ',') .. ']'
  end
  if F[5] ~= '' then metrics = ',"metrics":' .. F[5] end
  if F[6] ~= '' then metadata = ',"metadata":' .. F[6] end
  emit('committed', rec.sp, rec.u, charged, rid, nil,
    '{"actual":' .. I(actual) .. ',"released":' .. I(released) .. over .. metrics .. metadata .. '}')
  for _, scope in ipairs(flagged) do emit('over_limit', scope, rec.u, nil, rid) end
  return push_balances(reply, budgets)
end

--@@ release
-- F: rid, hash; TEXT: reason. Reply: {"release", released, balances…} or a replay.
OPS.release = function()
  local rid, key, hash, reason = F[1], KEY, F[2], TEXT
  expire_overdue()
  local rec, out = settle_target('release', rid, key, hash)
  if not rec then return out end
  local budgets = load_budgets(rec.bs, rec.u)
  for _, b in ipairs(budgets) do b.r = b.r - rec.e end
  save_budgets(budgets)
  local reply = {'release', I(rec.e)}
  settled(rec, 'RELEASED', -1, 'release', key, hash, reply[2])
  local data = nil
  if reason ~= '' then data = '{"reason":' .. q(reason) .. '}' end
  emit('released', rec.sp, rec.u, rec.e, rid, nil, data)
  return push_balances(reply, budgets)
end

--@@ extend
-- F: rid, hash, extend_by_ms, max_extensions.
-- Reply: {"extend", expires_at, now, balances…}; a replay: {"replay", expires_at, now, balances…}.
HEAD = 2
OPS.extend = function()
  local rid, key, hash, by, max_ext = F[1], KEY, F[2], tonumber(F[3]), num(F[4])
  expire_overdue()
  local rec = load_rec(rid)
  if not rec then
    return fail('NOT_FOUND', 'reservation ' .. q(rid) .. ' not found', {reservation_id = rid})
  end
  local prior, bad = replay('extend', key, hash)
  if bad then return bad end
  if prior then return push_balances({'replay', prior, NOW_S}, load_budgets(rec.bs, rec.u)) end
  if rec.st == 'EXPIRED' or (rec.st == 'ACTIVE' and NOW > rec.x) then
    if rec.st == 'ACTIVE' and NOW > rec.dl then
      expire_rec(rec)
      return fail('RESERVATION_EXPIRED', 'reservation ' .. rid .. ' expired')
    end
    return fail('RESERVATION_EXPIRED', 'reservation ' .. rid ..
      ' passed its expiry; in the grace period only commit or release', {reservation_id = rid})
  end
  if rec.st ~= 'ACTIVE' then
    return fail('RESERVATION_FINALIZED', 'reservation ' .. rid .. ' is already ' .. rec.st,
      {reservation_id = rid, status = rec.st})
  end
  if max_ext and rec.n >= max_ext then
    return fail('MAX_EXTENSIONS_EXCEEDED', 'reservation ' .. rid .. ' was already extended ' .. I(rec.n) .. ' times',
      {reservation_id = rid})
  end
  rec.x = rec.x + by
  rec.dl = rec.x + rec.g
  rec.n = rec.n + 1
  save_rec(rec)
  zset_put(ZDUE, rid, rec.dl)
  emit('extended', rec.sp, rec.u, nil, rid, nil, '{"expires_at_ms":' .. I(rec.x) .. ',"extend_by_ms":' .. I(by) .. '}')
  local reply = {'extend', I(rec.x), NOW_S}
  remember(hash, reply[2])
  return push_balances(reply, load_budgets(rec.bs, rec.u))
end

--@@ event
-- F: hash, unit, actual, policy, allow_unbudgeted, subject, action, metrics, metadata, scopes…
-- Reply: {"event", stream id, charged, budgeted scopes, balances…} or a replay.
HEAD = 1
OPS.event = function()
  local key, hash, unit, actual, policy = KEY, F[1], F[2], tonumber(F[3]), F[4]
  local allow_unbudgeted = F[5] == '1'
  local scopes = F.scopes
  if scopes == nil then
    scopes = {}
    for i = 10, #F do scopes[#scopes + 1] = F[i] end
    F.scopes = scopes
  end
  local path = scopes[#scopes]
  expire_overdue()
  local prior, bad = replay('event', key, hash)
  if bad then return bad end
  if prior then return replayed(prior, unit) end
  local all, budgets = budgets_for(scopes, unit)
  if #all == 0 and not allow_unbudgeted then
    return fail('NOT_FOUND', 'no budget for ' .. path .. ' or its parents', {scope = path})
  end
  bad = unit_mismatch(all, budgets, unit, scopes, allow_unbudgeted)
  if bad then return bad end
  for _, b in ipairs(budgets) do
    if b.st == 'CLOSED' then return fail('BUDGET_CLOSED', 'budget ' .. b.scope .. ' is closed', {scope = b.scope}) end
    if b.st == 'FROZEN' then return fail('BUDGET_FROZEN', 'budget ' .. b.scope .. ' is frozen', {scope = b.scope}) end
  end
  local charged, flagged = settle(budgets, 0, actual, policy, false)
  if not charged then return flagged end
  save_budgets(budgets)
  local names, quoted, flags = {}, {}, {}
  for i, b in ipairs(budgets) do names[i] = b.scope; quoted[i] = q(b.scope) end
  for i, s in ipairs(flagged) do flags[i] = q(s) end
  local data = '{"scopes":[' .. concat(quoted, ',') .. '],"actual":' .. I(actual) .. ',"subject":' .. F[6] ..
    ',"action":' .. F[7] .. ',"over_limit":[' .. concat(flags, ',') .. '],"metrics":' ..
    (F[8] ~= '' and F[8] or 'null') .. ',"metadata":' .. (F[9] ~= '' and F[9] or 'null') ..
    ',"key":' .. q(key) .. '}'
  local id = emit('debited', path, unit, charged, nil, nil, data)
  for _, scope in ipairs(flagged) do emit('over_limit', scope, unit) end
  local reply = {'event', id, I(charged), concat(names, ',')}
  remember(hash, joined(reply, 2, 4))
  return push_balances(reply, budgets)
end

--@@ budget
-- F: op, scope, unit, amount, overdraft_limit, caps JSON ("" = not given). Reply: {"budget", field, text}.
OPS.budget = function()
  local op, scope, unit = F[1], F[2], F[3]
  local amount, overdraft, caps = num(F[4]), num(F[5]), opt(F[6])
  expire_overdue()
  local b = load_budgets({scope}, unit)[1]
  local data = '{}'
  if op == 'set' then
    if not b then
      b = {scope = scope, unit = unit, f = scope .. '|' .. unit, a = amount, s = 0, r = 0, d = 0, o = overdraft or 0,
           x = false, st = 'ACTIVE', c = (caps and caps ~= '{}') and caps or ''}
    else
      data = '{"previous_allocated":' .. I(b.a) .. '}'
      b.a = amount
      if overdraft then b.o = overdraft end
      if caps then b.c = (caps ~= '{}') and caps or '' end
      if b.d > b.o then
        b.x = true
      elseif rem(b) >= 0 then
        b.x = false
      end
    end
    save_budgets({b})
    emit('budget_set', scope, unit, amount, nil, nil, data)
    return {'budget', b.f, b.text}
  end
  if not b then return fail('NOT_FOUND', 'no ' .. unit .. ' budget at ' .. scope, {scope = scope}) end
  if b.st == 'CLOSED' then return fail('BUDGET_CLOSED', 'budget ' .. b.scope .. ' is closed', {scope = b.scope}) end
  local kind, amt = nil, nil
  if op == 'fund' then
    if b.a + amount > MAX_EXACT then
      return fail('INVALID_REQUEST', 'the allocation would pass what the Redis store keeps exactly (2^53 - 1)')
    end
    local repaid = min(b.d, amount)
    b.d = b.d - repaid
    b.s = b.s + repaid
    b.a = b.a + amount
    if b.d == 0 and rem(b) >= 0 then b.x = false end
    data = '{"debt_repaid":' .. I(repaid) .. '}'
    kind, amt = 'funded', amount
  else
    b.st = ({freeze = 'FROZEN', unfreeze = 'ACTIVE', close = 'CLOSED'})[op]
    kind = ({freeze = 'frozen', unfreeze = 'unfrozen', close = 'closed'})[op]
  end
  save_budgets({b})
  emit(kind, scope, unit, amt, nil, nil, data)
  return {'budget', b.f, b.text}
end

--@@ sweep
-- F: limit. Reply: {"sweep", expired, pruned}.
OPS.sweep = function()
  local n = expire_due(tonumber(F[1]))
  -- Finalized reservations older than the retention go, with all their fields and their listing entry;
  -- straight in Redis, after what is pending, and the cache forgets the fields.
  local err = flush()
  if err ~= nil then error(err) end
  local old = rcall('ZRANGEBYSCORE', KFIN, '-inf', '(' .. I(NOW - RETAIN), 'LIMIT', 0, 1000)
  for _, rid in ipairs(old) do
    local fields = {rid, rid .. '|s', rid .. '|c', rid .. '|k'}
    rcall('HDEL', KR, unpack(fields))
    for _, f in ipairs(fields) do HR.val[f] = nil end
    rcall('ZREM', KIDS, rid)
    rcall('ZREM', KFIN, rid)
  end
  return {'sweep', n, #old}
end
