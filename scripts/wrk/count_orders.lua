-- 30 BI users' queries for scripts/bench_upgrade.sh: a count over orders (TPC-H SF1) with a random
-- bound, so that every request misses the result cache.
-- Each thread of each run draws its own bounds (Lua's generator is unseeded otherwise, and every
-- run would repeat the last one's queries: result-cache hits).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  math.randomseed(os.time() * 1000 + id)
end
request = function()
  local bound = math.random(1, 6000000)
  return wrk.format("GET", "/v1/query?sql=SELECT%20count(*)%20AS%20n%20FROM%20orders%20WHERE%20o_orderkey%20%3C%20" .. bound)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("%d %d %d %d %d %.1f %.1f %.1f\n", summary.requests, e.connect,
    e.read + e.write, e.status, e.timeout, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
