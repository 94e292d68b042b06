/*
 * The cardscan-session handler: who asks (the authenticated user, through
 * CardScanUserID), what lib/'s serving decision says for them, and the JSON
 * reply. CardScanBackendUser's filter (mod_cardscan_backend.c) ends in
 * cs_request_serve too.
 */
#include "mod_cardscan_private.h"

#include "http_protocol.h"
#include "http_request.h"
#include "ap_expr.h"

cs_req_state *cs_request_state(request_rec *r, int create)
{
    cs_req_state *rs =
        ap_get_module_config(r->request_config, &cardscan_module);
    if (!rs && create) {
        rs = apr_pcalloc(r->pool, sizeof(*rs));
        ap_set_module_config(r->request_config, &cardscan_module, rs);
    }
    return rs;
}

/* ---------------------------------------------------------------- replies */

static int send_json(request_rec *r, int status, const char *body,
                     apr_size_t len)
{
    cs_req_state *rs = cs_request_state(r, 0);
    apr_bucket_brigade *bb;

    r->status = status;
    ap_set_content_type(r, "application/json");
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    cs_cors_allow(r, cs_config_dir(r));
    apr_table_setn(r->headers_out, "X-Content-Type-Options", "nosniff");
    ap_set_content_length(r, len);
    if (r->header_only)
        return OK;
    bb = apr_brigade_create(r->pool, r->connection->bucket_alloc);
    APR_BRIGADE_INSERT_TAIL(
        bb, apr_bucket_pool_create(body, len, r->pool, bb->bucket_alloc));
    ap_pass_brigade(rs && rs->reply ? rs->reply : r->output_filters, bb);
    return OK;
}

/* The outcome of a request, recorded once: the metric, and the request note
 * mod_log_config logs as %{cardscan-outcome}n. */
static void note_outcome(request_rec *r, cs_outcome_e outcome)
{
    cs_metrics_request(cs_proc.metrics, outcome);
    apr_table_setn(r->notes, "cardscan-outcome", cs_outcome_name(outcome));
}

int cs_request_error(request_rec *r, cs_outcome_e outcome, int status,
                     const char *code, const char *message)
{
    const char *body = cs_reply_error(r->pool, code, message);
    note_outcome(r, outcome);
    return send_json(r, status, body, strlen(body));
}

/* A token, or a failure with the seconds until the user's next call. */
static int send_entry(request_rec *r, const cs_entry_t *e, cs_outcome_e outcome)
{
    if (e->kind == CS_ENTRY_FAILURE)
        apr_table_setn(
            r->headers_out, "Retry-After",
            apr_itoa(r->pool, cs_serve_retry_after(e, apr_time_now())));
    note_outcome(r, e->kind == CS_ENTRY_TOKEN ? outcome : CS_OUT_ERROR);
    return send_json(r, e->kind == CS_ENTRY_TOKEN ? HTTP_OK : e->status,
                     e->body, e->body_len);
}

static int send_unavailable(request_rec *r, int retry_after)
{
    apr_table_setn(r->headers_out, "Retry-After",
                   apr_itoa(r->pool, retry_after));
    return cs_request_error(r, CS_OUT_UNAVAILABLE, HTTP_SERVICE_UNAVAILABLE,
                            "upstream_unavailable",
                            "the CardScan API is unavailable; retry later");
}

/* ---------------------------------------------------------- serving path */

/* The user has no token to serve: the reply of the user's one call. */
static int send_call(request_rec *r, cs_call *c, cs_entry_t *e)
{
    int retry_after = 0;

    switch (cs_call_make(c, e, &retry_after)) {
    case CS_MADE_WAITED:
        return send_entry(r, e, CS_OUT_WAITED);
    case CS_MADE_FAILED:
        return send_entry(r, e, CS_OUT_ERROR);
    case CS_MADE_UNAVAILABLE:
        return send_unavailable(r, retry_after);
    default:
        apr_table_setn(r->notes, "cardscan-upstream-ms",
                       apr_psprintf(r->pool, "%" APR_TIME_T_FMT,
                                    apr_time_as_msec(c->called)));
        return send_entry(r, e, CS_OUT_FETCHED);
    }
}

/* Serves one authenticated user: from the cache when it can, refreshing
 * ahead of expiry, from the user's recent failure, or through one call to
 * the API for all of the user's concurrent requests. */
static int serve_user(request_rec *r, const cs_dir_conf *d, const char *user_id)
{
    cs_call c;
    cs_entry_t tok, fail;
    int have_tok, have_fail;
    apr_time_t now = apr_time_now();

    cs_call_init(&c, r, r->server, r->pool, d, user_id);
    have_tok = cs_store_token(&c, now, &tok);
    switch (cs_serve_decide(have_tok ? &tok : NULL, NULL, now, &c.policy)) {
    case CS_DO_SERVE:
        cs_metrics_cache(cs_proc.metrics, 1);
        return send_entry(r, &tok, CS_OUT_HIT);
    case CS_DO_SERVE_REFRESH:
        cs_metrics_cache(cs_proc.metrics, 1);
        return send_entry(r, &tok,
                          cs_refresh_later(&c, &tok) ? CS_OUT_REFRESHED
                                                     : CS_OUT_HIT);
    default:
        break;
    }
    cs_metrics_cache(cs_proc.metrics, 0);
    have_fail = cs_store_read(&c, CS_ID_FAILURE, &fail);
    if (cs_serve_decide(have_tok ? &tok : NULL, have_fail ? &fail : NULL, now,
                        &c.policy) == CS_DO_FAIL)
        return send_entry(r, &fail, CS_OUT_ERROR);
    return send_call(r, &c, &tok);
}

int cs_request_unconfigured(request_rec *r, const cs_dir_conf *d)
{
    if (d->key && cs_proc.upstream)
        return 0;
    ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                  APLOGNO(10521) "mod_cardscan: %s",
                  d->key ? "the upstream client failed to start"
                         : "no CardScanAPIKey applies to this location");
    cs_request_error(r, CS_OUT_ERROR, HTTP_INTERNAL_SERVER_ERROR,
                     "not_configured",
                     "the CardScan session endpoint is not configured");
    return 1;
}

int cs_request_serve(request_rec *r, const cs_dir_conf *d, const char *user_id)
{
    const char *err = NULL;

    if (cs_user_id_check(r->pool, user_id, &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r,
                      APLOGNO(10524) "mod_cardscan: refusing the user id: %s",
                      err);
        return cs_request_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN,
                                "invalid_user_id", err);
    }
    return serve_user(r, d, user_id);
}

/* ---------------------------------------------------------------- handler */

/* Requests the endpoint refuses whoever asks: a subrequest, a method other
 * than GET and POST, a body that cannot be read. DECLINED: none of them. */
static int refused_request(request_rec *r)
{
    /* A subrequest (an SSI include, a mod_rewrite lookahead, ...) would put
     * the user's token into another response: never, and no API call. */
    if (r->main) {
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10541) "mod_cardscan: refusing a subrequest "
                                     "for %s (from %s)",
                      r->uri, r->main->uri);
        return cs_request_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "subrequest",
                                "the session endpoint does not answer "
                                "subrequests (such as server-side includes)");
    }
    r->allowed = (AP_METHOD_BIT << M_GET) | (AP_METHOD_BIT << M_POST);
    if (r->method_number != M_GET && r->method_number != M_POST) {
        apr_table_setn(r->headers_out, "Allow", "GET, POST");
        return cs_request_error(r, CS_OUT_DENIED, HTTP_METHOD_NOT_ALLOWED,
                                "method_not_allowed", "use GET or POST");
    }
    /* a POST body means nothing here: read and drop it */
    if (ap_discard_request_body(r) != OK)
        return cs_request_error(r, CS_OUT_DENIED, HTTP_BAD_REQUEST,
                                "bad_request",
                                "the request body could not be read");
    return DECLINED;
}

/* The user id of an authenticated request, from CardScanUserID; NULL when
 * there is none (the refusal is sent). Identity comes only from the
 * authenticated request, never from anything the client sends, and fails
 * closed: no authenticated user, no token, even when CardScanUserID does
 * not name REMOTE_USER. */
static const char *authenticated_user_id(request_rec *r, const cs_dir_conf *d)
{
    const char *user_id, *err = NULL;

    if (!r->user || !*r->user) {
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10523) "mod_cardscan: no authenticated user: "
                                     "protect this location with Apache "
                                     "authentication");
        cs_request_error(r, CS_OUT_DENIED, HTTP_UNAUTHORIZED, "unauthenticated",
                         "log in first");
        return NULL;
    }
    user_id = d->user_id ? ap_expr_str_exec(r, d->user_id, &err) : r->user;
    if (err) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10522) "mod_cardscan: CardScanUserID: %s", err);
        user_id = NULL;
    }
    if (!user_id || !*user_id) {
        /* the user only from trace4 up: ids are personal data */
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10530) "mod_cardscan: CardScanUserID is empty "
                                     "for this login");
        ap_log_rerror(APLOG_MARK, APLOG_TRACE4, 0, r,
                      APLOGNO(10540) "mod_cardscan: CardScanUserID is empty "
                                     "for user %s",
                      r->user);
        cs_request_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "no_user_id",
                         "no user id is known for this login");
        return NULL;
    }
    return user_id;
}

int cs_request_handler(request_rec *r)
{
    const cs_dir_conf *d;
    const char *user_id;
    int refused;

    if (!r->handler || strcmp(r->handler, CS_HANDLER) != 0)
        return DECLINED;
    if ((refused = refused_request(r)) != DECLINED)
        return refused;
    d = cs_config_dir(r);
    if (cs_request_unconfigured(r, d) ||
        !(user_id = authenticated_user_id(r, d)))
        return OK;
    return cs_request_serve(r, d, user_id);
}
