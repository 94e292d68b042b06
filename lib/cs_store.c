/* The parts the fleet-cache backends share: the server list of
 * CardScanCache, CardScanCacheAuth, deadlines, keys, the choice of a
 * server, and a per-process set of idle connections. */
#include "cardscan.h"
#include "cs_store_backend.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <string.h>
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
