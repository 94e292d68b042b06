#include "suites.h"

#include <stdio.h>
#include <string.h>

#include "lib/cardscan.h"

#define T0 apr_time_from_sec(1800000000)
#define SEC(n) apr_time_from_sec(n)
#define U 7 /* one user */

START_TEST(opens_after_threshold_and_probes_once)
{
    cs_breaker_t b;
    int ra = 0;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 4; i++) {
        ck_assert(cs_breaker_allow(&b, T0, &ra));
        ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 100 + i, 5, SEC(10)), 0);
    }
    ck_assert(!cs_breaker_is_open(&b, T0));
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 104, 5, SEC(10)), 1);
    ck_assert(cs_breaker_is_open(&b, T0));
    ck_assert(!cs_breaker_allow(&b, T0 + SEC(1), &ra));
    ck_assert_int_eq(ra, 10);
    ck_assert_int_eq(b.opened_total, 1);
    /* after the period: one probe, the others still fail fast */
    ck_assert(cs_breaker_allow(&b, T0 + SEC(11), &ra));
    ck_assert(!cs_breaker_allow(&b, T0 + SEC(11), &ra));
    ck_assert_int_eq(ra, 1);
    /* a failed probe opens it again at once */
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(11), 0, U, 5, SEC(10)), 1);
    ck_assert(!cs_breaker_allow(&b, T0 + SEC(12), &ra));
    /* a good probe closes it */
    ck_assert(cs_breaker_allow(&b, T0 + SEC(22), &ra));
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(22), 1, U, 5, SEC(10)), 0);
    ck_assert(cs_breaker_allow(&b, T0 + SEC(22), &ra));
    ck_assert(cs_breaker_allow(&b, T0 + SEC(22), &ra));
    ck_assert_int_eq(b.failures, 0);
}
END_TEST

START_TEST(success_resets_the_count)
{
    cs_breaker_t b;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 20; i++) {
        cs_breaker_record(&b, T0, 0, U, 5, SEC(10));
        cs_breaker_record(&b, T0, 0, U, 5, SEC(10));
        cs_breaker_record(&b, T0, 1, U, 5, SEC(10));
    }
    ck_assert(!cs_breaker_is_open(&b, T0));
    /* threshold 0: never opens */
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(cs_breaker_record(&b, T0, 0, U, 0, SEC(10)), 0);
}
END_TEST

/* One user's failures, however many, never open the breaker: it takes
 * failures of CS_BREAKER_MIN_USERS distinct users in a row. */
START_TEST(one_failing_user_never_opens_it)
{
    cs_breaker_t b;
    int ra;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 50; i++)
        ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 42, 5, SEC(10)), 0);
    ck_assert(cs_breaker_allow(&b, T0, &ra));
    /* two users: still not */
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 43, 5, SEC(10)), 0);
    /* a third distinct user among the last CS_BREAKER_USERS failures */
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 44, 5, SEC(10)), 1);
    ck_assert(!cs_breaker_allow(&b, T0, &ra));
    /* users whose failures are older than the last CS_BREAKER_USERS are
     * forgotten */
    memset(&b, 0, sizeof(b));
    cs_breaker_record(&b, T0, 0, 41, 5, SEC(10));
    for (int i = 0; i < CS_BREAKER_USERS; i++)
        ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 42, 5, SEC(10)), 0);
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 43, 5, SEC(10)), 0);
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 44, 5, SEC(10)), 1);
    ck_assert(!cs_breaker_allow(&b, T0, &ra));
    /* a success forgets the users */
    ck_assert(cs_breaker_allow(&b, T0 + SEC(11), &ra));
    cs_breaker_record(&b, T0 + SEC(11), 1, 42, 5, SEC(10));
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(
            cs_breaker_record(&b, T0 + SEC(12), 0, i % 2 ? 43 : 44, 5, SEC(10)),
            0);
    /* below the minimum of users, the threshold's own number suffices */
    memset(&b, 0, sizeof(b));
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 42, 2, SEC(10)), 0);
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 42, 2, SEC(10)), 0);
    ck_assert_int_eq(cs_breaker_record(&b, T0, 0, 43, 2, SEC(10)), 1);
}
END_TEST

START_TEST(stale_probe_is_replaced)
{
    cs_breaker_t b;
    int ra;
    memset(&b, 0, sizeof(b));
    cs_breaker_record(&b, T0, 0, U, 1, SEC(10));
    ck_assert(cs_breaker_allow(&b, T0 + SEC(11), &ra));
    /* that probe's process died: after a long while another may probe */
    ck_assert(!cs_breaker_allow(&b, T0 + SEC(20), &ra));
    ck_assert(cs_breaker_allow(&b, T0 + SEC(400), &ra));
}
END_TEST

START_TEST(slots_per_endpoint)
{
    cs_breaker_t table[CS_BREAKER_SLOTS];
    memset(table, 0, sizeof(table));
    cs_breaker_t *a = cs_breaker_slot(table, "https://api.cardscan.ai/v1");
    cs_breaker_t *b = cs_breaker_slot(table, "https://sandbox.cardscan.ai/v1");
    ck_assert_ptr_ne(a, b);
    ck_assert_ptr_eq(a, cs_breaker_slot(table, "https://api.cardscan.ai/v1"));
    for (int i = 0; i < 40; i++) {
        char name[32];
        snprintf(name, sizeof(name), "https://h%d/v1", i);
        ck_assert_ptr_nonnull(cs_breaker_slot(table, name));
    }
}
END_TEST

START_TEST(metrics_render)
{
    cs_metrics_t m;
    memset(&m, 0, sizeof(m));
    cs_metrics_request(&m, CS_OUT_HIT);
    cs_metrics_request(&m, CS_OUT_HIT);
    cs_metrics_request(&m, CS_OUT_FETCHED);
    cs_metrics_cache(&m, 1);
    cs_metrics_cache(&m, 0);
    cs_metrics_wait(&m);
    cs_metrics_upstream(&m, CS_UP_OK, 200, apr_time_from_msec(30));
    cs_metrics_upstream(&m, CS_UP_OK, 503, apr_time_from_msec(700));
    cs_metrics_upstream(&m, CS_UP_TIMEOUT, 0, apr_time_from_sec(20));
    cs_breaker_record(cs_breaker_slot(m.breakers, "x"), T0, 0, U, 1, SEC(10));
    char *t = cs_metrics_render(tp, &m, T0 + SEC(1));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_requests_total{outcome=\"hit\"} 2\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_requests_total{outcome=\"fetched\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_cache_hits_total 1\n"));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_cache_misses_total 1\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_requests_total{class=\"2xx\"} 1\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_requests_total{class=\"5xx\"} 1\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_requests_total{class=\"timeout\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(
        t, "cardscan_upstream_duration_seconds_bucket{le=\"0.05\"} 1\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_duration_seconds_bucket{le=\"1\"} 2\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_duration_seconds_bucket{le=\"10\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(
        t, "cardscan_upstream_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_duration_seconds_count 3\n"));
    ck_assert_ptr_nonnull(
        strstr(t, "cardscan_upstream_duration_seconds_sum 20.730000\n"));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_singleflight_waits_total 1\n"));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_circuit_open 1\n"));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_circuit_opened_total 1\n"));
    t = cs_metrics_render(tp, &m, T0 + SEC(11));
    ck_assert_ptr_nonnull(strstr(t, "cardscan_circuit_open 0\n"));
}
END_TEST

/* Opens the breaker with failures of five users at T0. */
static void open_it(cs_breaker_t *b)
{
    memset(b, 0, sizeof(*b));
    for (int i = 0; i < 5; i++)
        cs_breaker_record(b, T0, 0, 100 + i, 5, SEC(10));
    ck_assert(cs_breaker_is_open(b, T0));
}

/* Only the probe's own failure re-opens a half-open breaker: an exchange
 * of another user that ends meanwhile does not. */
START_TEST(only_the_probe_decides)
{
    cs_breaker_t b;
    int ra = 0;
    open_it(&b);
    ck_assert(cs_breaker_allow_user(&b, T0 + SEC(11), 42, &ra));
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(11), 0, 7, 5, SEC(10)), 0);
    ck_assert(!cs_breaker_is_open(&b, T0 + SEC(11)));
    /* the probe is still in flight: others still fail fast */
    ck_assert(!cs_breaker_allow_user(&b, T0 + SEC(11), 8, &ra));
    /* its own failure re-opens it */
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(12), 0, 42, 5, SEC(10)), 1);
    ck_assert(cs_breaker_is_open(&b, T0 + SEC(12)));
}
END_TEST

/* One user whose calls always fail cannot hold the breaker open: when the
 * same user's probe fails twice in a row, it closes. Probes of different
 * users that fail (a real outage) keep it open. */
START_TEST(one_user_cannot_hold_it_open)
{
    cs_breaker_t b;
    int ra = 0;
    open_it(&b);
    ck_assert(cs_breaker_allow_user(&b, T0 + SEC(11), 42, &ra));
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(11), 0, 42, 5, SEC(10)), 1);
    ck_assert(cs_breaker_allow_user(&b, T0 + SEC(22), 42, &ra));
    ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(22), 0, 42, 5, SEC(10)), 0);
    ck_assert(!cs_breaker_is_open(&b, T0 + SEC(22)));
    ck_assert(cs_breaker_allow_user(&b, T0 + SEC(22), 9, &ra));
    /* and that user alone does not open it again */
    for (int i = 0; i < 20; i++)
        ck_assert_int_eq(cs_breaker_record(&b, T0 + SEC(23), 0, 42, 5, SEC(10)),
                         0);

    open_it(&b);
    for (int p = 0; p < 4; p++) {
        apr_time_t t = T0 + SEC(11 * (p + 1));
        ck_assert(cs_breaker_allow_user(&b, t, 200 + p, &ra));
        ck_assert_int_eq(cs_breaker_record(&b, t, 0, 200 + p, 5, SEC(10)), 1);
    }
}
END_TEST

Suite *breaker_suite(void)
{
    Suite *s = suite_create("breaker+metrics");
    TCase *tc = tcase_create("breaker");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, opens_after_threshold_and_probes_once);
    tcase_add_test(tc, success_resets_the_count);
    tcase_add_test(tc, one_failing_user_never_opens_it);
    tcase_add_test(tc, stale_probe_is_replaced);
    tcase_add_test(tc, slots_per_endpoint);
    tcase_add_test(tc, metrics_render);
    tcase_add_test(tc, only_the_probe_decides);
    tcase_add_test(tc, one_user_cannot_hold_it_open);
    suite_add_tcase(s, tc);
    return s;
}
