/* Identity pinning on a fake clock: the verdict in each mode, the pin's
 * expiry, its cache entry, and the directives' value checks. */
#include "suites.h"

#include <apr_strings.h>
#include <cjson/cJSON.h>
#include <string.h>

#include "lib/cardscan.h"

#define T0 apr_time_from_sec(1800000000)
#define SEC(n) apr_time_from_sec(n)
#define DAY SEC(86400)

#define ID_A "us-east-1:0236cb77-aaaa"
#define ID_B "us-east-1:0236cb77-bbbb"

static cs_pin_t pin_at(const char *identity_id, apr_time_t when)
{
    cs_pin_t pin;
    cs_pin_make(&pin, identity_id, when, DAY);
    return pin;
}

START_TEST(no_pin_is_accepted_in_every_mode)
{
    cs_pin_mode_e modes[] = {CS_PIN_OFF, CS_PIN_ALARM, CS_PIN_ENFORCE};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(cs_pin_decide(NULL, ID_A, modes[i], T0),
                         CS_PIN_ACCEPT);
}
END_TEST

START_TEST(the_same_identity_is_accepted_in_every_mode)
{
    cs_pin_t pin = pin_at(ID_A, T0);
    cs_pin_mode_e modes[] = {CS_PIN_OFF, CS_PIN_ALARM, CS_PIN_ENFORCE};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(cs_pin_decide(&pin, ID_A, modes[i], T0 + SEC(900)),
                         CS_PIN_ACCEPT);
}
END_TEST

START_TEST(another_identity_by_mode)
{
    cs_pin_t pin = pin_at(ID_A, T0);
    apr_time_t now = T0 + SEC(900);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_OFF, now), CS_PIN_ACCEPT);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ALARM, now),
                     CS_PIN_CHANGED);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, now),
                     CS_PIN_REFUSE);
    /* exact comparison: case and a missing IdentityId are changes too */
    ck_assert_int_eq(
        cs_pin_decide(&pin, "US-EAST-1:0236CB77-AAAA", CS_PIN_ALARM, now),
        CS_PIN_CHANGED);
    ck_assert_int_eq(cs_pin_decide(&pin, "", CS_PIN_ENFORCE, now),
                     CS_PIN_REFUSE);
    ck_assert_int_eq(cs_pin_decide(&pin, NULL, CS_PIN_ENFORCE, now),
                     CS_PIN_REFUSE);
}
END_TEST

/* A pin is forgotten at its expiry: the next token pins afresh. */
START_TEST(an_expired_pin_counts_as_none)
{
    cs_pin_t pin = pin_at(ID_A, T0);
    ck_assert_int_eq(pin.expires, T0 + DAY);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, T0 + DAY - 1),
                     CS_PIN_REFUSE);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ALARM, T0 + DAY - 1),
                     CS_PIN_CHANGED);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, T0 + DAY),
                     CS_PIN_ACCEPT);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ALARM, T0 + 2 * DAY),
                     CS_PIN_ACCEPT);
}
END_TEST

/* The life of one user's pin as the shell carries the verdicts out: an
 * accepted token re-pins (the pin lives on from its last confirmation), a
 * change in alarm mode re-pins the new identity, a refusal leaves the pin
 * as it was, so that it runs out a TTL after the last matching token. */
START_TEST(a_users_pin_over_time)
{
    cs_pin_t pin = pin_at(ID_A, T0);
    apr_time_t t = T0 + SEC(3600);

    ck_assert_int_eq(cs_pin_decide(&pin, ID_A, CS_PIN_ENFORCE, t),
                     CS_PIN_ACCEPT);
    cs_pin_make(&pin, ID_A, t, DAY);
    ck_assert_int_eq(pin.expires, t + DAY);
    /* enforce: refused for as long as the pin lives, never re-pinned */
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, t + SEC(60)),
                     CS_PIN_REFUSE);
    ck_assert_int_eq(
        cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, t + DAY - SEC(1)),
        CS_PIN_REFUSE);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, t + DAY),
                     CS_PIN_ACCEPT);
    /* alarm: one change, then the new identity is the pin */
    pin = pin_at(ID_A, T0);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ALARM, t),
                     CS_PIN_CHANGED);
    cs_pin_make(&pin, ID_B, t, DAY);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ALARM, t + SEC(900)),
                     CS_PIN_ACCEPT);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_A, CS_PIN_ALARM, t + SEC(900)),
                     CS_PIN_CHANGED);
    /* off: accepted, and the re-pin replaces a wrong pin */
    pin = pin_at(ID_A, T0);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_OFF, t), CS_PIN_ACCEPT);
    cs_pin_make(&pin, ID_B, t, DAY);
    ck_assert_int_eq(cs_pin_decide(&pin, ID_B, CS_PIN_ENFORCE, t + SEC(1)),
                     CS_PIN_ACCEPT);
}
END_TEST

static cs_key_t *key(void)
{
    cs_key_t *k;
    const char *err;
    ck_assert_int_eq(
        cs_key_parse(tp, "sk_test_cardscan_ai_aaaaaaaaaaaaaaaa", &k, &err),
        APR_SUCCESS);
    return k;
}

/* The shell seals a pin under "<cache id>/P" (its kind's tag), a token
 * under the cache id itself. */
START_TEST(pin_entry_round_trip)
{
    cs_key_t *k = key();
    cs_pin_t pin = pin_at(ID_A, T0), back;
    cs_entry_t e, o;
    unsigned char *data;
    apr_size_t len;
    const char *err = NULL;
    char id[CS_CACHE_ID_LEN + 1];
    const char *pin_id;

    cs_cache_id(k, CS_SANDBOX_URL, "alice", id);
    pin_id = apr_pstrcat(tp, id, "/P", NULL);
    cs_pin_to_entry(&pin, &e);
    ck_assert_int_eq(e.kind, CS_ENTRY_PIN);
    ck_assert_int_eq(cs_entry_seal(tp, k, pin_id, &e, &data, &len, &err),
                     APR_SUCCESS);
    ck_assert_ptr_null(memmem(data, len, ID_A, strlen(ID_A)));
    ck_assert_int_eq(cs_entry_open(tp, k, pin_id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_pin_from_entry(&o, &back, &err), APR_SUCCESS);
    ck_assert_str_eq(back.identity_id, ID_A);
    ck_assert_int_eq(back.pinned, T0);
    ck_assert_int_eq(back.expires, T0 + DAY);
    /* an empty IdentityId is a pin too */
    cs_pin_make(&pin, "", T0, DAY);
    cs_pin_to_entry(&pin, &e);
    ck_assert_int_eq(cs_entry_seal(tp, k, pin_id, &e, &data, &len, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_entry_open(tp, k, pin_id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_pin_from_entry(&o, &back, &err), APR_SUCCESS);
    ck_assert_str_eq(back.identity_id, "");
}
END_TEST

/* A pin never opens as a token, nor a token as a pin. */
START_TEST(pins_and_tokens_never_mix)
{
    cs_key_t *k = key();
    cs_pin_t pin = pin_at(ID_A, T0), back;
    cs_entry_t e, o, tok;
    unsigned char *data;
    apr_size_t len;
    const char *err = NULL;
    char id[CS_CACHE_ID_LEN + 1];
    const char *pin_id;
    cs_policy_t pol = {SEC(60), 25};

    cs_cache_id(k, CS_SANDBOX_URL, "alice", id);
    pin_id = apr_pstrcat(tp, id, "/P", NULL);
    cs_pin_to_entry(&pin, &e);
    cs_entry_seal(tp, k, pin_id, &e, &data, &len, &err);
    /* not under the token's id (nor another kind's) */
    ck_assert_int_ne(cs_entry_open(tp, k, id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_entry_open(tp, k, apr_pstrcat(tp, id, "/F", NULL), data,
                                   len, &o, &err),
                     APR_SUCCESS);
    /* and opened, it is never fresh, served nor a failure */
    ck_assert_int_eq(cs_entry_open(tp, k, pin_id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert(!cs_entry_fresh(&o, T0, 0));
    ck_assert_int_eq(cs_serve_decide(&o, NULL, T0, &pol), CS_DO_CALL);
    ck_assert_int_eq(cs_serve_decide(NULL, &o, T0, &pol), CS_DO_CALL);

    /* a token, sealed where a pin would be, is no pin */
    memset(&tok, 0, sizeof(tok));
    tok.kind = CS_ENTRY_TOKEN;
    tok.created = T0;
    tok.lifetime = SEC(900);
    tok.expires = T0 + SEC(900);
    tok.body = "{\"Token\":\"h.p.s\",\"IdentityId\":\"" ID_A "\"}";
    tok.body_len = strlen(tok.body);
    cs_entry_seal(tp, k, pin_id, &tok, &data, &len, &err);
    ck_assert_int_eq(cs_entry_open(tp, k, pin_id, data, len, &o, &err),
                     APR_SUCCESS);
    err = NULL;
    ck_assert_int_eq(cs_pin_from_entry(&o, &back, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    tok.kind = CS_ENTRY_FAILURE;
    ck_assert_int_eq(cs_pin_from_entry(&tok, &back, &err), APR_EINVAL);
}
END_TEST

START_TEST(store_id_of_a_pin)
{
    unsigned char key_bytes[CS_CACHE_KEY_LEN], t[CS_STORE_ID_LEN],
        pin[CS_STORE_ID_LEN];
    memset(key_bytes, 0xab, sizeof(key_bytes));
    cs_store_id(key_bytes, CS_ID_TOKEN, t);
    cs_store_id(key_bytes, CS_ID_PIN, pin);
    ck_assert_int_eq(pin[CS_CACHE_KEY_LEN], 'P');
    ck_assert(memcmp(t, pin, CS_STORE_ID_LEN) != 0);
}
END_TEST

START_TEST(mode_values)
{
    cs_pin_mode_e mode = CS_PIN_OFF;
    const char *err = NULL;
    ck_assert_int_eq(cs_pin_mode_parse(tp, "alarm", &mode, &err), APR_SUCCESS);
    ck_assert_int_eq(mode, CS_PIN_ALARM);
    ck_assert_int_eq(cs_pin_mode_parse(tp, "Enforce", &mode, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(mode, CS_PIN_ENFORCE);
    ck_assert_int_eq(cs_pin_mode_parse(tp, "OFF", &mode, &err), APR_SUCCESS);
    ck_assert_int_eq(mode, CS_PIN_OFF);
    ck_assert_int_eq(cs_pin_mode_parse(tp, "on", &mode, &err), APR_EINVAL);
    ck_assert_str_eq(err, "'on' is not alarm, enforce or off");
    ck_assert_int_eq(cs_pin_mode_parse(tp, "", &mode, &err), APR_EINVAL);
    ck_assert_int_eq(mode, CS_PIN_OFF);
    ck_assert_int_eq(CS_PIN_MODE_DEFAULT, CS_PIN_ALARM);
}
END_TEST

START_TEST(ttl_values)
{
    apr_interval_time_t ttl = 0;
    const char *err = NULL;
    const char *bad[] = {"",    "59",     "2592001",
                         "-60", "1e5",    "60s",
                         " 60", "3600.5", "99999999999999999999999"};
    ck_assert_int_eq(cs_pin_ttl_parse(tp, "86400", &ttl, &err), APR_SUCCESS);
    ck_assert_int_eq(ttl, DAY);
    ck_assert_int_eq(cs_pin_ttl_parse(tp, "60", &ttl, &err), APR_SUCCESS);
    ck_assert_int_eq(ttl, SEC(60));
    ck_assert_int_eq(cs_pin_ttl_parse(tp, "2592000", &ttl, &err), APR_SUCCESS);
    ck_assert_int_eq(ttl, SEC(2592000));
    ck_assert_int_eq(CS_PIN_TTL_DEFAULT, DAY);
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        ttl = 1;
        err = NULL;
        ck_assert_msg(cs_pin_ttl_parse(tp, bad[i], &ttl, &err) == APR_EINVAL,
                      "'%s' accepted", bad[i]);
        ck_assert_int_eq(ttl, 1);
        ck_assert_ptr_nonnull(err);
    }
    cs_pin_ttl_parse(tp, "59", &ttl, &err);
    ck_assert_str_eq(err, "'59' is not a whole number of seconds from 60 (a "
                          "minute) to 2592000 (30 days)");
}
END_TEST

START_TEST(refusal_reply)
{
    char *body = cs_reply_identity_mismatch(tp);
    cJSON *o = cJSON_Parse(body);
    ck_assert_ptr_nonnull(o);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "error")->valuestring,
                     "identity_mismatch");
    ck_assert(cJSON_IsString(cJSON_GetObjectItem(o, "message")));
    ck_assert_int_eq(cJSON_GetArraySize(o), 2);
    cJSON_Delete(o);
}
END_TEST

Suite *identity_suite(void)
{
    Suite *s = suite_create("identity");
    TCase *tc = tcase_create("identity");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, no_pin_is_accepted_in_every_mode);
    tcase_add_test(tc, the_same_identity_is_accepted_in_every_mode);
    tcase_add_test(tc, another_identity_by_mode);
    tcase_add_test(tc, an_expired_pin_counts_as_none);
    tcase_add_test(tc, a_users_pin_over_time);
    tcase_add_test(tc, pin_entry_round_trip);
    tcase_add_test(tc, pins_and_tokens_never_mix);
    tcase_add_test(tc, store_id_of_a_pin);
    tcase_add_test(tc, mode_values);
    tcase_add_test(tc, ttl_values);
    tcase_add_test(tc, refusal_reply);
    suite_add_tcase(s, tc);
    return s;
}
