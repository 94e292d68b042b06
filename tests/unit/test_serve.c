/* The serving decision on a fake clock: every boundary of a token's life
 * (refresh window, CardScanCacheMinTTL edge, exp) and of a failure's. */
#include "suites.h"

#include <string.h>

#include "lib/cardscan.h"

#define T0 apr_time_from_sec(1800000000)
#define SEC(n) apr_time_from_sec(n)
#define MS(n) apr_time_from_msec(n)

/* A token received at T0 that lives `life` seconds. */
static cs_entry_t token(int life)
{
    cs_entry_t e;
    memset(&e, 0, sizeof(e));
    e.kind = CS_ENTRY_TOKEN;
    e.created = T0;
    e.lifetime = SEC(life);
    e.expires = T0 + SEC(life);
    return e;
}

static cs_entry_t failure(apr_time_t created, apr_interval_time_t ttl)
{
    cs_entry_t e;
    memset(&e, 0, sizeof(e));
    e.kind = CS_ENTRY_FAILURE;
    e.status = 502;
    e.created = created;
    e.expires = created + ttl;
    return e;
}

static const cs_policy_t hour = {SEC(60), 25};

/* A 3600 s token with the default 60 s minimum: served until 3540 s, the
 * refresh window is the last 25% of that, from 2655 s. */
START_TEST(token_life_boundaries)
{
    cs_entry_t t = token(3600);
    ck_assert_int_eq(cs_serve_refresh_at(&t, &hour), T0 + SEC(2655));
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0, &hour), CS_DO_SERVE);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(2655) - 1, &hour),
                     CS_DO_SERVE);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(2655), &hour),
                     CS_DO_SERVE_REFRESH);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(3540), &hour),
                     CS_DO_SERVE_REFRESH);
    /* the min-TTL edge: one microsecond later, no longer served */
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(3540) + 1, &hour),
                     CS_DO_CALL);
    /* at and past exp */
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(3600), &hour),
                     CS_DO_CALL);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(9000), &hour),
                     CS_DO_CALL);
}
END_TEST

/* A 16 s token: the minimum is capped at half its life (8 s), so it is
 * served for 8 s and refreshed from 6 s on. */
START_TEST(short_token_caps_min_ttl)
{
    cs_entry_t t = token(16);
    ck_assert_int_eq(cs_serve_refresh_at(&t, &hour), T0 + SEC(6));
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + MS(5999), &hour),
                     CS_DO_SERVE);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(6), &hour),
                     CS_DO_SERVE_REFRESH);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(8), &hour),
                     CS_DO_SERVE_REFRESH);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(8) + 1, &hour),
                     CS_DO_CALL);
}
END_TEST

START_TEST(refresh_off_and_min_ttl_zero)
{
    cs_policy_t off = {SEC(60), 0}, zero = {0, 25};
    cs_entry_t t = token(100);
    ck_assert_int_eq(cs_serve_refresh_at(&t, &off), 0);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(50), &off),
                     CS_DO_SERVE);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(51), &off), CS_DO_CALL);
    /* CardScanCacheMinTTL 0: served to the last moment before exp */
    ck_assert_int_eq(cs_serve_refresh_at(&t, &zero), T0 + SEC(75));
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(100) - 1, &zero),
                     CS_DO_SERVE_REFRESH);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(100), &zero),
                     CS_DO_CALL);
    /* a tiny window still starts inside the serving time */
    cs_policy_t one = {SEC(60), 1};
    ck_assert_int_eq(cs_serve_refresh_at(&t, &one), T0 + SEC(50) - MS(500));
}
END_TEST

/* A failure answers the user's requests until it expires, only when no
 * fresh token exists; it never hides a token. */
START_TEST(failures_are_per_user_and_short)
{
    cs_entry_t f = failure(T0, CS_NEGATIVE_TTL), t = token(3600);
    ck_assert_int_eq(cs_serve_decide(NULL, &f, T0, &hour), CS_DO_FAIL);
    ck_assert_int_eq(cs_serve_decide(NULL, &f, T0 + SEC(4), &hour), CS_DO_FAIL);
    ck_assert_int_eq(cs_serve_decide(NULL, &f, T0 + CS_NEGATIVE_TTL, &hour),
                     CS_DO_CALL);
    /* a fresh token wins over a failure stored later */
    ck_assert_int_eq(cs_serve_decide(&t, &f, T0 + SEC(1), &hour), CS_DO_SERVE);
    /* a token past its serving time and an old failure: call */
    ck_assert_int_eq(cs_serve_decide(&t, &f, T0 + SEC(3590), &hour),
                     CS_DO_CALL);
    f = failure(T0 + SEC(3590), CS_NEGATIVE_TTL);
    ck_assert_int_eq(cs_serve_decide(&t, &f, T0 + SEC(3591), &hour),
                     CS_DO_FAIL);
    /* Retry-After: whole seconds left, at least 1 */
    f = failure(T0, CS_NEGATIVE_TTL);
    ck_assert_int_eq(cs_serve_retry_after(&f, T0), 5);
    ck_assert_int_eq(cs_serve_retry_after(&f, T0 + MS(4001)), 1);
    ck_assert_int_eq(cs_serve_retry_after(&f, T0 + SEC(9)), 1);
    /* an entry of another kind is neither a token nor a failure */
    t.kind = CS_ENTRY_FAILURE;
    ck_assert_int_eq(cs_serve_decide(NULL, &t, T0 + SEC(1), &hour), CS_DO_FAIL);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(1), &hour), CS_DO_CALL);
}
END_TEST

START_TEST(store_ids_differ_by_kind)
{
    unsigned char key[CS_CACHE_KEY_LEN], a[CS_STORE_ID_LEN], b[CS_STORE_ID_LEN],
        c[CS_STORE_ID_LEN];
    for (int i = 0; i < CS_CACHE_KEY_LEN; i++)
        key[i] = (unsigned char)i;
    cs_store_id(key, CS_ID_TOKEN, a);
    cs_store_id(key, CS_ID_FAILURE, b);
    cs_store_id(key, CS_ID_LOCK, c);
    ck_assert_mem_eq(a, key, CS_CACHE_KEY_LEN);
    ck_assert(memcmp(a, b, CS_STORE_ID_LEN) != 0);
    ck_assert(memcmp(a, c, CS_STORE_ID_LEN) != 0);
    ck_assert(memcmp(b, c, CS_STORE_ID_LEN) != 0);
}
END_TEST

/* An exp in the year 9999 (no iat): no overflow, a window where it
 * belongs (UBSan in the sanitizer build fails on an overflow). */
START_TEST(absurd_lifetime_does_not_overflow)
{
    cs_entry_t t = token(3600);
    const cs_policy_t half = {SEC(60), 50};
    apr_time_t at;
    t.expires = apr_time_from_sec(253402300799LL); /* 9999-12-31 */
    t.lifetime = t.expires - t.created;
    at = cs_serve_refresh_at(&t, &half);
    ck_assert(at > t.created && at < t.expires);
    ck_assert_int_eq(cs_serve_decide(&t, NULL, T0 + SEC(1), &half),
                     CS_DO_SERVE);
}
END_TEST

/* The holder of a lock, from its value: host and pid of a well-formed
 * "host/pid/counter/time"; anything else refused. */
START_TEST(lock_holder_from_its_value)
{
    static const char *const bad[] = {
        "",
        "web1",
        "/123/1/1700000000000000",
        "web1//1/1700000000000000",
        "web1/0/1/1700000000000000",
        "web1/-5/1/1700000000000000",
        "web1/12a/1/1700000000000000",
        "web1/2147483648/1/1700000000000000",
        "web1/123/1",
        "web1/123//1700000000000000",
        "web1/123/4294967296/1700000000000000",
        "web1/123/1/",
        "web1/123/1/17x",
        "web1/123/1/1700000000000000/extra",
        "web1/123/1/99999999999999999999",
        "a-host-name-that-is-too-long-for-the-buffer/1/1/1",
    };
    char host[16];
    long pid = -1;
    const char *v = "web1.example/4242/7/1700000000000000";

    ck_assert_int_eq(
        cs_lock_holder_parse(v, strlen(v), host, sizeof(host), &pid),
        APR_SUCCESS);
    ck_assert_str_eq(host, "web1.example");
    ck_assert_int_eq(pid, 4242);
    /* the value's length counts, not a NUL: a store's value has none */
    ck_assert_int_eq(
        cs_lock_holder_parse("h/1/2/3trailing", 7, host, sizeof(host), &pid),
        APR_SUCCESS);
    ck_assert_str_eq(host, "h");
    ck_assert_int_eq(pid, 1);
    ck_assert_int_eq(
        cs_lock_holder_parse("h\0x/1/2/3", 9, host, sizeof(host), &pid),
        APR_EINVAL);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        ck_assert_msg(cs_lock_holder_parse(bad[i], strlen(bad[i]), host,
                                           sizeof(host), &pid) == APR_EINVAL,
                      "accepted \"%s\"", bad[i]);
    ck_assert_int_eq(cs_lock_holder_parse(NULL, 0, host, sizeof(host), &pid),
                     APR_EINVAL);
}
END_TEST

Suite *serve_suite(void)
{
    Suite *s = suite_create("serve");
    TCase *tc = tcase_create("decide");
    tcase_add_test(tc, absurd_lifetime_does_not_overflow);
    tcase_add_test(tc, token_life_boundaries);
    tcase_add_test(tc, short_token_caps_min_ttl);
    tcase_add_test(tc, refresh_off_and_min_ttl_zero);
    tcase_add_test(tc, failures_are_per_user_and_short);
    tcase_add_test(tc, store_ids_differ_by_kind);
    tcase_add_test(tc, lock_holder_from_its_value);
    suite_add_tcase(s, tc);
    return s;
}
