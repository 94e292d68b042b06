/* API keys: format checks, loading from file:/env:, masking, and the
 * secrets derived from a key for the cache. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_env.h>
#include <apr_file_io.h>
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
#define KEY_FILE_MAX 4096

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

static apr_status_t read_key_file(apr_pool_t *p, const char *path, char **out,
                                  const char **warning, const char **err)
{
    apr_file_t *f;
    apr_finfo_t fi;
    apr_size_t n;
    char buf[KEY_FILE_MAX + 1];
    apr_status_t rv;

    /* not opened at all when it is no regular file (a FIFO would block) */
    rv = apr_stat(&fi, path, APR_FINFO_TYPE, p);
    if (rv == APR_SUCCESS && fi.filetype != APR_REG) {
        *err =
            apr_psprintf(p, "the API key file %s is not a regular file", path);
        return APR_EINVAL;
    }
    rv = apr_file_open(&f, path, APR_FOPEN_READ, APR_FPROT_OS_DEFAULT, p);
    if (rv != APR_SUCCESS) {
        char msg[120];
        *err = apr_psprintf(p,
                            "cannot read the API key file %s: %s (it is read "
                            "once at start-up, as root)",
                            path, apr_strerror(rv, msg, sizeof(msg)));
        return rv;
    }
    /* the type and mode of the file that was opened: the path may have
     * been replaced since the stat above, or the stat may have failed */
    memset(&fi, 0, sizeof(fi));
    rv = apr_file_info_get(&fi, APR_FINFO_TYPE | APR_FINFO_PROT, f);
    if ((rv != APR_SUCCESS && rv != APR_INCOMPLETE) ||
        !(fi.valid & APR_FINFO_TYPE) || fi.filetype != APR_REG) {
        apr_file_close(f);
        *err =
            apr_psprintf(p, "the API key file %s is not a regular file", path);
        return APR_EINVAL;
    }
    rv = apr_file_read_full(f, buf, KEY_FILE_MAX, &n);
    apr_file_close(f);
    if (rv != APR_SUCCESS && rv != APR_EOF) {
        *err = apr_psprintf(p, "cannot read the API key file %s", path);
        return rv;
    }
    if (n == KEY_FILE_MAX) {
        *err = apr_psprintf(p, "the API key file %s is too large", path);
        return APR_EINVAL;
    }
    /* Tolerate the trailing newline editors add, and surrounding blanks. */
    while (n > 0 && apr_isspace(buf[n - 1]))
        n--;
    buf[n] = '\0';
    {
        const char *s = buf;
        while (apr_isspace(*s))
            s++;
        *out = apr_pstrdup(p, s);
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    if ((fi.valid & APR_FINFO_PROT) && (fi.protection & APR_WREAD))
        *warning = apr_psprintf(p,
                                "the API key file %s is readable by every "
                                "user of this machine: chmod 600 (or 640 "
                                "with group root) is enough for Apache",
                                path);
    return APR_SUCCESS;
}

/* Takes a variable out of the environment: children, piped loggers and
 * RewriteMap programs then inherit none of it. The value is kept in the
 * process's root pool (it outlives every configuration pool), keyed by
 * the name, so that the next reading of the configuration (a graceful
 * restart) finds it; a value set again replaces it. Not thread-safe, like
 * the environment: configuration time only. */
static char *env_take(apr_pool_t *p, const char *name)
{
    apr_pool_t *root = p, *parent;
    const char *tag = apr_pstrcat(p, "mod_cardscan env:", name, NULL);
    char *value = NULL;
    void *kept = NULL;

    while ((parent = apr_pool_parent_get(root)))
        root = parent;
    if (apr_env_get(&value, name, p) == APR_SUCCESS && value && *value) {
        apr_pool_userdata_get(&kept, tag, root);
        if (!kept || strcmp(kept, value) != 0) {
            kept = apr_pstrdup(root, value);
            apr_pool_userdata_set(kept, apr_pstrdup(root, tag),
                                  apr_pool_cleanup_null, root);
        }
        /* a copy: apr_env_get's value is the environment's own memory */
        value = apr_pstrdup(p, value);
        apr_env_delete(name, p);
        return value;
    }
    apr_pool_userdata_get(&kept, tag, root);
    return kept ? apr_pstrdup(p, kept) : NULL;
}

apr_status_t cs_key_load(apr_pool_t *p, const char *spec, cs_key_t **key,
                         const char **warning, const char **err)
{
    char *secret = NULL;
    apr_status_t rv;

    *warning = NULL;
    if (strncmp(spec, "file:", 5) == 0) {
        rv = read_key_file(p, spec + 5, &secret, warning, err);
        if (rv != APR_SUCCESS)
            return rv;
    }
    else if (strncmp(spec, "env:", 4) == 0) {
        secret = env_take(p, spec + 4);
        if (!secret || !*secret) {
            *err = apr_psprintf(p,
                                "the environment variable %s holding the API "
                                "key is not set in Apache's environment (on "
                                "Debian: /etc/apache2/envvars)",
                                spec + 4);
            return APR_EINVAL;
        }
    }
    else {
        secret = (char *)spec;
    }
    rv = cs_key_parse(p, secret, key, err);
    /* the parsed key keeps its own copy */
    if (secret != spec)
        OPENSSL_cleanse(secret, strlen(secret));
    return rv;
}
