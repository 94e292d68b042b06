/* The Prometheus rendering of the shared counters: byte for byte, so that a
 * change of the code never renames a series that dashboards and alerting
 * rules (conf/prometheus/cardscan-alerts.yml) rely on. */
#include "suites.h"

#include <string.h>

#include "lib/cardscan.h"

#define T0 apr_time_from_sec(1800000000)
#define SEC(n) apr_time_from_sec(n)

/* Every counter a distinct value, so that a swapped label shows. */
static void fill(cs_metrics_t *m)
{
    memset(m, 0, sizeof(*m));
    for (int i = 0; i < CS_OUT_COUNT; i++)
        m->requests[i] = 100 + i;
    m->cache_hits = 200;
    m->cache_misses = 201;
    for (int i = 0; i < CS_CLASS_COUNT; i++)
        m->upstream[i] = 300 + i;
    for (int i = 0; i < CS_LATENCY_BUCKETS; i++)
        m->latency_bucket[i] = 1 + i;
    m->latency_count = 60;
    m->latency_sum_usec = 12345678;
    m->singleflight_waits = 400;
    for (int i = 0; i < CS_REFRESH_COUNT; i++)
        m->refreshes[i] = 500 + i;
    m->store_errors = 600;
    m->breakers[0].endpoint_hash = 1;
    m->breakers[0].open_until = T0 + SEC(5);
    m->breakers[0].opened_total = 3;
    m->breakers[1].endpoint_hash = 2;
    m->breakers[1].opened_total = 4;
    m->store_backoff.until = T0 + SEC(2);
    m->upstream_last_success = T0 - SEC(30) + 123456;
    m->identity_changes = 700;
}

/* the rendering of fill() at T0, as the module has always printed it */
static const char golden[] =
    "# HELP cardscan_requests_total Requests to cardscan-session by outcome.\n"
    "# TYPE cardscan_requests_total counter\n"
    "cardscan_requests_total{outcome=\"hit\"} 100\n"
    "cardscan_requests_total{outcome=\"fetched\"} 101\n"
    "cardscan_requests_total{outcome=\"waited\"} 102\n"
    "cardscan_requests_total{outcome=\"refreshed\"} 103\n"
    "cardscan_requests_total{outcome=\"denied\"} 104\n"
    "cardscan_requests_total{outcome=\"error\"} 105\n"
    "cardscan_requests_total{outcome=\"unavailable\"} 106\n"
    "# HELP cardscan_cache_hits_total Token cache hits.\n"
    "# TYPE cardscan_cache_hits_total counter\n"
    "cardscan_cache_hits_total 200\n"
    "# HELP cardscan_cache_misses_total Token cache misses.\n"
    "# TYPE cardscan_cache_misses_total counter\n"
    "cardscan_cache_misses_total 201\n"
    "# HELP cardscan_upstream_requests_total Calls to the CardScan API by "
    "result.\n"
    "# TYPE cardscan_upstream_requests_total counter\n"
    "cardscan_upstream_requests_total{class=\"2xx\"} 300\n"
    "cardscan_upstream_requests_total{class=\"3xx\"} 301\n"
    "cardscan_upstream_requests_total{class=\"4xx\"} 302\n"
    "cardscan_upstream_requests_total{class=\"5xx\"} 303\n"
    "cardscan_upstream_requests_total{class=\"timeout\"} 304\n"
    "cardscan_upstream_requests_total{class=\"connect\"} 305\n"
    "cardscan_upstream_requests_total{class=\"tls\"} 306\n"
    "cardscan_upstream_requests_total{class=\"other\"} 307\n"
    "# HELP cardscan_upstream_duration_seconds Duration of calls to the "
    "CardScan API.\n"
    "# TYPE cardscan_upstream_duration_seconds histogram\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.01\"} 1\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.025\"} 3\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.05\"} 6\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.1\"} 10\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.25\"} 15\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"0.5\"} 21\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"1\"} 28\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"2.5\"} 36\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"5\"} 45\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"10\"} 55\n"
    "cardscan_upstream_duration_seconds_bucket{le=\"+Inf\"} 60\n"
    "cardscan_upstream_duration_seconds_sum 12.345678\n"
    "cardscan_upstream_duration_seconds_count 60\n"
    "# HELP cardscan_singleflight_waits_total Requests that waited for another "
    "request's call for the same user.\n"
    "# TYPE cardscan_singleflight_waits_total counter\n"
    "cardscan_singleflight_waits_total 400\n"
    "# HELP cardscan_refreshes_total Refreshes of a token ahead of its expiry, "
    "by result.\n"
    "# TYPE cardscan_refreshes_total counter\n"
    "cardscan_refreshes_total{result=\"ok\"} 500\n"
    "cardscan_refreshes_total{result=\"failed\"} 501\n"
    "cardscan_refreshes_total{result=\"skipped\"} 502\n"
    "# HELP cardscan_cache_errors_total Token cache operations that failed or "
    "passed their deadline.\n"
    "# TYPE cardscan_cache_errors_total counter\n"
    "cardscan_cache_errors_total 600\n"
    "# HELP cardscan_circuit_open Whether the circuit breaker of an upstream "
    "is open (1) or closed (0).\n"
    "# TYPE cardscan_circuit_open gauge\n"
    "cardscan_circuit_open 1\n"
    "# HELP cardscan_circuit_opened_total Times a circuit breaker opened.\n"
    "# TYPE cardscan_circuit_opened_total counter\n"
    "cardscan_circuit_opened_total 7\n"
    "# HELP cardscan_cache_paused Whether the token cache is left alone after "
    "a failure (1) or in use (0).\n"
    "# TYPE cardscan_cache_paused gauge\n"
    "cardscan_cache_paused 1\n"
    "# HELP cardscan_upstream_last_success_timestamp_seconds When the CardScan "
    "API last answered in 2xx (0: not since the start).\n"
    "# TYPE cardscan_upstream_last_success_timestamp_seconds gauge\n"
    "cardscan_upstream_last_success_timestamp_seconds 1799999970\n"
    "# HELP cardscan_identity_changes_total New tokens whose IdentityId "
    "differed from the one pinned for the user.\n"
    "# TYPE cardscan_identity_changes_total counter\n"
    "cardscan_identity_changes_total 700\n";

START_TEST(rendering_is_stable)
{
    cs_metrics_t m;
    const char *out;

    fill(&m);
    out = cs_metrics_render(tp, &m, T0);
    ck_assert_str_eq(out, golden);
}
END_TEST

/* The states alerting rules watch: the cache's back-off ends at its time,
 * the breaker's at its own. */
START_TEST(states_follow_the_clock)
{
    cs_metrics_t m;

    fill(&m);
    ck_assert_ptr_nonnull(strstr(cs_metrics_render(tp, &m, T0 + SEC(2) - 1),
                                 "\ncardscan_cache_paused 1\n"));
    ck_assert_ptr_nonnull(strstr(cs_metrics_render(tp, &m, T0 + SEC(2)),
                                 "\ncardscan_cache_paused 0\n"));
    ck_assert_ptr_nonnull(strstr(cs_metrics_render(tp, &m, T0 + SEC(5)),
                                 "\ncardscan_circuit_open 0\n"));
    memset(&m, 0, sizeof(m));
    ck_assert_ptr_nonnull(
        strstr(cs_metrics_render(tp, &m, T0),
               "\ncardscan_upstream_last_success_timestamp_seconds 0\n"));
}
END_TEST

/* Only an answer in 2xx is a success; every change of identity counts. */
START_TEST(last_success_and_identity_changes)
{
    cs_metrics_t m;
    apr_time_t before;

    memset(&m, 0, sizeof(m));
    cs_metrics_upstream(&m, CS_UP_OK, 503, SEC(1));
    cs_metrics_upstream(&m, CS_UP_TIMEOUT, 0, SEC(5));
    cs_metrics_upstream(&m, CS_UP_OK, 401, SEC(1));
    ck_assert_int_eq(m.upstream_last_success, 0);
    before = apr_time_now();
    cs_metrics_upstream(&m, CS_UP_OK, 200, SEC(1));
    ck_assert_int_ge(m.upstream_last_success, before);
    ck_assert_int_le(m.upstream_last_success, apr_time_now());
    cs_metrics_identity_change(&m);
    cs_metrics_identity_change(&m);
    cs_metrics_identity_change(NULL);
    ck_assert_int_eq(m.identity_changes, 2);
}
END_TEST

Suite *metrics_suite(void)
{
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("metrics");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, rendering_is_stable);
    tcase_add_test(tc, states_follow_the_clock);
    tcase_add_test(tc, last_success_and_identity_changes);
    suite_add_tcase(s, tc);
    return s;
}
