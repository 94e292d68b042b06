/*
 * One user's call to the CardScan API, as the request handler and the
 * refresh threads both make it: the breaker's gate, one retry, the
 * classification of the reply into a token or the failure clients are told
 * about (lib/cs_policy.c), and single flight: one call per user across the
 * processes (and servers) that share the store, the other requests waiting
 * for its result.
 */
#include "mod_cardscan_private.h"

#include <stdarg.h>

#define CS_MAX_BODY (64 * 1024)

void cs_call_log(const cs_call *c, int level, apr_status_t rv, const char *fmt,
                 ...)
{
    va_list ap;
    const char *msg;

    if (c->r ? !APLOG_R_IS_LEVEL(c->r, level) : !APLOG_IS_LEVEL(c->s, level))
        return;
    va_start(ap, fmt);
    msg = apr_pvsprintf(c->p, fmt, ap);
    va_end(ap);
    if (c->r)
        ap_log_rerror(APLOG_MARK, level, rv, c->r, "%s", msg);
    else
        ap_log_error(APLOG_MARK, level, rv, c->s, "%s", msg);
}

void cs_call_init(cs_call *c, request_rec *r, server_rec *s, apr_pool_t *p,
                  const cs_dir_conf *d, const char *user_id)
{
    memset(c, 0, sizeof(*c));
    c->r = r;
    c->s = s;
    c->p = p;
    c->d = d;
    c->sc = cs_config_srv(s);
    c->user_id = user_id;
    c->endpoint = cs_config_endpoint(d);
    c->policy.min_ttl = cs_config_min_ttl(d);
    c->policy.refresh_pct = cs_config_refresh_pct(d);
    cs_cache_id(d->key, c->endpoint, user_id, c->ref.id);
    cs_cache_key_bytes(c->ref.id, c->ref.bytes);
}

static void trace_line(void *baton, const char *line)
{
    const cs_call *c = baton;
    cs_call_log(c, APLOG_TRACE4, 0, "libcurl: %s", line);
}

static cs_breaker_t *breaker_of(const cs_call *c)
{
    return cs_proc.metrics && cs_conf.breaker_failures
               ? cs_breaker_slot(cs_proc.metrics->breakers, c->endpoint)
               : NULL;
}

/* The user as the breaker counts users: 32 bits of the cache id. */
static apr_uint32_t breaker_user(const cs_call *c)
{
    apr_uint32_t user = ((apr_uint32_t)c->ref.bytes[4] << 24) |
                        ((apr_uint32_t)c->ref.bytes[5] << 16) |
                        ((apr_uint32_t)c->ref.bytes[6] << 8) | c->ref.bytes[7];
    return user ? user : 1;
}

int cs_call_breaker_refuses(const cs_call *c, int *retry_after)
{
    cs_breaker_t *breaker = breaker_of(c);
    return breaker && !cs_breaker_allow_user(breaker, apr_time_now(),
                                             breaker_user(c), retry_after);
}

/* The exchanges of one call (cs_call_retry: at most one retry); each feeds
 * the metrics and the breaker. */
static void call_upstream(cs_call *c, cs_upstream_req_t *req,
                          cs_upstream_resp_t *resp)
{
    cs_breaker_t *breaker = breaker_of(c);
    apr_uint32_t user = breaker_user(c);
    apr_time_t start = apr_time_now(), deadline = start + req->timeout;

    for (int attempt = 0;; attempt++) {
        apr_interval_time_t left;
        cs_upstream_fetch(cs_proc.upstream, c->p, req, resp);
        if (resp->result == CS_UP_ABORTED)
            break; /* the process is exiting: not the upstream's health */
        cs_metrics_upstream(cs_proc.metrics, resp->result, resp->status,
                            resp->elapsed);
        if (breaker &&
            cs_breaker_record(breaker, apr_time_now(),
                              !cs_upstream_failed(resp), user,
                              cs_conf.breaker_failures, cs_conf.breaker_period))
            cs_call_log(c, APLOG_ERR, 0,
                        APLOGNO(10528) "mod_cardscan: %s failed %u times in a "
                                       "row for several users: not calling "
                                       "it for %" APR_TIME_T_FMT " s",
                        req->endpoint, cs_conf.breaker_failures,
                        apr_time_sec(cs_conf.breaker_period));
        left = deadline - apr_time_now();
        if (!cs_call_retry(resp, attempt, left,
                           breaker &&
                               cs_breaker_is_open(breaker, apr_time_now())))
            break;
        cs_call_log(c, APLOG_INFO, 0,
                    APLOGNO(10529) "mod_cardscan: retrying once after: %s",
                    resp->detail ? resp->detail
                                 : apr_psprintf(c->p, "HTTP %d", resp->status));
        req->timeout = left;
        if (req->connect_timeout > left)
            req->connect_timeout = left;
    }
    c->called += apr_time_now() - start;
}

/* The log line of a verdict: what an administrator needs to act on. */
static void log_verdict(const cs_call *c, const cs_verdict_t *v,
                        const cs_upstream_resp_t *resp)
{
    switch (v->kind) {
    case CS_VERDICT_TOKEN:
        break;
    case CS_VERDICT_INVALID:
        cs_call_log(c, APLOG_ERR, 0, APLOGNO(10516) "mod_cardscan: %s: %s",
                    c->endpoint, v->detail);
        break;
    case CS_VERDICT_KEY_REJECTED:
        cs_call_log(c, APLOG_ERR, 0,
                    APLOGNO(10517) "mod_cardscan: %s rejected the API key %s "
                                   "(HTTP %d): check CardScanAPIKey",
                    c->endpoint, c->d->key->masked, resp->status);
        break;
    case CS_VERDICT_RATE_LIMITED:
        cs_call_log(c, APLOG_WARNING, 0,
                    APLOGNO(10518) "mod_cardscan: %s: rate limited (HTTP 429, "
                                   "Retry-After %s)",
                    c->endpoint,
                    resp->retry_after ? resp->retry_after : "none");
        break;
    case CS_VERDICT_HTTP_ERROR:
        cs_call_log(c, APLOG_ERR, 0,
                    APLOGNO(10519) "mod_cardscan: %s answered HTTP %d%s",
                    c->endpoint, resp->status,
                    resp->status >= 300 && resp->status < 400
                        ? " (redirects are not followed)"
                        : "");
        break;
    default:
        cs_call_log(c, APLOG_ERR, 0, APLOGNO(10520) "mod_cardscan: %s: %s",
                    c->endpoint,
                    resp->detail ? resp->detail : "upstream failure");
    }
}

/* Compares a new token's IdentityId with the user's pin and carries the
 * verdict out (lib/cs_identity.c); 0 when the token is refused (e is then
 * the user's failure). The user and the identities are logged only at
 * trace4: they are personal data. */
static int pin_check(cs_call *c, const cs_token_t *tok, apr_time_t now,
                     cs_entry_t *e)
{
    cs_pin_mode_e mode = cs_config_pin_mode(c->d);
    cs_entry_t pe;
    cs_pin_t pin, *have = NULL;
    const char *err = NULL;
    cs_pin_verdict_e v;

    if (mode != CS_PIN_OFF && cs_store_read(c, CS_ID_PIN, &pe) &&
        cs_pin_from_entry(&pe, &pin, &err) == APR_SUCCESS)
        have = &pin;
    v = cs_pin_decide(have, tok->identity_id, mode, now);
    if (v != CS_PIN_ACCEPT) {
        cs_metrics_identity_change(cs_proc.metrics);
        cs_call_log(
            c, APLOG_ERR, 0,
            APLOGNO(10604) "mod_cardscan: %s: a new token carries "
                           "another IdentityId than the user's "
                           "pinned one (pinned %" APR_TIME_T_FMT " s ago); %s",
            c->endpoint, apr_time_sec(now - pin.pinned),
            v == CS_PIN_REFUSE ? "refused (CardScanIdentityPinning enforce)"
                               : "served (CardScanIdentityPinning alarm)");
        cs_call_log(c, APLOG_TRACE4, 0,
                    APLOGNO(10605) "mod_cardscan: the identity of user %s "
                                   "changed from %s to %s",
                    c->user_id, pin.identity_id, tok->identity_id);
    }
    if (v == CS_PIN_REFUSE) {
        /* the pin stays as it was: it runs out by itself */
        cs_verdict_t refusal = {0};
        refusal.status = HTTP_BAD_GATEWAY;
        refusal.code = CS_ERR_IDENTITY_MISMATCH;
        refusal.message = "";
        cs_entry_failure(c->p, &refusal, now, e);
        e->body = cs_reply_identity_mismatch(c->p);
        e->body_len = strlen(e->body);
        return 0;
    }
    cs_pin_make(&pin, tok->identity_id, now, cs_config_pin_ttl(c->d));
    cs_pin_to_entry(&pin, &pe);
    cs_store_write(c, CS_ID_PIN, &pe, pin.expires);
    return 1;
}

void cs_call_fetch(cs_call *c, cs_entry_t *e)
{
    const cs_srv_conf *sc = c->sc;
    cs_upstream_req_t req = {0};
    cs_upstream_resp_t resp;
    cs_verdict_t v;
    apr_time_t now;

    req.endpoint = c->endpoint;
    req.user_id = c->user_id;
    req.key = c->d->key;
    req.ca_file = sc->ca_file;
    req.proxy = cs_config_proxy(sc);
    req.proxy_auth = sc->proxy_auth;
    req.timeout = cs_config_timeout(sc);
    req.connect_timeout = cs_config_connect_timeout(sc);
    req.max_body = CS_MAX_BODY;
    if (c->r ? APLOG_R_IS_LEVEL(c->r, APLOG_TRACE4)
             : APLOG_IS_LEVEL(c->s, APLOG_TRACE4)) {
        req.trace = trace_line;
        req.trace_baton = c;
    }

    call_upstream(c, &req, &resp);
    now = apr_time_now();
    cs_classify(c->p, &resp, now, &v);
    if (resp.result != CS_UP_ABORTED)
        log_verdict(c, &v, &resp);
    if (v.kind != CS_VERDICT_TOKEN) {
        cs_entry_failure(c->p, &v, now, e);
        return;
    }
    if (!pin_check(c, &v.token, now, e))
        return;
    memset(e, 0, sizeof(*e));
    e->kind = CS_ENTRY_TOKEN;
    e->created = now;
    e->lifetime = cs_token_lifetime(&v.token, now);
    e->expires = e->lifetime ? now + e->lifetime : 0;
    e->body = cs_reply_token(c->p, &v.token, e->expires, c->d->key->mode);
    e->body_len = strlen(e->body);
    cs_call_log(c, APLOG_DEBUG, 0,
                APLOGNO(10515) "mod_cardscan: new token from %s in "
                               "%" APR_TIME_T_FMT " ms, lifetime "
                               "%" APR_TIME_T_FMT " s%s",
                c->endpoint, apr_time_as_msec(resp.elapsed),
                apr_time_sec(e->lifetime),
                v.token.has_exp ? "" : " (no exp: not cached)");
}

/* ------------------------------------------------------- single flight */

/* Stores what a call produced: a token for everyone, or a failure for this
 * user alone (under its own id, so that it never replaces a token). */
static void store_result(cs_call *c, const cs_entry_t *e)
{
    if (e->kind == CS_ENTRY_TOKEN && e->expires)
        cs_store_write(c, CS_ID_TOKEN, e, e->expires);
    else if (e->kind == CS_ENTRY_FAILURE)
        cs_store_write(c, CS_ID_FAILURE, e, e->expires);
}

/* What the user's entries say now, for a request that has no token yet:
 * serve (a token stored by another request's call: e is set), fail (its
 * failure: e is set) or call. */
static cs_action_e result_of_last_call(cs_call *c, cs_entry_t *e)
{
    cs_entry_t tok, fail;
    int have_tok = cs_store_read(c, CS_ID_TOKEN, &tok),
        have_fail = cs_store_read(c, CS_ID_FAILURE, &fail);

    switch (cs_serve_decide(have_tok ? &tok : NULL, have_fail ? &fail : NULL,
                            apr_time_now(), &c->policy)) {
    case CS_DO_SERVE:
    case CS_DO_SERVE_REFRESH:
        *e = tok;
        return CS_DO_SERVE;
    case CS_DO_FAIL:
        *e = fail;
        return CS_DO_FAIL;
    default:
        return CS_DO_CALL;
    }
}

/* Waits for the user's call that another request is making, polling the
 * store with a growing interval. Returns the action that ends the wait:
 * serve (its token), fail (its failure) or call (the lock came free with
 * no result, or the holder took longer than any call could: make our own
 * call). */
static cs_action_e wait_for_call(cs_call *c, cs_entry_t *tok, int *locked)
{
    apr_time_t give_up = apr_time_now() + cs_config_timeout(c->sc);
    apr_interval_time_t nap = apr_time_from_msec(5);

    cs_metrics_wait(cs_proc.metrics);
    while (apr_time_now() < give_up) {
        cs_action_e act;
        cs_lock_e lk;

        apr_sleep(nap);
        if (nap < apr_time_from_msec(50))
            nap *= 2;
        if ((act = result_of_last_call(c, tok)) != CS_DO_CALL)
            return act;
        lk = cs_store_lock(c);
        if (lk != CS_LOCK_BUSY) {
            *locked = lk == CS_LOCK_HELD;
            return CS_DO_CALL;
        }
    }
    cs_call_log(c, APLOG_WARNING, 0,
                APLOGNO(10525) "mod_cardscan: another request's call to the "
                               "API for this user took over CardScanTimeout; "
                               "calling it again");
    return CS_DO_CALL;
}

cs_made_e cs_call_make(cs_call *c, cs_entry_t *e, int *retry_after)
{
    cs_lock_e lk = cs_store_lock(c);
    int locked = lk == CS_LOCK_HELD;
    cs_action_e act = CS_DO_CALL;
    cs_made_e made;

    if (lk == CS_LOCK_BUSY)
        act = wait_for_call(c, e, &locked);
    /* the call that held the lock just before us (the one we waited for,
     * or one that ended just before our first try) may have stored its
     * result since we last looked */
    if (locked && act == CS_DO_CALL)
        act = result_of_last_call(c, e);
    if (act == CS_DO_SERVE)
        made = CS_MADE_WAITED;
    else if (act == CS_DO_FAIL)
        made = CS_MADE_FAILED;
    else if (cs_call_breaker_refuses(c, retry_after))
        made = CS_MADE_UNAVAILABLE;
    else {
        cs_call_fetch(c, e);
        store_result(c, e);
        made = CS_MADE_FETCHED;
    }
    if (locked)
        cs_store_unlock(c, 0);
    return made;
}
