/* API keys: format checks, loading (lib/cs_secret.c), masking, and the
 * secrets derived from a key for the cache. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>

static const struct {
    const char *prefix;
    cs_key_mode_e mode;
} key_prefixes[] = {
    {"sk_test_cardscan_ai_", CS_KEY_TEST},
    {"sk_live_cardscan_ai_", CS_KEY_LIVE},
    {"secret_test_", CS_KEY_TEST}, /* legacy, still accepted upstream */
    {"secret_live_", CS_KEY_LIVE},
};

#define KEY_MIN_SUFFIX 8
#define KEY_MAX_LEN 512

static apr_size_t key_prefix_len(const char *s, cs_key_mode_e *mode)
{
    for (size_t i = 0; i < sizeof(key_prefixes) / sizeof(key_prefixes[0]);
         i++) {
        apr_size_t n = strlen(key_prefixes[i].prefix);
        if (strncmp(s, key_prefixes[i].prefix, n) == 0) {
            if (mode)
                *mode = key_prefixes[i].mode;
            return n;
        }
    }
    return 0;
}

const char *cs_key_mask(apr_pool_t *p, const char *secret)
{
    apr_size_t len = secret ? strlen(secret) : 0;
    apr_size_t pre = secret ? key_prefix_len(secret, NULL) : 0;
    /* Show the last four characters only when enough stays hidden. */
    if (len >= pre + 12)
        return apr_pstrcat(p, apr_pstrndup(p, secret, pre), "\xE2\x80\xA6",
                           secret + len - 4, NULL);
    return apr_pstrcat(p, apr_pstrndup(p, secret, pre), "\xE2\x80\xA6", NULL);
}

static void derive(const char *secret, apr_size_t len, const char *label,
                   unsigned char out[CS_SECRET_LEN])
{
    unsigned int outlen = CS_SECRET_LEN;
    HMAC(EVP_sha256(), secret, (int)len, (const unsigned char *)label,
         strlen(label), out, &outlen);
}

apr_status_t cs_key_parse(apr_pool_t *p, const char *secret, cs_key_t **key,
                          const char **err)
{
    cs_key_mode_e mode;
    apr_size_t pre, len;

    if (!secret || !*secret) {
        *err = "the API key is empty";
        return APR_EINVAL;
    }
    len = strlen(secret);
    pre = key_prefix_len(secret, &mode);
    if (!pre) {
        *err = apr_psprintf(p,
                            "the API key %s does not start with "
                            "sk_test_cardscan_ai_ or sk_live_cardscan_ai_ "
                            "(or legacy secret_test_/secret_live_): copy it "
                            "from the CardScan dashboard",
                            cs_key_mask(p, secret));
        return APR_EINVAL;
    }
    if (len - pre < KEY_MIN_SUFFIX || len > KEY_MAX_LEN) {
        *err = apr_psprintf(p, "the API key %s is too %s to be a CardScan key",
                            cs_key_mask(p, secret),
                            len > KEY_MAX_LEN ? "long" : "short");
        return APR_EINVAL;
    }
    for (const char *c = secret + pre; *c; c++) {
        if (!apr_isalnum(*c) && *c != '_' && *c != '-') {
            *err = apr_psprintf(p,
                                "the API key %s contains a character a "
                                "CardScan key cannot have (whitespace or "
                                "punctuation at position %d)",
                                cs_key_mask(p, secret), (int)(c - secret));
            return APR_EINVAL;
        }
    }

    *key = apr_pcalloc(p, sizeof(**key));
    (*key)->secret = apr_pstrdup(p, secret);
    (*key)->masked = cs_key_mask(p, secret);
    (*key)->mode = mode;
    derive(secret, len, "mod_cardscan cache id v1", (*key)->id_key);
    derive(secret, len, "mod_cardscan cache seal v1", (*key)->seal_key);
    return APR_SUCCESS;
}

void cs_key_set_seal_secret(cs_key_t *key, const void *secret, apr_size_t len)
{
    derive(secret, len, "mod_cardscan cache seal v1", key->seal_key);
}

apr_status_t cs_key_load(apr_pool_t *p, const char *spec, cs_key_t **key,
                         const char **warning, const char **err)
{
    char *secret = NULL;
    apr_status_t rv;

    rv = cs_secret_load(p, spec, "API key", &secret, warning, err);
    if (rv != APR_SUCCESS)
        return rv;
    rv = cs_key_parse(p, secret, key, err);
    /* the parsed key keeps its own copy */
    if (secret != spec)
        OPENSSL_cleanse(secret, strlen(secret));
    return rv;
}
