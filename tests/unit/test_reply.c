#include "suites.h"

#include <cjson/cJSON.h>
#include <string.h>

#include "lib/cardscan.h"

static void expect_string(cJSON *o, const char *name, const char *value)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    ck_assert_msg(cJSON_IsString(v), "%s is not a string", name);
    ck_assert_str_eq(v->valuestring, value);
}

START_TEST(token_reply_has_the_contract_shape)
{
    cs_token_t t = {"h.p.s", "us-east-1:abc", "sess-1", 0, 0, 0, 0};
    char *body =
        cs_reply_token(tp, &t, apr_time_from_sec(1795810500), CS_KEY_TEST);
    cJSON *o = cJSON_Parse(body), *item;
    int n = 0;
    ck_assert_ptr_nonnull(o);
    expect_string(o, "Token", "h.p.s");
    expect_string(o, "IdentityId", "us-east-1:abc");
    expect_string(o, "session_id", "sess-1");
    expect_string(o, "session", "h.p.s");
    expect_string(o, "expires_at", "2026-11-27T20:15:00Z");
    expect_string(o, "live", "false");
    cJSON_ArrayForEach(item, o)
    {
        ck_assert(cJSON_IsString(item));
        n++;
    }
    ck_assert_int_eq(n, 6);
    cJSON_Delete(o);
}
END_TEST

START_TEST(optional_members_are_left_out)
{
    cs_token_t t = {"h.p.s", "id\"quoted\"", NULL, 0, 0, 0, 0};
    char *body = cs_reply_token(tp, &t, 0, CS_KEY_TEST);
    cJSON *o = cJSON_Parse(body);
    ck_assert_ptr_nonnull(o);
    ck_assert_ptr_null(cJSON_GetObjectItem(o, "session_id"));
    ck_assert_ptr_null(cJSON_GetObjectItem(o, "expires_at"));
    expect_string(o, "IdentityId", "id\"quoted\"");
    cJSON_Delete(o);
}
END_TEST

START_TEST(live_follows_the_key_mode)
{
    cs_token_t t = {"h.p.s", "us-east-1:abc", NULL, 0, 0, 0, 0};
    cJSON *o = cJSON_Parse(cs_reply_token(tp, &t, 0, CS_KEY_LIVE));
    ck_assert_ptr_nonnull(o);
    expect_string(o, "live", "true");
    cJSON_Delete(o);
    o = cJSON_Parse(cs_reply_token(tp, &t, 0, CS_KEY_TEST));
    expect_string(o, "live", "false");
    cJSON_Delete(o);
}
END_TEST

START_TEST(error_reply)
{
    cJSON *o =
        cJSON_Parse(cs_reply_error(tp, "upstream_error", "it \"broke\""));
    ck_assert_ptr_nonnull(o);
    expect_string(o, "error", "upstream_error");
    expect_string(o, "message", "it \"broke\"");
    cJSON_Delete(o);
}
END_TEST

Suite *reply_suite(void)
{
    Suite *s = suite_create("reply");
    TCase *tc = tcase_create("reply");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, token_reply_has_the_contract_shape);
    tcase_add_test(tc, optional_members_are_left_out);
    tcase_add_test(tc, live_follows_the_key_mode);
    tcase_add_test(tc, error_reply);
    suite_add_tcase(s, tc);
    return s;
}
