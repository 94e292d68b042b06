/* The upstream client: GET {endpoint}/access-token through libcurl.
 *
 * Each process keeps a stack of easy handles: a handle keeps its live
 * connections between requests, so a series of misses reuses one TCP+TLS
 * connection. DNS and TLS sessions are shared between the handles; the
 * connection cache is not, since libcurl does not support sharing it across
 * concurrent threads.
 *
 * A handle serves one route only: the proxy, proxy credentials and CA file
 * its connections were opened with. libcurl 7.61.1 (RHEL 8) matches a proxy
 * connection by the proxy's host and port alone, so a tunnel that one
 * virtual host's CardScanProxy credentials opened would carry another's
 * calls, whose own credentials the proxy refuses (test_proxy; 7.88.1 opens
 * a new tunnel there). Before 7.78 it also compared CA file names without
 * regard to case (CVE-2021-22924). */
#include "cardscan.h"

#include <apr_date.h>
#include <apr_lib.h>
#include <apr_strings.h>
#include <curl/curl.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#if LIBCURL_VERSION_NUM < 0x074500
/* Before 7.69.0, libcurl kept the Bearer token of a connection's first
 * transfer and sent it on every later transfer that reused the connection
 * (fixed by curl's "http: move oauth_bearer from connectdata to
 * Curl_easy"): a kept-alive connection would carry another tenant's key.
 * There the header is made here, on every transfer, and wiped after it. */
#define CS_BEARER_HEADER 1
#include <openssl/crypto.h>
#endif

#if LIBCURL_VERSION_NUM < 0x073f00
/* Before 7.63.0, curl_easy_perform slept blindly (up to a second, until the
 * next timer: the connect timeout) when a second passed without the reply,
 * instead of watching the socket (curl's "curl_easy_perform: fix timeout
 * handling", issue 3305): a reply after 1.3 s arrived at 2 s, or after the
 * deadline. There each handle runs in a multi handle of its own (which
 * keeps its connections between requests) with a wait loop here. */
#define CS_OWN_MULTI 1
#endif

/* Easy handles kept per process, at most: one per worker thread that
 * called at the same time, up to here (ThreadsPerChild is 25 by default). */
#define CS_UPSTREAM_IDLE 32

struct cs_upstream {
    apr_pool_t *pool;
    apr_thread_mutex_t *lock; /* guards idle and nidle */
    /* most recently used last; allocated once: APR pools are not
     * thread-safe, so nothing may grow from the worker threads */
    struct cs_handle *idle;
    int nidle;
    CURLSH *share;
    apr_thread_mutex_t *share_lock[CURL_LOCK_DATA_LAST];
    int aborted; /* atomic: cs_upstream_abort */
};

/* An easy handle, and with CS_OWN_MULTI the multi handle it runs in (NULL
 * otherwise): both keep live connections between requests, opened for its
 * route (route_of). */
typedef struct cs_handle {
    CURL *easy;
    CURLM *multi;
    unsigned char route[CS_SHA256_LEN];
    int pooled; /* 0: its route is unknown; closed after one transfer */
} cs_handle;

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

static void handle_close(cs_handle *hd)
{
    if (hd->multi)
        curl_multi_cleanup(hd->multi);
    if (hd->easy)
        curl_easy_cleanup(hd->easy);
    hd->easy = NULL;
    hd->multi = NULL;
}

static apr_status_t upstream_cleanup(void *data)
{
    cs_upstream_t *u = data;
    for (int i = 0; i < u->nidle; i++)
        handle_close(&u->idle[i]);
    u->nidle = 0;
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
    /* libcurl also locks the share's own state, under this one */
    static const curl_lock_data locked[] = {
        CURL_LOCK_DATA_SHARE, CURL_LOCK_DATA_DNS, CURL_LOCK_DATA_SSL_SESSION};
    apr_status_t rv;

    u->pool = p;
    u->idle = apr_pcalloc(p, CS_UPSTREAM_IDLE * sizeof(*u->idle));
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
    for (size_t i = 0; i < sizeof(locked) / sizeof(locked[0]); i++) {
        rv = apr_thread_mutex_create(&u->share_lock[locked[i]],
                                     APR_THREAD_MUTEX_DEFAULT, p);
        if (rv != APR_SUCCESS) {
            curl_share_cleanup(u->share);
            *err = "cannot create the upstream client's share mutex";
            return rv;
        }
    }
    /* the lock functions first: libcurl uses them from the first share */
    curl_share_setopt(u->share, CURLSHOPT_LOCKFUNC, share_lock);
    curl_share_setopt(u->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
    curl_share_setopt(u->share, CURLSHOPT_USERDATA, u);
    for (size_t i = 0; i < sizeof(shared) / sizeof(shared[0]); i++)
        curl_share_setopt(u->share, CURLSHOPT_SHARE, shared[i]);
    apr_pool_cleanup_register(p, u, upstream_cleanup, apr_pool_cleanup_null);
    *out = u;
    return APR_SUCCESS;
}

void cs_upstream_abort(cs_upstream_t *u)
{
    __atomic_store_n(&u->aborted, 1, __ATOMIC_RELEASE);
}

/* libcurl calls it about once a second at least, even while it waits for
 * a reply: non-zero ends the transfer (CURLE_ABORTED_BY_CALLBACK). */
static int on_progress(void *baton, curl_off_t dltotal, curl_off_t dlnow,
                       curl_off_t ultotal, curl_off_t ulnow)
{
    cs_upstream_t *u = baton;
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    return __atomic_load_n(&u->aborted, __ATOMIC_ACQUIRE);
}

static int via_proxy(const cs_upstream_req_t *req)
{
    /* an http:// endpoint is a loopback one (cs_endpoint_check): never
     * through a proxy, which would see the key in clear */
    return req->proxy && strncasecmp(req->endpoint, "http://", 7) != 0;
}

/* What a connection is opened with beyond the endpoint's scheme, host and
 * port, which libcurl itself matches: 0 when the digest failed. */
static int route_of(const cs_upstream_req_t *req,
                    unsigned char route[CS_SHA256_LEN])
{
    int proxied = via_proxy(req);
    const char *parts[3] = {proxied ? req->proxy : NULL,
                            proxied ? req->proxy_auth : NULL, req->ca_file};
    return cs_sha256_strings(parts, 3, route);
}

/* The most recently used idle handle of req's route, or a new one;
 * hd->easy is NULL when none can be made. */
static void acquire(cs_upstream_t *u, const cs_upstream_req_t *req,
                    cs_handle *hd)
{
    memset(hd, 0, sizeof(*hd));
    hd->pooled = route_of(req, hd->route);
    if (hd->pooled) {
        apr_thread_mutex_lock(u->lock);
        for (int i = u->nidle - 1; i >= 0; i--) {
            if (memcmp(u->idle[i].route, hd->route, CS_SHA256_LEN) == 0) {
                *hd = u->idle[i];
                memmove(&u->idle[i], &u->idle[i + 1],
                        (size_t)(u->nidle - i - 1) * sizeof(*u->idle));
                u->nidle--;
                break;
            }
        }
        apr_thread_mutex_unlock(u->lock);
    }
    if (hd->easy)
        return;
    hd->easy = curl_easy_init();
#ifdef CS_OWN_MULTI
    if (hd->easy && !(hd->multi = curl_multi_init()))
        handle_close(hd);
#endif
}

static void release(cs_upstream_t *u, cs_handle *hd)
{
    cs_handle evicted = {0};

    if (hd->pooled) {
        apr_thread_mutex_lock(u->lock);
        if (u->nidle == CS_UPSTREAM_IDLE) {
            /* the least recently used goes: the one most likely of a route
             * that no longer calls */
            evicted = u->idle[0];
            memmove(&u->idle[0], &u->idle[1],
                    (size_t)(u->nidle - 1) * sizeof(*u->idle));
            u->nidle--;
        }
        u->idle[u->nidle++] = *hd;
        hd->easy = NULL;
        hd->multi = NULL;
        apr_thread_mutex_unlock(u->lock);
    }
    /* closed outside the lock: closing a TLS connection writes to it */
    handle_close(&evicted);
    handle_close(hd);
}

/* One transfer: curl_easy_perform, or with CS_OWN_MULTI the same in the
 * handle's own multi handle, waiting on its sockets. */
static CURLcode perform(cs_handle *hd)
{
#ifdef CS_OWN_MULTI
    CURLcode rc = CURLE_OK;
    CURLMcode mc;
    CURLMsg *msg;
    int running = 1, left;

    if (curl_multi_add_handle(hd->multi, hd->easy) != CURLM_OK)
        return CURLE_FAILED_INIT;
    for (;;) {
        int fds = 0;
        mc = curl_multi_perform(hd->multi, &running);
        if (mc != CURLM_OK || !running)
            break;
        mc = curl_multi_wait(hd->multi, NULL, 0, 1000, &fds);
        if (mc != CURLM_OK)
            break;
        if (fds == 0) {
            /* no socket to watch (a resolver thread, a timer): a short nap
             * instead of a busy loop, never libcurl's blind second */
            long ms = -1;
            curl_multi_timeout(hd->multi, &ms);
            if (ms < 0 || ms > 10)
                ms = 10;
            if (ms > 0)
                apr_sleep(apr_time_from_msec(ms));
        }
    }
    while ((msg = curl_multi_info_read(hd->multi, &left)))
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == hd->easy)
            rc = msg->data.result;
    curl_multi_remove_handle(hd->multi, hd->easy);
    if (mc != CURLM_OK)
        return mc == CURLM_OUT_OF_MEMORY ? CURLE_OUT_OF_MEMORY
                                         : CURLE_FAILED_INIT;
    return rc;
#else
    return curl_easy_perform(hd->easy);
#endif
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

/* Case-insensitive search of a NUL-free needle in data[0..len). */
static const char *find_ci(const char *data, apr_size_t len, const char *needle)
{
    apr_size_t n = strlen(needle);
    for (apr_size_t i = 0; i + n <= len; i++)
        if (strncasecmp(data + i, needle, n) == 0)
            return data + i;
    return NULL;
}

/* Where a line's secret begins, or NULL: after "authorization:" (also
 * proxy-authorization, and inside the "[authorization: ...]" of HTTP/2
 * and HTTP/3 traces), after "Bearer ", or at an API key's prefix. *sep
 * receives what goes between the kept part and "<masked>". */
static const char *secret_start(const char *data, apr_size_t len,
                                const char **sep)
{
    static const char *const key_prefixes[] = {"sk_test_", "sk_live_",
                                               "secret_test_", "secret_live_"};
    const char *cut = NULL, *at = data;
    apr_size_t left = len;

    while ((at = find_ci(at, left, "authorization"))) {
        const char *c = at + 13;
        while (c < data + len && (*c == ' ' || *c == '\t'))
            c++;
        if (c < data + len && *c == ':') {
            cut = c + 1;
            *sep = " ";
            break;
        }
        at = c;
        left = (apr_size_t)(data + len - at);
    }
    if ((at = find_ci(data, len, "bearer ")) && (!cut || at + 7 < cut)) {
        cut = at + 7;
        *sep = "";
    }
    for (size_t i = 0; i < sizeof(key_prefixes) / sizeof(key_prefixes[0]); i++)
        if ((at = find_ci(data, len, key_prefixes[i])) && (!cut || at < cut)) {
            cut = at;
            *sep = "";
        }
    return cut;
}

apr_size_t cs_trace_mask(char *out, apr_size_t outsize, const char *data,
                         apr_size_t len)
{
    const char *sep = "", *cut = secret_start(data, len, &sep);
    if (cut)
        return apr_snprintf(out, outsize, "%.*s%s<masked>", (int)(cut - data),
                            data, sep);
    return apr_snprintf(out, outsize, "%.*s", (int)len, data);
}

/* libcurl's verbose output, with credentials masked and bodies left out
 * (a body is a token). */
static int on_debug(CURL *h, curl_infotype type, char *data, size_t size,
                    void *baton)
{
    const cs_upstream_req_t *req = baton;
    char line[1024], masked[1024];
    (void)h;

    if (type != CURLINFO_TEXT && type != CURLINFO_HEADER_IN &&
        type != CURLINFO_HEADER_OUT)
        return 0;
    while (size > 0) {
        const char *eol = memchr(data, '\n', size);
        size_t n = eol ? (size_t)(eol - data) + 1 : size, show = n;
        while (show && (data[show - 1] == '\n' || data[show - 1] == '\r'))
            show--;
        if (show > 0) {
            const char *prefix = type == CURLINFO_TEXT        ? "* "
                                 : type == CURLINFO_HEADER_IN ? "< "
                                                              : "> ";
            cs_trace_mask(masked, sizeof(masked), data, show);
            apr_snprintf(line, sizeof(line), "%s%s", prefix, masked);
            req->trace(req->trace_baton, line);
        }
        data += n;
        size -= n;
    }
    return 0;
}

#define RETRY_AFTER_MAX 3600

int cs_retry_after(const char *v, apr_time_t now)
{
    apr_time_t t;
    apr_int64_t secs;

    if (!v)
        return 0;
    while (*v == ' ' || *v == '\t')
        v++;
    if (apr_isdigit(*v)) {
        /* delta-seconds: digits only; any number of them */
        const char *c = v;
        secs = 0;
        while (apr_isdigit(*c)) {
            if (secs <= RETRY_AFTER_MAX)
                secs = secs * 10 + (*c - '0');
            c++;
        }
        while (*c == ' ' || *c == '\t')
            c++;
        if (*c)
            return 0;
    }
    else {
        t = apr_date_parse_http(v);
        if (t == APR_DATE_BAD)
            return 0;
        /* rounded up: never earlier than asked */
        secs =
            t > now ? (t - now + APR_USEC_PER_SEC - 1) / APR_USEC_PER_SEC : 0;
    }
    if (secs < 1)
        return 1;
    return secs > RETRY_AFTER_MAX ? RETRY_AFTER_MAX : (int)secs;
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
#if LIBCURL_VERSION_NUM < 0x073e00
    /* before 7.62, an unknown CA had its own code; since, it is an alias of
     * CURLE_PEER_FAILED_VERIFICATION */
    case CURLE_SSL_CACERT:
#endif
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
    case CURLE_ABORTED_BY_CALLBACK:
        return CS_UP_ABORTED;
    default:
        return CS_UP_PROTOCOL;
    }
}

const char *cs_upstream_os_hint(int os_errno)
{
    /* connect(2) fails with EACCES where a security policy forbids it:
     * SELinux's httpd_t may not connect out by default (RHEL, Fedora) */
    if (os_errno == EACCES)
        return "permission denied: on SELinux systems allow httpd's outbound "
               "connections: setsebool -P httpd_can_network_connect 1; see "
               "docs/platforms.md";
    return NULL;
}

void cs_upstream_fetch(cs_upstream_t *u, apr_pool_t *p,
                       const cs_upstream_req_t *req, cs_upstream_resp_t *resp)
{
    cs_handle hd;
    CURL *h;
    body_buf body = {p, NULL, 0, 0, req->max_body, 0};
    header_state hs = {p, NULL};
    char errbuf[CURL_ERROR_SIZE] = "";
    struct curl_slist *headers = NULL;
    apr_time_t start = apr_time_now();
    long status = 0, connects = 0, os_errno = 0;
    const char *hint = NULL;
    CURLcode rc;

    memset(resp, 0, sizeof(*resp));
    acquire(u, req, &hd);
    h = hd.easy;
    if (__atomic_load_n(&u->aborted, __ATOMIC_ACQUIRE)) {
        if (h)
            release(u, &hd);
        resp->result = CS_UP_ABORTED;
        resp->detail = "the process is exiting";
        return;
    }
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
#ifdef CS_BEARER_HEADER
    {
        char *auth =
            apr_pstrcat(p, "Authorization: Bearer ", req->key->secret, NULL);
        headers = curl_slist_append(headers, auth);
        OPENSSL_cleanse(auth, strlen(auth));
        /* to the API only, never in a proxy's CONNECT */
        curl_easy_setopt(h, CURLOPT_HEADEROPT, (long)CURLHEADER_SEPARATE);
    }
#else
    /* libcurl builds "Authorization: Bearer <key>" itself, from the key's
     * one copy in the configuration pool. */
    curl_easy_setopt(h, CURLOPT_HTTPAUTH, (long)CURLAUTH_BEARER);
    curl_easy_setopt(h, CURLOPT_XOAUTH2_BEARER, req->key->secret);
#endif
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
    /* One request per token, on a kept-alive connection: HTTP/2 would add
     * nothing but another code path (and traces that print headers their
     * own way). See docs/operations.md. */
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    if (via_proxy(req)) {
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
         * CardScanProxy's business. An http:// endpoint is a loopback one
         * (cs_endpoint_check): it never goes through a proxy, which would
         * see the key in clear. */
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
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, u);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    if (req->trace) {
        curl_easy_setopt(h, CURLOPT_VERBOSE, 1L);
        curl_easy_setopt(h, CURLOPT_DEBUGFUNCTION, on_debug);
        curl_easy_setopt(h, CURLOPT_DEBUGDATA, req);
    }

    rc = perform(&hd);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &connects);
    if (rc == CURLE_COULDNT_CONNECT &&
        curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno) == CURLE_OK)
        hint = cs_upstream_os_hint((int)os_errno);
    /* nothing of this request may outlive it in the handle */
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(h, CURLOPT_DEBUGFUNCTION, NULL);
    curl_easy_setopt(h, CURLOPT_VERBOSE, 0L);
#ifdef CS_BEARER_HEADER
    for (struct curl_slist *l = headers; l; l = l->next)
        OPENSSL_cleanse(l->data, strlen(l->data));
#endif
    curl_slist_free_all(headers);

    resp->result = classify(rc, &body);
    resp->status = (int)status;
    resp->body = body.data ? body.data : "";
    resp->body_len = body.len;
    resp->retry_after = hs.retry_after;
    resp->new_connections = connects;
    resp->elapsed = apr_time_now() - start;
    if (rc != CURLE_OK)
        resp->detail = apr_psprintf(
            p, "%s%s%s%s%s%s", curl_easy_strerror(rc), *errbuf ? ": " : "",
            errbuf, hint ? " (" : "", hint ? hint : "", hint ? ")" : "");
    if (resp->result == CS_UP_TOO_BIG)
        resp->detail =
            apr_psprintf(p, "the reply body exceeds %" APR_SIZE_T_FMT " bytes",
                         req->max_body);
    release(u, &hd);
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
