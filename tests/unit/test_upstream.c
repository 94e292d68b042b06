/* The real libcurl client against the bundled mock on 127.0.0.1 (path in
 * CS_MOCK, set by make check): status, bodies, caps, headers, timeouts,
 * redirects, TLS verification and connection reuse. */
#include "suites.h"

#include <apr_allocator.h>
#include <apr_strings.h>
#include <apr_tables.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include "lib/cardscan.h"

#define KEY "sk_test_cardscan_ai_unitkey0123456789"

static pid_t mock_pid;
static int http_port;
static char dir[64];
static cs_upstream_t *client;
static apr_pool_t *client_pool;

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void mock_start(void)
{
    const char *mock = getenv("CS_MOCK");
    char portfile[128];
    FILE *f;

    ck_assert_msg(mock != NULL, "CS_MOCK is not set (make check sets it)");
    strcpy(dir, "/tmp/cs-unit-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(portfile, sizeof(portfile), "%s/ports", dir);
    mock_pid = fork();
    ck_assert_int_ge(mock_pid, 0);
    if (mock_pid == 0) {
        execl(mock, mock, "--port-file", portfile, "--api-key", KEY,
              (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 500 && !(f = fopen(portfile, "r")); i++)
        sleep_ms(20);
    ck_assert_msg(f != NULL, "the mock did not start");
    ck_assert_int_eq(fscanf(f, "http=%d", &http_port), 1);
    fclose(f);
    unlink(portfile);
}

static void mock_stop(void)
{
    if (mock_pid > 0) {
        kill(mock_pid, SIGTERM);
        waitpid(mock_pid, NULL, 0);
    }
    rmdir(dir);
}

/* A control request to the mock with a plain socket, so that libcurl's
 * connection counts stay the client's own. Returns the body. */
static char *control(apr_pool_t *p, const char *path)
{
    struct sockaddr_in a = {0};
    char req[512], buf[65536];
    size_t got = 0;
    ssize_t n;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    char *body;

    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)http_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
    snprintf(req, sizeof(req),
             "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
             path);
    ck_assert_int_eq(write(s, req, strlen(req)), (ssize_t)strlen(req));
    while ((n = read(s, buf + got, sizeof(buf) - 1 - got)) > 0)
        got += (size_t)n;
    close(s);
    buf[got] = '\0';
    body = strstr(buf, "\r\n\r\n");
    return apr_pstrdup(p, body ? body + 4 : "");
}

static long stat_of(const char *name)
{
    char *stats = control(tp, "/_mock/stats"), *at;
    char key[64];
    snprintf(key, sizeof(key), "\"%s\":", name);
    at = strstr(stats, key);
    ck_assert_msg(at != NULL, "no %s in %s", name, stats);
    return strtol(at + strlen(key), NULL, 10);
}

/* A client per test, made and freed in the process that runs the test
 * (check forks one per test): nothing of it outlives the test. */
static void setup(void)
{
    const char *err;
    pool_setup();
    control(tp, "/_mock/reset");
    apr_pool_create(&client_pool, NULL);
    ck_assert_int_eq(cs_upstream_create(client_pool, &client, &err),
                     APR_SUCCESS);
}

static void teardown(void)
{
    apr_pool_destroy(client_pool);
    client = NULL;
    pool_teardown();
}

static cs_upstream_req_t request(const char *endpoint, const char *user,
                                 cs_key_t *key)
{
    cs_upstream_req_t r = {0};
    r.endpoint = endpoint;
    r.user_id = user;
    r.key = key;
    r.timeout = apr_time_from_sec(5);
    r.connect_timeout = apr_time_from_sec(2);
    r.max_body = 64 * 1024;
    return r;
}

static const char *endpoint(void)
{
    return apr_psprintf(tp, "http://127.0.0.1:%d/v1", http_port);
}

static cs_key_t *key(const char *secret)
{
    cs_key_t *k;
    const char *err;
    ck_assert_int_eq(cs_key_parse(tp, secret, &k, &err), APR_SUCCESS);
    return k;
}

START_TEST(url_encodes_the_user)
{
    ck_assert_str_eq(
        cs_upstream_url(tp, "http://127.0.0.1:9/v1", "a&user_id=b"),
        "http://127.0.0.1:9/v1/access-token?user_id=a%26user_id%3Db");
}
END_TEST

static const char *masked(const char *line)
{
    char out[1024];
    cs_trace_mask(out, sizeof(out), line, strlen(line));
    return apr_pstrdup(tp, out);
}

START_TEST(trace_mask_holds_anywhere_in_a_line)
{
    static const char *secret_lines[] = {
        "Authorization: Bearer " KEY,
        "authorization:Bearer " KEY,
        /* libcurl 7.88 over HTTP/2 */
        "h2h3 [authorization: Bearer " KEY "]",
        /* libcurl 8 over HTTP/2 and HTTP/3 */
        "[HTTP/2] [1] [authorization: Bearer " KEY "]",
        "[HTTP/3] [0] [AUTHORIZATION: Bearer " KEY "]",
        "Proxy-Authorization: Basic dXNlcjpwYXNzd29yZDEyMzQ=",
        "h2h3 [proxy-authorization: Basic dXNlcjpwYXNzd29yZDEyMzQ=]",
        /* the key or a bearer credential wherever it shows up */
        "sending Bearer " KEY " now",
        "odd: " KEY,
        "odd: sk_live_cardscan_ai_unitkey0123456789",
        "odd: secret_test_unitkey0123456789",
    };
    for (size_t i = 0; i < sizeof(secret_lines) / sizeof(secret_lines[0]);
         i++) {
        const char *m = masked(secret_lines[i]);
        ck_assert_msg(strstr(m, "unitkey0123456789") == NULL, "%s -> %s",
                      secret_lines[i], m);
        ck_assert_msg(strstr(m, "dXNlcjpwYXNzd29yZDEyMzQ") == NULL, "%s -> %s",
                      secret_lines[i], m);
        ck_assert_msg(strstr(m, "<masked>") != NULL, "%s -> %s",
                      secret_lines[i], m);
    }
    /* what is not a credential stays readable */
    ck_assert_str_eq(masked("GET /v1/access-token?user_id=a HTTP/1.1"),
                     "GET /v1/access-token?user_id=a HTTP/1.1");
    ck_assert_str_eq(masked("h2h3 [:method: GET]"), "h2h3 [:method: GET]");
    ck_assert_str_eq(masked("h2h3 [authorization: Bearer " KEY "]"),
                     "h2h3 [authorization: <masked>");
    /* a line longer than the buffer is masked before it is cut */
    {
        char big[3000], out[64];
        memset(big, 'x', sizeof(big));
        memcpy(big + 40, "authorization: Bearer " KEY,
               strlen("authorization: Bearer " KEY));
        cs_trace_mask(out, sizeof(out), big, sizeof(big));
        ck_assert_uint_lt(strlen(out), sizeof(out));
        ck_assert_ptr_null(strstr(out, "unitkey"));
        ck_assert_ptr_null(strstr(out, "Bearer sk"));
    }
}
END_TEST

START_TEST(retry_after_is_clamped)
{
    apr_time_t now = apr_time_from_sec(1800000000); /* 2027-01-15T08:00:00Z */
    ck_assert_int_eq(cs_retry_after(NULL, now), 0);
    ck_assert_int_eq(cs_retry_after("", now), 0);
    ck_assert_int_eq(cs_retry_after("soon", now), 0);
    ck_assert_int_eq(cs_retry_after("-5", now), 0);
    ck_assert_int_eq(cs_retry_after("12abc", now), 0);
    ck_assert_int_eq(cs_retry_after("17", now), 17);
    ck_assert_int_eq(cs_retry_after(" 17 ", now), 17);
    ck_assert_int_eq(cs_retry_after("0", now), 1);
    ck_assert_int_eq(cs_retry_after("3600", now), 3600);
    ck_assert_int_eq(cs_retry_after("3601", now), 3600);
    ck_assert_int_eq(cs_retry_after("86400", now), 3600);
    ck_assert_int_eq(cs_retry_after("99999999999999999999999", now), 3600);
    /* HTTP-dates: in 2 minutes, long past, far in the future */
    ck_assert_int_eq(cs_retry_after("Fri, 15 Jan 2027 08:02:00 GMT", now), 120);
    ck_assert_int_eq(cs_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now), 1);
    ck_assert_int_eq(cs_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
                     3600);
    ck_assert_int_eq(cs_retry_after("Fri, 99 Dec 2027 23:59:59 GMT", now), 0);
}
END_TEST

START_TEST(fetches_a_token)
{
    cs_upstream_req_t r = request(endpoint(), "x y&user_id=b", key(KEY));
    cs_upstream_resp_t resp;
    cs_token_t tok;
    const char *err = NULL;

    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_OK);
    ck_assert_int_eq(resp.status, 200);
    ck_assert_int_eq(cs_token_parse(tp, resp.body, resp.body_len,
                                    apr_time_now(), &tok, &err),
                     APR_SUCCESS);
    ck_assert(tok.has_exp && tok.has_iat);
    /* exactly one user_id, decoded back to the id */
    ck_assert_ptr_nonnull(strstr(control(tp, "/_mock/stats"),
                                 "\"user_ids\":[\"x y&user_id=b\"]"));
}
END_TEST

START_TEST(reports_status_and_retry_after)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;

    control(tp, "/_mock/config?fault=429&retry_after=17");
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_OK);
    ck_assert_int_eq(resp.status, 429);
    ck_assert_str_eq(resp.retry_after, "17");
    ck_assert(!cs_upstream_retryable(&resp));
    ck_assert(!cs_upstream_failed(&resp));

    control(tp, "/_mock/config?fault=503");
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.status, 503);
    ck_assert(cs_upstream_retryable(&resp));
    ck_assert(cs_upstream_failed(&resp));

    control(tp, "/_mock/config?fault=none");
    r.key = key("sk_test_cardscan_ai_notregistered000");
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.status, 401);
    ck_assert(!cs_upstream_retryable(&resp));
}
END_TEST

START_TEST(caps_the_body)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    control(tp, "/_mock/config?fault=oversized");
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_TOO_BIG);
    ck_assert_ptr_nonnull(strstr(resp.detail, "65536"));
    ck_assert_uint_le(resp.body_len, 64 * 1024);
}
END_TEST

START_TEST(does_not_follow_redirects)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    control(tp, "/_mock/config?fault=redirect");
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_OK);
    ck_assert_int_eq(resp.status, 302);
    ck_assert_int_eq(stat_of("calls"), 1);
}
END_TEST

START_TEST(times_out)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    apr_time_t t0;
    control(tp, "/_mock/config?latency_ms=3000");
    r.timeout = apr_time_from_msec(500);
    t0 = apr_time_now();
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_TIMEOUT);
    ck_assert_int_lt(apr_time_now() - t0, apr_time_from_msec(2500));
}
END_TEST

START_TEST(connection_refused)
{
    cs_upstream_req_t r = request("http://127.0.0.1:1/v1", "alice", key(KEY));
    cs_upstream_resp_t resp;
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_CONNECT);
    ck_assert(cs_upstream_retryable(&resp));
    ck_assert_ptr_nonnull(resp.detail);
    ck_assert_ptr_null(strstr(resp.detail, KEY));
    /* ECONNREFUSED is no permission problem */
    ck_assert_ptr_null(strstr(resp.detail, "SELinux"));
}
END_TEST

/* From now on connect(2) fails with EACCES in this process, as it does for
 * httpd under an SELinux policy that denies it name_connect. */
static int deny_connect(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_connect, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(f) / sizeof(f[0]), f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

START_TEST(hints_at_selinux_when_connect_is_denied)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    char out[2048] = "";
    int fds[2], status;
    ssize_t n, got = 0;
    pid_t pid;

    ck_assert_ptr_nonnull(cs_upstream_os_hint(EACCES));
    ck_assert_ptr_nonnull(strstr(cs_upstream_os_hint(EACCES),
                                 "setsebool -P httpd_can_network_connect 1"));
    ck_assert_ptr_null(cs_upstream_os_hint(ECONNREFUSED));
    ck_assert_ptr_null(cs_upstream_os_hint(0));

    /* a real EACCES from connect(2), in a child process of its own (the
     * filter cannot be taken off again) with a client of its own (no kept
     * connection to reuse) */
    ck_assert_int_eq(pipe(fds), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        cs_upstream_t *u;
        const char *err;
        close(fds[0]);
        if (deny_connect() != 0) {
            dprintf(fds[1], "no seccomp filter: %s", strerror(errno));
            _exit(2);
        }
        if (cs_upstream_create(tp, &u, &err) != APR_SUCCESS)
            _exit(3);
        cs_upstream_fetch(u, tp, &r, &resp);
        dprintf(fds[1], "%d %s", (int)resp.result,
                resp.detail ? resp.detail : "(no detail)");
        _exit(0);
    }
    close(fds[1]);
    while (got < (ssize_t)sizeof(out) - 1 &&
           (n = read(fds[0], out + got, sizeof(out) - 1 - got)) > 0)
        got += n;
    close(fds[0]);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the child failed (status %d): %s", status, out);
    ck_assert_msg(atoi(out) == CS_UP_CONNECT, "not a connect failure: %s", out);
    ck_assert_msg(strstr(out, "(permission denied: on SELinux systems allow "
                              "httpd's outbound connections: setsebool -P "
                              "httpd_can_network_connect 1; see "
                              "docs/platforms.md)"),
                  "no SELinux hint in: %s", out);
}
END_TEST

START_TEST(refuses_a_peer_that_does_not_speak_tls)
{
    /* the mock's plain-HTTP port spoken to as https: the handshake fails */
    cs_upstream_req_t r =
        request(apr_psprintf(tp, "https://127.0.0.1:%d/v1", http_port), "alice",
                key(KEY));
    cs_upstream_resp_t resp;
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_ne(resp.result, CS_UP_OK);
}
END_TEST

START_TEST(reuses_the_connection)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    long opened = 0;
    for (int i = 0; i < 20; i++) {
        r.user_id = apr_psprintf(tp, "user-%d", i);
        cs_upstream_fetch(client, tp, &r, &resp);
        ck_assert_int_eq(resp.status, 200);
        opened += resp.new_connections;
    }
    ck_assert_int_le(opened, 1);
    ck_assert_int_eq(stat_of("calls"), 20);
    ck_assert_int_le(stat_of("connections"), 1);
}
END_TEST

static void trace_collect(void *baton, const char *line)
{
    apr_array_header_t *lines = baton;
    APR_ARRAY_PUSH(lines, const char *) = apr_pstrdup(lines->pool, line);
}

START_TEST(trace_masks_the_key)
{
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    apr_array_header_t *lines = apr_array_make(tp, 16, sizeof(const char *));
    int saw_auth = 0;

    r.trace = trace_collect;
    r.trace_baton = lines;
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.status, 200);
    ck_assert_int_gt(lines->nelts, 3);
    for (int i = 0; i < lines->nelts; i++) {
        const char *l = APR_ARRAY_IDX(lines, i, const char *);
        ck_assert_msg(strstr(l, "unitkey0123456789") == NULL, "key in: %s", l);
        /* no body: the token never reaches the trace */
        ck_assert_msg(strstr(l, "\"Token\"") == NULL, "body in: %s", l);
        if (strstr(l, "Authorization: <masked>"))
            saw_auth = 1;
    }
    ck_assert(saw_auth);
}
END_TEST

START_TEST(loopback_http_never_goes_through_the_proxy)
{
    /* CardScanProxy names a proxy that is not there: the http:// loopback
     * endpoint is called directly, so the key never crosses to a proxy in
     * clear */
    cs_upstream_req_t r = request(endpoint(), "alice", key(KEY));
    cs_upstream_resp_t resp;
    r.proxy = "http://127.0.0.1:1";
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_OK);
    ck_assert_int_eq(resp.status, 200);
    ck_assert_int_eq(stat_of("calls"), 1);
    /* https goes through it (here: fails to connect to it) */
    r.endpoint = apr_psprintf(tp, "https://127.0.0.1:%d/v1", http_port);
    cs_upstream_fetch(client, tp, &r, &resp);
    ck_assert_int_eq(resp.result, CS_UP_CONNECT);
    ck_assert_int_eq(stat_of("calls"), 1);
}
END_TEST

/* Several worker threads of one process share the client at once: more
 * threads than idle handles are kept, DNS (localhost) shared. */
#define FETCH_THREADS 40
#define FETCHES_PER_THREAD 3

typedef struct {
    const char *endpoint;
    cs_key_t *key;
    int id, ok;
    apr_pool_t *p;
} fetch_job;

static void *fetch_many(void *data)
{
    fetch_job *job = data;
    for (int i = 0; i < FETCHES_PER_THREAD; i++) {
        cs_upstream_req_t r = request(job->endpoint, NULL, job->key);
        cs_upstream_resp_t resp;
        r.user_id = apr_psprintf(job->p, "t%d-%d", job->id, i);
        cs_upstream_fetch(client, job->p, &r, &resp);
        if (resp.result == CS_UP_OK && resp.status == 200)
            job->ok++;
    }
    return NULL;
}

START_TEST(concurrent_fetches)
{
    pthread_t th[FETCH_THREADS];
    fetch_job jobs[FETCH_THREADS];
    apr_allocator_t *alloc;
    cs_key_t *k = key(KEY);
    const char *ep = apr_psprintf(tp, "http://localhost:%d/v1", http_port);
    int ok = 0;

    control(tp, "/_mock/config?latency_ms=20");
    for (int i = 0; i < FETCH_THREADS; i++) {
        jobs[i].endpoint = ep;
        jobs[i].key = k;
        jobs[i].id = i;
        jobs[i].ok = 0;
        /* a pool and allocator per thread, as an MPM's worker has */
        ck_assert_int_eq(apr_allocator_create(&alloc), APR_SUCCESS);
        ck_assert_int_eq(apr_pool_create_ex(&jobs[i].p, NULL, NULL, alloc),
                         APR_SUCCESS);
        apr_allocator_owner_set(alloc, jobs[i].p);
    }
    /* plain threads: APR's own would share tp between them */
    for (int i = 0; i < FETCH_THREADS; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, fetch_many, &jobs[i]), 0);
    for (int i = 0; i < FETCH_THREADS; i++) {
        pthread_join(th[i], NULL);
        ok += jobs[i].ok;
    }
    for (int i = 0; i < FETCH_THREADS; i++)
        apr_pool_destroy(jobs[i].p);
    ck_assert_int_eq(ok, FETCH_THREADS * FETCHES_PER_THREAD);
    ck_assert_int_eq(stat_of("calls"), FETCH_THREADS * FETCHES_PER_THREAD);
    /* kept connections are bounded by the idle handles, not the threads */
    ck_assert_int_le(stat_of("connections"), FETCH_THREADS);
}
END_TEST

Suite *upstream_suite(void)
{
    Suite *s = suite_create("upstream");
    TCase *tc = tcase_create("upstream");
    TCase *live = tcase_create("against the mock");

    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, url_encodes_the_user);
    tcase_add_test(tc, trace_mask_holds_anywhere_in_a_line);
    tcase_add_test(tc, retry_after_is_clamped);
    suite_add_tcase(s, tc);

    /* one mock for the whole case; each test resets it */
    tcase_add_unchecked_fixture(live, mock_start, mock_stop);
    tcase_add_checked_fixture(live, setup, teardown);
    tcase_set_timeout(live, 30);
    tcase_add_test(live, fetches_a_token);
    tcase_add_test(live, reports_status_and_retry_after);
    tcase_add_test(live, caps_the_body);
    tcase_add_test(live, does_not_follow_redirects);
    tcase_add_test(live, times_out);
    tcase_add_test(live, connection_refused);
    tcase_add_test(live, hints_at_selinux_when_connect_is_denied);
    tcase_add_test(live, refuses_a_peer_that_does_not_speak_tls);
    tcase_add_test(live, reuses_the_connection);
    tcase_add_test(live, trace_masks_the_key);
    tcase_add_test(live, loopback_http_never_goes_through_the_proxy);
    tcase_add_test(live, concurrent_fetches);
    suite_add_tcase(s, live);
    return s;
}
