/* Counters shared by every child process, and their Prometheus rendering. */
#include "cardscan.h"

#include <apr_strings.h>
#include <apr_tables.h>
#include <string.h>

const double cs_latency_bounds[CS_LATENCY_BUCKETS] = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

/* apr_psprintf's %g drops the leading zero: keep the labels as text */
static const char *const bound_labels[CS_LATENCY_BUCKETS] = {
    "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10"};

static const char *const outcome_names[CS_OUT_COUNT] = {
    "hit", "fetched", "waited", "refreshed", "denied", "error", "unavailable"};

static const char *const refresh_names[CS_REFRESH_COUNT] = {"ok", "failed",
                                                            "skipped"};

static const char *const class_names[CS_CLASS_COUNT] = {
    "2xx", "3xx", "4xx", "5xx", "timeout", "connect", "tls", "other"};

#define ADD(field, v) __atomic_add_fetch(&(field), (v), __ATOMIC_RELAXED)
#define GET(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

void cs_metrics_request(cs_metrics_t *m, cs_outcome_e outcome)
{
    if (m && outcome < CS_OUT_COUNT)
        ADD(m->requests[outcome], 1);
}

const char *cs_outcome_name(cs_outcome_e outcome)
{
    return (unsigned)outcome < CS_OUT_COUNT ? outcome_names[outcome]
                                            : "unknown";
}

void cs_metrics_cache(cs_metrics_t *m, int hit)
{
    if (!m)
        return;
    if (hit)
        ADD(m->cache_hits, 1);
    else
        ADD(m->cache_misses, 1);
}

void cs_metrics_wait(cs_metrics_t *m)
{
    if (m)
        ADD(m->singleflight_waits, 1);
}

void cs_metrics_refresh(cs_metrics_t *m, cs_refresh_e result)
{
    if (m && result < CS_REFRESH_COUNT)
        ADD(m->refreshes[result], 1);
}

void cs_metrics_upstream(cs_metrics_t *m, cs_up_result_e result, int status,
                         apr_interval_time_t elapsed)
{
    cs_class_e c;
    double secs = (double)elapsed / APR_USEC_PER_SEC;
    int b;

    if (!m)
        return;
    switch (result) {
    case CS_UP_OK:
        c = status >= 200 && status < 600 ? (cs_class_e)(status / 100 - 2)
                                          : CS_CLASS_OTHER;
        if (status < 200)
            c = CS_CLASS_OTHER;
        break;
    case CS_UP_TIMEOUT:
        c = CS_CLASS_TIMEOUT;
        break;
    case CS_UP_CONNECT:
        c = CS_CLASS_CONNECT;
        break;
    case CS_UP_TLS:
        c = CS_CLASS_TLS;
        break;
    default:
        c = CS_CLASS_OTHER;
    }
    ADD(m->upstream[c], 1);
    if (c == CS_CLASS_2XX)
        __atomic_store_n(&m->upstream_last_success, apr_time_now(),
                         __ATOMIC_RELAXED);
    for (b = 0; b < CS_LATENCY_BUCKETS && secs > cs_latency_bounds[b]; b++)
        ;
    if (b < CS_LATENCY_BUCKETS)
        ADD(m->latency_bucket[b], 1);
    ADD(m->latency_count, 1);
    ADD(m->latency_sum_usec, (apr_uint64_t)(elapsed > 0 ? elapsed : 0));
}

/* One labelled counter: its HELP and TYPE lines, then a line per label
 * value. */
static void render_labelled(apr_pool_t *p, apr_array_header_t *out,
                            const char *name, const char *help,
                            const char *label, const char *const *values,
                            const apr_uint64_t *counts, int n)
{
    APR_ARRAY_PUSH(out, char *) =
        apr_psprintf(p, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
    for (int i = 0; i < n; i++)
        APR_ARRAY_PUSH(out, char *) =
            apr_psprintf(p, "%s{%s=\"%s\"} %" APR_UINT64_T_FMT "\n", name,
                         label, values[i], GET(counts[i]));
}

void cs_metrics_identity_change(cs_metrics_t *m)
{
    if (m)
        ADD(m->identity_changes, 1);
}

char *cs_metrics_render(apr_pool_t *p, const cs_metrics_t *cm, apr_time_t now)
{
    cs_metrics_t *m = (cs_metrics_t *)cm; /* atomics want non-const */
    apr_array_header_t *out = apr_array_make(p, 64, sizeof(char *));
    apr_uint64_t cum = 0, open = 0, opened = 0;

#define LINE(...) (APR_ARRAY_PUSH(out, char *) = apr_psprintf(p, __VA_ARGS__))
    render_labelled(p, out, "cardscan_requests_total",
                    "Requests to cardscan-session by outcome.", "outcome",
                    outcome_names, m->requests, CS_OUT_COUNT);
    LINE("# HELP cardscan_cache_hits_total Token cache hits.\n"
         "# TYPE cardscan_cache_hits_total counter\n"
         "cardscan_cache_hits_total %" APR_UINT64_T_FMT "\n",
         GET(m->cache_hits));
    LINE("# HELP cardscan_cache_misses_total Token cache misses.\n"
         "# TYPE cardscan_cache_misses_total counter\n"
         "cardscan_cache_misses_total %" APR_UINT64_T_FMT "\n",
         GET(m->cache_misses));
    render_labelled(p, out, "cardscan_upstream_requests_total",
                    "Calls to the CardScan API by result.", "class",
                    class_names, m->upstream, CS_CLASS_COUNT);
    LINE("# HELP cardscan_upstream_duration_seconds Duration of calls to the "
         "CardScan API.\n# TYPE cardscan_upstream_duration_seconds "
         "histogram\n");
    for (int i = 0; i < CS_LATENCY_BUCKETS; i++) {
        cum += GET(m->latency_bucket[i]);
        LINE("cardscan_upstream_duration_seconds_bucket{le=\"%s\"} "
             "%" APR_UINT64_T_FMT "\n",
             bound_labels[i], cum);
    }
    LINE("cardscan_upstream_duration_seconds_bucket{le=\"+Inf\"} "
         "%" APR_UINT64_T_FMT "\n",
         GET(m->latency_count));
    LINE("cardscan_upstream_duration_seconds_sum %.6f\n",
         (double)GET(m->latency_sum_usec) / APR_USEC_PER_SEC);
    LINE("cardscan_upstream_duration_seconds_count %" APR_UINT64_T_FMT "\n",
         GET(m->latency_count));
    LINE("# HELP cardscan_singleflight_waits_total Requests that waited for "
         "another request's call for the same user.\n"
         "# TYPE cardscan_singleflight_waits_total counter\n"
         "cardscan_singleflight_waits_total %" APR_UINT64_T_FMT "\n",
         GET(m->singleflight_waits));
    render_labelled(p, out, "cardscan_refreshes_total",
                    "Refreshes of a token ahead of its expiry, by result.",
                    "result", refresh_names, m->refreshes, CS_REFRESH_COUNT);
    LINE("# HELP cardscan_cache_errors_total Token cache operations that "
         "failed or passed their deadline.\n"
         "# TYPE cardscan_cache_errors_total counter\n"
         "cardscan_cache_errors_total %" APR_UINT64_T_FMT "\n",
         GET(m->store_errors));
    for (int i = 0; i < CS_BREAKER_SLOTS; i++) {
        if (!GET(m->breakers[i].endpoint_hash))
            continue;
        open += cs_breaker_is_open(&m->breakers[i], now);
        opened += GET(m->breakers[i].opened_total);
    }
    LINE("# HELP cardscan_circuit_open Whether the circuit breaker of an "
         "upstream is open (1) or closed (0).\n"
         "# TYPE cardscan_circuit_open gauge\n"
         "cardscan_circuit_open %d\n",
         open ? 1 : 0);
    LINE("# HELP cardscan_circuit_opened_total Times a circuit breaker "
         "opened.\n# TYPE cardscan_circuit_opened_total counter\n"
         "cardscan_circuit_opened_total %" APR_UINT64_T_FMT "\n",
         opened);
    LINE("# HELP cardscan_cache_paused Whether the token cache is left alone "
         "after a failure (1) or in use (0).\n"
         "# TYPE cardscan_cache_paused gauge\n"
         "cardscan_cache_paused %d\n",
         now < GET(m->store_backoff.until) ? 1 : 0);
    LINE("# HELP cardscan_upstream_last_success_timestamp_seconds When the "
         "CardScan API last answered in 2xx (0: not since the start).\n"
         "# TYPE cardscan_upstream_last_success_timestamp_seconds gauge\n"
         "cardscan_upstream_last_success_timestamp_seconds %" APR_INT64_T_FMT
         "\n",
         (apr_int64_t)apr_time_sec(GET(m->upstream_last_success)));
    LINE("# HELP cardscan_identity_changes_total New tokens whose IdentityId "
         "differed from the one pinned for the user.\n"
         "# TYPE cardscan_identity_changes_total counter\n"
         "cardscan_identity_changes_total %" APR_UINT64_T_FMT "\n",
         GET(m->identity_changes));
#undef LINE
    return apr_array_pstrcat(p, out, 0);
}
