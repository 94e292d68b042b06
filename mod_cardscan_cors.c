/*
 * CORS for the session endpoint: the reply's Access-Control-* headers for
 * the origins CardScanAllowOrigin lists, and the preflight, which browsers
 * send without credentials and which is therefore let through Apache's
 * authentication here, and answered without calling the API.
 */
#include "mod_cardscan_private.h"

#include "http_core.h"
#include "http_protocol.h"
#include "http_request.h"
#include "ap_expr.h"

#define CS_CORS_MAX_AGE "600" /* seconds a browser may reuse a preflight */

/* A reply to an origin CardScanAllowOrigin lists may be read by that
 * origin's scripts, with credentials. Never "*"; other origins get no
 * Access-Control-* header. In err_headers_out, so that errors carry it too.
 * Returns whether the request's origin is listed. */
int cs_cors_allow(request_rec *r, const cs_dir_conf *d)
{
    const char *origin, *vary;

    if (!d->origins)
        return 0;
    vary = apr_table_get(r->err_headers_out, "Vary");
    if (!vary || !ap_find_token(r->pool, vary, "Origin"))
        apr_table_mergen(r->err_headers_out, "Vary", "Origin");
    origin = apr_table_get(r->headers_in, "Origin");
    if (!cs_origin_listed(d->origins, origin))
        return 0;
    apr_table_setn(r->err_headers_out, "Access-Control-Allow-Origin", origin);
    apr_table_setn(r->err_headers_out, "Access-Control-Allow-Credentials",
                   "true");
    return 1;
}

/* A location that serves tokens: SetHandler cardscan-session, or
 * CardScanBackendUser. Asked before the type checker sets r->handler. */
static int serves_tokens(request_rec *r, const cs_dir_conf *d)
{
    core_dir_config *core = ap_get_core_module_config(r->per_dir_config);
    const char *handler, *err = NULL;

    if (d->backend_header)
        return 1;
    if (!core || !core->expr_handler)
        return 0;
    handler = ap_expr_str_exec(r, core->expr_handler, &err);
    return !err && handler && strcmp(handler, CS_HANDLER) == 0;
}

/* Browsers send a CORS preflight without credentials. A genuine one (OPTIONS
 * with Origin and Access-Control-Request-Method) from a listed origin, to a
 * location that serves tokens, is authorised here without authentication:
 * its answer (cs_cors_preflight) says only which methods and headers the
 * origin may use, and never calls the API. Every other request goes on to
 * Apache's authentication as usual. */
int cs_cors_access(request_rec *r)
{
    const cs_dir_conf *d = cs_config_dir(r);

    if (!d->origins || r->main || !serves_tokens(r, d) ||
        !cs_origin_listed(d->origins, apr_table_get(r->headers_in, "Origin")))
        return DECLINED;
    if (r->method_number == M_OPTIONS &&
        apr_table_get(r->headers_in, "Access-Control-Request-Method")) {
        cs_request_state(r, 1)->preflight = 1;
        ap_log_rerror(APLOG_MARK, APLOG_TRACE1, 0, r,
                      "mod_cardscan: CORS preflight from %s",
                      apr_table_get(r->headers_in, "Origin"));
        return OK;
    }
    /* Apache's own 401 is readable by the app too, so that it can tell
     * "log in first" from a network error (not a backend's pages) */
    if (!d->backend_header)
        cs_cors_allow(r, d);
    return DECLINED;
}

/* Runs before every other handler (mod_proxy's included) for the preflights
 * cs_cors_access let through. */
int cs_cors_preflight(request_rec *r)
{
    cs_req_state *rs = cs_request_state(r, 0);

    if (!rs || !rs->preflight)
        return DECLINED;
    if (ap_discard_request_body(r) != OK)
        return HTTP_BAD_REQUEST;
    cs_cors_allow(r, cs_config_dir(r));
    apr_table_setn(r->headers_out, "Access-Control-Allow-Methods", "GET, POST");
    if (apr_table_get(r->headers_in, "Access-Control-Request-Headers"))
        apr_table_setn(r->headers_out, "Access-Control-Allow-Headers",
                       "Authorization, Content-Type, Accept");
    apr_table_setn(r->headers_out, "Access-Control-Max-Age", CS_CORS_MAX_AGE);
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    r->status = HTTP_NO_CONTENT;
    return OK;
}
