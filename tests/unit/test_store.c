/* The fleet-cache stores against a real redis-server and memcached, each
 * started here on a free 127.0.0.1 port and stopped by its pid. A build
 * without a client (configure --without-hiredis, --without-libmemcached)
 * runs that backend's stand-in test instead of its live ones. */
#include "config.h"
#include "suites.h"

#include <apr_strings.h>
#include <apr_thread_proc.h>
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <libmemcached/memcached.h>

#include "lib/cardscan.h"
#include "lib/cs_store_backend.h"

#if !defined(HAVE_HIREDIS) || !defined(HAVE_LIBMEMCACHED)
/* the live tests of the missing backend are defined, not run */
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

#define MS(n) ((apr_interval_time_t)(n)*1000)
/* the deadline of one operation in these tests, and what a loaded machine
 * (or valgrind) may add to it */
#define DEADLINE MS(200)
#define MARGIN MS(800)

/* ------------------------------------------------------------- servers */

typedef struct server {
    pid_t pid;
    int port;
    int redis; /* else memcached */
    int v6;    /* on [::1] rather than 127.0.0.1 */
    const char *extra[12];
} server_t;

static void sleep_ms(int ms)
{
    apr_sleep(MS(ms));
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static int port_open(int port, int v6)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0), ok;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((unsigned short)port);
    a6.sin6_addr = in6addr_loopback;
    a6.sin6_port = htons((unsigned short)port);
    ok = (v6 ? connect(fd, (struct sockaddr *)&a6, sizeof(a6))
             : connect(fd, (struct sockaddr *)&a, sizeof(a))) == 0;
    close(fd);
    return ok;
}

/* Starts the server (on s->port, or a free one) and waits until it listens. */
static void server_start(server_t *s)
{
    char port[16];
    const char *argv[32];
    int n = 0;

    if (!s->port)
        s->port = free_port();
    snprintf(port, sizeof(port), "%d", s->port);
    if (s->redis) {
        argv[n++] = "redis-server";
        argv[n++] = "--port";
        argv[n++] = port;
        argv[n++] = "--bind";
        argv[n++] = s->v6 ? "::1" : "127.0.0.1";
        argv[n++] = "--save";
        argv[n++] = "";
        argv[n++] = "--appendonly";
        argv[n++] = "no";
    }
    else {
        argv[n++] = "memcached";
        argv[n++] = "-l";
        argv[n++] = s->v6 ? "::1" : "127.0.0.1";
        argv[n++] = "-p";
        argv[n++] = port;
        argv[n++] = "-U";
        argv[n++] = "0";
        if (getuid() == 0) {
            argv[n++] = "-u";
            argv[n++] = "nobody";
        }
    }
    for (int i = 0; s->extra[i]; i++)
        argv[n++] = s->extra[i];
    argv[n] = NULL;
    s->pid = fork();
    ck_assert_int_ge(s->pid, 0);
    if (s->pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        /* dies with the test, whatever happens to the test */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 500 && !port_open(s->port, s->v6); i++) {
        ck_assert_int_eq(waitpid(s->pid, NULL, WNOHANG), 0);
        sleep_ms(10);
    }
    ck_assert_msg(port_open(s->port, s->v6), "%s did not start on port %d",
                  argv[0], s->port);
}

/* Whether every thread of pid is stopped. */
static int all_stopped(pid_t pid)
{
    char path[320];
    struct dirent *d;
    int stopped = 1, threads = 0;
    DIR *dir;
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    dir = opendir(path);
    ck_assert_ptr_nonnull(dir);
    while ((d = readdir(dir)) && stopped) {
        char stat[256] = "";
        const char *state;
        FILE *f;
        if (d->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/%d/task/%s/stat", (int)pid,
                 d->d_name);
        f = fopen(path, "r");
        if (!f)
            continue;
        if (!fgets(stat, sizeof(stat), f))
            stat[0] = '\0';
        fclose(f);
        state = strrchr(stat, ')');
        stopped = state && state[1] == ' ' && state[2] == 'T';
        threads++;
    }
    closedir(dir);
    return stopped && threads > 0;
}

/* SIGSTOP, and wait until it took effect (kill(2) does not wait). */
static void server_pause(const server_t *s)
{
    kill(s->pid, SIGSTOP);
    for (int i = 0; i < 500 && !all_stopped(s->pid); i++)
        sleep_ms(5);
    ck_assert_msg(all_stopped(s->pid), "pid %d did not stop", (int)s->pid);
}

static void server_stop(server_t *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGCONT);
        kill(s->pid, SIGTERM);
        waitpid(s->pid, NULL, 0);
    }
    s->pid = 0;
}

static const char *spec_of(apr_pool_t *p, const server_t *s, const char *tail)
{
    return apr_psprintf(p, "%s:%d%s", s->v6 ? "[::1]" : "127.0.0.1", s->port,
                        tail ? tail : "");
}

static cs_store_t *store_of(const server_t *s, const char *tail,
                            const char *user, const char *password)
{
    cs_store_opts_t o = {0, user, password};
    cs_store_t *st = NULL;
    const char *err = NULL;
    apr_status_t rv =
        (s->redis ? cs_store_redis_create : cs_store_memcache_create)(
            tp, spec_of(tp, s, tail), &o, &st, &err);
    ck_assert_msg(rv == APR_SUCCESS, "create: %s", err);
    return st;
}

/* ----------------------------------------------------- store operations */

static const char *last_err;

static apr_status_t sget(cs_store_t *st, const char *id, char *buf,
                         apr_size_t *len, apr_interval_time_t within)
{
    last_err = NULL;
    return st->ops->get(st, (const unsigned char *)id, strlen(id),
                        (unsigned char *)buf, len, apr_time_now() + within, tp,
                        &last_err);
}

/* put, or add when add is set */
static apr_status_t sstore(cs_store_t *st, int add, const char *id,
                           const char *val, apr_interval_time_t life,
                           apr_interval_time_t within)
{
    last_err = NULL;
    return (add ? st->ops->add : st->ops->put)(
        st, (const unsigned char *)id, strlen(id), (const unsigned char *)val,
        strlen(val), apr_time_now() + life, apr_time_now() + within, tp,
        &last_err);
}
#define sput(st, ...) sstore(st, 0, __VA_ARGS__)
#define sadd(st, ...) sstore(st, 1, __VA_ARGS__)

static apr_status_t srelease(cs_store_t *st, const char *id, const char *val,
                             apr_interval_time_t within)
{
    last_err = NULL;
    return st->ops->release(st, (const unsigned char *)id, strlen(id),
                            (const unsigned char *)val, strlen(val),
                            apr_time_now() + within, tp, &last_err);
}

/* the value of id, "" when absent */
static const char *value_of(cs_store_t *st, const char *id)
{
    char buf[256];
    apr_size_t len = sizeof(buf) - 1;
    apr_status_t rv = sget(st, id, buf, &len, apr_time_from_sec(2));
    if (rv == APR_NOTFOUND)
        return "";
    ck_assert_msg(rv == APR_SUCCESS, "get: %s", last_err);
    return apr_pstrmemdup(tp, buf, len);
}

#define ck_ok(expr)                                                            \
    do {                                                                       \
        apr_status_t rv_ = (expr);                                             \
        ck_assert_msg(rv_ == APR_SUCCESS, "%s: %d %s", #expr, rv_,             \
                      last_err ? last_err : "");                               \
    } while (0)

/* get, put, add, release and expiry on a working store */
static void check_semantics(cs_store_t *st, apr_interval_time_t short_life)
{
    static const unsigned char binary[] = {'a', 0, '\r', '\n', 0xff, 'z'};
    unsigned char bin_id[32], buf[64];
    apr_size_t len = sizeof(buf);
    const char *id = apr_psprintf(tp, "id-%" APR_TIME_T_FMT, apr_time_now());
    const char *err = NULL;
    apr_time_t far = apr_time_now() + apr_time_from_sec(60);

    ck_assert_str_eq(value_of(st, id), "");
    ck_ok(sput(st, id, "one", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "one");
    ck_ok(sput(st, id, "two", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "two");

    /* binary ids and values, and a buffer too small */
    for (int i = 0; i < 32; i++)
        bin_id[i] = (unsigned char)(i * 37 + apr_time_now());
    bin_id[3] = 0;
    ck_assert_int_eq(st->ops->put(st, bin_id, 32, binary, sizeof(binary), far,
                                  far, tp, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(st->ops->get(st, bin_id, 32, buf, &len, far, tp, &err),
                     APR_SUCCESS);
    ck_assert_uint_eq(len, sizeof(binary));
    ck_assert_mem_eq(buf, binary, sizeof(binary));
    len = 3;
    ck_assert_int_ne(st->ops->get(st, bin_id, 32, buf, &len, far, tp, &err),
                     APR_SUCCESS);
    len = sizeof(buf);
    ck_assert_int_eq(st->ops->get(st, bin_id, 31, buf, &len, far, tp, &err),
                     APR_NOTFOUND);
    /* an id too long for a key */
    ck_assert_int_eq(st->ops->get(st, (const unsigned char *)"x",
                                  CS_STORE_ID_MAX + 1, buf, &len, far, tp,
                                  &err),
                     APR_EINVAL);

    /* add: a lock only one owner gets; release by its owner only */
    id = apr_pstrcat(tp, id, "-lock", NULL);
    ck_ok(sadd(st, id, "owner-a", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_int_eq(
        sadd(st, id, "owner-b", apr_time_from_sec(60), DEADLINE * 5),
        APR_EEXIST);
    ck_ok(srelease(st, id, "owner-b", DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "owner-a");
    ck_ok(srelease(st, id, "owner-a", DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "");
    ck_ok(srelease(st, id, "owner-a", DEADLINE * 5)); /* absent: fine */
    ck_ok(sadd(st, id, "owner-b", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "owner-b");

    /* expiry: put and add alike */
    id = apr_pstrcat(tp, id, "-short", NULL);
    ck_ok(sput(st, id, "brief", short_life, DEADLINE * 5));
    ck_ok(sadd(st, apr_pstrcat(tp, id, "-add", NULL), "brief", short_life,
               DEADLINE * 5));
    ck_assert_str_eq(value_of(st, id), "brief");
    for (int i = 0; i < 100 && *value_of(st, id); i++)
        sleep_ms(50);
    ck_assert_str_eq(value_of(st, id), "");
    ck_assert_str_eq(value_of(st, apr_pstrcat(tp, id, "-add", NULL)), "");
    /* an expiry in the past still stores briefly rather than failing */
    ck_ok(sput(st, id, "late", -MS(10), DEADLINE * 5));
}

/* Each operation on a server that does not answer returns APR_TIMEUP
 * within the deadline (plus a margin). */
static void check_stalled(cs_store_t *st, const char *id)
{
    char buf[64];
    for (int op = 0; op < 5; op++) {
        apr_size_t len = sizeof(buf);
        apr_time_t t0 = apr_time_now(), took;
        apr_status_t rv;
        switch (op) {
        case 0:
        case 4: /* again: a new connection, the first one was dropped */
            rv = sget(st, id, buf, &len, DEADLINE);
            break;
        case 1:
            rv = sput(st, id, "x", apr_time_from_sec(60), DEADLINE);
            break;
        case 2:
            rv = sadd(st, id, "x", apr_time_from_sec(60), DEADLINE);
            break;
        default:
            rv = srelease(st, id, "x", DEADLINE);
        }
        took = apr_time_now() - t0;
        ck_assert_msg(rv == APR_TIMEUP, "op %d: %d %s", op, rv,
                      last_err ? last_err : "");
        ck_assert_msg(took < DEADLINE + MARGIN, "op %d took %d ms", op,
                      (int)(took / 1000));
        ck_assert_msg(took >= DEADLINE - MS(20), "op %d gave up after %d ms",
                      op, (int)(took / 1000));
        ck_assert_ptr_nonnull(strstr(last_err, "deadline"));
    }
}

static void check_stop_and_continue(server_t *s)
{
    cs_store_t *st = store_of(s, NULL, NULL, NULL);
    ck_ok(sput(st, "paused", "before", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, "paused"), "before");

    server_pause(s);
    check_stalled(st, "paused");
    kill(s->pid, SIGCONT);
    /* the same store works again, at once (the server may have run the
     * commands that timed out: what "paused" holds now is not known) */
    ck_ok(sput(st, "paused", "after", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, "paused"), "after");
}

/* Stops and starts the server on the same port: the store's idle
 * connections are dead; the next operation connects again, without an
 * error. While the server is down, operations fail fast. */
static void check_restart(server_t *s)
{
    cs_store_t *st = store_of(s, NULL, NULL, NULL);
    char buf[64];
    apr_size_t len = sizeof(buf);
    apr_time_t t0;
    apr_status_t rv;

    ck_ok(sput(st, "restart", "v1", apr_time_from_sec(60), DEADLINE * 5));
    server_stop(s);
    server_start(s);
    ck_assert_str_eq(value_of(st, "restart"), ""); /* an empty server */
    ck_ok(sput(st, "restart", "v2", apr_time_from_sec(60), DEADLINE * 5));

    server_stop(s);
    t0 = apr_time_now();
    rv = sget(st, "restart", buf, &len, apr_time_from_sec(5));
    ck_assert_int_ne(rv, APR_SUCCESS);
    ck_assert_int_ne(rv, APR_NOTFOUND);
    ck_assert_ptr_nonnull(last_err);
    ck_assert_int_lt(apr_time_now() - t0, apr_time_from_sec(2));
    server_start(s);
    ck_assert_str_eq(value_of(st, "restart"), "");
    ck_ok(sput(st, "restart", "v3", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(st, "restart"), "v3");
}

/* threads sharing one store */
#define THREADS 4
#define THREAD_OPS 40

typedef struct hammer_job {
    cs_store_t *st;
    int n;
    apr_status_t rv;
} hammer_job_t;

/* returns instead of apr_thread_exit(), which ASan's thread teardown
 * mistakes for a stack use after scope */
static void *APR_THREAD_FUNC hammer(apr_thread_t *t, void *data)
{
    hammer_job_t *job = data;
    cs_store_t *st = job->st;
    apr_pool_t *p;
    apr_status_t rv = APR_SUCCESS;
    (void)t;
    apr_pool_create(&p, NULL);
    for (int i = 0; i < THREAD_OPS && rv == APR_SUCCESS; i++) {
        const char *err;
        const char *id = apr_psprintf(p, "t%d-%d", job->n, i % 5);
        unsigned char buf[64];
        apr_size_t len = sizeof(buf);
        apr_time_t far = apr_time_now() + apr_time_from_sec(5);
        rv = st->ops->put(st, (const unsigned char *)id, strlen(id),
                          (const unsigned char *)id, strlen(id), far, far, p,
                          &err);
        if (rv == APR_SUCCESS)
            rv = st->ops->get(st, (const unsigned char *)id, strlen(id), buf,
                              &len, far, p, &err);
        if (rv == APR_SUCCESS &&
            (len != strlen(id) || memcmp(buf, id, len) != 0))
            rv = APR_EGENERAL;
    }
    apr_pool_destroy(p);
    job->rv = rv;
    return NULL;
}

static void check_threads(cs_store_t *st)
{
    apr_thread_t *t[THREADS];
    hammer_job_t jobs[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i].st = st;
        jobs[i].n = i;
        jobs[i].rv = APR_EGENERAL;
        ck_assert_int_eq(apr_thread_create(&t[i], NULL, hammer, &jobs[i], tp),
                         APR_SUCCESS);
    }
    for (int i = 0; i < THREADS; i++) {
        apr_status_t rv;
        apr_thread_join(&rv, t[i]);
        ck_assert_int_eq(jobs[i].rv, APR_SUCCESS);
    }
}

/* A field of redis-cli INFO (every call is a connection of its own). */
static long redis_info(int port, const char *field)
{
    char cmd[128], line[256];
    long v = -1;
    size_t n = strlen(field);
    FILE *f;
    snprintf(cmd, sizeof(cmd), "redis-cli -p %d info", port);
    f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, field, n) == 0 && line[n] == ':')
            v = atol(line + n + 1);
    pclose(f);
    return v;
}

/* A child process never uses the connections of its parent: it opens its
 * own (counted by Redis, when port is given). */
static void check_forked_child(cs_store_t *st, int port)
{
    pid_t pid;
    int status;
    long before = 0;
    ck_ok(sput(st, "fork", "parent", apr_time_from_sec(60), DEADLINE * 5));
    if (port)
        before = redis_info(port, "total_connections_received");
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        const char *err;
        apr_time_t far = apr_time_now() + apr_time_from_sec(5);
        int ok = st->ops->put(st, (const unsigned char *)"fork", 4,
                              (const unsigned char *)"child", 5, far, far, tp,
                              &err) == APR_SUCCESS;
        /* exec: ends the child without valgrind's leak check (the
         * parent's connections are left unfreed in it, on purpose) */
        execl(ok ? "/bin/true" : "/bin/false", "child", (char *)NULL);
        _exit(2);
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (port) /* the child's connection and the second redis-cli */
        ck_assert_int_eq(redis_info(port, "total_connections_received"),
                         before + 2);
    ck_assert_str_eq(value_of(st, "fork"), "child");
}

/* --------------------------------------------------------------- redis */

static server_t redis = {.redis = 1};
static server_t memcache = {.redis = 0};

static void servers_start(void)
{
    signal(SIGPIPE, SIG_IGN); /* as in httpd's children */
    server_start(&redis);
    server_start(&memcache);
}

static void servers_stop(void)
{
    server_stop(&redis);
    server_stop(&memcache);
}

START_TEST(redis_semantics)
{
    check_semantics(store_of(&redis, NULL, NULL, NULL), MS(150));
}
END_TEST

START_TEST(memcache_semantics)
{
    check_semantics(store_of(&memcache, NULL, NULL, NULL), MS(900));
}
END_TEST

START_TEST(redis_threads_and_fork)
{
    cs_store_t *st = store_of(&redis, NULL, NULL, NULL);
    check_threads(st);
    check_forked_child(st, redis.port);
}
END_TEST

START_TEST(memcache_threads_and_fork)
{
    cs_store_t *st = store_of(&memcache, NULL, NULL, NULL);
    check_threads(st);
    check_forked_child(st, 0);
}
END_TEST

START_TEST(redis_keys_are_prefixed_hex)
{
    /* what another tool (redis-cli) sees: the prefix and the id in hex */
    server_t *s = &redis;
    cs_store_t *st = store_of(s, NULL, NULL, NULL);
    char cmd[128], line[256] = "";
    FILE *f;
    ck_ok(sput(st, "\x01\xab", "v", apr_time_from_sec(60), DEADLINE * 5));
    snprintf(cmd, sizeof(cmd), "redis-cli -p %d --raw keys 'cardscan:*'",
             s->port);
    f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) && strcmp(line, "cardscan:01ab\n"))
        ;
    pclose(f);
    ck_assert_str_eq(line, "cardscan:01ab\n");
}
END_TEST

START_TEST(redis_database_number)
{
    cs_store_t *db0 = store_of(&redis, NULL, NULL, NULL);
    cs_store_t *db3 = store_of(&redis, "/3", NULL, NULL);
    cs_store_t *db99 = store_of(&redis, "/99", NULL, NULL);
    char buf[8];
    apr_size_t len = sizeof(buf);
    ck_ok(sput(db3, "in-db-3", "three", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_str_eq(value_of(db3, "in-db-3"), "three");
    ck_assert_str_eq(value_of(db0, "in-db-3"), "");
    /* a database the server does not have: each operation fails, named */
    ck_assert_int_eq(sget(db99, "x", buf, &len, DEADLINE * 5), APR_EGENERAL);
    ck_assert_ptr_nonnull(strstr(last_err, "SELECT"));
}
END_TEST

START_TEST(redis_requirepass)
{
    server_t s = {.redis = 1, .extra = {"--requirepass", "s3cret-Pw", NULL}};
    cs_store_t *st;
    char buf[8];
    apr_size_t len = sizeof(buf);
    server_start(&s);

    st = store_of(&s, NULL, NULL, "s3cret-Pw");
    check_semantics(st, MS(150));

    /* no password: named as such */
    st = store_of(&s, NULL, NULL, NULL);
    ck_assert_int_eq(sget(st, "x", buf, &len, DEADLINE * 5), APR_EACCES);
    ck_assert_ptr_nonnull(strstr(last_err, "requires a password"));

    /* a wrong one: refused, never repeated */
    st = store_of(&s, NULL, NULL, "wrong-Pw-123");
    ck_assert_int_eq(sput(st, "x", "v", apr_time_from_sec(5), DEADLINE * 5),
                     APR_EACCES);
    ck_assert_ptr_nonnull(strstr(last_err, "requirepass"));
    ck_assert_ptr_null(strstr(last_err, "wrong-Pw-123"));
    ck_assert_ptr_null(strstr(last_err, "s3cret"));
    server_stop(&s);
}
END_TEST

START_TEST(redis_acl_user)
{
    server_t s = {.redis = 1,
                  .extra = {"--user", "default", "off", "--user", "cardscan",
                            "on", ">acl-Pw-456", "~cardscan:*", "+@all", NULL}};
    cs_store_t *st;
    server_start(&s);

    st = store_of(&s, NULL, "cardscan", "acl-Pw-456");
    check_semantics(st, MS(150));

    st = store_of(&s, NULL, "cardscan", "not-acl-Pw");
    ck_assert_int_eq(sput(st, "x", "v", apr_time_from_sec(5), DEADLINE * 5),
                     APR_EACCES);
    ck_assert_ptr_nonnull(strstr(last_err, "'cardscan'"));
    ck_assert_ptr_null(strstr(last_err, "not-acl-Pw"));
    ck_assert_ptr_null(strstr(last_err, "acl-Pw-456"));

    /* a password alone is the default user's, which is off here */
    st = store_of(&s, NULL, NULL, "acl-Pw-456");
    ck_assert_int_eq(sput(st, "x", "v", apr_time_from_sec(5), DEADLINE * 5),
                     APR_EACCES);
    server_stop(&s);
}
END_TEST

START_TEST(redis_stalled_server_costs_one_deadline)
{
    server_t s = {.redis = 1};
    server_start(&s);
    check_stop_and_continue(&s);
    server_stop(&s);
}
END_TEST

START_TEST(memcache_stalled_server_costs_one_deadline)
{
    server_t s = {.redis = 0};
    server_start(&s);
    check_stop_and_continue(&s);
    server_stop(&s);
}
END_TEST

START_TEST(stalled_server_and_a_far_deadline)
{
    /* the store's own timeout bounds a caller's generous deadline */
    server_t s = {.redis = 1};
    cs_store_opts_t o = {DEADLINE, NULL, NULL};
    cs_store_t *st;
    const char *err;
    char buf[8];
    apr_size_t len = sizeof(buf);
    apr_time_t t0;
    server_start(&s);
    ck_assert_int_eq(
        cs_store_redis_create(tp, spec_of(tp, &s, NULL), &o, &st, &err),
        APR_SUCCESS);
    server_pause(&s);
    t0 = apr_time_now();
    ck_assert_int_eq(sget(st, "x", buf, &len, apr_time_from_sec(30)),
                     APR_TIMEUP);
    ck_assert_int_lt(apr_time_now() - t0, DEADLINE + MARGIN);
    server_stop(&s);
}
END_TEST

START_TEST(redis_restart_reconnects)
{
    server_t s = {.redis = 1};
    server_start(&s);
    check_restart(&s);
    server_stop(&s);
}
END_TEST

START_TEST(memcache_restart_reconnects)
{
    server_t s = {.redis = 0};
    server_start(&s);
    check_restart(&s);
    server_stop(&s);
}
END_TEST

START_TEST(redis_servers_share_the_ids)
{
    /* two servers: each id lives on one, the same for every store */
    server_t b = {.redis = 1};
    const char *spec;
    cs_store_opts_t o = {0, NULL, NULL};
    cs_store_t *ab, *ab2, *a_only;
    const char *err;
    int on_a = 0;
    server_start(&b);
    spec = apr_psprintf(tp, "127.0.0.1:%d,localhost:%d", redis.port, b.port);
    ck_assert_int_eq(cs_store_redis_create(tp, spec, &o, &ab, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_store_redis_create(tp, spec, &o, &ab2, &err),
                     APR_SUCCESS);
    a_only = store_of(&redis, NULL, NULL, NULL);
    for (int i = 0; i < 20; i++) {
        const char *id = apr_psprintf(tp, "spread-%d", i);
        ck_ok(sput(ab, id, id, apr_time_from_sec(60), DEADLINE * 5));
        ck_assert_str_eq(value_of(ab2, id), id);
        on_a += *value_of(a_only, id) != '\0';
    }
    ck_assert_int_gt(on_a, 0);
    ck_assert_int_lt(on_a, 20);
    server_stop(&b);
}
END_TEST

START_TEST(memcache_servers_as_libmemcached_chooses)
{
    /* two servers: each id lives where libmemcached's consistent
     * distribution puts it, so web servers running an earlier version
     * (libmemcached did the talking) and this one share the entries */
    server_t b = {.redis = 0};
    cs_store_opts_t o = {0, NULL, NULL};
    cs_store_t *ab, *a_only;
    memcached_st *mc = memcached_create(NULL);
    const char *spec, *err;
    int on_a = 0;
    server_start(&b);
    spec = apr_psprintf(tp, "127.0.0.1:%d,127.0.0.1:%d", memcache.port, b.port);
    ck_assert_int_eq(cs_store_memcache_create(tp, spec, &o, &ab, &err),
                     APR_SUCCESS);
    a_only = store_of(&memcache, NULL, NULL, NULL);
    ck_assert(memcached_success(
        memcached_server_add(mc, "127.0.0.1", (in_port_t)memcache.port)));
    ck_assert(memcached_success(
        memcached_server_add(mc, "127.0.0.1", (in_port_t)b.port)));
    ck_assert(memcached_success(
        memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                               MEMCACHED_DISTRIBUTION_CONSISTENT)));
    for (int i = 0; i < 20; i++) {
        const char *id = apr_psprintf(tp, "ketama-%d", i);
        char key[CS_STORE_KEY_MAX];
        apr_size_t keylen =
            cs_store_key(key, (const unsigned char *)id, strlen(id));
        ck_assert(memcached_success(
            memcached_set(mc, key, keylen, id, strlen(id), 60, 0)));
        ck_assert_str_eq(value_of(ab, id), id);
        on_a += *value_of(a_only, id) != '\0';
    }
    ck_assert_int_gt(on_a, 0);
    ck_assert_int_lt(on_a, 20);
    memcached_free(mc);
    server_stop(&b);
}
END_TEST

/* A resolver that counts its lookups and takes 300 ms for each. */
static volatile int lookups;

static int slow_counting_getaddrinfo(const char *node, const char *service,
                                     const struct addrinfo *hints,
                                     struct addrinfo **res)
{
    __atomic_add_fetch(&lookups, 1, __ATOMIC_SEQ_CST);
    sleep_ms(300);
    return getaddrinfo(node, service, hints, res);
}

/* A name is looked up once per process, not at every connect: neither
 * after the server restarted (new connections), nor after connections
 * failed (again at most every 30 s). Numeric addresses never are. */
static void check_lookups(int redis_kind)
{
    server_t s = {.redis = redis_kind};
    cs_store_opts_t o = {0, NULL, NULL};
    cs_store_t *by_name, *by_addr, *v6;
    const char *err;
    char buf[8];
    apr_size_t len = sizeof(buf);
    apr_time_t t0;

    server_start(&s);
    cs_store_getaddrinfo = slow_counting_getaddrinfo;
    lookups = 0;
    ck_assert_int_eq(
        (redis_kind ? cs_store_redis_create : cs_store_memcache_create)(
            tp, apr_psprintf(tp, "localhost:%d", s.port), &o, &by_name, &err),
        APR_SUCCESS);
    by_addr = store_of(&s, NULL, NULL, NULL);
    ck_assert_int_eq(
        (redis_kind ? cs_store_redis_create
                    : cs_store_memcache_create)(tp, "[::1]:1", &o, &v6, &err),
        APR_SUCCESS);

    ck_ok(sput(by_addr, "dns", "v", apr_time_from_sec(60), DEADLINE * 5));
    ck_assert_int_ne(sget(v6, "dns", buf, &len, DEADLINE), APR_SUCCESS);
    ck_assert_int_eq(lookups, 0);

    ck_assert_str_eq(value_of(by_name, "dns"), "v");
    ck_assert_int_eq(lookups, 1);
    for (int round = 0; round < 2; round++) {
        /* new connections: the server went away, then came back */
        server_stop(&s);
        len = sizeof(buf);
        t0 = apr_time_now();
        ck_assert_int_ne(sget(by_name, "dns", buf, &len, DEADLINE * 5),
                         APR_SUCCESS);
        ck_assert_int_lt(apr_time_now() - t0, MS(250));
        server_start(&s);
        t0 = apr_time_now();
        ck_ok(sput(by_name, "dns", "w", apr_time_from_sec(60), DEADLINE * 5));
        ck_assert_int_lt(apr_time_now() - t0, MS(250));
        ck_assert_str_eq(value_of(by_name, "dns"), "w");
    }
    ck_assert_int_eq(lookups, 1);
    cs_store_getaddrinfo = getaddrinfo;
    server_stop(&s);
}

START_TEST(redis_looks_names_up_once)
{
    check_lookups(1);
}
END_TEST

START_TEST(memcache_looks_names_up_once)
{
    check_lookups(0);
}
END_TEST

START_TEST(ipv6_servers)
{
    server_t r6 = {.redis = 1, .v6 = 1}, m6 = {.redis = 0, .v6 = 1};
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
    int have_v6;
    a6.sin6_addr = in6addr_loopback;
    have_v6 = fd >= 0 && bind(fd, (struct sockaddr *)&a6, sizeof(a6)) == 0;
    if (fd >= 0)
        close(fd);
    if (!have_v6)
        return; /* no IPv6 loopback on this machine */
    server_start(&r6);
    server_start(&m6);
    ck_ok(sput(store_of(&r6, NULL, NULL, NULL), "v6", "r", apr_time_from_sec(9),
               DEADLINE * 5));
    ck_assert_str_eq(value_of(store_of(&r6, NULL, NULL, NULL), "v6"), "r");
    ck_ok(sput(store_of(&m6, NULL, NULL, NULL), "v6", "m", apr_time_from_sec(9),
               DEADLINE * 5));
    ck_assert_str_eq(value_of(store_of(&m6, NULL, NULL, NULL), "v6"), "m");
    server_stop(&r6);
    server_stop(&m6);
}
END_TEST

/* ------------------------------------------------------ misbehaving servers */

/* A fake server on 127.0.0.1, in a thread: it answers every request (any
 * bytes the client sends) with `reply`, at once or one byte every
 * dribble_ms, and keeps the connection until the client closes it. */
typedef struct fake {
    int fd, port;
    const char *reply;
    apr_size_t replylen;
    int dribble_ms;
    volatile int close_after; /* close once the reply is sent */
    volatile int accepted;    /* connections so far */
    volatile int stop;
    pthread_t thread;
} fake_t;

/* Waits for fd to be readable, at most ms; 0 when it is not (or stop). */
static int fake_wait(fake_t *f, int fd, int ms)
{
    for (int waited = 0; waited < ms && !f->stop; waited += 20) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 20) > 0)
            return 1;
    }
    return 0;
}

static void fake_serve(fake_t *f, int fd)
{
    char req[4096];
    while (!f->stop) {
        ssize_t n;
        if (!fake_wait(f, fd, 60000))
            return;
        n = recv(fd, req, sizeof(req), 0);
        if (n <= 0)
            return;
        /* a request may come in pieces: let it all arrive */
        while (fake_wait(f, fd, 20) && recv(fd, req, sizeof(req), 0) > 0)
            ;
        for (apr_size_t i = 0; i < f->replylen && !f->stop;) {
            apr_size_t chunk = f->dribble_ms ? 1 : f->replylen - i;
            if (send(fd, f->reply + i, chunk, MSG_NOSIGNAL) <= 0)
                return;
            i += chunk;
            if (f->dribble_ms && i < f->replylen)
                sleep_ms(f->dribble_ms);
        }
        if (f->close_after)
            return;
    }
}

static void *fake_main(void *data)
{
    fake_t *f = data;
    while (!f->stop) {
        int fd;
        if (!fake_wait(f, f->fd, 100))
            continue;
        fd = accept(f->fd, NULL, NULL);
        if (fd < 0)
            continue;
        __atomic_add_fetch(&f->accepted, 1, __ATOMIC_SEQ_CST);
        fake_serve(f, fd);
        close(fd);
    }
    return NULL;
}

static void fake_start(fake_t *f, const char *reply, apr_size_t replylen,
                       int dribble_ms)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof(a);
    memset(f, 0, sizeof(*f));
    f->reply = reply;
    f->replylen = replylen;
    f->dribble_ms = dribble_ms;
    f->fd = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(f->fd, (struct sockaddr *)&a, sizeof(a)), 0);
    ck_assert_int_eq(listen(f->fd, 16), 0);
    ck_assert_int_eq(getsockname(f->fd, (struct sockaddr *)&a, &len), 0);
    f->port = ntohs(a.sin_port);
    ck_assert_int_eq(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

static void fake_stop(fake_t *f)
{
    f->stop = 1;
    pthread_join(f->thread, NULL);
    close(f->fd);
}

/* A store of the given kind on the fake server, with that timeout. */
static cs_store_t *fake_store(const fake_t *f, int redis_kind,
                              apr_interval_time_t timeout)
{
    server_t s = {.redis = redis_kind, .port = f->port};
    cs_store_opts_t o = {timeout, NULL, NULL};
    cs_store_t *st = NULL;
    const char *err = NULL;
    apr_status_t rv =
        (redis_kind ? cs_store_redis_create : cs_store_memcache_create)(
            tp, spec_of(tp, &s, NULL), &o, &st, &err);
    ck_assert_msg(rv == APR_SUCCESS, "create: %s", err);
    return st;
}

/* A get from a server that dribbles its 10-byte answer, one byte every
 * 200 ms, with a store timeout of 0.25 s and a far caller deadline: the
 * whole operation ends by the deadline, not by one read's timeout. */
static void check_dribble(int redis_kind, const char *reply)
{
    fake_t f;
    cs_store_t *st;
    char buf[64];
    apr_size_t len = sizeof(buf);
    apr_time_t t0, took;
    apr_status_t rv;

    fake_start(&f, reply, strlen(reply), 200);
    st = fake_store(&f, redis_kind, MS(250));
    t0 = apr_time_now();
    rv = sget(st, "dribble", buf, &len, apr_time_from_sec(30));
    took = apr_time_now() - t0;
    fprintf(stderr,
            "%s: a %d-byte reply dribbled 1 byte / 200 ms, store timeout "
            "250 ms: one get took %d ms (%d: %s)\n",
            redis_kind ? "redis" : "memcache", (int)strlen(reply),
            (int)(took / 1000), rv, last_err ? last_err : "");
    fake_stop(&f);
    ck_assert_int_eq(rv, APR_TIMEUP);
    ck_assert_msg(took < MS(250) + MARGIN, "took %d ms", (int)(took / 1000));
}

START_TEST(redis_dribbling_server_costs_one_deadline)
{
    check_dribble(1, "$4\r\nabcd\r\n");
}
END_TEST

START_TEST(memcache_dribbling_server_costs_one_deadline)
{
    check_dribble(0, "VALUE cardscan:64726962626c65 0 4\r\nabcd\r\nEND\r\n");
}
END_TEST

/* Each reply is refused at once with an error (not APR_NOTFOUND, not a
 * wait for the deadline), and the connection is not used again: the next
 * operation opens a new one. */
static void check_refused(int redis_kind, const char *const *replies,
                          int nreplies, const char *says)
{
    for (int i = 0; i < nreplies; i++) {
        fake_t f;
        cs_store_t *st;
        char buf[64];
        apr_size_t len = sizeof(buf);
        apr_time_t t0, took;
        apr_status_t rv;

        fake_start(&f, replies[i], strlen(replies[i]), 0);
        st = fake_store(&f, redis_kind, 0);
        for (int round = 1; round <= 2; round++) {
            t0 = apr_time_now();
            len = sizeof(buf);
            rv = sget(st, "bad", buf, &len, apr_time_from_sec(2));
            took = apr_time_now() - t0;
            ck_assert_msg(rv != APR_SUCCESS && rv != APR_NOTFOUND &&
                              rv != APR_TIMEUP,
                          "reply %d (%.20s): status %d", i, replies[i], rv);
            ck_assert_msg(last_err && *last_err, "reply %d: no message", i);
            /* refused by the store itself, before hiredis parses it */
            ck_assert_msg(!says || strstr(last_err, says),
                          "reply %d (%.20s): %s", i, replies[i], last_err);
            ck_assert_msg(took < apr_time_from_sec(1),
                          "reply %d (%.20s) took %d ms", i, replies[i],
                          (int)(took / 1000));
            ck_assert_msg(f.accepted == round,
                          "reply %d (%.20s): %d connections after %d gets", i,
                          replies[i], f.accepted, round);
        }
        fake_stop(&f);
    }
}

START_TEST(redis_refuses_oversize_and_aggregate_replies)
{
    /* CVE-2021-32765: a huge multi-bulk count never reaches hiredis */
    static const char *const oversize[] = {"$1000000000\r\n", "$16385\r\n"};
    static const char *const aggregates[] = {
        "*4611686018427387904\r\n",
        "*1\r\n$1\r\na\r\n",
        "%1\r\n+a\r\n+b\r\n",
        "~1\r\n+a\r\n",
        ">1\r\n+a\r\n",
        "|1\r\n+a\r\n+b\r\n",
    };
    check_refused(1, oversize, 2, "more than an entry can be");
    check_refused(1, aggregates, sizeof(aggregates) / sizeof(aggregates[0]),
                  "aggregate");
}
END_TEST

START_TEST(redis_misbehaving_server_is_an_error)
{
    static const char *const replies[] = {
        "hello\r\n",             /* garbage */
        ":5\r\n",                /* the wrong type for GET */
        "+OK\r\n",               /* the wrong type for GET */
        "$abc\r\n",              /* a bad length */
        "$3\r\nabcdef\r\n",      /* a bulk longer than announced */
        "$4\r\nabcd\r\n+OK\r\n", /* a reply nobody asked for */
    };
    check_refused(1, replies, sizeof(replies) / sizeof(replies[0]), NULL);
}
END_TEST

START_TEST(memcache_refuses_oversize_replies)
{
    static const char *const replies[] = {
        "VALUE cardscan:626164 0 1000000000\r\n",
        "VALUE cardscan:626164 0 16385\r\n",
    };
    check_refused(0, replies, sizeof(replies) / sizeof(replies[0]),
                  "more than an entry can be");
}
END_TEST

START_TEST(memcache_misbehaving_server_is_an_error)
{
    static const char *const replies[] = {
        "hello\r\n",
        "ERROR\r\n",
        "SERVER_ERROR out of memory\r\n",
        "VALUE cardscan:6f74686572 0 1\r\na\r\nEND\r\n", /* another key */
        "VALUE cardscan:626164 0 x\r\n",
        "VALUE cardscan:626164 0 3\r\nabcdef\r\nEND\r\n",
        "VALUE cardscan:626164 0 1\r\na\r\nEND\r\nEND\r\n",
        "STORED\r\n",
    };
    check_refused(0, replies, sizeof(replies) / sizeof(replies[0]), NULL);
}
END_TEST

/* A server that closes the connection, before or in the middle of its
 * reply: an error, not a miss. */
START_TEST(closed_connection_is_an_error)
{
    static const char *const replies[2][3] = {
        {"", "VALUE cardscan:78 0 4\r\nab", "EN"},
        {"", "$4\r\nab", "+O"},
    };
    for (int redis_kind = 0; redis_kind <= 1; redis_kind++) {
        for (int i = 0; i < 3; i++) {
            const char *reply = replies[redis_kind][i];
            fake_t f;
            cs_store_t *st;
            char buf[8];
            apr_size_t len = sizeof(buf);
            apr_time_t t0;
            apr_status_t rv;
            fake_start(&f, reply, strlen(reply), 0);
            f.close_after = 1;
            st = fake_store(&f, redis_kind, 0);
            t0 = apr_time_now();
            rv = sget(st, "x", buf, &len, apr_time_from_sec(2));
            fake_stop(&f);
            ck_assert_msg(rv != APR_SUCCESS && rv != APR_NOTFOUND &&
                              rv != APR_TIMEUP,
                          "%s, reply '%s': status %d",
                          redis_kind ? "redis" : "memcache", reply, rv);
            ck_assert_int_lt(apr_time_now() - t0, apr_time_from_sec(1));
        }
    }
}
END_TEST

/* ---------------------------------------------------------- spec parsing */

START_TEST(parses_server_lists)
{
    cs_store_spec_t s;
    const char *err = NULL;
    ck_assert_int_eq(cs_store_spec_parse(tp, "10.0.0.5", 6379, 1, &s, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(s.nservers, 1);
    ck_assert_str_eq(s.servers[0].host, "10.0.0.5");
    ck_assert_int_eq(s.servers[0].port, 6379);
    ck_assert_int_eq(s.db, 0);

    ck_assert_int_eq(
        cs_store_spec_parse(tp, "a.example:7000,b:7001/5", 6379, 1, &s, &err),
        APR_SUCCESS);
    ck_assert_int_eq(s.nservers, 2);
    ck_assert_str_eq(s.servers[0].host, "a.example");
    ck_assert_int_eq(s.servers[0].port, 7000);
    ck_assert_str_eq(s.servers[1].host, "b");
    ck_assert_int_eq(s.servers[1].port, 7001);
    ck_assert_int_eq(s.db, 5);

    ck_assert_int_eq(cs_store_spec_parse(tp, "[::1]:6380,[fe80::1%eth0]", 11211,
                                         0, &s, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(s.servers[0].host, "::1");
    ck_assert_int_eq(s.servers[0].port, 6380);
    ck_assert_str_eq(s.servers[1].host, "fe80::1%eth0");
    ck_assert_int_eq(s.servers[1].port, 11211);
    ck_assert_int_eq(
        cs_store_spec_parse(tp, "cache:65535/0", 6379, 1, &s, &err),
        APR_SUCCESS);
    ck_assert_int_eq(s.servers[0].port, 65535);
}
END_TEST

START_TEST(refuses_bad_server_lists)
{
    static const struct {
        const char *spec;
        int allow_db;
        const char *says;
    } bad[] = {
        {"", 1, "no server"},
        {":6379", 1, "no host"},
        {"a:", 1, "port number"},
        {"a:0", 1, "port number"},
        {"a:65536", 1, "port number"},
        {"a:99999999999999999999", 1, "port number"},
        {"a:63x", 1, "port number"},
        {"a,,b", 1, "empty item"},
        {",a", 1, "empty item"},
        {"a,", 1, "comma"},
        {"a/", 1, "database number"},
        {"a/x", 1, "database number"},
        {"a/-1", 1, "database number"},
        {"a/1/2", 1, "database number"},
        {"a:1/2", 0, "no database"},
        {"::1:6379", 1, "brackets"},
        {"[::1:6379", 1, "']'"},
        {"[::1]6379", 1, "after ']'"},
        {"a b:1", 1, "not a host"},
        {"redis://:pa55word@h:1", 1, "CardScanCacheAuth"},
        {"a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q", 1, "more than 16"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cs_store_spec_t s;
        const char *err = NULL;
        ck_assert_msg(cs_store_spec_parse(tp, bad[i].spec, 6379,
                                          bad[i].allow_db, &s,
                                          &err) != APR_SUCCESS,
                      "'%s' accepted", bad[i].spec);
        ck_assert_msg(err && strstr(err, bad[i].says), "'%s': %s", bad[i].spec,
                      err ? err : "(no message)");
        ck_assert_ptr_null(strstr(err, "pa55word"));
    }
}
END_TEST

START_TEST(create_checks_spec_and_options)
{
    cs_store_opts_t o = {0, NULL, NULL};
    cs_store_t *st = NULL;
    const char *err = NULL;
#ifdef HAVE_HIREDIS
    ck_assert_int_ne(cs_store_redis_create(tp, "a:x", &o, &st, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "port"));
    o.username = "user";
    ck_assert_int_ne(cs_store_redis_create(tp, "a:1", &o, &st, &err),
                     APR_SUCCESS);
    /* made, not connected: no server at this address is needed */
    o.username = NULL;
    ck_assert_int_eq(
        cs_store_redis_create(tp, "cache.invalid:1", &o, &st, &err),
        APR_SUCCESS);
    ck_assert_str_eq(st->ops->name, "redis");
#endif
#ifdef HAVE_LIBMEMCACHED
    ck_assert_int_ne(cs_store_memcache_create(tp, "a/1", &o, &st, &err),
                     APR_SUCCESS);
    o.password = "pw";
    ck_assert_int_ne(cs_store_memcache_create(tp, "a:1", &o, &st, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "Redis"));
    o.password = NULL;
    ck_assert_int_eq(
        cs_store_memcache_create(tp, "cache.invalid", &o, &st, &err),
        APR_SUCCESS);
    ck_assert_str_eq(st->ops->name, "memcache");
#endif
    (void)o;
    (void)st;
    (void)err;
}
END_TEST

#if !defined(HAVE_HIREDIS) || !defined(HAVE_LIBMEMCACHED)
/* Without its client, a fleet store is not made, whatever the spec: the
 * message (logged by the shell as it refuses to start) says how to get it. */
START_TEST(without_a_client_says_how_to_rebuild)
{
    cs_store_opts_t o = {0, NULL, NULL};
    cs_store_t *st = (cs_store_t *)&o;
    const char *err = NULL;
#ifndef HAVE_HIREDIS
    ck_assert_int_eq(cs_store_redis_create(tp, "127.0.0.1:6379", &o, &st, &err),
                     APR_ENOTIMPL);
    ck_assert_ptr_null(st);
    ck_assert_str_eq(err, CS_STORE_NONE_REDIS_MSG);
    ck_assert_ptr_nonnull(strstr(err, "--without-hiredis"));
    ck_assert_ptr_nonnull(strstr(err, "libhiredis-dev"));
#endif
#ifndef HAVE_LIBMEMCACHED
    st = (cs_store_t *)&o;
    ck_assert_int_eq(cs_store_memcache_create(tp, "127.0.0.1", &o, &st, &err),
                     APR_ENOTIMPL);
    ck_assert_ptr_null(st);
    ck_assert_str_eq(err, CS_STORE_NONE_MEMCACHE_MSG);
    ck_assert_ptr_nonnull(strstr(err, "--without-libmemcached"));
#endif
}
END_TEST
#endif

START_TEST(keys_ttls_and_picks)
{
    char key[CS_STORE_KEY_MAX];
    unsigned char id[CS_STORE_ID_MAX + 1];
    int count[3] = {0, 0, 0};
    ck_assert_uint_eq(
        cs_store_key(key, (const unsigned char *)"\x00\xff\x10", 3),
        strlen("cardscan:00ff10"));
    ck_assert_str_eq(key, "cardscan:00ff10");
    memset(id, 0xab, sizeof(id));
    ck_assert_uint_eq(cs_store_key(key, id, CS_STORE_ID_MAX),
                      sizeof(CS_STORE_KEY_PREFIX) - 1 + 2 * CS_STORE_ID_MAX);
    ck_assert_uint_eq(cs_store_key(key, id, CS_STORE_ID_MAX + 1), 0);
    ck_assert_uint_eq(cs_store_key(key, id, 0), 0);

    ck_assert_int_eq(cs_store_ttl_ms(1000000, 1000000), 1);
    ck_assert_int_eq(cs_store_ttl_ms(1000000, 2000000), 1);
    ck_assert_int_eq(cs_store_ttl_ms(1000001, 0), 1001);
    ck_assert_int_eq(cs_store_ttl_ms(apr_time_from_sec(900), 0), 900000);

    for (int i = 0; i < 300; i++) {
        unsigned char h[4] = {(unsigned char)i, (unsigned char)(i >> 8), 7, 9};
        int k = cs_store_pick(h, 4, 3);
        ck_assert_int_eq(k, cs_store_pick(h, 4, 3));
        ck_assert_int_eq(cs_store_pick(h, 4, 1), 0);
        count[k]++;
    }
    for (int k = 0; k < 3; k++)
        ck_assert_int_gt(count[k], 50);
}
END_TEST

START_TEST(deadline_is_the_earlier)
{
    apr_time_t now = apr_time_now();
    apr_time_t far = now + apr_time_from_sec(100);
    ck_assert(cs_store_deadline(far, 0) == far);
    ck_assert(cs_store_deadline(far, MS(250)) < now + apr_time_from_sec(1));
    ck_assert(cs_store_deadline(now + MS(1), apr_time_from_sec(5)) ==
              now + MS(1));
}
END_TEST

Suite *store_suite(void)
{
    Suite *s = suite_create("store");
    TCase *spec = tcase_create("spec");
    TCase *live = tcase_create("live");
    TCase *fake = tcase_create("fake");

    tcase_add_checked_fixture(spec, pool_setup, pool_teardown);
    tcase_add_test(spec, parses_server_lists);
    tcase_add_test(spec, refuses_bad_server_lists);
    tcase_add_test(spec, create_checks_spec_and_options);
    tcase_add_test(spec, keys_ttls_and_picks);
    tcase_add_test(spec, deadline_is_the_earlier);
#if !defined(HAVE_HIREDIS) || !defined(HAVE_LIBMEMCACHED)
    tcase_add_test(spec, without_a_client_says_how_to_rebuild);
#endif
    suite_add_tcase(s, spec);

    tcase_add_unchecked_fixture(live, servers_start, servers_stop);
    tcase_add_checked_fixture(live, pool_setup, pool_teardown);
    tcase_set_timeout(live, 60);
#ifdef HAVE_HIREDIS
    tcase_add_test(live, redis_semantics);
    tcase_add_test(live, redis_threads_and_fork);
    tcase_add_test(live, redis_keys_are_prefixed_hex);
    tcase_add_test(live, redis_database_number);
    tcase_add_test(live, redis_requirepass);
    tcase_add_test(live, redis_acl_user);
    tcase_add_test(live, redis_stalled_server_costs_one_deadline);
    tcase_add_test(live, redis_restart_reconnects);
    tcase_add_test(live, redis_servers_share_the_ids);
    tcase_add_test(live, redis_looks_names_up_once);
    tcase_add_test(live, stalled_server_and_a_far_deadline);
#endif
#ifdef HAVE_LIBMEMCACHED
    tcase_add_test(live, memcache_semantics);
    tcase_add_test(live, memcache_threads_and_fork);
    tcase_add_test(live, memcache_stalled_server_costs_one_deadline);
    tcase_add_test(live, memcache_restart_reconnects);
    tcase_add_test(live, memcache_servers_as_libmemcached_chooses);
    tcase_add_test(live, memcache_looks_names_up_once);
#endif
#if defined(HAVE_HIREDIS) && defined(HAVE_LIBMEMCACHED)
    tcase_add_test(live, ipv6_servers);
#endif
    suite_add_tcase(s, live);

    tcase_add_checked_fixture(fake, pool_setup, pool_teardown);
    tcase_set_timeout(fake, 60);
#ifdef HAVE_HIREDIS
    tcase_add_test(fake, redis_dribbling_server_costs_one_deadline);
    tcase_add_test(fake, redis_refuses_oversize_and_aggregate_replies);
    tcase_add_test(fake, redis_misbehaving_server_is_an_error);
#endif
#ifdef HAVE_LIBMEMCACHED
    tcase_add_test(fake, memcache_dribbling_server_costs_one_deadline);
    tcase_add_test(fake, memcache_refuses_oversize_replies);
    tcase_add_test(fake, memcache_misbehaving_server_is_an_error);
#endif
#if defined(HAVE_HIREDIS) && defined(HAVE_LIBMEMCACHED)
    tcase_add_test(fake, closed_connection_is_an_error);
#endif
    suite_add_tcase(s, fake);
    return s;
}
