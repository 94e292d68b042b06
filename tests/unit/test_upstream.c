/* The real libcurl client against the bundled mock on 127.0.0.1 (path in
 * CS_MOCK, set by make check): status, bodies, caps, headers, timeouts,
 * redirects, TLS verification and connection reuse. */
#include "suites.h"

#include <apr_strings.h>
#include <apr_tables.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

Suite *upstream_suite(void)
{
    Suite *s = suite_create("upstream");
    TCase *tc = tcase_create("upstream");
    TCase *live = tcase_create("against the mock");

    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, url_encodes_the_user);
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
    tcase_add_test(live, refuses_a_peer_that_does_not_speak_tls);
    tcase_add_test(live, reuses_the_connection);
    tcase_add_test(live, trace_masks_the_key);
    suite_add_tcase(s, live);
    return s;
}
