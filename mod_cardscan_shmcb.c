/*
 * The single-server token store: httpd's socache (shmcb by default) behind
 * lib/'s store interface, split into shards with a lock each, and carried
 * over graceful restarts. Its state is private to this file; the serving
 * path sees only the cs_store_t that cs_shmcb_setup returns.
 */
#include "mod_cardscan_private.h"

#include "http_core.h"
#include "http_main.h"
#include "ap_provider.h"
#include "ap_socache.h"
#include "util_mutex.h"

#include "apr_global_mutex.h"

#define CS_CACHE_MUTEX "cardscan-cache"
/* registered only so that configurations naming it keep working: single
 * flight is a lock in the token store */
#define CS_FLIGHT_MUTEX "cardscan-flight"
#define CS_CACHE_SHARDS 64                  /* at most, a power of 2 */
#define CS_SHARD_MIN_SIZE (4 * 1024 * 1024) /* bytes of shmcb per shard */
/* the entries carried over a graceful restart, found again by this key:
 * the version and layout are part of it, so that a newer module loaded by a
 * graceful reload does not misread the old one's */
#define CS_CARRY_KEY "mod_cardscan carried entries " CS_VERSION "/3"

/* A value is stored behind a small header holding its expiry, so that the
 * entries can be carried over a graceful restart (iterate gives no
 * expiry). */
#define SC_HEADER 9
#define SC_VERSION 'S'

/* shmcb scans a sub-cache linearly under one lock: large caches are split
 * into shards, each with its own instance and lock */
static struct {
    const ap_socache_provider_t *provider;
    int shards;
    ap_socache_instance_t *inst[CS_CACHE_SHARDS];
    apr_global_mutex_t *mutex[CS_CACHE_SHARDS];
    cs_store_t store;
} sc;

void cs_shmcb_pre_config(apr_pool_t *pconf)
{
    memset(&sc, 0, sizeof(sc));
    ap_mutex_register(pconf, CS_CACHE_MUTEX, NULL, APR_LOCK_DEFAULT, 0);
    ap_mutex_register(pconf, CS_FLIGHT_MUTEX, NULL, APR_LOCK_DEFAULT, 0);
}

static int shard_of(const unsigned char *id)
{
    return id[CS_CACHE_KEY_LEN - 1] & (sc.shards - 1);
}

/* A shard lock fails in children of a generation a graceful restart has
 * replaced: their cache is going away, so they do without it (APR_ENOLOCK,
 * not a failure). */
static apr_status_t shard_lock(int shard)
{
    if (sc.mutex[shard] &&
        apr_global_mutex_lock(sc.mutex[shard]) != APR_SUCCESS)
        return APR_ENOLOCK;
    return APR_SUCCESS;
}

static void shard_unlock(int shard)
{
    if (sc.mutex[shard])
        apr_global_mutex_unlock(sc.mutex[shard]);
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

    rv = sc.provider->retrieve(sc.inst[shard], ap_server_conf, id,
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
    return sc.provider->store(sc.inst[shard], ap_server_conf, id,
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
        sc.provider->remove(sc.inst[shard], ap_server_conf, id,
                            (unsigned int)idlen, p);
    shard_unlock(shard);
    return APR_SUCCESS;
}

static const cs_store_ops_t sc_ops = {"socache", sc_get, sc_put, sc_add,
                                      sc_release};

/* ------------------------------------------------------------- start-up */

int cs_shmcb_check(apr_pool_t *ptemp, server_rec *s, const char *name)
{
    (void)ptemp;
    if (ap_lookup_provider(AP_SOCACHE_PROVIDER_GROUP, name,
                           AP_SOCACHE_PROVIDER_VERSION))
        return OK;
    ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s,
                 APLOGNO(10504) "mod_cardscan: CardScanCache: no socache "
                                "provider '%s' is loaded: LoadModule "
                                "socache_%s_module (on Debian: a2enmod "
                                "socache_%s)",
                 name, name, name);
    return !OK;
}

static apr_status_t destroy_cache(void *data)
{
    server_rec *s = data;
    for (int i = 0; i < sc.shards; i++) {
        if (sc.provider && sc.inst[i])
            sc.provider->destroy(sc.inst[i], s);
        sc.inst[i] = NULL;
    }
    sc.shards = 0;
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

/* ------------------------------------------------- restart carry-over */

/* Entries carried over a graceful restart. httpd recreates the shmcb with
 * its configuration; just before the old one goes away (the cleanup below
 * runs first, LIFO, while the provider and its locks still exist) every
 * valid token is copied into the process pool, and the new configuration's
 * post_config stores them again with their own expiry. Locks and failures
 * are not carried, identity pins are. Ids are keyed hashes of the API key and
 * endpoint and entries are sealed, so an entry that a changed configuration
 * would not have stored is never found (new key or endpoint) or never opens
 * (new CardScanCacheSecret). */
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

    /* tokens and identity pins; locks and failures are short-lived */
    if (idlen != CS_STORE_ID_LEN ||
        (id[CS_CACHE_KEY_LEN] != CS_ID_TOKEN &&
         id[CS_CACHE_KEY_LEN] != CS_ID_PIN) ||
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
        !sc.provider || !sc.provider->iterate || !sc.shards ||
        apr_pool_create(&pool, s->process->pool) != APR_SUCCESS)
        return APR_SUCCESS;
    carry = apr_pcalloc(pool, sizeof(*carry));
    carry->pool = pool;
    carry->items = apr_array_make(pool, 1024, sizeof(cs_carried));
    for (int i = 0; i < sc.shards; i++) {
        if (shard_lock(i) != APR_SUCCESS)
            continue;
        sc.provider->iterate(sc.inst[i], s, carry, carry_one, pool);
        shard_unlock(i);
    }
    apr_pool_userdata_set(carry, CS_CARRY_KEY, apr_pool_cleanup_null,
                          s->process->pool);
    return APR_SUCCESS;
}

/* Takes the carried entries out of the process pool: NULL when none. */
static cs_carry *carry_take(server_rec *s)
{
    void *data = NULL;

    apr_pool_userdata_get(&data, CS_CARRY_KEY, s->process->pool);
    if (data)
        apr_pool_userdata_set(NULL, CS_CARRY_KEY, apr_pool_cleanup_null,
                              s->process->pool);
    return data;
}

static void carry_in(server_rec *s, apr_pool_t *ptemp)
{
    cs_carry *carry = carry_take(s);
    int stored = 0;

    if (!carry)
        return;
    for (int i = 0; sc.shards && i < carry->items->nelts; i++) {
        cs_carried *it = &APR_ARRAY_IDX(carry->items, i, cs_carried);
        int shard = shard_of(it->id);
        if (it->expiry <= apr_time_now() || shard_lock(shard) != APR_SUCCESS)
            continue;
        stored += sc_store(shard, it->id, CS_STORE_ID_LEN, it->val, it->len,
                           it->expiry, ptemp) == APR_SUCCESS;
        shard_unlock(shard);
    }
    ap_log_error(APLOG_MARK, APLOG_INFO, 0, s,
                 APLOGNO(10533) "mod_cardscan: %d of %d cached entries (tokens "
                                "and identity pins) carried over the "
                                "restart",
                 stored, carry->items->nelts);
    apr_pool_destroy(carry->pool);
}

void cs_shmcb_discard_carried(server_rec *s)
{
    cs_carry *carry = carry_take(s);
    if (carry)
        apr_pool_destroy(carry->pool);
}

apr_status_t cs_shmcb_setup(apr_pool_t *pconf, apr_pool_t *ptemp, server_rec *s,
                            const char *name, const char *args,
                            cs_store_t **store)
{
    /* shmcb sizes its index by the average object: a user has a token
     * (~2.4 KB with CardScan's JWTs), an identity pin (~200 B) and, for a
     * moment per call, a small lock entry that keeps its index slot until
     * the cycle reclaims it (600: bench/capacity, docs/benchmarks.md) */
    struct ap_socache_hints hints = {CS_STORE_ID_LEN, 600,
                                     apr_time_from_sec(30)};
    const char **shard_args, *err;
    apr_status_t rv;

    sc.provider = ap_lookup_provider(AP_SOCACHE_PROVIDER_GROUP, name,
                                     AP_SOCACHE_PROVIDER_VERSION);
    if (!sc.provider)
        return APR_ENOTIMPL; /* reported by check_config */
    shard_args = shard_cache_args(ptemp, name, args, &sc.shards);
    apr_pool_cleanup_register(pconf, s, destroy_cache, apr_pool_cleanup_null);
    for (int i = 0; i < sc.shards; i++) {
        err = sc.provider->create(&sc.inst[i], shard_args[i], ptemp, pconf);
        if (err) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, 0, s,
                         APLOGNO(10506) "mod_cardscan: CardScanCache %s: %s",
                         cs_conf.cache_spec ? cs_conf.cache_spec : name, err);
            return APR_EINVAL;
        }
        /* every provider gets its lock: the single-flight lock (add) is a
         * read and a write that no other process may come between */
        rv = ap_global_mutex_create(&sc.mutex[i], NULL, CS_CACHE_MUTEX,
                                    apr_itoa(ptemp, i), s, pconf, 0);
        if (rv != APR_SUCCESS)
            return rv;
        rv = sc.provider->init(sc.inst[i], "mod_cardscan", &hints, s, pconf);
        if (rv != APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_EMERG, rv, s,
                         APLOGNO(10507) "mod_cardscan: cannot initialise the "
                                        "token cache (%s)",
                         name);
            return rv;
        }
    }
    sc.store.ops = &sc_ops;
    *store = &sc.store;
    carry_in(s, ptemp);
    /* registered last, so that it runs before the cache is destroyed */
    apr_pool_cleanup_register(pconf, s, carry_out, apr_pool_cleanup_null);
    return APR_SUCCESS;
}

void cs_shmcb_child_init(apr_pool_t *p, server_rec *s)
{
    for (int i = 0; i < sc.shards; i++) {
        apr_status_t rv;
        if (!sc.mutex[i])
            continue;
        rv = apr_global_mutex_child_init(
            &sc.mutex[i], apr_global_mutex_lockfile(sc.mutex[i]), p);
        if (rv != APR_SUCCESS)
            ap_log_error(APLOG_MARK, APLOG_CRIT, rv, s,
                         APLOGNO(10509) "mod_cardscan: cache mutex init");
    }
}
