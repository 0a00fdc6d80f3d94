-- A BI dashboard's mix on TPC-H SF1: half point lookups, the rest aggregates and top-N tiles
-- with varying parameters (so the result cache answers some and DuckDB the others).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
function init(args)
  math.randomseed(os.time() * 1000 + id)
end

local function escape(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
local function get(sql, params)
  return wrk.format("GET", "/v1/query?sql=" .. escape(sql) .. "&params=" .. escape(params))
end

local lookup = "SELECT * FROM orders WHERE o_orderkey = $1"
local items = "SELECT l_linenumber, l_quantity, l_extendedprice, l_shipdate FROM lineitem WHERE l_orderkey = $1"
local status = "SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders "
  .. "WHERE o_orderdate >= DATE '1995-01-01' + $1::INTEGER GROUP BY 1 ORDER BY 1"
local top = "SELECT o_custkey, sum(o_totalprice) AS total FROM orders WHERE o_orderdate "
  .. "BETWEEN DATE '1993-01-01' + $1::INTEGER AND DATE '1993-01-01' + $1::INTEGER + 30 "
  .. "GROUP BY 1 ORDER BY total DESC LIMIT 10"
local q1 = "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, "
  .. "sum(l_extendedprice * (1 - l_discount)) AS revenue, avg(l_discount) AS avg_disc, "
  .. "count(*) AS n FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - $1::INTEGER "
  .. "GROUP BY 1, 2 ORDER BY 1, 2"

function request()
  local r = math.random(100)
  if r <= 50 then
    return get(lookup, "[" .. math.random(1, 6000000) .. "]")
  elseif r <= 65 then
    return get(items, "[" .. math.random(1, 6000000) .. "]")
  elseif r <= 85 then
    return get(status, "[" .. math.random(0, 364) .. "]")
  elseif r <= 95 then
    return get(top, "[" .. math.random(0, 1500) .. "]")
  else
    return get(q1, "[" .. math.random(60, 120) .. "]")
  end
end
