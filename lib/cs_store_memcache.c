/* The memcached store: memcached's text protocol (get, set, add, and a
 * compare-and-delete made of gets and cas) over the socket layer of
 * lib/cs_store.c, so that a whole operation, connecting included, ends by
 * its deadline. libmemcached bounds each poll, not an operation: a server
 * dribbling its reply a byte at a time kept one get for seconds, and it
 * buffers a value of whatever size a VALUE line announces. Here a VALUE
 * line announcing more than an entry can be (CS_STORE_VALUE_MAX) is
 * refused when it is read.
 *
 * libmemcached still chooses the server of an id among several (its
 * consistent "ketama" distribution, memcached_generate_hash), so that
 * every web server, whatever version of this module it runs, puts an id on
 * the same memcached; there is no failing over to another server.
 *
 * A connection that failed, timed out or carried a reply that is not one
 * memcached sends to these commands is closed; the next operation opens a
 * new one. Connections are per process (cs_conn_idle), one per thread at a
 * time. */
#include "cs_store_backend.h"

#include <apr_strings.h>
#include <libmemcached/memcached.h>
#include <stdlib.h>
#include <string.h>

#define MEMCACHE_DEFAULT_PORT 11211
/* memcached reads an expiration beyond 30 days as a Unix time */
#define RELATIVE_MAX (30 * 24 * 3600)
/* the longest line taken from a server (a VALUE line is < 200 bytes) */
#define MC_LINE_MAX 512

typedef struct mc_server {
    cs_store_server_t addr;
    cs_store_addrs_t *addrs;
    cs_conn_idle_t *idle;
} mc_server_t;

typedef struct mc_store {
    cs_store_t st;
    mc_server_t servers[CS_STORE_SERVERS_MAX];
    int nservers;
    memcached_st *ring; /* the servers, only to choose one: never connects */
    const char *names;  /* for messages */
    apr_interval_time_t timeout;
} mc_store_t;

typedef enum { MC_GET, MC_SET, MC_ADD, MC_RELEASE } mc_kind_e;

static const char *const op_names[] = {"get", "set", "add", "release"};

typedef struct mc_op {
    mc_kind_e kind;
    const char *key;
    apr_size_t keylen;
    const unsigned char *val; /* set, add, release */
    apr_size_t len;
    long expiration;    /* set, add */
    unsigned char *buf; /* get: where the value goes */
    apr_size_t *buflen;
} mc_op_t;

/* One connection and whether it can still be used. */
typedef struct mc_conn {
    cs_store_conn_t *net;
    int broken;
    const char *why; /* what failed, for the message */
} mc_conn_t;

static void mc_close(void *conn)
{
    mc_conn_t *c = conn;
    cs_store_conn_close(c->net);
    free(c);
}

/* The connection is out of step with the server, or closed. */
static apr_status_t broke(mc_conn_t *c, apr_status_t rv, const char *why)
{
    c->broken = 1;
    c->why = why;
    return rv;
}

static apr_status_t misbehaved(mc_conn_t *c, const char *why, apr_pool_t *p)
{
    return broke(c, APR_EGENERAL,
                 apr_pstrcat(p, "the server sent ", why, NULL));
}

static apr_status_t send_all(mc_conn_t *c, const char *data, apr_size_t len,
                             apr_time_t deadline, apr_pool_t *p)
{
    const char *why = NULL;
    apr_status_t rv = cs_store_send(c->net, data, len, deadline, p, &why);
    return rv == APR_SUCCESS ? rv : broke(c, rv, why);
}

/* The next reply line; an error line (ERROR, CLIENT_ERROR, SERVER_ERROR)
 * is a failure, and the connection is not used again. */
static apr_status_t read_line(mc_conn_t *c, apr_time_t deadline,
                              const char **line, apr_size_t *len, apr_pool_t *p)
{
    const char *why = NULL;
    apr_status_t rv =
        cs_store_line(c->net, MC_LINE_MAX, deadline, line, len, p, &why);
    if (rv != APR_SUCCESS)
        return APR_STATUS_IS_EGENERAL(rv) ? misbehaved(c, why, p)
                                          : broke(c, rv, why);
    if ((*len == 5 && memcmp(*line, "ERROR", 5) == 0) ||
        (*len > 12 && memcmp(*line, "CLIENT_ERROR", 12) == 0) ||
        (*len > 12 && memcmp(*line, "SERVER_ERROR", 12) == 0))
        return broke(c, APR_EGENERAL,
                     apr_psprintf(p, "the server answered '%.*s'",
                                  (int)(*len > 120 ? 120 : *len), *line));
    return APR_SUCCESS;
}

static int line_is(const char *line, apr_size_t len, const char *what)
{
    return len == strlen(what) && memcmp(line, what, len) == 0;
}

/* The next field of a line (split on spaces), or NULL at its end. */
static const char *field(const char **s, const char *end, apr_size_t *len)
{
    const char *f = *s;
    while (*s < end && **s != ' ')
        (*s)++;
    *len = (apr_size_t)(*s - f);
    if (*s < end)
        (*s)++;
    return *len ? f : NULL;
}

/* The answer to "get key" or "gets key": APR_NOTFOUND (END), or the
 * value's length in *vlen and the value in dst when it fits in cap bytes
 * (and, for gets, its cas unique in *cas). A value longer than
 * CS_STORE_VALUE_MAX is refused when its VALUE line is read. */
static apr_status_t read_value(mc_conn_t *c, const mc_op_t *op, int gets,
                               apr_time_t deadline, unsigned char *dst,
                               apr_size_t cap, apr_size_t *vlen,
                               const char **cas, apr_pool_t *p)
{
    const char *line, *s, *end, *f[5], *data, *why = NULL;
    apr_size_t len, flen[5];
    int n = 0;
    apr_status_t rv;

    rv = read_line(c, deadline, &line, &len, p);
    if (rv != APR_SUCCESS)
        return rv;
    if (line_is(line, len, "END"))
        return APR_NOTFOUND;
    for (s = line, end = line + len; n < 5 && (f[n] = field(&s, end, &flen[n]));
         n++)
        ;
    if (n != 4 + gets || s != end || !line_is(f[0], flen[0], "VALUE"))
        return misbehaved(c, "something else than a VALUE line", p);
    if (flen[1] != op->keylen || memcmp(f[1], op->key, op->keylen) != 0)
        return misbehaved(c, "the value of another key", p);
    rv = cs_store_parse_size(f[3], flen[3], CS_STORE_VALUE_MAX, vlen);
    if (APR_STATUS_IS_ENOSPC(rv))
        return misbehaved(c,
                          apr_psprintf(p,
                                       "a value of '%.*s' bytes, more than "
                                       "an entry can be (%d)",
                                       (int)(flen[3] > 24 ? 24 : flen[3]), f[3],
                                       CS_STORE_VALUE_MAX),
                          p);
    if (rv != APR_SUCCESS)
        return misbehaved(c, "a bad value length", p);
    if (gets) /* the line goes when the value is read: keep the cas */
        *cas = apr_pstrmemdup(p, f[4], flen[4]);
    rv = cs_store_bytes(c->net, *vlen + 2, deadline, &data, p, &why);
    if (rv != APR_SUCCESS)
        return APR_STATUS_IS_EGENERAL(rv) ? misbehaved(c, why, p)
                                          : broke(c, rv, why);
    if (memcmp(data + *vlen, "\r\n", 2) != 0)
        return misbehaved(c, "a value longer than announced", p);
    if (*vlen <= cap) /* now: reading END may move the buffer */
        memcpy(dst, data, *vlen);
    rv = read_line(c, deadline, &line, &len, p);
    if (rv != APR_SUCCESS)
        return rv;
    if (!line_is(line, len, "END"))
        return misbehaved(c, "more than one value", p);
    return APR_SUCCESS;
}

/* A storage command and its one-line answer: APR_SUCCESS (STORED) or
 * APR_EEXIST (NOT_STORED, EXISTS, NOT_FOUND). */
static apr_status_t store_cmd(mc_conn_t *c, const char *cmd, const char *key,
                              long expiration, const char *cas,
                              const unsigned char *val, apr_size_t len,
                              apr_time_t deadline, apr_pool_t *p)
{
    const char *head =
        apr_psprintf(p, "%s %s 0 %ld %lu%s%s\r\n", cmd, key, expiration,
                     (unsigned long)len, cas ? " " : "", cas ? cas : "");
    apr_size_t hlen = strlen(head);
    char *req = apr_palloc(p, hlen + len + 2);
    const char *line;
    apr_size_t llen;
    apr_status_t rv;

    memcpy(req, head, hlen);
    memcpy(req + hlen, val, len);
    memcpy(req + hlen + len, "\r\n", 2);
    rv = send_all(c, req, hlen + len + 2, deadline, p);
    if (rv == APR_SUCCESS)
        rv = read_line(c, deadline, &line, &llen, p);
    if (rv != APR_SUCCESS)
        return rv;
    if (line_is(line, llen, "STORED"))
        return APR_SUCCESS;
    if (line_is(line, llen, "NOT_STORED") || line_is(line, llen, "EXISTS") ||
        line_is(line, llen, "NOT_FOUND"))
        return APR_EEXIST;
    return misbehaved(c,
                      apr_psprintf(p, "'%.*s' to %s",
                                   (int)(llen > 60 ? 60 : llen), line, cmd),
                      p);
}

/* One operation on c. */
static apr_status_t mc_run(mc_conn_t *c, mc_op_t *op, apr_time_t deadline,
                           apr_pool_t *p, const char **err)
{
    const char *cas = NULL;
    unsigned char *owner;
    apr_size_t vlen = 0;
    apr_status_t rv;

    switch (op->kind) {
    case MC_SET:
    case MC_ADD:
        rv = store_cmd(c, op->kind == MC_SET ? "set" : "add", op->key,
                       op->expiration, NULL, op->val, op->len, deadline, p);
        if (rv == APR_EEXIST && op->kind == MC_SET)
            return misbehaved(c, "NOT_STORED to set", p);
        return rv;
    case MC_GET:
        rv = send_all(c, apr_pstrcat(p, "get ", op->key, "\r\n", NULL),
                      op->keylen + 6, deadline, p);
        if (rv == APR_SUCCESS)
            rv = read_value(c, op, 0, deadline, op->buf, *op->buflen, &vlen,
                            NULL, p);
        if (rv != APR_SUCCESS)
            return rv;
        if (vlen > *op->buflen) {
            *err =
                apr_psprintf(p,
                             "memcached: an entry of %lu bytes is larger "
                             "than the %lu bytes expected",
                             (unsigned long)vlen, (unsigned long)*op->buflen);
            return APR_ENOSPC;
        }
        *op->buflen = vlen;
        return APR_SUCCESS;
    case MC_RELEASE:
        /* compare and delete in one step: "cas" with the value's cas unique
         * and an expiration in the past replaces it with an expired item
         * only if nobody changed it since "gets" */
        rv = send_all(c, apr_pstrcat(p, "gets ", op->key, "\r\n", NULL),
                      op->keylen + 7, deadline, p);
        owner = apr_palloc(p, op->len + 1);
        if (rv == APR_SUCCESS)
            rv = read_value(c, op, 1, deadline, owner, op->len, &vlen, &cas, p);
        if (rv == APR_NOTFOUND)
            return APR_SUCCESS;
        if (rv != APR_SUCCESS)
            return rv;
        if (vlen != op->len || memcmp(owner, op->val, vlen) != 0)
            return APR_SUCCESS; /* another owner's lock: leave it */
        rv = store_cmd(c, "cas", op->key, -1, cas, (const unsigned char *)"", 0,
                       deadline, p);
        return rv == APR_EEXIST ? APR_SUCCESS : rv; /* changed or gone */
    }
    return APR_EGENERAL;
}

static apr_status_t mc_connect(mc_server_t *srv, apr_time_t deadline,
                               mc_conn_t **out, apr_pool_t *p, const char **err)
{
    mc_conn_t *c = calloc(1, sizeof(*c));
    const char *why = NULL;
    int unreachable;
    apr_status_t rv;

    if (!c) {
        *err = "cannot allocate a memcached connection";
        return APR_ENOMEM;
    }
    rv = cs_store_connect(srv->addrs, deadline, &c->net, &unreachable, p, &why);
    if (rv != APR_SUCCESS) {
        free(c);
        *err = apr_psprintf(p, "memcached at %s:%d: %s", srv->addr.host,
                            srv->addr.port, why);
        return rv;
    }
    *out = c;
    return APR_SUCCESS;
}

/* Runs op on an idle connection to the server of its key, or a new one. A
 * connection taken from the idle set that turns out closed (memcached
 * restarted) is replaced once, for operations that may run twice. */
static apr_status_t mc_call(mc_store_t *ms, mc_op_t *op, apr_time_t deadline,
                            apr_pool_t *p, const char **err)
{
    mc_server_t *srv = &ms->servers[0];

    if (ms->nservers > 1) {
        uint32_t k = memcached_generate_hash(ms->ring, op->key, op->keylen);
        srv = &ms->servers[k < (uint32_t)ms->nservers ? k : 0];
    }
    deadline = cs_store_deadline(deadline, ms->timeout);
    for (int attempt = 0;; attempt++) {
        mc_conn_t *c = cs_conn_idle_take(srv->idle, apr_time_now());
        int reused = c != NULL;
        apr_status_t rv;

        if (c && !cs_store_conn_idle_ok(c->net)) {
            mc_close(c); /* closed while idle, or holding stray bytes */
            c = NULL;
            reused = 0;
        }
        if (!c) {
            rv = mc_connect(srv, deadline, &c, p, err);
            if (rv != APR_SUCCESS)
                return rv;
        }
        rv = apr_time_now() < deadline ? mc_run(c, op, deadline, p, err)
                                       : broke(c, APR_TIMEUP, NULL);
        if (!c->broken && !cs_store_conn_drained(c->net))
            rv = misbehaved(c, "more than one reply", p);
        if (!c->broken) {
            cs_conn_idle_give(srv->idle, c, apr_time_now());
            return rv;
        }
        if (rv == APR_TIMEUP)
            *err = apr_psprintf(p,
                                "memcached at %s:%d: no answer to %s within "
                                "the deadline",
                                srv->addr.host, srv->addr.port,
                                op_names[op->kind]);
        else
            *err = apr_psprintf(p, "memcached at %s:%d: %s failed: %s",
                                srv->addr.host, srv->addr.port,
                                op_names[op->kind], c->why);
        mc_close(c);
        if (!cs_store_conn_lost(rv) || !reused || op->kind == MC_ADD ||
            attempt > 0)
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

static long expiration(apr_time_t expiry)
{
    apr_int64_t s = (cs_store_ttl_ms(expiry, apr_time_now()) + 999) / 1000;
    if (s > RELATIVE_MAX)
        return (long)((expiry + APR_USEC_PER_SEC - 1) / APR_USEC_PER_SEC);
    return (long)s;
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

static apr_status_t mc_store(cs_store_t *st, mc_kind_e kind,
                             const unsigned char *id, apr_size_t idlen,
                             const unsigned char *val, apr_size_t len,
                             apr_time_t expiry, apr_time_t deadline,
                             apr_pool_t *p, const char **err)
{
    char key[CS_STORE_KEY_MAX];
    mc_op_t op = {.kind = kind, .val = val, .len = len};
    apr_status_t rv = mc_key(&op, key, id, idlen, err);
    if (rv)
        return rv;
    if (len > CS_STORE_VALUE_MAX) {
        *err = "a value larger than a store entry can be";
        return APR_EINVAL;
    }
    if (kind != MC_RELEASE)
        op.expiration = expiration(expiry);
    return mc_call(st->impl, &op, deadline, p, err);
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

static apr_status_t ring_cleanup(void *data)
{
    memcached_free(data);
    return APR_SUCCESS;
}

/* The servers as libmemcached lists them, for memcached_generate_hash:
 * added in the order given, then the consistent distribution (which is
 * how this store used them when libmemcached also did the talking). */
static apr_status_t ring_create(mc_store_t *ms, apr_pool_t *p, const char **err)
{
    memcached_return_t rc = MEMCACHED_SUCCESS;

    ms->ring = memcached_create(NULL);
    if (!ms->ring) {
        *err = "cannot allocate libmemcached's server list";
        return APR_ENOMEM;
    }
    apr_pool_cleanup_register(p, ms->ring, ring_cleanup, apr_pool_cleanup_null);
    for (int i = 0; i < ms->nservers && memcached_success(rc); i++)
        rc = memcached_server_add(ms->ring, ms->servers[i].addr.host,
                                  (in_port_t)ms->servers[i].addr.port);
    if (memcached_success(rc))
        rc = memcached_behavior_set(ms->ring, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                                    MEMCACHED_DISTRIBUTION_CONSISTENT);
    if (memcached_failed(rc)) {
        *err = apr_psprintf(p, "memcached (%s): %s", ms->names,
                            memcached_strerror(ms->ring, rc));
        return APR_EGENERAL;
    }
    return APR_SUCCESS;
}

apr_status_t cs_store_memcache_create(apr_pool_t *p, const char *spec,
                                      const cs_store_opts_t *opts,
                                      cs_store_t **st, const char **err)
{
    mc_store_t *ms = apr_pcalloc(p, sizeof(*ms));
    cs_store_spec_t parsed;
    apr_status_t rv;

    rv = cs_store_spec_parse(p, spec, MEMCACHE_DEFAULT_PORT, 0, &parsed, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (opts->password) {
        *err = "memcached takes no password (CardScanCacheAuth is for Redis)";
        return APR_EINVAL;
    }
    ms->nservers = parsed.nservers;
    ms->names = apr_pstrdup(p, spec);
    for (int i = 0; i < parsed.nservers && rv == APR_SUCCESS; i++) {
        ms->servers[i].addr = parsed.servers[i];
        rv = cs_conn_idle_create(p, mc_close, &ms->servers[i].idle, err);
        if (rv == APR_SUCCESS)
            rv = cs_store_addrs_create(p, &ms->servers[i].addr,
                                       &ms->servers[i].addrs, err);
    }
    if (rv == APR_SUCCESS && ms->nservers > 1)
        rv = ring_create(ms, p, err);
    if (rv != APR_SUCCESS)
        return rv;
    ms->timeout = opts->timeout;
    ms->st.ops = &mc_ops;
    ms->st.impl = ms;
    *st = &ms->st;
    return APR_SUCCESS;
}
