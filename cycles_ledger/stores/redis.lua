-- Cycles ledger on Redis: the ledger's operations as Lua scripts, one per operation. They apply the rules of
-- cycles_ledger/rules.py in the order cycles_ledger/operations.py applies them, and are checked against that
-- Python engine by rule vectors (tests/integration/test_rule_vectors.py): same answers, same errors, same
-- balances, reservations and events. The sections below mirror the Python by name:
--   1. prelude      keys, arguments and text helpers
--   2. cache        the write-back cache of the hashes and zsets a script call reads and writes
--   3. formats      budgets, reservation records, holds in other units, events, idempotency records
--   4. steps        what every operation shares (operations.py's _expire, expire_due, _replayed, …)
--   5. rules        cycles_ledger/rules.py in four sections: lookup (budgets_by_unit), evaluate
--                   (evaluate_reserve, evaluate_units), settle (settle, settle_verdict, extend_verdict), admin
--                   (fund, set_allocation, change_status, check_debit), each with the steps around it
--   6. operations   one section per script: reserve, decide, commit, release, extend, event, note, budget, sweep
-- The client builds each operation's script from sections 1-4 (everything above the prelude-end marker),
-- the sections the operation's section includes (and those they include), and the operation's section.
-- A script call runs its whole chunk, defining every function in it, so a script holds only what it runs.
--
-- One call of a script runs a batch of operations of its kind, in order, each as if it were alone; the
-- client sends the calls of one loop tick that share a tenant and an operation this way (one EVALSHA
-- instead of one each, and the shared setup below runs once per batch).
--
-- Every script works on the keys of ONE top-level scope (its hash tag), all passed in KEYS:
--   KEYS[1] budgets hash       "<scope>|<unit>" -> "allocated spent reserved debt overdraft_limit
--                                                   is_over_limit(0|1) STATUS[ ~time][ caps JSON]"
--                              where time (a budget's period, rate limits and alerts) is
--                              "period;start;end;limits;alerts;fired;[rate_fired;]window", each part ''
--                              when none: period "daily:<tz>" (weekly, monthly) or "<every_ms>+<anchor_ms>",
--                              limits "amount:window_ms:t|f[:alert_at],…" (throttle or freeze), alerts and
--                              fired "50,80", rate_fired (only once a burn-rate alert fired) when each limit's
--                              alert last fired, "ms,,ms" ('' never), window the spend log's sums as of a
--                              time, "as_of:sum:sum…" (one per limit)
--   KEYS[2] reservations hash  "<rid>"   -> "STATUS unit estimate policy created expires grace deadline
--                                            extensions charged(-1) finalized(-1) scope_path scope,scope,…[ hold…]"
--                                            (policy ends in ":w" when the hold is in some budget's spend log)
--                                            where each hold in another unit is "UNIT|amount|charged(-1)|scope,…"
--                              "<rid>|s" -> static JSON from the client (subject, action, key, metadata)
--                              "<rid>|c" -> caps JSON (when the decision had caps)
--                              "<rid>|k" -> "op\nhash\n<key length>\n<key><answer>" once settled
--   KEYS[3] due zset           rid scored by deadline (expires_at + grace), ACTIVE only
--   KEYS[4] events stream      one entry per event, trimmed to about the configured length
--   KEYS[5] finalized zset     rid scored by finalization time (pruned after the retention)
--   KEYS[6] ids zset           every rid scored by creation time (for listing)
--   KEYS[7] periods zset       "<scope>|<unit>" of every budget with a period, scored by its period's end
--   KEYS[8] boundaries hash    calendar period ("daily:Europe/Paris") -> its coming boundaries "ms,ms,…"
--                              (written by the client, which has the time-zone database; shared by the
--                              tenant's budgets with that period)
--   KEYS[9…] idempotency keys  "<payload hash>\n<answer>" with a TTL (reserve, extend, event)
-- and, not in KEYS but in the same slot (named after KEYS[1]): "<prefix>:{tag}:w:<scope>|<unit>", the spend
-- log of a rate-limited budget, a zset of "<ref> <amount>" (ref: a reservation id before its "@", or "e" and
-- a debit's event id) scored by the time of the hold or debit. A budget's sums per limit (in its text) are
-- brought up to date from the entries that left or entered each window since, so a check reads few entries.
-- ARGV: [1] now in ms, or "" for Redis TIME; [2] "<overdue holds to expire first>\31<event stream length>\31
--       <retention of idempotency records and finalized reservations, ms>"; then four per operation:
--       the index in KEYS of its idempotency key (1 when it has none), the idempotency key (any text), the
--       operation's fields joined by \31 (JSON in them escapes control characters), free text (a release
--       reason). Few arguments keep the client's command packing cheap.
--
-- The reply is one entry per operation, in order. Each is a flat array the client turns into the same
-- dict the Python engine returns; answers kept for replay are those arrays joined by \31. Lua numbers
-- are doubles: the client refuses amounts above 2^53 - 1 and integers are printed with %d. An operation
-- never raises after its first write: a refusal is the entry {"err", CODE, message, details JSON}, so
-- the writes made on purpose (expiring overdue holds) stay and nothing else was written. A Lua error
-- (a bug) is caught per operation and comes back as {"raise", message}, for that operation's caller only.
-- {"bounds", period}: the operation met a calendar period whose stored boundaries do not reach now and did
-- nothing else (but its expiry of overdue holds); the client stores new ones and runs it again.
-- The operations' writes to the two hashes and the three zsets are gathered and made once, at the end of
-- the script call (see the write-back cache); events and idempotency records are written at once.
--
-- Names: tables use the Python engine's field names (a field name costs nothing at run time); the stored
-- texts keep their compact formats.

-- ═══ 1. prelude ═══════════════════════════════════════════════════════════════════════════════════════
local BUDGETS_KEY, RESERVATIONS_KEY, DUE_KEY, EVENTS_KEY, FINALIZED_KEY, IDS_KEY =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- Globals read often, as locals (a global is a table lookup each time). Only those: every function that
-- uses a local of this chunk looks it up among all of them when a script call defines the function, which
-- costs more than a few global lookups at run time (tostring, type, pairs, pcall, rawget, … stay globals).
local rcall, tonumber, ipairs, unpack = redis.call, tonumber, ipairs, unpack
local max, min, floor, match, gmatch = math.max, math.min, math.floor, string.match, string.gmatch
local fmt, concat, find, sub = string.format, table.concat, string.find, string.sub
-- The current operation's idempotency key name, idempotency key, fields and free text (set by run_batch).
local IDEMPOTENCY_KEY, KEY, F, TEXT
local NOW
if ARGV[1] ~= '' then
  NOW = tonumber(ARGV[1])
else
  local t = rcall('TIME')
  NOW = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
local NOW_S = fmt('%d', NOW)
local MAX_EXACT = 9007199254740991
local UNITS = {'CREDITS', 'RISK_POINTS', 'TOKENS', 'USD_MICROCENTS'} -- sorted, like the Python engine's order
local SEP = '\31'

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
local function optional(s) if s == '' then return nil end return s end
local function number_or_nil(s) if s == nil or s == '' then return nil end return tonumber(s) end
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

-- Python's repr() of a text, as the Python engine puts keys and ids in its messages (ASCII exactly; other
-- characters as they are).
local function pyrepr(s)
  local quote = "'"
  if find(s, "'", 1, true) and not find(s, '"', 1, true) then quote = '"' end
  local escapes = {['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}
  local body = string.gsub(s, '[%c\\' .. quote .. ']', function(c)
    if c == quote then return '\\' .. c end
    return escapes[c] or fmt('\\x%02x', string.byte(c))
  end)
  return quote .. body .. quote
end

-- A refusal: the reply entry {"err", code, message, details JSON}. A detail that is a table {text} is
-- JSON already.
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

local function sorted_keys(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

local SETTINGS = split(ARGV[2], SEP)
local SWEEP_PER_CALL, EVENT_STREAM_LENGTH, RETENTION_MS = tonumber(SETTINGS[1]), SETTINGS[2], tonumber(SETTINGS[3])

-- ═══ 2. cache ═════════════════════════════════════════════════════════════════════════════════════════
-- A script call is atomic, so the states between its operations are seen by no one: the budgets and
-- reservations hashes are read through a cache (field -> stored text, false when absent) and written back,
-- like the changes to the zsets, once at the end of the batch (run_batch). Only the save helpers change the
-- cache, with finished texts, so an operation that computes and then refuses leaves no trace. Events and
-- idempotency records go straight to Redis. A read of a zset first writes out its pending changes.
local CHUNK = 1000 -- (field, value) or (score, member) pairs per command when writing back
local function new_hash(key) return {key = key, values = {}, dirty = {}, order = {}} end
local BUDGETS, RESERVATIONS = new_hash(BUDGETS_KEY), new_hash(RESERVATIONS_KEY)

local function hash_get(h, field)
  local v = h.values[field]
  if v == nil then
    v = rcall('HGET', h.key, field)
    h.values[field] = v
  end
  return v
end

-- Read the fields not read yet, with one HMGET per CHUNK.
local function hash_fetch(h, fields)
  local values, missing = h.values, nil
  for i = 1, #fields do
    if values[fields[i]] == nil then
      missing = missing or {}
      missing[#missing + 1] = fields[i]
    end
  end
  if missing == nil then return end
  for from = 1, #missing, CHUNK do
    local to = min(from + CHUNK - 1, #missing)
    local got = rcall('HMGET', h.key, unpack(missing, from, to))
    for i = from, to do values[missing[i]] = got[i - from + 1] end
  end
end

local function hash_set(h, field, text)
  if not h.dirty[field] then
    h.dirty[field] = true
    h.order[#h.order + 1] = field
  end
  h.values[field] = text
end

-- `cmd key args…` in commands of at most `per` of the flat list's arguments each.
local function in_chunks(cmd, key, args, per)
  for from = 1, #args, per do
    rcall(cmd, key, unpack(args, from, min(from + per - 1, #args)))
  end
end

local function hash_flush(h)
  local order, values = h.order, h.values
  if #order == 0 then return end
  h.order, h.dirty = {}, {}
  local args = {}
  for _, field in ipairs(order) do
    args[#args + 1] = field
    args[#args + 1] = values[field]
  end
  in_chunks('HSET', h.key, args, 2 * CHUNK)
end

local function new_zset(key) return {key = key, score = {}, order = {}} end
local DUE, FINALIZED, IDS = new_zset(DUE_KEY), new_zset(FINALIZED_KEY), new_zset(IDS_KEY)
-- What time policies share within a script call, in one table (a script call pays for each chunk local its
-- functions capture): the periods zset, the roll-overs not written yet ({budget, closed period}), the budgets
-- whose period has ended (a set of fields, read once), the time functions once made (section 4).
local TIMED = {periods = new_zset(KEYS[7]), rolled = {}, due = nil, functions = nil}

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
  for _, part in ipairs({{hash_flush, BUDGETS}, {hash_flush, RESERVATIONS}, {zset_flush, DUE},
                         {zset_flush, FINALIZED}, {zset_flush, IDS}, {zset_flush, TIMED.periods}}) do
    local ok, err = pcall(part[1], part[2])
    if not ok and first == nil then first = err end
  end
  return first
end

-- ═══ 3. formats ═══════════════════════════════════════════════════════════════════════════════════════
-- --- budgets ---
-- A budget is a table {scope, unit, field, allocated, spent, reserved, debt, overdraft_limit, is_over_limit,
-- status, caps (JSON text, '' for none), timing (its time text, '' for none; nil once `tm` changed), tm, text}
-- where tm (nil for a budget without time policies) is {period (spec text or nil), period_start, period_end,
-- limits (list of {amount, window, freeze, alert_at}) and limits_text, alerts, fired (lists, or nil),
-- rate_fired (per limit the time its burn-rate alert fired, false never; or nil), win ({as_of, sums}
-- or nil: to be summed again)}. Decoding a text is dear, so a batch keeps the budget of each
-- field it decoded (DECODED[field], good while its text is the field's cached text) and hands the same table
-- out again: operations change budgets in place, then save them, which sets their text. A refusal or an
-- error may leave a changed budget unsaved, so after one the batch forgets them all (run_batch) and decodes
-- the cached texts again.
local DECODED = {}
-- The functions of time policies (made in section 4 on first use: most script calls need none of them).
local TIME

local function decode_budget(scope, unit, text)
  local allocated, spent, reserved, debt, overdraft_limit, over, status, caps =
    match(text, '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%d) (%u+) ?(.*)$')
  local timing, tm = '', nil
  if sub(caps, 1, 1) == '~' then
    local space = find(caps, ' ', 1, true)
    if space then timing, caps = sub(caps, 1, space - 1), sub(caps, space + 1) else timing, caps = caps, '' end
    tm = TIME().decode_timing(timing)
  end
  return {scope = scope, unit = unit, allocated = tonumber(allocated), spent = tonumber(spent),
          reserved = tonumber(reserved), debt = tonumber(debt), overdraft_limit = tonumber(overdraft_limit),
          is_over_limit = over == '1', status = status, caps = caps, timing = timing, tm = tm}
end

-- The text of b, printed as head .. "spent reserved" .. tail where head and tail are kept per field with the
-- values they print (most operations change only spent and reserved).
local AROUND = {}
local function encode_budget(b)
  local timing = b.timing
  if timing == nil then
    timing = TIME().encode_timing(b.tm)
    b.timing = timing
  end
  local h = AROUND[b.field]
  if h == nil or h.allocated ~= b.allocated or h.debt ~= b.debt or h.overdraft_limit ~= b.overdraft_limit or
      h.is_over_limit ~= b.is_over_limit or h.status ~= b.status or h.caps ~= b.caps or h.timing ~= timing then
    local tail = fmt(' %d %d %d %s', b.debt, b.overdraft_limit, b.is_over_limit and 1 or 0, b.status)
    if timing ~= '' then tail = tail .. ' ' .. timing end
    if b.caps ~= '' then tail = tail .. ' ' .. b.caps end
    h = {allocated = b.allocated, debt = b.debt, overdraft_limit = b.overdraft_limit, is_over_limit = b.is_over_limit,
         status = b.status, caps = b.caps, timing = timing, head = fmt('%d ', b.allocated), tail = tail}
    AROUND[b.field] = h
  end
  local text = h.head .. fmt('%d %d', b.spent, b.reserved) .. h.tail
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
    local fields, field_scopes, field_units = {}, {}, {}
    for _, s in ipairs(scopes) do
      for _, u in ipairs(unit and {unit} or UNITS) do
        fields[#fields + 1] = s .. '|' .. u
        field_scopes[#fields], field_units[#fields] = s, u
      end
    end
    got = {fields, field_scopes, field_units}
    per[unit or ''] = got
  end
  return got[1], got[2], got[3]
end

-- Budgets at `scopes` in `unit` (or in every unit), in scope order then unit order (Txn.budgets).
local function load_budgets(scopes, unit)
  local fields, field_scopes, field_units = budget_fields(scopes, unit)
  if #fields == 0 then return {} end
  hash_fetch(BUDGETS, fields)
  local values = BUDGETS.values
  local out = {nil, nil, nil} -- (room for three)
  for i = 1, #fields do
    local field = fields[i]
    local text = values[field]
    if text then
      local b = DECODED[field]
      if b == nil or b.text ~= text then
        b = decode_budget(field_scopes[i], field_units[i], text)
        b.field, b.text = field, text
        DECODED[field] = b
      end
      out[#out + 1] = b
    end
  end
  return out
end

local function save_budgets(budgets)
  for _, b in ipairs(budgets) do
    hash_set(BUDGETS, b.field, encode_budget(b))
    DECODED[b.field] = b
  end
end

local function append(list, more)
  for i = 1, #more do list[#list + 1] = more[i] end
  return list
end

-- Balances go back as pairs of field and stored text; the client parses them like HGETALL output.
local function push_balances(out, budgets)
  for _, b in ipairs(budgets) do
    out[#out + 1] = b.field
    out[#out + 1] = b.text
  end
  return out
end

-- --- lists of scopes ---
-- Lists of scopes by their text (shared: never change one).
local LISTS = {}
local function scope_list(text)
  local scopes = LISTS[text]
  if scopes == nil then
    scopes = {}
    if text ~= '' then scopes = split(text, ',') end
    LISTS[text] = scopes
  end
  return scopes
end

local function quoted_list(list)
  local quoted = {}
  for i, s in ipairs(list) do quoted[i] = q(s) end
  return '[' .. concat(quoted, ',') .. ']'
end

-- --- holds in other units ---
-- A hold is {unit, amount, charged (-1 until charged), scopes}; the holds of a reservation in other units
-- than its own are kept after its budgeted scopes, and go back to the client in replies, as
-- "UNIT|amount|charged|scope,…" each, separated by spaces ('' for none).
local function decode_holds(text)
  local out = {}
  if text == '' then return out end
  for unit, amount, charged, scopes in gmatch(text, '([%u_]+)|(%d+)|(%-?%d+)|(%S*)') do
    out[#out + 1] = {unit = unit, amount = tonumber(amount), charged = tonumber(charged), scopes = scope_list(scopes)}
  end
  return out
end

local function encode_holds(holds)
  local parts = {}
  for i, h in ipairs(holds) do
    parts[i] = h.unit .. '|' .. I(h.amount) .. '|' .. I(h.charged) .. '|' .. concat(h.scopes, ',')
  end
  return concat(parts, ' ')
end

-- {"UNIT": n, …} of the holds, with n their `what` (amount or charged).
local function holds_json(holds, what)
  local parts = {}
  for i, h in ipairs(holds) do parts[i] = q(h.unit) .. ':' .. I(h[what]) end
  return '{' .. concat(parts, ',') .. '}'
end

-- The amounts in other units a command names, "UNIT|amount UNIT|amount" (in the caller's order), as a list
-- of {unit, amount}.
local function decode_amounts(text)
  local out = {}
  for unit, amount in gmatch(text, '([%u_]+)|(%d+)') do out[#out + 1] = {unit = unit, amount = tonumber(amount)} end
  return out
end

-- --- reservations ---
-- A record as a table {id, status, unit, estimate, policy, windowed, deadline, charged, finalized, scope_path,
-- budgeted, holds_text}, plus `mid` and `tail`, its text between the status and `charged` and after
-- `finalized`, kept to write it back around a new status, charged and finalized while the rest is as read
-- (charged and finalized stay as read, text, until set: they are only written). Settling needs few fields,
-- so created, expires, grace and extensions are read from `mid` on first use.
local RECORD_MORE = {__index = function(rec, k)
  if k ~= 'created' and k ~= 'expires' and k ~= 'grace' and k ~= 'extensions' then return nil end
  local created, expires, grace, extensions = match(rawget(rec, 'mid'), '^%S+ %d+ %S+ (%d+) (%d+) (%d+) %d+ (%d+)$')
  expires, extensions = tonumber(expires), tonumber(extensions)
  rawset(rec, 'created', created)
  rawset(rec, 'expires', expires)
  rawset(rec, 'grace', tonumber(grace))
  rawset(rec, 'extensions', extensions)
  rawset(rec, 'expires_as_read', expires)
  rawset(rec, 'extensions_as_read', extensions)
  return rawget(rec, k)
end}

local function load_record(rid)
  local text = hash_get(RESERVATIONS, rid)
  if not text then return nil end
  local status, mid, unit, estimate, policy, windowed, deadline, charged, finalized, tail, scope_path, budgeted,
    holds = match(text,
      '^(%u+) ((%S+) (%d+) ([%u_]+)(%S*) %d+ %d+ %d+ (%d+) %d+) (%-?%d+) (%-?%d+) ((%S+) ?(%S*) ?(.*))$')
  estimate, deadline = tonumber(estimate), tonumber(deadline)
  return setmetatable({id = rid, status = status, unit = unit, estimate = estimate, policy = policy,
                       windowed = windowed ~= '', deadline = deadline, charged = charged, finalized = finalized,
                       scope_path = scope_path, budgeted = scope_list(budgeted), holds_text = holds, mid = mid,
                       tail = tail, estimate_as_read = estimate, deadline_as_read = deadline}, RECORD_MORE)
end

-- The record's holds in other units (decoded on first use; a commit writes their charges into them).
local function other_holds(rec)
  local holds = rawget(rec, 'holds')
  if holds == nil then
    holds = decode_holds(rec.holds_text)
    rec.holds = holds
  end
  return holds
end

-- Write the record, and a further (field, value) of the reservation, in one HSET.
local function save_record(rec, field, value)
  local text
  if rec.tail and rec.estimate == rec.estimate_as_read and rec.deadline == rec.deadline_as_read and
      (rawget(rec, 'expires_as_read') == nil or
       (rec.expires == rec.expires_as_read and rec.extensions == rec.extensions_as_read)) then
    text = rec.status .. ' ' .. rec.mid .. ' ' .. I(rec.charged) .. ' ' .. I(rec.finalized) .. ' ' .. rec.tail
  else
    text = fmt('%s %s %d %s %s %d %d %d %d %d %d %s %s', rec.status, rec.unit, rec.estimate,
      rec.windowed and rec.policy .. ':w' or rec.policy, rec.created,
      rec.expires, rec.grace, rec.deadline, rec.extensions, rec.charged, rec.finalized, rec.scope_path,
      concat(rec.budgeted, ','))
    if rec.holds_text ~= '' then text = text .. ' ' .. rec.holds_text end
  end
  hash_set(RESERVATIONS, rec.id, text)
  if field then hash_set(RESERVATIONS, field, value) end
end

-- --- events ---
-- Periods this operation rolled over wait for its first write (Python writes a roll-over as it loads the
-- budget, and drops it with everything else when the operation then refuses; here a refusal forgets it, in
-- run_batch): the first event writes them first.
local function emit(kind, scope, unit, amount, rid, reason, data)
  if TIMED.rolled[1] then TIME().write_rolls() end
  if scope and unit and amount and rid and not reason then -- reserved, committed, released, expired: no table
    if data then
      return rcall('XADD', EVENTS_KEY, 'MAXLEN', '~', EVENT_STREAM_LENGTH, '*', 'ts', NOW_S, 'type', kind,
        'scope', scope, 'unit', unit, 'amount', I(amount), 'rid', rid, 'data', data)
    end
    return rcall('XADD', EVENTS_KEY, 'MAXLEN', '~', EVENT_STREAM_LENGTH, '*', 'ts', NOW_S, 'type', kind,
      'scope', scope, 'unit', unit, 'amount', I(amount), 'rid', rid)
  end
  local f = {'ts', NOW_S, 'type', kind}
  if scope then f[#f + 1] = 'scope'; f[#f + 1] = scope end
  if unit then f[#f + 1] = 'unit'; f[#f + 1] = unit end
  if amount then f[#f + 1] = 'amount'; f[#f + 1] = I(amount) end
  if rid then f[#f + 1] = 'rid'; f[#f + 1] = rid end
  if reason then f[#f + 1] = 'reason'; f[#f + 1] = reason end
  if data then f[#f + 1] = 'data'; f[#f + 1] = data end
  return rcall('XADD', EVENTS_KEY, 'MAXLEN', '~', EVENT_STREAM_LENGTH, '*', unpack(f))
end

-- --- idempotency records ---
-- The stored answer for this key: nil, its text, or nil and a mismatch failure.
local function replay(op, key, hash)
  local stored = rcall('GET', IDEMPOTENCY_KEY)
  if not stored then return nil end
  local nl = find(stored, '\n', 1, true)
  if sub(stored, 1, nl - 1) ~= hash then
    return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. pyrepr(key) ..
      ' was already used for a different ' .. op .. ' request', {idempotency_key = key})
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

local function remember(hash, answer)
  rcall('SET', IDEMPOTENCY_KEY, hash .. '\n' .. answer, 'PX', RETENTION_MS)
end

-- ═══ 4. steps (shared by every operation, as in cycles_ledger/operations.py) ══════════════════════════
-- (and the few rules of cycles_ledger/rules.py every operation applies)
local function remaining(b) return b.allocated - b.spent - b.reserved - b.debt end

local function hold(budgets, amount)
  for _, b in ipairs(budgets) do b.reserved = b.reserved + amount end
end

local function unhold(budgets, amount)
  for _, b in ipairs(budgets) do b.reserved = b.reserved - amount end
end

-- Holds in no other unit (shared: never changed).
local NO_HOLDS = {}

-- Every unit's budgets of a reservation's holds, its own unit first (for balances; Python: _load_holds).
local function hold_budgets(rec)
  local budgets = load_budgets(rec.budgeted, rec.unit)
  if rec.holds_text == '' then return budgets end
  for _, h in ipairs(other_holds(rec)) do append(budgets, load_budgets(h.scopes, h.unit)) end
  return budgets
end

local function finalize(rec, status, field, value)
  rec.status = status
  rec.finalized = NOW
  save_record(rec, field, value)
  zset_put(DUE, rec.id, false)
  zset_put(FINALIZED, rec.id, NOW)
end

-- --- time: periods, spend logs, alerts (rules.py's time section; operations._load, _after_charge) ---
-- The budgets at `scopes` in `unit`, their periods rolled over first (Python: _load). With unit nil, every
-- unit's budget there whose period has ended is rolled over and nothing is returned. A read (`write` false)
-- sees the rolled state; a write keeps it (TIMED.rolled).
local function load_rolled(scopes, unit, write)
  if unit then
    local budgets = load_budgets(scopes, unit)
    for i = 1, #budgets do
      local tm = budgets[i].tm
      if tm and tm.period_end and tm.period_end <= NOW then TIME().roll(budgets[i], write) end
    end
    return budgets
  end
  local due = TIMED.due
  if due == nil then
    due = {}
    for _, field in ipairs(rcall('ZRANGEBYSCORE', KEYS[7], '-inf', NOW_S)) do due[field] = true end
    TIMED.due = due
  end
  if next(due) ~= nil then TIME().roll_scopes(scopes, write) end
  return nil
end

-- The functions of time policies, made on the first call of TIME() in a script call. A script call defines
-- every function of its chunk, and that is dear (each local a function captures is looked up then), so those
-- only a budget with a period, rate limits or alerts needs are made here, by one function that captures few
-- chunk locals (builtins come from globals).
local function time_functions()
  local rcall, tonumber, ipairs, match, gmatch, concat = redis.call, tonumber, ipairs, string.match, string.gmatch,
    table.concat
  local floor, max = math.floor, math.max
  local PERIODS, BOUNDS_KEY, WINDOW_BASE = TIMED.periods, KEYS[8], string.sub(KEYS[1], 1, -2) .. 'w:'
  local T = {}

  local function numbers(text)
    local out = {}
    for n in gmatch(text, '%-?%d+') do out[#out + 1] = tonumber(n) end
    return out
  end

  local function list_text(list, sep)
    if list == nil then return '' end
    local parts = {}
    for i, n in ipairs(list) do parts[i] = I(n) end
    return concat(parts, sep or ',')
  end
  T.list_text = list_text

  -- Rate limits "amount:window_ms:t|f[:alert_at],…" as a list of {amount, window, freeze, alert_at}.
  local function parse_limits(text)
    local list = {}
    for amount, window, how, at in gmatch(text, '(%d+):(%d+):(%a):?(%d*)') do
      list[#list + 1] = {amount = tonumber(amount), window = tonumber(window), freeze = how == 'f',
                         alert_at = number_or_nil(at)}
    end
    return list
  end

  -- A budget's time text (the budgets hash in the header) as its tm.
  -- (It runs for every such budget a script call reads: one limit and one sum, the usual case, is read
  -- without a loop.)
  function T.decode_timing(text)
    local period, start, stop, limits, alerts, fired, rate_fired, win =
      match(text, '^~([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);(.*)$')
    if period == nil then -- no burn-rate alert has fired (and texts written before there were any)
      period, start, stop, limits, alerts, fired, win =
        match(text, '^~([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);([^;]*);(.*)$')
      rate_fired = ''
    end
    local tm = {period = optional(period), period_start = number_or_nil(start), period_end = number_or_nil(stop),
                limits_text = limits, text = text, win_length = #win}
    if limits ~= '' then
      local amount, window, how = match(limits, '^(%d+):(%d+):(%a)$')
      local list
      if amount then
        list = {{amount = tonumber(amount), window = tonumber(window), freeze = how == 'f'}}
      else
        list = parse_limits(limits)
      end
      tm.limits = list
      if win ~= '' then
        local as_of, sum = match(win, '^(%-?%d+):(%-?%d+)$')
        if as_of then
          if #list == 1 then tm.win = {as_of = tonumber(as_of), sums = {tonumber(sum)}} end
        else
          local sums = numbers(win)
          as_of = table.remove(sums, 1)
          if #sums == #list then tm.win = {as_of = as_of, sums = sums} end
        end
      end
    end
    if alerts ~= '' then tm.alerts = numbers(alerts) end
    if fired ~= '' then tm.fired = numbers(fired) end
    if rate_fired ~= '' then
      local list = {}
      for n in gmatch(rate_fired .. ',', '([^,]*),') do list[#list + 1] = number_or_nil(n) or false end
      tm.rate_fired = list
    end
    return tm
  end

  -- The time text of a budget's tm ('' when it keeps no time policy): all but the window's sums is kept as
  -- `head` until one of its parts changes (most writes change only the sums).
  function T.encode_timing(tm)
    if tm == nil or (tm.period == nil and tm.limits == nil and tm.alerts == nil and tm.fired == nil) then
      return ''
    end
    local head = tm.head
    if head == nil and tm.text then head = sub(tm.text, 1, #tm.text - tm.win_length) end -- as read
    if head == nil then
      head = '~' .. (tm.period or '') .. ';' .. (tm.period_start and I(tm.period_start) or '') .. ';' ..
        (tm.period_end and I(tm.period_end) or '') .. ';' .. (tm.limits and tm.limits_text or '') .. ';' ..
        list_text(tm.alerts) .. ';' .. list_text(tm.fired) .. ';'
      local rate_fired = tm.rate_fired
      if rate_fired then
        local parts = {}
        for i, t in ipairs(rate_fired) do parts[i] = t and I(t) or '' end
        head = head .. concat(parts, ',') .. ';'
      end
      tm.head = head
    end
    local win = tm.limits and tm.win
    if not win then return head end
    local sums = win.sums
    if #sums == 1 then return head .. I(win.as_of) .. ':' .. I(sums[1]) end
    return head .. I(win.as_of) .. ':' .. list_text(sums, ':')
  end

  local function window_sum(key, from, to)
    local total = 0
    for _, m in ipairs(rcall('ZRANGEBYSCORE', key, from, to)) do total = total + tonumber(match(m, '%d+$')) end
    return total
  end

  -- What each rate limit's window holds now (one sum per limit). The budget keeps the sums as of a time; the
  -- entries that left a window since (or came back into it, had the clock gone back) are read and counted, so
  -- a check reads the few entries that moved, not the whole log. With no sums kept (new limits) they are
  -- summed.
  local function window_now(b)
    local tm = b.tm
    local limits, win, key = tm.limits, tm.win, WINDOW_BASE .. b.field
    if win == nil then
      local sums = {}
      for i, lim in ipairs(limits) do sums[i] = window_sum(key, '(' .. I(NOW - lim.window), '+inf') end
      win = {as_of = NOW, sums = sums}
      tm.win, b.timing = win, nil
    elseif win.as_of ~= NOW then
      local t, sums = win.as_of, win.sums
      for i, lim in ipairs(limits) do
        local w = lim.window
        if NOW > t then
          sums[i] = sums[i] - window_sum(key, '(' .. I(t - w), I(NOW - w))
        else
          sums[i] = sums[i] + window_sum(key, '(' .. I(NOW - w), I(t - w))
        end
      end
      win.as_of, b.timing = NOW, nil
    end
    return win.sums
  end
  T.window_now = window_now

  -- A hold's or a debit's entry in a rate-limited budget's spend log, after the entries older than its longest
  -- window (operations._window_add).
  function T.window_add(b, ref, amount)
    local sums = window_now(b)
    local key, span = WINDOW_BASE .. b.field, 0
    for _, lim in ipairs(b.tm.limits) do span = max(span, lim.window) end
    rcall('ZREMRANGEBYSCORE', key, '-inf', I(NOW - span))
    rcall('ZADD', key, NOW_S, ref .. ' ' .. I(amount))
    for i = 1, #sums do sums[i] = sums[i] + amount end
    b.timing = nil
  end

  -- A hold made at `ts` and logged as `old` is settled for `new` (Txn.window_set) or returned (`new` nil:
  -- Txn.window_drop), in b's log if it is still there (whether or not b has rate limits now). The sums are
  -- kept as of their own time: the entry counts in those whose window then held it.
  local function window_change(b, ref, ts, old, new)
    if new == old then return end
    local key = WINDOW_BASE .. b.field
    if rcall('ZREM', key, ref .. ' ' .. I(old)) == 0 then return end
    if new then rcall('ZADD', key, ts, ref .. ' ' .. I(new)) end
    local win = b.tm and b.tm.limits and b.tm.win
    if win then
      local sums, as_of = win.sums, win.as_of
      for i, lim in ipairs(b.tm.limits) do
        if ts > as_of - lim.window then sums[i] = sums[i] - old + (new or 0) end
      end
      b.timing = nil
    end
  end

  -- A reservation's name in spend logs: its id before the "@".
  function T.ref_of(rid) return match(rid, '^[^@]+') end

  -- A hold's entries in the spend logs of `budgets` (every unit's budgets it was on) now count what each unit
  -- was charged (`charged`: the main unit's; the others' are in `holds`), or are gone (`charged` nil) (Python:
  -- Txn.window_set, window_drop).
  function T.settle_windows(rec, budgets, holds, charged)
    local ref, created = T.ref_of(rec.id), tonumber(rec.created)
    for _, b in ipairs(budgets) do
      if b.unit == rec.unit then
        window_change(b, ref, created, rec.estimate, charged)
      else
        for _, h in ipairs(holds) do
          if h.unit == b.unit then window_change(b, ref, created, h.amount, charged and h.charged) end
        end
      end
    end
  end

  -- Would holding `amount` more on b now push what was spent or held in one of its rate limits' sliding
  -- windows past it? A denial (RATE_EXCEEDED) saying when the window has room again (after enough of its
  -- oldest entries leave it; nil when `amount` alone is above the limit), or nil (rules.check_rates).
  function T.check_rates(b, amount)
    local sums = window_now(b)
    for i, lim in ipairs(b.tm.limits) do
      local used, limit = sums[i], lim.amount
      if used + amount > limit then
        local retry = nil
        if amount <= limit then
          local excess, freed, offset = used + amount - limit, 0, 0
          local key, from = WINDOW_BASE .. b.field, '(' .. I(NOW - lim.window)
          while retry == nil do
            local got = rcall('ZRANGEBYSCORE', key, from, '+inf', 'WITHSCORES', 'LIMIT', offset, 100)
            if #got == 0 then break end
            for j = 1, #got, 2 do
              freed = freed + tonumber(match(got[j], '%d+$'))
              if freed >= excess then
                retry = tonumber(got[j + 1]) + lim.window - NOW -- the entry is out once now - window >= ts
                break
              end
            end
            offset = offset + 100
          end
        end
        return {decision = 'DENY', reason_code = 'RATE_EXCEEDED', scope = b.scope,
                remaining = max(limit - used, 0), unit = b.unit, retry_after_ms = retry, freeze = lim.freeze,
                also = NO_HOLDS}
      end
    end
    return nil
  end

  -- x * m exactly, as (high, low) in base 2^26, for 0 <= x < 2^53 and 0 <= m <= 10^4.
  local function times(x, m)
    local high = floor(x / 67108864)
    local low = (x - high * 67108864) * m
    local carry = floor(low / 67108864)
    return high * m + carry, low - carry * 67108864
  end

  -- Alert thresholds (percent of the allocation) that spent + debt has reached and that have not fired in this
  -- period; marks them fired (rules.crossed_thresholds). Compared exactly: t * allocated <= (spent + debt) *
  -- 100.
  function T.crossed_thresholds(b)
    local tm = b.tm
    if tm == nil or tm.alerts == nil or b.allocated <= 0 then return NO_HOLDS end
    local fired = {}
    for _, t in ipairs(tm.fired or NO_HOLDS) do fired[t] = true end
    local used_high, used_low = times(b.spent + b.debt, 100)
    local new = {}
    for _, t in ipairs(tm.alerts) do
      if not fired[t] then
        local high, low = times(b.allocated, t)
        if high < used_high or (high == used_high and low <= used_low) then new[#new + 1] = t end
      end
    end
    if #new > 0 then
      for _, t in ipairs(new) do fired[t] = true end
      local all = {}
      for t in pairs(fired) do all[#all + 1] = t end
      table.sort(all)
      tm.fired, tm.head, tm.text, b.timing = all, nil, nil, nil
    end
    return new
  end

  -- Burn-rate alerts: each rate limit with alert_at whose window now holds at least that percent of its amount
  -- (the new hold or charge in it), unless it fired less than a window length ago; marks them fired now and
  -- logs a `threshold_crossed` event for each (rules.crossed_rates, operations._burn_alerts). Compared exactly:
  -- alert_at * amount <= used * 100. True when one fired (b is to be saved).
  function T.burn_alerts(b, rid)
    local tm = b.tm
    local limits = tm and tm.limits
    if not limits then return false end
    local sums, fired, any = nil, tm.rate_fired, false
    for i, lim in ipairs(limits) do
      local at = lim.alert_at
      local last = fired and fired[i]
      if at and not (last and NOW - last < lim.window) then
        sums = sums or window_now(b)
        local used = sums[i]
        local high, low = times(lim.amount, at)
        local used_high, used_low = times(used, 100)
        if high < used_high or (high == used_high and low <= used_low) then
          if not fired then
            fired = {}
            for j = 1, #limits do fired[j] = false end
            tm.rate_fired = fired
          end
          fired[i] = NOW
          any = true
          emit('threshold_crossed', b.scope, b.unit, used, rid, nil, '{"kind":"burn_rate","threshold":' .. I(at) ..
            ',"window_ms":' .. I(lim.window) .. ',"limit":' .. I(lim.amount) .. ',"used":' .. I(used) .. '}')
        end
      end
    end
    if any then tm.head, tm.text, b.timing = nil, nil, nil end
    return any
  end

  -- The rest (periods rolling over, budget changes: rarer) is made when first asked for.
  setmetatable(T, {__index = function(_, name)
    -- The budget at (scope, unit), or nil.
    local function budget_at(scope, unit)
      local field = scope .. '|' .. unit
      local text = hash_get(BUDGETS, field)
      if not text then return nil end
      local b = DECODED[field]
      if b == nil or b.text ~= text then
        b = decode_budget(scope, unit, text)
        b.field, b.text = field, text
        DECODED[field] = b
      end
      return b
    end

    T.budget_at = budget_at

    -- Write the roll-overs this operation made (before its first event, or at its end): each budget, its new
    -- period end in the periods zset, a period_reset event with the closed period's totals.
    function T.write_rolls()
      local rolled = TIMED.rolled
      TIMED.rolled = {}
      for _, r in ipairs(rolled) do
        local b, c = r[1], r[2]
        save_budgets({b})
        zset_put(PERIODS, b.field, b.tm.period_end)
        emit('period_reset', b.scope, b.unit, c.spent, nil, nil,
          '{"period_start_ms":' .. (c.start and I(c.start) or 'null') .. ',"period_end_ms":' .. I(c.stop) ..
          ',"allocated":' .. I(c.allocated) .. ',"spent":' .. I(c.spent) .. ',"debt":' .. I(c.debt) ..
          ',"reserved":' .. I(c.reserved) .. '}')
      end
    end

    -- A period's [start, end) around now (timing.period_bounds): a fixed duration counted from its anchor, or a
    -- calendar period from the boundaries the client stored (read once per script call, months of them); nil
    -- when those do not reach now.
    local BOUNDS = {}
    local function period_bounds(period)
      local step, anchor = match(period, '^(%d+)%+(%d+)$')
      if step then
        step, anchor = tonumber(step), tonumber(anchor)
        local start = anchor + floor((NOW - anchor) / step) * step
        while start > NOW do start = start - step end
        while start + step <= NOW do start = start + step end
        return start, start + step
      end
      local list = BOUNDS[period]
      if list == nil then
        list = numbers(rcall('HGET', BOUNDS_KEY, period) or '')
        BOUNDS[period] = list
      end
      for i = 1, #list - 1 do
        if list[i] <= NOW and NOW < list[i + 1] then return list[i], list[i + 1] end
      end
      return nil
    end

    -- At the first touch after its period's end a budget's spent starts again from zero; holds keep their
    -- amount, debt carries over. Returns the closed period ({start, stop, allocated, spent, debt, reserved}) or
    -- nil (rules.roll_period). When a calendar period's stored boundaries do not reach now, the operation stops
    -- here (before its own writes: a roll-over comes first) and answers {"bounds", period}: the client stores
    -- new ones and runs it again (run_batch).
    local function roll_period(b)
      local tm = b.tm
      if tm == nil or tm.period == nil or tm.period_end == nil or NOW < tm.period_end then return nil end
      local start, stop = period_bounds(tm.period)
      if start == nil then error({bounds = tm.period}) end
      local closed = {start = tm.period_start, stop = tm.period_end, allocated = b.allocated, spent = b.spent,
                      debt = b.debt, reserved = b.reserved}
      tm.period_start, tm.period_end, tm.fired, tm.head, tm.text = start, stop, nil, nil, nil
      b.spent = 0
      b.is_over_limit = b.debt > b.overdraft_limit
      b.timing = nil
      return closed
    end
    T.roll_period = roll_period

    local function roll(b, write)
      local closed = roll_period(b)
      if closed and write then
        local rolled = TIMED.rolled
        rolled[#rolled + 1] = {b, closed}
      end
    end
    T.roll = roll

    -- Roll over every unit's budget at `scopes` whose period has ended (in the order of Txn.budgets).
    function T.roll_scopes(scopes, write)
      for _, scope in ipairs(scopes) do
        for _, u in ipairs(UNITS) do
          if TIMED.due[scope .. '|' .. u] then
            local b = budget_at(scope, u)
            if b then roll(b, write) end
          end
        end
      end
    end

    -- A period as the Python engine shows it (models.Period.spec()), JSON.
    function T.period_json(period)
      local step, anchor = match(period, '^(%d+)%+(%d+)$')
      if step then return '{"every_ms":' .. step .. ',"anchor_ms":' .. anchor .. '}' end
      local every, tz = match(period, '^(%a+):(.*)$')
      return '{"every":' .. q(every) .. ',"tz":' .. q(tz) .. '}'
    end

    -- A calendar period's boundaries sent by the client, for this script call.
    function T.sent_bounds(period, text) BOUNDS[period] = numbers(text) end

    -- Period, rate limits and alerts as the command says: '' leaves one as it is, '-' removes it (Python:
    -- _set_time_policy). A new or changed period starts at the boundary before now; changed limits are summed
    -- again from the spend log. Returns a failure when a calendar period's boundaries do not reach now.
    function T.set_time_policy(b, period, limits, alerts)
      local tm = b.tm or {limits_text = ''}
      if period ~= '' then
        local new = nil
        if period ~= '-' then new = period end
        if new ~= tm.period then
          local start, stop = nil, nil
          if new then
            start, stop = period_bounds(new)
            if start == nil then
              return fail('INVALID_REQUEST', 'the boundaries sent for period ' .. new .. ' do not reach the time ' ..
                'of the Redis server (' .. NOW_S .. '); are the clocks of the client and the server far apart?')
            end
          end
          tm.period, tm.period_start, tm.period_end = new, start, stop
        end
      end
      if limits ~= '' then
        local text = limits ~= '-' and limits or ''
        if text ~= (tm.limits and tm.limits_text or '') then
          tm.limits_text, tm.limits, tm.win, tm.rate_fired = text, nil, nil, nil
          if text ~= '' then tm.limits = parse_limits(text) end
        end
      end
      if alerts ~= '' then
        tm.alerts = nil
        if alerts ~= '-' then tm.alerts = numbers(alerts) end
      end
      tm.head, tm.text = nil, nil
      b.tm, b.timing = tm, nil
      return nil
    end

    setmetatable(T, nil)
    return rawget(T, name)
  end})

  return T
end

TIME = function()
  local functions = TIMED.functions
  if functions == nil then
    functions = time_functions()
    TIMED.functions = functions
  end
  return functions
end

-- Return every unit's hold and mark the reservation EXPIRED (Python: _expire).
local function expire(rec)
  local budgets = load_rolled(rec.budgeted, rec.unit, true)
  unhold(budgets, rec.estimate)
  local data, holds = nil, NO_HOLDS
  if rec.holds_text ~= '' then
    holds, budgets = other_holds(rec), append({}, budgets)
    for _, h in ipairs(holds) do
      local on = load_rolled(h.scopes, h.unit, true)
      unhold(on, h.amount)
      append(budgets, on)
    end
    data = '{"also":' .. holds_json(holds, 'amount') .. '}'
  end
  if rec.windowed then TIME().settle_windows(rec, budgets, holds, nil) end
  save_budgets(budgets)
  finalize(rec, 'EXPIRED')
  emit('expired', rec.scope_path, rec.unit, rec.estimate, rec.id, nil, data)
end

-- Expire up to `limit` ACTIVE reservations whose deadline has passed; returns how many, and whether
-- that was every overdue one.
local function expire_due(limit)
  if limit <= 0 then return 0, false end
  zset_flush(DUE)
  local due = rcall('ZRANGEBYSCORE', DUE_KEY, '-inf', '(' .. NOW_S, 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(due) do
    local rec = load_record(rid)
    if rec and rec.status == 'ACTIVE' then
      expire(rec)
      n = n + 1
    else
      zset_put(DUE, rid, false)
    end
  end
  return n, #due < limit
end

-- Every write operation first expires overdue holds. NOW is one instant for the whole batch and no
-- operation moves a deadline to before it, so once nothing is left overdue the rest of the batch skips this.
local none_due = false
local function expire_overdue()
  if none_due then return end
  local _, all = expire_due(SWEEP_PER_CALL)
  none_due = all
end

-- The replay of a stored answer (its fields joined by \31) with today's balances: the main unit's on the
-- scopes listed in field `budgeted_at`, the other units' of the holds in field `holds_at` (Python: _replayed).
local function replayed(prior, unit, budgeted_at, holds_at)
  local fields = split(prior, SEP)
  local budgets = load_budgets(scope_list(fields[budgeted_at] or ''), unit)
  if (fields[holds_at] or '') ~= '' then
    for _, h in ipairs(decode_holds(fields[holds_at])) do append(budgets, load_budgets(h.scopes, h.unit)) end
  end
  return push_balances({'replay', prior, NOW_S}, budgets)
end

local OPS = {}

-- The fields of an operation: its first HEAD (0, 1 or 2) fields are its own (ids, hashes); the rest is most
-- often the same for many operations of a batch, so it is split once per batch and the table shared (HEAD
-- is set by the operation's section). Shared tables are never changed but for their head, so what an
-- operation derives from the rest alone may be kept in them under a name (F.scopes).
local HEAD = 0
local TAILS, LAST_TAIL, LAST_F = {}, nil, nil
local function fields_of(text)
  if HEAD == 0 then return split(text, SEP) end
  local j = find(text, SEP, 1, true)
  if not j then return split(text, SEP) end
  local h1, h2, at = sub(text, 1, j - 1), nil, j + 1
  if HEAD == 2 then
    j = find(text, SEP, at, true)
    if not j then return split(text, SEP) end
    h2, at = sub(text, at, j - 1), j + 1
  end
  local f
  if LAST_TAIL and #text - at + 1 == #LAST_TAIL and find(text, LAST_TAIL, at, true) == at then
    f = LAST_F -- the same rest as the operation before: no new string to make (and hash) for it
  else
    local tail = sub(text, at)
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
  if type(err) == 'table' then
    if err.bounds then return {'bounds', err.bounds} end
    err = err.err
  end
  return {'raise', tostring(err)}
end

-- Run the batch in ARGV (four arguments per operation) with `op`; one reply entry per operation. Then
-- write back the cache, whatever the operations answered: an operation that raised keeps the writes it made
-- before, as it would without the cache. Should that fail, no answer can be trusted (a refusal too may
-- rest on a write that did not happen): every caller gets the error.
local function run_batch(op)
  local out = {}
  for i = 3, #ARGV, 4 do
    local index = ARGV[i]
    IDEMPOTENCY_KEY = index == '1' and BUDGETS_KEY or KEYS[tonumber(index)]
    KEY, F, TEXT = ARGV[i + 1], fields_of(ARGV[i + 2]), ARGV[i + 3]
    local ok, reply = pcall(op)
    if not ok then reply = raised(reply) end
    if reply[1] == 'err' or reply[1] == 'raise' or reply[1] == 'bounds' then
      DECODED, TIMED.rolled = {}, {} -- it may have changed budgets it did not save; its roll-overs are not kept
    elseif TIMED.rolled[1] then
      local done, err = pcall(TIME().write_rolls)
      if not done then reply = raised(err) end
    end
    out[#out + 1] = reply
  end
  local err = flush()
  if err ~= nil then
    for i = 1, #out do out[i] = raised(err) end
  end
  return out
end
--@@ prelude-end

-- ═══ 5. rules (cycles_ledger/rules.py) ═════════════════════════════════════════════════════════════════
-- Functions that may refuse return nil and the failure where the Python raises. Four sections, each in the
-- scripts of the operations that apply it (an operation's script is only the code it runs: a script call
-- runs its whole chunk, so every function defined is paid for on every call).

--@@ rules-lookup
-- Which budgets a request touches.
-- Split the budgets on a request's scopes by the units it holds or charges: a table unit -> budgets. nil
-- when there is no budget at any scope (BUDGET_NOT_FOUND) unless unbudgeted subjects are allowed; nil and
-- a UNIT_MISMATCH failure when budgets there are only in other units.
local function budgets_by_unit(scopes, units, allow_unbudgeted)
  local by_unit, any = {}, false
  for _, unit in ipairs(units) do
    local on = load_budgets(scopes, unit)
    by_unit[unit] = on
    if #on > 0 then any = true end
  end
  if any or allow_unbudgeted then return by_unit end
  local all = load_budgets(scopes, nil) -- only now: the other units tell "no budget" from "wrong unit"
  if #all == 0 then return nil end
  local set = {}
  for _, b in ipairs(all) do set[b.unit] = true end
  local found = sorted_keys(set)
  local quoted = {}
  for i, u in ipairs(found) do quoted[i] = q(u) end
  return nil, fail('UNIT_MISMATCH', 'no budget in ' .. units[1] .. ' for ' .. scopes[#scopes] ..
    '; budgets there are in ' .. concat(found, ', '),
    {scope = all[#all].scope, requested_unit = units[1], expected_units = {'[' .. concat(quoted, ',') .. ']'}})
end

--@@ rules-evaluate
--@include rules-lookup
-- The decision on a hold: evaluate_reserve, evaluate_units; with operations._evaluate.
local function hard_denial(b)
  if b.status == 'CLOSED' then return 'BUDGET_CLOSED' end
  if b.status == 'FROZEN' then return 'BUDGET_FROZEN' end
  if b.is_over_limit then return 'OVERDRAFT_LIMIT_EXCEEDED' end
  if b.debt > 0 then return 'DEBT_OUTSTANDING' end
  return nil
end

local LIST_CAPS = {tool_denylist = true, tool_allowlist = true}

-- Caps of several scopes or units combined (the strictest number wins, deny lists add up, allow lists
-- intersect), as a Lua table, or nil when there are none. `cap_sets`: Lua tables.
local function merge_cap_dicts(cap_sets)
  local merged, any = {}, false
  for _, caps in ipairs(cap_sets) do
    for k, v in pairs(caps) do
      if v ~= cjson.null then
        if merged[k] == nil then
          if LIST_CAPS[k] then
            local copy = {}
            for i = 1, #v do copy[i] = v[i] end
            merged[k] = copy
          else
            merged[k] = v
          end
          any = true
        elseif k == 'tool_denylist' then
          local set = {}
          for _, x in ipairs(merged[k]) do set[x] = true end
          for _, x in ipairs(v) do set[x] = true end
          merged[k] = sorted_keys(set)
        elseif k == 'tool_allowlist' then
          local theirs, set = {}, {}
          for _, x in ipairs(v) do theirs[x] = true end
          for _, x in ipairs(merged[k]) do if theirs[x] then set[x] = true end end
          merged[k] = sorted_keys(set)
        elseif k == 'cooldown_ms' then
          merged[k] = max(merged[k], v)
        else
          merged[k] = min(merged[k], v)
        end
      end
    end
  end
  if any then return merged end
  return nil
end

local function merge_caps(budgets)
  local cap_sets = {}
  for _, b in ipairs(budgets) do
    if b.caps ~= '' then cap_sets[#cap_sets + 1] = cjson.decode(b.caps) end
  end
  return merge_cap_dicts(cap_sets)
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
  local negative = x < 0
  if negative then x = -x end
  local quot = floor(x / d)
  local r = x - quot * d
  for _ = 1, 6 do
    r = r * 10
    local digit = floor(r / d)
    quot = quot * 10 + digit
    r = r - digit * d
  end
  if negative then
    if r > 0 then return -(quot + 1) end
    return -quot
  end
  return quot
end

-- An evaluation: {decision, amount, reason_code, scope, remaining, caps (Lua table or nil), unit, also}.
-- soft_landing: nil or {min_amount, fixed_amount, amount_per_million_tokens or nil}.
local function evaluate_reserve(budgets, estimate, soft_landing)
  local n, caps = #budgets, nil
  for i = 1, n do
    local b = budgets[i]
    if b.status ~= 'ACTIVE' or b.is_over_limit or b.debt > 0 then
      local reason = hard_denial(b)
      if reason then return {decision = 'DENY', reason_code = reason, scope = b.scope, remaining = remaining(b)} end
    end
    if b.caps ~= '' then caps = true end
  end
  if caps then caps = merge_caps(budgets) end -- nil when no budget has caps
  if n == 0 then return {decision = 'ALLOW', amount = estimate} end
  local tight = budgets[1] -- first of equals = broadest
  local left = remaining(tight)
  for i = 2, n do
    local r = remaining(budgets[i])
    if r < left then tight, left = budgets[i], r end
  end
  if left >= estimate then
    return {decision = caps and 'ALLOW_WITH_CAPS' or 'ALLOW', amount = estimate, scope = tight.scope,
            remaining = left, caps = caps}
  end
  if soft_landing and left >= max(soft_landing.min_amount, 1) then
    caps = caps or {}
    if soft_landing.amount_per_million_tokens then
      -- What is left after the fixed part pays for this many tokens; none if it does not even cover that.
      local tokens = max(0, per_million(left - soft_landing.fixed_amount, soft_landing.amount_per_million_tokens))
      if caps.max_tokens == nil or tokens < caps.max_tokens then caps.max_tokens = tokens end
    end
    return {decision = 'ALLOW_WITH_CAPS', amount = left, scope = tight.scope, remaining = left, caps = caps}
  end
  return {decision = 'DENY', reason_code = 'BUDGET_EXCEEDED', scope = tight.scope, remaining = left}
end

-- `evaluate_reserve` for a hold in `unit` plus holds in other units (`also`, a list of {unit, amount}), as
-- one decision. The soft landing applies to the main unit only; another unit's hold fits or denies (the
-- evaluation's `unit` names it). `also` of the evaluation: the other holds that have a budget to hold on.
local function evaluate_units(by_unit, unit, estimate, soft_landing, also)
  local ev = evaluate_reserve(by_unit[unit], estimate, soft_landing)
  ev.unit, ev.also = unit, NO_HOLDS
  if ev.decision == 'DENY' or #also == 0 then return ev end
  local cap_sets, held = {}, {}
  if ev.caps then cap_sets[1] = ev.caps end
  for _, want in ipairs(also) do
    local budgets = by_unit[want.unit]
    if #budgets > 0 then
      local other = evaluate_reserve(budgets, want.amount)
      if other.decision == 'DENY' then
        other.unit, other.also = want.unit, NO_HOLDS
        return other
      end
      held[#held + 1] = want
      if other.caps then cap_sets[#cap_sets + 1] = other.caps end
    end
  end
  ev.also = held
  ev.caps = merge_cap_dicts(cap_sets)
  if ev.caps and ev.decision == 'ALLOW' then ev.decision = 'ALLOW_WITH_CAPS' end
  return ev
end

-- A reserve denied for lack of room looks again after expiring overdue holds (they still counted).
local function retry_after_expiry(ev)
  return ev.reason_code == 'BUDGET_EXCEEDED' or ev.reason_code == 'RATE_EXCEEDED'
end

-- The decision on a reserve, the budgets it counted (every unit it holds on, and the unit that denied) and
-- its budgets by unit (Python: _evaluate); or nil, nil and a failure. Periods that ended roll over first (kept
-- when `write`).
local function evaluate(scopes, unit, units, also, allow_unbudgeted, estimate, soft_landing, write)
  load_rolled(scopes, nil, write)
  local by_unit, failure = budgets_by_unit(scopes, units, allow_unbudgeted)
  if failure then return nil, nil, failure end
  if by_unit == nil then
    return {decision = 'DENY', reason_code = 'BUDGET_NOT_FOUND', scope = scopes[#scopes], unit = unit,
            also = NO_HOLDS}, {}
  end
  local ev = evaluate_units(by_unit, unit, estimate, soft_landing, also)
  local held = by_unit[unit]
  if #ev.also > 0 or ev.unit ~= unit then
    held = append({}, held)
    for _, h in ipairs(ev.also) do append(held, by_unit[h.unit]) end
    if ev.unit ~= unit then append(held, by_unit[ev.unit]) end
  end
  if ev.decision ~= 'DENY' then
    for _, b in ipairs(held) do
      if b.tm and b.tm.limits then
        local amount = ev.amount
        if b.unit ~= unit then
          for _, a in ipairs(ev.also) do
            if a.unit == b.unit then amount = a.amount end
          end
        end
        local denial = TIME().check_rates(b, amount)
        if denial then
          ev = denial
          break
        end
      end
    end
  end
  return ev, held, nil, by_unit
end

--@@ rules-settle
-- Settling a hold or a debit, and when a reservation may still be settled or extended; with the steps of
-- operations.py around them (_settle_target, _finalize, _after_charge).
-- Turn a hold of `held` into a charge of `actual` (a direct debit is held = 0); returns charged and the
-- scopes newly marked over-limit, or nil and a failure (nothing changed then).
local function settle(budgets, held, actual, policy, is_commit)
  local delta = actual - held
  if delta <= 0 then
    for _, b in ipairs(budgets) do
      b.reserved = b.reserved - held
      b.spent = b.spent + actual
    end
    return actual, {}
  end
  if policy == 'REJECT' then
    local short = {}
    for _, b in ipairs(budgets) do
      if remaining(b) < delta then short[#short + 1] = b end
    end
    if is_commit or #short > 0 then
      local worst = short[1] or budgets[1]
      local message
      if is_commit then
        message = 'actual ' .. I(actual) .. ' exceeds the reserved ' .. I(held) .. ' and the overage policy is REJECT'
      else
        message = 'actual ' .. I(actual) .. ' exceeds the remaining ' .. I(worst and remaining(worst) or 0)
      end
      local details = {}
      if worst then details = {scope = worst.scope, remaining = remaining(worst)} end
      return nil, fail('BUDGET_EXCEEDED', message, details)
    end
    for _, b in ipairs(budgets) do
      b.reserved = b.reserved - held
      b.spent = b.spent + actual
    end
    return actual, {}
  end
  if policy == 'ALLOW_IF_AVAILABLE' then
    local available = delta
    for i, b in ipairs(budgets) do
      local r = max(remaining(b), 0)
      if i == 1 or r < available then available = r end
    end
    local extra = min(delta, available)
    local flagged = {}
    for _, b in ipairs(budgets) do
      local short = remaining(b) < delta
      if short and not b.is_over_limit then flagged[#flagged + 1] = b.scope end
      if short then b.is_over_limit = true end
      b.reserved = b.reserved - held
      b.spent = b.spent + held + extra
    end
    return held + extra, flagged
  end
  -- ALLOW_WITH_OVERDRAFT (and RECORD_ALL, which knows no limit): check every scope first, then apply.
  local plan = {}
  local flagged = {}
  local record_all = policy == 'RECORD_ALL'
  for i, b in ipairs(budgets) do
    local covered = min(delta, max(remaining(b), 0))
    local shortfall = delta - covered
    if record_all then
      if shortfall > 0 and not b.is_over_limit then flagged[#flagged + 1] = b.scope end
    elseif shortfall > 0 and b.debt + shortfall > b.overdraft_limit then
      return nil, fail('OVERDRAFT_LIMIT_EXCEEDED',
        'overage of ' .. I(delta) .. ' would take debt on ' .. b.scope .. ' to ' .. I(b.debt + shortfall) ..
        ', past its overdraft limit ' .. I(b.overdraft_limit),
        {scope = b.scope, remaining = remaining(b), debt = b.debt, overdraft_limit = b.overdraft_limit})
    end
    plan[i] = {covered, shortfall}
  end
  for i, b in ipairs(budgets) do
    b.reserved = b.reserved - held
    b.spent = b.spent + held + plan[i][1]
    b.debt = b.debt + plan[i][2]
    if record_all and plan[i][2] > 0 then b.is_over_limit = true end
  end
  return actual, flagged
end

-- Debt before a charge, by budget field, when the policy can make debt (nil when it cannot).
local function debts_before(policy, budgets, into)
  if policy ~= 'ALLOW_WITH_OVERDRAFT' and policy ~= 'RECORD_ALL' then return nil end
  into = into or {}
  for _, b in ipairs(budgets) do into[b.field] = b.debt end
  return into
end

-- What a charge can cause (Python: _after_charge): a `threshold_crossed` event for each alert threshold the
-- budget's spend reached (once per period), a `debt` event for every budget whose debt grew.
local function after_charge(budgets, debts, rid)
  for _, b in ipairs(budgets) do
    if b.tm and b.tm.alerts then
      for _, t in ipairs(TIME().crossed_thresholds(b)) do
        emit('threshold_crossed', b.scope, b.unit, b.spent + b.debt, rid, nil, '{"threshold":' .. I(t) ..
          ',"allocated":' .. I(b.allocated) .. ',"spent":' .. I(b.spent) .. ',"debt":' .. I(b.debt) .. '}')
      end
    end
    local added = debts and b.debt - (debts[b.field] or 0) or 0
    if added > 0 then
      emit('debt', b.scope, b.unit, added, rid, nil,
        '{"debt":' .. I(b.debt) .. ',"added":' .. I(added) .. ',"overdraft_limit":' .. I(b.overdraft_limit) .. '}')
    end
  end
end

local function not_found(rid)
  return fail('NOT_FOUND', 'reservation ' .. pyrepr(rid) .. ' not found', {reservation_id = rid})
end

local function expired_error(rec)
  return fail('RESERVATION_EXPIRED', 'reservation ' .. rec.id .. ' expired at ' .. I(rec.expires) ..
    ' (+' .. I(rec.grace) .. ' ms grace)', {reservation_id = rec.id})
end

-- May `op` (commit or release) settle `rec` now? "replay" and the first answer; "live"; "expire" (the
-- grace is over: expire it, answer RESERVATION_EXPIRED); or nil and a refusal. Settlement idempotency
-- lives on the reservation itself: one settle per reservation (only a settled one has a key to compare).
local function settle_verdict(rec, op, key, hash)
  if rec.status ~= 'ACTIVE' and rec.status ~= 'EXPIRED' then
    local stored = hash_get(RESERVATIONS, rec.id .. '|k')
    if stored then
      -- "op\nhash\n<key length>\n<key><answer>": the key may hold any character
      local settle_op, settle_hash, length, rest = match(stored, '^(%a+)\n([^\n]*)\n(%d+)\n(.*)$')
      length = tonumber(length)
      if sub(rest, 1, length) == key then
        if settle_op ~= op or settle_hash ~= hash then
          return nil, fail('IDEMPOTENCY_MISMATCH', 'idempotency key ' .. pyrepr(key) ..
            ' was already used for a different ' .. settle_op .. ' request', {idempotency_key = key})
        end
        return 'replay', sub(rest, length + 1)
      end
    end
  end
  if rec.status == 'EXPIRED' then
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. rec.id .. ' expired', {reservation_id = rec.id})
  end
  if rec.status ~= 'ACTIVE' then
    return nil, fail('RESERVATION_FINALIZED', 'reservation ' .. rec.id .. ' is already ' .. rec.status,
      {reservation_id = rec.id, status = rec.status})
  end
  if NOW > rec.deadline then return 'expire' end
  return 'live'
end

-- May `rec` be extended now? "live" or "expire" (past its grace: expire it, answer EXPIRED), or nil and a
-- refusal. In the grace period (past expiry, before the deadline) only commit or release are allowed.
local function extend_verdict(rec, max_extensions)
  if rec.status == 'EXPIRED' or (rec.status == 'ACTIVE' and NOW > rec.expires) then
    if rec.status == 'ACTIVE' and NOW > rec.deadline then return 'expire' end
    return nil, fail('RESERVATION_EXPIRED', 'reservation ' .. rec.id ..
      ' passed its expiry; in the grace period only commit or release', {reservation_id = rec.id})
  end
  if rec.status ~= 'ACTIVE' then
    return nil, fail('RESERVATION_FINALIZED', 'reservation ' .. rec.id .. ' is already ' .. rec.status,
      {reservation_id = rec.id, status = rec.status})
  end
  if max_extensions and rec.extensions >= max_extensions then
    return nil, fail('MAX_EXTENSIONS_EXCEEDED', 'reservation ' .. rec.id .. ' was already extended ' ..
      I(rec.extensions) .. ' times', {reservation_id = rec.id})
  end
  return 'live'
end

-- The reservation to commit or release, or nil and the reply: a replay, a refusal, or the error of one
-- expired on the spot (Python: _settle_target).
local function settle_target(op, rid, key, hash)
  local rec = load_record(rid)
  if not rec then return nil, not_found(rid) end
  local verdict, answer = settle_verdict(rec, op, key, hash)
  if verdict == nil then return nil, answer end
  if verdict == 'replay' then return nil, push_balances({'replay', answer, NOW_S}, hold_budgets(rec)) end
  if verdict == 'expire' then
    expire(rec)
    return nil, expired_error(rec)
  end
  return rec
end

-- Finalize a settled reservation and keep its answer for a replay under the same key (Python: _finalize).
local function settled(rec, status, charged, op, key, hash, answer)
  rec.charged = charged
  finalize(rec, status, rec.id .. '|k', op .. '\n' .. hash .. '\n' .. I(#key) .. '\n' .. key .. answer)
end

--@@ rules-admin
-- Admin changes, and the open-budget checks a debit shares with them.
local function check_open(b)
  if b.status == 'CLOSED' then return fail('BUDGET_CLOSED', 'budget ' .. b.scope .. ' is closed', {scope = b.scope}) end
  return nil
end

-- A direct debit needs no headroom (its policy decides) but an open budget.
local function check_debit(budgets)
  for _, b in ipairs(budgets) do
    local closed = check_open(b)
    if closed then return closed end
    if b.status == 'FROZEN' then return fail('BUDGET_FROZEN', 'budget ' .. b.scope .. ' is frozen', {scope = b.scope}) end
  end
  return nil
end

-- Add `amount` to the allocation; it repays debt first (that debt becomes spend). Returns the repaid part.
local function fund(b, amount)
  local repaid = min(b.debt, amount)
  b.debt = b.debt - repaid
  b.spent = b.spent + repaid
  b.allocated = b.allocated + amount
  if b.debt == 0 and remaining(b) >= 0 then b.is_over_limit = false end
  return repaid
end

-- Change an existing budget's allocation (spent, reserved and debt stay); returns the event data.
-- caps: JSON text, '{}' to clear them, nil to keep them.
local function set_allocation(b, amount, overdraft_limit, caps)
  local data = '{"previous_allocated":' .. I(b.allocated) .. '}'
  b.allocated = amount
  if overdraft_limit then b.overdraft_limit = overdraft_limit end
  if caps then b.caps = (caps ~= '{}') and caps or '' end
  if b.debt > b.overdraft_limit then -- a lowered limit can leave existing debt above it
    b.is_over_limit = true
  elseif remaining(b) >= 0 then
    b.is_over_limit = false
  end
  return data
end

local STATUS_CHANGES = {freeze = {'FROZEN', 'frozen'}, unfreeze = {'ACTIVE', 'unfrozen'}, close = {'CLOSED', 'closed'}}

-- freeze / unfreeze / close; a closed budget stays closed. Returns the event type.
local function change_status(b, op)
  local closed = check_open(b)
  if closed then return nil, closed end
  local change = STATUS_CHANGES[op]
  b.status = change[1]
  return change[2]
end

-- ═══ 6. operations (cycles_ledger/operations.py) ═══════════════════════════════════════════════════════

--@@ reserve
--@include rules-evaluate
-- F: hash, rid, unit, estimate, ttl, grace, policy, dry_run, allow_unbudgeted, soft_min, soft_fixed, soft_apm,
-- also ("UNIT|amount …"), subject JSON, action JSON, metadata JSON, scopes…
-- Reply: {"reserve", decision, reason, scope, remaining, caps JSON, dry_run, rid, amount, expires_at, ttl,
--         budgeted scopes, unit that denied, holds in other units, retry_after_ms (RATE_EXCEEDED), balances…};
-- a replay: {"replay", stored reply, now, balances…}.
HEAD = 2
OPS.reserve = function(decide_only)
  local key, hash, rid, unit = KEY, F[1], F[2], F[3]
  local numbers = F.numbers
  if numbers == nil then
    numbers = {tonumber(F[4]), tonumber(F[5]), tonumber(F[6])}
    F.numbers = numbers
  end
  local estimate, ttl, grace, policy = numbers[1], numbers[2], numbers[3], F[7]
  local dry_run, allow_unbudgeted = F[8] == '1', F[9] == '1'
  local soft_landing = nil
  if F[10] ~= '' then
    soft_landing = {min_amount = tonumber(F[10]), fixed_amount = tonumber(F[11]),
                    amount_per_million_tokens = number_or_nil(F[12])}
  end
  local scopes = F.scopes
  if scopes == nil then
    scopes = {}
    for i = 17, #F do scopes[#scopes + 1] = F[i] end
    F.scopes = scopes
    F.also = decode_amounts(F[13])
    F.units = {unit}
    for _, a in ipairs(F.also) do F.units[#F.units + 1] = a.unit end
  end
  local also, units = F.also, F.units
  local path = scopes[#scopes]

  if not decide_only then
    expire_overdue()
    if hash ~= '' then
      local prior, mismatch = replay('reserve', key, hash)
      if mismatch then return mismatch end
      if prior then return replayed(prior, unit, 11, 13) end
    end
  end

  local write = not decide_only
  local ev, budgets, failure, by_unit =
    evaluate(scopes, unit, units, also, allow_unbudgeted, estimate, soft_landing, write)
  if failure then return failure end
  if write and retry_after_expiry(ev) and expire_due(1000) > 0 then
    -- overdue holds were still counted; look again without them
    ev, budgets, failure, by_unit = evaluate(scopes, unit, units, also, allow_unbudgeted, estimate, soft_landing, true)
    if failure then return failure end
  end
  local caps = caps_json(ev.caps)
  local denied_by = ev.decision == 'DENY' and ev.unit ~= unit and ev.unit or false
  local rated = ev.reason_code == 'RATE_EXCEEDED'
  local retry = rated and ev.retry_after_ms and I(ev.retry_after_ms) or ''
  -- (the trailing nils make room for the balances of three budgets: the table need not grow)
  local reply = {'reserve', ev.decision, ev.reason_code or false, ev.scope or false,
                 ev.remaining and I(ev.remaining) or false, caps, dry_run and '1' or '0', false, false, false, false,
                 '', denied_by, '', retry, nil, nil, nil, nil, nil, nil}
  if decide_only then
    for _, b in ipairs(budgets) do
      if b.timing == nil then encode_budget(b) end -- rolled over (or its window summed) for this answer only
    end
    return push_balances(reply, budgets)
  end
  if dry_run or ev.decision == 'DENY' then
    local kind = 'denied'
    if dry_run then kind = (ev.decision == 'DENY') and 'would_deny' or 'would_allow' end
    local info = '{"subject":' .. F[14] .. ',"action":' .. F[15] .. ',"key":' .. q(key) .. ',"remaining":' ..
      (ev.remaining and I(ev.remaining) or 'null')
    if caps and caps ~= '{}' then info = info .. ',"caps":' .. caps end
    if rated then info = info .. ',"retry_after_ms":' .. (retry ~= '' and retry or 'null') end
    local event_unit, amount = unit, estimate
    if #also > 0 then
      local parts = {}
      for i, a in ipairs(also) do
        parts[i] = q(a.unit) .. ':' .. I(a.amount)
        if a.unit == ev.unit then event_unit, amount = a.unit, a.amount end
      end
      info = info .. ',"also":{' .. concat(parts, ',') .. '}'
    end
    emit(kind, ev.scope or path, event_unit, amount, nil, ev.reason_code, info .. '}')
    if ev.freeze and not dry_run then -- the circuit breaker: the scope stays shut until unfrozen
      for _, b in ipairs(budgets) do
        if b.scope == ev.scope and b.unit == event_unit then
          b.status = 'FROZEN'
          save_budgets({b})
          emit('frozen', b.scope, b.unit, nil, nil, 'RATE_EXCEEDED', '{"by":"rate_limit"}')
        end
      end
    end
    if dry_run and hash ~= '' then remember(hash, joined(reply, 2, 15)) end
    return push_balances(reply, budgets)
  end
  local main = by_unit[unit]
  hold(main, ev.amount)
  local holds, holds_text = NO_HOLDS, ''
  if #ev.also > 0 then
    holds = {}
    for i, a in ipairs(ev.also) do
      local on = by_unit[a.unit]
      hold(on, a.amount)
      local names = {}
      for j, b in ipairs(on) do names[j] = b.scope end
      holds[i] = {unit = a.unit, amount = a.amount, charged = -1, scopes = names}
    end
    holds_text = encode_holds(holds)
  end
  local windowed = ''
  for _, b in ipairs(budgets) do
    if b.tm and b.tm.limits then
      local amount = ev.amount
      if b.unit ~= unit then
        for _, h in ipairs(holds) do
          if h.unit == b.unit then amount = h.amount end
        end
      end
      TIME().window_add(b, TIME().ref_of(rid), amount)
      windowed = ':w'
    end
  end
  save_budgets(budgets)
  local expires = NOW + ttl
  local budgeted = {}
  for i, b in ipairs(main) do budgeted[i] = b.scope end
  local amount_s, expires_s, budgeted_s = I(ev.amount), I(expires), concat(budgeted, ',')
  -- the record, as save_record would write {ACTIVE, unit, amount, policy, now, expires, grace, deadline, 0, -1,
  -- -1, path, budgeted[, holds]}
  local record = 'ACTIVE ' .. unit .. ' ' .. amount_s .. ' ' .. policy .. windowed .. ' ' .. NOW_S .. ' ' ..
    expires_s .. ' ' .. I(grace) .. ' ' .. I(expires + grace) .. ' 0 -1 -1 ' .. path .. ' ' .. budgeted_s
  if holds_text ~= '' then record = record .. ' ' .. holds_text end
  hash_set(RESERVATIONS, rid, record)
  local static = F.static -- the static JSON after the key
  if static == nil then
    static = ',"subject":' .. F[14] .. ',"action":' .. F[15] .. ',"affected_scopes":' .. quoted_list(scopes) ..
      ',"metadata":' .. (F[16] ~= '' and F[16] or 'null') .. '}'
    F.static = static
  end
  hash_set(RESERVATIONS, rid .. '|s', '{"idempotency_key":' .. q(key) .. static)
  local data = nil
  if caps then hash_set(RESERVATIONS, rid .. '|c', caps) end
  if caps and caps ~= '{}' then data = '"decision":' .. q(ev.decision) .. ',"caps":' .. caps end
  if #holds > 0 then data = (data and data .. ',' or '') .. '"also":' .. holds_json(holds, 'amount') end
  zset_put(DUE, rid, expires + grace)
  zset_put(IDS, rid, NOW)
  emit('reserved', path, unit, ev.amount, rid, nil, data and '{' .. data .. '}')
  if windowed ~= '' then
    local fired = false
    for _, b in ipairs(budgets) do
      if TIME().burn_alerts(b, rid) then fired = true end
    end
    if fired then save_budgets(budgets) end
  end
  reply[8], reply[9], reply[10], reply[11], reply[12], reply[14] = rid, amount_s, expires_s, I(ttl), budgeted_s,
    holds_text
  if hash ~= '' then remember(hash, joined(reply, 2, 15)) end
  return push_balances(reply, budgets)
end

--@@ decide
--@include reserve
OPS.decide = function() return OPS.reserve(true) end

--@@ commit
--@include rules-settle
-- F: rid, hash, unit, actual, also ("UNIT|amount …"), metrics JSON, metadata JSON.
-- Reply: {"commit", charged, released, holds in other units (charged), balances…};
-- a replay: {"replay", stored reply, now, balances…}.
HEAD = 2
OPS.commit = function()
  local rid, key, hash, unit, actual = F[1], KEY, F[2], F[3], F.actual
  if actual == nil then
    actual = tonumber(F[4])
    F.actual = actual
    local named = {}
    for _, a in ipairs(decode_amounts(F[5])) do named[a.unit] = a.amount end
    F.also_actual = named
  end
  expire_overdue()
  local rec, answer = settle_target('commit', rid, key, hash)
  if not rec then return answer end
  if unit ~= rec.unit then
    return fail('UNIT_MISMATCH', 'commit in ' .. unit .. ' for a reservation in ' .. rec.unit,
      {requested_unit = unit, expected_units = {'[' .. q(rec.unit) .. ']'}})
  end
  local budgets = load_rolled(rec.budgeted, rec.unit, true)
  local debts = debts_before(rec.policy, budgets)
  local charged, flagged = settle(budgets, rec.estimate, actual, rec.policy, true)
  if not charged then return flagged end
  local holds, over_limit = NO_HOLDS, nil
  if rec.holds_text ~= '' then
    holds, over_limit, budgets = other_holds(rec), {}, append({}, budgets)
    local also_actual = F.also_actual
    for _, h in ipairs(holds) do
      -- A unit the commit does not name is charged what was held: the worst case stands.
      local on = load_rolled(h.scopes, h.unit, true)
      debts = debts_before(rec.policy, on, debts)
      local got, more = settle(on, h.amount, also_actual[h.unit] or h.amount, rec.policy, true)
      if not got then return more end
      h.charged = got
      for _, scope in ipairs(more) do over_limit[#over_limit + 1] = {scope, h.unit} end
      append(budgets, on)
    end
    rec.holds_text = encode_holds(holds)
    rec.tail = nil -- the charges change the text after `finalized`
  end
  after_charge(budgets, debts, rid)
  if rec.windowed then TIME().settle_windows(rec, budgets, holds, charged) end
  save_budgets(budgets)
  local released = max(rec.estimate - actual, 0)
  local reply = {'commit', I(charged), I(released), rec.holds_text, nil, nil, nil, nil, nil, nil} -- three balances
  settled(rec, 'COMMITTED', charged, 'commit', key, hash, reply[2] .. SEP .. reply[3] .. SEP .. reply[4])
  local over, also, metrics, metadata = '', '', '', ''
  if #flagged > 0 then over = ',"over_limit":' .. quoted_list(flagged) end
  if #holds > 0 then also = ',"also":' .. holds_json(holds, 'charged') end
  if F[6] ~= '' then metrics = ',"metrics":' .. F[6] end
  if F[7] ~= '' then metadata = ',"metadata":' .. F[7] end
  emit('committed', rec.scope_path, rec.unit, charged, rid, nil,
    '{"actual":' .. I(actual) .. ',"released":' .. I(released) .. over .. also .. metrics .. metadata .. '}')
  for _, scope in ipairs(flagged) do emit('over_limit', scope, rec.unit, nil, rid) end
  for _, su in ipairs(over_limit or NO_HOLDS) do emit('over_limit', su[1], su[2], nil, rid) end
  return push_balances(reply, budgets)
end

--@@ release
--@include rules-settle
-- F: rid, hash; TEXT: reason. Reply: {"release", released, unit, holds in other units, balances…} or a replay.
OPS.release = function()
  local rid, key, hash, reason = F[1], KEY, F[2], TEXT
  expire_overdue()
  local rec, answer = settle_target('release', rid, key, hash)
  if not rec then return answer end
  local budgets = load_rolled(rec.budgeted, rec.unit, true)
  unhold(budgets, rec.estimate)
  local also, holds = nil, NO_HOLDS
  if rec.holds_text ~= '' then
    budgets = append({}, budgets)
    holds = other_holds(rec)
    for _, h in ipairs(holds) do
      local on = load_rolled(h.scopes, h.unit, true)
      unhold(on, h.amount)
      append(budgets, on)
    end
    also = '"also":' .. holds_json(holds, 'amount')
  end
  if rec.windowed then TIME().settle_windows(rec, budgets, holds, nil) end
  save_budgets(budgets)
  local reply = {'release', I(rec.estimate), rec.unit, rec.holds_text}
  settled(rec, 'RELEASED', -1, 'release', key, hash, reply[2] .. SEP .. reply[3] .. SEP .. reply[4])
  local data = nil
  if reason ~= '' then data = '"reason":' .. q(reason) end
  if also then data = (data and data .. ',' or '') .. also end
  emit('released', rec.scope_path, rec.unit, rec.estimate, rid, nil, data and '{' .. data .. '}')
  return push_balances(reply, budgets)
end

--@@ extend
--@include rules-settle
-- F: rid, hash, extend_by_ms, max_extensions.
-- Reply: {"extend", expires_at, now, rid, balances…}; a replay: {"replay", "expires_at\31rid", now, balances…}.
HEAD = 2
OPS.extend = function()
  local rid, key, hash, by, max_extensions = F[1], KEY, F[2], tonumber(F[3]), number_or_nil(F[4])
  expire_overdue()
  local rec = load_record(rid)
  if not rec then return not_found(rid) end
  local prior, mismatch = replay('extend', key, hash)
  if mismatch then return mismatch end
  if prior then return push_balances({'replay', prior, NOW_S}, hold_budgets(rec)) end
  local verdict, refusal = extend_verdict(rec, max_extensions)
  if verdict == nil then return refusal end
  if verdict == 'expire' then
    expire(rec)
    return fail('RESERVATION_EXPIRED', 'reservation ' .. rid .. ' expired')
  end
  rec.expires = rec.expires + by
  rec.deadline = rec.expires + rec.grace
  rec.extensions = rec.extensions + 1
  save_record(rec)
  zset_put(DUE, rid, rec.deadline)
  emit('extended', rec.scope_path, rec.unit, nil, rid, nil,
    '{"expires_at_ms":' .. I(rec.expires) .. ',"extend_by_ms":' .. I(by) .. '}')
  local reply = {'extend', I(rec.expires), NOW_S}
  remember(hash, reply[2] .. SEP .. rid)
  return push_balances(reply, hold_budgets(rec))
end

--@@ event
--@include rules-lookup
--@include rules-settle
--@include rules-admin
-- F: hash, unit, actual, policy, allow_unbudgeted, also ("UNIT|amount …"), subject, action, metrics, metadata,
-- scopes…
-- Reply: {"event", stream id, charged, budgeted scopes, charges in other units, balances…} or a replay.
HEAD = 1
OPS.event = function()
  local key, hash, unit, actual, policy = KEY, F[1], F[2], tonumber(F[3]), F[4]
  local allow_unbudgeted = F[5] == '1'
  local scopes = F.scopes
  if scopes == nil then
    scopes = {}
    for i = 11, #F do scopes[#scopes + 1] = F[i] end
    F.scopes = scopes
    F.also = decode_amounts(F[6])
    F.units = {unit}
    for _, a in ipairs(F.also) do F.units[#F.units + 1] = a.unit end
  end
  local also, path = F.also, scopes[#scopes]
  expire_overdue()
  local prior, mismatch = replay('event', key, hash)
  if mismatch then return mismatch end
  if prior then return replayed(prior, unit, 3, 4) end
  load_rolled(scopes, nil, true)
  local by_unit, failure = budgets_by_unit(scopes, F.units, allow_unbudgeted)
  if failure then return failure end
  if by_unit == nil then return fail('NOT_FOUND', 'no budget for ' .. path .. ' or its parents', {scope = path}) end
  local budgets = by_unit[unit]
  failure = check_debit(budgets)
  for _, a in ipairs(also) do failure = failure or check_debit(by_unit[a.unit]) end
  if failure then return failure end
  -- A refusal on any unit comes before anything is saved: nothing is charged on the others either.
  local debts = debts_before(policy, budgets)
  local charged, flagged = settle(budgets, 0, actual, policy, false)
  if not charged then return flagged end
  local charges, over_limit = NO_HOLDS, NO_HOLDS
  if #also > 0 then
    charges, over_limit, budgets = {}, {}, append({}, budgets)
    for _, a in ipairs(also) do
      local on = by_unit[a.unit]
      if #on > 0 then
        debts = debts_before(policy, on, debts)
        local got, more = settle(on, 0, a.amount, policy, false)
        if not got then return more end
        local names = {}
        for i, b in ipairs(on) do names[i] = b.scope end
        charges[#charges + 1] = {unit = a.unit, amount = a.amount, charged = got, scopes = names}
        for _, scope in ipairs(more) do over_limit[#over_limit + 1] = {scope, a.unit} end
        append(budgets, on)
      end
    end
  end
  after_charge(budgets, debts, nil)
  local names = {}
  for _, b in ipairs(budgets) do
    if b.unit == unit then names[#names + 1] = b.scope end
  end
  local also_data = ''
  if #charges > 0 then
    local parts = {}
    for i, c in ipairs(charges) do
      parts[i] = q(c.unit) .. ':{"charged":' .. I(c.charged) .. ',"scopes":' .. quoted_list(c.scopes) .. '}'
    end
    also_data = ',"also":{' .. concat(parts, ',') .. '}'
  end
  local data = '{"scopes":' .. quoted_list(names) .. ',"actual":' .. I(actual) .. ',"subject":' .. F[7] ..
    ',"action":' .. F[8] .. ',"over_limit":' .. quoted_list(flagged) .. ',"metrics":' ..
    (F[9] ~= '' and F[9] or 'null') .. ',"metadata":' .. (F[10] ~= '' and F[10] or 'null') ..
    ',"key":' .. q(key) .. also_data .. '}'
  local id = emit('debited', path, unit, charged, nil, nil, data)
  for _, b in ipairs(budgets) do -- the charge in the spend log of every rate-limited budget
    if b.tm and b.tm.limits then
      local got = charged
      for _, c in ipairs(charges) do
        if c.unit == b.unit then got = c.charged end
      end
      TIME().window_add(b, 'e' .. id, got)
      TIME().burn_alerts(b, nil)
    end
  end
  save_budgets(budgets)
  for _, scope in ipairs(flagged) do emit('over_limit', scope, unit) end
  for _, su in ipairs(over_limit) do emit('over_limit', su[1], su[2]) end
  local reply = {'event', id, I(charged), concat(names, ','), #charges > 0 and encode_holds(charges) or ''}
  remember(hash, joined(reply, 2, 5))
  return push_balances(reply, budgets)
end

--@@ note
-- F: type, scope, reason code, data JSON. Reply: {"note", stream id}.
OPS.note = function()
  expire_overdue()
  return {'note', emit(F[1], F[2], nil, nil, nil, F[3], optional(F[4]))}
end

--@@ budget
--@include rules-admin
-- F: op, scope, unit, amount, overdraft_limit, caps JSON ("" = not given), then for set: period, its coming
-- boundaries when it is a calendar period ("ms,ms,…"), rate limits, alerts (each '' = not given, '-' = none;
-- formats as in the budget text). Reply: {"budget", field, text}.
OPS.budget = function()
  local op, scope, unit = F[1], F[2], F[3]
  local amount, overdraft_limit, caps = number_or_nil(F[4]), number_or_nil(F[5]), optional(F[6])
  local period, bounds, limits, alerts = F[7] or '', F[8] or '', F[9] or '', F[10] or ''
  expire_overdue()
  local b = load_rolled({scope}, unit, true)[1]
  if op == 'set' then
    if bounds ~= '' then TIME().sent_bounds(period, bounds) end
    local data
    if not b then
      b = {scope = scope, unit = unit, field = scope .. '|' .. unit, allocated = amount, spent = 0, reserved = 0,
           debt = 0, overdraft_limit = overdraft_limit or 0, is_over_limit = false, status = 'ACTIVE',
           caps = (caps and caps ~= '{}') and caps or '', timing = ''}
      data = ''
    else
      data = sub(set_allocation(b, amount, overdraft_limit, caps), 2, -2)
    end
    local failure = TIME().set_time_policy(b, period, limits, alerts)
    if failure then return failure end
    if bounds ~= '' then rcall('HSET', KEYS[8], period, bounds) end
    if b.tm and b.tm.period then
      data = (data ~= '' and data .. ',' or '') .. '"period":' .. TIME().period_json(b.tm.period)
    end
    if period ~= '' then zset_put(TIMED.periods, b.field, b.tm.period_end or false) end
    save_budgets({b})
    emit('budget_set', scope, unit, amount, nil, nil, data ~= '' and '{' .. data .. '}' or nil)
    return {'budget', b.field, b.text}
  end
  if not b then return fail('NOT_FOUND', 'no ' .. unit .. ' budget at ' .. scope, {scope = scope}) end
  local kind, event_amount, data = nil, nil, nil
  if op == 'fund' then
    local closed = check_open(b)
    if closed then return closed end
    if b.allocated + amount > MAX_EXACT then
      return fail('INVALID_REQUEST', 'the allocation would pass what the Redis store keeps exactly (2^53 - 1)')
    end
    data = '{"debt_repaid":' .. I(fund(b, amount)) .. '}'
    kind, event_amount = 'funded', amount
  else
    local refusal
    kind, refusal = change_status(b, op)
    if not kind then return refusal end
  end
  save_budgets({b})
  emit(kind, scope, unit, event_amount, nil, nil, data)
  return {'budget', b.field, b.text}
end

--@@ sweep
-- F: limit. Reply: {"sweep", expired, pruned}.
OPS.sweep = function()
  local limit = tonumber(F[1])
  local n = expire_due(limit)
  -- Periods that ended and that nobody touched since roll over (Python: operations.sweep), earliest end first.
  zset_flush(TIMED.periods)
  local got, due = rcall('ZRANGEBYSCORE', KEYS[7], '-inf', NOW_S, 'WITHSCORES', 'LIMIT', 0, limit), {}
  for i = 1, #got, 2 do
    local scope, unit = match(got[i], '^(.*)|([^|]*)$')
    due[#due + 1] = {tonumber(got[i + 1]), scope, unit}
  end
  table.sort(due, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    if x[2] ~= y[2] then return x[2] < y[2] end
    return x[3] < y[3]
  end)
  for _, d in ipairs(due) do
    local b = TIME().budget_at(d[2], d[3])
    if b then TIME().roll(b, true) end
  end
  if TIMED.rolled[1] then TIME().write_rolls() end
  -- Finalized reservations older than the retention go, with all their fields and their listing entry;
  -- straight in Redis, after what is pending, and the cache forgets the fields.
  local err = flush()
  if err ~= nil then error(err) end
  local old = rcall('ZRANGEBYSCORE', FINALIZED_KEY, '-inf', '(' .. I(NOW - RETENTION_MS), 'LIMIT', 0, 1000)
  for _, rid in ipairs(old) do
    local fields = {rid, rid .. '|s', rid .. '|c', rid .. '|k'}
    rcall('HDEL', RESERVATIONS_KEY, unpack(fields))
    for _, f in ipairs(fields) do RESERVATIONS.values[f] = nil end
    rcall('ZREM', IDS_KEY, rid)
    rcall('ZREM', FINALIZED_KEY, rid)
  end
  return {'sweep', n, #old}
end

--@@ read
-- F: scope prefix ('' for every scope), unit ('' for every unit). Reply: {"read", field, text, burn, …}: the
-- budgets as of now, nothing written (a period that has ended shows its new period; the roll-over itself is
-- the next write's or the sweeper's), and what each rate limit's window holds ("n,n", '' without limits)
-- (Python: operations.balances).
OPS.read = function()
  local prefix, unit = optional(F[1]), optional(F[2])
  local all, out = rcall('HGETALL', BUDGETS_KEY), {'read'}
  for i = 1, #all, 2 do
    local field, text = all[i], all[i + 1]
    local scope, u = match(field, '^(.*)|([^|]*)$')
    if (unit == nil or u == unit) and
        (prefix == nil or scope == prefix or sub(scope, 1, #prefix + 1) == prefix .. '/') then
      local burn = ''
      if find(text, '~', 1, true) then
        local b = decode_budget(scope, u, text)
        b.field = field
        if b.tm then
          local time = TIME()
          time.roll_period(b)
          if b.tm.limits then burn = time.list_text(time.window_now(b)) end
          text = encode_budget(b)
        end
      end
      out[#out + 1] = field
      out[#out + 1] = text
      out[#out + 1] = burn
    end
  end
  return out
end
