/* The upstream client: GET {endpoint}/access-token through libcurl.
 *
 * Each process keeps a stack of easy handles: a handle keeps its live
 * connections between requests, so a series of misses reuses one TCP+TLS
 * connection. DNS and TLS sessions are shared between the handles; the
 * connection cache is not, since libcurl does not support sharing it across
 * concurrent threads. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_tables.h>
#include <curl/curl.h>
#include <string.h>

struct cs_upstream {
    apr_pool_t *pool;
    apr_thread_mutex_t *lock; /* guards idle */
    apr_array_header_t *idle; /* CURL *, most recently used last */
    CURLSH *share;
    apr_thread_mutex_t *share_lock[CURL_LOCK_DATA_LAST];
};

typedef struct body_buf {
    apr_pool_t *p;
    char *data;
    apr_size_t len, cap, max;
    int too_big;
} body_buf;

typedef struct header_state {
    apr_pool_t *p;
    const char *retry_after;
} header_state;

apr_status_t cs_upstream_global_init(const char **err)
{
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) {
        *err = curl_easy_strerror(rc);
        return APR_EGENERAL;
    }
    return APR_SUCCESS;
}

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access acc,
                       void *baton)
{
    cs_upstream_t *u = baton;
    (void)h;
    (void)acc;
    if (data < CURL_LOCK_DATA_LAST && u->share_lock[data])
        apr_thread_mutex_lock(u->share_lock[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *baton)
{
    cs_upstream_t *u = baton;
    (void)h;
    if (data < CURL_LOCK_DATA_LAST && u->share_lock[data])
        apr_thread_mutex_unlock(u->share_lock[data]);
}

static apr_status_t upstream_cleanup(void *data)
{
    cs_upstream_t *u = data;
    for (int i = 0; i < u->idle->nelts; i++)
        curl_easy_cleanup(APR_ARRAY_IDX(u->idle, i, CURL *));
    u->idle->nelts = 0;
    if (u->share)
        curl_share_cleanup(u->share);
    u->share = NULL;
    return APR_SUCCESS;
}

apr_status_t cs_upstream_create(apr_pool_t *p, cs_upstream_t **out,
                                const char **err)
{
    cs_upstream_t *u = apr_pcalloc(p, sizeof(*u));
    static const curl_lock_data shared[] = {CURL_LOCK_DATA_DNS,
                                            CURL_LOCK_DATA_SSL_SESSION};
    apr_status_t rv;

    u->pool = p;
    u->idle = apr_array_make(p, 8, sizeof(CURL *));
    rv = apr_thread_mutex_create(&u->lock, APR_THREAD_MUTEX_DEFAULT, p);
    if (rv != APR_SUCCESS) {
        *err = "cannot create the upstream client's mutex";
        return rv;
    }
    u->share = curl_share_init();
    if (!u->share) {
        *err = "curl_share_init failed";
        return APR_ENOMEM;
    }
    for (size_t i = 0; i < sizeof(shared) / sizeof(shared[0]); i++) {
        rv = apr_thread_mutex_create(&u->share_lock[shared[i]],
                                     APR_THREAD_MUTEX_DEFAULT, p);
        if (rv != APR_SUCCESS) {
            curl_share_cleanup(u->share);
            *err = "cannot create the upstream client's share mutex";
            return rv;
        }
        curl_share_setopt(u->share, CURLSHOPT_SHARE, shared[i]);
    }
    curl_share_setopt(u->share, CURLSHOPT_LOCKFUNC, share_lock);
    curl_share_setopt(u->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
    curl_share_setopt(u->share, CURLSHOPT_USERDATA, u);
    apr_pool_cleanup_register(p, u, upstream_cleanup, apr_pool_cleanup_null);
    *out = u;
    return APR_SUCCESS;
}

static CURL *acquire(cs_upstream_t *u)
{
    CURL *h = NULL;
    apr_thread_mutex_lock(u->lock);
    if (u->idle->nelts > 0)
        h = *(CURL **)apr_array_pop(u->idle);
    apr_thread_mutex_unlock(u->lock);
    return h ? h : curl_easy_init();
}

static void release(cs_upstream_t *u, CURL *h)
{
    apr_thread_mutex_lock(u->lock);
    APR_ARRAY_PUSH(u->idle, CURL *) = h;
    apr_thread_mutex_unlock(u->lock);
}

static size_t on_body(char *data, size_t size, size_t n, void *baton)
{
    body_buf *b = baton;
    apr_size_t add = size * n;

    if (b->len + add > b->max) {
        b->too_big = 1;
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    if (b->len + add + 1 > b->cap) {
        apr_size_t cap = b->cap ? b->cap : 4096;
        char *grown;
        while (cap < b->len + add + 1)
            cap *= 2;
        grown = apr_palloc(b->p, cap);
        if (b->len)
            memcpy(grown, b->data, b->len);
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, add);
    b->len += add;
    b->data[b->len] = '\0';
    return add;
}

static size_t on_header(char *data, size_t size, size_t n, void *baton)
{
    header_state *hs = baton;
    apr_size_t len = size * n;
    static const char name[] = "retry-after:";

    if (len > sizeof(name) - 1 &&
        strncasecmp(data, name, sizeof(name) - 1) == 0) {
        const char *v = data + sizeof(name) - 1;
        apr_size_t vlen = len - (sizeof(name) - 1);
        while (vlen && (*v == ' ' || *v == '\t'))
            v++, vlen--;
        while (vlen && apr_isspace(v[vlen - 1]))
            vlen--;
        hs->retry_after = apr_pstrmemdup(hs->p, v, vlen);
    }
    return len;
}

/* libcurl's verbose output, with credentials masked and bodies left out
 * (a body is a token). */
static int on_debug(CURL *h, curl_infotype type, char *data, size_t size,
                    void *baton)
{
    const cs_upstream_req_t *req = baton;
    char line[1024];
    (void)h;

    if (type != CURLINFO_TEXT && type != CURLINFO_HEADER_IN &&
        type != CURLINFO_HEADER_OUT)
        return 0;
    while (size > 0) {
        const char *eol = memchr(data, '\n', size);
        size_t n = eol ? (size_t)(eol - data) + 1 : size, show = n;
        while (show && (data[show - 1] == '\n' || data[show - 1] == '\r'))
            show--;
        if (show >= sizeof(line))
            show = sizeof(line) - 1;
        if (show > 0) {
            const char *prefix = type == CURLINFO_TEXT        ? "* "
                                 : type == CURLINFO_HEADER_IN ? "< "
                                                              : "> ";
            if ((show >= 14 && strncasecmp(data, "authorization:", 14) == 0) ||
                (show >= 20 &&
                 strncasecmp(data, "proxy-authorization:", 20) == 0))
                apr_snprintf(
                    line, sizeof(line), "%s%.*s <masked>", prefix,
                    (int)(memchr(data, ':', show)
                              ? (const char *)memchr(data, ':', show) - data + 1
                              : 0),
                    data);
            else
                apr_snprintf(line, sizeof(line), "%s%.*s", prefix, (int)show,
                             data);
            req->trace(req->trace_baton, line);
        }
        data += n;
        size -= n;
    }
    return 0;
}

const char *cs_upstream_url(apr_pool_t *p, const char *endpoint,
                            const char *user_id)
{
    return apr_pstrcat(p, endpoint,
                       "/access-token?user_id=", cs_user_id_encode(p, user_id),
                       NULL);
}

static cs_up_result_e classify(CURLcode rc, const body_buf *b)
{
    switch (rc) {
    case CURLE_OK:
        return CS_UP_OK;
    case CURLE_OPERATION_TIMEDOUT:
        return CS_UP_TIMEOUT;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return CS_UP_CONNECT;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_USE_SSL_FAILED:
        return CS_UP_TLS;
    case CURLE_WRITE_ERROR:
        return b->too_big ? CS_UP_TOO_BIG : CS_UP_PROTOCOL;
    default:
        return CS_UP_PROTOCOL;
    }
}

void cs_upstream_fetch(cs_upstream_t *u, apr_pool_t *p,
                       const cs_upstream_req_t *req, cs_upstream_resp_t *resp)
{
    CURL *h = acquire(u);
    body_buf body = {p, NULL, 0, 0, req->max_body, 0};
    header_state hs = {p, NULL};
    char errbuf[CURL_ERROR_SIZE] = "";
    struct curl_slist *headers = NULL;
    apr_time_t start = apr_time_now();
    long status = 0, connects = 0;
    CURLcode rc;

    memset(resp, 0, sizeof(*resp));
    if (!h) {
        resp->result = CS_UP_PROTOCOL;
        resp->detail = "curl_easy_init failed";
        return;
    }
    /* reset keeps the handle's live connections and caches */
    curl_easy_reset(h);
    headers = curl_slist_append(headers, "Accept: application/json");
    curl_easy_setopt(h, CURLOPT_URL,
                     cs_upstream_url(p, req->endpoint, req->user_id));
    curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    /* libcurl builds "Authorization: Bearer <key>" itself, from the key's
     * one copy in the configuration pool. */
    curl_easy_setopt(h, CURLOPT_HTTPAUTH, (long)CURLAUTH_BEARER);
    curl_easy_setopt(h, CURLOPT_XOAUTH2_BEARER, req->key->secret);
    curl_easy_setopt(h, CURLOPT_USERAGENT, CS_USER_AGENT);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(h, CURLOPT_PROTOCOLS,
                     (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (req->ca_file)
        curl_easy_setopt(h, CURLOPT_CAINFO, req->ca_file);
    if (req->proxy) {
        curl_easy_setopt(h, CURLOPT_PROXY, req->proxy);
        /* no_proxy from Apache's environment must not bypass it */
        curl_easy_setopt(h, CURLOPT_NOPROXY, "");
        if (req->proxy_auth)
            curl_easy_setopt(h, CURLOPT_PROXYUSERPWD, req->proxy_auth);
        if (req->ca_file)
            curl_easy_setopt(h, CURLOPT_PROXY_CAINFO, req->ca_file);
    }
    else {
        /* ignore http_proxy & co. from Apache's environment: the proxy is
         * CardScanProxy's business */
        curl_easy_setopt(h, CURLOPT_PROXY, "");
    }
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS,
                     (long)apr_time_as_msec(req->timeout));
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)apr_time_as_msec(req->connect_timeout));
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_MAXCONNECTS, 2L);
    curl_easy_setopt(h, CURLOPT_SHARE, u->share);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &hs);
    if (req->trace) {
        curl_easy_setopt(h, CURLOPT_VERBOSE, 1L);
        curl_easy_setopt(h, CURLOPT_DEBUGFUNCTION, on_debug);
        curl_easy_setopt(h, CURLOPT_DEBUGDATA, req);
    }

    rc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &connects);
    /* nothing of this request may outlive it in the handle */
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(h, CURLOPT_DEBUGFUNCTION, NULL);
    curl_easy_setopt(h, CURLOPT_VERBOSE, 0L);
    curl_slist_free_all(headers);

    resp->result = classify(rc, &body);
    resp->status = (int)status;
    resp->body = body.data ? body.data : "";
    resp->body_len = body.len;
    resp->retry_after = hs.retry_after;
    resp->new_connections = connects;
    resp->elapsed = apr_time_now() - start;
    if (rc != CURLE_OK)
        resp->detail = apr_psprintf(p, "%s%s%s", curl_easy_strerror(rc),
                                    *errbuf ? ": " : "", errbuf);
    if (resp->result == CS_UP_TOO_BIG)
        resp->detail =
            apr_psprintf(p, "the reply body exceeds %" APR_SIZE_T_FMT " bytes",
                         req->max_body);
    release(u, h);
}

int cs_upstream_retryable(const cs_upstream_resp_t *resp)
{
    if (resp->result == CS_UP_CONNECT)
        return 1;
    return resp->result == CS_UP_OK &&
           (resp->status == 502 || resp->status == 503 || resp->status == 504);
}

int cs_upstream_failed(const cs_upstream_resp_t *resp)
{
    if (resp->result == CS_UP_OK)
        return resp->status >= 500;
    /* an oversized body is the API talking nonsense, not being down */
    return resp->result != CS_UP_TOO_BIG;
}
