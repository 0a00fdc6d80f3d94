-- Point lookups by bound key on orders (TPC-H SF1: keys 1..6,000,000, a quarter of them used).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
function init(args)
  math.randomseed(os.time() * 1000 + id)
end
function request()
  local key = math.random(1, 6000000)
  return wrk.format("GET",
    "/v1/query?sql=SELECT%20*%20FROM%20orders%20WHERE%20o_orderkey%20%3D%20%241&params=%5B"
      .. key .. "%5D")
end
