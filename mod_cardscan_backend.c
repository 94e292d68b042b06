/*
 * CardScanBackendUser: an application behind Apache (a proxied server, CGI,
 * FastCGI, ...) names the user in a response header, and this filter
 * replaces that response with the user's token reply, served as the
 * cardscan-session handler serves it. The client can never name the user:
 * a request header of that name never reaches the backend.
 */
#include "mod_cardscan_private.h"

#include "http_protocol.h"
#include "http_request.h"
#include "util_filter.h"

#define CS_BACKEND_FILTER "CARDSCAN_BACKEND_USER"

typedef struct {
    const char *name;
    apr_array_header_t *found; /* names of the matching entries */
} cs_header_match;

static int match_header(void *baton, const char *key, const char *value)
{
    cs_header_match *m = baton;
    (void)value;
    if (cs_header_same(key, m->name))
        APR_ARRAY_PUSH(m->found, const char *) = key;
    return 1;
}

/* Removes every header of that name (or its underscore form) from t;
 * returns how many there were. */
static int strip_header(apr_pool_t *p, apr_table_t *t, const char *name)
{
    cs_header_match m = {name, apr_array_make(p, 1, sizeof(const char *))};
    apr_table_do(match_header, &m, t, NULL);
    for (int i = 0; i < m.found->nelts; i++)
        apr_table_unset(t, APR_ARRAY_IDX(m.found, i, const char *));
    return m.found->nelts;
}

int cs_backend_fixups(request_rec *r)
{
    const cs_dir_conf *d = cs_config_dir(r);
    if (d->backend_header &&
        strip_header(r->pool, r->headers_in, d->backend_header))
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10571) "mod_cardscan: removed the client's %s "
                                     "request header (CardScanBackendUser)",
                      d->backend_header);
    return DECLINED;
}

/* An internal redirect (a CGI's local Location, an ErrorDocument) shares
 * the headers the backend put into r->err_headers_out with the new request,
 * which has no filter of its own when it leaves the location: the user
 * header of every location the request came through is removed here,
 * before the new request's handler runs. */
static void strip_redirected(request_rec *r)
{
    for (request_rec *prev = r->prev; prev; prev = prev->prev) {
        const cs_dir_conf *d = cs_config_dir(prev);
        if (!d->backend_header)
            continue;
        strip_header(r->pool, r->err_headers_out, d->backend_header);
        strip_header(r->pool, r->headers_out, d->backend_header);
    }
}

void cs_backend_insert_filter(request_rec *r)
{
    const cs_dir_conf *d = cs_config_dir(r);
    if (r->prev)
        strip_redirected(r);
    if (d->backend_header && !r->main)
        ap_add_output_filter(CS_BACKEND_FILTER, NULL, r, r->connection);
}

/* After the swap, the backend's body goes nowhere; its end ends the reply. */
static apr_status_t drop_backend_body(ap_filter_t *f, apr_bucket_brigade *bb)
{
    int eos = 0;

    for (apr_bucket *b = APR_BRIGADE_FIRST(bb); b != APR_BRIGADE_SENTINEL(bb);
         b = APR_BUCKET_NEXT(b))
        eos = eos || APR_BUCKET_IS_EOS(b);
    apr_brigade_cleanup(bb);
    if (!eos)
        return APR_SUCCESS;
    ap_remove_output_filter(f);
    APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_eos_create(f->c->bucket_alloc));
    return ap_pass_brigade(f->next, bb);
}

/* A 200 naming one user is replaced by that user's token reply; any other
 * response passes untouched. The header never reaches the client. */
static apr_status_t backend_filter(ap_filter_t *f, apr_bucket_brigade *bb)
{
    request_rec *r = f->r;
    const cs_dir_conf *d = cs_config_dir(r);
    cs_req_state *rs;
    const char *user_id, *err = NULL;
    int n;

    if (f->ctx)
        return drop_backend_body(f, bb);
    user_id = apr_table_get(r->headers_out, d->backend_header);
    if (!user_id)
        user_id = apr_table_get(r->err_headers_out, d->backend_header);
    n = strip_header(r->pool, r->headers_out, d->backend_header) +
        strip_header(r->pool, r->err_headers_out, d->backend_header);
    if (r->status != HTTP_OK || n == 0 || !user_id) {
        ap_remove_output_filter(f);
        return ap_pass_brigade(f->next, bb);
    }

    /* the backend's response is replaced, headers and all: CGI-style
     * modules keep most of a script's headers in err_headers_out, which
     * would otherwise ride on the token reply (and mod_cache reads its
     * Cache-Control there first); no cache may keep the reply */
    f->ctx = f;
    r->headers_out = apr_table_make(r->pool, 8);
    apr_table_clear(r->err_headers_out);
    apr_table_clear(r->trailers_out);
    r->no_cache = 1;
    r->status_line = NULL;
    r->content_encoding = NULL;
    r->content_languages = NULL;
    rs = cs_request_state(r, 1);
    rs->reply = f->next;
    if (n > 1) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10572) "mod_cardscan: the backend sent %d %s "
                                     "headers: refusing to pick one",
                      n, d->backend_header);
        cs_request_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "invalid_user_id",
                         "the application named more than one user");
    }
    else if (cs_user_id_check_named(r->pool, user_id, &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10573) "mod_cardscan: refusing the user the "
                                     "backend named in %s: %s",
                      d->backend_header, err);
        cs_request_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "invalid_user_id",
                         err);
    }
    else if (!cs_request_unconfigured(r, d)) {
        /* %u in the access log: the user the application named */
        if (!r->user)
            r->user = apr_pstrdup(r->pool, user_id);
        cs_request_serve(r, d, user_id);
    }
    rs->reply = NULL;
    return drop_backend_body(f, bb);
}

void cs_backend_register(void)
{
    /* a resource filter, before any content filter (mod_deflate, ...) and
     * before mod_cache's save filter sees the backend's headers */
    ap_register_output_filter(CS_BACKEND_FILTER, backend_filter, NULL,
                              AP_FTYPE_RESOURCE - 5);
}
