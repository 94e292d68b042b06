#include "suites.h"

#include <apr_strings.h>
#include <string.h>

#include "lib/cardscan.h"

#define NOW_S 1800000000
#define NOW apr_time_from_sec(NOW_S)

static const char *reply(const char *jwt, const char *extra)
{
    return apr_psprintf(tp,
                        "{\"Token\": \"%s\", \"IdentityId\": "
                        "\"us-east-1:0236cb77\"%s}",
                        jwt, extra ? extra : "");
}

static apr_status_t parse(const char *body, cs_token_t *t, const char **err)
{
    return cs_token_parse(tp, body, strlen(body), NOW, t, err);
}

START_TEST(parses_a_good_reply)
{
    cs_token_t t;
    const char *err = NULL;
    const char *jwt = make_jwt(tp, "{\"sub\":\"a\",\"iat\":1800000000,"
                                   "\"exp\":1800000900}");
    ck_assert_int_eq(parse(reply(jwt, ", \"session_id\": \"s-1\""), &t, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(t.token, jwt);
    ck_assert_str_eq(t.identity_id, "us-east-1:0236cb77");
    ck_assert_str_eq(t.session_id, "s-1");
    ck_assert(t.has_exp && t.has_iat);
    ck_assert_int_eq(t.exp - t.iat, 900);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(900));
}
END_TEST

START_TEST(lifetime_is_robust_to_skew)
{
    cs_token_t t;
    const char *err = NULL;
    /* this server's clock is 200 s behind the upstream's: exp - iat
     * counts, not the 1100 s exp - now would give */
    const char *jwt = make_jwt(tp, "{\"iat\":1800000200,\"exp\":1800001100}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert_ptr_null(t.session_id);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(900));
    /* no iat: exp - now */
    jwt = make_jwt(tp, "{\"exp\":1800000300}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(300));
    /* no exp: served, not cached */
    jwt = make_jwt(tp, "{\"iat\":1800000000}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert(!t.has_exp);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), 0);
}
END_TEST

START_TEST(lifetime_never_passes_exp)
{
    cs_token_t t;
    const char *err = NULL;
    /* a token issued 3000 s ago that expires in 900 s: 900 s, not 3900 */
    const char *jwt = make_jwt(tp, "{\"iat\":1799997000,\"exp\":1800000900}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(900));
    /* the same with this clock 200 s behind the upstream's: exp - now is
     * 1100 s, exp - iat 900 s: the earlier wins */
    jwt = make_jwt(tp, "{\"iat\":1800000200,\"exp\":1800001100}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(900));
    /* clock 200 s ahead: exp - now (700 s) is earlier than exp - iat */
    jwt = make_jwt(tp, "{\"iat\":1799999800,\"exp\":1800000700}");
    ck_assert_int_eq(parse(reply(jwt, NULL), &t, &err), APR_SUCCESS);
    ck_assert_int_eq(cs_token_lifetime(&t, NOW), apr_time_from_sec(700));
    /* sub-second receipt time: never past exp either */
    ck_assert_int_le(NOW + apr_time_from_msec(600) +
                         cs_token_lifetime(&t, NOW + apr_time_from_msec(600)),
                     apr_time_from_sec(1800000700));
}
END_TEST

START_TEST(refuses_bad_replies)
{
    const char *good = make_jwt(tp, "{\"iat\":1800000000,\"exp\":1800000900}");
    const char *cases[] = {
        "not json at all",
        "",
        "[1,2]",
        "{\"Token\": \"x\"",
        "{\"IdentityId\": \"i\", \"session_id\": \"s\"}",
        reply("not-a-jwt", NULL),
        reply("a.b", NULL),
        reply("a.b.c.d", NULL),
        reply("!!!.@@@.###", NULL),
        reply(apr_pstrcat(tp, "eyJhbGciOiJIUzI1NiJ9.", "bm90IGpzb24", ".c2ln",
                          NULL),
              NULL),
        reply(make_jwt(tp, "{\"iat\":1799990000,\"exp\":1799999900}"), NULL),
        reply(make_jwt(tp, "{\"iat\":1800000900,\"exp\":1800000000}"), NULL),
        apr_psprintf(tp, "{\"Token\": \"%s\", \"IdentityId\": 42}", good),
        apr_psprintf(tp, "{\"Token\": \"%s\"}", good),
        apr_psprintf(tp, "{\"Token\": 1, \"IdentityId\": \"i\"}"),
        reply(good, ", \"session_id\": 7"),
        /* exp past year 9999 would make expires_at an invalid date */
        /* exp or iat present but not a valid time */
        reply(make_jwt(tp, "{\"exp\":999999999999}"), NULL),
        reply(make_jwt(tp, "{\"exp\":\"soon\"}"), NULL),
        reply(make_jwt(tp, "{\"iat\":-5,\"exp\":1800000900}"), NULL),
        apr_pstrcat(tp, reply(good, NULL), " trailing", NULL),
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cs_token_t t;
        const char *err = NULL;
        ck_assert_msg(parse(cases[i], &t, &err) != APR_SUCCESS,
                      "case %d accepted", (int)i);
        ck_assert_ptr_nonnull(err);
    }
}
END_TEST

START_TEST(base64url_decoding)
{
    char *out;
    apr_size_t n;
    ck_assert_int_eq(cs_base64url_decode(tp, "aGk", 3, &out, &n), APR_SUCCESS);
    ck_assert_str_eq(out, "hi");
    ck_assert_int_eq(cs_base64url_decode(tp, "-_8", 3, &out, &n), APR_SUCCESS);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq((unsigned char)out[0], 0xfb);
    ck_assert_int_eq((unsigned char)out[1], 0xff);
    ck_assert_int_ne(cs_base64url_decode(tp, "a+b/", 4, &out, &n), APR_SUCCESS);
    ck_assert_int_ne(cs_base64url_decode(tp, "abcde", 5, &out, &n),
                     APR_SUCCESS);
}
END_TEST

Suite *token_suite(void)
{
    Suite *s = suite_create("token");
    TCase *tc = tcase_create("token");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, parses_a_good_reply);
    tcase_add_test(tc, lifetime_is_robust_to_skew);
    tcase_add_test(tc, lifetime_never_passes_exp);
    tcase_add_test(tc, refuses_bad_replies);
    tcase_add_test(tc, base64url_decoding);
    suite_add_tcase(s, tc);
    return s;
}
