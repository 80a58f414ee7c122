-- wrk script for bench/trust.py: POST the same KServe v2 inference request on every call.
-- The request body is read once from the file named by the WRK_BODY environment variable, so
-- wrk sends byte for byte what `trtbuild bench` sends.
local path = assert(os.getenv("WRK_BODY"), "set WRK_BODY to the request body file")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
wrk.headers["Content-Type"] = "application/json"
file:close()
