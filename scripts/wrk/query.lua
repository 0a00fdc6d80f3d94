-- One query over and over, each request with freshly drawn parameters: GET /v1/query?sql=…&params=…
-- (the URL's path and query are replaced; only its scheme, host and port count).
--
--   wrk -t2 -c30 -d10s -s scripts/wrk/query.lua http://127.0.0.1:8000 -- SQL [GEN] [OPTION...]
--
-- GEN: "-" or "none" (no parameters; the default), or a comma-separated list, one generator per
-- positional parameter ($1, $2, …), the ones crates/query-core/benches/raw_queries.rs understands:
--   int:LO:HI    a uniform integer in LO..HI
--   orderkey:N   an existing TPC-H order key: floor(n / 8) * 32 + n % 8 for a uniform n in 1..N
--                (the generator keeps the first 8 of every 32 keys; SF1 has N = 1500000)
--   const:V      the integer V
-- OPTION: format=json|ndjson|csv|arrow|parquet, and no-cache (Cache-Control: no-cache: the result
-- cache is not looked up, DuckDB answers every request).
-- Used by scripts/capacity.sh.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local function escape(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local gens = {}
local base = nil
local headers = {}
local fixed = nil

local function parse_gen(spec)
  local list = {}
  if spec == nil or spec == "" or spec == "-" or spec == "none" then
    return list
  end
  for one in spec:gmatch("[^,]+") do
    local lo, hi = one:match("^int:(%-?%d+):(%-?%d+)$")
    local n = one:match("^orderkey:(%d+)$")
    local v = one:match("^const:(%-?%d+)$")
    if lo then
      local a, b = tonumber(lo), tonumber(hi)
      table.insert(list, function() return math.random(a, b) end)
    elseif n then
      local orders = tonumber(n)
      table.insert(list, function()
        local i = math.random(1, orders)
        return math.floor(i / 8) * 32 + i % 8
      end)
    elseif v then
      local c = tonumber(v)
      table.insert(list, function() return c end)
    else
      error("unknown generator " .. one .. " (int:LO:HI, orderkey:N, const:V)")
    end
  end
  return list
end

function init(args)
  -- Each thread draws its own parameters (Lua's generator is unseeded otherwise, and every run
  -- would repeat the last one's: result-cache hits).
  math.randomseed(os.time() * 1000 + id)
  local sql = args[1]
  if sql == nil or sql == "" then
    error("usage: wrk … -s scripts/wrk/query.lua URL -- SQL [GEN] [OPTION...]")
  end
  gens = parse_gen(args[2])
  base = "/v1/query?sql=" .. escape(sql)
  for i = 3, #args do
    local format = args[i]:match("^format=(%w+)$")
    if format then
      base = base .. "&format=" .. format
    elseif args[i] == "no-cache" then
      headers["Cache-Control"] = "no-cache"
    else
      error("unknown option " .. args[i])
    end
  end
  if #gens == 0 then
    fixed = wrk.format("GET", base, headers)
  end
end

function request()
  if fixed then
    return fixed
  end
  local values = {}
  for i, gen in ipairs(gens) do
    values[i] = string.format("%d", gen())
  end
  local params = escape("[" .. table.concat(values, ",") .. "]")
  return wrk.format("GET", base .. "&params=" .. params, headers)
end
