/* The parts the fleet-cache backends share: the server list of
 * CardScanCache, CardScanCacheAuth, deadlines, keys, the choice of a
 * server, and a per-process set of idle connections. */
#include "cardscan.h"
#include "cs_store_backend.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_thread_cond.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define DB_MAX 1000000

static apr_status_t parse_port(apr_pool_t *p, const char *s, int *port,
                               const char **err)
{
    apr_int64_t v = 0;
    const char *c;
    for (c = s; *c && apr_isdigit(*c) && v <= 65535; c++)
        v = v * 10 + (*c - '0');
    if (!*s || *c || v < 1 || v > 65535) {
        *err = apr_psprintf(p, "'%s' is not a port number (1 to 65535)", s);
        return APR_EINVAL;
    }
    *port = (int)v;
    return APR_SUCCESS;
}

static apr_status_t parse_server(apr_pool_t *p, char *s, int default_port,
                                 cs_store_server_t *srv, const char **err)
{
    char *host = s, *port = NULL, *c;

    if (*s == '[') {
        char *end = strchr(s, ']');
        if (!end) {
            *err = apr_psprintf(p, "'%s' lacks the ']' closing its address", s);
            return APR_EINVAL;
        }
        *end = '\0';
        host = s + 1;
        if (end[1] == ':')
            port = end + 2;
        else if (end[1]) {
            *err = apr_psprintf(p, "unexpected '%s' after ']'", end + 1);
            return APR_EINVAL;
        }
    }
    else {
        port = strchr(s, ':');
        if (port && strchr(port + 1, ':')) {
            *err = apr_psprintf(p,
                                "'%s': write an IPv6 address in brackets, "
                                "as in [::1]:%d",
                                s, default_port);
            return APR_EINVAL;
        }
        if (port)
            *port++ = '\0';
    }
    if (!*host) {
        *err = "a server has no host name";
        return APR_EINVAL;
    }
    for (c = host; *c; c++) {
        if (!apr_isalnum(*c) && !strchr(".-_:%", *c)) {
            *err = apr_psprintf(p, "'%s' is not a host name or address", host);
            return APR_EINVAL;
        }
    }
    srv->host = host;
    srv->port = default_port;
    return port ? parse_port(p, port, &srv->port, err) : APR_SUCCESS;
}

apr_status_t cs_store_spec_parse(apr_pool_t *p, const char *spec,
                                 int default_port, int allow_db,
                                 cs_store_spec_t *out, const char **err)
{
    char *s, *slash, *item, *last;
    apr_status_t rv;

    memset(out, 0, sizeof(*out));
    if (!spec || !*spec) {
        *err = "no server given: host[:port][,host[:port]...]";
        return APR_EINVAL;
    }
    if (strchr(spec, '@')) {
        /* perhaps a URL with a password: never repeat it */
        *err = "a server list has no '@': give the password with "
               "CardScanCacheAuth";
        return APR_EINVAL;
    }
    if (strstr(spec, ",,") || *spec == ',') {
        *err = "a server list has an empty item (two commas)";
        return APR_EINVAL;
    }
    s = apr_pstrdup(p, spec);
    slash = strchr(s, '/');
    if (slash) {
        const char *c;
        apr_int64_t db = 0;
        if (!allow_db) {
            *err = "memcached has no database numbers: remove the '/...'";
            return APR_EINVAL;
        }
        *slash++ = '\0';
        for (c = slash; *c && apr_isdigit(*c) && db <= DB_MAX; c++)
            db = db * 10 + (*c - '0');
        if (!*slash || *c || db > DB_MAX) {
            *err = apr_psprintf(p,
                                "'/%s': the database number is a whole "
                                "number, 0 (the default) or more",
                                slash);
            return APR_EINVAL;
        }
        out->db = (int)db;
    }
    if (!*s || s[strlen(s) - 1] == ',') {
        *err = "a server list ends with a host[:port], not a comma";
        return APR_EINVAL;
    }
    for (item = apr_strtok(s, ",", &last); item;
         item = apr_strtok(NULL, ",", &last)) {
        if (out->nservers == CS_STORE_SERVERS_MAX) {
            *err =
                apr_psprintf(p, "more than %d servers", CS_STORE_SERVERS_MAX);
            return APR_EINVAL;
        }
        rv = parse_server(p, item, default_port, &out->servers[out->nservers],
                          err);
        if (rv != APR_SUCCESS)
            return rv;
        out->nservers++;
    }
    return APR_SUCCESS;
}

apr_status_t cs_store_auth_load(apr_pool_t *p, const char *a1, const char *a2,
                                const char **username, const char **password,
                                const char **warning, const char **err)
{
    const char *spec = a2 ? a2 : a1;
    char *secret;
    apr_status_t rv;

    *username = NULL;
    if (a2) {
        if (!*a1) {
            *err = "the username is empty";
            return APR_EINVAL;
        }
        for (const char *c = a1; *c; c++) {
            if (apr_isspace(*c) || apr_iscntrl(*c)) {
                *err = "the username contains a blank or a control "
                       "character";
                return APR_EINVAL;
            }
        }
        *username = apr_pstrdup(p, a1);
    }
    rv = cs_secret_load(p, spec, "cache password", &secret, warning, err);
    if (rv != APR_SUCCESS)
        return rv;
    if (!*secret) {
        *err = "the cache password is empty";
        return APR_EINVAL;
    }
    *password = secret;
    return APR_SUCCESS;
}

apr_time_t cs_store_deadline(apr_time_t deadline, apr_interval_time_t timeout)
{
    if (timeout > 0) {
        apr_time_t mine = apr_time_now() + timeout;
        if (mine < deadline)
            return mine;
    }
    return deadline;
}

apr_size_t cs_store_key(char *out, const unsigned char *id, apr_size_t idlen)
{
    static const char hex[] = "0123456789abcdef";
    apr_size_t n = sizeof(CS_STORE_KEY_PREFIX) - 1;

    if (idlen == 0 || idlen > CS_STORE_ID_MAX)
        return 0;
    memcpy(out, CS_STORE_KEY_PREFIX, n);
    for (apr_size_t i = 0; i < idlen; i++) {
        out[n++] = hex[id[i] >> 4];
        out[n++] = hex[id[i] & 15];
    }
    out[n] = '\0';
    return n;
}

int cs_store_pick(const unsigned char *id, apr_size_t idlen, int n)
{
    /* FNV-1a: ids are HMACs already, this only has to be stable */
    apr_uint32_t h = 2166136261u;
    for (apr_size_t i = 0; i < idlen; i++) {
        h ^= id[i];
        h *= 16777619u;
    }
    return n > 1 ? (int)(h % (apr_uint32_t)n) : 0;
}

apr_int64_t cs_store_ttl_ms(apr_time_t expiry, apr_time_t now)
{
    apr_int64_t left = expiry - now;
    apr_int64_t ms = (left + 999) / 1000;
    return ms < 1 ? 1 : ms;
}

/* ------------------------------------------------------ idle connections */

struct cs_conn_idle {
    apr_thread_mutex_t *mu;
    void (*close)(void *conn);
    pid_t pid; /* the process the connections belong to */
    int base;  /* idle[0..base): inherited over fork(), never used */
    int n;
    struct {
        void *conn;
        apr_time_t since;
    } idle[CS_STORE_IDLE_MAX];
};

static apr_status_t idle_cleanup(void *data)
{
    cs_conn_idle_t *set = data;
    /* only the process that opened them closes them */
    if (set->pid == getpid())
        for (int i = set->base; i < set->n; i++)
            set->close(set->idle[i].conn);
    set->n = set->base;
    return APR_SUCCESS;
}

apr_status_t cs_conn_idle_create(apr_pool_t *p, void (*close)(void *conn),
                                 cs_conn_idle_t **out, const char **err)
{
    cs_conn_idle_t *set = apr_pcalloc(p, sizeof(*set));
    apr_status_t rv;

    rv = apr_thread_mutex_create(&set->mu, APR_THREAD_MUTEX_DEFAULT, p);
    if (rv != APR_SUCCESS) {
        *err = "cannot create the mutex of a connection pool";
        return rv;
    }
    set->close = close;
    set->pid = getpid();
    apr_pool_cleanup_register(p, set, idle_cleanup, apr_pool_cleanup_null);
    *out = set;
    return APR_SUCCESS;
}

/* Under the mutex: forget what another process (the parent) left. */
static void idle_adopt(cs_conn_idle_t *set)
{
    pid_t me = getpid();
    if (set->pid != me) {
        /* the parent's sockets: never used nor closed here (closing could
         * tell the server goodbye on the parent's behalf) */
        set->base = set->n;
        set->pid = me;
    }
}

void *cs_conn_idle_take(cs_conn_idle_t *set, apr_time_t now)
{
    void *conn = NULL;

    apr_thread_mutex_lock(set->mu);
    idle_adopt(set);
    while (set->n > set->base && !conn) {
        set->n--;
        conn = set->idle[set->n].conn;
        if (now - set->idle[set->n].since > CS_STORE_IDLE_MAX_AGE) {
            set->close(conn);
            conn = NULL;
        }
    }
    apr_thread_mutex_unlock(set->mu);
    return conn;
}

void cs_conn_idle_give(cs_conn_idle_t *set, void *conn, apr_time_t now)
{
    apr_thread_mutex_lock(set->mu);
    idle_adopt(set);
    if (set->n < CS_STORE_IDLE_MAX) {
        set->idle[set->n].conn = conn;
        set->idle[set->n].since = now;
        set->n++;
        conn = NULL;
    }
    apr_thread_mutex_unlock(set->mu);
    if (conn)
        set->close(conn);
}

/* --------------------------------------------------------------- lookups */

int (*cs_store_getaddrinfo)(const char *node, const char *service,
                            const struct addrinfo *hints,
                            struct addrinfo **res) = getaddrinfo;

typedef struct cs_store_addr {
    struct sockaddr_storage sa;
    socklen_t len;
} cs_store_addr_t;

struct cs_store_addrs {
    const char *host, *port;
    apr_thread_mutex_t *mu;
    apr_thread_cond_t *looked_up_cv; /* a lookup ended */
    int numeric;                     /* an address: never looked up */
    int n;
    cs_store_addr_t addr[CS_STORE_ADDRS_MAX];
    apr_time_t looked_up; /* when the last lookup ended; 0: never */
    int stale;            /* no address took a connection since */
    int busy;             /* a thread is looking the name up */
    int gai_err;          /* the last lookup's error, or 0 */
};

/* Copies what getaddrinfo found (at most CS_STORE_ADDRS_MAX) into a. */
static void addrs_keep(cs_store_addrs_t *a, const struct addrinfo *res)
{
    a->n = 0;
    for (; res && a->n < CS_STORE_ADDRS_MAX; res = res->ai_next) {
        if (res->ai_addrlen > sizeof(a->addr[0].sa))
            continue;
        memcpy(&a->addr[a->n].sa, res->ai_addr, res->ai_addrlen);
        a->addr[a->n].len = res->ai_addrlen;
        a->n++;
    }
}

static apr_status_t addrs_cleanup(void *data)
{
    cs_store_addrs_t *a = data;
    apr_thread_cond_destroy(a->looked_up_cv);
    return APR_SUCCESS;
}

apr_status_t cs_store_addrs_create(apr_pool_t *p, const cs_store_server_t *srv,
                                   cs_store_addrs_t **out, const char **err)
{
    cs_store_addrs_t *a = apr_pcalloc(p, sizeof(*a));
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *res = NULL;

    a->host = srv->host;
    a->port = apr_itoa(p, srv->port);
    if (apr_thread_mutex_create(&a->mu, APR_THREAD_MUTEX_DEFAULT, p) ||
        apr_thread_cond_create(&a->looked_up_cv, p)) {
        *err = "cannot create the mutex of a server's addresses";
        return APR_ENOMEM;
    }
    apr_pool_cleanup_register(p, a, addrs_cleanup, apr_pool_cleanup_null);
    /* AI_NUMERICHOST: converted here, without the resolver */
    if (getaddrinfo(a->host, a->port, &hints, &res) == 0) {
        addrs_keep(a, res);
        freeaddrinfo(res);
        a->numeric = a->n > 0;
    }
    *out = a;
    return APR_SUCCESS;
}

/* The addresses to try, in out (CS_STORE_ADDRS_MAX), by deadline.
 *
 * A name is looked up on first use in a process, then only after no
 * address of it took a connection (or after a failed lookup), and then at
 * most once every CS_STORE_LOOKUP_EVERY: a slow or failing resolver is met
 * that rarely, never on every reconnect. A name that moves (a DNS
 * failover) is followed once the old address stops taking connections.
 *
 * What bounds a lookup: getaddrinfo(3) has no deadline, so the one thread
 * that looks a name up waits as long as the resolver does: for DNS, the
 * "timeout" (5 s by default) and "attempts" (2) options of
 * /etc/resolv.conf, per nameserver listed there, and per address family
 * asked for (names in /etc/hosts, by nsswitch.conf, never wait). Other
 * threads that need the addresses meanwhile use the ones already known, or,
 * when none is known yet, wait for the lookup at most until their own
 * deadline. Numeric addresses never go to the resolver. */
static apr_status_t addrs_get(cs_store_addrs_t *a, apr_time_t deadline,
                              cs_store_addr_t *out, int *n, apr_pool_t *p,
                              const char **why)
{
    apr_status_t rv = APR_SUCCESS;

    apr_thread_mutex_lock(a->mu);
    for (;;) {
        apr_time_t now = apr_time_now();
        int due =
            !a->numeric && !a->busy &&
            (!a->looked_up || ((a->stale || !a->n) &&
                               now - a->looked_up >= CS_STORE_LOOKUP_EVERY));
        if (due) {
            struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                                     .ai_flags = AI_NUMERICSERV};
            struct addrinfo *res = NULL;
            int gai;
            a->busy = 1;
            apr_thread_mutex_unlock(a->mu);
            gai = cs_store_getaddrinfo(a->host, a->port, &hints, &res);
            apr_thread_mutex_lock(a->mu);
            if (gai == 0) {
                addrs_keep(a, res);
                freeaddrinfo(res);
                a->stale = 0;
            }
            /* else: the addresses known before, if any, are kept */
            a->gai_err = gai;
            a->looked_up = apr_time_now();
            a->busy = 0;
            apr_thread_cond_broadcast(a->looked_up_cv);
            continue;
        }
        if (a->n > 0)
            break;
        if (!a->busy) {
            *why = apr_psprintf(p,
                                "cannot look up %s: %s (looked up again "
                                "within %d s)",
                                a->host, gai_strerror(a->gai_err),
                                (int)apr_time_sec(CS_STORE_LOOKUP_EVERY));
            rv = APR_EGENERAL;
            break;
        }
        /* another thread is looking the name up: wait for it, at most
         * until this operation's deadline */
        if (deadline <= now || APR_STATUS_IS_TIMEUP(apr_thread_cond_timedwait(
                                   a->looked_up_cv, a->mu, deadline - now))) {
            if (a->n > 0)
                break;
            *why = apr_psprintf(p,
                                "looking up %s took longer than the "
                                "deadline",
                                a->host);
            rv = APR_TIMEUP;
            break;
        }
    }
    if (rv == APR_SUCCESS) {
        memcpy(out, a->addr, sizeof(a->addr[0]) * (apr_size_t)a->n);
        *n = a->n;
    }
    apr_thread_mutex_unlock(a->mu);
    return rv;
}

/* No address took a connection: look the name up again when next due. */
static void addrs_failed(cs_store_addrs_t *a)
{
    apr_thread_mutex_lock(a->mu);
    a->stale = 1;
    apr_thread_mutex_unlock(a->mu);
}

/* --------------------------------------------------------------- sockets */

/* Waits until fd is ready for events, at most until deadline. */
static apr_status_t wait_for(int fd, short events, apr_time_t deadline)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = events};
        apr_time_t left = deadline - apr_time_now();
        apr_int64_t ms;
        int n;
        if (left <= 0)
            return APR_TIMEUP;
        ms = (left + 999) / 1000;
        n = poll(&pfd, 1, ms > INT_MAX ? INT_MAX : (int)ms);
        if (n > 0)
            return APR_SUCCESS; /* ready, or an error the next call meets */
        if (n < 0 && errno != EINTR)
            return APR_FROM_OS_ERROR(errno);
    }
}

static const char *os_error(apr_status_t rv, apr_pool_t *p)
{
    char buf[120];
    return apr_pstrdup(p, apr_strerror(rv, buf, sizeof(buf)));
}

/* One address: a connected non-blocking socket in *fd. */
static apr_status_t connect_one(const cs_store_addr_t *addr,
                                apr_time_t deadline, int *fd)
{
    int one = 1, soerr = 0;
    socklen_t len = sizeof(soerr);
    apr_status_t rv = APR_SUCCESS;
    int s = socket(addr->sa.ss_family,
                   SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (s < 0)
        return APR_FROM_OS_ERROR(errno);
    if (connect(s, (const struct sockaddr *)&addr->sa, addr->len) != 0) {
        if (errno != EINPROGRESS)
            rv = APR_FROM_OS_ERROR(errno);
        else if ((rv = wait_for(s, POLLOUT, deadline)) == APR_SUCCESS) {
            if (getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0)
                rv = APR_FROM_OS_ERROR(errno);
            else if (soerr)
                rv = APR_FROM_OS_ERROR(soerr);
        }
    }
    if (rv != APR_SUCCESS) {
        close(s);
        return rv;
    }
    /* one write per command; and notice a peer that vanished */
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    *fd = s;
    return APR_SUCCESS;
}

apr_status_t cs_store_connect(cs_store_addrs_t *a, apr_time_t deadline,
                              cs_store_conn_t **out, int *unreachable,
                              apr_pool_t *p, const char **why)
{
    cs_store_addr_t addrs[CS_STORE_ADDRS_MAX];
    int n = 0, fd = -1;
    apr_status_t rv;

    *unreachable = 0;
    rv = addrs_get(a, deadline, addrs, &n, p, why);
    if (rv != APR_SUCCESS) {
        *unreachable = rv != APR_TIMEUP;
        return rv;
    }
    /* each address in turn (a name may have an IPv6 and an IPv4 one): one
     * that refuses costs nothing, one that does not answer costs what is
     * left of the deadline */
    for (int i = 0; i < n; i++) {
        rv = connect_one(&addrs[i], deadline, &fd);
        if (rv == APR_SUCCESS || rv == APR_TIMEUP)
            break;
    }
    if (rv != APR_SUCCESS) {
        addrs_failed(a);
        *unreachable = rv != APR_TIMEUP;
        *why = rv == APR_TIMEUP
                   ? "connect: no answer within the deadline"
                   : apr_pstrcat(p, "connect failed: ", os_error(rv, p), NULL);
        return rv;
    }
    *out = malloc(sizeof(**out));
    if (!*out) {
        close(fd);
        *why = "cannot allocate a connection";
        return APR_ENOMEM;
    }
    (*out)->fd = fd;
    (*out)->off = (*out)->len = 0;
    return APR_SUCCESS;
}

void cs_store_conn_close(cs_store_conn_t *c)
{
    if (c) {
        close(c->fd);
        free(c);
    }
}

int cs_store_conn_lost(apr_status_t rv)
{
    return rv == APR_EOF || APR_STATUS_IS_ECONNRESET(rv) ||
           rv == APR_FROM_OS_ERROR(EPIPE);
}

int cs_store_conn_idle_ok(cs_store_conn_t *c)
{
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    return cs_store_conn_drained(c) && poll(&pfd, 1, 0) == 0;
}

/* After a send or recv that moved nothing (errno says why): waits until
 * the socket is ready again (APR_SUCCESS: try again), or says why not. */
static apr_status_t io_wait(int fd, short events, apr_time_t deadline,
                            apr_pool_t *p, const char **why)
{
    apr_status_t rv;
    if (errno == EINTR)
        return APR_SUCCESS;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
        rv = APR_FROM_OS_ERROR(errno);
        *why = apr_pstrcat(p, events == POLLIN ? "receive" : "send",
                           " failed: ", os_error(rv, p), NULL);
        return rv;
    }
    rv = wait_for(fd, events, deadline);
    if (rv == APR_TIMEUP)
        *why = events == POLLIN ? "no answer within the deadline"
                                : "no room to send within the deadline";
    else if (rv != APR_SUCCESS)
        *why = os_error(rv, p);
    return rv;
}

apr_status_t cs_store_send(cs_store_conn_t *c, const char *data, apr_size_t len,
                           apr_time_t deadline, apr_pool_t *p, const char **why)
{
    while (len > 0) {
        /* MSG_NOSIGNAL: a closed connection is an error, not a SIGPIPE */
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        apr_status_t rv;
        if (n > 0) {
            data += n;
            len -= (apr_size_t)n;
            continue;
        }
        if (n == 0)
            errno = EAGAIN;
        rv = io_wait(c->fd, POLLOUT, deadline, p, why);
        if (rv != APR_SUCCESS)
            return rv;
    }
    return APR_SUCCESS;
}

/* Reads what the server sent, at least one byte, by deadline. */
static apr_status_t fill(cs_store_conn_t *c, apr_time_t deadline, apr_pool_t *p,
                         const char **why)
{
    if (c->off > 0) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->len == sizeof(c->buf)) { /* the callers never ask for more */
        *why = "a reply larger than any reply of this store";
        return APR_EGENERAL;
    }
    for (;;) {
        ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        apr_status_t rv;
        if (n > 0) {
            c->len += (apr_size_t)n;
            return APR_SUCCESS;
        }
        if (n == 0) {
            *why = "the server closed the connection";
            return APR_EOF;
        }
        rv = io_wait(c->fd, POLLIN, deadline, p, why);
        if (rv != APR_SUCCESS)
            return rv;
    }
}

apr_status_t cs_store_line(cs_store_conn_t *c, apr_size_t max,
                           apr_time_t deadline, const char **line,
                           apr_size_t *len, apr_pool_t *p, const char **why)
{
    apr_size_t scanned = 0;

    for (;;) {
        const char *start = c->buf + c->off;
        apr_size_t have = c->len - c->off;
        const char *lf;
        if (scanned > 0)
            scanned--; /* a CR at the end of what was read before */
        lf = have > scanned ? memchr(start + scanned, '\n', have - scanned)
                            : NULL;
        if (lf) {
            if (lf == start || lf[-1] != '\r') {
                *why = "a line that does not end in CRLF";
                return APR_EGENERAL;
            }
            *line = start;
            *len = (apr_size_t)(lf - 1 - start);
            c->off += *len + 2;
            if (*len > max)
                break;
            return APR_SUCCESS;
        }
        if (have >= max + 2)
            break;
        scanned = have;
        {
            apr_status_t rv = fill(c, deadline, p, why);
            if (rv != APR_SUCCESS)
                return rv;
        }
    }
    *why = apr_psprintf(p, "a line longer than %lu bytes", (unsigned long)max);
    return APR_EGENERAL;
}

apr_status_t cs_store_bytes(cs_store_conn_t *c, apr_size_t n,
                            apr_time_t deadline, const char **data,
                            apr_pool_t *p, const char **why)
{
    if (n > sizeof(c->buf)) {
        *why = "a reply larger than any reply of this store";
        return APR_EGENERAL;
    }
    while (c->len - c->off < n) {
        apr_status_t rv = fill(c, deadline, p, why);
        if (rv != APR_SUCCESS)
            return rv;
    }
    *data = c->buf + c->off;
    c->off += n;
    return APR_SUCCESS;
}

apr_status_t cs_store_parse_size(const char *s, apr_size_t len, apr_size_t max,
                                 apr_size_t *out)
{
    apr_size_t v = 0;
    if (len == 0)
        return APR_EGENERAL;
    for (apr_size_t i = 0; i < len; i++) {
        if (!apr_isdigit(s[i]))
            return APR_EGENERAL;
        v = v * 10 + (apr_size_t)(s[i] - '0');
        if (v > max)
            return APR_ENOSPC; /* before any overflow: max is small */
    }
    *out = v;
    return APR_SUCCESS;
}
