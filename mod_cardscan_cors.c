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
    /* core lowercases a SetHandler name; the expression is as written */
    return !err && handler && strcasecmp(handler, CS_HANDLER) == 0;
}

/* Browsers send a CORS preflight without credentials. A genuine one from a
 * listed origin, to a location that serves tokens, skips authentication
 * here, and nothing else: this hook runs after mod_authz_core's
 * authorize_userless, so a location that refuses everyone (Require all
 * denied, ip, expr) has refused the preflight already; it answers only
 * where authorization needs a user. The answer (cs_cors_preflight) says
 * which methods and headers the origin may use, and never calls the API or
 * a backend. Every other request goes on to Apache's authentication. */
/* A genuine preflight: OPTIONS with Access-Control-Request-Method, the
 * client's own request (not a subrequest, nor an internal redirect such as
 * an ErrorDocument, which must never inherit it). A body it may carry is
 * read and dropped by cs_cors_preflight. */
static int is_preflight(request_rec *r)
{
    return r->method_number == M_OPTIONS && !r->main && !r->prev &&
           apr_table_get(r->headers_in, "Access-Control-Request-Method");
}

/* Whether r is a preflight this module answers: genuine, from a listed
 * origin, to a location that serves tokens. */
static int answers_preflight(request_rec *r, const cs_dir_conf *d)
{
    return d->origins && is_preflight(r) && serves_tokens(r, d) &&
           cs_origin_listed(d->origins, apr_table_get(r->headers_in, "Origin"));
}

int cs_cors_access(request_rec *r)
{
    const cs_dir_conf *d = cs_config_dir(r);

    if (answers_preflight(r, d)) {
        ap_log_rerror(APLOG_MARK, APLOG_TRACE1, 0, r,
                      "mod_cardscan: CORS preflight from %s",
                      apr_table_get(r->headers_in, "Origin"));
        return OK;
    }
    /* Apache's own 401 is readable by the app too, so that it can tell
     * "log in first" from a network error (not a backend's pages) */
    if (d->origins && !d->backend_header && !r->main && serves_tokens(r, d))
        cs_cors_allow(r, d);
    return DECLINED;
}

/* Runs before every other handler (mod_proxy's included): a preflight that
 * got here passed the location's access control (without authentication
 * where cs_cors_access let it) and is answered here, never by the API nor a
 * backend. */
int cs_cors_preflight(request_rec *r)
{
    const cs_dir_conf *d = cs_config_dir(r);

    if (!answers_preflight(r, d))
        return DECLINED;
    /* a body means nothing here; one that cannot be read ends the
     * connection, and its error page (an internal redirect) is checked for
     * access again, as any request */
    if (ap_discard_request_body(r) != OK) {
        r->connection->keepalive = AP_CONN_CLOSE;
        return HTTP_BAD_REQUEST;
    }
    cs_cors_allow(r, d);
    apr_table_setn(r->headers_out, "Access-Control-Allow-Methods", "GET, POST");
    if (apr_table_get(r->headers_in, "Access-Control-Request-Headers"))
        apr_table_setn(r->headers_out, "Access-Control-Allow-Headers",
                       "Authorization, Content-Type, Accept");
    apr_table_setn(r->headers_out, "Access-Control-Max-Age", CS_CORS_MAX_AGE);
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    r->status = HTTP_NO_CONTENT;
    return OK;
}
