/*
 * mod_cardscan: the customer-side /cardscan-session endpoint of CardScan.ai
 * as an Apache httpd module. Apache's own authentication decides who the
 * user is; this handler turns that identity into a CardScan session token,
 * cached per user in a socache shared by every child process.
 *
 * This file is the Apache shell: directives, configuration merge, hooks and
 * the handler. Everything that can be tested without httpd is in lib/.
 */
#include "httpd.h"
#include "http_config.h"
#include "http_core.h"
#include "http_log.h"
#include "http_main.h"
#include "http_protocol.h"
#include "http_request.h"
#include "ap_expr.h"
#include "ap_mpm.h"
#include "ap_provider.h"
#include "ap_socache.h"
#include "util_mutex.h"
#include "mod_status.h"

#include "apr_global_mutex.h"
#include "apr_lib.h"
#include "apr_shm.h"
#include "apr_thread_rwlock.h"
#include "apr_strings.h"

#include "apr_thread_cond.h"

#include "lib/cardscan.h"
#include "lib/cs_store.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

module AP_MODULE_DECLARE_DATA cardscan_module;

#define CS_HANDLER "cardscan-session"
#define CS_METRICS_HANDLER "cardscan-metrics"
#define CS_BACKEND_FILTER "CARDSCAN_BACKEND_USER"
#define CS_CORS_MAX_AGE "600" /* seconds a browser may reuse a preflight */
#define CS_CACHE_MUTEX "cardscan-cache"
/* registered only so that configurations naming it keep working: single
 * flight is now a lock in the token store */
#define CS_FLIGHT_MUTEX "cardscan-flight"
#define CS_MAX_BODY (64 * 1024)
#define CS_ENTRY_MAX (16 * 1024)
#define CS_DEFAULT_SHMCB_SIZE (48 * 1024 * 1024)
#define CS_CACHE_SHARDS 64 /* at most, a power of 2 */
#define CS_LOCAL_SLOTS 64  /* per-process copies of hits */
#define CS_LOCAL_TTL apr_time_from_sec(1)
#define CS_SHARD_MIN_SIZE (4 * 1024 * 1024) /* bytes of shmcb per shard */
#define CS_FAILURE_TTL apr_time_from_sec(10)
#define CS_DEFAULT_MIN_TTL apr_time_from_sec(60)
#define CS_DEFAULT_TIMEOUT apr_time_from_sec(5)
#define CS_DEFAULT_CONNECT_TIMEOUT apr_time_from_sec(2)
#define CS_DEFAULT_BREAKER_FAILURES 5
#define CS_DEFAULT_BREAKER_PERIOD apr_time_from_sec(10)
#define CS_CACHE_WARN_INTERVAL apr_time_from_sec(60)
#define CS_CACHE_PAUSE_MIN apr_time_from_sec(2)
#define CS_CACHE_PAUSE_MAX apr_time_from_sec(60)
/* Shared state kept across graceful restarts is found again by these keys;
 * the version and layout size are part of them, so that a newer module
 * loaded by a graceful reload makes its own instead of misreading the old. */
#define CS_STATE_TAG CS_VERSION "/2"
#define CS_SHM_KEY "mod_cardscan metrics " CS_STATE_TAG
/* the shmcb entries carried over a graceful restart */
#define CS_CARRY_KEY "mod_cardscan carried entries " CS_STATE_TAG
#define CS_DEFAULT_STORE_TIMEOUT apr_time_from_msec(250)
/* refresh threads per process: threaded MPMs serve many users per process,
 * prefork one connection per process */
#define CS_REFRESH_THREADS 8
#define CS_REFRESH_THREADS_PREFORK 2
#define CS_REFRESH_QUEUE 256 /* refreshes waiting in a process, at most */
#define CS_REFRESH_SLOTS 64  /* users refreshed lately, per process */

/* Per-directory (and per-server defaults, via lookup_defaults) settings. */
typedef struct {
    cs_key_t *key;
    const char *endpoint;    /* normalised; NULL: from the key */
    ap_expr_info_t *user_id; /* NULL: REMOTE_USER */
    apr_interval_time_t min_ttl;
    int refresh_pct;             /* CardScanRefreshAhead: 0 off */
    apr_array_header_t *origins; /* CardScanAllowOrigin, normalised */
    const char *backend_header;  /* CardScanBackendUser */
    unsigned int min_ttl_set : 1, refresh_set : 1;
} cs_dir_conf;

/* Per-request state, in r->request_config. */
typedef struct {
    int preflight;      /* a CORS preflight answered without auth */
    ap_filter_t *reply; /* CardScanBackendUser: where the swapped reply goes
                           (NULL: the request's output filters) */
} cs_req_state;

/* Per-server settings of the upstream exchange. */
typedef struct {
    apr_interval_time_t timeout, connect_timeout;
    const char *ca_file;
    const char *proxy;
    const char *proxy_auth; /* user:password, read from a file */
    unsigned int timeout_set : 1, ca_file_set : 1, proxy_set : 1;
} cs_srv_conf;

/* A process's copy of an entry it just read from the shared cache. */
typedef struct {
    char id[CS_CACHE_ID_LEN + 1];
    apr_time_t until; /* the copy is used until then */
    cs_entry_t e;     /* e.body points into buf */
    char buf[CS_ENTRY_MAX];
} cs_local_slot;

/* Users this process started a refresh for lately. */
typedef struct {
    unsigned char id[CS_CACHE_KEY_LEN];
    apr_time_t until;
} cs_refresh_slot;

/* Process-wide state: the cache, its mutexes and the upstream client. */
static struct {
    const char *cache_spec; /* CardScanCache as given, NULL: default */
    const ap_socache_provider_t *cache;
    /* shmcb scans a sub-cache linearly under one lock: large caches are
     * split into shards, each with its own instance and lock */
    int shards;
    ap_socache_instance_t *cache_inst[CS_CACHE_SHARDS];
    apr_global_mutex_t *cache_mutex[CS_CACHE_SHARDS]; /* if the provider
                                                         needs one */
    cs_store_t *store;                                /* NULL: no cache */
    const char *store_user;            /* CardScanCacheAuth: Redis ACL user */
    const char *store_password;        /* CardScanCacheAuth: never log */
    cs_store_t shmcb_store;            /* the store over the shards above */
    apr_interval_time_t store_timeout; /* deadline of a store operation */
    cs_upstream_t *upstream;           /* per child, from child_init */
    struct cs_refresher *refresher;    /* per child: refresh-ahead threads */
    apr_thread_mutex_t *refresh_lock;
    cs_refresh_slot refresh_slots[CS_REFRESH_SLOTS];
    int refresh_failing;  /* the last refresh of this process failed */
    int auth_warned;      /* the store refused our credentials, logged */
    char host_tag[64];    /* this machine, in lock values */
    cs_local_slot *local; /* per child: CS_LOCAL_SLOTS copies of hits */
    apr_thread_rwlock_t *local_lock;
    cs_metrics_t *metrics; /* shared memory, kept across restarts */
    apr_uint32_t breaker_failures;
    apr_interval_time_t breaker_period;
    int seal_secret_set; /* CardScanCacheSecret */
    unsigned char seal_key[CS_SECRET_LEN];
    apr_time_t cache_warned; /* last cache-outage warning of this process */
    apr_time_t entry_warned; /* last unreadable-entry warning */
    int sandbox;             /* a test key is configured somewhere */
} cs_g;

/* ---------------------------------------------------------- configuration */

static void *create_dir_conf(apr_pool_t *p, char *dir)
{
    cs_dir_conf *d = apr_pcalloc(p, sizeof(*d));
    (void)dir;
    d->min_ttl = CS_DEFAULT_MIN_TTL;
    d->refresh_pct = CS_REFRESH_PCT_DEFAULT;
    return d;
}

static void *merge_dir_conf(apr_pool_t *p, void *basev, void *addv)
{
    cs_dir_conf *base = basev, *add = addv, *d = apr_palloc(p, sizeof(*d));
    d->key = add->key ? add->key : base->key;
    d->endpoint = add->endpoint ? add->endpoint : base->endpoint;
    d->user_id = add->user_id ? add->user_id : base->user_id;
    d->min_ttl = add->min_ttl_set ? add->min_ttl : base->min_ttl;
    d->min_ttl_set = add->min_ttl_set || base->min_ttl_set;
    d->refresh_pct = add->refresh_set ? add->refresh_pct : base->refresh_pct;
    d->refresh_set = add->refresh_set || base->refresh_set;
    d->origins = add->origins ? add->origins : base->origins;
    d->backend_header =
        add->backend_header ? add->backend_header : base->backend_header;
    return d;
}

static void *create_srv_conf(apr_pool_t *p, server_rec *s)
{
    cs_srv_conf *c = apr_pcalloc(p, sizeof(*c));
    (void)s;
    c->timeout = CS_DEFAULT_TIMEOUT;
    c->connect_timeout = CS_DEFAULT_CONNECT_TIMEOUT;
    return c;
}

static void *merge_srv_conf(apr_pool_t *p, void *basev, void *addv)
{
    cs_srv_conf *base = basev, *add = addv, *c = apr_palloc(p, sizeof(*c));
    *c = add->timeout_set ? *add : *base;
    c->timeout_set = add->timeout_set || base->timeout_set;
    c->ca_file = add->ca_file_set ? add->ca_file : base->ca_file;
    c->ca_file_set = add->ca_file_set || base->ca_file_set;
    c->proxy = add->proxy_set ? add->proxy : base->proxy;
    c->proxy_auth = add->proxy_set ? add->proxy_auth : base->proxy_auth;
    c->proxy_set = add->proxy_set || base->proxy_set;
    return c;
}

static const char *set_api_key(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *warning = NULL, *err = NULL;

    if (cs_key_load(cmd->pool, arg, &d->key, &warning, &err) != APR_SUCCESS)
        return apr_psprintf(cmd->pool, "CardScanAPIKey: %s", err);
    if (warning)
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, cmd->server,
                     APLOGNO(10501) "CardScanAPIKey: %s", warning);
    return NULL;
}

static const char *set_endpoint(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    if (cs_endpoint_check(cmd->pool, arg, &d->endpoint, &err) != APR_SUCCESS)
        return apr_psprintf(cmd->pool, "CardScanEndpoint: %s", err);
    return NULL;
}

static const char *set_user_id(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    d->user_id =
        ap_expr_parse_cmd(cmd, arg, AP_EXPR_FLAG_STRING_RESULT, &err, NULL);
    if (err)
        return apr_psprintf(cmd->pool, "CardScanUserID: cannot parse '%s': %s",
                            arg, err);
    return NULL;
}

static const char *parse_seconds(apr_pool_t *p, const char *name,
                                 const char *arg, double max,
                                 apr_interval_time_t *out)
{
    char *end;
    double v = strtod(arg, &end);
    if (end == arg || *end || !(v > 0) || v > max)
        return apr_psprintf(p,
                            "%s: '%s' is not a number of seconds in "
                            "(0, %g]",
                            name, arg, max);
    *out = (apr_interval_time_t)(v * APR_USEC_PER_SEC);
    return NULL;
}

static const char *set_timeout(cmd_parms *cmd, void *mconfig, const char *total,
                               const char *connect)
{
    cs_srv_conf *c =
        ap_get_module_config(cmd->server->module_config, &cardscan_module);
    const char *err;
    (void)mconfig;

    if ((err = parse_seconds(cmd->pool, "CardScanTimeout", total, 300,
                             &c->timeout)))
        return err;
    c->connect_timeout = c->timeout < CS_DEFAULT_CONNECT_TIMEOUT
                             ? c->timeout
                             : CS_DEFAULT_CONNECT_TIMEOUT;
    if (connect && (err = parse_seconds(cmd->pool, "CardScanTimeout", connect,
                                        300, &c->connect_timeout)))
        return err;
    if (c->connect_timeout > c->timeout)
        return "CardScanTimeout: the connect timeout cannot exceed the total";
    /* libcurl counts milliseconds, and takes 0 as no timeout at all */
    if (c->timeout < apr_time_from_msec(1) ||
        c->connect_timeout < apr_time_from_msec(1))
        return "CardScanTimeout: under 1 ms is not a timeout libcurl can keep "
               "(it would mean none at all)";
    c->timeout_set = 1;
    return NULL;
}

static const char *set_ca_file(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_srv_conf *c =
        ap_get_module_config(cmd->server->module_config, &cardscan_module);
    apr_finfo_t fi;
    (void)mconfig;

    c->ca_file = ap_server_root_relative(cmd->pool, arg);
    if (!c->ca_file ||
        apr_stat(&fi, c->ca_file, APR_FINFO_TYPE, cmd->pool) != APR_SUCCESS ||
        fi.filetype != APR_REG)
        return apr_psprintf(cmd->pool,
                            "CardScanCAFile: '%s' is not a readable file", arg);
    c->ca_file_set = 1;
    return NULL;
}

static const char *set_proxy(cmd_parms *cmd, void *mconfig, const char *url,
                             const char *auth)
{
    cs_srv_conf *c =
        ap_get_module_config(cmd->server->module_config, &cardscan_module);

    apr_uri_t uri;
    const char *rest = ap_strstr_c(url, "://");
    (void)mconfig;

    if (strcasecmp(url, "none") == 0) {
        c->proxy = NULL;
    }
    else if (!rest || (strncasecmp(url, "http://", 7) &&
                       strncasecmp(url, "https://", 8) &&
                       strncasecmp(url, "socks5h://", 10))) {
        return "CardScanProxy: give the proxy as http://host:port, "
               "https://host:port or socks5h://host:port";
    }
    else if (ap_strchr_c(rest + 3, '@')) {
        return "CardScanProxy: put the proxy's credentials in a file "
               "(CardScanProxy URL file:/path), not in the URL";
    }
    else if (apr_uri_parse(cmd->pool, url, &uri) != APR_SUCCESS ||
             !uri.hostname || !*uri.hostname) {
        return apr_psprintf(cmd->pool,
                            "CardScanProxy: '%s' names no proxy host: give "
                            "it as http://host:port",
                            url);
    }
    else {
        c->proxy = apr_pstrdup(cmd->pool, url);
    }
    c->proxy_auth = NULL;
    if (auth) {
        apr_file_t *f;
        char buf[1024];
        apr_size_t n = 0;
        if (strncmp(auth, "file:", 5) != 0)
            return "CardScanProxy: the credentials must be given as "
                   "file:/path (a file holding user:password)";
        if (apr_file_open(&f, auth + 5, APR_FOPEN_READ, APR_FPROT_OS_DEFAULT,
                          cmd->pool) != APR_SUCCESS)
            return apr_psprintf(cmd->pool,
                                "CardScanProxy: cannot read the credentials "
                                "file %s",
                                auth + 5);
        apr_file_read_full(f, buf, sizeof(buf) - 1, &n);
        apr_file_close(f);
        while (n > 0 && apr_isspace(buf[n - 1]))
            n--;
        buf[n] = '\0';
        if (!ap_strchr_c(buf, ':'))
            return "CardScanProxy: the credentials file must hold "
                   "user:password";
        c->proxy_auth = apr_pstrdup(cmd->pool, buf);
        memset(buf, 0, sizeof(buf));
    }
    c->proxy_set = 1;
    return NULL;
}

static const char *set_cache(cmd_parms *cmd, void *mconfig, const char *arg)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    (void)mconfig;
    if (err)
        return err;
    cs_g.cache_spec = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_cache_auth(cmd_parms *cmd, void *mconfig, const char *a1,
                                  const char *a2)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    const char *warning = NULL;
    (void)mconfig;
    if (err)
        return err;
    if (cs_store_auth_load(cmd->pool, a1, a2, &cs_g.store_user,
                           &cs_g.store_password, &warning, &err) != APR_SUCCESS)
        return apr_pstrcat(cmd->pool, "CardScanCacheAuth: ", err, NULL);
    if (warning)
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, cmd->server,
                     APLOGNO(10600) "mod_cardscan: CardScanCacheAuth: %s",
                     warning);
    return NULL;
}

static const char *set_cache_timeout(cmd_parms *cmd, void *mconfig,
                                     const char *arg)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    (void)mconfig;
    if (err)
        return err;
    return parse_seconds(cmd->pool, "CardScanCacheTimeout", arg, 10,
                         &cs_g.store_timeout);
}

static const char *set_cache_secret(cmd_parms *cmd, void *mconfig,
                                    const char *arg)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    apr_file_t *f;
    char buf[4096];
    apr_size_t n = 0;
    cs_key_t tmp;
    (void)mconfig;

    if (err)
        return err;
    if (strncmp(arg, "file:", 5) != 0)
        return "CardScanCacheSecret: give the secret as file:/path, so that "
               "it stays out of the configuration";
    if (apr_file_open(&f, arg + 5, APR_FOPEN_READ, APR_FPROT_OS_DEFAULT,
                      cmd->temp_pool) != APR_SUCCESS)
        return apr_psprintf(cmd->pool, "CardScanCacheSecret: cannot read %s",
                            arg + 5);
    apr_file_read_full(f, buf, sizeof(buf), &n);
    apr_file_close(f);
    while (n > 0 && apr_isspace(buf[n - 1]))
        n--;
    if (n < 16) {
        memset(buf, 0, sizeof(buf));
        return "CardScanCacheSecret: the secret must be at least 16 bytes "
               "(e.g. openssl rand -hex 32 > file)";
    }
    cs_key_set_seal_secret(&tmp, buf, n);
    memcpy(cs_g.seal_key, tmp.seal_key, CS_SECRET_LEN);
    memset(buf, 0, sizeof(buf));
    memset(&tmp, 0, sizeof(tmp));
    cs_g.seal_secret_set = 1;
    return NULL;
}

static const char *set_breaker(cmd_parms *cmd, void *mconfig,
                               const char *failures, const char *period)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    char *end;
    apr_int64_t n;
    (void)mconfig;

    if (err)
        return err;
    n = apr_strtoi64(failures, &end, 10);
    if (end == failures || *end || n < 0 || n > 100000)
        return "CardScanCircuitBreaker: failures must be a number (0 turns "
               "the breaker off)";
    cs_g.breaker_failures = (apr_uint32_t)n;
    if (period)
        return parse_seconds(cmd->pool, "CardScanCircuitBreaker", period, 3600,
                             &cs_g.breaker_period);
    return NULL;
}

static const char *set_min_ttl(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    char *end;
    apr_int64_t v = apr_strtoi64(arg, &end, 10);

    if (end == arg || *end || v < 0 || v > 86400)
        return apr_psprintf(cmd->pool,
                            "CardScanCacheMinTTL: '%s' is not a number of "
                            "seconds between 0 and 86400",
                            arg);
    d->min_ttl = apr_time_from_sec(v);
    d->min_ttl_set = 1;
    return NULL;
}

static const char *set_refresh(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    char *end;
    apr_int64_t v;

    if (strcasecmp(arg, "on") == 0)
        v = CS_REFRESH_PCT_DEFAULT;
    else if (strcasecmp(arg, "off") == 0)
        v = 0;
    else {
        v = apr_strtoi64(arg, &end, 10);
        if (end == arg || (*end && strcmp(end, "%") != 0) || v < 1 || v > 50)
            return apr_psprintf(cmd->pool,
                                "CardScanRefreshAhead: '%s' is not on, off or "
                                "a percentage of the serving time from 1%% "
                                "to 50%%",
                                arg);
    }
    d->refresh_pct = (int)v;
    d->refresh_set = 1;
    return NULL;
}

static const char *set_allow_origin(cmd_parms *cmd, void *mconfig,
                                    const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *norm = NULL, *err = NULL;

    if (cs_origin_check(cmd->pool, arg, &norm, &err) != APR_SUCCESS)
        return apr_psprintf(cmd->pool, "CardScanAllowOrigin: %s", err);
    if (!d->origins)
        d->origins = apr_array_make(cmd->pool, 2, sizeof(const char *));
    APR_ARRAY_PUSH(d->origins, const char *) = norm;
    return NULL;
}

static const char *set_backend_user(cmd_parms *cmd, void *mconfig,
                                    const char *arg)
{
    /* headers the module would strip from every request or response */
    static const char *const reserved[] = {"Authorization",
                                           "Cookie",
                                           "Set-Cookie",
                                           "Host",
                                           "Content-Type",
                                           "Location",
                                           "Content-Length",
                                           "Transfer-Encoding",
                                           "Connection",
                                           "Origin",
                                           NULL};
    cs_dir_conf *d = mconfig;

    for (const char *c = arg; *c; c++)
        if (!apr_isalnum(*c) && !ap_strchr_c("!#$%&'*+-.^_`|~", *c))
            return apr_psprintf(cmd->pool,
                                "CardScanBackendUser: '%s' is not a header "
                                "name",
                                arg);
    for (int i = 0; reserved[i]; i++)
        if (strcasecmp(arg, reserved[i]) == 0)
            return apr_psprintf(cmd->pool,
                                "CardScanBackendUser: %s is a standard "
                                "header: use a header of its own, such as "
                                "X-CardScan-User",
                                arg);
    d->backend_header = *arg ? apr_pstrdup(cmd->pool, arg) : NULL;
    return *arg ? NULL : "CardScanBackendUser: give a header name";
}

static const command_rec cs_cmds[] = {
    AP_INIT_TAKE1("CardScanAPIKey", set_api_key, NULL, RSRC_CONF | ACCESS_CONF,
                  "the CardScan API key: the key itself, file:/path or "
                  "env:NAME"),
    AP_INIT_TAKE1("CardScanEndpoint", set_endpoint, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "the API's base URL (default: from the key, sandbox or "
                  "live)"),
    AP_INIT_TAKE1("CardScanUserID", set_user_id, NULL, RSRC_CONF | ACCESS_CONF,
                  "an ap_expr string giving the unique user id (default "
                  "%{REMOTE_USER})"),
    AP_INIT_TAKE12("CardScanTimeout", set_timeout, NULL, RSRC_CONF,
                   "seconds for one upstream exchange [and for connecting]"),
    AP_INIT_TAKE1("CardScanCAFile", set_ca_file, NULL, RSRC_CONF,
                  "CA certificates to verify the API's TLS certificate"),
    AP_INIT_TAKE12("CardScanProxy", set_proxy, NULL, RSRC_CONF,
                   "outbound proxy URL [file:/path holding user:password]"),
    AP_INIT_TAKE1("CardScanCache", set_cache, NULL, RSRC_CONF,
                  "socache provider[:args] for the token cache, or none"),
    AP_INIT_TAKE12("CardScanCacheAuth", set_cache_auth, NULL, RSRC_CONF,
                   "[username] password for the Redis of CardScanCache: "
                   "the password itself, file:/path or env:NAME"),
    AP_INIT_TAKE1("CardScanCacheTimeout", set_cache_timeout, NULL, RSRC_CONF,
                  "seconds a fleet-cache operation may take, connecting "
                  "included (default 0.25)"),
    AP_INIT_TAKE1("CardScanCacheMinTTL", set_min_ttl, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "seconds of life a cached token must have left to be "
                  "served (default 60)"),
    AP_INIT_TAKE1("CardScanRefreshAhead", set_refresh, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "on, off, or the last percent of a token's serving time in "
                  "which a request refreshes it in the background (default "
                  "on: 25%)"),
    AP_INIT_TAKE1("CardScanCacheSecret", set_cache_secret, NULL, RSRC_CONF,
                  "file:/path holding the secret that seals cache entries "
                  "(default: derived from the API key)"),
    AP_INIT_TAKE12("CardScanCircuitBreaker", set_breaker, NULL, RSRC_CONF,
                   "consecutive failures that stop calls to the API, and "
                   "for how many seconds (default 5 10)"),
    AP_INIT_ITERATE("CardScanAllowOrigin", set_allow_origin, NULL,
                    RSRC_CONF | ACCESS_CONF,
                    "origins (scheme://host[:port]) allowed to read the "
                    "reply cross-origin (CORS)"),
    AP_INIT_TAKE1("CardScanBackendUser", set_backend_user, NULL, ACCESS_CONF,
                  "a response header in which the backend names the user: "
                  "the response is replaced by that user's token reply"),
    {NULL}};

/* ------------------------------------------------------------------ store */

/* Warnings that could repeat on every request are logged at most once per
 * CS_CACHE_WARN_INTERVAL per process (at debug in between). */
static int warn_level(apr_time_t *last)
{
    apr_time_t now = apr_time_now();
    if (now - *last < CS_CACHE_WARN_INTERVAL)
        return APLOG_DEBUG;
    *last = now;
    return APLOG_WARNING;
}

typedef struct {
    char id[CS_CACHE_ID_LEN + 1];
    unsigned char bytes[CS_CACHE_KEY_LEN];
} cs_cache_ref;

/* One user's request for a token, as the request handler and the refresh
 * threads both carry it out: who, where, and how to log. */
typedef struct {
    request_rec *r; /* NULL in a refresh thread */
    server_rec *s;
    apr_pool_t *p;
    const cs_dir_conf *d;
    const cs_srv_conf *sc;
    const char *endpoint, *user_id;
    cs_cache_ref ref;
    cs_policy_t policy;
    char owner[64];             /* this call's value of the user's lock */
    apr_interval_time_t called; /* time spent calling the API, if it did */
} cs_call;

/* Logs for a call: against the request when there is one. */
static void call_log(const cs_call *c, int level, apr_status_t rv,
                     const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void call_log(const cs_call *c, int level, apr_status_t rv,
                     const char *fmt, ...)
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

/* Refused credentials are named once per server and configuration
 * generation, whichever process meets them first: the fix is in the
 * configuration, and repeating it would flood the log. */
static int auth_first_report(void)
{
    apr_uint32_t gen = (apr_uint32_t)ap_state_query(AP_SQ_CONFIG_GEN) + 1;
    apr_uint32_t seen;

    if (!cs_g.metrics) {
        int first = !cs_g.auth_warned;
        cs_g.auth_warned = 1;
        return first;
    }
    seen = __atomic_load_n(&cs_g.metrics->store_auth_logged, __ATOMIC_RELAXED);
    return seen != gen && __atomic_compare_exchange_n(
                              &cs_g.metrics->store_auth_logged, &seen, gen, 0,
                              __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* A store that failed or passed its deadline is left alone for a while,
 * doubling from 2 s to 60 s, by every child (the state is in shared
 * memory): requests call the API meanwhile, and none waits on the store
 * again until the pause is over. A lost update between two processes only
 * changes when the next attempt happens. */
static void store_failed(const cs_call *c, apr_status_t rv, const char *what,
                         const char *err)
{
    /* computed once: ap_log_rerror is a macro that evaluates it twice */
    int level = warn_level(&cs_g.cache_warned);
    apr_int64_t pause = 0;
    cs_metrics_t *m = cs_g.metrics;

    if (m) {
        apr_time_t now = apr_time_now();
        pause = __atomic_load_n(&m->store_pause, __ATOMIC_RELAXED);
        /* the requests that met a stalled store together fail together:
         * once paused, their failures do not lengthen the pause */
        if (now >= __atomic_load_n(&m->store_pause_until, __ATOMIC_ACQUIRE)) {
            pause = pause ? 2 * pause : CS_CACHE_PAUSE_MIN;
            if (pause > CS_CACHE_PAUSE_MAX)
                pause = CS_CACHE_PAUSE_MAX;
            __atomic_store_n(&m->store_pause, pause, __ATOMIC_RELAXED);
            __atomic_store_n(&m->store_pause_until, now + pause,
                             __ATOMIC_RELEASE);
        }
        __atomic_add_fetch(&m->store_errors, 1, __ATOMIC_RELAXED);
    }
    if (APR_STATUS_IS_EACCES(rv))
        level = auth_first_report() ? APLOG_ERR : APLOG_DEBUG;
    call_log(c, level, rv,
             APLOGNO(10527) "mod_cardscan: the token cache failed to %s "
                            "(%s%s%s); calling the CardScan API directly for "
                            "the next %" APR_TIME_T_FMT " s",
             what, cs_g.store->ops->name, err ? ": " : "", err ? err : "",
             apr_time_sec(pause));
}

static void store_ok(void)
{
    if (cs_g.metrics &&
        __atomic_load_n(&cs_g.metrics->store_pause, __ATOMIC_RELAXED))
        __atomic_store_n(&cs_g.metrics->store_pause, 0, __ATOMIC_RELAXED);
}

static int store_usable(void)
{
    return cs_g.store &&
           (!cs_g.metrics ||
            apr_time_now() >= __atomic_load_n(&cs_g.metrics->store_pause_until,
                                              __ATOMIC_ACQUIRE));
}

static apr_time_t store_deadline(void)
{
    return apr_time_now() + cs_g.store_timeout;
}

/* One user's place in the caches, computed once per request: the hex id
 * (bound into sealed entries) and its bytes, which pick the store ids, the
 * shard and the per-process slot. */
static void cache_ref(const cs_key_t *key, const char *endpoint,
                      const char *user_id, cs_cache_ref *ref)
{
    cs_cache_id(key, endpoint, user_id, ref->id);
    cs_cache_key_bytes(ref->id, ref->bytes);
}

/* The key entries are sealed with: per API key, or CardScanCacheSecret. */
static const cs_key_t *seal_key(const cs_key_t *key, cs_key_t *buf)
{
    if (!cs_g.seal_secret_set)
        return key;
    *buf = *key;
    memcpy(buf->seal_key, cs_g.seal_key, CS_SECRET_LEN);
    return buf;
}

/* The sealed id of an entry kind: the hex id and the kind's tag, so that a
 * token can never be opened as a failure or the reverse. */
static const char *entry_aad(const cs_call *c, cs_id_kind_e kind)
{
    return kind == CS_ID_TOKEN ? c->ref.id
                               : apr_psprintf(c->p, "%s/%c", c->ref.id, kind);
}

/* Reads one of the user's entries (token or failure). */
static int store_get(cs_call *c, cs_id_kind_e kind, cs_entry_t *e)
{
    unsigned char id[CS_STORE_ID_LEN], buf[CS_ENTRY_MAX];
    apr_size_t len = sizeof(buf);
    const char *err = NULL;
    cs_key_t tmp;
    apr_status_t rv;

    if (!store_usable())
        return 0;
    cs_store_id(c->ref.bytes, kind, id);
    rv = cs_g.store->ops->get(cs_g.store, id, sizeof(id), buf, &len,
                              store_deadline(), c->p, &err);
    if (rv != APR_SUCCESS) {
        if (!APR_STATUS_IS_NOTFOUND(rv) && rv != APR_ENOLOCK)
            store_failed(c, rv, "read", err);
        return 0;
    }
    if (cs_entry_open(c->p, seal_key(c->d->key, &tmp), entry_aad(c, kind), buf,
                      len, e, &err) != APR_SUCCESS) {
        /* servers with different CardScanCacheSecret would keep replacing
         * each other's entries: not a warning per request */
        int level = warn_level(&cs_g.entry_warned);
        call_log(c, level, 0,
                 APLOGNO(10511) "mod_cardscan: ignoring a cache entry: %s",
                 err);
        return 0;
    }
    return (kind == CS_ID_TOKEN) == (e->kind == CS_ENTRY_TOKEN);
}

/* Stores one of the user's entries until `expiry`. */
static void store_put(cs_call *c, cs_id_kind_e kind, const cs_entry_t *e,
                      apr_time_t expiry)
{
    unsigned char id[CS_STORE_ID_LEN], *data;
    apr_size_t len;
    const char *err = NULL;
    cs_key_t tmp;
    apr_status_t rv;

    if (!store_usable())
        return;
    if (cs_entry_seal(c->p, seal_key(c->d->key, &tmp), entry_aad(c, kind), e,
                      &data, &len, &err) != APR_SUCCESS) {
        call_log(c, APLOG_ERR, 0, APLOGNO(10512) "mod_cardscan: %s", err);
        return;
    }
    if (len > CS_ENTRY_MAX) {
        call_log(c, APLOG_WARNING, 0,
                 APLOGNO(10513) "mod_cardscan: a token reply of "
                                "%" APR_SIZE_T_FMT
                                " bytes is too large to cache",
                 len);
        return;
    }
    cs_store_id(c->ref.bytes, kind, id);
    rv = cs_g.store->ops->put(cs_g.store, id, sizeof(id), data, len, expiry,
                              store_deadline(), c->p, &err);
    if (rv == APR_SUCCESS)
        store_ok();
    else if (APR_STATUS_IS_ENOSPC(rv)) /* a full shmcb: just not cached */
        call_log(c, APLOG_DEBUG, rv,
                 APLOGNO(10514) "mod_cardscan: the token cache has no room "
                                "for this entry");
    else if (rv != APR_ENOLOCK)
        store_failed(c, rv, "store", err);
}

/* The user's call lock, the single flight of every process (and, with a
 * fleet cache, every server) that shares the store. It lives no longer
 * than one call could, so that a holder that died costs at most that. */
typedef enum { CS_LOCK_NONE, CS_LOCK_HELD, CS_LOCK_BUSY } cs_lock_e;

static apr_interval_time_t lock_life(const cs_call *c)
{
    return c->sc->timeout + apr_time_from_sec(1);
}

static cs_lock_e store_lock(cs_call *c)
{
    static apr_uint32_t counter;
    unsigned char id[CS_STORE_ID_LEN];
    const char *err = NULL;
    apr_status_t rv;

    if (!store_usable())
        return CS_LOCK_NONE;
    /* this call's lock value, made once and only when a lock is taken (not
     * on a cache hit): unique across the processes and servers that share
     * the lock */
    if (!c->owner[0])
        apr_snprintf(c->owner, sizeof(c->owner),
                     "%s/%" APR_PID_T_FMT "/%u/%" APR_TIME_T_FMT, cs_g.host_tag,
                     getpid(),
                     __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED),
                     apr_time_now());
    cs_store_id(c->ref.bytes, CS_ID_LOCK, id);
    rv = cs_g.store->ops->add(cs_g.store, id, sizeof(id),
                              (const unsigned char *)c->owner, strlen(c->owner),
                              apr_time_now() + lock_life(c), store_deadline(),
                              c->p, &err);
    if (rv == APR_SUCCESS)
        return CS_LOCK_HELD;
    if (APR_STATUS_IS_EEXIST(rv))
        return CS_LOCK_BUSY;
    if (rv != APR_ENOLOCK)
        store_failed(c, rv, "lock", err);
    return CS_LOCK_NONE;
}

/* Releases the lock; with `hold`, keeps it (and so keeps every process
 * from calling for this user) until then instead. */
static void store_unlock(cs_call *c, apr_time_t hold)
{
    unsigned char id[CS_STORE_ID_LEN];
    const char *err = NULL;
    apr_status_t rv;

    if (!cs_g.store)
        return;
    cs_store_id(c->ref.bytes, CS_ID_LOCK, id);
    if (hold)
        rv = cs_g.store->ops->put(
            cs_g.store, id, sizeof(id), (const unsigned char *)c->owner,
            strlen(c->owner), hold, store_deadline(), c->p, &err);
    else
        rv = cs_g.store->ops->release(
            cs_g.store, id, sizeof(id), (const unsigned char *)c->owner,
            strlen(c->owner), store_deadline(), c->p, &err);
    if (rv != APR_SUCCESS && rv != APR_ENOLOCK)
        store_failed(c, rv, "unlock", err);
}

/* ---------------------------------------------------------- shmcb store */

/* shmcb through httpd's socache, split into shards with a lock each. A
 * value is stored behind a small header holding its expiry, so that the
 * entries can be carried over a graceful restart (iterate gives no
 * expiry). A shard lock fails in children of a generation a graceful
 * restart has replaced: their cache is going away, so they do without it
 * (APR_ENOLOCK, not a failure). */
#define SC_HEADER 9
#define SC_VERSION 'S'

static int shard_of(const unsigned char *id)
{
    return id[CS_CACHE_KEY_LEN - 1] & (cs_g.shards - 1);
}

static apr_status_t shard_lock(int shard)
{
    if (cs_g.cache_mutex[shard] &&
        apr_global_mutex_lock(cs_g.cache_mutex[shard]) != APR_SUCCESS)
        return APR_ENOLOCK;
    return APR_SUCCESS;
}

static void shard_unlock(int shard)
{
    if (cs_g.cache_mutex[shard])
        apr_global_mutex_unlock(cs_g.cache_mutex[shard]);
}

static void sc_header(unsigned char *h, apr_time_t expiry)
{
    h[0] = SC_VERSION;
    for (int i = 0; i < 8; i++)
        h[1 + i] = (unsigned char)((apr_uint64_t)expiry >> (56 - 8 * i));
}

static apr_time_t sc_expiry(const unsigned char *h)
{
    apr_uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | h[1 + i];
    return (apr_time_t)v;
}

/* retrieve without the lock: the caller holds it */
static apr_status_t sc_retrieve(int shard, const unsigned char *id,
                                apr_size_t idlen, unsigned char *buf,
                                apr_size_t *len, apr_pool_t *p)
{
    unsigned char raw[CS_ENTRY_MAX + SC_HEADER];
    unsigned int rawlen = sizeof(raw);
    apr_status_t rv;

    rv = cs_g.cache->retrieve(cs_g.cache_inst[shard], ap_server_conf, id,
                              (unsigned int)idlen, raw, &rawlen, p);
    if (rv != APR_SUCCESS)
        return rv;
    if (rawlen < SC_HEADER || raw[0] != SC_VERSION || rawlen - SC_HEADER > *len)
        return APR_NOTFOUND;
    *len = rawlen - SC_HEADER;
    memcpy(buf, raw + SC_HEADER, *len);
    return APR_SUCCESS;
}

static apr_status_t sc_store(int shard, const unsigned char *id,
                             apr_size_t idlen, const unsigned char *val,
                             apr_size_t len, apr_time_t expiry, apr_pool_t *p)
{
    unsigned char *raw = apr_palloc(p, len + SC_HEADER);
    sc_header(raw, expiry);
    memcpy(raw + SC_HEADER, val, len);
    return cs_g.cache->store(cs_g.cache_inst[shard], ap_server_conf, id,
                             (unsigned int)idlen, expiry, raw,
                             (unsigned int)(len + SC_HEADER), p);
}

static apr_status_t sc_get(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, unsigned char *buf,
                           apr_size_t *len, apr_time_t deadline, apr_pool_t *p,
                           const char **err)
{
    int shard = shard_of(id);
    apr_status_t rv;
    (void)st, (void)deadline, (void)err;

    if (shard_lock(shard) != APR_SUCCESS)
        return APR_NOTFOUND;
    rv = sc_retrieve(shard, id, idlen, buf, len, p);
    shard_unlock(shard);
    return rv;
}

static apr_status_t sc_put(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    int shard = shard_of(id);
    apr_status_t rv;
    (void)st, (void)deadline, (void)err;

    if (shard_lock(shard) != APR_SUCCESS)
        return APR_ENOLOCK;
    rv = sc_store(shard, id, idlen, val, len, expiry, p);
    shard_unlock(shard);
    return rv;
}

static apr_status_t sc_add(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    unsigned char buf[256];
    apr_size_t blen = sizeof(buf);
    int shard = shard_of(id);
    apr_status_t rv;
    (void)st, (void)deadline, (void)err;

    if (shard_lock(shard) != APR_SUCCESS)
        return APR_ENOLOCK;
    rv = sc_retrieve(shard, id, idlen, buf, &blen, p);
    if (rv == APR_SUCCESS)
        rv = APR_EEXIST;
    else
        rv = sc_store(shard, id, idlen, val, len, expiry, p);
    shard_unlock(shard);
    return rv;
}

static apr_status_t sc_release(cs_store_t *st, const unsigned char *id,
                               apr_size_t idlen, const unsigned char *val,
                               apr_size_t len, apr_time_t deadline,
                               apr_pool_t *p, const char **err)
{
    unsigned char buf[256];
    apr_size_t blen = sizeof(buf);
    int shard = shard_of(id);
    (void)st, (void)deadline, (void)err;

    if (shard_lock(shard) != APR_SUCCESS)
        return APR_ENOLOCK;
    if (sc_retrieve(shard, id, idlen, buf, &blen, p) == APR_SUCCESS &&
        blen == len && memcmp(buf, val, len) == 0)
        cs_g.cache->remove(cs_g.cache_inst[shard], ap_server_conf, id,
                           (unsigned int)idlen, p);
    shard_unlock(shard);
    return APR_SUCCESS;
}

static const cs_store_ops_t sc_ops = {"socache", sc_get, sc_put, sc_add,
                                      sc_release};

/* ------------------------------------------------------- per-process copies */

/* The per-process copies: a hot user's requests are served from this
 * process's memory for CS_LOCAL_TTL after a shared-cache hit, without the
 * shared cache's lock or decryption. A copy is only ever an entry that was
 * just valid in the shared cache, and freshness is decided as there. */
static cs_local_slot *local_slot(const cs_cache_ref *ref)
{
    return &cs_g.local[ref->bytes[1] % CS_LOCAL_SLOTS];
}

static int local_get(cs_call *c, apr_time_t now, cs_entry_t *e)
{
    cs_local_slot *slot;
    int hit = 0;

    if (!cs_g.local)
        return 0;
    slot = local_slot(&c->ref);
    apr_thread_rwlock_rdlock(cs_g.local_lock);
    if (now < slot->until && strcmp(slot->id, c->ref.id) == 0 &&
        cs_entry_fresh(&slot->e, now, c->policy.min_ttl)) {
        *e = slot->e;
        e->body = apr_pstrmemdup(c->p, slot->buf, slot->e.body_len);
        hit = 1;
    }
    apr_thread_rwlock_unlock(cs_g.local_lock);
    return hit;
}

static void local_put(const cs_call *c, const cs_entry_t *e, apr_time_t now)
{
    cs_local_slot *slot;

    if (!cs_g.local || e->kind != CS_ENTRY_TOKEN ||
        e->body_len >= sizeof(slot->buf))
        return;
    slot = local_slot(&c->ref);
    apr_thread_rwlock_wrlock(cs_g.local_lock);
    memcpy(slot->buf, e->body, e->body_len);
    slot->e = *e;
    slot->e.body = slot->buf;
    memcpy(slot->id, c->ref.id, CS_CACHE_ID_LEN + 1);
    slot->until = now + CS_LOCAL_TTL;
    apr_thread_rwlock_unlock(cs_g.local_lock);
}

/* The user's token: this process's copy, else the shared store's. A user
 * who got a refreshed token never gets the older one again. */
static int token_get(cs_call *c, apr_time_t now, cs_entry_t *e)
{
    apr_time_t refresh_at;

    /* in its refresh window, a copy may be older than what another process
     * has just stored: the shared cache tells */
    if (local_get(c, now, e) &&
        (!(refresh_at = cs_serve_refresh_at(e, &c->policy)) ||
         now < refresh_at))
        return 1;
    if (!store_get(c, CS_ID_TOKEN, e))
        return 0;
    if (cs_entry_fresh(e, now, c->policy.min_ttl))
        local_put(c, e, now);
    return 1;
}

/* --------------------------------------------------------------- startup */

static const char *effective_endpoint(const cs_dir_conf *d)
{
    return d->endpoint ? d->endpoint : cs_endpoint_default(d->key);
}

/* A live key against the sandbox (or the reverse) is refused at start-up,
 * wherever the pair meets: server, vhost or section. */
static int check_key_endpoint(apr_pool_t *p, server_rec *s,
                              const cs_dir_conf *d, const char *section)
{
    const char *err = NULL;
    if (!d->key)
        return OK;
    if (d->key->mode == CS_KEY_TEST)
        cs_g.sandbox = 1; /* noticed once, in post_config */
    if (cs_endpoint_check_key(p, effective_endpoint(d), d->key, &err) !=
        APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s,
                     APLOGNO(10502) "mod_cardscan: %s (in %s%s%s)", err,
                     s->is_virtual
                         ? apr_psprintf(p, "the virtual host %s, %s:%d",
                                        s->server_hostname, s->defn_name,
                                        s->defn_line_number)
                         : "the main server",
                     section ? ", section " : "", section ? section : "");
        return !OK;
    }
    return OK;
}

/* Checks every section of secs (of one kind: Location, Directory, Files or
 * If), and the <Files> and <If> sections nested in each (httpd keeps those
 * in the enclosing section's core config, and top-level ones in the
 * server's), each merged over what encloses it. */
static int check_sections(apr_pool_t *p, server_rec *s, const cs_dir_conf *base,
                          apr_array_header_t *secs, const char *kind,
                          const char *outer, int depth)
{
    for (int i = 0; secs && i < secs->nelts; i++) {
        ap_conf_vector_t *v = APR_ARRAY_IDX(secs, i, ap_conf_vector_t *);
        cs_dir_conf *d = ap_get_module_config(v, &cardscan_module);
        core_dir_config *core = ap_get_core_module_config(v);
        const cs_dir_conf *merged =
            d ? merge_dir_conf(p, (void *)base, d) : base;
        const char *name;

        if (core && core->condition)
            name = apr_psprintf(p, "<If> at %s:%u", core->condition->filename,
                                core->condition->line_number);
        else
            name = apr_psprintf(p, "<%s %s>", kind,
                                core && core->d ? core->d : "?");
        if (outer)
            name = apr_pstrcat(p, outer, " ", name, NULL);
        if (check_key_endpoint(p, s, merged, name) != OK)
            return !OK;
        if (core && depth < 16 &&
            (check_sections(p, s, merged, core->sec_file, "Files", name,
                            depth + 1) != OK ||
             check_sections(p, s, merged, core->sec_if, "If", name,
                            depth + 1) != OK))
            return !OK;
    }
    return OK;
}

/* CardScanCache redis:... or memcache:...: one of the fleet stores of
 * lib/ (hiredis, libmemcached), not httpd's socache providers. */
static int fleet_store_name(const char *name)
{
    return strcasecmp(name, "redis") == 0 || strcasecmp(name, "memcache") == 0;
}

static apr_status_t fleet_store_create(apr_pool_t *p, const char *name,
                                       const char *args, cs_store_t **st,
                                       const char **err)
{
    cs_store_opts_t opts = {cs_g.store_timeout, cs_g.store_user,
                            cs_g.store_password};
    if (strcasecmp(name, "redis") == 0)
        return cs_store_redis_create(p, args, &opts, st, err);
    return cs_store_memcache_create(p, args, &opts, st, err);
}

static int split_cache_spec(apr_pool_t *p, const char **name, const char **args)
{
    const char *sep;
    if (!cs_g.cache_spec) {
        *name = "shmcb";
        *args = apr_psprintf(p, "%s(%d)",
                             ap_runtime_dir_relative(p, "cardscan-cache"),
                             CS_DEFAULT_SHMCB_SIZE);
        return 1;
    }
    if (strcasecmp(cs_g.cache_spec, "none") == 0)
        return 0;
    sep = ap_strchr_c(cs_g.cache_spec, ':');
    *name = sep ? apr_pstrmemdup(p, cs_g.cache_spec, sep - cs_g.cache_spec)
                : cs_g.cache_spec;
    *args = sep ? sep + 1 : NULL;
    if (!sep && strcmp(*name, "shmcb") == 0)
        *args = apr_psprintf(p, "%s(%d)",
                             ap_runtime_dir_relative(p, "cardscan-cache"),
                             CS_DEFAULT_SHMCB_SIZE);
    return 1;
}

static int cs_pre_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp)
{
    const char *err = NULL;
    (void)plog;
    (void)ptemp;
    memset(&cs_g, 0, sizeof(cs_g));
    cs_g.breaker_failures = CS_DEFAULT_BREAKER_FAILURES;
    cs_g.breaker_period = CS_DEFAULT_BREAKER_PERIOD;
    cs_g.store_timeout = CS_DEFAULT_STORE_TIMEOUT;
    ap_mutex_register(pconf, CS_CACHE_MUTEX, NULL, APR_LOCK_DEFAULT, 0);
    ap_mutex_register(pconf, CS_FLIGHT_MUTEX, NULL, APR_LOCK_DEFAULT, 0);
    /* once, in the parent, before any thread exists */
    if (cs_upstream_global_init(&err) != APR_SUCCESS) {
        ap_log_perror(APLOG_MARK, APLOG_CRIT, 0, plog,
                      APLOGNO(10503) "mod_cardscan: libcurl: %s", err);
        return !OK;
    }
    return OK;
}

static int cs_check_config(apr_pool_t *pconf, apr_pool_t *plog,
                           apr_pool_t *ptemp, server_rec *main_s)
{
    const char *name, *args;
    (void)pconf;
    (void)plog;

    for (server_rec *s = main_s; s; s = s->next) {
        core_server_config *core = ap_get_core_module_config(s->module_config);
        cs_dir_conf *base =
            ap_get_module_config(s->lookup_defaults, &cardscan_module);
        core_dir_config *dcore = ap_get_core_module_config(s->lookup_defaults);
        if (check_key_endpoint(ptemp, s, base, NULL) != OK ||
            check_sections(ptemp, s, base, core->sec_url, "Location", NULL,
                           0) != OK ||
            check_sections(ptemp, s, base, core->sec_dir, "Directory", NULL,
                           0) != OK ||
            check_sections(ptemp, s, base, dcore->sec_file, "Files", NULL, 0) !=
                OK ||
            check_sections(ptemp, s, base, dcore->sec_if, "If", NULL, 0) != OK)
            return !OK;
    }
    if (split_cache_spec(ptemp, &name, &args) && fleet_store_name(name)) {
        cs_store_t *st;
        const char *err;
        if (fleet_store_create(ptemp, name, args ? args : "", &st, &err) !=
            APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, 0, main_s,
                         APLOGNO(10601) "mod_cardscan: CardScanCache %s: %s",
                         cs_g.cache_spec, err);
            return !OK;
        }
    }
    else if (cs_g.store_password) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, main_s,
                     APLOGNO(10602) "mod_cardscan: CardScanCacheAuth is set "
                                    "but CardScanCache is not redis:...; it "
                                    "is not used");
    }
    if (split_cache_spec(ptemp, &name, &args) && !fleet_store_name(name)) {
        const ap_socache_provider_t *prov = ap_lookup_provider(
            AP_SOCACHE_PROVIDER_GROUP, name, AP_SOCACHE_PROVIDER_VERSION);
        if (!prov) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, 0, main_s,
                         APLOGNO(10504) "mod_cardscan: CardScanCache: no "
                                        "socache provider '%s' is loaded: "
                                        "LoadModule socache_%s_module (on "
                                        "Debian: a2enmod socache_%s)",
                         name, name, name);
            return !OK;
        }
    }
    return OK;
}

static apr_status_t destroy_cache(void *data)
{
    server_rec *s = data;
    for (int i = 0; i < cs_g.shards; i++) {
        if (cs_g.cache && cs_g.cache_inst[i])
            cs_g.cache->destroy(cs_g.cache_inst[i], s);
        cs_g.cache_inst[i] = NULL;
    }
    cs_g.shards = 0;
    return APR_SUCCESS;
}

/* Splits a large shmcb into shards of at least CS_SHARD_MIN_SIZE bytes (a
 * power of 2 of them, at most CS_CACHE_SHARDS): each has its own lock and
 * scans fewer entries. Other providers, and specs without a size, stay
 * whole. */
static const char **shard_cache_args(apr_pool_t *p, const char *name,
                                     const char *args, int *shards)
{
    const char **out = apr_pcalloc(p, CS_CACHE_SHARDS * sizeof(*out));
    const char *open = args ? strrchr(args, '(') : NULL;
    apr_int64_t size;

    *shards = 1;
    out[0] = args;
    if (strcmp(name, "shmcb") != 0 || !open || args[strlen(args) - 1] != ')')
        return out;
    size = apr_atoi64(open + 1);
    while (*shards < CS_CACHE_SHARDS &&
           size / (*shards * 2) >= CS_SHARD_MIN_SIZE)
        *shards *= 2;
    if (*shards == 1)
        return out;
    for (int i = 0; i < *shards; i++)
        out[i] = apr_psprintf(p, "%.*s.%d(%" APR_INT64_T_FMT ")",
                              (int)(open - args), args, i, size / *shards);
    return out;
}

/* The counters and breakers live in one anonymous shared segment made once
 * per server lifetime: the module is unloaded and loaded again on every
 * restart, so the segment hangs off the process pool, found again through
 * its userdata. Restarts neither leak segments nor reset the counters. */
static apr_status_t attach_metrics(server_rec *s)
{
    apr_pool_t *pp = s->process->pool;
    apr_shm_t *shm = NULL;
    void *data = NULL;
    apr_status_t rv;

    apr_pool_userdata_get(&data, CS_SHM_KEY, pp);
    if (data && apr_shm_size_get(data) >= sizeof(cs_metrics_t)) {
        cs_g.metrics = apr_shm_baseaddr_get(data);
        return APR_SUCCESS;
    }
    rv = apr_shm_create(&shm, sizeof(cs_metrics_t), NULL, pp);
    if (rv != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_EMERG, rv, s,
                     APLOGNO(10526) "mod_cardscan: cannot create the shared "
                                    "memory for metrics");
        return rv;
    }
    memset(apr_shm_baseaddr_get(shm), 0, sizeof(cs_metrics_t));
    apr_pool_userdata_set(shm, CS_SHM_KEY, apr_pool_cleanup_null, pp);
    cs_g.metrics = apr_shm_baseaddr_get(shm);
    return APR_SUCCESS;
}

/* Entries carried over a graceful restart. httpd recreates the shmcb with
 * its configuration; just before the old one goes away (the cleanup below
 * runs first, LIFO, while the provider and its locks still exist) every
 * valid token is copied into the process pool, and the new configuration's
 * post_config stores them again with their own expiry. Locks and failures
 * are not carried. Ids are keyed hashes of the API key and endpoint and
 * entries are sealed, so an entry that a changed configuration would not
 * have stored is never found (new key or endpoint) or never opens (new
 * CardScanCacheSecret). */
typedef struct {
    apr_pool_t *pool;
    apr_array_header_t *items; /* cs_carried */
} cs_carry;

typedef struct {
    unsigned char id[CS_STORE_ID_LEN];
    apr_time_t expiry;
    unsigned char *val; /* without the header */
    apr_size_t len;
} cs_carried;

static apr_status_t carry_one(ap_socache_instance_t *inst, server_rec *s,
                              void *userctx, const unsigned char *id,
                              unsigned int idlen, const unsigned char *data,
                              unsigned int datalen, apr_pool_t *pool)
{
    cs_carry *carry = userctx;
    cs_carried *it;
    (void)inst, (void)s, (void)pool;

    if (idlen != CS_STORE_ID_LEN || id[CS_CACHE_KEY_LEN] != CS_ID_TOKEN ||
        datalen <= SC_HEADER || data[0] != SC_VERSION ||
        sc_expiry(data) <= apr_time_now() + apr_time_from_sec(1))
        return APR_SUCCESS;
    it = apr_array_push(carry->items);
    memcpy(it->id, id, CS_STORE_ID_LEN);
    it->expiry = sc_expiry(data);
    it->len = datalen - SC_HEADER;
    it->val = apr_pmemdup(carry->pool, data + SC_HEADER, it->len);
    return APR_SUCCESS;
}

static apr_status_t carry_out(void *data)
{
    server_rec *s = data;
    apr_pool_t *pool;
    cs_carry *carry;

    if (ap_state_query(AP_SQ_MAIN_STATE) != AP_SQ_MS_DESTROY_CONFIG ||
        !cs_g.cache || !cs_g.cache->iterate || !cs_g.shards ||
        apr_pool_create(&pool, s->process->pool) != APR_SUCCESS)
        return APR_SUCCESS;
    carry = apr_pcalloc(pool, sizeof(*carry));
    carry->pool = pool;
    carry->items = apr_array_make(pool, 1024, sizeof(cs_carried));
    for (int i = 0; i < cs_g.shards; i++) {
        if (shard_lock(i) != APR_SUCCESS)
            continue;
        cs_g.cache->iterate(cs_g.cache_inst[i], s, carry, carry_one, pool);
        shard_unlock(i);
    }
    apr_pool_userdata_set(carry, CS_CARRY_KEY, apr_pool_cleanup_null,
                          s->process->pool);
    return APR_SUCCESS;
}

static void carry_in(server_rec *s, apr_pool_t *ptemp)
{
    void *data = NULL;
    cs_carry *carry;
    int stored = 0;

    apr_pool_userdata_get(&data, CS_CARRY_KEY, s->process->pool);
    if (!data)
        return;
    carry = data;
    apr_pool_userdata_set(NULL, CS_CARRY_KEY, apr_pool_cleanup_null,
                          s->process->pool);
    for (int i = 0; cs_g.shards && i < carry->items->nelts; i++) {
        cs_carried *it = &APR_ARRAY_IDX(carry->items, i, cs_carried);
        int shard = shard_of(it->id);
        if (it->expiry <= apr_time_now() || shard_lock(shard) != APR_SUCCESS)
            continue;
        stored += sc_store(shard, it->id, CS_STORE_ID_LEN, it->val, it->len,
                           it->expiry, ptemp) == APR_SUCCESS;
        shard_unlock(shard);
    }
    ap_log_error(APLOG_MARK, APLOG_INFO, 0, s,
                 APLOGNO(10533) "mod_cardscan: %d of %d cached tokens carried "
                                "over the restart",
                 stored, carry->items->nelts);
    apr_pool_destroy(carry->pool);
}

static int cs_post_config(apr_pool_t *pconf, apr_pool_t *plog,
                          apr_pool_t *ptemp, server_rec *s)
{
    /* shmcb sizes its index by the average object: a user has a token
     * (~2.4 KB with CardScan's JWTs) and, for a moment per call, a small
     * lock entry that keeps its index slot until the cycle reclaims it */
    struct ap_socache_hints hints = {CS_STORE_ID_LEN, 1200,
                                     apr_time_from_sec(30)};
    const char *name, *args, *err, **shard_args;
    apr_status_t rv;
    (void)plog;

    /* the first pass only checks the configuration */
    if (ap_state_query(AP_SQ_MAIN_STATE) == AP_SQ_MS_CREATE_PRE_CONFIG)
        return OK;

    if (cs_g.sandbox)
        ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s,
                     APLOGNO(10570) "mod_cardscan: a test API key is "
                                    "configured: its tokens are for the "
                                    "CardScan sandbox, which is not HIPAA "
                                    "compliant and must not see PHI (real "
                                    "patients' cards); use a live key for "
                                    "them");

    if ((rv = attach_metrics(s)) != APR_SUCCESS)
        return HTTP_INTERNAL_SERVER_ERROR;

    if (!split_cache_spec(ptemp, &name, &args)) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s,
                     APLOGNO(10505) "mod_cardscan: CardScanCache none: every "
                                    "request calls the CardScan API");
        return OK;
    }
    if (fleet_store_name(name)) {
        /* made here, connected lazily by each child that uses it */
        if (fleet_store_create(pconf, name, args ? args : "", &cs_g.store,
                               &err) != APR_SUCCESS)
            return HTTP_INTERNAL_SERVER_ERROR; /* reported by check_config */
        ap_log_error(
            APLOG_MARK, APLOG_INFO, 0, s,
            APLOGNO(10603) "mod_cardscan: token cache %s, %" APR_TIME_T_FMT
                           " ms per operation%s",
            cs_g.cache_spec, apr_time_as_msec(cs_g.store_timeout),
            cs_g.store_password ? ", with AUTH" : "");
        return OK;
    }
    cs_g.cache = ap_lookup_provider(AP_SOCACHE_PROVIDER_GROUP, name,
                                    AP_SOCACHE_PROVIDER_VERSION);
    if (!cs_g.cache)
        return HTTP_INTERNAL_SERVER_ERROR; /* reported by check_config */
    shard_args = shard_cache_args(ptemp, name, args, &cs_g.shards);
    apr_pool_cleanup_register(pconf, s, destroy_cache, apr_pool_cleanup_null);
    for (int i = 0; i < cs_g.shards; i++) {
        err = cs_g.cache->create(&cs_g.cache_inst[i], shard_args[i], ptemp,
                                 pconf);
        if (err) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s,
                         APLOGNO(10506) "mod_cardscan: CardScanCache %s: %s",
                         cs_g.cache_spec ? cs_g.cache_spec : name, err);
            return HTTP_INTERNAL_SERVER_ERROR;
        }
        /* every provider gets its lock: the single-flight lock (add) is a
         * read and a write that no other process may come between */
        {
            rv = ap_global_mutex_create(&cs_g.cache_mutex[i], NULL,
                                        CS_CACHE_MUTEX, apr_itoa(ptemp, i), s,
                                        pconf, 0);
            if (rv != APR_SUCCESS)
                return HTTP_INTERNAL_SERVER_ERROR;
        }
        rv = cs_g.cache->init(cs_g.cache_inst[i], "mod_cardscan", &hints, s,
                              pconf);
        if (rv != APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, rv, s,
                         APLOGNO(10507) "mod_cardscan: cannot initialise the "
                                        "token cache (%s)",
                         name);
            return HTTP_INTERNAL_SERVER_ERROR;
        }
    }
    cs_g.shmcb_store.ops = &sc_ops;
    cs_g.store = &cs_g.shmcb_store;
    carry_in(s, ptemp);
    /* registered last, so that it runs before the cache is destroyed */
    apr_pool_cleanup_register(pconf, s, carry_out, apr_pool_cleanup_null);
    return OK;
}

static apr_status_t refresher_start(apr_pool_t *p);

static void cs_child_init(apr_pool_t *p, server_rec *s)
{
    const char *err = NULL;
    apr_status_t rv;

    for (int i = 0; i < cs_g.shards; i++) {
        if (!cs_g.cache_mutex[i])
            continue;
        rv = apr_global_mutex_child_init(
            &cs_g.cache_mutex[i],
            apr_global_mutex_lockfile(cs_g.cache_mutex[i]), p);
        if (rv != APR_SUCCESS)
            ap_log_error(APLOG_MARK, APLOG_CRIT, rv, s,
                         APLOGNO(10509) "mod_cardscan: cache mutex init");
    }
    /* a user's hits copied for a second: many requests of one user at once
     * then share no lock with other processes */
    if (cs_g.store &&
        apr_thread_rwlock_create(&cs_g.local_lock, p) == APR_SUCCESS)
        cs_g.local = apr_pcalloc(p, CS_LOCAL_SLOTS * sizeof(cs_local_slot));
    if (apr_gethostname(cs_g.host_tag, sizeof(cs_g.host_tag), p) != APR_SUCCESS)
        apr_cpystrn(cs_g.host_tag, "host", sizeof(cs_g.host_tag));
    /* libcurl handles are per process: none survives a fork */
    if (cs_upstream_create(p, &cs_g.upstream, &err) != APR_SUCCESS)
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s,
                     APLOGNO(10510) "mod_cardscan: %s", err);
    /* its threads are stopped before the HTTP client goes */
    if (cs_g.store && cs_g.upstream && refresher_start(p) != APR_SUCCESS)
        ap_log_error(APLOG_MARK, APLOG_ERR, 0, s,
                     APLOGNO(10534) "mod_cardscan: cannot start the refresh "
                                    "threads: tokens are not refreshed ahead "
                                    "of expiry");
}

/* ---------------------------------------------------------------- replies */

static cs_req_state *req_state(request_rec *r, int create)
{
    cs_req_state *st =
        ap_get_module_config(r->request_config, &cardscan_module);
    if (!st && create) {
        st = apr_pcalloc(r->pool, sizeof(*st));
        ap_set_module_config(r->request_config, &cardscan_module, st);
    }
    return st;
}

/* CORS: a reply to an origin CardScanAllowOrigin lists may be read by that
 * origin's scripts, with credentials. Never "*"; other origins get no
 * Access-Control-* header. In err_headers_out, so that errors carry it too.
 * Returns whether the request's origin is listed. */
static int cors_allow(request_rec *r, const cs_dir_conf *d)
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

static int send_json(request_rec *r, int status, const char *body,
                     apr_size_t len)
{
    cs_req_state *st = req_state(r, 0);
    apr_bucket_brigade *bb;

    r->status = status;
    ap_set_content_type(r, "application/json");
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    cors_allow(r, ap_get_module_config(r->per_dir_config, &cardscan_module));
    apr_table_setn(r->headers_out, "X-Content-Type-Options", "nosniff");
    ap_set_content_length(r, len);
    if (r->header_only)
        return OK;
    bb = apr_brigade_create(r->pool, r->connection->bucket_alloc);
    APR_BRIGADE_INSERT_TAIL(
        bb, apr_bucket_pool_create(body, len, r->pool, bb->bucket_alloc));
    ap_pass_brigade(st && st->reply ? st->reply : r->output_filters, bb);
    return OK;
}

/* The outcome of a request, recorded once: the metric, and the request note
 * mod_log_config logs as %{cardscan-outcome}n. */
static void note_outcome(request_rec *r, cs_outcome_e outcome)
{
    cs_metrics_request(cs_g.metrics, outcome);
    apr_table_setn(r->notes, "cardscan-outcome", cs_outcome_name(outcome));
}

static int send_error(request_rec *r, cs_outcome_e outcome, int status,
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

/* ------------------------------------------------------------ the API call */

static void trace_line(void *baton, const char *line)
{
    const cs_call *c = baton;
    call_log(c, APLOG_TRACE4, 0, "libcurl: %s", line);
}

/* Sets e to the failure clients are told about: the user's negative cache
 * entry, kept CS_NEGATIVE_TTL or as long as the API asked us to wait. */
static void set_failure(cs_call *c, cs_entry_t *e, int status, const char *code,
                        const char *message, int retry_after)
{
    apr_interval_time_t ttl = apr_time_from_sec(retry_after);
    e->kind = CS_ENTRY_FAILURE;
    e->status = status;
    e->retry_after = retry_after;
    e->expires = e->created + (ttl > CS_NEGATIVE_TTL ? ttl : CS_NEGATIVE_TTL);
    e->body = cs_reply_error(c->p, code, message);
    e->body_len = strlen(e->body);
}

static cs_breaker_t *breaker_of(const cs_call *c)
{
    return cs_g.metrics && cs_g.breaker_failures
               ? cs_breaker_slot(cs_g.metrics->breakers, c->endpoint)
               : NULL;
}

/* One exchange with the API, retried once after a connect failure or a
 * 502/503/504 while the deadline allows; each exchange feeds the metrics and
 * the breaker. */
static void call_upstream(cs_call *c, cs_upstream_req_t *req,
                          cs_upstream_resp_t *resp)
{
    cs_breaker_t *breaker = breaker_of(c);
    apr_uint32_t user = ((apr_uint32_t)c->ref.bytes[4] << 24) |
                        ((apr_uint32_t)c->ref.bytes[5] << 16) |
                        ((apr_uint32_t)c->ref.bytes[6] << 8) | c->ref.bytes[7];
    apr_time_t start = apr_time_now(), deadline = start + req->timeout;

    for (int attempt = 0;; attempt++) {
        apr_interval_time_t left;
        cs_upstream_fetch(cs_g.upstream, c->p, req, resp);
        cs_metrics_upstream(cs_g.metrics, resp->result, resp->status,
                            resp->elapsed);
        if (breaker && cs_breaker_record(
                           breaker, apr_time_now(), !cs_upstream_failed(resp),
                           user, cs_g.breaker_failures, cs_g.breaker_period))
            call_log(c, APLOG_ERR, 0,
                     APLOGNO(10528) "mod_cardscan: %s failed %u times in a "
                                    "row for several users: not calling it "
                                    "for %" APR_TIME_T_FMT " s",
                     req->endpoint, cs_g.breaker_failures,
                     apr_time_sec(cs_g.breaker_period));
        left = deadline - apr_time_now();
        if (attempt > 0 || !cs_upstream_retryable(resp) ||
            left < apr_time_from_msec(100) ||
            (breaker && cs_breaker_is_open(breaker, apr_time_now())))
            break;
        call_log(c, APLOG_INFO, 0,
                 APLOGNO(10529) "mod_cardscan: retrying once after: %s",
                 resp->detail ? resp->detail
                              : apr_psprintf(c->p, "HTTP %d", resp->status));
        req->timeout = left;
        if (req->connect_timeout > left)
            req->connect_timeout = left;
    }
    c->called += apr_time_now() - start;
}

/* Calls the API for one user and turns the outcome into an entry: a token,
 * or the failure the user is told about. */
static void fetch_token(cs_call *c, cs_entry_t *e)
{
    const cs_srv_conf *sc = c->sc;
    cs_upstream_req_t req = {0};
    cs_upstream_resp_t resp;
    cs_token_t tok;
    const char *err = NULL, *endpoint = c->endpoint;
    apr_time_t now;

    req.endpoint = endpoint;
    req.user_id = c->user_id;
    req.key = c->d->key;
    req.ca_file = sc->ca_file;
    req.proxy = sc->proxy;
    req.proxy_auth = sc->proxy_auth;
    req.timeout = sc->timeout;
    req.connect_timeout = sc->connect_timeout;
    req.max_body = CS_MAX_BODY;
    if (c->r ? APLOG_R_IS_LEVEL(c->r, APLOG_TRACE4)
             : APLOG_IS_LEVEL(c->s, APLOG_TRACE4)) {
        req.trace = trace_line;
        req.trace_baton = c;
    }

    call_upstream(c, &req, &resp);
    now = apr_time_now();
    memset(e, 0, sizeof(*e));
    e->created = now;

    if (resp.result == CS_UP_OK && resp.status == 200) {
        if (cs_token_parse(c->p, resp.body, resp.body_len, now, &tok, &err) ==
            APR_SUCCESS) {
            e->kind = CS_ENTRY_TOKEN;
            e->lifetime = cs_token_lifetime(&tok, now);
            e->expires = e->lifetime ? now + e->lifetime : 0;
            e->body = cs_reply_token(c->p, &tok, e->expires, c->d->key->mode);
            e->body_len = strlen(e->body);
            call_log(c, APLOG_DEBUG, 0,
                     APLOGNO(10515) "mod_cardscan: new token from %s in "
                                    "%" APR_TIME_T_FMT " ms, lifetime "
                                    "%" APR_TIME_T_FMT " s%s",
                     endpoint, apr_time_as_msec(resp.elapsed),
                     apr_time_sec(e->lifetime),
                     tok.has_exp ? "" : " (no exp: not cached)");
            return;
        }
        call_log(c, APLOG_ERR, 0, APLOGNO(10516) "mod_cardscan: %s: %s",
                 endpoint, err);
        set_failure(c, e, HTTP_BAD_GATEWAY, "upstream_error",
                    "the CardScan API sent an invalid token reply", 0);
    }
    else if (resp.result == CS_UP_OK &&
             (resp.status == 401 || resp.status == 403)) {
        call_log(c, APLOG_ERR, 0,
                 APLOGNO(10517) "mod_cardscan: %s rejected the API key %s "
                                "(HTTP %d): check CardScanAPIKey",
                 endpoint, c->d->key->masked, resp.status);
        set_failure(c, e, HTTP_BAD_GATEWAY, "upstream_auth_failed",
                    "the CardScan API rejected this server's API key", 0);
    }
    else if (resp.result == CS_UP_OK && resp.status == 429) {
        int ra = cs_retry_after(resp.retry_after, apr_time_now());
        call_log(c, APLOG_WARNING, 0,
                 APLOGNO(10518) "mod_cardscan: %s: rate limited (HTTP 429, "
                                "Retry-After %s)",
                 endpoint, resp.retry_after ? resp.retry_after : "none");
        set_failure(c, e, HTTP_SERVICE_UNAVAILABLE, "upstream_rate_limited",
                    "the CardScan API is rate limiting this server; retry "
                    "later",
                    ra ? ra : 5);
    }
    else if (resp.result == CS_UP_OK) {
        call_log(c, APLOG_ERR, 0,
                 APLOGNO(10519) "mod_cardscan: %s answered HTTP %d%s", endpoint,
                 resp.status,
                 resp.status >= 300 && resp.status < 400
                     ? " (redirects are not followed)"
                     : "");
        set_failure(c, e, HTTP_BAD_GATEWAY, "upstream_error",
                    apr_psprintf(c->p, "the CardScan API answered HTTP %d",
                                 resp.status),
                    0);
    }
    else {
        call_log(c, APLOG_ERR, 0, APLOGNO(10520) "mod_cardscan: %s: %s",
                 endpoint, resp.detail ? resp.detail : "upstream failure");
        if (resp.result == CS_UP_TIMEOUT)
            set_failure(c, e, HTTP_GATEWAY_TIME_OUT, "upstream_timeout",
                        "the CardScan API did not answer in time", 0);
        else
            set_failure(c, e, HTTP_BAD_GATEWAY, "upstream_error",
                        resp.result == CS_UP_TOO_BIG
                            ? "the CardScan API sent an oversized reply"
                            : "the CardScan API could not be reached",
                        0);
    }
}

/* Stores what a call produced: a token for everyone, or a failure for this
 * user alone (under its own id, so that it never replaces a token). */
static void store_result(cs_call *c, const cs_entry_t *e)
{
    if (e->kind == CS_ENTRY_TOKEN && e->expires)
        store_put(c, CS_ID_TOKEN, e, e->expires);
    else if (e->kind == CS_ENTRY_FAILURE)
        store_put(c, CS_ID_FAILURE, e, e->expires);
}

/* ---------------------------------------------------------- serving path */

static void call_init(cs_call *c, request_rec *r, server_rec *s, apr_pool_t *p,
                      const cs_dir_conf *d, const char *user_id)
{
    memset(c, 0, sizeof(*c));
    c->r = r;
    c->s = s;
    c->p = p;
    c->d = d;
    c->sc = ap_get_module_config(s->module_config, &cardscan_module);
    c->user_id = user_id;
    c->endpoint = effective_endpoint(d);
    c->policy.min_ttl = d->min_ttl;
    c->policy.refresh_pct = d->refresh_pct;
    cache_ref(d->key, c->endpoint, user_id, &c->ref);
}

/* Whether the breaker lets this call through; when not, the reply. */
static int breaker_refuses(cs_call *c, int *retry_after)
{
    cs_breaker_t *breaker = breaker_of(c);
    return breaker && !cs_breaker_allow(breaker, apr_time_now(), retry_after);
}

static int send_unavailable(request_rec *r, int retry_after)
{
    apr_table_setn(r->headers_out, "Retry-After",
                   apr_itoa(r->pool, retry_after));
    return send_error(r, CS_OUT_UNAVAILABLE, HTTP_SERVICE_UNAVAILABLE,
                      "upstream_unavailable",
                      "the CardScan API is unavailable; retry later");
}

/* What the user's entries say now, for a request that has no token yet:
 * serve (a token stored by another request's call: e is set), fail (its
 * failure: e is set) or call. */
static cs_action_e result_of_last_call(cs_call *c, cs_entry_t *e)
{
    cs_entry_t tok, fail;
    int have_tok = store_get(c, CS_ID_TOKEN, &tok),
        have_fail = store_get(c, CS_ID_FAILURE, &fail);

    switch (cs_serve_decide(have_tok ? &tok : NULL, have_fail ? &fail : NULL, 0,
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
    apr_time_t give_up = apr_time_now() + c->sc->timeout;
    apr_interval_time_t nap = apr_time_from_msec(5);

    cs_metrics_wait(cs_g.metrics);
    while (apr_time_now() < give_up) {
        cs_action_e act;
        cs_lock_e lk;

        apr_sleep(nap);
        if (nap < apr_time_from_msec(50))
            nap *= 2;
        if ((act = result_of_last_call(c, tok)) != CS_DO_CALL)
            return act;
        lk = store_lock(c);
        if (lk != CS_LOCK_BUSY) {
            *locked = lk == CS_LOCK_HELD;
            return CS_DO_CALL;
        }
    }
    call_log(c, APLOG_WARNING, 0,
             APLOGNO(10525) "mod_cardscan: another request's call to the API "
                            "for this user took over CardScanTimeout; "
                            "calling it again");
    return CS_DO_CALL;
}

/* The user has no token to serve: make the one call for them, or wait for
 * the request that is making it. */
static int call_or_wait(cs_call *c, cs_entry_t *e)
{
    request_rec *r = c->r;
    cs_lock_e lk = store_lock(c);
    int locked = lk == CS_LOCK_HELD, retry_after = 0;

    if (lk == CS_LOCK_BUSY) {
        switch (wait_for_call(c, e, &locked)) {
        case CS_DO_SERVE:
            return send_entry(r, e, CS_OUT_WAITED);
        case CS_DO_FAIL:
            return send_entry(r, e, CS_OUT_ERROR);
        default:
            break;
        }
    }
    if (locked) {
        /* the call that held the lock just before us may have stored its
         * result since we last looked */
        switch (result_of_last_call(c, e)) {
        case CS_DO_SERVE:
            store_unlock(c, 0);
            return send_entry(r, e, CS_OUT_WAITED);
        case CS_DO_FAIL:
            store_unlock(c, 0);
            return send_entry(r, e, CS_OUT_ERROR);
        default:
            break;
        }
    }
    if (breaker_refuses(c, &retry_after)) {
        if (locked)
            store_unlock(c, 0);
        return send_unavailable(r, retry_after);
    }
    fetch_token(c, e);
    apr_table_setn(
        r->notes, "cardscan-upstream-ms",
        apr_psprintf(r->pool, "%" APR_TIME_T_FMT, apr_time_as_msec(c->called)));
    store_result(c, e);
    if (locked)
        store_unlock(c, 0);
    return send_entry(r, e, CS_OUT_FETCHED);
}

/* ----------------------------------------------------------- refresh ahead */

/* A refresh runs in one of this process's refresh threads, after the reply
 * that found the token in its refresh window has gone: no client waits for
 * it. The job owns its pool. */
typedef struct {
    apr_pool_t *pool;
    server_rec *s;
    const cs_dir_conf *d;
    const char *user_id;
    apr_time_t seen; /* created time of the token the request found */
} cs_refresh_job;

/* At most one refresh per user per CS_REFRESH_RETRY from this process. */
static int refresh_claim(const cs_call *c, apr_time_t now)
{
    cs_refresh_slot *slot =
        &cs_g.refresh_slots[c->ref.bytes[3] % CS_REFRESH_SLOTS];
    int claimed = 0;

    apr_thread_mutex_lock(cs_g.refresh_lock);
    if (memcmp(slot->id, c->ref.bytes, CS_CACHE_KEY_LEN) != 0 ||
        now >= slot->until) {
        memcpy(slot->id, c->ref.bytes, CS_CACHE_KEY_LEN);
        slot->until = now + CS_REFRESH_RETRY;
        claimed = 1;
    }
    apr_thread_mutex_unlock(cs_g.refresh_lock);
    return claimed;
}

static void refresh_one(cs_refresh_job *job)
{
    cs_call c;
    cs_entry_t e;
    int retry_after = 0;

    call_init(&c, NULL, job->s, job->pool, job->d, job->user_id);
    if (store_lock(&c) != CS_LOCK_HELD) {
        cs_metrics_refresh(cs_g.metrics, CS_REFRESH_SKIPPED);
    }
    else if (store_get(&c, CS_ID_TOKEN, &e) && e.created > job->seen) {
        /* another process or server refreshed it meanwhile */
        store_unlock(&c, 0);
        cs_metrics_refresh(cs_g.metrics, CS_REFRESH_SKIPPED);
    }
    else {
        if (breaker_refuses(&c, &retry_after))
            memset(&e, 0, sizeof(e));
        else
            fetch_token(&c, &e);
        if (e.kind == CS_ENTRY_TOKEN && e.expires) {
            store_put(&c, CS_ID_TOKEN, &e, e.expires);
            store_unlock(&c, 0);
            cs_metrics_refresh(cs_g.metrics, CS_REFRESH_OK);
            cs_g.refresh_failing = 0;
        }
        else {
            /* the current token stays in service while it is fresh; no
             * process tries again for this user before the lock expires */
            int level = cs_g.refresh_failing ? APLOG_DEBUG : APLOG_WARNING;
            cs_g.refresh_failing = 1;
            store_unlock(&c, apr_time_now() + CS_REFRESH_RETRY);
            cs_metrics_refresh(cs_g.metrics, CS_REFRESH_FAILED);
            call_log(&c, level, 0,
                     APLOGNO(10532) "mod_cardscan: refreshing a token ahead "
                                    "of its expiry failed%s; the current "
                                    "token stays in service, retried in "
                                    "%" APR_TIME_T_FMT " s",
                     e.kind ? "" : " (the breaker is open)",
                     apr_time_sec(CS_REFRESH_RETRY));
        }
    }
    apr_pool_destroy(job->pool);
}

/* The refresh threads of a process: a ring of jobs under a mutex and a
 * condition. They are stopped and joined when the process ends, before
 * its HTTP client is cleaned up; the jobs still queued are dropped. */
typedef struct cs_refresher {
    apr_thread_mutex_t *lock;
    apr_thread_cond_t *more;
    pthread_t threads[CS_REFRESH_THREADS];
    int nthreads, stopping;
    cs_refresh_job *queue[CS_REFRESH_QUEUE];
    unsigned int head, count;
} cs_refresher;

/* Plain POSIX threads: an APR thread gets a pool of its own under the child
 * pool, which it destroys when it exits; under prefork the child pool's
 * allocator has no mutex, and threads exiting together corrupted it. */
static void *refresh_thread(void *data)
{
    cs_refresher *rf = data;

    for (;;) {
        cs_refresh_job *job;
        apr_thread_mutex_lock(rf->lock);
        while (!rf->count && !rf->stopping)
            apr_thread_cond_wait(rf->more, rf->lock);
        if (rf->stopping) {
            apr_thread_mutex_unlock(rf->lock);
            break;
        }
        job = rf->queue[rf->head];
        rf->head = (rf->head + 1) % CS_REFRESH_QUEUE;
        rf->count--;
        apr_thread_mutex_unlock(rf->lock);
        refresh_one(job);
    }
    return NULL;
}

static apr_status_t refresher_stop(void *data)
{
    cs_refresher *rf = data;

    apr_thread_mutex_lock(rf->lock);
    rf->stopping = 1;
    apr_thread_cond_broadcast(rf->more);
    apr_thread_mutex_unlock(rf->lock);
    for (int i = 0; i < rf->nthreads; i++)
        pthread_join(rf->threads[i], NULL);
    for (; rf->count; rf->count--, rf->head = (rf->head + 1) % CS_REFRESH_QUEUE)
        apr_pool_destroy(rf->queue[rf->head]->pool);
    rf->nthreads = 0;
    cs_g.refresher = NULL;
    return APR_SUCCESS;
}

/* Starts the threads, with every signal blocked: signals are the MPM's
 * business, in its own threads. Threaded MPMs serve many users per process,
 * prefork one connection. */
static apr_status_t refresher_start(apr_pool_t *p)
{
    cs_refresher *rf = apr_pcalloc(p, sizeof(*rf));
    int threaded = 0, n;
    sigset_t all, old;
    apr_status_t rv;

    ap_mpm_query(AP_MPMQ_IS_THREADED, &threaded);
    n = threaded == AP_MPMQ_NOT_SUPPORTED ? CS_REFRESH_THREADS_PREFORK
                                          : CS_REFRESH_THREADS;
    if ((rv = apr_thread_mutex_create(&cs_g.refresh_lock,
                                      APR_THREAD_MUTEX_DEFAULT, p)) ||
        (rv =
             apr_thread_mutex_create(&rf->lock, APR_THREAD_MUTEX_DEFAULT, p)) ||
        (rv = apr_thread_cond_create(&rf->more, p)))
        return rv;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (rv = APR_SUCCESS; rf->nthreads < n && rv == APR_SUCCESS;)
        if ((rv = pthread_create(&rf->threads[rf->nthreads], NULL,
                                 refresh_thread, rf)) == 0)
            rf->nthreads++;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    /* a pre-cleanup: the threads are gone before anything of the child
     * pool, the HTTP client included, is cleaned up */
    apr_pool_pre_cleanup_register(p, rf, refresher_stop);
    if (!rf->nthreads)
        return rv;
    cs_g.refresher = rf;
    return APR_SUCCESS;
}

/* Queues a job; 0 when the queue is full or the threads are stopping. */
static int refresher_push(cs_refresh_job *job)
{
    cs_refresher *rf = cs_g.refresher;
    int queued = 0;

    apr_thread_mutex_lock(rf->lock);
    if (!rf->stopping && rf->count < CS_REFRESH_QUEUE) {
        rf->queue[(rf->head + rf->count) % CS_REFRESH_QUEUE] = job;
        rf->count++;
        apr_thread_cond_signal(rf->more);
        queued = 1;
    }
    apr_thread_mutex_unlock(rf->lock);
    return queued;
}

/* Starts a refresh of the user's token in the background, unless this
 * process started one for the user a moment ago. Returns 1 when started. */
static int refresh_later(const cs_call *c, const cs_entry_t *tok)
{
    cs_refresh_job *job;
    apr_pool_t *pool;

    if (!cs_g.refresher || !cs_g.store || !refresh_claim(c, apr_time_now()))
        return 0;
    if (apr_pool_create_unmanaged_ex(&pool, NULL, NULL) != APR_SUCCESS)
        return 0;
    job = apr_pcalloc(pool, sizeof(*job));
    job->pool = pool;
    job->s = c->s;
    /* a request's merged configuration may live in its pool: copy it (what
     * it points to lives in the configuration pool) */
    job->d = apr_pmemdup(pool, c->d, sizeof(*c->d));
    job->user_id = apr_pstrdup(pool, c->user_id);
    job->seen = tok->created;
    if (!refresher_push(job)) {
        apr_pool_destroy(pool);
        return 0;
    }
    return 1;
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

    call_init(&c, r, r->server, r->pool, d, user_id);
    have_tok = token_get(&c, now, &tok);
    switch (cs_serve_decide(have_tok ? &tok : NULL, NULL, 0, now, &c.policy)) {
    case CS_DO_SERVE:
        cs_metrics_cache(cs_g.metrics, 1);
        return send_entry(r, &tok, CS_OUT_HIT);
    case CS_DO_SERVE_REFRESH:
        cs_metrics_cache(cs_g.metrics, 1);
        return send_entry(
            r, &tok, refresh_later(&c, &tok) ? CS_OUT_REFRESHED : CS_OUT_HIT);
    default:
        break;
    }
    cs_metrics_cache(cs_g.metrics, 0);
    have_fail = store_get(&c, CS_ID_FAILURE, &fail);
    if (cs_serve_decide(have_tok ? &tok : NULL, have_fail ? &fail : NULL, 0,
                        now, &c.policy) == CS_DO_FAIL)
        return send_entry(r, &fail, CS_OUT_ERROR);
    return call_or_wait(&c, &tok);
}

/* Whether the location cannot serve tokens (then the error is sent): no
 * key applies, or this process has no upstream client. */
static int not_configured(request_rec *r, const cs_dir_conf *d)
{
    if (d->key && cs_g.upstream)
        return 0;
    ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                  APLOGNO(10521) "mod_cardscan: %s",
                  d->key ? "the upstream client failed to start"
                         : "no CardScanAPIKey applies to this location");
    send_error(r, CS_OUT_ERROR, HTTP_INTERNAL_SERVER_ERROR, "not_configured",
               "the CardScan session endpoint is not configured");
    return 1;
}

static int serve_user_id(request_rec *r, const cs_dir_conf *d,
                         const char *user_id);

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
        return send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "subrequest",
                          "the session endpoint does not answer "
                          "subrequests (such as server-side includes)");
    }
    r->allowed = (AP_METHOD_BIT << M_GET) | (AP_METHOD_BIT << M_POST);
    if (r->method_number != M_GET && r->method_number != M_POST) {
        apr_table_setn(r->headers_out, "Allow", "GET, POST");
        return send_error(r, CS_OUT_DENIED, HTTP_METHOD_NOT_ALLOWED,
                          "method_not_allowed", "use GET or POST");
    }
    /* a POST body means nothing here: read and drop it */
    if (ap_discard_request_body(r) != OK)
        return send_error(r, CS_OUT_DENIED, HTTP_BAD_REQUEST, "bad_request",
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
        send_error(r, CS_OUT_DENIED, HTTP_UNAUTHORIZED, "unauthenticated",
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
        send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "no_user_id",
                   "no user id is known for this login");
        return NULL;
    }
    return user_id;
}

static int cs_session_handler(request_rec *r)
{
    cs_dir_conf *d;
    const char *user_id;
    int refused;

    if (!r->handler || strcmp(r->handler, CS_HANDLER) != 0)
        return DECLINED;
    if ((refused = refused_request(r)) != DECLINED)
        return refused;
    d = ap_get_module_config(r->per_dir_config, &cardscan_module);
    if (not_configured(r, d) || !(user_id = authenticated_user_id(r, d)))
        return OK;
    return serve_user_id(r, d, user_id);
}

/* The reply for a user id from CardScanUserID or a backend: its checks,
 * then serve_user. The handler and CardScanBackendUser's filter both end
 * here. */
static int serve_user_id(request_rec *r, const cs_dir_conf *d,
                         const char *user_id)
{
    const char *err = NULL;

    if (cs_user_id_check(r->pool, user_id, &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r,
                      APLOGNO(10524) "mod_cardscan: refusing the user id: %s",
                      err);
        return send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "invalid_user_id",
                          err);
    }
    return serve_user(r, d, user_id);
}

/* ------------------------------------------------------------------- CORS */

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
 * its answer (cs_preflight_handler) says only which methods and headers the
 * origin may use, and never calls the API. Every other request goes on to
 * Apache's authentication as usual. */
static int cs_check_access_ex(request_rec *r)
{
    cs_dir_conf *d = ap_get_module_config(r->per_dir_config, &cardscan_module);

    if (!d->origins || r->main || !serves_tokens(r, d) ||
        !cs_origin_listed(d->origins, apr_table_get(r->headers_in, "Origin")))
        return DECLINED;
    if (r->method_number == M_OPTIONS &&
        apr_table_get(r->headers_in, "Access-Control-Request-Method")) {
        req_state(r, 1)->preflight = 1;
        ap_log_rerror(APLOG_MARK, APLOG_TRACE1, 0, r,
                      "mod_cardscan: CORS preflight from %s",
                      apr_table_get(r->headers_in, "Origin"));
        return OK;
    }
    /* Apache's own 401 is readable by the app too, so that it can tell
     * "log in first" from a network error (not a backend's pages) */
    if (!d->backend_header)
        cors_allow(r, d);
    return DECLINED;
}

/* Runs before every other handler (mod_proxy's included) for the preflights
 * cs_check_access_ex let through. */
static int cs_preflight_handler(request_rec *r)
{
    cs_req_state *st = req_state(r, 0);

    if (!st || !st->preflight)
        return DECLINED;
    if (ap_discard_request_body(r) != OK)
        return HTTP_BAD_REQUEST;
    cors_allow(r, ap_get_module_config(r->per_dir_config, &cardscan_module));
    apr_table_setn(r->headers_out, "Access-Control-Allow-Methods", "GET, POST");
    if (apr_table_get(r->headers_in, "Access-Control-Request-Headers"))
        apr_table_setn(r->headers_out, "Access-Control-Allow-Headers",
                       "Authorization, Content-Type, Accept");
    apr_table_setn(r->headers_out, "Access-Control-Max-Age", CS_CORS_MAX_AGE);
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    r->status = HTTP_NO_CONTENT;
    return OK;
}

/* ---------------------------------------------------- CardScanBackendUser */

/* Header names as CGI sees them: X-CardScan-User and X_CardScan_User are
 * one variable there (HTTP_X_CARDSCAN_USER). */
static int same_header(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a == '_' ? '-' : apr_tolower(*a);
        char y = *b == '_' ? '-' : apr_tolower(*b);
        if (x != y)
            return 0;
    }
    return *a == *b;
}

typedef struct {
    const char *name;
    apr_array_header_t *found; /* names of the matching entries */
} cs_header_match;

static int match_header(void *baton, const char *key, const char *value)
{
    cs_header_match *m = baton;
    (void)value;
    if (same_header(key, m->name))
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

/* The client cannot name the user: a request header of that name never
 * reaches the backend. */
static int cs_fixups(request_rec *r)
{
    cs_dir_conf *d = ap_get_module_config(r->per_dir_config, &cardscan_module);
    if (d->backend_header &&
        strip_header(r->pool, r->headers_in, d->backend_header))
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10571) "mod_cardscan: removed the client's %s "
                                     "request header (CardScanBackendUser)",
                      d->backend_header);
    return DECLINED;
}

static void cs_insert_filter(request_rec *r)
{
    cs_dir_conf *d = ap_get_module_config(r->per_dir_config, &cardscan_module);
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

/* CardScanBackendUser: the backend (proxy, CGI, ...) names the user in a
 * response header. A 200 naming one user is replaced by that user's token
 * reply, served as the handler serves it; any other response passes
 * untouched. The header never reaches the client. */
static apr_status_t cs_backend_filter(ap_filter_t *f, apr_bucket_brigade *bb)
{
    request_rec *r = f->r;
    cs_dir_conf *d = ap_get_module_config(r->per_dir_config, &cardscan_module);
    cs_req_state *st;
    const char *user_id;
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

    /* the backend's response is replaced, headers and all */
    f->ctx = f;
    r->headers_out = apr_table_make(r->pool, 8);
    r->status_line = NULL;
    r->content_encoding = NULL;
    r->content_languages = NULL;
    st = req_state(r, 1);
    st->reply = f->next;
    if (n > 1) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10572) "mod_cardscan: the backend sent %d %s "
                                     "headers: refusing to pick one",
                      n, d->backend_header);
        send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "invalid_user_id",
                   "the application named more than one user");
    }
    else if (!not_configured(r, d)) {
        const char *err = NULL;
        /* %u in the access log: the user the application named */
        if (!r->user && cs_user_id_check(r->pool, user_id, &err) == APR_SUCCESS)
            r->user = apr_pstrdup(r->pool, user_id);
        serve_user_id(r, d, user_id);
    }
    st->reply = NULL;
    return drop_backend_body(f, bb);
}

/* ---------------------------------------------------------------- metrics */

static int cs_metrics_handler(request_rec *r)
{
    const char *body;

    if (!r->handler || strcmp(r->handler, CS_METRICS_HANDLER) != 0)
        return DECLINED;
    r->allowed = (AP_METHOD_BIT << M_GET);
    if (r->method_number != M_GET)
        return HTTP_METHOD_NOT_ALLOWED;
    if (!cs_g.metrics)
        return HTTP_SERVICE_UNAVAILABLE;
    body = cs_metrics_render(r->pool, cs_g.metrics, apr_time_now());
    ap_set_content_type(r, "text/plain; version=0.0.4; charset=utf-8");
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    ap_set_content_length(r, strlen(body));
    if (!r->header_only)
        ap_rputs(body, r);
    return OK;
}

/* The same figures on mod_status's server-status page. */
static int cs_status_hook(request_rec *r, int flags)
{
    const char *text, *line;
    char *copy, *state;

    if (!cs_g.metrics)
        return OK;
    text = cs_metrics_render(r->pool, cs_g.metrics, apr_time_now());
    copy = apr_pstrdup(r->pool, text);
    if (!(flags & AP_STATUS_SHORT))
        ap_rputs("<hr />\n<h2>mod_cardscan</h2>\n<pre>", r);
    for (line = apr_strtok(copy, "\n", &state); line;
         line = apr_strtok(NULL, "\n", &state)) {
        if (*line == '#')
            continue;
        if (flags & AP_STATUS_SHORT) {
            /* server-status?auto speaks "Key: value" */
            const char *sp = strrchr(line, ' ');
            if (sp)
                ap_rprintf(r, "%.*s: %s\n", (int)(sp - line), line, sp + 1);
        }
        else
            ap_rprintf(r, "%s\n", ap_escape_html(r->pool, line));
    }
    if (!(flags & AP_STATUS_SHORT))
        ap_rputs("</pre>\n", r);
    return OK;
}

static void cs_register_hooks(apr_pool_t *p)
{
    (void)p;
    ap_hook_pre_config(cs_pre_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_check_config(cs_check_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_post_config(cs_post_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_child_init(cs_child_init, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_check_access_ex(cs_check_access_ex, NULL, NULL, APR_HOOK_FIRST,
                            AP_AUTH_INTERNAL_PER_CONF);
    ap_hook_handler(cs_preflight_handler, NULL, NULL, APR_HOOK_REALLY_FIRST);
    ap_hook_fixups(cs_fixups, NULL, NULL, APR_HOOK_FIRST);
    ap_hook_insert_filter(cs_insert_filter, NULL, NULL, APR_HOOK_MIDDLE);
    ap_register_output_filter(CS_BACKEND_FILTER, cs_backend_filter, NULL,
                              AP_FTYPE_RESOURCE - 5);
    ap_hook_handler(cs_session_handler, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_handler(cs_metrics_handler, NULL, NULL, APR_HOOK_MIDDLE);
    APR_OPTIONAL_HOOK(ap, status_hook, cs_status_hook, NULL, NULL,
                      APR_HOOK_MIDDLE);
}

AP_DECLARE_MODULE(cardscan) = {STANDARD20_MODULE_STUFF, create_dir_conf,
                               merge_dir_conf,          create_srv_conf,
                               merge_srv_conf,          cs_cmds,
                               cs_register_hooks,
#if defined(AP_MODULE_FLAG_ALWAYS_MERGE)
                               AP_MODULE_FLAG_NONE
#endif
};
