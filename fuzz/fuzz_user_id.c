/* Fuzzes the user id's check and its encoding into the upstream query
 * (cs_user_id_check, cs_user_id_encode, cs_upstream_url, cs_cache_id).
 *
 * The input, NUL-terminated (an embedded NUL ends it), is a user id as
 * CardScanUserID produced it. Invariants:
 *  - the encoding holds only RFC 3986 unreserved characters and %XX (upper
 *    case hex), never '&', '=', '+', '#' or ' ', encodes no unreserved
 *    byte, and percent-decodes back to the input exactly;
 *  - cs_upstream_url is {endpoint}/access-token?user_id=<encoding>: one
 *    query parameter, whatever the id;
 *  - cs_user_id_check accepts exactly the ids of 1 to 1024 bytes without a
 *    control character (< 0x20 or 0x7f);
 *  - the cache id is 64 lower-case hex digits and depends on the user id.
 */
#include "fuzz_common.h"

#include <apr_lib.h>
#include <apr_strings.h>

#define ENDPOINT "https://sandbox.cardscan.ai/v1"

static cs_key_t *fuzz_key;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *err;
    (void)argc;
    (void)argv;
    fuzz_apr_init();
    if (cs_key_parse(fuzz_root, "sk_test_cardscan_ai_fuzzuserid0000abcd",
                     &fuzz_key, &err) != APR_SUCCESS) {
        fprintf(stderr, "fuzz: test key refused: %s\n", err);
        abort();
    }
    return 0;
}

static int unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
           c == '~';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* lower case is not what the encoder writes */
}

static int valid_id(const char *id)
{
    size_t len = strlen(id);
    if (len == 0 || len > CS_USER_ID_MAX)
        return 0;
    for (const unsigned char *c = (const unsigned char *)id; *c; c++)
        if (*c < 0x20 || *c == 0x7f)
            return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    /* an exact-size copy: a read past the NUL is caught */
    const char *id =
        apr_pstrdup(p, apr_pstrmemdup(p, (const char *)data, size));
    size_t len = strlen(id), i, n;
    const char *enc, *url, *err = NULL, *prefix;
    char *dec;
    char cid[CS_CACHE_ID_LEN + 1], cid2[CS_CACHE_ID_LEN + 1];
    apr_status_t rv;

    enc = cs_user_id_encode(p, id);
    FUZZ_CHECK(enc != NULL, "NULL encoding");
    FUZZ_CHECK(strlen(enc) <= 3 * len, "encoding too long");
    dec = apr_palloc(p, strlen(enc) + 1);
    for (i = 0, n = 0; enc[i]; n++) {
        unsigned char c = (unsigned char)enc[i];
        FUZZ_CHECK(c != '&' && c != '=' && c != '+' && c != '#' && c != ' ',
                   "encoding holds '%c': %s", c, enc);
        if (c == '%') {
            int hi = hexval(enc[i + 1]), lo = hi < 0 ? -1 : hexval(enc[i + 2]);
            FUZZ_CHECK(hi >= 0 && lo >= 0, "bad escape at %zu: %s", i, enc);
            dec[n] = (char)(hi * 16 + lo);
            FUZZ_CHECK(!unreserved((unsigned char)dec[n]),
                       "unreserved byte 0x%02x encoded", (unsigned char)dec[n]);
            i += 3;
        }
        else {
            FUZZ_CHECK(unreserved(c), "reserved byte 0x%02x left as is", c);
            dec[n] = (char)c;
            i++;
        }
    }
    dec[n] = '\0';
    FUZZ_CHECK(n == len && memcmp(dec, id, len) == 0,
               "decoding the encoding does not give the id back");

    url = cs_upstream_url(p, ENDPOINT, id);
    prefix = ENDPOINT "/access-token?user_id=";
    FUZZ_CHECK(url && strncmp(url, prefix, strlen(prefix)) == 0 &&
                   strcmp(url + strlen(prefix), enc) == 0,
               "unexpected URL: %s", url ? url : "(null)");
    FUZZ_CHECK(!strchr(strchr(url, '?') + 1, '?') &&
                   strchr(url, '=') == strrchr(url, '=') && !strchr(url, '&') &&
                   !strchr(url, '#'),
               "the id escapes its query value: %s", url);

    rv = cs_user_id_check(p, id, &err);
    FUZZ_CHECK((rv == APR_SUCCESS) == valid_id(id), "cs_user_id_check %s",
               rv == APR_SUCCESS ? "accepts an invalid id"
                                 : "refuses a valid id");
    if (rv != APR_SUCCESS)
        FUZZ_CHECK(err != NULL && *err, "failure without a message");

    cs_cache_id(fuzz_key, ENDPOINT, id, cid);
    FUZZ_CHECK(strlen(cid) == CS_CACHE_ID_LEN, "cache id length %zu",
               strlen(cid));
    for (i = 0; i < CS_CACHE_ID_LEN; i++)
        FUZZ_CHECK((cid[i] >= '0' && cid[i] <= '9') ||
                       (cid[i] >= 'a' && cid[i] <= 'f'),
                   "cache id is not hex: %s", cid);
    cs_cache_id(fuzz_key, ENDPOINT, apr_pstrcat(p, id, "x", NULL), cid2);
    FUZZ_CHECK(strcmp(cid, cid2) != 0, "two user ids share a cache id");

    fuzz_pool_destroy(p);
    return 0;
}
