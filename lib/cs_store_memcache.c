/* The memcached store (libmemcached): one memcached_st per thread at a
 * time, taken from a per-process set of idle ones. libmemcached spreads the
 * ids over the servers with its consistent (ketama) distribution, the same
 * on every web server that lists the same servers; there is no failing over
 * to another server. Before each operation the connect, poll, send and
 * receive timeouts are set to what is left of its deadline, so a server
 * that accepts but never answers costs one deadline. A memcached_st that
 * failed or timed out is freed; the next operation makes a new one, which
 * connects and resolves names again. */
#include "cs_store_backend.h"

#include <apr_strings.h>
#include <libmemcached/memcached.h>
#include <stdlib.h>
#include <string.h>

#define MEMCACHE_DEFAULT_PORT 11211
/* memcached reads an expiration beyond 30 days as a Unix time */
#define RELATIVE_MAX (30 * 24 * 3600)

typedef struct mc_store {
    cs_store_t st;
    cs_store_spec_t spec;
    const char *servers; /* for messages */
    cs_conn_idle_t *idle;
    apr_interval_time_t timeout;
} mc_store_t;

static void mc_close(void *conn)
{
    memcached_free(conn);
}

static apr_status_t mc_open(const mc_store_t *ms, memcached_st **out,
                            apr_pool_t *p, const char **err)
{
    memcached_st *mc = memcached_create(NULL);
    memcached_return_t rc = MEMCACHED_SUCCESS;

    if (!mc) {
        *err = "cannot allocate a memcached connection";
        return APR_ENOMEM;
    }
    for (int i = 0; i < ms->spec.nservers && memcached_success(rc); i++)
        rc = memcached_server_add(mc, ms->spec.servers[i].host,
                                  (in_port_t)ms->spec.servers[i].port);
    if (memcached_success(rc))
        rc = memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                                    MEMCACHED_DISTRIBUTION_CONSISTENT);
    if (memcached_failed(rc)) {
        *err = apr_psprintf(p, "memcached (%s): %s", ms->servers,
                            memcached_strerror(mc, rc));
        memcached_free(mc);
        return APR_EGENERAL;
    }
    *out = mc;
    return APR_SUCCESS;
}

/* Bounds every wait of the next operation by what is left until deadline. */
static int mc_time_left(memcached_st *mc, apr_time_t deadline)
{
    apr_time_t left = deadline - apr_time_now();
    apr_uint64_t ms;
    if (left <= 0)
        return 0;
    ms = (apr_uint64_t)(left + 999) / 1000;
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, ms);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, ms);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_SND_TIMEOUT,
                           (apr_uint64_t)left);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_RCV_TIMEOUT,
                           (apr_uint64_t)left);
    return 1;
}

typedef struct mc_op {
    enum { MC_GET, MC_SET, MC_ADD, MC_RELEASE } kind;
    const char *key;
    apr_size_t keylen;
    const unsigned char *val; /* set, add, release */
    apr_size_t len;
    time_t expiration;  /* set, add */
    unsigned char *buf; /* get: where the value goes */
    apr_size_t *buflen;
} mc_op_t;

static const char *const op_names[] = {"get", "set", "add", "release"};

/* One operation on mc; *rc is libmemcached's answer. */
static apr_status_t mc_run(memcached_st *mc, mc_op_t *op,
                           memcached_return_t *rc, apr_pool_t *p,
                           const char **err)
{
    char *v;
    size_t vlen;
    uint32_t flags;

    switch (op->kind) {
    case MC_SET:
    case MC_ADD:
        *rc = (op->kind == MC_SET ? memcached_set : memcached_add)(
            mc, op->key, op->keylen, (const char *)op->val, op->len,
            op->expiration, 0);
        if (*rc == MEMCACHED_NOTSTORED || *rc == MEMCACHED_DATA_EXISTS)
            return op->kind == MC_ADD ? APR_EEXIST : APR_EGENERAL;
        return memcached_success(*rc) ? APR_SUCCESS : APR_EGENERAL;
    case MC_GET:
    case MC_RELEASE:
        v = memcached_get(mc, op->key, op->keylen, &vlen, &flags, rc);
        if (*rc == MEMCACHED_NOTFOUND)
            return op->kind == MC_GET ? APR_NOTFOUND : APR_SUCCESS;
        if (!v || memcached_failed(*rc)) {
            free(v);
            return APR_EGENERAL;
        }
        if (op->kind == MC_GET) {
            apr_status_t rv = APR_SUCCESS;
            if (vlen > *op->buflen) {
                *err = apr_psprintf(p,
                                    "memcached: an entry of %lu bytes is "
                                    "larger than the %lu bytes expected",
                                    (unsigned long)vlen,
                                    (unsigned long)*op->buflen);
                rv = APR_ENOSPC;
            }
            else {
                memcpy(op->buf, v, vlen);
                *op->buflen = vlen;
            }
            free(v);
            return rv;
        }
        if (vlen != op->len || memcmp(v, op->val, vlen) != 0) {
            free(v); /* another owner's lock: leave it */
            return APR_SUCCESS;
        }
        free(v);
        *rc = memcached_delete(mc, op->key, op->keylen, 0);
        if (*rc == MEMCACHED_NOTFOUND)
            return APR_SUCCESS;
        return memcached_success(*rc) ? APR_SUCCESS : APR_EGENERAL;
    }
    return APR_EGENERAL;
}

/* Runs op on an idle connection or a new one. A connection taken from the
 * idle set that turns out closed (memcached restarted) is replaced once,
 * for operations that may run twice. */
static apr_status_t mc_call(mc_store_t *ms, mc_op_t *op, apr_time_t deadline,
                            apr_pool_t *p, const char **err)
{
    deadline = cs_store_deadline(deadline, ms->timeout);
    for (int attempt = 0;; attempt++) {
        memcached_st *mc = cs_conn_idle_take(ms->idle, apr_time_now());
        int reused = mc != NULL;
        memcached_return_t rc = MEMCACHED_SUCCESS;
        apr_status_t rv;

        if (!mc) {
            rv = mc_open(ms, &mc, p, err);
            if (rv != APR_SUCCESS)
                return rv;
        }
        if (!mc_time_left(mc, deadline)) {
            rc = MEMCACHED_TIMEOUT;
            rv = APR_TIMEUP;
        }
        else
            rv = mc_run(mc, op, &rc, p, err);
        if (rv == APR_SUCCESS || rv == APR_NOTFOUND || rv == APR_EEXIST ||
            rv == APR_ENOSPC) {
            cs_conn_idle_give(ms->idle, mc, apr_time_now());
            return rv;
        }
        if (rc == MEMCACHED_TIMEOUT || apr_time_now() >= deadline) {
            *err = apr_psprintf(p,
                                "memcached (%s): no answer to %s within the "
                                "deadline",
                                ms->servers, op_names[op->kind]);
            rv = APR_TIMEUP;
        }
        else
            *err = apr_psprintf(p, "memcached (%s): %s failed: %s", ms->servers,
                                op_names[op->kind], memcached_strerror(mc, rc));
        memcached_free(mc);
        if (rv == APR_TIMEUP || !reused || op->kind == MC_ADD || attempt > 0)
            return rv;
    }
}

static apr_status_t mc_key(mc_op_t *op, char *key, const unsigned char *id,
                           apr_size_t idlen, const char **err)
{
    op->key = key;
    op->keylen = cs_store_key(key, id, idlen);
    if (!op->keylen) {
        *err = "a store id is empty or too long";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

static time_t expiration(apr_time_t expiry)
{
    apr_int64_t s = (cs_store_ttl_ms(expiry, apr_time_now()) + 999) / 1000;
    if (s > RELATIVE_MAX)
        return (time_t)((expiry + APR_USEC_PER_SEC - 1) / APR_USEC_PER_SEC);
    return (time_t)s;
}

static apr_status_t mc_get(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, unsigned char *buf,
                           apr_size_t *len, apr_time_t deadline, apr_pool_t *p,
                           const char **err)
{
    char key[CS_STORE_KEY_MAX];
    mc_op_t op = {.kind = MC_GET, .buf = buf, .buflen = len};
    apr_status_t rv = mc_key(&op, key, id, idlen, err);
    return rv ? rv : mc_call(st->impl, &op, deadline, p, err);
}

static apr_status_t mc_store(cs_store_t *st, int kind, const unsigned char *id,
                             apr_size_t idlen, const unsigned char *val,
                             apr_size_t len, apr_time_t expiry,
                             apr_time_t deadline, apr_pool_t *p,
                             const char **err)
{
    char key[CS_STORE_KEY_MAX];
    mc_op_t op = {.kind = kind, .val = val, .len = len};
    apr_status_t rv = mc_key(&op, key, id, idlen, err);
    if (kind != MC_RELEASE)
        op.expiration = expiration(expiry);
    return rv ? rv : mc_call(st->impl, &op, deadline, p, err);
}

static apr_status_t mc_put(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    return mc_store(st, MC_SET, id, idlen, val, len, expiry, deadline, p, err);
}

static apr_status_t mc_add(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    return mc_store(st, MC_ADD, id, idlen, val, len, expiry, deadline, p, err);
}

static apr_status_t mc_release(cs_store_t *st, const unsigned char *id,
                               apr_size_t idlen, const unsigned char *val,
                               apr_size_t len, apr_time_t deadline,
                               apr_pool_t *p, const char **err)
{
    return mc_store(st, MC_RELEASE, id, idlen, val, len, 0, deadline, p, err);
}

static const cs_store_ops_t mc_ops = {"memcache", mc_get, mc_put, mc_add,
                                      mc_release};

apr_status_t cs_store_memcache_create(apr_pool_t *p, const char *spec,
                                      const cs_store_opts_t *opts,
                                      cs_store_t **st, const char **err)
{
    mc_store_t *ms = apr_pcalloc(p, sizeof(*ms));
    apr_status_t rv;

    rv = cs_store_spec_parse(p, spec, MEMCACHE_DEFAULT_PORT, 0, &ms->spec, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (opts->password) {
        *err = "memcached takes no password (CardScanCacheAuth is for Redis)";
        return APR_EINVAL;
    }
    rv = cs_conn_idle_create(p, mc_close, &ms->idle, err);
    if (rv != APR_SUCCESS)
        return rv;
    ms->servers = apr_pstrdup(p, spec);
    ms->timeout = opts->timeout;
    ms->st.ops = &mc_ops;
    ms->st.impl = ms;
    *st = &ms->st;
    return APR_SUCCESS;
}
