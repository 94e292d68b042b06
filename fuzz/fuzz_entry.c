/* Fuzzes the sealed cache entry codec (cs_entry_seal, cs_entry_open,
 * cs_entry_fresh). A cache entry is what a shared cache (Redis, memcached)
 * hands back: an attacker who can write there controls every byte.
 *
 * The first input byte picks a mode (byte % 3), the rest is its data:
 *  0. open: the bytes as a stored entry; cs_entry_open must not crash and
 *     must refuse them (nobody without the seal key forges AES-GCM).
 *  1. round trip: the bytes give an entry's fields and body; sealed, it
 *     opens to the same fields and body (NUL-terminated), or is refused
 *     exactly when its kind is unknown; a flipped bit, a truncation, another
 *     cache id or another key make it unopenable.
 *  2. authentic garbage: the bytes are a plaintext sealed here the way
 *     lib/cs_cache.c seals (version 1, 12-byte nonce, AES-256-GCM under the
 *     key's seal_key, AAD "mod_cardscan entry v1 " + id), which reaches the
 *     checks behind the authentication; a success must be self-consistent.
 *     (This mirrors the entry format: when it changes, update SEAL_* below;
 *     until then the mode only sees refusals.)
 */
#include "fuzz_common.h"

#include <apr_strings.h>
#include <openssl/evp.h>

#define ENDPOINT "https://sandbox.cardscan.ai/v1"
#define SEAL_VERSION 1
#define SEAL_NONCE_LEN 12
#define SEAL_TAG_LEN 16
#define SEAL_AAD "mod_cardscan entry v1 "
#define SEAL_HEADER 44

static cs_key_t *fuzz_key, *other_key;
static char fuzz_id[CS_CACHE_ID_LEN + 1], other_id[CS_CACHE_ID_LEN + 1];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *err;
    (void)argc;
    (void)argv;
    fuzz_apr_init();
    if (cs_key_parse(fuzz_root, "sk_test_cardscan_ai_fuzzentry0000abcd",
                     &fuzz_key, &err) != APR_SUCCESS ||
        cs_key_parse(fuzz_root, "sk_test_cardscan_ai_fuzzentry1111abcd",
                     &other_key, &err) != APR_SUCCESS) {
        fprintf(stderr, "fuzz: test key refused: %s\n", err);
        abort();
    }
    cs_cache_id(fuzz_key, ENDPOINT, "alice@hospital.example", fuzz_id);
    cs_cache_id(fuzz_key, ENDPOINT, "bob@hospital.example", other_id);
    return 0;
}

/* Reads n little-endian bytes of the input, zero past its end. */
static apr_uint64_t take(const uint8_t **d, size_t *left, int n)
{
    apr_uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        apr_uint64_t b = 0;
        if (*left) {
            b = **d;
            (*d)++;
            (*left)--;
        }
        v |= b << (8 * i);
    }
    return v;
}

/* cs_entry_fresh over times a server can have written (an entry is
 * authenticated, so absurd ones never reach it): 0 .. ~31,700 years in
 * microseconds. Any answer will do, as long as it is consistent. */
#define SANE_TIME(t) ((t) >= 0 && (t) <= APR_INT64_C(1000000000000000000))

/* now is `age` microseconds after the entry's creation */
static void check_fresh(const cs_entry_t *e, apr_uint32_t age,
                        apr_interval_time_t min_ttl)
{
    apr_time_t now;
    int fresh;

    if (!SANE_TIME(e->created) || !SANE_TIME(e->expires) ||
        !SANE_TIME(e->lifetime) || !SANE_TIME(min_ttl))
        return;
    now = e->created + (apr_time_t)age;
    fresh = cs_entry_fresh(e, now, min_ttl);
    if (fresh)
        FUZZ_CHECK(e->kind == CS_ENTRY_TOKEN && e->expires > now,
                   "a failure entry or an expired token is fresh");
    if (e->kind == CS_ENTRY_TOKEN && e->expires - now >= min_ttl &&
        e->expires > now)
        FUZZ_CHECK(fresh, "a token with min_ttl left is not fresh");
}

static void mode_open(apr_pool_t *p, const uint8_t *d, size_t n)
{
    cs_entry_t e;
    const char *err = NULL;
    /* an exact-size copy of its own, as the cache would return */
    unsigned char *buf = n ? apr_pmemdup(p, d, n) : apr_palloc(p, 1);

    FUZZ_CHECK(cs_entry_open(p, fuzz_key, fuzz_id, buf, n, &e, &err) !=
                   APR_SUCCESS,
               "cs_entry_open accepted %zu unauthenticated bytes", n);
    FUZZ_CHECK(err != NULL && *err, "failure without a message");
}

static void mode_round_trip(apr_pool_t *p, const uint8_t *d, size_t n)
{
    cs_entry_t e, o;
    unsigned char *sealed, *copy;
    apr_size_t sealed_len;
    const char *err = NULL;
    apr_uint64_t kind_byte, where;
    int kind_ok;
    apr_status_t rv;

    memset(&e, 0, sizeof(e));
    kind_byte = take(&d, &n, 1);
    /* mostly the three real kinds, sometimes anything (0, 4, 8, ...) */
    e.kind = (cs_entry_kind_e)(kind_byte < 240 ? 1 + kind_byte % 3
                                               : (kind_byte - 240) * 4);
    e.created = (apr_time_t)take(&d, &n, 8);
    e.expires = (apr_time_t)take(&d, &n, 8);
    e.lifetime = (apr_interval_time_t)take(&d, &n, 8);
    e.status = (int)(apr_uint32_t)take(&d, &n, 4);
    e.retry_after = (int)(apr_uint32_t)take(&d, &n, 4);
    where = take(&d, &n, 4);
    e.body = n ? apr_pmemdup(p, d, n) : apr_palloc(p, 1);
    e.body_len = n;
    kind_ok = e.kind == CS_ENTRY_TOKEN || e.kind == CS_ENTRY_FAILURE ||
              e.kind == CS_ENTRY_PIN;

    rv = cs_entry_seal(p, fuzz_key, fuzz_id, &e, &sealed, &sealed_len, &err);
    FUZZ_CHECK(rv == APR_SUCCESS, "sealing failed: %s", err ? err : "?");
    FUZZ_CHECK(sealed_len <= e.body_len + CS_ENTRY_OVERHEAD,
               "sealed %zu bytes for a %zu-byte body, over CS_ENTRY_OVERHEAD",
               sealed_len, e.body_len);
    FUZZ_CHECK(!e.body_len ||
                   !fuzz_memmem(sealed, sealed_len, e.body, e.body_len) ||
                   e.body_len < 8,
               "the body shows through the seal");

    memset(&o, 0, sizeof(o));
    err = NULL;
    rv = cs_entry_open(p, fuzz_key, fuzz_id, sealed, sealed_len, &o, &err);
    FUZZ_CHECK((rv == APR_SUCCESS) == kind_ok, "kind %d: open %s", (int)e.kind,
               rv == APR_SUCCESS ? "accepted" : err);
    if (rv == APR_SUCCESS) {
        FUZZ_CHECK(o.kind == e.kind && o.created == e.created &&
                       o.expires == e.expires && o.lifetime == e.lifetime &&
                       o.status == e.status && o.retry_after == e.retry_after,
                   "fields differ after the round trip");
        FUZZ_CHECK(o.body_len == e.body_len &&
                       memcmp(o.body, e.body, e.body_len) == 0,
                   "body differs after the round trip");
        FUZZ_CHECK(o.body[o.body_len] == '\0', "body not NUL-terminated");
        check_fresh(&o, (apr_uint32_t)(where & 0xffffff),
                    (apr_interval_time_t)(where >> 8));
    }
    else {
        FUZZ_CHECK(err != NULL && *err, "failure without a message");
    }

    /* Whatever the kind, these never open. */
    copy = apr_pmemdup(p, sealed, sealed_len);
    copy[where % sealed_len] ^= (unsigned char)(1u << ((where >> 24) & 7));
    FUZZ_CHECK(cs_entry_open(p, fuzz_key, fuzz_id, copy, sealed_len, &o,
                             &err) != APR_SUCCESS,
               "a flipped bit at %zu opened", (size_t)(where % sealed_len));
    copy = apr_pmemdup(p, sealed, sealed_len - 1);
    FUZZ_CHECK(cs_entry_open(p, fuzz_key, fuzz_id, copy, sealed_len - 1, &o,
                             &err) != APR_SUCCESS,
               "a truncated entry opened");
    FUZZ_CHECK(cs_entry_open(p, fuzz_key, other_id, sealed, sealed_len, &o,
                             &err) != APR_SUCCESS,
               "an entry opened under another cache id");
    FUZZ_CHECK(cs_entry_open(p, other_key, fuzz_id, sealed, sealed_len, &o,
                             &err) != APR_SUCCESS,
               "an entry opened under another key");
}

static void mode_authentic(apr_pool_t *p, const uint8_t *d, size_t n)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    apr_size_t len = 1 + SEAL_NONCE_LEN + n + SEAL_TAG_LEN;
    unsigned char *sealed = apr_pcalloc(p, len);
    unsigned char *ct = sealed + 1 + SEAL_NONCE_LEN;
    int outl = 0, ok;
    cs_entry_t e;
    const char *err = NULL;

    sealed[0] = SEAL_VERSION;
    memset(sealed + 1, 0x5a, SEAL_NONCE_LEN); /* any nonce will do here */
    ok =
        c && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, SEAL_NONCE_LEN, NULL) ==
            1 &&
        EVP_EncryptInit_ex(c, NULL, NULL, fuzz_key->seal_key, sealed + 1) ==
            1 &&
        EVP_EncryptUpdate(c, NULL, &outl, (const unsigned char *)SEAL_AAD,
                          (int)strlen(SEAL_AAD)) == 1 &&
        EVP_EncryptUpdate(c, NULL, &outl, (const unsigned char *)fuzz_id,
                          (int)strlen(fuzz_id)) == 1 &&
        (n == 0 || EVP_EncryptUpdate(c, ct, &outl, d, (int)n) == 1) &&
        EVP_EncryptFinal_ex(c, ct + n, &outl) == 1 &&
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, SEAL_TAG_LEN, ct + n) == 1;
    EVP_CIPHER_CTX_free(c);
    FUZZ_CHECK(ok, "OpenSSL could not seal");

    memset(&e, 0, sizeof(e));
    if (cs_entry_open(p, fuzz_key, fuzz_id, sealed, len, &e, &err) !=
        APR_SUCCESS) {
        FUZZ_CHECK(err != NULL && *err, "failure without a message");
        return;
    }
    /* It authenticated: lib/ may accept only a well-formed plaintext. */
    FUZZ_CHECK(n >= SEAL_HEADER && memcmp(d, "CSE1", 4) == 0,
               "an entry without the magic opened");
    FUZZ_CHECK(e.kind == CS_ENTRY_TOKEN || e.kind == CS_ENTRY_FAILURE ||
                   e.kind == CS_ENTRY_PIN,
               "an entry of kind %d opened", (int)e.kind);
    FUZZ_CHECK(e.body != NULL && e.body_len == n - SEAL_HEADER &&
                   memcmp(e.body, d + SEAL_HEADER, e.body_len) == 0 &&
                   e.body[e.body_len] == '\0',
               "the opened body is not the plaintext's");
    check_fresh(&e, 0, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p;

    if (size == 0)
        return 0;
    p = fuzz_pool();
    switch (data[0] % 3) {
    case 0:
        mode_open(p, data + 1, size - 1);
        break;
    case 1:
        mode_round_trip(p, data + 1, size - 1);
        break;
    default:
        mode_authentic(p, data + 1, size - 1);
        break;
    }
    fuzz_pool_destroy(p);
    return 0;
}
