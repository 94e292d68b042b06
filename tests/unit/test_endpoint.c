#include "suites.h"

#include <string.h>

#include "lib/cardscan.h"

START_TEST(defaults_follow_the_key)
{
    cs_key_t *t, *l;
    const char *err;
    cs_key_parse(tp, "sk_test_cardscan_ai_0123456789abcdef", &t, &err);
    cs_key_parse(tp, "sk_live_cardscan_ai_0123456789abcdef", &l, &err);
    ck_assert_str_eq(cs_endpoint_default(t), "https://sandbox.cardscan.ai/v1");
    ck_assert_str_eq(cs_endpoint_default(l), "https://api.cardscan.ai/v1");
}
END_TEST

START_TEST(accepts_https_and_loopback_http)
{
    static const char *ok[] = {
        "https://api.cardscan.ai/v1",
        "https://proxy.hospital.example:8443/cardscan/v1/",
        "http://127.0.0.1:8080/v1",
        "http://127.0.0.5/v1",
        "http://localhost:9/v1",
        "http://[::1]:8080/v1"};
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        const char *norm = NULL, *err = NULL;
        ck_assert_msg(cs_endpoint_check(tp, ok[i], &norm, &err) == APR_SUCCESS,
                      "%s: %s", ok[i], err);
        ck_assert(norm[strlen(norm) - 1] != '/');
    }
}
END_TEST

START_TEST(refuses_cleartext_and_odd_urls)
{
    static const char *bad[] = {"http://api.cardscan.ai/v1",
                                "http://10.0.0.1/v1",
                                "http://127.0.0.1.evil.example/v1",
                                "ftp://127.0.0.1/v1",
                                "https://api.cardscan.ai/v1?user_id=x",
                                "https://user:pw@api.cardscan.ai/v1",
                                "api.cardscan.ai/v1",
                                ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *norm = NULL, *err = NULL;
        ck_assert_msg(cs_endpoint_check(tp, bad[i], &norm, &err) != APR_SUCCESS,
                      "accepted %s", bad[i]);
        ck_assert_ptr_nonnull(err);
    }
}
END_TEST

START_TEST(loopback_is_an_address_not_a_prefix)
{
    static const char *bad[] = {"http://127.0.0.256/v1",
                                "http://127.1.2.3.4/v1",
                                "http://127./v1",
                                "http://127.0.0/v1",
                                "http://127.1/v1",
                                "http://0x7f.0.0.1/v1",
                                "http://localhost.evil.example/v1",
                                "http://127.0.0.1.nip.io/v1",
                                "http://[::2]/v1",
                                "http://[::ffff:10.0.0.1]/v1"};
    static const char *ok[] = {"http://127.255.255.254:1/v1",
                               "http://LocalHost:9/v1", "http://[::1]/v1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *norm = NULL, *err = NULL;
        ck_assert_msg(cs_endpoint_check(tp, bad[i], &norm, &err) != APR_SUCCESS,
                      "accepted %s", bad[i]);
        ck_assert_ptr_nonnull(strstr(err, "loopback"));
    }
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        const char *norm = NULL, *err = NULL;
        ck_assert_msg(cs_endpoint_check(tp, ok[i], &norm, &err) == APR_SUCCESS,
                      "%s: %s", ok[i], err);
    }
}
END_TEST

START_TEST(refuses_key_environment_mismatch)
{
    cs_key_t *t, *l;
    const char *err = NULL;
    cs_key_parse(tp, "sk_test_cardscan_ai_0123456789abcdef", &t, &err);
    cs_key_parse(tp, "sk_live_cardscan_ai_0123456789abcdef", &l, &err);
    ck_assert_int_ne(cs_endpoint_check_key(tp, CS_SANDBOX_URL, l, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "live key"));
    ck_assert_ptr_null(strstr(err, "0123456789ab"));
    ck_assert_int_ne(cs_endpoint_check_key(tp, CS_LIVE_URL, t, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_endpoint_check_key(tp, CS_LIVE_URL, l, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_endpoint_check_key(tp, CS_SANDBOX_URL, t, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(
        cs_endpoint_check_key(tp, "http://127.0.0.1:1/v1", l, &err),
        APR_SUCCESS);
}
END_TEST

Suite *endpoint_suite(void)
{
    Suite *s = suite_create("endpoint");
    TCase *tc = tcase_create("endpoint");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, defaults_follow_the_key);
    tcase_add_test(tc, accepts_https_and_loopback_http);
    tcase_add_test(tc, refuses_cleartext_and_odd_urls);
    tcase_add_test(tc, loopback_is_an_address_not_a_prefix);
    tcase_add_test(tc, refuses_key_environment_mismatch);
    suite_add_tcase(s, tc);
    return s;
}
