/*
 * mod_cardscan's Apache shell: what its files share. Every mod_cardscan*.c
 * includes this header and nothing of the others' state: each file owns its
 * own (static) state and offers the functions below. lib/ is the core, free
 * of httpd; the shell only carries out its decisions.
 *
 *   mod_cardscan.c          module record, hooks and their order, start-up,
 *                           the metrics handler
 *   mod_cardscan_config.c   directives, create/merge, start-up checks of
 *                           sections, the server-wide settings
 *   mod_cardscan_shmcb.c    the socache (shmcb) store: shards, locks and
 *                           restart carry-over
 *   mod_cardscan_store.c    the token store as the serving path uses it:
 *                           back-off, sealed entries, the user's lock, and
 *                           per-process copies of hits
 *   mod_cardscan_call.c     one user's call to the API: breaker, retry,
 *                           classification, single flight's waiting
 *   mod_cardscan_refresh.c  the refresh-ahead threads of a child
 *   mod_cardscan_request.c  the cardscan-session handler and its replies
 *   mod_cardscan_cors.c     CORS: the preflight's access hook and handler
 *   mod_cardscan_backend.c  CardScanBackendUser: the response filter
 */
#ifndef MOD_CARDSCAN_PRIVATE_H
#define MOD_CARDSCAN_PRIVATE_H

#include "httpd.h"
#include "http_config.h"
#include "http_log.h"
#include "ap_expr.h"
#include "util_filter.h"

#include "apr_strings.h"

#include "lib/cardscan.h"
#include "lib/cs_store.h"

/* every line the shell logs is subject to LogLevel cardscan:...
 * (mod_cardscan.c gets it from AP_DECLARE_MODULE) */
#ifndef CS_MODULE_RECORD
APLOG_USE_MODULE(cardscan);
#endif
extern module AP_MODULE_DECLARE_DATA cardscan_module;

#define CS_HANDLER "cardscan-session"
#define CS_METRICS_HANDLER "cardscan-metrics"
#define CS_ENTRY_MAX CS_STORE_VALUE_MAX /* a sealed entry, at most */

/* ---------------------------------------------------------- configuration */

/* Per-directory settings (and per-server defaults, via lookup_defaults).
 * Unset values are CS_UNSET (ints) or NULL (pointers); readers use the
 * accessors below, which apply the defaults. */
typedef struct {
    cs_key_t *key;
    const char *endpoint;    /* normalised; NULL: from the key */
    ap_expr_info_t *user_id; /* NULL: REMOTE_USER */
    apr_interval_time_t min_ttl;
    int refresh_pct;             /* CardScanRefreshAhead: 0 off */
    apr_array_header_t *origins; /* CardScanAllowOrigin, normalised */
    const char *backend_header;  /* CardScanBackendUser */
    int pin_mode;                /* CardScanIdentityPinning (cs_pin_mode_e) */
    apr_interval_time_t pin_ttl; /* CardScanIdentityPinTTL */
} cs_dir_conf;

/* Per-server settings of the upstream exchange. */
typedef struct {
    apr_interval_time_t timeout, connect_timeout;
    const char *ca_file;
    const char *proxy;      /* "none" (CS_NO_PROXY): no proxy */
    const char *proxy_auth; /* user:password, read from a file */
} cs_srv_conf;

/* Settings of the whole server (directives allowed in the main server
 * only), reset before every configuration read. */
typedef struct {
    const char *cache_spec;            /* CardScanCache as given, NULL:
                                          default */
    const char *store_user;            /* CardScanCacheAuth: Redis ACL user */
    const char *store_password;        /* CardScanCacheAuth: never log */
    apr_interval_time_t store_timeout; /* CardScanCacheTimeout */
    apr_uint32_t breaker_failures;     /* CardScanCircuitBreaker */
    apr_interval_time_t breaker_period;
    int seal_secret_set; /* CardScanCacheSecret */
    unsigned char seal_key[CS_SECRET_LEN];
    int sandbox; /* a test key is configured somewhere */
} cs_global_conf;

extern cs_global_conf cs_conf;
extern const command_rec cs_config_cmds[];

void *cs_config_create_dir(apr_pool_t *p, char *dir);
void *cs_config_merge_dir(apr_pool_t *p, void *basev, void *addv);
void *cs_config_create_srv(apr_pool_t *p, server_rec *s);
void *cs_config_merge_srv(apr_pool_t *p, void *basev, void *addv);
/* resets cs_conf to its defaults (pre_config) */
void cs_config_reset(void);
/* the directory configuration of a request */
const cs_dir_conf *cs_config_dir(const request_rec *r);
const cs_srv_conf *cs_config_srv(const server_rec *s);
/* the settings with their defaults applied */
const char *cs_config_endpoint(const cs_dir_conf *d); /* or the key's */
apr_interval_time_t cs_config_min_ttl(const cs_dir_conf *d);
int cs_config_refresh_pct(const cs_dir_conf *d);
apr_interval_time_t cs_config_timeout(const cs_srv_conf *sc);
apr_interval_time_t cs_config_connect_timeout(const cs_srv_conf *sc);
const char *cs_config_proxy(const cs_srv_conf *sc); /* NULL: none */
cs_pin_mode_e cs_config_pin_mode(const cs_dir_conf *d);
apr_interval_time_t cs_config_pin_ttl(const cs_dir_conf *d);
/* refuses a live key against the sandbox (or the reverse) in any server
 * or section: !OK with the reason logged */
int cs_config_check(apr_pool_t *ptemp, server_rec *main_s);

/* -------------------------------------------------------- process state */

/* What every file may read: set up in post_config (metrics) and
 * child_init (the rest) by mod_cardscan.c. */
typedef struct {
    cs_metrics_t *metrics;   /* shared memory, kept across restarts */
    cs_upstream_t *upstream; /* per child */
} cs_process;

extern cs_process cs_proc;

/* --------------------------------------------------------------- a call */

/* One user's place in the caches, computed once per request: the hex id
 * (bound into sealed entries) and its bytes, which pick the store ids, the
 * shard and the per-process slot. */
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

void cs_call_init(cs_call *c, request_rec *r, server_rec *s, apr_pool_t *p,
                  const cs_dir_conf *d, const char *user_id);
/* logs for a call: against the request when there is one */
void cs_call_log(const cs_call *c, int level, apr_status_t rv, const char *fmt,
                 ...) __attribute__((format(printf, 4, 5)));
/* Calls the API for one user: e is the token or the failure clients are
 * told about. */
void cs_call_fetch(cs_call *c, cs_entry_t *e);
/* Whether the breaker refuses this call; *retry_after is then set. */
int cs_call_breaker_refuses(const cs_call *c, int *retry_after);

/* The outcome of a request with no token to serve, from cs_call_make. */
typedef enum {
    CS_MADE_FETCHED,    /* e: what this request's call produced */
    CS_MADE_WAITED,     /* e: the token another request's call stored */
    CS_MADE_FAILED,     /* e: the failure another request's call stored */
    CS_MADE_UNAVAILABLE /* the breaker refused the call: retry_after */
} cs_made_e;

/* Makes the user's one call, or waits for the request that is making it. */
cs_made_e cs_call_make(cs_call *c, cs_entry_t *e, int *retry_after);

/* ---------------------------------------------------------------- store */

/* httpd's socache, when CardScanCache names one: the store over its
 * shards (mod_cardscan_shmcb.c). */
void cs_shmcb_pre_config(apr_pool_t *pconf);
int cs_shmcb_check(apr_pool_t *ptemp, server_rec *s, const char *name);
apr_status_t cs_shmcb_setup(apr_pool_t *pconf, apr_pool_t *ptemp, server_rec *s,
                            const char *name, const char *args,
                            cs_store_t **store);
void cs_shmcb_child_init(apr_pool_t *p, server_rec *s);
/* frees what a shmcb of the last generation carried, when no shmcb takes
 * it (the cache was switched to another store or to none) */
void cs_shmcb_discard_carried(server_rec *s);

/* The store as configured (mod_cardscan_store.c). */
int cs_store_check(apr_pool_t *ptemp, server_rec *main_s);
apr_status_t cs_store_setup(apr_pool_t *pconf, apr_pool_t *ptemp,
                            server_rec *s);
void cs_store_child_init(apr_pool_t *p, server_rec *s);
/* whether a store is configured at all */
int cs_store_configured(void);

typedef enum { CS_LOCK_NONE, CS_LOCK_HELD, CS_LOCK_BUSY } cs_lock_e;

/* Reads (1) or misses (0) one of the user's entries. */
int cs_store_read(cs_call *c, cs_id_kind_e kind, cs_entry_t *e);
/* Stores one of the user's entries until expiry. */
void cs_store_write(cs_call *c, cs_id_kind_e kind, const cs_entry_t *e,
                    apr_time_t expiry);
/* The user's token: this process's copy of a hit, else the store's. */
int cs_store_token(cs_call *c, apr_time_t now, cs_entry_t *e);
/* The user's call lock, the single flight of every process (and server)
 * that shares the store. */
cs_lock_e cs_store_lock(cs_call *c);
/* Releases it; with `hold`, keeps it until then instead. */
void cs_store_unlock(cs_call *c, apr_time_t hold);

/* -------------------------------------------------------------- refresh */

void cs_refresh_child_init(apr_pool_t *p, server_rec *s);
/* Starts a refresh of the user's token in the background, unless this
 * process started one a moment ago. Returns 1 when started. */
int cs_refresh_later(const cs_call *c, const cs_entry_t *tok);

/* -------------------------------------------------------------- request */

/* the per-request state of the module, in r->request_config */
typedef struct {
    ap_filter_t *reply; /* CardScanBackendUser: where the swapped reply goes
                           (NULL: the request's output filters) */
} cs_req_state;

cs_req_state *cs_request_state(request_rec *r, int create);
int cs_request_handler(request_rec *r);
/* The error reply of a request that gets no token. */
int cs_request_error(request_rec *r, cs_outcome_e outcome, int status,
                     const char *code, const char *message);
/* Whether the location cannot serve tokens (then the error is sent). */
int cs_request_unconfigured(request_rec *r, const cs_dir_conf *d);
/* The reply for a user id from CardScanUserID or a backend. */
int cs_request_serve(request_rec *r, const cs_dir_conf *d, const char *user_id);

/* ----------------------------------------------------------------- CORS */

int cs_cors_access(request_rec *r);
int cs_cors_preflight(request_rec *r);
/* Access-Control-Allow-* for a listed origin; whether it is listed */
int cs_cors_allow(request_rec *r, const cs_dir_conf *d);

/* -------------------------------------------------------------- backend */

void cs_backend_register(void);
int cs_backend_fixups(request_rec *r);
void cs_backend_insert_filter(request_rec *r);

#endif /* MOD_CARDSCAN_PRIVATE_H */
