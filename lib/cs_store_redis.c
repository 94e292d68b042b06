/* The Redis store. hiredis formats the commands (redisFormatCommandArgv)
 * and parses the replies (a redisReader); the socket is ours: non-blocking,
 * every wait a poll(2) against what is left of the operation's deadline
 * (lib/cs_store.c). So one operation, connecting included, ends by its
 * deadline however slowly the server answers (hiredis's own timeouts are
 * per read: a reply dribbled a byte at a time could take many of them),
 * and the same code builds against every hiredis from 0.13 to 1.x.
 *
 * Each reply is checked before hiredis sees any of it: its type byte and
 * header line. The commands sent here (AUTH, SELECT, GET, SET, EVAL of a
 * script returning an integer) never get an aggregate reply, so '*', '%',
 * '~', '>' and '|' replies are refused, as are bulk strings longer than an
 * entry can be (CS_STORE_VALUE_MAX): refused when the header is read, not
 * buffered. A huge multi-bulk count (CVE-2021-32765, hiredis < 1.0.1) never
 * reaches the reader, whatever hiredis is installed.
 *
 * A connection that failed, timed out or carried a reply it should not
 * have is closed; the next operation opens a new one. Connections are per
 * process (cs_conn_idle): never shared with a forked child.
 *
 * Several servers: each id lives on one of them, chosen by a hash of the
 * id (cs_store_pick), the same on every web server that lists the servers
 * in the same order. A server that refuses connections is passed over for
 * the next one in the list (and left alone for a few seconds by this
 * process), so its users' entries find a place on the others; a server
 * that accepts but does not answer costs the deadline, and the caller
 * backs off. */
#ifdef HAVE_CONFIG_H
#include "config.h" /* HAVE_REDIS_READER_MAXELEMENTS */
#endif
#include "cs_store_backend.h"

#include <apr_strings.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#define REDIS_DEFAULT_PORT 6379
/* a compare-and-delete: the lock is released by its owner only */
#define RELEASE_SCRIPT                                                         \
    "if redis.call('get', KEYS[1]) == ARGV[1] then "                           \
    "return redis.call('del', KEYS[1]) else return 0 end"
/* the longest status, error or integer line taken from a server */
#define RD_LINE_MAX 1024
/* no reply here is an aggregate; where hiredis can refuse large ones
 * itself (1.0.1 and later), it is told so too */
#define RD_MAXELEMENTS 8

typedef struct rd_server {
    cs_store_server_t addr;
    cs_store_addrs_t *addrs;
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

/* One connection and whether it can still be used. */
typedef struct rd_conn {
    cs_store_conn_t *net;
    int broken; /* out of step with the server, or closed: not reusable */
} rd_conn_t;

/* A failed exchange: the connection is not used again. */
static apr_status_t io_failed(const rd_server_t *srv, rd_conn_t *c,
                              apr_status_t rv, const char *doing,
                              const char *why, apr_pool_t *p, const char **err)
{
    c->broken = 1;
    if (rv == APR_TIMEUP)
        *err = apr_psprintf(p,
                            "Redis at %s:%d: no answer to %s within the "
                            "deadline",
                            srv->addr.host, srv->addr.port, doing);
    else
        *err = apr_psprintf(p, "Redis at %s:%d: %s failed: %s", srv->addr.host,
                            srv->addr.port, doing, why);
    return rv;
}

/* A reply that is not one this store can get: the server misbehaves. */
static apr_status_t misbehaved(const rd_server_t *srv, rd_conn_t *c,
                               const char *doing, const char *why,
                               apr_pool_t *p, const char **err)
{
    return io_failed(srv, c, APR_EGENERAL, doing,
                     apr_pstrcat(p, "the server sent ", why, NULL), p, err);
}

/* An error reply: refused credentials or permissions are APR_EACCES. The
 * server's text never holds our arguments for these commands; it is
 * shortened all the same. */
static apr_status_t error_reply(const rd_server_t *srv, const redisReply *r,
                                const char *doing, apr_pool_t *p,
                                const char **err)
{
    apr_size_t len = r->len > 0 ? (apr_size_t)r->len : 0;
    const char *text = apr_pstrndup(p, r->str, len > 120 ? 120 : len);
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

/* Reads one reply, checking its header before hiredis parses it: only
 * '+', '-', ':' lines and '$' bulk strings of at most CS_STORE_VALUE_MAX
 * bytes are taken. */
static apr_status_t read_reply(const rd_server_t *srv, rd_conn_t *c,
                               const char *doing, apr_time_t deadline,
                               redisReply **reply, apr_pool_t *p,
                               const char **err)
{
    redisReader *reader;
    const char *line, *why = NULL, *body = NULL;
    apr_size_t len, bulk = 0;
    int has_body = 0;
    void *out = NULL;
    apr_status_t rv;

    rv = cs_store_line(c->net, RD_LINE_MAX, deadline, &line, &len, p, &why);
    if (rv != APR_SUCCESS)
        return APR_STATUS_IS_EGENERAL(rv)
                   ? misbehaved(srv, c, doing, why, p, err)
                   : io_failed(srv, c, rv, doing, why, p, err);
    switch (len ? line[0] : '\0') {
    case '+':
    case '-':
    case ':':
        break;
    case '$':
        if (len == 3 && memcmp(line, "$-1", 3) == 0)
            break; /* nil */
        rv = cs_store_parse_size(line + 1, len - 1, CS_STORE_VALUE_MAX, &bulk);
        if (APR_STATUS_IS_ENOSPC(rv))
            return misbehaved(
                srv, c, doing,
                apr_psprintf(p,
                             "a reply of '%.24s' bytes, more than an "
                             "entry can be (%d)",
                             line + 1, CS_STORE_VALUE_MAX),
                p, err);
        if (rv != APR_SUCCESS)
            return misbehaved(srv, c, doing, "a bad bulk length", p, err);
        has_body = 1;
        break;
    case '*':
    case '%':
    case '~':
    case '>':
    case '|':
        return misbehaved(
            srv, c, doing,
            apr_psprintf(p,
                         "an aggregate reply ('%c'), which no command of "
                         "this store gets",
                         line[0]),
            p, err);
    default:
        return misbehaved(srv, c, doing, "something that is not a reply", p,
                          err);
    }

    reader = redisReaderCreate();
    if (!reader) {
        c->broken = 1;
        *err = "cannot allocate a Redis reply reader";
        return APR_ENOMEM;
    }
#ifdef HAVE_REDIS_READER_MAXELEMENTS
    reader->maxelements = RD_MAXELEMENTS;
#endif
    /* the header line now: the next read may move the buffer */
    if (redisReaderFeed(reader, line, len) != REDIS_OK ||
        redisReaderFeed(reader, "\r\n", 2) != REDIS_OK)
        rv = APR_ENOMEM;
    else if (has_body) {
        rv = cs_store_bytes(c->net, bulk + 2, deadline, &body, p, &why);
        if (rv == APR_SUCCESS && memcmp(body + bulk, "\r\n", 2) != 0) {
            rv = APR_EGENERAL;
            why = "a bulk reply longer than announced";
        }
        else if (rv == APR_SUCCESS &&
                 redisReaderFeed(reader, body, bulk + 2) != REDIS_OK)
            rv = APR_ENOMEM;
    }
    if (rv == APR_SUCCESS &&
        (redisReaderGetReply(reader, &out) != REDIS_OK || !out)) {
        rv = APR_EGENERAL;
        why = apr_pstrcat(p, "a reply hiredis cannot parse: ",
                          reader->errstr[0] ? reader->errstr : "incomplete",
                          NULL);
    }
    redisReaderFree(reader);
    if (rv == APR_ENOMEM) {
        c->broken = 1;
        *err = "cannot allocate a Redis reply";
        return rv;
    }
    if (rv != APR_SUCCESS) {
        if (out)
            freeReplyObject(out);
        return APR_STATUS_IS_EGENERAL(rv)
                   ? misbehaved(srv, c, doing, why, p, err)
                   : io_failed(srv, c, rv, doing, why, p, err);
    }
    if (!cs_store_conn_drained(c->net)) {
        freeReplyObject(out);
        return misbehaved(srv, c, doing, "more than one reply", p, err);
    }
    *reply = out;
    return APR_SUCCESS;
}

/* reply types, as the `expect` masks of command() */
#define T(type) (1u << (type))

/* One command, within the deadline. APR_SUCCESS: *reply is a reply of one
 * of the types in expect, for the caller to free. An error reply is
 * APR_EACCES (credentials, permissions) or APR_EGENERAL, and leaves the
 * connection usable; any other reply is the server misbehaving. On failure
 * c->broken tells whether the connection may still be used. */
static apr_status_t command(const rd_server_t *srv, rd_conn_t *c,
                            const char *doing, int argc, const char **argv,
                            const size_t *argvlen, unsigned expect,
                            apr_time_t deadline, redisReply **reply,
                            apr_pool_t *p, const char **err)
{
    char *cmd = NULL;
    long long len;
    const char *why = NULL;
    apr_status_t rv;

    *reply = NULL;
    if (apr_time_now() >= deadline) /* a half-done exchange: not reusable */
        return io_failed(srv, c, APR_TIMEUP, doing, NULL, p, err);
    len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0 || !cmd) {
        *err = "cannot format a Redis command";
        return APR_ENOMEM;
    }
    rv = cs_store_send(c->net, cmd, (apr_size_t)len, deadline, p, &why);
    redisFreeCommand(cmd);
    if (rv != APR_SUCCESS)
        return io_failed(srv, c, rv, doing, why, p, err);
    rv = read_reply(srv, c, doing, deadline, reply, p, err);
    if (rv != APR_SUCCESS)
        return rv;
    if ((*reply)->type >= 0 && (*reply)->type < 32 &&
        (expect & T((*reply)->type)))
        return APR_SUCCESS;
    if ((*reply)->type == REDIS_REPLY_ERROR)
        rv = error_reply(srv, *reply, doing, p, err);
    else
        rv = misbehaved(
            srv, c, doing,
            apr_psprintf(p, "a reply of the wrong type (%d)", (*reply)->type),
            p, err);
    freeReplyObject(*reply);
    *reply = NULL;
    return rv;
}

static void rd_close(void *conn)
{
    rd_conn_t *c = conn;
    cs_store_conn_close(c->net);
    free(c);
}

/* A new connection to srv, authenticated and on the right database.
 * *unreachable: no connection could be made (refused, or no address). */
static apr_status_t rd_connect(const rd_store_t *rs, const rd_server_t *srv,
                               apr_time_t deadline, rd_conn_t **out,
                               int *unreachable, apr_pool_t *p,
                               const char **err)
{
    rd_conn_t *c = calloc(1, sizeof(*c));
    redisReply *r = NULL;
    const char *why = NULL;
    apr_status_t rv = APR_SUCCESS;

    if (!c) {
        *err = "cannot allocate a Redis connection";
        return APR_ENOMEM;
    }
    rv = cs_store_connect(srv->addrs, deadline, &c->net, unreachable, p, &why);
    if (rv != APR_SUCCESS) {
        free(c);
        *err = rv == APR_TIMEUP
                   ? apr_psprintf(p,
                                  "Redis at %s:%d: no answer to connect "
                                  "within the deadline (%s)",
                                  srv->addr.host, srv->addr.port, why)
                   : apr_psprintf(p, "Redis at %s:%d: %s", srv->addr.host,
                                  srv->addr.port, why);
        return rv;
    }
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
        rv = command(srv, c, "AUTH", argc, argv, argvlen, T(REDIS_REPLY_STATUS),
                     deadline, &r, p, err);
        if (rv == APR_EGENERAL && !c->broken) {
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
        rv = command(srv, c, "SELECT", 2, argv, argvlen, T(REDIS_REPLY_STATUS),
                     deadline, &r, p, err);
    }
    if (r)
        freeReplyObject(r);
    if (rv != APR_SUCCESS) {
        rd_close(c);
        return rv;
    }
    *out = c;
    return APR_SUCCESS;
}

/* Runs one command on srv. A connection taken from the idle set that turns
 * out closed (the server restarted, or dropped it) is replaced once, for
 * commands that may run twice. *unreachable: no connection could be made. */
static apr_status_t rd_call_on(rd_store_t *rs, rd_server_t *srv,
                               const char *doing, int argc, const char **argv,
                               const size_t *argvlen, unsigned expect,
                               int idempotent, apr_time_t deadline,
                               redisReply **reply, int *unreachable,
                               apr_pool_t *p, const char **err)
{
    *unreachable = 0;
    for (int attempt = 0;; attempt++) {
        rd_conn_t *c = cs_conn_idle_take(srv->idle, apr_time_now());
        int reused = c != NULL;
        apr_status_t rv;

        if (c && !cs_store_conn_idle_ok(c->net)) {
            /* closed by the server while idle, or sent what nobody asked
             * for: not used */
            rd_close(c);
            c = NULL;
            reused = 0;
        }
        if (!c) {
            rv = rd_connect(rs, srv, deadline, &c, unreachable, p, err);
            if (rv != APR_SUCCESS)
                return rv;
        }
        rv = command(srv, c, doing, argc, argv, argvlen, expect, deadline,
                     reply, p, err);
        if (!c->broken) {
            cs_conn_idle_give(srv->idle, c, apr_time_now());
            return rv;
        }
        rd_close(c);
        if (!cs_store_conn_lost(rv) || !reused || !idempotent || attempt > 0)
            return rv;
    }
}

/* Runs one command on the server of id, or, while that one refuses
 * connections, on the next in the list. */
static apr_status_t rd_call(rd_store_t *rs, const unsigned char *id,
                            apr_size_t idlen, const char *doing, int argc,
                            const char **argv, const size_t *argvlen,
                            unsigned expect, int idempotent,
                            apr_time_t deadline, redisReply **reply,
                            apr_pool_t *p, const char **err)
{
    int first = cs_store_pick(id, idlen, rs->nservers), unreachable = 0;
    apr_status_t rv = APR_EGENERAL;

    deadline = cs_store_deadline(deadline, rs->timeout);
    for (int k = 0; k < rs->nservers; k++) {
        rd_server_t *srv = &rs->servers[(first + k) % rs->nservers];
        int last = k + 1 == rs->nservers;
        if (!last && apr_time_now() < srv->down_until)
            continue;
        rv = rd_call_on(rs, srv, doing, argc, argv, argvlen, expect, idempotent,
                        deadline, reply, &unreachable, p, err);
        if (!unreachable || last)
            return rv;
        srv->down_until = apr_time_now() + RD_DOWN_TIME;
    }
    return rv;
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

    rv = rd_call(rs, id, idlen, "GET", 2, argv, argvlen,
                 T(REDIS_REPLY_STRING) | T(REDIS_REPLY_NIL), 1, deadline, &r, p,
                 err);
    if (rv != APR_SUCCESS)
        return rv;
    if (r->type == REDIS_REPLY_NIL)
        rv = APR_NOTFOUND;
    else if ((apr_size_t)r->len > *len) {
        *err = apr_psprintf(p,
                            "Redis: an entry of %lu bytes is larger than "
                            "the %lu bytes expected",
                            (unsigned long)r->len, (unsigned long)*len);
        rv = APR_ENOSPC;
    }
    else {
        memcpy(buf, r->str, (apr_size_t)r->len);
        *len = (apr_size_t)r->len;
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

    if (len > CS_STORE_VALUE_MAX) {
        *err = "a value larger than a store entry can be";
        return APR_EINVAL;
    }
    rv = rd_call(rs, id, idlen, nx ? "SET NX" : "SET", nx ? 6 : 5, argv,
                 argvlen, T(REDIS_REPLY_STATUS) | (nx ? T(REDIS_REPLY_NIL) : 0),
                 !nx, deadline, &r, p, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (r->type == REDIS_REPLY_NIL)
        rv = APR_EEXIST;
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

    rv = rd_call(rs, id, idlen, "EVAL", 5, argv, argvlen,
                 T(REDIS_REPLY_INTEGER), 1, deadline, &r, p, err);
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
        if (rv == APR_SUCCESS)
            rv = cs_store_addrs_create(p, &rs->servers[i].addr,
                                       &rs->servers[i].addrs, err);
        if (rv != APR_SUCCESS)
            return rv;
    }
    rs->st.ops = &rd_ops;
    rs->st.impl = rs;
    *st = &rs->st;
    return APR_SUCCESS;
}
