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
#include "http_protocol.h"
#include "http_request.h"
#include "ap_expr.h"
#include "ap_provider.h"
#include "ap_socache.h"
#include "util_mutex.h"
#include "mod_status.h"

#include "apr_global_mutex.h"
#include "apr_lib.h"
#include "apr_shm.h"
#include "apr_thread_rwlock.h"
#include "apr_strings.h"

#include "lib/cardscan.h"

#include <string.h>

module AP_MODULE_DECLARE_DATA cardscan_module;

#define CS_HANDLER "cardscan-session"
#define CS_METRICS_HANDLER "cardscan-metrics"
#define CS_CACHE_MUTEX "cardscan-cache"
#define CS_FLIGHT_MUTEX "cardscan-flight"
#define CS_FLIGHT_STRIPES 128
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
#define CS_STATE_TAG CS_VERSION "/" APR_STRINGIFY(CS_FLIGHT_STRIPES)
#define CS_SHM_KEY "mod_cardscan metrics " CS_STATE_TAG
#define CS_FLIGHT_KEY "mod_cardscan flight " CS_STATE_TAG

/* Per-directory (and per-server defaults, via lookup_defaults) settings. */
typedef struct {
    cs_key_t *key;
    const char *endpoint;    /* normalised; NULL: from the key */
    ap_expr_info_t *user_id; /* NULL: REMOTE_USER */
    apr_interval_time_t min_ttl;
    unsigned int min_ttl_set : 1;
} cs_dir_conf;

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
    apr_global_mutex_t *flight[CS_FLIGHT_STRIPES];
    cs_upstream_t *upstream; /* per child, from child_init */
    cs_local_slot *local;    /* per child: CS_LOCAL_SLOTS copies of hits */
    apr_thread_rwlock_t *local_lock;
    cs_metrics_t *metrics; /* shared memory, kept across restarts */
    apr_uint32_t breaker_failures;
    apr_interval_time_t breaker_period;
    int seal_secret_set; /* CardScanCacheSecret */
    unsigned char seal_key[CS_SECRET_LEN];
    apr_time_t cache_warned; /* last cache-outage warning of this process */
    apr_time_t entry_warned; /* last unreadable-entry warning */
    apr_time_t cache_pause_until;    /* per process: cache unreachable */
    apr_interval_time_t cache_pause; /* current back-off, 0 when healthy */
} cs_g;

/* ---------------------------------------------------------- configuration */

static void *create_dir_conf(apr_pool_t *p, char *dir)
{
    cs_dir_conf *d = apr_pcalloc(p, sizeof(*d));
    (void)dir;
    d->min_ttl = CS_DEFAULT_MIN_TTL;
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
    AP_INIT_TAKE1("CardScanCacheMinTTL", set_min_ttl, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "seconds of life a cached token must have left to be "
                  "served (default 60)"),
    AP_INIT_TAKE1("CardScanCacheSecret", set_cache_secret, NULL, RSRC_CONF,
                  "file:/path holding the secret that seals cache entries "
                  "(default: derived from the API key)"),
    AP_INIT_TAKE12("CardScanCircuitBreaker", set_breaker, NULL, RSRC_CONF,
                   "consecutive failures that stop calls to the API, and "
                   "for how many seconds (default 5 10)"),
    {NULL}};

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
    if (split_cache_spec(ptemp, &name, &args)) {
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

/* The single-flight stripes are made once per server lifetime too: children
 * of the previous generation still hold them while they finish their
 * requests after a graceful restart, so they must not be destroyed under
 * them. (A changed Mutex cardscan-flight applies at the next full start.) */
static apr_status_t attach_flight(server_rec *s, apr_pool_t *ptemp)
{
    apr_pool_t *pp = s->process->pool;
    void *saved = NULL;
    apr_status_t rv;

    apr_pool_userdata_get(&saved, CS_FLIGHT_KEY, pp);
    if (saved) {
        memcpy(cs_g.flight, saved, sizeof(cs_g.flight));
        return APR_SUCCESS;
    }
    for (int i = 0; i < CS_FLIGHT_STRIPES; i++) {
        rv = ap_global_mutex_create(&cs_g.flight[i], NULL, CS_FLIGHT_MUTEX,
                                    apr_itoa(ptemp, i), s, pp, 0);
        if (rv != APR_SUCCESS)
            return rv;
    }
    saved = apr_pmemdup(pp, cs_g.flight, sizeof(cs_g.flight));
    apr_pool_userdata_set(saved, CS_FLIGHT_KEY, apr_pool_cleanup_null, pp);
    return APR_SUCCESS;
}

static int cs_post_config(apr_pool_t *pconf, apr_pool_t *plog,
                          apr_pool_t *ptemp, server_rec *s)
{
    struct ap_socache_hints hints = {CS_CACHE_KEY_LEN, 2400,
                                     apr_time_from_sec(30)};
    const char *name, *args, *err, **shard_args;
    apr_status_t rv;
    (void)plog;

    /* the first pass only checks the configuration */
    if (ap_state_query(AP_SQ_MAIN_STATE) == AP_SQ_MS_CREATE_PRE_CONFIG)
        return OK;

    if ((rv = attach_metrics(s)) != APR_SUCCESS)
        return HTTP_INTERNAL_SERVER_ERROR;

    if ((rv = attach_flight(s, ptemp)) != APR_SUCCESS)
        return HTTP_INTERNAL_SERVER_ERROR;

    if (!split_cache_spec(ptemp, &name, &args)) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s,
                     APLOGNO(10505) "mod_cardscan: CardScanCache none: every "
                                    "request calls the CardScan API");
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
        if (cs_g.cache->flags & AP_SOCACHE_FLAG_NOTMPSAFE) {
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
    return OK;
}

static void cs_child_init(apr_pool_t *p, server_rec *s)
{
    const char *err = NULL;
    apr_status_t rv;

    for (int i = 0; i < CS_FLIGHT_STRIPES; i++) {
        if (!cs_g.flight[i])
            continue;
        rv = apr_global_mutex_child_init(
            &cs_g.flight[i], apr_global_mutex_lockfile(cs_g.flight[i]), p);
        if (rv != APR_SUCCESS)
            ap_log_error(APLOG_MARK, APLOG_CRIT, rv, s,
                         APLOGNO(10508) "mod_cardscan: flight mutex init");
    }
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
    if (cs_g.shards &&
        apr_thread_rwlock_create(&cs_g.local_lock, p) == APR_SUCCESS)
        cs_g.local = apr_pcalloc(p, CS_LOCAL_SLOTS * sizeof(cs_local_slot));
    /* libcurl handles are per process: none survives a fork */
    if (cs_upstream_create(p, &cs_g.upstream, &err) != APR_SUCCESS)
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s,
                     APLOGNO(10510) "mod_cardscan: %s", err);
}

/* ------------------------------------------------------------------ cache */

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

/* A cache that cannot be reached (Redis restarting, ...) is left alone for a
 * while, doubling from 2 s to 60 s, so that neither this module nor the
 * socache provider floods the log; requests call the API meanwhile. The
 * state is per process and updated without a lock: a lost update only
 * changes when the next attempt happens. */
static void cache_failed(request_rec *r, apr_status_t rv, const char *what)
{
    /* computed once: ap_log_rerror is a macro that evaluates it twice */
    int level = warn_level(&cs_g.cache_warned);
    apr_interval_time_t pause =
        cs_g.cache_pause ? 2 * cs_g.cache_pause : CS_CACHE_PAUSE_MIN;
    if (pause > CS_CACHE_PAUSE_MAX)
        pause = CS_CACHE_PAUSE_MAX;
    cs_g.cache_pause = pause;
    cs_g.cache_pause_until = apr_time_now() + pause;
    ap_log_rerror(APLOG_MARK, level, rv, r,
                  APLOGNO(10527) "mod_cardscan: the token cache failed to %s; "
                                 "calling the CardScan API directly for the "
                                 "next %" APR_TIME_T_FMT " s",
                  what, apr_time_sec(pause));
}

static int cache_usable(void)
{
    return cs_g.shards > 0 && apr_time_now() >= cs_g.cache_pause_until;
}

/* One user's place in the caches, computed once per request: the hex id
 * (bound into sealed entries) and its bytes, which pick the socache id, the
 * shard, the single-flight stripe and the per-process slot. */
typedef struct {
    char id[CS_CACHE_ID_LEN + 1];
    unsigned char bytes[CS_CACHE_KEY_LEN];
} cs_cache_ref;

static void cache_ref(const cs_key_t *key, const char *endpoint,
                      const char *user_id, cs_cache_ref *ref)
{
    cs_cache_id(key, endpoint, user_id, ref->id);
    cs_cache_key_bytes(ref->id, ref->bytes);
}

/* The shard of a reference, locked when its provider needs a lock. A lock
 * fails in children of a generation a graceful restart has replaced: their
 * cache is going away, so they do without it (returns -1). */
static int shard_lock(const cs_cache_ref *ref)
{
    int shard = ref->bytes[CS_CACHE_KEY_LEN - 1] & (cs_g.shards - 1);
    if (cs_g.cache_mutex[shard] &&
        apr_global_mutex_lock(cs_g.cache_mutex[shard]) != APR_SUCCESS)
        return -1;
    return shard;
}

static void shard_unlock(int shard)
{
    if (cs_g.cache_mutex[shard])
        apr_global_mutex_unlock(cs_g.cache_mutex[shard]);
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

/* The per-process copies: a hot user's requests are served from this
 * process's memory for CS_LOCAL_TTL after a shared-cache hit, without the
 * shared cache's lock or decryption. A copy is only ever an entry that was
 * just valid in the shared cache, and freshness is checked as there. */
static cs_local_slot *local_slot(const cs_cache_ref *ref)
{
    return &cs_g.local[ref->bytes[1] % CS_LOCAL_SLOTS];
}

static int local_get(request_rec *r, const cs_cache_ref *ref, apr_time_t now,
                     apr_interval_time_t min_ttl, cs_entry_t *e)
{
    cs_local_slot *slot;
    int hit = 0;

    if (!cs_g.local)
        return 0;
    slot = local_slot(ref);
    apr_thread_rwlock_rdlock(cs_g.local_lock);
    if (now < slot->until && strcmp(slot->id, ref->id) == 0 &&
        cs_entry_fresh(&slot->e, now, min_ttl)) {
        *e = slot->e;
        e->body = apr_pstrmemdup(r->pool, slot->buf, slot->e.body_len);
        hit = 1;
    }
    apr_thread_rwlock_unlock(cs_g.local_lock);
    return hit;
}

static void local_put(const cs_cache_ref *ref, const cs_entry_t *e,
                      apr_time_t now)
{
    cs_local_slot *slot;

    if (!cs_g.local || e->kind != CS_ENTRY_TOKEN ||
        e->body_len >= sizeof(slot->buf))
        return;
    slot = local_slot(ref);
    apr_thread_rwlock_wrlock(cs_g.local_lock);
    memcpy(slot->buf, e->body, e->body_len);
    slot->e = *e;
    slot->e.body = slot->buf;
    memcpy(slot->id, ref->id, CS_CACHE_ID_LEN + 1);
    slot->until = now + CS_LOCAL_TTL;
    apr_thread_rwlock_unlock(cs_g.local_lock);
}

static int cache_get(request_rec *r, const cs_key_t *key,
                     const cs_cache_ref *ref, cs_entry_t *e)
{
    unsigned char buf[CS_ENTRY_MAX];
    unsigned int len = sizeof(buf);
    int shard;
    const char *err = NULL;
    cs_key_t tmp;
    apr_status_t rv;

    if (!cache_usable() || (shard = shard_lock(ref)) < 0)
        return 0;
    rv = cs_g.cache->retrieve(cs_g.cache_inst[shard], r->server, ref->bytes,
                              CS_CACHE_KEY_LEN, buf, &len, r->pool);
    shard_unlock(shard);
    if (rv != APR_SUCCESS) {
        if (!APR_STATUS_IS_NOTFOUND(rv))
            cache_failed(r, rv, "read");
        return 0;
    }
    if (cs_entry_open(r->pool, seal_key(key, &tmp), ref->id, buf, len, e,
                      &err) != APR_SUCCESS) {
        /* servers with different CardScanCacheSecret would keep replacing
         * each other's entries: not a warning per request */
        int level = warn_level(&cs_g.entry_warned);
        ap_log_rerror(APLOG_MARK, level, 0, r,
                      APLOGNO(10511) "mod_cardscan: ignoring a cache entry: "
                                     "%s",
                      err);
        return 0;
    }
    return 1;
}

static void cache_put(request_rec *r, const cs_key_t *key,
                      const cs_cache_ref *ref, const cs_entry_t *e,
                      apr_time_t expiry)
{
    unsigned char *data;
    apr_size_t len;
    int shard;
    const char *err = NULL;
    cs_key_t tmp;
    apr_status_t rv;

    if (!cache_usable())
        return;
    if (cs_entry_seal(r->pool, seal_key(key, &tmp), ref->id, e, &data, &len,
                      &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10512) "mod_cardscan: %s", err);
        return;
    }
    if (len > CS_ENTRY_MAX) {
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r,
                      APLOGNO(10513) "mod_cardscan: a token reply of "
                                     "%" APR_SIZE_T_FMT
                                     " bytes is too large to cache",
                      len);
        return;
    }
    if ((shard = shard_lock(ref)) < 0)
        return;
    rv = cs_g.cache->store(cs_g.cache_inst[shard], r->server, ref->bytes,
                           CS_CACHE_KEY_LEN, expiry, data, (unsigned int)len,
                           r->pool);
    shard_unlock(shard);
    if (rv == APR_SUCCESS)
        cs_g.cache_pause = 0;
    else if (APR_STATUS_IS_ENOSPC(rv)) /* a full shmcb: just not cached */
        ap_log_rerror(
            APLOG_MARK, APLOG_DEBUG, rv, r,
            APLOGNO(10514) "mod_cardscan: the token cache has no room for this "
                           "entry");
    else
        cache_failed(r, rv, "store");
}

/* ---------------------------------------------------------------- replies */

static int send_json(request_rec *r, int status, const char *body,
                     apr_size_t len)
{
    r->status = status;
    ap_set_content_type(r, "application/json");
    apr_table_setn(r->headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->headers_out, "X-Content-Type-Options", "nosniff");
    ap_set_content_length(r, len);
    if (!r->header_only)
        ap_rwrite(body, (int)len, r);
    return OK;
}

static int send_error(request_rec *r, cs_outcome_e outcome, int status,
                      const char *code, const char *message)
{
    const char *body = cs_reply_error(r->pool, code, message);
    cs_metrics_request(cs_g.metrics, outcome);
    return send_json(r, status, body, strlen(body));
}

static int send_entry(request_rec *r, const cs_entry_t *e, cs_outcome_e outcome)
{
    if (e->kind == CS_ENTRY_FAILURE && e->retry_after)
        apr_table_setn(r->headers_out, "Retry-After",
                       apr_itoa(r->pool, e->retry_after));
    cs_metrics_request(cs_g.metrics,
                       e->kind == CS_ENTRY_TOKEN ? outcome : CS_OUT_ERROR);
    return send_json(r, e->kind == CS_ENTRY_TOKEN ? HTTP_OK : e->status,
                     e->body, e->body_len);
}

/* ---------------------------------------------------------------- handler */

static apr_global_mutex_t *flight_mutex(const cs_cache_ref *ref)
{
    unsigned int h = ((unsigned int)ref->bytes[0] << 8) | ref->bytes[2];
    return cs_g.flight[h % CS_FLIGHT_STRIPES];
}

static void trace_line(void *baton, const char *line)
{
    request_rec *r = baton;
    ap_log_rerror(APLOG_MARK, APLOG_TRACE4, 0, r, "libcurl: %s", line);
}

/* Sets e to the failure clients are told about. */
static void set_failure(request_rec *r, cs_entry_t *e, int status,
                        const char *code, const char *message, int retry_after)
{
    e->kind = CS_ENTRY_FAILURE;
    e->status = status;
    e->retry_after = retry_after;
    e->body = cs_reply_error(r->pool, code, message);
    e->body_len = strlen(e->body);
}

/* One exchange with the API, retried once after a connect failure or a
 * 502/503/504 while the deadline allows; each exchange feeds the metrics and
 * the breaker. */
static void call_upstream(request_rec *r, cs_upstream_req_t *req,
                          cs_breaker_t *breaker, cs_upstream_resp_t *resp)
{
    apr_time_t deadline = apr_time_now() + req->timeout;

    for (int attempt = 0;; attempt++) {
        apr_interval_time_t left;
        cs_upstream_fetch(cs_g.upstream, r->pool, req, resp);
        cs_metrics_upstream(cs_g.metrics, resp->result, resp->status,
                            resp->elapsed);
        if (breaker && cs_breaker_record(
                           breaker, apr_time_now(), !cs_upstream_failed(resp),
                           cs_g.breaker_failures, cs_g.breaker_period))
            ap_log_rerror(
                APLOG_MARK, APLOG_ERR, 0, r,
                APLOGNO(10528) "mod_cardscan: %s failed %u times "
                               "in a row: not calling it for %" APR_TIME_T_FMT
                               " s",
                req->endpoint, cs_g.breaker_failures,
                apr_time_sec(cs_g.breaker_period));
        left = deadline - apr_time_now();
        if (attempt > 0 || !cs_upstream_retryable(resp) ||
            left < apr_time_from_msec(100) ||
            (breaker && cs_breaker_is_open(breaker, apr_time_now())))
            return;
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10529) "mod_cardscan: retrying once after: %s",
                      resp->detail
                          ? resp->detail
                          : apr_psprintf(r->pool, "HTTP %d", resp->status));
        req->timeout = left;
        if (req->connect_timeout > left)
            req->connect_timeout = left;
    }
}

/* Calls the API for one user and turns the outcome into a cache entry:
 * a token, or the failure every waiting request is told. */
static void fetch_token(request_rec *r, const cs_dir_conf *d,
                        const char *endpoint, const char *user_id,
                        cs_breaker_t *breaker, cs_entry_t *e)
{
    cs_srv_conf *sc =
        ap_get_module_config(r->server->module_config, &cardscan_module);
    cs_upstream_req_t req = {0};
    cs_upstream_resp_t resp;
    cs_token_t tok;
    const char *err = NULL;
    apr_time_t now;

    req.endpoint = endpoint;
    req.user_id = user_id;
    req.key = d->key;
    req.ca_file = sc->ca_file;
    req.proxy = sc->proxy;
    req.proxy_auth = sc->proxy_auth;
    req.timeout = sc->timeout;
    req.connect_timeout = sc->connect_timeout;
    req.max_body = CS_MAX_BODY;
    if (APLOG_R_IS_LEVEL(r, APLOG_TRACE4)) {
        req.trace = trace_line;
        req.trace_baton = r;
    }

    call_upstream(r, &req, breaker, &resp);
    now = apr_time_now();
    memset(e, 0, sizeof(*e));
    e->created = now;

    if (resp.result == CS_UP_OK && resp.status == 200) {
        if (cs_token_parse(r->pool, resp.body, resp.body_len, now, &tok,
                           &err) == APR_SUCCESS) {
            e->kind = CS_ENTRY_TOKEN;
            e->lifetime = cs_token_lifetime(&tok, now);
            e->expires = e->lifetime ? now + e->lifetime : 0;
            e->body = cs_reply_token(r->pool, &tok, e->expires);
            e->body_len = strlen(e->body);
            ap_log_rerror(APLOG_MARK, APLOG_DEBUG, 0, r,
                          APLOGNO(10515) "mod_cardscan: new token from %s in "
                                         "%" APR_TIME_T_FMT " ms, lifetime "
                                         "%" APR_TIME_T_FMT " s%s",
                          endpoint, apr_time_as_msec(resp.elapsed),
                          apr_time_sec(e->lifetime),
                          tok.has_exp ? "" : " (no exp: not cached)");
            return;
        }
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10516) "mod_cardscan: %s: %s", endpoint, err);
        set_failure(r, e, HTTP_BAD_GATEWAY, "upstream_error",
                    "the CardScan API sent an invalid token reply", 0);
    }
    else if (resp.result == CS_UP_OK &&
             (resp.status == 401 || resp.status == 403)) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10517) "mod_cardscan: %s rejected the API key "
                                     "%s (HTTP %d): check CardScanAPIKey",
                      endpoint, d->key->masked, resp.status);
        set_failure(r, e, HTTP_BAD_GATEWAY, "upstream_auth_failed",
                    "the CardScan API rejected this server's API key", 0);
    }
    else if (resp.result == CS_UP_OK && resp.status == 429) {
        int ra = cs_retry_after(resp.retry_after, apr_time_now());
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r,
                      APLOGNO(10518) "mod_cardscan: %s: rate limited (HTTP "
                                     "429, Retry-After %s)",
                      endpoint, resp.retry_after ? resp.retry_after : "none");
        set_failure(r, e, HTTP_SERVICE_UNAVAILABLE, "upstream_rate_limited",
                    "the CardScan API is rate limiting this server; retry "
                    "later",
                    ra ? ra : 5);
    }
    else if (resp.result == CS_UP_OK) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10519) "mod_cardscan: %s answered HTTP %d%s",
                      endpoint, resp.status,
                      resp.status >= 300 && resp.status < 400
                          ? " (redirects are not followed)"
                          : "");
        set_failure(r, e, HTTP_BAD_GATEWAY, "upstream_error",
                    apr_psprintf(r->pool, "the CardScan API answered HTTP %d",
                                 resp.status),
                    0);
    }
    else {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10520) "mod_cardscan: %s: %s", endpoint,
                      resp.detail ? resp.detail : "upstream failure");
        if (resp.result == CS_UP_TIMEOUT)
            set_failure(r, e, HTTP_GATEWAY_TIME_OUT, "upstream_timeout",
                        "the CardScan API did not answer in time", 0);
        else
            set_failure(r, e, HTTP_BAD_GATEWAY, "upstream_error",
                        resp.result == CS_UP_TOO_BIG
                            ? "the CardScan API sent an oversized reply"
                            : "the CardScan API could not be reached",
                        0);
    }
    e->created = now;
}

static int cs_session_handler(request_rec *r)
{
    cs_dir_conf *d;
    cs_srv_conf *sc;
    const char *user_id, *endpoint, *err = NULL;
    cs_cache_ref ref;
    cs_entry_t e;
    cs_breaker_t *breaker;
    apr_global_mutex_t *flight;
    apr_time_t wait_start, now;
    apr_status_t rv;
    int retry_after = 0;

    if (!r->handler || strcmp(r->handler, CS_HANDLER) != 0)
        return DECLINED;

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

    d = ap_get_module_config(r->per_dir_config, &cardscan_module);
    if (!d->key || !cs_g.upstream) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                      APLOGNO(10521) "mod_cardscan: %s",
                      d->key ? "the upstream client failed to start"
                             : "no CardScanAPIKey applies to this location");
        return send_error(r, CS_OUT_ERROR, HTTP_INTERNAL_SERVER_ERROR,
                          "not_configured",
                          "the CardScan session endpoint is not configured");
    }

    /* Identity: only from the authenticated request, never from anything
     * the client sends. Fail closed: no authenticated user, no token, even
     * when CardScanUserID does not name REMOTE_USER. */
    if (!r->user || !*r->user) {
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r,
                      APLOGNO(10523) "mod_cardscan: no authenticated user: "
                                     "protect this location with Apache "
                                     "authentication");
        return send_error(r, CS_OUT_DENIED, HTTP_UNAUTHORIZED,
                          "unauthenticated", "log in first");
    }
    if (d->user_id) {
        user_id = ap_expr_str_exec(r, d->user_id, &err);
        if (err) {
            ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r,
                          APLOGNO(10522) "mod_cardscan: CardScanUserID: %s",
                          err);
            user_id = NULL;
        }
    }
    else {
        user_id = r->user;
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
        return send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "no_user_id",
                          "no user id is known for this login");
    }
    if (cs_user_id_check(r->pool, user_id, &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r,
                      APLOGNO(10524) "mod_cardscan: refusing the user id: %s",
                      err);
        return send_error(r, CS_OUT_DENIED, HTTP_FORBIDDEN, "invalid_user_id",
                          err);
    }

    endpoint = effective_endpoint(d);
    cache_ref(d->key, endpoint, user_id, &ref);
    now = apr_time_now();
    if (local_get(r, &ref, now, d->min_ttl, &e) ||
        (cache_get(r, d->key, &ref, &e) &&
         cs_entry_fresh(&e, now, d->min_ttl) &&
         (local_put(&ref, &e, now), 1))) {
        cs_metrics_cache(cs_g.metrics, 1);
        return send_entry(r, &e, CS_OUT_HIT);
    }
    cs_metrics_cache(cs_g.metrics, 0);

    /* Single flight: one request per user (stripe) calls the API; the
     * others wait on the stripe, then find its result in the cache. */
    sc = ap_get_module_config(r->server->module_config, &cardscan_module);
    flight = flight_mutex(&ref);
    wait_start = apr_time_now();
    rv = apr_global_mutex_trylock(flight);
    if (APR_STATUS_IS_EBUSY(rv)) {
        cs_metrics_wait(cs_g.metrics);
        rv = apr_global_mutex_timedlock(flight,
                                        sc->timeout + apr_time_from_sec(1));
    }
    if (APR_STATUS_IS_TIMEUP(rv)) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, rv, r,
                      APLOGNO(10525) "mod_cardscan: gave up waiting for "
                                     "another request's call to the API");
        return send_error(r, CS_OUT_ERROR, HTTP_GATEWAY_TIME_OUT,
                          "upstream_timeout",
                          "the CardScan API did not answer in time");
    }
    if (rv != APR_SUCCESS) {
        /* a broken lock must not cost the user a token: go without */
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, rv, r,
                      APLOGNO(10531) "mod_cardscan: single-flight lock "
                                     "failed; calling the API without it");
        flight = NULL;
    }
    else if (cache_get(r, d->key, &ref, &e) &&
             (cs_entry_fresh(&e, apr_time_now(), d->min_ttl) ||
              (e.kind == CS_ENTRY_FAILURE && e.created >= wait_start))) {
        apr_global_mutex_unlock(flight);
        return send_entry(r, &e, CS_OUT_WAITED);
    }

    breaker =
        cs_g.metrics ? cs_breaker_slot(cs_g.metrics->breakers, endpoint) : NULL;
    if (breaker && cs_g.breaker_failures &&
        !cs_breaker_allow(breaker, apr_time_now(), &retry_after)) {
        if (flight)
            apr_global_mutex_unlock(flight);
        apr_table_setn(r->headers_out, "Retry-After",
                       apr_itoa(r->pool, retry_after));
        return send_error(r, CS_OUT_UNAVAILABLE, HTTP_SERVICE_UNAVAILABLE,
                          "upstream_unavailable",
                          "the CardScan API is unavailable; retry later");
    }

    fetch_token(r, d, endpoint, user_id, breaker, &e);
    if (e.kind == CS_ENTRY_TOKEN && e.expires)
        cache_put(r, d->key, &ref, &e, e.expires);
    else if (e.kind == CS_ENTRY_FAILURE)
        cache_put(r, d->key, &ref, &e, e.created + CS_FAILURE_TTL);
    if (flight)
        apr_global_mutex_unlock(flight);
    return send_entry(r, &e, CS_OUT_FETCHED);
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
