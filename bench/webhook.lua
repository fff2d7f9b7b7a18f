-- wrk script: POST a GitLab push payload, each request with an X-Gitlab-Event-UUID of its own.
--
--   wrk -s bench/webhook.lua URL -- BODY_FILE TOKEN RUN_ID [close]
--
-- Without a unique delivery id every request after the first would take
-- OpsCD's duplicate path. With "close", every request comes on a connection of
-- its own, as GitLab delivers webhooks. done() prints one line "BENCH_JSON {...}".

local threads = {}
local prefix = ""
local counter = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Gitlab-Event"] = "Push Hook"
  wrk.headers["X-Gitlab-Token"] = args[2]
  if args[4] == "close" then
    wrk.headers["Connection"] = "close"
  end
  prefix = args[3] .. "-" .. thread_number .. "-"
end

function request()
  counter = counter + 1
  wrk.headers["X-Gitlab-Event-UUID"] = prefix .. counter
  return wrk.format()
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p90": %d, ' ..
    '"p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
