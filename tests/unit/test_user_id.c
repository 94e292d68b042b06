#include "suites.h"

#include <apr_strings.h>
#include <string.h>

#include "lib/cardscan.h"

START_TEST(encodes_to_one_query_value)
{
    ck_assert_str_eq(cs_user_id_encode(tp, "a&user_id=b"), "a%26user_id%3Db");
    ck_assert_str_eq(cs_user_id_encode(tp, "x y"), "x%20y");
    ck_assert_str_eq(cs_user_id_encode(tp, "\xC3\xBC@h.example"),
                     "%C3%BC%40h.example");
    ck_assert_str_eq(cs_user_id_encode(tp, "A-z_0.9~"), "A-z_0.9~");
    ck_assert_str_eq(cs_user_id_encode(tp, "+%#?/"), "%2B%25%23%3F%2F");
}
END_TEST

START_TEST(checks_ids)
{
    const char *err = NULL;
    char *big = apr_palloc(tp, CS_USER_ID_MAX + 2);
    ck_assert_int_eq(cs_user_id_check(tp, "alice", &err), APR_SUCCESS);
    ck_assert_int_eq(cs_user_id_check(tp, "x y", &err), APR_SUCCESS);
    ck_assert_int_ne(cs_user_id_check(tp, "", &err), APR_SUCCESS);
    ck_assert_int_ne(cs_user_id_check(tp, NULL, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_user_id_check(tp, "a\nb", &err), APR_SUCCESS);
    ck_assert_int_ne(cs_user_id_check(tp, "a\x7f", &err), APR_SUCCESS);
    memset(big, 'u', CS_USER_ID_MAX);
    big[CS_USER_ID_MAX] = '\0';
    ck_assert_int_eq(cs_user_id_check(tp, big, &err), APR_SUCCESS);
    big[CS_USER_ID_MAX] = 'u';
    big[CS_USER_ID_MAX + 1] = '\0';
    ck_assert_int_ne(cs_user_id_check(tp, big, &err), APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "1025 bytes"));
}
END_TEST

Suite *user_id_suite(void)
{
    Suite *s = suite_create("user_id");
    TCase *tc = tcase_create("user_id");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, encodes_to_one_query_value);
    tcase_add_test(tc, checks_ids);
    suite_add_tcase(s, tc);
    return s;
}
