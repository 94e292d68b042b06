/* lib/cs_policy.c: what an API reply means for the client, the retry rule
 * and the token store's back-off, on a fake clock. */
#include "suites.h"

#include <apr_strings.h>
#include <string.h>

#include "lib/cardscan.h"

#define T0 apr_time_from_sec(1800000000)
#define SEC(n) apr_time_from_sec(n)

static cs_upstream_resp_t reply(cs_up_result_e result, int status,
                                const char *body)
{
    cs_upstream_resp_t r;
    memset(&r, 0, sizeof(r));
    r.result = result;
    r.status = status;
    r.body = body ? body : "";
    r.body_len = strlen(r.body);
    return r;
}

static void check_verdict(const cs_upstream_resp_t *r, cs_verdict_e kind,
                          int status, const char *code)
{
    cs_verdict_t v;
    cs_classify(tp, r, T0, &v);
    ck_assert_int_eq(v.kind, kind);
    ck_assert_int_eq(v.status, status);
    if (code)
        ck_assert_str_eq(v.code, code);
    else
        ck_assert_ptr_null(v.code);
    if (kind != CS_VERDICT_TOKEN)
        ck_assert_ptr_nonnull(v.message);
}

START_TEST(replies_are_classified_as_documented)
{
    const char *jwt = make_jwt(tp, "{\"sub\":\"u\",\"iat\":1800000000,"
                                   "\"exp\":1800000900}");
    const char *body = apr_psprintf(
        tp, "{\"Token\":\"%s\",\"IdentityId\":\"us-east-1:x\"}", jwt);
    cs_upstream_resp_t r = reply(CS_UP_OK, 200, body);

    check_verdict(&r, CS_VERDICT_TOKEN, 200, NULL);
    r = reply(CS_UP_OK, 200, "{\"Token\":\"not-a-jwt\"}");
    check_verdict(&r, CS_VERDICT_INVALID, 502, "upstream_error");
    r = reply(CS_UP_OK, 401, "{}");
    check_verdict(&r, CS_VERDICT_KEY_REJECTED, 502, "upstream_auth_failed");
    r = reply(CS_UP_OK, 403, "{}");
    check_verdict(&r, CS_VERDICT_KEY_REJECTED, 502, "upstream_auth_failed");
    r = reply(CS_UP_OK, 429, "{}");
    check_verdict(&r, CS_VERDICT_RATE_LIMITED, 503, "upstream_rate_limited");
    r = reply(CS_UP_OK, 500, "{}");
    check_verdict(&r, CS_VERDICT_HTTP_ERROR, 502, "upstream_error");
    r = reply(CS_UP_OK, 302, "");
    check_verdict(&r, CS_VERDICT_HTTP_ERROR, 502, "upstream_error");
    r = reply(CS_UP_TIMEOUT, 0, NULL);
    check_verdict(&r, CS_VERDICT_TIMEOUT, 504, "upstream_timeout");
    r = reply(CS_UP_CONNECT, 0, NULL);
    check_verdict(&r, CS_VERDICT_UNREACHABLE, 502, "upstream_error");
    r = reply(CS_UP_TOO_BIG, 200, NULL);
    check_verdict(&r, CS_VERDICT_UNREACHABLE, 502, "upstream_error");
    r = reply(CS_UP_TLS, 0, NULL);
    check_verdict(&r, CS_VERDICT_UNREACHABLE, 502, "upstream_error");
}
END_TEST

/* The negative cache: 5 s, or as long as a 429 asked (clamped); the reply
 * never holds a token. */
START_TEST(failures_last_the_negative_ttl_or_retry_after)
{
    cs_upstream_resp_t r = reply(CS_UP_OK, 429, "{}");
    cs_verdict_t v;
    cs_entry_t e;

    cs_classify(tp, &r, T0, &v);
    ck_assert_int_eq(v.retry_after, 5); /* no header: 5 s */
    r.retry_after = "30";
    cs_classify(tp, &r, T0, &v);
    ck_assert_int_eq(v.retry_after, 30);
    cs_entry_failure(tp, &v, T0, &e);
    ck_assert_int_eq(e.kind, CS_ENTRY_FAILURE);
    ck_assert_int_eq(e.status, 503);
    ck_assert_int_eq(e.expires, T0 + SEC(30));
    ck_assert_int_eq(cs_serve_retry_after(&e, T0), 30);
    ck_assert_ptr_nonnull(strstr(e.body, "upstream_rate_limited"));
    r.retry_after = "99999999";
    cs_classify(tp, &r, T0, &v);
    ck_assert_int_eq(v.retry_after, 3600);
    r.retry_after = "1";
    cs_classify(tp, &r, T0, &v);
    cs_entry_failure(tp, &v, T0, &e);
    ck_assert_int_eq(e.expires, T0 + CS_NEGATIVE_TTL);

    r = reply(CS_UP_TIMEOUT, 0, NULL);
    cs_classify(tp, &r, T0, &v);
    cs_entry_failure(tp, &v, T0, &e);
    ck_assert_int_eq(e.status, 504);
    ck_assert_int_eq(e.expires, T0 + CS_NEGATIVE_TTL);
    ck_assert_int_eq(e.body_len, strlen(e.body));
}
END_TEST

START_TEST(one_retry_after_a_transient_failure)
{
    cs_upstream_resp_t r = reply(CS_UP_CONNECT, 0, NULL);
    apr_interval_time_t plenty = SEC(4);

    ck_assert(cs_call_retry(&r, 0, plenty, 0));
    ck_assert(!cs_call_retry(&r, 1, plenty, 0)); /* once */
    ck_assert(!cs_call_retry(&r, 0, plenty, 1)); /* breaker open */
    ck_assert(!cs_call_retry(&r, 0, CS_RETRY_MIN_LEFT - 1, 0));
    ck_assert(cs_call_retry(&r, 0, CS_RETRY_MIN_LEFT, 0));
    for (int s = 502; s <= 504; s++) {
        r = reply(CS_UP_OK, s, "{}");
        ck_assert(cs_call_retry(&r, 0, plenty, 0));
    }
    r = reply(CS_UP_OK, 500, "{}");
    ck_assert(!cs_call_retry(&r, 0, plenty, 0));
    r = reply(CS_UP_OK, 429, "{}");
    ck_assert(!cs_call_retry(&r, 0, plenty, 0));
    r = reply(CS_UP_OK, 401, "{}");
    ck_assert(!cs_call_retry(&r, 0, plenty, 0));
    r = reply(CS_UP_TIMEOUT, 0, NULL);
    ck_assert(!cs_call_retry(&r, 0, plenty, 0));
}
END_TEST

START_TEST(backoff_doubles_and_resets)
{
    cs_backoff_t b;
    memset(&b, 0, sizeof(b));

    ck_assert(cs_backoff_usable(&b, T0));
    ck_assert_int_eq(cs_backoff_failed(&b, T0), CS_BACKOFF_MIN);
    ck_assert(!cs_backoff_usable(&b, T0));
    ck_assert(!cs_backoff_usable(&b, T0 + CS_BACKOFF_MIN - 1));
    /* the failures met during a pause do not lengthen it */
    ck_assert_int_eq(cs_backoff_failed(&b, T0 + SEC(1)), CS_BACKOFF_MIN);
    ck_assert_int_eq(b.until, T0 + CS_BACKOFF_MIN);
    ck_assert(cs_backoff_usable(&b, T0 + CS_BACKOFF_MIN));
    /* failing again after the pause doubles it, up to the maximum */
    ck_assert_int_eq(cs_backoff_failed(&b, T0 + SEC(2)), 2 * CS_BACKOFF_MIN);
    ck_assert_int_eq(b.until, T0 + SEC(2) + 2 * CS_BACKOFF_MIN);
    for (int i = 0; i < 10; i++)
        cs_backoff_failed(&b, b.until);
    ck_assert_int_eq(b.pause, CS_BACKOFF_MAX);
    /* a success starts it over */
    cs_backoff_ok(&b);
    ck_assert_int_eq(cs_backoff_failed(&b, b.until), CS_BACKOFF_MIN);
}
END_TEST

Suite *policy_suite(void)
{
    Suite *s = suite_create("policy");
    TCase *tc = tcase_create("policy");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, replies_are_classified_as_documented);
    tcase_add_test(tc, failures_last_the_negative_ttl_or_retry_after);
    tcase_add_test(tc, one_retry_after_a_transient_failure);
    tcase_add_test(tc, backoff_doubles_and_resets);
    suite_add_tcase(s, tc);
    return s;
}
