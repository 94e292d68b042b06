/* lib/cs_conf.c: the value checks of directives. */
#include "suites.h"

#include <apr_strings.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/cardscan.h"

START_TEST(seconds_in_range)
{
    apr_interval_time_t v = 0;
    const char *err = NULL;
    ck_assert_int_eq(cs_conf_seconds(tp, "X", "0.25", 10, &v, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(v, apr_time_from_msec(250));
    ck_assert_int_eq(cs_conf_seconds(tp, "X", "10", 10, &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "10.001", 10, &v, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(err, "X: '10.001' is not a number of seconds in (0, 10]");
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "0", 10, &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "-1", 10, &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "1s", 10, &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "", 10, &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_seconds(tp, "X", "nan", 10, &v, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(timeout_and_its_connect_part)
{
    apr_interval_time_t t = 0, c = 0;
    const char *err = NULL;
    /* connect: the lesser of the total and 2 s, unless given */
    ck_assert_int_eq(cs_conf_timeout(tp, "5", NULL, &t, &c, &err), APR_SUCCESS);
    ck_assert_int_eq(t, apr_time_from_sec(5));
    ck_assert_int_eq(c, apr_time_from_sec(2));
    ck_assert_int_eq(cs_conf_timeout(tp, "1.5", NULL, &t, &c, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(c, apr_time_from_msec(1500));
    ck_assert_int_eq(cs_conf_timeout(tp, "8", "3", &t, &c, &err), APR_SUCCESS);
    ck_assert_int_eq(c, apr_time_from_sec(3));
    ck_assert_int_ne(cs_conf_timeout(tp, "2", "3", &t, &c, &err), APR_SUCCESS);
    ck_assert_str_eq(
        err, "CardScanTimeout: the connect timeout cannot exceed the total");
    /* libcurl's milliseconds: 0 would mean no timeout */
    ck_assert_int_ne(cs_conf_timeout(tp, "0.0004", NULL, &t, &c, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "under 1 ms"));
    ck_assert_int_ne(cs_conf_timeout(tp, "301", NULL, &t, &c, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(min_ttl_refresh_and_breaker)
{
    apr_interval_time_t v = 0, period = 0;
    apr_uint32_t n = 0;
    int pct = -1;
    const char *err = NULL;

    ck_assert_int_eq(cs_conf_min_ttl(tp, "0", &v, &err), APR_SUCCESS);
    ck_assert_int_eq(v, 0);
    ck_assert_int_eq(cs_conf_min_ttl(tp, "86400", &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_min_ttl(tp, "86401", &v, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_min_ttl(tp, "1.5", &v, &err), APR_SUCCESS);

    ck_assert_int_eq(cs_conf_refresh(tp, "On", &pct, &err), APR_SUCCESS);
    ck_assert_int_eq(pct, CS_REFRESH_PCT_DEFAULT);
    ck_assert_int_eq(cs_conf_refresh(tp, "off", &pct, &err), APR_SUCCESS);
    ck_assert_int_eq(pct, 0);
    ck_assert_int_eq(cs_conf_refresh(tp, "10%", &pct, &err), APR_SUCCESS);
    ck_assert_int_eq(pct, 10);
    ck_assert_int_eq(cs_conf_refresh(tp, "50", &pct, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_refresh(tp, "51%", &pct, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_refresh(tp, "0", &pct, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_refresh(tp, "10%%", &pct, &err), APR_SUCCESS);

    ck_assert_int_eq(cs_conf_breaker(tp, "3", "20", &n, &period, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(period, apr_time_from_sec(20));
    ck_assert_int_eq(cs_conf_breaker(tp, "0", NULL, &n, &period, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(n, 0);
    ck_assert_int_ne(cs_conf_breaker(tp, "-1", NULL, &n, &period, &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_conf_breaker(tp, "3", "3601", &n, &period, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(backend_header_names)
{
    const char *err = NULL;
    ck_assert_int_eq(cs_conf_backend_header(tp, "X-CardScan-User", &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_conf_backend_header(tp, "X CardScan", &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_conf_backend_header(tp, "X:User", &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_backend_header(tp, "", &err), APR_SUCCESS);
    ck_assert_int_ne(cs_conf_backend_header(tp, "set-cookie", &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "standard header"));
    ck_assert_int_ne(cs_conf_backend_header(tp, "Authorization", &err),
                     APR_SUCCESS);
}
END_TEST

/* CGI folds - and _ and case into one variable name */
START_TEST(same_header_as_cgi_sees_it)
{
    ck_assert(cs_header_same("X-CardScan-User", "x_cardscan_user"));
    ck_assert(cs_header_same("X-CARDSCAN-USER", "X-CardScan-User"));
    ck_assert(!cs_header_same("X-CardScan-User", "X-CardScan-Users"));
    ck_assert(!cs_header_same("X-CardScan-Users", "X-CardScan-User"));
    ck_assert(!cs_header_same("X-CardScan-User", "X.CardScan.User"));
    ck_assert(cs_header_same("", ""));
}
END_TEST

START_TEST(proxy_url_and_credentials)
{
    const char *proxy = NULL, *auth = NULL, *warning = NULL, *err = NULL;
    const char *f;

    ck_assert_int_eq(cs_conf_proxy(tp, "http://proxy:3128", NULL, &proxy, &auth,
                                   &warning, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(proxy, "http://proxy:3128");
    ck_assert_ptr_null(auth);
    ck_assert_int_eq(
        cs_conf_proxy(tp, "none", NULL, &proxy, &auth, &warning, &err),
        APR_SUCCESS);
    ck_assert_ptr_null(proxy);
    ck_assert_int_ne(cs_conf_proxy(tp, "ftp://proxy:21", NULL, &proxy, &auth,
                                   &warning, &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_conf_proxy(tp, "http://u:p@proxy:3128", NULL, &proxy,
                                   &auth, &warning, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "not in the URL"));
    ck_assert_int_ne(
        cs_conf_proxy(tp, "http://", NULL, &proxy, &auth, &warning, &err),
        APR_SUCCESS);
    /* credentials: from a file only, holding user:password */
    ck_assert_int_ne(cs_conf_proxy(tp, "http://proxy:3128", "u:p", &proxy,
                                   &auth, &warning, &err),
                     APR_SUCCESS);
    f = write_temp_file("proxyuser:s3cret\n", 0600);
    ck_assert_int_eq(cs_conf_proxy(tp, "http://proxy:3128",
                                   apr_pstrcat(tp, "file:", f, NULL), &proxy,
                                   &auth, &warning, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(auth, "proxyuser:s3cret");
    ck_assert_ptr_null(warning);
    unlink(f);
    f = write_temp_file("no-colon\n", 0644);
    ck_assert_int_ne(cs_conf_proxy(tp, "http://proxy:3128",
                                   apr_pstrcat(tp, "file:", f, NULL), &proxy,
                                   &auth, &warning, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "user:password"));
    ck_assert_ptr_null(strstr(err, "no-colon"));
    unlink(f);
    ck_assert_int_ne(cs_conf_proxy(tp, "http://proxy:3128",
                                   "file:/nonexistent/cs-proxy", &proxy, &auth,
                                   &warning, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(cache_secret_from_a_file)
{
    unsigned char a[CS_SECRET_LEN], b[CS_SECRET_LEN];
    const char *warning = NULL, *err = NULL, *f;

    ck_assert_int_ne(
        cs_conf_cache_secret(tp, "0123456789abcdef0123", a, &warning, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "file:/path"));
    f = write_temp_file("short\n", 0600);
    ck_assert_int_ne(cs_conf_cache_secret(tp, apr_pstrcat(tp, "file:", f, NULL),
                                          a, &warning, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "at least 16 bytes"));
    unlink(f);
    f = write_temp_file("0123456789abcdef0123\n", 0644);
    ck_assert_int_eq(cs_conf_cache_secret(tp, apr_pstrcat(tp, "file:", f, NULL),
                                          a, &warning, &err),
                     APR_SUCCESS);
    /* readable by everyone: usable, with a warning */
    ck_assert_ptr_nonnull(warning);
    unlink(f);
    /* the trailing newline is not part of the secret */
    f = write_temp_file("0123456789abcdef0123", 0600);
    ck_assert_int_eq(cs_conf_cache_secret(tp, apr_pstrcat(tp, "file:", f, NULL),
                                          b, &warning, &err),
                     APR_SUCCESS);
    ck_assert_mem_eq(a, b, CS_SECRET_LEN);
    unlink(f);
}
END_TEST

Suite *conf_suite(void)
{
    Suite *s = suite_create("conf");
    TCase *tc = tcase_create("conf");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, seconds_in_range);
    tcase_add_test(tc, timeout_and_its_connect_part);
    tcase_add_test(tc, min_ttl_refresh_and_breaker);
    tcase_add_test(tc, backend_header_names);
    tcase_add_test(tc, same_header_as_cgi_sees_it);
    tcase_add_test(tc, proxy_url_and_credentials);
    tcase_add_test(tc, cache_secret_from_a_file);
    suite_add_tcase(s, tc);
    return s;
}
