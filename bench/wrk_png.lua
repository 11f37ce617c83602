-- wrk script: POST the shipped sample PNGs to predict in turn, count answers by status, and print
-- one JSON line (throughput, latency percentiles, statuses, the mean `compute_ms` the answers report)
-- when the run ends. An optional third argument prefixes the path (a Ray Serve application's route
-- prefix, bench/ray_cluster.py).
--   wrk -t1 -c8 -d5s -s bench/wrk_png.lua http://127.0.0.1:8000 -- branchserve/loadtest/samples fmnist-resnet
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local folder, model, prefix = args[1], args[2], args[3] or ""
  local path = prefix .. "/v1/models/" .. model .. "/predict"
  requests = {}  -- formatted once: formatting each request cost wrk ~7 µs of the cores it shares
  for i = 0, 499 do
    local f = io.open(string.format("%s/%04d.png", folder, i), "rb")
    if f == nil then break end
    table.insert(requests, wrk.format("POST", path, {["Content-Type"] = "image/png"}, f:read("*a")))
    f:close()
  end
  n, ok, refused, other, compute = 0, 0, 0, 0, 0.0
end

function request()
  n = n + 1
  return requests[(n % #requests) + 1]
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    compute = compute + (tonumber(body:match('"compute_ms":%s*([-%d%.eE+]+)')) or 0)
  elseif status == 503 then refused = refused + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local total = {ok = 0, refused = 0, other = 0, compute = 0.0}
  for _, t in ipairs(threads) do
    total.ok = total.ok + t:get("ok")
    total.refused = total.refused + t:get("refused")
    total.other = total.other + t:get("other")
    total.compute = total.compute + t:get("compute")
  end
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "ok": %d, "refused": %d, "other": %d, "p50_ms": %.3f, "p99_ms": %.3f, "compute_ms_mean": %.4f, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, total.ok, total.refused, total.other,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, total.compute / math.max(total.ok, 1),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
