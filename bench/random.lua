-- bench/random.lua: each request is for a random id in [first, last]
-- (header X-Bench-User, see CardScanUserID in bench/run); with
-- miss_pct > 0, that share of the requests is for a fresh id instead (a
-- cache miss: one upstream call).
--   wrk ... -s random.lua URL -- first last [miss_pct]
-- No response() function: wrk then skips parsing bodies and counts
-- non-2xx replies itself ("Non-2xx or 3xx responses").
local count = 0 -- of the setup state only

function setup(thread)
    thread:set("tid", count)
    count = count + 1
end

function init(args)
    first, last = tonumber(args[1]), tonumber(args[2])
    miss = tonumber(args[3] or "0") / 100
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["X-Bench-User"] = "@ID@"
    -- one formatted request, split around the id: request() only concatenates
    local r = wrk.format(nil, nil, h)
    prefix, suffix = r:match("^(.-)@ID@(.*)$")
    math.randomseed(os.time() * 100 + tid)
    fresh = 0
    tag = "m" .. tid .. "-" .. os.time() .. "-"
end

function request()
    if miss > 0 and math.random() < miss then
        fresh = fresh + 1
        return prefix .. tag .. fresh .. suffix
    end
    return prefix .. math.random(first, last) .. suffix
end
