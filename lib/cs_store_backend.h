/*
 * What the fleet-cache backends (lib/cs_store_redis.c,
 * lib/cs_store_memcache.c) share: the server-list syntax, deadlines, keys
 * and a per-process set of idle connections. Private to lib/ and its tests.
 */
#ifndef CS_STORE_BACKEND_H
#define CS_STORE_BACKEND_H

#include "cs_store.h"

#include <apr_thread_mutex.h>

/* at most this many servers in one CardScanCache spec */
#define CS_STORE_SERVERS_MAX 16
/* ids longer than this are refused (memcached keys are at most 250 bytes) */
#define CS_STORE_ID_MAX 64
/* every key in the server: this prefix, then the id in hex */
#define CS_STORE_KEY_PREFIX "cardscan:"
#define CS_STORE_KEY_MAX (sizeof(CS_STORE_KEY_PREFIX) + 2 * CS_STORE_ID_MAX)
/* an idle connection older than this is closed rather than reused, so that
 * a firewall that forgets quiet connections never stalls an operation */
#define CS_STORE_IDLE_MAX_AGE apr_time_from_sec(30)
/* idle connections kept per server and process */
#define CS_STORE_IDLE_MAX 32

typedef struct cs_store_server {
    const char *host; /* a name, an IPv4 address or an IPv6 one (no []) */
    int port;
} cs_store_server_t;

typedef struct cs_store_spec {
    cs_store_server_t servers[CS_STORE_SERVERS_MAX];
    int nservers;
    int db; /* Redis database number; 0 unless "/db" was given */
} cs_store_spec_t;

/* Parses "host[:port][,host[:port]...][/db]"; hosts may be "[v6addr]".
 * "/db" only when allow_db. */
apr_status_t cs_store_spec_parse(apr_pool_t *p, const char *spec,
                                 int default_port, int allow_db,
                                 cs_store_spec_t *out, const char **err);

/* The earlier of the caller's deadline and now + timeout (timeout 0: the
 * caller's deadline alone). */
apr_time_t cs_store_deadline(apr_time_t deadline, apr_interval_time_t timeout);

/* The key of id: CS_STORE_KEY_PREFIX and the id in lower-case hex, NUL
 * terminated, in out (CS_STORE_KEY_MAX bytes); returns its length, or 0
 * when the id is empty or longer than CS_STORE_ID_MAX. */
apr_size_t cs_store_key(char *out, const unsigned char *id, apr_size_t idlen);

/* Which of n servers holds id: the same answer on every server of a fleet
 * that lists the same servers in the same order. */
int cs_store_pick(const unsigned char *id, apr_size_t idlen, int n);

/* Milliseconds from now to expiry, rounded up, at least 1. */
apr_int64_t cs_store_ttl_ms(apr_time_t expiry, apr_time_t now);

/* A mutex-guarded set of idle connections of one process: a thread takes
 * one (or none: it opens a new one), uses it alone, and gives it back when
 * it is still good. Connections inherited over fork() are never used (the
 * parent never opens any, but a child must not share a socket). */
typedef struct cs_conn_idle cs_conn_idle_t;

apr_status_t cs_conn_idle_create(apr_pool_t *p, void (*close)(void *conn),
                                 cs_conn_idle_t **out, const char **err);
/* an idle connection, or NULL */
void *cs_conn_idle_take(cs_conn_idle_t *set, apr_time_t now);
void cs_conn_idle_give(cs_conn_idle_t *set, void *conn, apr_time_t now);

#endif /* CS_STORE_BACKEND_H */
