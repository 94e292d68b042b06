-- bench/populate.lua: request every id in [first, last] once, as fast as
-- the connections allow, then stop. Used by bench/run to fill the token
-- cache (each request is a miss: one upstream call).
--   wrk -t T -c C -d LIMIT -s populate.lua URL -- first last T C MARK
-- wrk runs for its whole -d even once every thread has stopped, so each
-- thread creates the file MARK<tid> when it is done: bench/run waits for
-- them and then interrupts wrk.
-- Thread k of T takes ids first+k, first+k+T, ... The header named
-- X-Bench-User carries the id (see CardScanUserID in bench/run).
local threads, count = {}, 0 -- of the setup state only

function setup(thread)
    thread:set("tid", count)
    count = count + 1
    table.insert(threads, thread)
end

function init(args)
    -- the thread count comes as an argument: setting it from setup() on the
    -- threads already set up does not reach them
    first, last, stride = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
    conns = math.ceil(tonumber(args[4]) / stride)
    mark = args[5] .. tid
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["X-Bench-User"] = "@ID@"
    -- one formatted request, split around the id: request() only concatenates
    local r = wrk.format(nil, nil, h)
    prefix, suffix = r:match("^(.-)@ID@(.*)$")
    nextid = first + tid
    expected = 0
    if nextid <= last then expected = math.floor((last - nextid) / stride) + 1 end
    got, bad, extra = 0, 0, 0
end

function request()
    local id = nextid
    if id > last then
        id = last - ((last - first - tid) % stride) -- this thread's last id again: a hit
        extra = extra + 1
    else
        nextid = nextid + stride
    end
    return prefix .. id .. suffix
end

function response(status, headers, body)
    got = got + 1
    if status ~= 200 then bad = bad + 1 end
    -- done when every id has had its reply, or (should wrk have lost a
    -- request to a reconnect) once every connection has moved on to the
    -- extra requests; bench/run then requests any id still missing
    if (got >= expected or extra >= 2 * conns) and mark then
        local f = io.open(mark, "w")
        if f then f:close() end
        mark = nil
        wrk.thread:stop()
    end
end

function done(summary, latency, requests)
    local b = 0
    for _, t in ipairs(threads) do b = b + t:get("bad") end
    io.write(string.format("populate: non200=%d\n", b))
end
