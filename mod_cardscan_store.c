/*
 * The token store as the serving path uses it: one user's sealed entries
 * (token, failure, pin), the user's call lock, per-process copies of hits,
 * and the back-off that keeps requests off a store that fails. Which store
 * (shmcb, Redis, memcached) is chosen here at start-up; after that the
 * serving path never knows.
 */
#include "mod_cardscan_private.h"

#include "http_core.h"
#include "http_main.h"

#include "apr_thread_rwlock.h"

#include <errno.h>
#include <signal.h>
#include <unistd.h>

#define CS_DEFAULT_SHMCB_SIZE (48 * 1024 * 1024)
#define CS_LOCAL_SLOTS 64 /* per-process copies of hits */
#define CS_LOCAL_TTL apr_time_from_sec(1)
#define CS_WARN_INTERVAL apr_time_from_sec(60)

/* A process's copy of an entry it just read from the shared store. */
typedef struct {
    char id[CS_CACHE_ID_LEN + 1];
    apr_time_t until; /* the copy is used until then */
    cs_entry_t e;     /* e.body points into buf */
    char buf[CS_ENTRY_MAX];
} cs_local_slot;

static struct {
    cs_store_t *store;    /* NULL: no cache */
    int auth_warned;      /* the store refused our credentials, logged */
    char host_tag[64];    /* this machine, in lock values */
    cs_local_slot *local; /* per child: CS_LOCAL_SLOTS copies of hits */
    apr_thread_rwlock_t *local_lock;
    apr_time_t cache_warned; /* last cache-outage warning of this process */
    apr_time_t entry_warned; /* last unreadable-entry warning */
} st;

/* Warnings that could repeat on every request are logged at most once per
 * CS_WARN_INTERVAL per process (at debug in between). */
static int warn_level(apr_time_t *last)
{
    apr_time_t now = apr_time_now();
    if (now - *last < CS_WARN_INTERVAL)
        return APLOG_DEBUG;
    *last = now;
    return APLOG_WARNING;
}

/* Refused credentials are named once per server and configuration
 * generation, whichever process meets them first: the fix is in the
 * configuration, and repeating it would flood the log. */
static int auth_first_report(void)
{
    apr_uint32_t gen = (apr_uint32_t)ap_state_query(AP_SQ_CONFIG_GEN) + 1;
    apr_uint32_t seen;

    if (!cs_proc.metrics) {
        int first = !st.auth_warned;
        st.auth_warned = 1;
        return first;
    }
    seen =
        __atomic_load_n(&cs_proc.metrics->store_auth_logged, __ATOMIC_RELAXED);
    return seen != gen && __atomic_compare_exchange_n(
                              &cs_proc.metrics->store_auth_logged, &seen, gen,
                              0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* A store that failed or passed its deadline is left alone for a while by
 * every child (lib's back-off, in shared memory): requests call the API
 * meanwhile, and none waits on the store again until the pause is over. */
static void store_failed(const cs_call *c, apr_status_t rv, const char *what,
                         const char *err)
{
    /* computed once: ap_log_rerror is a macro that evaluates it twice */
    int level = warn_level(&st.cache_warned);
    apr_interval_time_t pause = 0;
    cs_metrics_t *m = cs_proc.metrics;

    if (m) {
        pause = cs_backoff_failed(&m->store_backoff, apr_time_now());
        __atomic_add_fetch(&m->store_errors, 1, __ATOMIC_RELAXED);
    }
    if (APR_STATUS_IS_EACCES(rv))
        level = auth_first_report() ? APLOG_ERR : APLOG_DEBUG;
    cs_call_log(c, level, rv,
                APLOGNO(10527) "mod_cardscan: the token cache failed to %s "
                               "(%s%s%s); calling the CardScan API directly "
                               "for the next %" APR_TIME_T_FMT " s",
                what, st.store->ops->name, err ? ": " : "", err ? err : "",
                apr_time_sec(pause));
}

static void store_ok(void)
{
    if (cs_proc.metrics)
        cs_backoff_ok(&cs_proc.metrics->store_backoff);
}

static int store_usable(void)
{
    return st.store &&
           (!cs_proc.metrics ||
            cs_backoff_usable(&cs_proc.metrics->store_backoff, apr_time_now()));
}

static apr_time_t store_deadline(void)
{
    return apr_time_now() + cs_conf.store_timeout;
}

int cs_store_configured(void)
{
    return st.store != NULL;
}

/* The key entries are sealed with: per API key, or CardScanCacheSecret. */
static const cs_key_t *seal_key(const cs_key_t *key, cs_key_t *buf)
{
    if (!cs_conf.seal_secret_set)
        return key;
    *buf = *key;
    memcpy(buf->seal_key, cs_conf.seal_key, CS_SECRET_LEN);
    return buf;
}

/* The sealed id of an entry kind: the hex id and the kind's tag, so that a
 * token can never be opened as a failure or the reverse. */
static const char *entry_aad(const cs_call *c, cs_id_kind_e kind)
{
    return kind == CS_ID_TOKEN ? c->ref.id
                               : apr_psprintf(c->p, "%s/%c", c->ref.id, kind);
}

int cs_store_read(cs_call *c, cs_id_kind_e kind, cs_entry_t *e)
{
    unsigned char id[CS_STORE_ID_LEN], buf[CS_ENTRY_MAX];
    apr_size_t len = sizeof(buf);
    const char *err = NULL;
    cs_key_t tmp;
    apr_status_t rv;

    if (!store_usable())
        return 0;
    cs_store_id(c->ref.bytes, kind, id);
    rv = st.store->ops->get(st.store, id, sizeof(id), buf, &len,
                            store_deadline(), c->p, &err);
    if (rv != APR_SUCCESS) {
        if (!APR_STATUS_IS_NOTFOUND(rv) && rv != APR_ENOLOCK)
            store_failed(c, rv, "read", err);
        return 0;
    }
    rv = cs_entry_open(c->p, seal_key(c->d->key, &tmp), entry_aad(c, kind), buf,
                       len, e, &err);
    if (rv == APR_EMISMATCH) {
        /* no entry at all: a cache server that answers garbage is a failing
         * one, left alone for a while like any other */
        store_failed(c, rv, "read", err);
        return 0;
    }
    if (rv != APR_SUCCESS) {
        /* servers with different CardScanCacheSecret would keep replacing
         * each other's entries: not a warning per request */
        int level = warn_level(&st.entry_warned);
        cs_call_log(c, level, 0,
                    APLOGNO(10511) "mod_cardscan: ignoring a cache entry: %s",
                    err);
        return 0;
    }
    return (kind == CS_ID_TOKEN) == (e->kind == CS_ENTRY_TOKEN);
}

void cs_store_write(cs_call *c, cs_id_kind_e kind, const cs_entry_t *e,
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
        cs_call_log(c, APLOG_ERR, 0, APLOGNO(10512) "mod_cardscan: %s", err);
        return;
    }
    if (len > CS_ENTRY_MAX) {
        cs_call_log(c, APLOG_WARNING, 0,
                    APLOGNO(10513) "mod_cardscan: a token reply of "
                                   "%" APR_SIZE_T_FMT
                                   " bytes is too large to cache",
                    len);
        return;
    }
    cs_store_id(c->ref.bytes, kind, id);
    rv = st.store->ops->put(st.store, id, sizeof(id), data, len, expiry,
                            store_deadline(), c->p, &err);
    if (rv == APR_SUCCESS)
        store_ok();
    else if (APR_STATUS_IS_ENOSPC(rv)) /* a full shmcb: just not cached */
        cs_call_log(c, APLOG_DEBUG, rv,
                    APLOGNO(10514) "mod_cardscan: the token cache has no room "
                                   "for this entry");
    else if (rv != APR_ENOLOCK)
        store_failed(c, rv, "store", err);
}

/* ------------------------------------------------------ the user's lock */

/* It lives no longer than one call could, so that a holder that died costs
 * at most that. */
static apr_time_t lock_expiry(const cs_call *c)
{
    return apr_time_now() + cs_config_timeout(c->sc) + apr_time_from_sec(1);
}

static apr_status_t lock_add(cs_call *c, const unsigned char *id,
                             apr_time_t expiry, const char **err)
{
    return st.store->ops->add(st.store, id, CS_STORE_ID_LEN,
                              (const unsigned char *)c->owner, strlen(c->owner),
                              expiry, store_deadline(), c->p, err);
}

/* A busy lock whose holder was a process of this host that is gone (killed
 * while it called, say) is released, compared with the very value read, so
 * that the caller can take it at once instead of waiting for it to expire.
 * A holder on another host, or one whose value does not parse, is left
 * alone: its lock lasts at most its life (lock_expiry). 1 when released. */
static int lock_holder_gone(cs_call *c, const unsigned char *id)
{
    unsigned char val[sizeof(c->owner)];
    char host[sizeof(st.host_tag)];
    apr_size_t len = sizeof(val);
    const char *err = NULL;
    long pid;

    if (st.store->ops->get(st.store, id, CS_STORE_ID_LEN, val, &len,
                           store_deadline(), c->p, &err) != APR_SUCCESS ||
        cs_lock_holder_parse((const char *)val, len, host, sizeof(host),
                             &pid) != APR_SUCCESS ||
        strcmp(host, st.host_tag) != 0 || (pid_t)pid == getpid() ||
        kill((pid_t)pid, 0) == 0 || errno != ESRCH)
        return 0;
    if (st.store->ops->release(st.store, id, CS_STORE_ID_LEN, val, len,
                               store_deadline(), c->p, &err) != APR_SUCCESS)
        return 0;
    cs_call_log(c, APLOG_DEBUG, 0,
                APLOGNO(10535) "mod_cardscan: the user's call lock was held "
                               "by process %ld, which is gone: taken over",
                pid);
    return 1;
}

cs_lock_e cs_store_lock(cs_call *c)
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
        apr_snprintf(
            c->owner, sizeof(c->owner),
            "%s/%" APR_PID_T_FMT "/%u/%" APR_TIME_T_FMT, st.host_tag, getpid(),
            __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED), apr_time_now());
    cs_store_id(c->ref.bytes, CS_ID_LOCK, id);
    rv = lock_add(c, id, lock_expiry(c), &err);
    /* here, at the first try, and at each try of a request waiting for
     * the holder's call */
    if (APR_STATUS_IS_EEXIST(rv) && lock_holder_gone(c, id))
        rv = lock_add(c, id, lock_expiry(c), &err);
    if (rv == APR_SUCCESS)
        return CS_LOCK_HELD;
    if (APR_STATUS_IS_EEXIST(rv))
        return CS_LOCK_BUSY;
    if (rv != APR_ENOLOCK)
        store_failed(c, rv, "lock", err);
    return CS_LOCK_NONE;
}

/* A held lock is released by its owner only (compare and remove). With
 * `hold`, it is then taken again until `hold`, only if nobody else has
 * taken it meanwhile: never over another process's lock. */
void cs_store_unlock(cs_call *c, apr_time_t hold)
{
    unsigned char id[CS_STORE_ID_LEN];
    const char *err = NULL;
    apr_status_t rv;

    /* a paused store is not asked: the lock expires by itself, and no
     * request pays the deadline twice (its write, then its unlock) */
    if (!c->owner[0] || !store_usable())
        return;
    cs_store_id(c->ref.bytes, CS_ID_LOCK, id);
    rv = st.store->ops->release(st.store, id, sizeof(id),
                                (const unsigned char *)c->owner,
                                strlen(c->owner), store_deadline(), c->p, &err);
    if (rv == APR_SUCCESS && hold)
        rv = lock_add(c, id, hold, &err);
    if (rv != APR_SUCCESS && rv != APR_ENOLOCK && !APR_STATUS_IS_EEXIST(rv))
        store_failed(c, rv, "unlock", err);
}

/* ------------------------------------------------- per-process copies */

/* A hot user's requests are served from this process's memory for
 * CS_LOCAL_TTL after a shared-cache hit, without the shared cache's lock or
 * decryption. A copy is only ever an entry that was just valid in the
 * shared cache, and freshness is decided as there. */
static cs_local_slot *local_slot(const cs_cache_ref *ref)
{
    return &st.local[ref->bytes[1] % CS_LOCAL_SLOTS];
}

static int local_get(cs_call *c, apr_time_t now, cs_entry_t *e)
{
    cs_local_slot *slot;
    int hit = 0;

    if (!st.local)
        return 0;
    slot = local_slot(&c->ref);
    apr_thread_rwlock_rdlock(st.local_lock);
    if (now < slot->until && strcmp(slot->id, c->ref.id) == 0 &&
        cs_entry_fresh(&slot->e, now, c->policy.min_ttl)) {
        *e = slot->e;
        e->body = apr_pstrmemdup(c->p, slot->buf, slot->e.body_len);
        hit = 1;
    }
    apr_thread_rwlock_unlock(st.local_lock);
    return hit;
}

static void local_put(const cs_call *c, const cs_entry_t *e, apr_time_t now)
{
    cs_local_slot *slot;

    if (!st.local || e->kind != CS_ENTRY_TOKEN ||
        e->body_len >= sizeof(slot->buf))
        return;
    slot = local_slot(&c->ref);
    apr_thread_rwlock_wrlock(st.local_lock);
    memcpy(slot->buf, e->body, e->body_len);
    slot->e = *e;
    slot->e.body = slot->buf;
    memcpy(slot->id, c->ref.id, CS_CACHE_ID_LEN + 1);
    slot->until = now + CS_LOCAL_TTL;
    apr_thread_rwlock_unlock(st.local_lock);
}

/* A user who got a refreshed token never gets the older one again: in its
 * refresh window, a copy may be older than what another process has just
 * stored, so the shared store tells. */
int cs_store_token(cs_call *c, apr_time_t now, cs_entry_t *e)
{
    apr_time_t refresh_at;

    if (local_get(c, now, e) &&
        (!(refresh_at = cs_serve_refresh_at(e, &c->policy)) ||
         now < refresh_at))
        return 1;
    if (!cs_store_read(c, CS_ID_TOKEN, e))
        return 0;
    if (cs_entry_fresh(e, now, c->policy.min_ttl))
        local_put(c, e, now);
    return 1;
}

/* ------------------------------------------------------------- start-up */

/* CardScanCache redis:... or memcache:...: one of the fleet stores of
 * lib/ (hiredis, libmemcached), not httpd's socache providers. */
static int fleet_store_name(const char *name)
{
    return strcasecmp(name, "redis") == 0 || strcasecmp(name, "memcache") == 0;
}

static apr_status_t fleet_store_create(apr_pool_t *p, const char *name,
                                       const char *args, cs_store_t **out,
                                       const char **err)
{
    cs_store_opts_t opts = {cs_conf.store_timeout, cs_conf.store_user,
                            cs_conf.store_password};
    if (strcasecmp(name, "redis") == 0)
        return cs_store_redis_create(p, args, &opts, out, err);
    return cs_store_memcache_create(p, args, &opts, out, err);
}

/* CardScanCache as a provider name and its arguments; 0 for none. */
static int split_cache_spec(apr_pool_t *p, const char **name, const char **args)
{
    const char *spec = cs_conf.cache_spec, *sep;
    if (spec && strcasecmp(spec, "none") == 0)
        return 0;
    sep = spec ? ap_strchr_c(spec, ':') : NULL;
    *name = !spec ? "shmcb" : sep ? apr_pstrmemdup(p, spec, sep - spec) : spec;
    *args = sep ? sep + 1 : NULL;
    if (!sep && strcmp(*name, "shmcb") == 0)
        *args = apr_psprintf(p, "%s(%d)",
                             ap_runtime_dir_relative(p, "cardscan-cache"),
                             CS_DEFAULT_SHMCB_SIZE);
    return 1;
}

int cs_store_check(apr_pool_t *ptemp, server_rec *main_s)
{
    const char *name, *args, *err;
    cs_store_t *tmp;

    if (!split_cache_spec(ptemp, &name, &args))
        name = NULL;
    if (name && fleet_store_name(name)) {
        if (fleet_store_create(ptemp, name, args ? args : "", &tmp, &err) ==
            APR_SUCCESS)
            return OK;
        ap_log_error(APLOG_MARK, APLOG_EMERG, 0, main_s,
                     APLOGNO(10601) "mod_cardscan: CardScanCache %s: %s",
                     cs_conf.cache_spec, err);
        return !OK;
    }
    if (cs_conf.store_password)
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, main_s,
                     APLOGNO(10602) "mod_cardscan: CardScanCacheAuth is set "
                                    "but CardScanCache is not redis:...; it "
                                    "is not used");
    return name ? cs_shmcb_check(ptemp, main_s, name) : OK;
}

apr_status_t cs_store_setup(apr_pool_t *pconf, apr_pool_t *ptemp, server_rec *s)
{
    const char *name, *args, *err;
    apr_status_t rv;

    memset(&st, 0, sizeof(st));
    if (!split_cache_spec(ptemp, &name, &args)) {
        cs_shmcb_discard_carried(s);
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s,
                     APLOGNO(10505) "mod_cardscan: CardScanCache none: every "
                                    "request calls the CardScan API");
        return APR_SUCCESS;
    }
    if (!fleet_store_name(name))
        return cs_shmcb_setup(pconf, ptemp, s, name, args, &st.store);
    /* entries a shmcb of the last generation carried have no home now */
    cs_shmcb_discard_carried(s);
    /* made here, connected lazily by each child that uses it */
    rv = fleet_store_create(pconf, name, args ? args : "", &st.store, &err);
    if (rv != APR_SUCCESS)
        return rv; /* reported by check_config */
    ap_log_error(APLOG_MARK, APLOG_INFO, 0, s,
                 APLOGNO(10603) "mod_cardscan: token cache %s, %" APR_TIME_T_FMT
                                " ms per operation%s",
                 cs_conf.cache_spec, apr_time_as_msec(cs_conf.store_timeout),
                 cs_conf.store_password ? ", with AUTH" : "");
    return APR_SUCCESS;
}

void cs_store_child_init(apr_pool_t *p, server_rec *s)
{
    (void)s;
    cs_shmcb_child_init(p, s);
    /* a user's hits copied for a second: many requests of one user at once
     * then share no lock with other processes */
    if (st.store && apr_thread_rwlock_create(&st.local_lock, p) == APR_SUCCESS)
        st.local = apr_pcalloc(p, CS_LOCAL_SLOTS * sizeof(cs_local_slot));
    if (apr_gethostname(st.host_tag, sizeof(st.host_tag), p) != APR_SUCCESS)
        apr_cpystrn(st.host_tag, "host", sizeof(st.host_tag));
}
