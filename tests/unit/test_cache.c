#include "suites.h"

#include <stdio.h>
#include <string.h>

#include "lib/cardscan.h"

static cs_key_t *key(const char *secret)
{
    cs_key_t *k;
    const char *err;
    ck_assert_int_eq(cs_key_parse(tp, secret, &k, &err), APR_SUCCESS);
    return k;
}

#define KEY_A "sk_test_cardscan_ai_aaaaaaaaaaaaaaaa"
#define KEY_B "sk_test_cardscan_ai_bbbbbbbbbbbbbbbb"

START_TEST(ids_separate_tenants_endpoints_users)
{
    char a[CS_CACHE_ID_LEN + 1], b[CS_CACHE_ID_LEN + 1];
    cs_key_t *ka = key(KEY_A), *kb = key(KEY_B);
    cs_cache_id(ka, CS_SANDBOX_URL, "alice", a);
    ck_assert_int_eq(strlen(a), CS_CACHE_ID_LEN);
    cs_cache_id(ka, CS_SANDBOX_URL, "alice", b);
    ck_assert_str_eq(a, b);
    cs_cache_id(kb, CS_SANDBOX_URL, "alice", b);
    ck_assert_str_ne(a, b);
    cs_cache_id(ka, "http://127.0.0.1:1/v1", "alice", b);
    ck_assert_str_ne(a, b);
    cs_cache_id(ka, CS_SANDBOX_URL, "alicE", b);
    ck_assert_str_ne(a, b);
    /* the boundary between endpoint and user is not ambiguous */
    cs_cache_id(ka, "https://x/a", "b", a);
    cs_cache_id(ka, "https://x/", "ab", b);
    ck_assert_str_ne(a, b);
    /* the id reveals neither the user nor the key */
    ck_assert_ptr_null(strstr(a, "alice"));
}
END_TEST

START_TEST(key_bytes_are_the_id_decoded)
{
    char id[CS_CACHE_ID_LEN + 1];
    unsigned char raw[CS_CACHE_KEY_LEN];
    int firsts[256] = {0}, distinct = 0;
    cs_cache_id(key(KEY_A), CS_SANDBOX_URL, "alice", id);
    cs_cache_key_bytes(id, raw);
    for (int i = 0; i < CS_CACHE_KEY_LEN; i++) {
        char two[3];
        snprintf(two, sizeof(two), "%02x", raw[i]);
        ck_assert_int_eq(two[0], id[2 * i]);
        ck_assert_int_eq(two[1], id[2 * i + 1]);
    }
    /* the first byte (shmcb's sub-cache) spreads over far more than the
     * 16 values a hex id would give */
    for (int u = 0; u < 2000; u++) {
        char user[16];
        snprintf(user, sizeof(user), "u%d", u);
        cs_cache_id(key(KEY_A), CS_SANDBOX_URL, user, id);
        cs_cache_key_bytes(id, raw);
        if (!firsts[raw[0]]++)
            distinct++;
    }
    ck_assert_int_gt(distinct, 200);
}
END_TEST

/* the upstream's handles are kept apart by this digest of the proxy and
 * its credentials */
START_TEST(sha256_strings_keep_their_parts_apart)
{
    /* printf 'abc\0\0' | sha256sum: the parts with their NULs, nothing
     * else */
    static const unsigned char abc[CS_SHA256_LEN] = {
        0x06, 0x16, 0x29, 0x0e, 0x0a, 0x45, 0x00, 0x10, 0x15, 0xac, 0x04,
        0xf4, 0x97, 0x16, 0xfb, 0xec, 0x56, 0x4e, 0x5b, 0xd3, 0x30, 0x1a,
        0x9e, 0x88, 0x71, 0xc4, 0x22, 0xef, 0x5a, 0x69, 0x1f, 0xc1};
    const char *abc_null[2] = {"abc", NULL}, *abc_empty[2] = {"abc", ""};
    const char *pw1[3] = {"http://proxy:3128", "u:pw1", "/etc/ca.pem"};
    const char *pw2[3] = {"http://proxy:3128", "u:pw2", "/etc/ca.pem"};
    const char *moved[3] = {"http://proxy:3128u", ":pw1", "/etc/ca.pem"};
    const char *upper[3] = {"http://proxy:3128", "u:pw1", "/etc/CA.pem"};
    unsigned char a[CS_SHA256_LEN], b[CS_SHA256_LEN];

    ck_assert_int_eq(cs_sha256_strings(abc_null, 2, a), 1);
    ck_assert_int_eq(cs_sha256_strings(abc_empty, 2, b), 1);
    ck_assert_mem_eq(a, b, CS_SHA256_LEN);
    ck_assert_mem_eq(a, abc, CS_SHA256_LEN);
    cs_sha256_strings(pw1, 3, a);
    cs_sha256_strings(pw2, 3, b);
    ck_assert_int_ne(memcmp(a, b, CS_SHA256_LEN), 0);
    cs_sha256_strings(moved, 3, b);
    ck_assert_int_ne(memcmp(a, b, CS_SHA256_LEN), 0);
    cs_sha256_strings(upper, 3, b);
    ck_assert_int_ne(memcmp(a, b, CS_SHA256_LEN), 0);
}
END_TEST

static cs_entry_t sample(void)
{
    cs_entry_t e = {0};
    e.kind = CS_ENTRY_TOKEN;
    e.created = apr_time_from_sec(1800000000);
    e.lifetime = apr_time_from_sec(900);
    e.expires = e.created + e.lifetime;
    e.body = "{\"Token\":\"h.p.s\",\"IdentityId\":\"i\",\"session\":\"h.p.s\"}";
    e.body_len = strlen(e.body);
    return e;
}

START_TEST(seal_open_round_trip)
{
    cs_key_t *k = key(KEY_A);
    cs_entry_t e = sample(), o;
    unsigned char *data;
    apr_size_t len;
    const char *err = NULL;
    char id[CS_CACHE_ID_LEN + 1];
    cs_cache_id(k, CS_SANDBOX_URL, "alice", id);
    ck_assert_int_eq(cs_entry_seal(tp, k, id, &e, &data, &len, &err),
                     APR_SUCCESS);
    ck_assert_uint_le(len, e.body_len + CS_ENTRY_OVERHEAD);
    /* nothing of the body in the clear */
    ck_assert_ptr_null(memmem(data, len, "h.p.s", 5));
    ck_assert_int_eq(cs_entry_open(tp, k, id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(o.kind, CS_ENTRY_TOKEN);
    ck_assert_int_eq(o.created, e.created);
    ck_assert_int_eq(o.expires, e.expires);
    ck_assert_int_eq(o.lifetime, e.lifetime);
    ck_assert_str_eq(o.body, e.body);
    ck_assert_int_eq(o.body_len, e.body_len);
}
END_TEST

START_TEST(tampered_or_foreign_entries_do_not_open)
{
    cs_key_t *k = key(KEY_A), *other = key(KEY_B);
    cs_entry_t e = sample(), o;
    unsigned char *data;
    apr_size_t len;
    const char *err = NULL;
    char id[CS_CACHE_ID_LEN + 1], id2[CS_CACHE_ID_LEN + 1];
    cs_cache_id(k, CS_SANDBOX_URL, "alice", id);
    cs_cache_id(k, CS_SANDBOX_URL, "bob", id2);
    cs_entry_seal(tp, k, id, &e, &data, &len, &err);
    /* another key */
    ck_assert_int_ne(cs_entry_open(tp, other, id, data, len, &o, &err),
                     APR_SUCCESS);
    /* moved under another user's id */
    ck_assert_int_ne(cs_entry_open(tp, k, id2, data, len, &o, &err),
                     APR_SUCCESS);
    /* every single flipped byte is caught */
    for (apr_size_t i = 0; i < len; i++) {
        data[i] ^= 0x20;
        ck_assert_int_ne(cs_entry_open(tp, k, id, data, len, &o, &err),
                         APR_SUCCESS);
        data[i] ^= 0x20;
    }
    ck_assert_int_ne(cs_entry_open(tp, k, id, data, len - 1, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_ne(cs_entry_open(tp, k, id, data, 3, &o, &err), APR_SUCCESS);
    ck_assert_int_eq(cs_entry_open(tp, k, id, data, len, &o, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(seal_secret_override)
{
    cs_key_t *k = key(KEY_A), *k2 = key(KEY_A);
    cs_entry_t e = sample(), o;
    unsigned char *data;
    apr_size_t len;
    const char *err = NULL;
    char id[CS_CACHE_ID_LEN + 1];
    cs_cache_id(k, CS_SANDBOX_URL, "alice", id);
    cs_key_set_seal_secret(k2, "fleet secret", 12);
    cs_entry_seal(tp, k2, id, &e, &data, &len, &err);
    ck_assert_int_ne(cs_entry_open(tp, k, id, data, len, &o, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(cs_entry_open(tp, k2, id, data, len, &o, &err),
                     APR_SUCCESS);
}
END_TEST

START_TEST(freshness_honours_min_ttl)
{
    cs_entry_t e = sample();
    apr_time_t t0 = e.created;
    ck_assert(cs_entry_fresh(&e, t0, apr_time_from_sec(60)));
    ck_assert(
        cs_entry_fresh(&e, t0 + apr_time_from_sec(840), apr_time_from_sec(60)));
    ck_assert(!cs_entry_fresh(&e, t0 + apr_time_from_sec(841),
                              apr_time_from_sec(60)));
    /* the minimum is capped at half the lifetime */
    ck_assert(cs_entry_fresh(&e, t0 + apr_time_from_sec(450),
                             apr_time_from_sec(3600)));
    ck_assert(!cs_entry_fresh(&e, t0 + apr_time_from_sec(451),
                              apr_time_from_sec(3600)));
    ck_assert(!cs_entry_fresh(&e, e.expires, 0));
    e.kind = CS_ENTRY_FAILURE;
    ck_assert(!cs_entry_fresh(&e, t0, 0));
}
END_TEST

Suite *cache_suite(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("cache");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, ids_separate_tenants_endpoints_users);
    tcase_add_test(tc, key_bytes_are_the_id_decoded);
    tcase_add_test(tc, sha256_strings_keep_their_parts_apart);
    tcase_add_test(tc, seal_open_round_trip);
    tcase_add_test(tc, tampered_or_foreign_entries_do_not_open);
    tcase_add_test(tc, seal_secret_override);
    tcase_add_test(tc, freshness_honours_min_ttl);
    suite_add_tcase(s, tc);
    return s;
}
