#include "suites.h"

#include <string.h>

#include "lib/cardscan.h"

static const char *norm_of(const char *origin)
{
    const char *norm = NULL, *err = NULL;
    ck_assert_msg(cs_origin_check(tp, origin, &norm, &err) == APR_SUCCESS,
                  "%s refused: %s", origin, err);
    return norm;
}

static void refused(const char *origin)
{
    const char *norm = NULL, *err = NULL;
    ck_assert_msg(cs_origin_check(tp, origin, &norm, &err) != APR_SUCCESS,
                  "%s accepted", origin);
    ck_assert_ptr_nonnull(err);
}

START_TEST(origins_are_normalised_as_browsers_send_them)
{
    ck_assert_str_eq(norm_of("https://app.hospital.org"),
                     "https://app.hospital.org");
    ck_assert_str_eq(norm_of("HTTPS://App.Hospital.ORG"),
                     "https://app.hospital.org");
    ck_assert_str_eq(norm_of("https://app.hospital.org:443"),
                     "https://app.hospital.org");
    ck_assert_str_eq(norm_of("http://localhost:80"), "http://localhost");
    ck_assert_str_eq(norm_of("http://127.0.0.1:8443"), "http://127.0.0.1:8443");
    ck_assert_str_eq(norm_of("https://app.example:80"),
                     "https://app.example:80");
    ck_assert_str_eq(norm_of("http://[::1]:8080"), "http://[::1]:8080");
}
END_TEST

START_TEST(wildcards_paths_and_other_schemes_are_refused)
{
    refused("*");
    refused("https://*.hospital.org");
    refused("null");
    refused("app.hospital.org");
    refused("ftp://app.hospital.org");
    refused("https://app.hospital.org/");
    refused("https://app.hospital.org/path");
    refused("https://app.hospital.org:0");
    refused("https://app.hospital.org:65536");
    refused("https://app.hospital.org:44x");
    refused("https://app.hospital.org:");
    refused("https://");
    refused("https://user@app.hospital.org");
    refused("https://[zz]");
}
END_TEST

START_TEST(only_exact_origins_are_listed)
{
    apr_array_header_t *list = apr_array_make(tp, 2, sizeof(const char *));
    APR_ARRAY_PUSH(list, const char *) = norm_of("https://app.hospital.org");
    APR_ARRAY_PUSH(list, const char *) = norm_of("http://localhost:8080");
    ck_assert(cs_origin_listed(list, "https://app.hospital.org"));
    ck_assert(cs_origin_listed(list, "http://localhost:8080"));
    ck_assert(!cs_origin_listed(list, "http://app.hospital.org"));
    ck_assert(!cs_origin_listed(list, "https://app.hospital.org.evil.example"));
    ck_assert(!cs_origin_listed(list, "https://evil-app.hospital.org"));
    ck_assert(!cs_origin_listed(list, "https://app.hospital.org:8443"));
    ck_assert(!cs_origin_listed(list, "http://localhost"));
    ck_assert(!cs_origin_listed(list, "null"));
    ck_assert(!cs_origin_listed(list, ""));
    ck_assert(!cs_origin_listed(list, NULL));
    ck_assert(!cs_origin_listed(NULL, "https://app.hospital.org"));
}
END_TEST

START_TEST(outcome_names_follow_the_enum)
{
    ck_assert_str_eq(cs_outcome_name(CS_OUT_HIT), "hit");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_FETCHED), "fetched");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_WAITED), "waited");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_REFRESHED), "refreshed");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_DENIED), "denied");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_ERROR), "error");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_UNAVAILABLE), "unavailable");
    ck_assert_str_eq(cs_outcome_name(CS_OUT_COUNT), "unknown");
}
END_TEST

Suite *origin_suite(void)
{
    Suite *s = suite_create("origin");
    TCase *tc = tcase_create("origin");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, origins_are_normalised_as_browsers_send_them);
    tcase_add_test(tc, wildcards_paths_and_other_schemes_are_refused);
    tcase_add_test(tc, only_exact_origins_are_listed);
    tcase_add_test(tc, outcome_names_follow_the_enum);
    suite_add_tcase(s, tc);
    return s;
}
