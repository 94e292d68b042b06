/* The Redis store (hiredis): one blocking connection per thread at a time,
 * taken from a per-process set of idle ones for the server that holds the
 * id. Every socket wait is bounded by what is left of the operation's
 * deadline (redisConnectWithTimeout, then redisSetTimeout before each
 * command), so a server that accepts but never answers costs one deadline.
 * A connection that failed or timed out is closed; the next operation
 * connects again, resolving the name again.
 *
 * Several servers: each id lives on one of them, chosen by a hash of the
 * id (cs_store_pick), the same on every web server that lists the servers
 * in the same order. A server that refuses connections is passed over for
 * the next one in the list (and left alone for a few seconds by this
 * process), so its users' entries find a place on the others; a server
 * that accepts but does not answer costs the deadline, and the caller
 * backs off.
 *
 * hiredis writes with write(2): like every httpd child, the process must
 * ignore SIGPIPE. */
#include "cs_store_backend.h"

#include <apr_strings.h>
#include <hiredis/hiredis.h>
#include <string.h>

#define REDIS_DEFAULT_PORT 6379
/* a compare-and-delete: the lock is released by its owner only */
#define RELEASE_SCRIPT                                                         \
    "if redis.call('get', KEYS[1]) == ARGV[1] then "                           \
    "return redis.call('del', KEYS[1]) else return 0 end"

typedef struct rd_server {
    cs_store_server_t addr;
    cs_conn_idle_t *idle;
    apr_time_t down_until; /* refused a connection lately (per process) */
} rd_server_t;

/* how long a server that refused a connection is passed over */
#define RD_DOWN_TIME apr_time_from_sec(5)

typedef struct rd_store {
    cs_store_t st;
    rd_server_t servers[CS_STORE_SERVERS_MAX];
    int nservers;
    int db;
    const char *username, *password;
    apr_interval_time_t timeout;
} rd_store_t;

/* What is left until deadline, at least 1 ms; 0 when nothing is left. */
static int time_left(apr_time_t deadline, struct timeval *tv)
{
    apr_time_t left = deadline - apr_time_now();
    if (left <= 0)
        return 0;
    if (left < 1000)
        left = 1000;
    tv->tv_sec = (long)apr_time_sec(left);
    tv->tv_usec = (long)apr_time_usec(left);
    return 1;
}

static apr_status_t timed_out(const rd_server_t *srv, const char *doing,
                              apr_pool_t *p, const char **err)
{
    *err = apr_psprintf(p,
                        "Redis at %s:%d: no answer to %s within the "
                        "deadline",
                        srv->addr.host, srv->addr.port, doing);
    return APR_TIMEUP;
}

/* A failed connection or exchange: a timeout or another failure. */
static apr_status_t io_failed(const rd_server_t *srv, const redisContext *c,
                              const char *doing, apr_time_t deadline,
                              apr_pool_t *p, const char **err)
{
    if (apr_time_now() >= deadline ||
        (c->err == REDIS_ERR_IO &&
         (strstr(c->errstr, "timed out") || strstr(c->errstr, "temporarily"))))
        return timed_out(srv, doing, p, err);
    *err = apr_psprintf(p, "Redis at %s:%d: %s failed: %s", srv->addr.host,
                        srv->addr.port, doing,
                        c->errstr[0] ? c->errstr : "connection lost");
    return APR_EGENERAL;
}

/* An error reply: refused credentials or permissions are APR_EACCES. The
 * server's text never holds our arguments for these commands; it is
 * shortened all the same. */
static apr_status_t error_reply(const rd_server_t *srv, const redisReply *r,
                                const char *doing, apr_pool_t *p,
                                const char **err)
{
    const char *text = apr_pstrndup(p, r->str, r->len > 120 ? 120 : r->len);
    if (strncmp(text, "NOAUTH", 6) == 0) {
        *err = apr_psprintf(p,
                            "Redis at %s:%d requires a password: set "
                            "CardScanCacheAuth (%s)",
                            srv->addr.host, srv->addr.port, text);
        return APR_EACCES;
    }
    if (strncmp(text, "NOPERM", 6) == 0 || strncmp(text, "WRONGPASS", 9) == 0) {
        *err = apr_psprintf(p, "Redis at %s:%d refused %s: %s", srv->addr.host,
                            srv->addr.port, doing, text);
        return APR_EACCES;
    }
    *err = apr_psprintf(p, "Redis at %s:%d: %s failed: %s", srv->addr.host,
                        srv->addr.port, doing, text);
    return APR_EGENERAL;
}

/* One command, within the deadline. APR_SUCCESS: *reply is a reply that is
 * not an error, for the caller to free. On failure c->err tells whether
 * the connection is still good. */
static apr_status_t command(const rd_server_t *srv, redisContext *c,
                            const char *doing, int argc, const char **argv,
                            const size_t *argvlen, apr_time_t deadline,
                            redisReply **reply, apr_pool_t *p, const char **err)
{
    struct timeval tv;
    apr_status_t rv;

    *reply = NULL;
    if (!time_left(deadline, &tv)) {
        c->err = REDIS_ERR_OTHER; /* a half-done exchange: not reusable */
        return timed_out(srv, doing, p, err);
    }
    if (redisSetTimeout(c, tv) != REDIS_OK)
        return io_failed(srv, c, doing, deadline, p, err);
    *reply = redisCommandArgv(c, argc, argv, argvlen);
    if (!*reply)
        return io_failed(srv, c, doing, deadline, p, err);
    if ((*reply)->type != REDIS_REPLY_ERROR)
        return APR_SUCCESS;
    rv = error_reply(srv, *reply, doing, p, err);
    freeReplyObject(*reply);
    *reply = NULL;
    return rv;
}

static apr_status_t rd_connect(const rd_store_t *rs, const rd_server_t *srv,
                               apr_time_t deadline, redisContext **out,
                               apr_pool_t *p, const char **err)
{
    struct timeval tv;
    redisContext *c;
    redisReply *r = NULL;
    apr_status_t rv = APR_SUCCESS;

    if (!time_left(deadline, &tv))
        return timed_out(srv, "connect", p, err);
    c = redisConnectWithTimeout(srv->addr.host, srv->addr.port, tv);
    if (!c) {
        *err = "cannot allocate a Redis connection";
        return APR_ENOMEM;
    }
    if (c->err) {
        rv = io_failed(srv, c, "connect", deadline, p, err);
        redisFree(c);
        return rv;
    }
    redisEnableKeepAlive(c);
    if (rs->password) {
        const char *argv[3] = {"AUTH"};
        size_t argvlen[3] = {4};
        int argc = 1;
        if (rs->username) {
            argv[argc] = rs->username;
            argvlen[argc++] = strlen(rs->username);
        }
        argv[argc] = rs->password;
        argvlen[argc++] = strlen(rs->password);
        rv = command(srv, c, "AUTH", argc, argv, argvlen, deadline, &r, p, err);
        if (rv == APR_EGENERAL && !c->err) {
            /* "ERR ... without any password configured" and the like */
            rv = APR_EACCES;
        }
        if (rv == APR_EACCES)
            *err = apr_psprintf(p, "%s (CardScanCacheAuth: %s)", *err,
                                rs->username
                                    ? apr_pstrcat(p, "user '", rs->username,
                                                  "' and its password", NULL)
                                    : "the requirepass password");
        if (r)
            freeReplyObject(r);
        r = NULL;
    }
    if (rv == APR_SUCCESS && rs->db) {
        const char *db = apr_itoa(p, rs->db);
        const char *argv[2] = {"SELECT", db};
        size_t argvlen[2] = {6, strlen(db)};
        rv = command(srv, c, "SELECT", 2, argv, argvlen, deadline, &r, p, err);
    }
    if (rv != APR_SUCCESS) {
        redisFree(c);
        return rv;
    }
    if (r)
        freeReplyObject(r);
    *out = c;
    return APR_SUCCESS;
}

/* Runs one command on srv. A connection taken from the idle set that turns
 * out closed (the server restarted, or dropped it) is replaced once, for
 * commands that may run twice. *unreachable: no connection could be made. */
static apr_status_t rd_call_on(rd_store_t *rs, rd_server_t *srv,
                               const char *doing, int argc, const char **argv,
                               const size_t *argvlen, int idempotent,
                               apr_time_t deadline, redisReply **reply,
                               int *unreachable, apr_pool_t *p,
                               const char **err)
{
    *unreachable = 0;
    for (int attempt = 0;; attempt++) {
        redisContext *c = cs_conn_idle_take(srv->idle, apr_time_now());
        int reused = c != NULL;
        apr_status_t rv;

        if (!c) {
            rv = rd_connect(rs, srv, deadline, &c, p, err);
            if (rv != APR_SUCCESS) {
                *unreachable = rv != APR_TIMEUP && rv != APR_EACCES;
                return rv;
            }
        }
        rv = command(srv, c, doing, argc, argv, argvlen, deadline, reply, p,
                     err);
        if (!c->err) {
            cs_conn_idle_give(srv->idle, c, apr_time_now());
            return rv;
        }
        redisFree(c);
        if (rv == APR_TIMEUP || !reused || !idempotent || attempt > 0)
            return rv;
    }
}

/* Runs one command on the server of id, or, while that one refuses
 * connections, on the next in the list. */
static apr_status_t rd_call(rd_store_t *rs, const unsigned char *id,
                            apr_size_t idlen, const char *doing, int argc,
                            const char **argv, const size_t *argvlen,
                            int idempotent, apr_time_t deadline,
                            redisReply **reply, apr_pool_t *p, const char **err)
{
    int first = cs_store_pick(id, idlen, rs->nservers), unreachable = 0;
    apr_status_t rv = APR_EGENERAL;

    deadline = cs_store_deadline(deadline, rs->timeout);
    for (int k = 0; k < rs->nservers; k++) {
        rd_server_t *srv = &rs->servers[(first + k) % rs->nservers];
        int last = k + 1 == rs->nservers;
        if (!last && apr_time_now() < srv->down_until)
            continue;
        rv = rd_call_on(rs, srv, doing, argc, argv, argvlen, idempotent,
                        deadline, reply, &unreachable, p, err);
        if (!unreachable || last)
            return rv;
        srv->down_until = apr_time_now() + RD_DOWN_TIME;
    }
    return rv;
}

static void rd_close(void *conn)
{
    redisFree(conn);
}

#define KEY_ARGS(key, id, idlen)                                               \
    char key[CS_STORE_KEY_MAX];                                                \
    apr_size_t key##len = cs_store_key(key, id, idlen);                        \
    if (!key##len) {                                                           \
        *err = "a store id is empty or too long";                              \
        return APR_EINVAL;                                                     \
    }

static apr_status_t rd_get(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, unsigned char *buf,
                           apr_size_t *len, apr_time_t deadline, apr_pool_t *p,
                           const char **err)
{
    rd_store_t *rs = st->impl;
    redisReply *r;
    apr_status_t rv;
    KEY_ARGS(key, id, idlen);
    const char *argv[2] = {"GET", key};
    size_t argvlen[2] = {3, keylen};

    rv = rd_call(rs, id, idlen, "GET", 2, argv, argvlen, 1, deadline, &r, p,
                 err);
    if (rv != APR_SUCCESS)
        return rv;
    if (r->type == REDIS_REPLY_NIL)
        rv = APR_NOTFOUND;
    else if (r->type != REDIS_REPLY_STRING) {
        *err = "Redis: GET answered something else than a string";
        rv = APR_EGENERAL;
    }
    else if (r->len > *len) {
        *err = apr_psprintf(p,
                            "Redis: an entry of %lu bytes is larger than "
                            "the %lu bytes expected",
                            (unsigned long)r->len, (unsigned long)*len);
        rv = APR_ENOSPC;
    }
    else {
        memcpy(buf, r->str, r->len);
        *len = r->len;
    }
    freeReplyObject(r);
    return rv;
}

/* SET key val PX ms [NX] */
static apr_status_t rd_set(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry, int nx,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    rd_store_t *rs = st->impl;
    redisReply *r;
    apr_status_t rv;
    KEY_ARGS(key, id, idlen);
    const char *ms = apr_psprintf(p, "%" APR_INT64_T_FMT,
                                  cs_store_ttl_ms(expiry, apr_time_now()));
    const char *argv[6] = {"SET", key, (const char *)val, "PX", ms, "NX"};
    size_t argvlen[6] = {3, keylen, len, 2, strlen(ms), 2};

    rv = rd_call(rs, id, idlen, nx ? "SET NX" : "SET", nx ? 6 : 5, argv,
                 argvlen, !nx, deadline, &r, p, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (r->type == REDIS_REPLY_NIL && nx)
        rv = APR_EEXIST;
    else if (r->type != REDIS_REPLY_STATUS) {
        *err = "Redis: SET answered something else than OK";
        rv = APR_EGENERAL;
    }
    freeReplyObject(r);
    return rv;
}

static apr_status_t rd_put(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    return rd_set(st, id, idlen, val, len, expiry, 0, deadline, p, err);
}

static apr_status_t rd_add(cs_store_t *st, const unsigned char *id,
                           apr_size_t idlen, const unsigned char *val,
                           apr_size_t len, apr_time_t expiry,
                           apr_time_t deadline, apr_pool_t *p, const char **err)
{
    return rd_set(st, id, idlen, val, len, expiry, 1, deadline, p, err);
}

static apr_status_t rd_release(cs_store_t *st, const unsigned char *id,
                               apr_size_t idlen, const unsigned char *val,
                               apr_size_t len, apr_time_t deadline,
                               apr_pool_t *p, const char **err)
{
    rd_store_t *rs = st->impl;
    redisReply *r;
    apr_status_t rv;
    KEY_ARGS(key, id, idlen);
    const char *argv[5] = {"EVAL", RELEASE_SCRIPT, "1", key, (const char *)val};
    size_t argvlen[5] = {4, sizeof(RELEASE_SCRIPT) - 1, 1, keylen, len};

    rv = rd_call(rs, id, idlen, "EVAL", 5, argv, argvlen, 1, deadline, &r, p,
                 err);
    if (rv == APR_SUCCESS)
        freeReplyObject(r);
    return rv;
}

static const cs_store_ops_t rd_ops = {"redis", rd_get, rd_put, rd_add,
                                      rd_release};

apr_status_t cs_store_redis_create(apr_pool_t *p, const char *spec,
                                   const cs_store_opts_t *opts, cs_store_t **st,
                                   const char **err)
{
    cs_store_spec_t parsed;
    rd_store_t *rs;
    apr_status_t rv;

    rv = cs_store_spec_parse(p, spec, REDIS_DEFAULT_PORT, 1, &parsed, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (opts->username && !opts->password) {
        *err = "a Redis username needs a password";
        return APR_EINVAL;
    }
    rs = apr_pcalloc(p, sizeof(*rs));
    rs->nservers = parsed.nservers;
    rs->db = parsed.db;
    rs->timeout = opts->timeout;
    rs->username = opts->username ? apr_pstrdup(p, opts->username) : NULL;
    rs->password = opts->password ? apr_pstrdup(p, opts->password) : NULL;
    for (int i = 0; i < parsed.nservers; i++) {
        rs->servers[i].addr = parsed.servers[i];
        rv = cs_conn_idle_create(p, rd_close, &rs->servers[i].idle, err);
        if (rv != APR_SUCCESS)
            return rv;
    }
    rs->st.ops = &rd_ops;
    rs->st.impl = rs;
    *st = &rs->st;
    return APR_SUCCESS;
}
