/*
 * mod_cardscan: the customer-side /cardscan-session endpoint of CardScan.ai
 * as an Apache httpd module. Apache's own authentication decides who the
 * user is; the cardscan-session handler turns that identity into a CardScan
 * session token, cached per user in a store shared by every child process
 * (and, with Redis or memcached, by a fleet).
 *
 * This file is the module record, its hooks and their order, start-up, and
 * the metrics handler. The rest of the Apache shell is one concern per
 * file (mod_cardscan_private.h lists them); everything that can be tested
 * without httpd is in lib/.
 */
#define CS_MODULE_RECORD
#include "mod_cardscan_private.h"

#include "http_core.h"
#include "http_main.h"
#include "http_protocol.h"
#include "http_request.h"
#include "mod_status.h"

#include "apr_shm.h"

/* The shared counters are found again across graceful restarts by this
 * key; the version and layout are part of it, so that a newer module loaded
 * by a graceful reload makes its own instead of misreading the old. */
#define CS_SHM_KEY "mod_cardscan metrics " CS_VERSION "/3"

cs_process cs_proc;

/* ---------------------------------------------------------------- start-up */

static int cs_pre_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp)
{
    const char *err = NULL;
    (void)ptemp;

    cs_config_reset();
    cs_shmcb_pre_config(pconf);
    /* once, in the parent, before any thread exists */
    if (cs_upstream_global_init(&err) != APR_SUCCESS) {
        ap_log_perror(APLOG_MARK, APLOG_CRIT, 0, plog,
                      APLOGNO(10503) "mod_cardscan: libcurl: %s", err);
        return !OK;
    }
    return OK;
}

static int cs_check_config(apr_pool_t *pconf, apr_pool_t *plog,
                           apr_pool_t *ptemp, server_rec *s)
{
    (void)pconf;
    (void)plog;
    if (cs_config_check(ptemp, s) != OK || cs_store_check(ptemp, s) != OK)
        return !OK;
    return OK;
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
        cs_proc.metrics = apr_shm_baseaddr_get(data);
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
    cs_proc.metrics = apr_shm_baseaddr_get(shm);
    return APR_SUCCESS;
}

static int cs_post_config(apr_pool_t *pconf, apr_pool_t *plog,
                          apr_pool_t *ptemp, server_rec *s)
{
    (void)plog;

    memset(&cs_proc, 0, sizeof(cs_proc));
    /* the first pass only checks the configuration */
    if (ap_state_query(AP_SQ_MAIN_STATE) == AP_SQ_MS_CREATE_PRE_CONFIG)
        return OK;
    if (cs_conf.sandbox)
        ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s,
                     APLOGNO(10570) "mod_cardscan: a test API key is "
                                    "configured: its tokens are for the "
                                    "CardScan sandbox, which is not HIPAA "
                                    "compliant and must not see PHI (real "
                                    "patients' cards); use a live key for "
                                    "them");
    if (attach_metrics(s) != APR_SUCCESS ||
        cs_store_setup(pconf, ptemp, s) != APR_SUCCESS)
        return HTTP_INTERNAL_SERVER_ERROR;
    return OK;
}

static void cs_child_init(apr_pool_t *p, server_rec *s)
{
    const char *err = NULL;

    cs_store_child_init(p, s);
    /* libcurl handles are per process: none survives a fork */
    if (cs_upstream_create(p, &cs_proc.upstream, &err) != APR_SUCCESS)
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s,
                     APLOGNO(10510) "mod_cardscan: %s", err);
    /* after the HTTP client: the refresh threads are stopped in a
     * pre-cleanup of p, before the client goes */
    if (cs_store_configured() && cs_proc.upstream)
        cs_refresh_child_init(p, s);
}

/* ----------------------------------------------------------------- metrics */

static int cs_metrics_handler(request_rec *r)
{
    const char *body;

    if (!r->handler || strcmp(r->handler, CS_METRICS_HANDLER) != 0)
        return DECLINED;
    r->allowed = (AP_METHOD_BIT << M_GET);
    if (r->method_number != M_GET)
        return HTTP_METHOD_NOT_ALLOWED;
    if (!cs_proc.metrics)
        return HTTP_SERVICE_UNAVAILABLE;
    body = cs_metrics_render(r->pool, cs_proc.metrics, apr_time_now());
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

    if (!cs_proc.metrics)
        return OK;
    text = cs_metrics_render(r->pool, cs_proc.metrics, apr_time_now());
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

/* ------------------------------------------------------------------- hooks */

static void cs_register_hooks(apr_pool_t *p)
{
    static const char *const authz_core[] = {"mod_authz_core.c", NULL};
    (void)p;
    /* Start-up: pre_config resets the server-wide settings (the module's
     * statics survive nothing: it is reloaded on every restart) and sets
     * libcurl up once, before any thread; check_config refuses what cannot
     * work (a live key against the sandbox, an unknown cache) before the
     * server starts; post_config makes the shared state; child_init the
     * per-process state (HTTP client, refresh threads). */
    ap_hook_pre_config(cs_pre_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_check_config(cs_check_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_post_config(cs_post_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_child_init(cs_child_init, NULL, NULL, APR_HOOK_MIDDLE);

    /* CORS: a genuine preflight from a listed origin to a token location
     * skips authentication and nothing else. check_access_ex runs its hooks
     * until one answers: ours comes after mod_authz_core's, which refuses
     * where the location refuses everyone (Require all denied, ip, expr)
     * and declines where a user is needed. Per URI, not per configuration:
     * the answer depends on the method and headers, and an internal
     * redirect (an ErrorDocument in the same location) must run the access
     * checks again rather than inherit the preflight's. The preflight is
     * answered by the first handler of all, before mod_proxy or a CGI
     * could run for it. */
    ap_hook_check_access_ex(cs_cors_access, authz_core, NULL, APR_HOOK_LAST,
                            AP_AUTH_INTERNAL_PER_URI);
    ap_hook_handler(cs_cors_preflight, NULL, NULL, APR_HOOK_REALLY_FIRST);

    /* CardScanBackendUser: the client's copy of the user header is dropped
     * in fixups, first, before any handler passes headers on to a backend;
     * the filter that swaps in the token reply is added to every request
     * of such a location. */
    ap_hook_fixups(cs_backend_fixups, NULL, NULL, APR_HOOK_FIRST);
    ap_hook_insert_filter(cs_backend_insert_filter, NULL, NULL,
                          APR_HOOK_MIDDLE);
    cs_backend_register();

    /* The handlers answer only for their own SetHandler names. */
    ap_hook_handler(cs_request_handler, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_handler(cs_metrics_handler, NULL, NULL, APR_HOOK_MIDDLE);
    APR_OPTIONAL_HOOK(ap, status_hook, cs_status_hook, NULL, NULL,
                      APR_HOOK_MIDDLE);
}

AP_DECLARE_MODULE(cardscan) = {STANDARD20_MODULE_STUFF, cs_config_create_dir,
                               cs_config_merge_dir,     cs_config_create_srv,
                               cs_config_merge_srv,     cs_config_cmds,
                               cs_register_hooks,
#if defined(AP_MODULE_FLAG_ALWAYS_MERGE)
                               AP_MODULE_FLAG_NONE
#endif
};
