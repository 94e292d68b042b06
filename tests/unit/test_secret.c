/* Secrets as file:/path, env:NAME or a literal (lib/cs_secret.c), and
 * CardScanCacheAuth's arguments (cs_store_auth_load). */
#include "suites.h"

#include <apr_strings.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/cardscan.h"
#include "lib/cs_store.h"

static char *secret;
static const char *warn, *err;

static apr_status_t load(const char *spec)
{
    secret = NULL;
    warn = err = NULL;
    return cs_secret_load(tp, spec, "cache password", &secret, &warn, &err);
}

static const char *file_spec(const char *path)
{
    return apr_pstrcat(tp, "file:", path, NULL);
}

START_TEST(loads_the_three_forms)
{
    const char *path = write_temp_file("\n  pass word\t\n", 0600);

    ck_assert_int_eq(load(file_spec(path)), APR_SUCCESS);
    ck_assert_str_eq(secret, "pass word");
    ck_assert_ptr_null(warn);
    unlink(path);

    setenv("CS_TEST_SECRET", "from-env", 1);
    ck_assert_int_eq(load("env:CS_TEST_SECRET"), APR_SUCCESS);
    ck_assert_str_eq(secret, "from-env");
    /* taken out of the environment, and kept for the next reading */
    ck_assert_ptr_null(getenv("CS_TEST_SECRET"));
    ck_assert_int_eq(load("env:CS_TEST_SECRET"), APR_SUCCESS);
    ck_assert_str_eq(secret, "from-env");

    ck_assert_int_eq(load("literal"), APR_SUCCESS);
    ck_assert_str_eq(secret, "literal");
}
END_TEST

START_TEST(names_what_is_wrong_but_not_the_secret)
{
    const char *path = write_temp_file("t0p-secret\n", 0644);

    ck_assert_int_eq(load(file_spec(path)), APR_SUCCESS);
    ck_assert_ptr_nonnull(warn);
    ck_assert_ptr_nonnull(strstr(warn, "cache password file"));
    ck_assert_ptr_nonnull(strstr(warn, "readable by every user"));
    ck_assert_ptr_null(strstr(warn, "t0p-secret"));
    unlink(path);

    ck_assert_int_ne(load("file:/nonexistent/pw"), APR_SUCCESS);
    ck_assert_ptr_nonnull(
        strstr(err, "cannot read the cache password file /nonexistent/pw"));
    ck_assert_int_ne(load("file:/tmp"), APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "not a regular file"));
    unsetenv("CS_TEST_NO_SECRET");
    ck_assert_int_ne(load("env:CS_TEST_NO_SECRET"), APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "CS_TEST_NO_SECRET"));
    ck_assert_ptr_nonnull(strstr(err, "cache password"));
}
END_TEST

START_TEST(cache_auth_takes_a_user_and_a_secret)
{
    const char *user, *pw;

    ck_assert_int_eq(
        cs_store_auth_load(tp, "only-pw", NULL, &user, &pw, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_null(user);
    ck_assert_str_eq(pw, "only-pw");

    setenv("CS_TEST_REDIS_PW", "env-pw", 1);
    ck_assert_int_eq(cs_store_auth_load(tp, "cardscan", "env:CS_TEST_REDIS_PW",
                                        &user, &pw, &warn, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(user, "cardscan");
    ck_assert_str_eq(pw, "env-pw");

    ck_assert_int_ne(cs_store_auth_load(tp, "", NULL, &user, &pw, &warn, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "empty"));
    ck_assert_int_ne(cs_store_auth_load(tp, "", "pw", &user, &pw, &warn, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "username"));
    ck_assert_int_ne(
        cs_store_auth_load(tp, "a user", "pw", &user, &pw, &warn, &err),
        APR_SUCCESS);
    {
        const char *path = write_temp_file("\n", 0600);
        ck_assert_int_ne(
            cs_store_auth_load(tp, apr_pstrcat(tp, "file:", path, NULL), NULL,
                               &user, &pw, &warn, &err),
            APR_SUCCESS);
        ck_assert_ptr_nonnull(strstr(err, "empty"));
        unlink(path);
    }
}
END_TEST

Suite *secret_suite(void)
{
    Suite *s = suite_create("secret");
    TCase *tc = tcase_create("secret");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, loads_the_three_forms);
    tcase_add_test(tc, names_what_is_wrong_but_not_the_secret);
    tcase_add_test(tc, cache_auth_takes_a_user_and_a_secret);
    suite_add_tcase(s, tc);
    return s;
}
