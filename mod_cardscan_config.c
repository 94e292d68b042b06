/*
 * mod_cardscan's configuration: the directives, the creation and merge of
 * the per-directory and per-server records, the server-wide settings, and
 * the start-up check of every section. The rules for values are lib/'s
 * (lib/cs_conf.c); this file only stores what they return.
 *
 * One convention for unset values: CS_UNSET for numbers, NULL for pointers.
 * A merge takes the added record's value when it is set (CS_MERGE), and
 * readers apply the defaults (cs_config_*), so that no field depends on
 * another's flag.
 */
#include "mod_cardscan_private.h"

#include "http_core.h"
#include "http_main.h"
#include "ap_expr.h"

#define CS_UNSET (-1)
#define CS_MERGE(field)                                                        \
    (d->field = (add->field != CS_UNSET) ? add->field : base->field)
#define CS_MERGE_PTR(field)                                                    \
    (d->field = (add->field != NULL) ? add->field : base->field)

#define CS_DEFAULT_MIN_TTL apr_time_from_sec(60)
#define CS_DEFAULT_TIMEOUT apr_time_from_sec(5)
#define CS_DEFAULT_BREAKER_FAILURES 5
#define CS_DEFAULT_BREAKER_PERIOD apr_time_from_sec(10)
#define CS_DEFAULT_STORE_TIMEOUT apr_time_from_msec(250)
/* CardScanProxy none: set, and no proxy (NULL would be unset) */
static const char cs_no_proxy[] = "none";

cs_global_conf cs_conf;

void cs_config_reset(void)
{
    memset(&cs_conf, 0, sizeof(cs_conf));
    cs_conf.breaker_failures = CS_DEFAULT_BREAKER_FAILURES;
    cs_conf.breaker_period = CS_DEFAULT_BREAKER_PERIOD;
    cs_conf.store_timeout = CS_DEFAULT_STORE_TIMEOUT;
}

void *cs_config_create_dir(apr_pool_t *p, char *dir)
{
    cs_dir_conf *d = apr_pcalloc(p, sizeof(*d));
    (void)dir;
    d->min_ttl = CS_UNSET;
    d->refresh_pct = CS_UNSET;
    d->pin_mode = CS_UNSET;
    d->pin_ttl = CS_UNSET;
    return d;
}

void *cs_config_merge_dir(apr_pool_t *p, void *basev, void *addv)
{
    const cs_dir_conf *base = basev, *add = addv;
    cs_dir_conf *d = apr_pcalloc(p, sizeof(*d));

    CS_MERGE_PTR(key);
    CS_MERGE_PTR(endpoint);
    CS_MERGE_PTR(user_id);
    CS_MERGE(min_ttl);
    CS_MERGE(refresh_pct);
    CS_MERGE_PTR(origins);
    CS_MERGE_PTR(backend_header);
    CS_MERGE(pin_mode);
    CS_MERGE(pin_ttl);
    return d;
}

void *cs_config_create_srv(apr_pool_t *p, server_rec *s)
{
    cs_srv_conf *c = apr_pcalloc(p, sizeof(*c));
    (void)s;
    c->timeout = CS_UNSET;
    c->connect_timeout = CS_UNSET;
    return c;
}

void *cs_config_merge_srv(apr_pool_t *p, void *basev, void *addv)
{
    const cs_srv_conf *base = basev, *add = addv;
    cs_srv_conf *d = apr_pcalloc(p, sizeof(*d));

    CS_MERGE(timeout);
    CS_MERGE(connect_timeout);
    CS_MERGE_PTR(ca_file);
    CS_MERGE_PTR(proxy);
    /* the credentials belong to the proxy they were given with */
    d->proxy_auth = add->proxy ? add->proxy_auth : base->proxy_auth;
    return d;
}

const cs_dir_conf *cs_config_dir(const request_rec *r)
{
    return ap_get_module_config(r->per_dir_config, &cardscan_module);
}

const cs_srv_conf *cs_config_srv(const server_rec *s)
{
    return ap_get_module_config(s->module_config, &cardscan_module);
}

apr_interval_time_t cs_config_min_ttl(const cs_dir_conf *d)
{
    return d->min_ttl != CS_UNSET ? d->min_ttl : CS_DEFAULT_MIN_TTL;
}

int cs_config_refresh_pct(const cs_dir_conf *d)
{
    return d->refresh_pct != CS_UNSET ? d->refresh_pct : CS_REFRESH_PCT_DEFAULT;
}

apr_interval_time_t cs_config_timeout(const cs_srv_conf *sc)
{
    return sc->timeout != CS_UNSET ? sc->timeout : CS_DEFAULT_TIMEOUT;
}

apr_interval_time_t cs_config_connect_timeout(const cs_srv_conf *sc)
{
    apr_interval_time_t t = cs_config_timeout(sc);
    if (sc->connect_timeout != CS_UNSET)
        return sc->connect_timeout;
    return t < CS_CONNECT_TIMEOUT_DEFAULT ? t : CS_CONNECT_TIMEOUT_DEFAULT;
}

const char *cs_config_proxy(const cs_srv_conf *sc)
{
    return sc->proxy == cs_no_proxy ? NULL : sc->proxy;
}

cs_pin_mode_e cs_config_pin_mode(const cs_dir_conf *d)
{
    return d->pin_mode != CS_UNSET ? (cs_pin_mode_e)d->pin_mode
                                   : CS_PIN_MODE_DEFAULT;
}

apr_interval_time_t cs_config_pin_ttl(const cs_dir_conf *d)
{
    return d->pin_ttl != CS_UNSET ? d->pin_ttl : CS_PIN_TTL_DEFAULT;
}

const char *cs_config_endpoint(const cs_dir_conf *d)
{
    return d->endpoint ? d->endpoint : cs_endpoint_default(d->key);
}

/* ------------------------------------------------------------- directives */

static cs_srv_conf *srv_of(cmd_parms *cmd)
{
    return ap_get_module_config(cmd->server->module_config, &cardscan_module);
}

/* a setting's warning (a secret file others can read, ...), logged once */
static void warn(cmd_parms *cmd, const char *directive, const char *warning)
{
    if (warning)
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, cmd->server,
                     APLOGNO(10501) "%s: %s", directive, warning);
}

static const char *set_api_key(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *warning = NULL, *err = NULL;

    if (cs_key_load(cmd->pool, arg, &d->key, &warning, &err) != APR_SUCCESS)
        return apr_psprintf(cmd->pool, "CardScanAPIKey: %s", err);
    warn(cmd, "CardScanAPIKey", warning);
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

static const char *set_timeout(cmd_parms *cmd, void *mconfig, const char *total,
                               const char *connect)
{
    cs_srv_conf *c = srv_of(cmd);
    const char *err = NULL;
    (void)mconfig;

    if (cs_conf_timeout(cmd->pool, total, connect, &c->timeout,
                        &c->connect_timeout, &err) != APR_SUCCESS)
        return err;
    return NULL;
}

static const char *set_ca_file(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_srv_conf *c = srv_of(cmd);
    const char *path = ap_server_root_relative(cmd->pool, arg);
    apr_finfo_t fi;
    (void)mconfig;

    if (!path ||
        apr_stat(&fi, path, APR_FINFO_TYPE, cmd->pool) != APR_SUCCESS ||
        fi.filetype != APR_REG)
        return apr_psprintf(cmd->pool,
                            "CardScanCAFile: '%s' is not a readable file", arg);
    c->ca_file = path;
    return NULL;
}

static const char *set_proxy(cmd_parms *cmd, void *mconfig, const char *url,
                             const char *auth)
{
    cs_srv_conf *c = srv_of(cmd);
    const char *proxy = NULL, *proxy_auth = NULL, *warning = NULL, *err = NULL;
    (void)mconfig;

    if (cs_conf_proxy(cmd->pool, url, auth, &proxy, &proxy_auth, &warning,
                      &err) != APR_SUCCESS)
        return err;
    warn(cmd, "CardScanProxy", warning);
    c->proxy = proxy ? proxy : cs_no_proxy;
    c->proxy_auth = proxy_auth;
    return NULL;
}

static const char *set_cache(cmd_parms *cmd, void *mconfig, const char *arg)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    (void)mconfig;
    if (err)
        return err;
    cs_conf.cache_spec = apr_pstrdup(cmd->pool, arg);
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
    if (cs_store_auth_load(cmd->pool, a1, a2, &cs_conf.store_user,
                           &cs_conf.store_password, &warning,
                           &err) != APR_SUCCESS)
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
    if (cs_conf_seconds(cmd->pool, "CardScanCacheTimeout", arg, 10,
                        &cs_conf.store_timeout, &err) != APR_SUCCESS)
        return err;
    return NULL;
}

static const char *set_cache_secret(cmd_parms *cmd, void *mconfig,
                                    const char *arg)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    const char *warning = NULL;
    (void)mconfig;

    if (err)
        return err;
    if (cs_conf_cache_secret(cmd->temp_pool, arg, cs_conf.seal_key, &warning,
                             &err) != APR_SUCCESS)
        return apr_pstrdup(cmd->pool, err);
    warn(cmd, "CardScanCacheSecret", warning);
    cs_conf.seal_secret_set = 1;
    return NULL;
}

static const char *set_breaker(cmd_parms *cmd, void *mconfig,
                               const char *failures, const char *period)
{
    const char *err = ap_check_cmd_context(cmd, GLOBAL_ONLY);
    (void)mconfig;

    if (err)
        return err;
    if (cs_conf_breaker(cmd->pool, failures, period, &cs_conf.breaker_failures,
                        &cs_conf.breaker_period, &err) != APR_SUCCESS)
        return err;
    return NULL;
}

static const char *set_min_ttl(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    if (cs_conf_min_ttl(cmd->pool, arg, &d->min_ttl, &err) != APR_SUCCESS)
        return err;
    return NULL;
}

static const char *set_refresh(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    if (cs_conf_refresh(cmd->pool, arg, &d->refresh_pct, &err) != APR_SUCCESS)
        return err;
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
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    if (cs_conf_backend_header(cmd->pool, arg, &err) != APR_SUCCESS)
        return err;
    d->backend_header = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_pinning(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    cs_pin_mode_e mode;
    const char *err = NULL;

    if (cs_pin_mode_parse(cmd->pool, arg, &mode, &err) != APR_SUCCESS)
        return apr_pstrcat(cmd->pool, "CardScanIdentityPinning: ", err, NULL);
    d->pin_mode = (int)mode;
    return NULL;
}

static const char *set_pin_ttl(cmd_parms *cmd, void *mconfig, const char *arg)
{
    cs_dir_conf *d = mconfig;
    const char *err = NULL;

    if (cs_pin_ttl_parse(cmd->pool, arg, &d->pin_ttl, &err) != APR_SUCCESS)
        return apr_pstrcat(cmd->pool, "CardScanIdentityPinTTL: ", err, NULL);
    return NULL;
}

const command_rec cs_config_cmds[] = {
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
    AP_INIT_TAKE1("CardScanIdentityPinning", set_pinning, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "alarm|enforce|off: what a user's new token with another "
                  "IdentityId than before does (default alarm)"),
    AP_INIT_TAKE1("CardScanIdentityPinTTL", set_pin_ttl, NULL,
                  RSRC_CONF | ACCESS_CONF,
                  "seconds a user's IdentityId is remembered (default 86400)"),
    {NULL}};

/* ------------------------------------------------------- start-up checks */

/* A live key against the sandbox (or the reverse) is refused at start-up,
 * wherever the pair meets: server, vhost or section. */
static int check_key_endpoint(apr_pool_t *p, server_rec *s,
                              const cs_dir_conf *d, const char *section)
{
    const char *err = NULL;
    if (!d->key)
        return OK;
    if (d->key->mode == CS_KEY_TEST)
        cs_conf.sandbox = 1; /* noticed once, in post_config */
    if (cs_endpoint_check_key(p, cs_config_endpoint(d), d->key, &err) !=
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
            d ? cs_config_merge_dir(p, (void *)base, d) : base;
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

int cs_config_check(apr_pool_t *ptemp, server_rec *main_s)
{
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
    return OK;
}
