/*
 * What the fleet-cache backends (lib/cs_store_redis.c,
 * lib/cs_store_memcache.c) share: the server-list syntax, deadlines, keys
 * and a per-process set of idle connections. Private to lib/ and its tests.
 */
#ifndef CS_STORE_BACKEND_H
#define CS_STORE_BACKEND_H

#include "cs_store.h"

#include <apr_thread_mutex.h>
#include <netdb.h>

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

/* ------------------------------------------------------------ sockets */

/* The addresses of one server, looked up once per process and kept (see
 * cs_store_addrs_get in lib/cs_store.c for when they are looked up again
 * and what bounds a lookup). */
typedef struct cs_store_addrs cs_store_addrs_t;

/* how often a name may be looked up again, at most, after a connection to
 * its addresses failed (or its lookup did) */
#define CS_STORE_LOOKUP_EVERY apr_time_from_sec(30)

/* at most this many addresses of a name are tried */
#define CS_STORE_ADDRS_MAX 8

/* Made in the parent, before any lookup: a numeric address (127.0.0.1,
 * ::1, fe80::1%eth0) is converted here and never goes to the resolver. */
apr_status_t cs_store_addrs_create(apr_pool_t *p, const cs_store_server_t *srv,
                                   cs_store_addrs_t **out, const char **err);

/* The resolver the stores call: getaddrinfo(3), replaced by tests. */
extern int (*cs_store_getaddrinfo)(const char *node, const char *service,
                                   const struct addrinfo *hints,
                                   struct addrinfo **res);

/* One connection: a non-blocking socket and what has been read from it and
 * not yet consumed. Every wait is a poll(2) against the operation's
 * deadline, so a whole operation ends by its deadline whatever the server
 * sends and however slowly. */
typedef struct cs_store_conn {
    int fd;
    apr_size_t off, len; /* buf[off..len): read, not consumed */
    char buf[CS_STORE_REPLY_MAX];
} cs_store_conn_t;

/* Connects to one of the addresses of a (tried in turn) by deadline.
 * Statuses: APR_SUCCESS; APR_TIMEUP (the deadline passed, a lookup in
 * another thread included); another status when no address accepted the
 * connection or the name could not be looked up (*unreachable is then
 * set: the server's host refuses, or does not exist). *why: what failed,
 * for a message. */
apr_status_t cs_store_connect(cs_store_addrs_t *a, apr_time_t deadline,
                              cs_store_conn_t **out, int *unreachable,
                              apr_pool_t *p, const char **why);
void cs_store_conn_close(cs_store_conn_t *c);

/* Whether an idle connection may be used: nothing to read on it (neither
 * data nobody asked for nor the server's end of the connection). */
int cs_store_conn_idle_ok(cs_store_conn_t *c);

/* Sends all of data by deadline. Statuses: APR_SUCCESS, APR_TIMEUP, or
 * the socket's error. */
apr_status_t cs_store_send(cs_store_conn_t *c, const char *data, apr_size_t len,
                           apr_time_t deadline, apr_pool_t *p,
                           const char **why);

/* The next line (without its CRLF), at most max bytes: a longer one is
 * refused as soon as max bytes without a CRLF are read (APR_EGENERAL).
 * The line is valid until the next read from c. APR_EOF: the server closed
 * the connection; APR_TIMEUP: the deadline passed. */
apr_status_t cs_store_line(cs_store_conn_t *c, apr_size_t max,
                           apr_time_t deadline, const char **line,
                           apr_size_t *len, apr_pool_t *p, const char **why);

/* The next n bytes (n <= CS_STORE_REPLY_MAX), with the same statuses. */
apr_status_t cs_store_bytes(cs_store_conn_t *c, apr_size_t n,
                            apr_time_t deadline, const char **data,
                            apr_pool_t *p, const char **why);

/* Whether a failure is a connection the server closed (or reset): an idle
 * connection reused that meets it may be replaced once, for an operation
 * that may run twice. */
int cs_store_conn_lost(apr_status_t rv);

/* Whether everything read has been consumed: more bytes after a complete
 * reply are a reply nobody asked for. */
#define cs_store_conn_drained(c) ((c)->off == (c)->len)

/* Parses a decimal number of at most max: APR_SUCCESS, else APR_EGENERAL
 * (not digits) or APR_ENOSPC (larger than max) without reading further. */
apr_status_t cs_store_parse_size(const char *s, apr_size_t len, apr_size_t max,
                                 apr_size_t *out);

#endif /* CS_STORE_BACKEND_H */
