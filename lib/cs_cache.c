/* Cache ids and the sealed entry codec. Entries are sealed with AES-256-GCM
 * even in a local shmcb: one format everywhere, and a shared cache on
 * another machine learns nothing from what it stores. */
#include "cardscan.h"

#include <apr_strings.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <string.h>

#define ENTRY_MAGIC "CSE1"
#define ENTRY_HEADER 44
#define SEAL_VERSION 1
#define NONCE_LEN 12
#define TAG_LEN 16
#define AAD_LABEL "mod_cardscan entry v1 "

/* OpenSSL 3 looks an algorithm up on every one-shot call: look SHA-256 and
 * AES-256-GCM up once per process instead (they are on the hit path). */
static pthread_once_t algs_once = PTHREAD_ONCE_INIT;
static const EVP_MD *alg_sha256;
static const EVP_CIPHER *alg_gcm;

static void fetch_algs(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    alg_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    alg_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
#endif
    if (!alg_sha256)
        alg_sha256 = EVP_sha256();
    if (!alg_gcm)
        alg_gcm = EVP_aes_256_gcm();
}

static const EVP_MD *sha256(void)
{
    pthread_once(&algs_once, fetch_algs);
    return alg_sha256;
}

static const EVP_CIPHER *aes_gcm(void)
{
    pthread_once(&algs_once, fetch_algs);
    return alg_gcm;
}

int cs_sha256_strings(const char *const *parts, int n,
                      unsigned char out[CS_SHA256_LEN])
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, sha256(), NULL);

    for (int i = 0; ok && i < n; i++) {
        const char *s = parts[i] ? parts[i] : "";
        ok = EVP_DigestUpdate(ctx, s, strlen(s) + 1);
    }
    ok = ok && EVP_DigestFinal_ex(ctx, out, NULL);
    if (!ok)
        memset(out, 0, CS_SHA256_LEN);
    EVP_MD_CTX_free(ctx);
    return ok;
}

void cs_cache_key_bytes(const char *id, unsigned char out[CS_CACHE_KEY_LEN])
{
    for (int i = 0; i < CS_CACHE_KEY_LEN; i++) {
        unsigned char hi = (unsigned char)id[2 * i],
                      lo = (unsigned char)id[2 * i + 1];
        hi = hi <= '9' ? hi - '0' : hi - 'a' + 10;
        lo = lo <= '9' ? lo - '0' : lo - 'a' + 10;
        out[i] = (unsigned char)((hi << 4) | lo);
    }
}

void cs_cache_id(const cs_key_t *key, const char *endpoint, const char *user_id,
                 char *out)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char parts[2 * 32], mac[32];
    unsigned int maclen = sizeof(mac);

    /* Digest each part first: fixed-size input, and ("a", "bc") and
     * ("ab", "c") stay apart. */
    EVP_Digest(endpoint, strlen(endpoint), parts, NULL, sha256(), NULL);
    EVP_Digest(user_id, strlen(user_id), parts + 32, NULL, sha256(), NULL);
    HMAC(sha256(), key->id_key, CS_SECRET_LEN, parts, sizeof(parts), mac,
         &maclen);
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[mac[i] >> 4];
        out[2 * i + 1] = hex[mac[i] & 15];
    }
    out[CS_CACHE_ID_LEN] = '\0';
}

static void put32(unsigned char *b, apr_uint32_t v)
{
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *b, apr_int64_t v)
{
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((apr_uint64_t)v >> (8 * i));
}

static apr_uint32_t get32(const unsigned char *b)
{
    apr_uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

static apr_int64_t get64(const unsigned char *b)
{
    apr_uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | b[i];
    return (apr_int64_t)v;
}

/* AES-256-GCM one way or the other; the AAD binds the entry to its id so
 * that an entry copied under another id does not open. */
static int gcm(int enc, const cs_key_t *key, const char *id,
               const unsigned char *nonce, const unsigned char *in, int inlen,
               unsigned char *out, unsigned char *tag)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int n, ok;

    ok = c && EVP_CipherInit_ex(c, aes_gcm(), NULL, NULL, NULL, enc) == 1 &&
         EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1 &&
         EVP_CipherInit_ex(c, NULL, NULL, key->seal_key, nonce, enc) == 1 &&
         EVP_CipherUpdate(c, NULL, &n, (const unsigned char *)AAD_LABEL,
                          (int)strlen(AAD_LABEL)) == 1 &&
         EVP_CipherUpdate(c, NULL, &n, (const unsigned char *)id,
                          (int)strlen(id)) == 1 &&
         EVP_CipherUpdate(c, out, &n, in, inlen) == 1 &&
         (enc ||
          EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) == 1) &&
         EVP_CipherFinal_ex(c, out + n, &n) == 1 &&
         (!enc ||
          EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) == 1);
    EVP_CIPHER_CTX_free(c);
    return ok;
}

apr_status_t cs_entry_seal(apr_pool_t *p, const cs_key_t *key, const char *id,
                           const cs_entry_t *e, unsigned char **out,
                           apr_size_t *outlen, const char **err)
{
    apr_size_t plen = ENTRY_HEADER + e->body_len;
    unsigned char *plain, *sealed;

    if (e->body_len > 1024 * 1024) {
        *err = "the entry is too large to cache";
        return APR_ENOSPC;
    }
    plain = apr_palloc(p, plen);
    memcpy(plain, ENTRY_MAGIC, 4);
    put32(plain + 4, (apr_uint32_t)e->kind);
    put64(plain + 8, e->created);
    put64(plain + 16, e->expires);
    put64(plain + 24, e->lifetime);
    put32(plain + 32, (apr_uint32_t)e->status);
    put32(plain + 36, (apr_uint32_t)e->retry_after);
    put32(plain + 40, (apr_uint32_t)e->body_len);
    memcpy(plain + ENTRY_HEADER, e->body, e->body_len);

    *outlen = 1 + NONCE_LEN + plen + TAG_LEN;
    sealed = apr_palloc(p, *outlen);
    sealed[0] = SEAL_VERSION;
    if (RAND_bytes(sealed + 1, NONCE_LEN) != 1 ||
        !gcm(1, key, id, sealed + 1, plain, (int)plen, sealed + 1 + NONCE_LEN,
             sealed + 1 + NONCE_LEN + plen)) {
        OPENSSL_cleanse(plain, plen);
        *err = "sealing the cache entry failed (OpenSSL)";
        return APR_EGENERAL;
    }
    OPENSSL_cleanse(plain, plen);
    *out = sealed;
    return APR_SUCCESS;
}

apr_status_t cs_entry_open(apr_pool_t *p, const cs_key_t *key, const char *id,
                           const unsigned char *in, apr_size_t inlen,
                           cs_entry_t *e, const char **err)
{
    apr_size_t plen;
    unsigned char *plain;
    unsigned char tag[TAG_LEN];
    char *body;

    if (inlen < 1 + NONCE_LEN + ENTRY_HEADER + TAG_LEN ||
        in[0] != SEAL_VERSION || inlen > 1024 * 1024 + 1024) {
        *err = "the cache entry is not a mod_cardscan entry";
        return APR_EMISMATCH;
    }
    plen = inlen - 1 - NONCE_LEN - TAG_LEN;
    plain = apr_palloc(p, plen + 1);
    memcpy(tag, in + 1 + NONCE_LEN + plen, TAG_LEN);
    if (!gcm(0, key, id, in + 1, in + 1 + NONCE_LEN, (int)plen, plain, tag)) {
        *err = "the cache entry does not authenticate (tampered, or sealed "
               "with another key)";
        return APR_EINVAL;
    }
    if (memcmp(plain, ENTRY_MAGIC, 4) != 0 ||
        get32(plain + 40) != plen - ENTRY_HEADER) {
        *err = "the cache entry is malformed";
        return APR_EINVAL;
    }
    e->kind = (cs_entry_kind_e)get32(plain + 4);
    e->created = get64(plain + 8);
    e->expires = get64(plain + 16);
    e->lifetime = get64(plain + 24);
    e->status = (int)get32(plain + 32);
    e->retry_after = (int)get32(plain + 36);
    e->body_len = plen - ENTRY_HEADER;
    /* the body stays in place: plain is the caller's pool memory */
    body = (char *)plain + ENTRY_HEADER;
    body[e->body_len] = '\0';
    e->body = body;
    if (e->kind != CS_ENTRY_TOKEN && e->kind != CS_ENTRY_FAILURE &&
        e->kind != CS_ENTRY_PIN) {
        *err = "the cache entry has an unknown kind";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

int cs_entry_fresh(const cs_entry_t *e, apr_time_t now,
                   apr_interval_time_t min_ttl)
{
    if (e->kind != CS_ENTRY_TOKEN)
        return 0;
    if (min_ttl > e->lifetime / 2)
        min_ttl = e->lifetime / 2;
    return e->expires - now >= min_ttl && e->expires > now;
}
