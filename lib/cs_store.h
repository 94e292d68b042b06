/*
 * mod_cardscan token stores: where sealed entries live. One interface for
 * every backend, so the serving path never knows which one it talks to:
 * shmcb through httpd's socache for one server (in mod_cardscan.c, which
 * owns the httpd side), Redis and memcached for a fleet
 * (lib/cs_store_redis.c, lib/cs_store_memcache.c, over the sockets of
 * lib/cs_store.c).
 *
 * Every operation takes an absolute deadline (apr_time_t), and the fleet
 * backends bound the whole operation by it (the earlier of it and now +
 * their own timeout): name lookup aside (see lib/cs_store.c), connecting,
 * sending and every byte of the reply end by then, or the operation gives
 * up with APR_TIMEUP and the caller goes on as if the store had missed.
 * Operations are called from many threads of one process at once (worker
 * and event MPMs, the refresh threads): a backend keeps its own
 * per-process connections and is safe to call concurrently. A backend
 * never connects in the parent process: connections are opened lazily, in
 * the child that uses them, and never cross a fork.
 *
 * Statuses. The caller (the shell) starts its back-off, leaving the store
 * alone for a while, on any status but the first four:
 *   APR_SUCCESS    done;
 *   APR_NOTFOUND   get: no entry (absent or expired) - a real answer of
 *                  the server, never a failure in disguise;
 *   APR_EEXIST     add: the key holds a value already;
 *   APR_ENOLOCK    shmcb only: the store is going away (a graceful restart
 *                  replaced it); treated as a miss, not a failure;
 *   APR_TIMEUP     the deadline passed (connecting, sending or reading);
 *   APR_EACCES     the server refused our credentials or permissions: the
 *                  caller names it once in the error log;
 *   APR_ENOSPC     get: the entry is larger than the caller's buffer (for
 *                  shmcb, put: no room);
 *   APR_EINVAL     an id or a value the store cannot take (the caller's
 *                  bug: nothing was sent);
 *   APR_EGENERAL   the server misbehaved: garbage, a reply of the wrong
 *                  type, a protocol error, a reply announcing more than
 *                  CS_STORE_VALUE_MAX bytes (refused by its header), a reply
 *                  nobody asked for, an error reply; or a name that cannot
 *                  be looked up;
 *   APR_EOF, other OS errors (ECONNREFUSED, ECONNRESET ...): the server
 *                  closed the connection, or it could not be made.
 * After a timeout, a socket error or a misbehaving server the connection
 * is closed, and the next operation opens a new one; after an error reply
 * or APR_ENOSPC (the exchange completed in step) it is kept. On every status
 * but APR_SUCCESS, APR_NOTFOUND and APR_EEXIST, *err is set to a message safe
 * to log (never a secret, never an entry's content).
 */
#ifndef CS_STORE_H
#define CS_STORE_H

#include <apr_pools.h>
#include <apr_time.h>

/* The largest value a store is asked to hold. A fleet server's reply
 * announcing a larger value is refused when its header is read, before any
 * of the value is buffered. */
#define CS_STORE_VALUE_MAX (16 * 1024)
/* The largest reply to one operation: a value and its framing (the key,
 * lengths and end markers of the Redis and memcached protocols). */
#define CS_STORE_REPLY_MAX (CS_STORE_VALUE_MAX + 512)

typedef struct cs_store cs_store_t;

typedef struct cs_store_ops {
    const char *name; /* "shmcb", "redis", "memcache" */

    /* Reads the value of id into buf (capacity *len); *len is set to its
     * length. APR_NOTFOUND when absent or expired. */
    apr_status_t (*get)(cs_store_t *st, const unsigned char *id,
                        apr_size_t idlen, unsigned char *buf, apr_size_t *len,
                        apr_time_t deadline, apr_pool_t *p, const char **err);

    /* Stores (replaces) the value of id until `expiry` (absolute). */
    apr_status_t (*put)(cs_store_t *st, const unsigned char *id,
                        apr_size_t idlen, const unsigned char *val,
                        apr_size_t len, apr_time_t expiry, apr_time_t deadline,
                        apr_pool_t *p, const char **err);

    /* Stores val under id only if id holds nothing (Redis SET NX PX,
     * memcached add): APR_SUCCESS when stored, APR_EEXIST when another
     * value is there. The value lives until `expiry`. This is the lock of
     * single flight: it must be atomic across every process and server
     * that shares the store. */
    apr_status_t (*add)(cs_store_t *st, const unsigned char *id,
                        apr_size_t idlen, const unsigned char *val,
                        apr_size_t len, apr_time_t expiry, apr_time_t deadline,
                        apr_pool_t *p, const char **err);

    /* Removes id if it still holds exactly val (a lock released by its
     * owner only; a backend that cannot compare atomically compares and
     * then removes). APR_SUCCESS also when id is absent or holds another
     * value. */
    apr_status_t (*release)(cs_store_t *st, const unsigned char *id,
                            apr_size_t idlen, const unsigned char *val,
                            apr_size_t len, apr_time_t deadline, apr_pool_t *p,
                            const char **err);
} cs_store_ops_t;

struct cs_store {
    const cs_store_ops_t *ops;
    void *impl;
};

/* ------------------------------------------------------- fleet backends */

/* Options shared by the fleet backends. */
typedef struct cs_store_opts {
    apr_interval_time_t timeout; /* connect and each operation, at most */
    const char *username;        /* Redis ACL user, or NULL */
    const char *password;        /* Redis AUTH secret, or NULL: never log */
} cs_store_opts_t;

/* CardScanCacheAuth [username] secret: a1 is the secret when a2 is NULL,
 * else the username. The secret is loaded with cs_secret_load
 * (lib/cardscan.h): "file:/path", "env:NAME" or a literal; never empty. */
apr_status_t cs_store_auth_load(apr_pool_t *p, const char *a1, const char *a2,
                                const char **username, const char **password,
                                const char **warning, const char **err);

/* "host:port[,host:port...][/db]" (Redis; db defaults to 0) and
 * "host:port[,host:port...]" (memcached), as given after "redis:" or
 * "memcache:" in CardScanCache. The spec is checked and the store made in
 * the parent (no connection yet); p must live as long as the store. */
apr_status_t cs_store_redis_create(apr_pool_t *p, const char *spec,
                                   const cs_store_opts_t *opts, cs_store_t **st,
                                   const char **err);
apr_status_t cs_store_memcache_create(apr_pool_t *p, const char *spec,
                                      const cs_store_opts_t *opts,
                                      cs_store_t **st, const char **err);

/* What the two creates say (with APR_ENOTIMPL) in a build without the
 * client library (lib/cs_store_none.c). */
#define CS_STORE_NONE_REDIS_MSG                                                \
    "this mod_cardscan was built without hiredis (configure "                  \
    "--without-hiredis): rebuild it with hiredis (RHEL: dnf install "          \
    "hiredis-devel from EPEL; Debian/Ubuntu: apt-get install libhiredis-dev) " \
    "to use CardScanCache redis:..."
#define CS_STORE_NONE_MEMCACHE_MSG                                             \
    "this mod_cardscan was built without libmemcached (configure "             \
    "--without-libmemcached): rebuild it with libmemcached (RHEL 8: dnf "      \
    "install libmemcached-devel; RHEL 9: dnf install "                         \
    "libmemcached-awesome-devel from CRB; Debian/Ubuntu: apt-get install "     \
    "libmemcached-dev) to use CardScanCache memcache:..."

#endif /* CS_STORE_H */
