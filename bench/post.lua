-- wrk script for bench/run.py: POST a JSON body with a bearer token; prints one JSON line at the end.
--
-- Environment (set by run.py):
--   BENCH_PATH    request path, e.g. /v1/tenants/bench/keys/k0/derive
--   BENCH_TOKEN   bearer token (empty: no Authorization header)
--   BENCH_BODY    file with the JSON body (fixed bodies: datakey, decrypt, encrypt, batch)
--   BENCH_DERIVE  "1": the body is {"id": "<thread>-<counter>"}, a new id on every request
--   BENCH_KEYS    N > 0: spread requests over keys k0..k(N-1) of the path's tenant (size scenario)
--   BENCH_HEADERS file of extra "Name: value" lines (e.g. a pre-signed SigV4 request for moto)

local path = os.getenv("BENCH_PATH") or "/"
local token = os.getenv("BENCH_TOKEN") or ""
local body_file = os.getenv("BENCH_BODY")
local derive = os.getenv("BENCH_DERIVE") == "1"
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "0")

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local fixed = nil

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if token ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  local hfile = os.getenv("BENCH_HEADERS")
  if hfile and hfile ~= "" then
    for line in io.lines(hfile) do
      local name, value = string.match(line, "^([^:]+):%s*(.*)$")
      if name then
        wrk.headers[name] = value
      end
    end
  end
  if body_file and body_file ~= "" then
    local f = assert(io.open(body_file, "rb"))
    fixed = f:read("*a")
    f:close()
  end
  tid = tid or 0
  math.randomseed(os.time() + tid)
end

function request()
  counter = counter + 1
  local p = path
  if nkeys > 0 then
    p = string.gsub(path, "/keys/[^/]+/", "/keys/k" .. math.random(0, nkeys - 1) .. "/")
  end
  local body = fixed
  if derive then
    body = '{"id": "vol-' .. tid .. '-' .. counter .. '"}'
  end
  return wrk.format(nil, p, nil, body)
end

local statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "errors_connect": %d, "errors_read": %d, "errors_write": %d, ' ..
    '"errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
