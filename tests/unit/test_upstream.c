#include "suites.h"

#include "lib/cardscan.h"

START_TEST(url_encodes_the_user)
{
    ck_assert_str_eq(
        cs_upstream_url(tp, "http://127.0.0.1:9/v1", "a&user_id=b"),
        "http://127.0.0.1:9/v1/access-token?user_id=a%26user_id%3Db");
}
END_TEST

Suite *upstream_suite(void)
{
    Suite *s = suite_create("upstream");
    TCase *tc = tcase_create("upstream");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, url_encodes_the_user);
    suite_add_tcase(s, tc);
    return s;
}
