/* The circuit breaker: after repeated failures, stop sending traffic to an
 * upstream that is down, answer at once, and probe again later, so that
 * Apache's workers do not all end up waiting on a dead API. The state lives
 * in shared memory and is updated with atomics only: no lock is held while
 * a request waits on the network. */
#include "cardscan.h"

#include <string.h>

/* longer than any upstream deadline CardScanTimeout allows */
#define CS_BREAKER_PROBE_MAX apr_time_from_sec(301)

static apr_uint64_t hash64(const char *s)
{
    apr_uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h ? h : 1;
}

cs_breaker_t *cs_breaker_slot(cs_breaker_t *table, const char *endpoint)
{
    apr_uint64_t h = hash64(endpoint);
    for (int i = 0; i < CS_BREAKER_SLOTS; i++) {
        apr_uint64_t cur =
            __atomic_load_n(&table[i].endpoint_hash, __ATOMIC_ACQUIRE);
        if (cur == h)
            return &table[i];
        if (cur == 0) {
            apr_uint64_t expected = 0;
            if (__atomic_compare_exchange_n(&table[i].endpoint_hash, &expected,
                                            h, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE) ||
                expected == h)
                return &table[i];
        }
    }
    return &table[CS_BREAKER_SLOTS - 1];
}

int cs_breaker_is_open(const cs_breaker_t *b, apr_time_t now)
{
    apr_int64_t until = __atomic_load_n(&b->open_until, __ATOMIC_ACQUIRE);
    return until != 0 && now < until;
}

int cs_breaker_allow(cs_breaker_t *b, apr_time_t now, int *retry_after)
{
    return cs_breaker_allow_user(b, now, 0, retry_after);
}

int cs_breaker_allow_user(cs_breaker_t *b, apr_time_t now,
                          apr_uint32_t user_hash, int *retry_after)
{
    apr_int64_t until = __atomic_load_n(&b->open_until, __ATOMIC_ACQUIRE);
    apr_int64_t probe = __atomic_load_n(&b->probe_started, __ATOMIC_ACQUIRE);

    if (until == 0)
        return 1;
    if (now < until) {
        *retry_after = (int)apr_time_sec(until - now) + 1;
        return 0;
    }
    /* half-open: exactly one request probes, the others still fail fast; a
     * probe that never reported (its process died) is replaced */
    if ((probe == 0 || now - probe > CS_BREAKER_PROBE_MAX) &&
        __atomic_compare_exchange_n(&b->probe_started, &probe, now, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&b->probe_user, user_hash, __ATOMIC_RELEASE);
        return 1;
    }
    *retry_after = 1;
    return 0;
}

/* Remembers the user of a failure; forgets them all after a success. */
static void remember_user(cs_breaker_t *b, apr_uint32_t user_hash)
{
    apr_uint32_t i = __atomic_fetch_add(&b->next_user, 1, __ATOMIC_ACQ_REL);
    __atomic_store_n(&b->users[i % CS_BREAKER_USERS], user_hash ? user_hash : 1,
                     __ATOMIC_RELEASE);
}

static apr_uint32_t distinct_users(cs_breaker_t *b)
{
    apr_uint32_t seen[CS_BREAKER_USERS], n = 0;
    for (int i = 0; i < CS_BREAKER_USERS; i++) {
        apr_uint32_t u = __atomic_load_n(&b->users[i], __ATOMIC_ACQUIRE);
        apr_uint32_t j;
        for (j = 0; j < n && seen[j] != u; j++)
            ;
        if (u && j == n)
            seen[n++] = u;
    }
    return n;
}

int cs_breaker_record(cs_breaker_t *b, apr_time_t now, int ok,
                      apr_uint32_t user_hash, apr_uint32_t threshold,
                      apr_interval_time_t period)
{
    apr_uint32_t n, need, probe_user;
    int was_probe = 0;

    /* the probe's own result, not another exchange that ends meanwhile (one
     * that started before the breaker opened) */
    probe_user = __atomic_load_n(&b->probe_user, __ATOMIC_ACQUIRE);
    if (!probe_user || probe_user == user_hash) {
        apr_int64_t probe =
            __atomic_load_n(&b->probe_started, __ATOMIC_ACQUIRE);
        was_probe = probe != 0 && __atomic_compare_exchange_n(
                                      &b->probe_started, &probe, 0, 0,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    if (was_probe && !ok && probe_user &&
        __atomic_exchange_n(&b->failed_probe_user, probe_user,
                            __ATOMIC_ACQ_REL) == probe_user) {
        /* the same user's probe failed twice in a row: that user's
         * trouble, not the API's; closed, and counted afresh */
        __atomic_store_n(&b->failures, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&b->open_until, 0, __ATOMIC_RELEASE);
        for (int i = 0; i < CS_BREAKER_USERS; i++)
            __atomic_store_n(&b->users[i], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&b->failed_probe_user, 0, __ATOMIC_RELEASE);
        remember_user(b, user_hash);
        __atomic_store_n(&b->failures, 1, __ATOMIC_RELEASE);
        return 0;
    }

    if (ok) {
        __atomic_store_n(&b->failed_probe_user, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&b->failures, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&b->open_until, 0, __ATOMIC_RELEASE);
        for (int i = 0; i < CS_BREAKER_USERS; i++)
            __atomic_store_n(&b->users[i], 0, __ATOMIC_RELEASE);
        return 0;
    }
    remember_user(b, user_hash);
    n = __atomic_add_fetch(&b->failures, 1, __ATOMIC_ACQ_REL);
    if (threshold == 0)
        return 0;
    need = threshold < CS_BREAKER_MIN_USERS ? threshold : CS_BREAKER_MIN_USERS;
    if (!was_probe && (n < threshold || distinct_users(b) < need))
        return 0;
    /* what happens next is counted afresh: while it is open, only its
     * probe decides */
    __atomic_store_n(&b->failures, 0, __ATOMIC_RELEASE);
    for (int i = 0; i < CS_BREAKER_USERS; i++)
        __atomic_store_n(&b->users[i], 0, __ATOMIC_RELEASE);
    __atomic_store_n(&b->open_until, now + period, __ATOMIC_RELEASE);
    __atomic_add_fetch(&b->opened_total, 1, __ATOMIC_RELAXED);
    return 1;
}
