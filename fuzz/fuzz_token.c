/* Fuzzes the access-token reply parser (cs_token_parse), the base64url
 * decoder under it and the client reply built from a parsed token.
 *
 * The input is an upstream reply body, passed with its exact length and no
 * terminating NUL (the parser must not read past len). Invariants:
 *  - cs_base64url_decode: on success the input was base64url (padding
 *    optional), the output is NUL-terminated, no longer than 3/4 of the input,
 *    and decodes again to itself after a standard re-encoding;
 *  - cs_token_parse: on success Token and IdentityId are non-NULL, Token is
 *    non-empty with exactly two dots, exp > iat and exp > now when present,
 *    cs_token_lifetime >= 0 (> 0 with exp); a failure's message never holds
 *    the token;
 *  - cs_reply_token: valid JSON (cJSON_Parse), an object of strings only,
 *    "Token" and "session" equal to the token, "IdentityId" and
 *    "session_id" as parsed, "expires_at" exactly when an expiry is known;
 *  - cs_reply_error with the parser's message: valid JSON carrying it.
 */
#include "fuzz_common.h"

#include <apr_base64.h>
#include <apr_lib.h>
#include <apr_strings.h>
#include <cjson/cJSON.h>

/* 2025-11-27T20:00:00Z: the seed corpus' tokens are issued around it. */
#define FUZZ_NOW_SEC APR_INT64_C(1764273600)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_apr_init();
    return 0;
}

static int is_b64url(int c)
{
    return apr_isalnum(c) || c == '-' || c == '_';
}

static void check_base64url(apr_pool_t *p, const uint8_t *data, size_t size)
{
    char *out = NULL, *enc, *again;
    apr_size_t outlen = 0, againlen = 0, i, n;
    int enclen;

    if (cs_base64url_decode(p, (const char *)data, size, &out, &outlen) !=
        APR_SUCCESS)
        return;
    for (i = 0; i < size; i++)
        FUZZ_CHECK(is_b64url(data[i]) || data[i] == '=',
                   "accepted byte 0x%02x at %zu", data[i], (size_t)i);
    FUZZ_CHECK(size % 4 != 1, "accepted a length of 4n+1 (%zu)", size);
    FUZZ_CHECK(out != NULL, "no output");
    FUZZ_CHECK(outlen <= (size * 3) / 4, "%zu bytes out of %zu", outlen, size);
    FUZZ_CHECK(out[outlen] == '\0', "output not NUL-terminated");

    /* Re-encode (standard alphabet, then url-safe, no padding) and decode
     * again: the same bytes must come back. */
    enc = apr_palloc(p, (apr_size_t)apr_base64_encode_len((int)outlen));
    enclen =
        apr_base64_encode_binary(enc, (const unsigned char *)out, (int)outlen);
    n = 0;
    for (i = 0; i < (apr_size_t)enclen && enc[i]; i++) {
        char c = enc[i];
        if (c == '=')
            break;
        enc[n++] = c == '+' ? '-' : c == '/' ? '_' : c;
    }
    FUZZ_CHECK(cs_base64url_decode(p, enc, n, &again, &againlen) == APR_SUCCESS,
               "its own re-encoding does not decode");
    FUZZ_CHECK(againlen == outlen && memcmp(again, out, outlen) == 0,
               "re-encoding round trip differs (%zu vs %zu bytes)", againlen,
               outlen);
}

static size_t count_char(const char *s, char c)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == c;
    return n;
}

static const char *json_string(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void check_reply(apr_pool_t *p, const cs_token_t *tok, apr_time_t now,
                        apr_interval_time_t lifetime)
{
    apr_time_t expires = tok->has_exp ? now + lifetime : 0;
    char *body = cs_reply_token(p, tok, expires, CS_KEY_TEST);
    const char *exp_at;
    cJSON *j, *item;

    FUZZ_CHECK(body != NULL, "cs_reply_token returned NULL");
    j = cJSON_Parse(body);
    FUZZ_CHECK(j != NULL && cJSON_IsObject(j), "reply is not a JSON object: %s",
               body);
    cJSON_ArrayForEach(item, j)
    {
        FUZZ_CHECK(cJSON_IsString(item), "reply member %s is not a string",
                   item->string ? item->string : "?");
    }
    FUZZ_CHECK(json_string(j, "Token") &&
                   strcmp(json_string(j, "Token"), tok->token) == 0,
               "reply Token differs from the token");
    FUZZ_CHECK(json_string(j, "session") &&
                   strcmp(json_string(j, "session"), tok->token) == 0,
               "reply session differs from the token");
    FUZZ_CHECK(json_string(j, "IdentityId") &&
                   strcmp(json_string(j, "IdentityId"), tok->identity_id) == 0,
               "reply IdentityId differs");
    if (tok->session_id)
        FUZZ_CHECK(json_string(j, "session_id") &&
                       strcmp(json_string(j, "session_id"), tok->session_id) ==
                           0,
                   "reply session_id differs");
    else
        FUZZ_CHECK(!cJSON_GetObjectItemCaseSensitive(j, "session_id"),
                   "reply has a session_id the upstream did not send");
    exp_at = json_string(j, "expires_at");
    FUZZ_CHECK(!exp_at == !expires, "expires_at %s, expiry %s",
               exp_at ? "present" : "absent", expires ? "known" : "unknown");
    if (exp_at) {
        /* YYYY-MM-DDTHH:MM:SSZ; a far-future exp (the parser accepts up
         * to 1e12 s) may have more than four digits of year */
        size_t len = strlen(exp_at), y = len - 16;
        FUZZ_CHECK(len >= 20 && exp_at[len - 1] == 'Z' && exp_at[y] == '-' &&
                       exp_at[y + 3] == '-' && exp_at[y + 6] == 'T' &&
                       exp_at[y + 9] == ':' && exp_at[y + 12] == ':',
                   "expires_at is not RFC 3339: %s", exp_at);
        FUZZ_CHECK(strcmp(exp_at, cs_rfc3339(p, expires)) == 0,
                   "expires_at differs from cs_rfc3339");
    }
    cJSON_Delete(j);
}

static void check_error_reply(apr_pool_t *p, const char *err)
{
    char *body = cs_reply_error(p, "upstream_error", err);
    cJSON *j;

    FUZZ_CHECK(body != NULL, "cs_reply_error returned NULL");
    j = cJSON_Parse(body);
    FUZZ_CHECK(j != NULL, "error reply is not JSON: %s", body);
    FUZZ_CHECK(json_string(j, "error") &&
                   strcmp(json_string(j, "error"), "upstream_error") == 0,
               "error code lost");
    FUZZ_CHECK(json_string(j, "message") &&
                   strcmp(json_string(j, "message"), err) == 0,
               "error message lost");
    cJSON_Delete(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    apr_time_t now = apr_time_from_sec(FUZZ_NOW_SEC);
    cs_token_t tok;
    const char *err = NULL;
    apr_status_t rv;

    check_base64url(p, data, size);

    /* libFuzzer's buffer is exactly size bytes: a read past len is caught */
    rv = cs_token_parse(p, (const char *)data, size, now, &tok, &err);
    if (rv == APR_SUCCESS) {
        apr_interval_time_t life = cs_token_lifetime(&tok, now);

        FUZZ_CHECK(tok.token != NULL && tok.identity_id != NULL,
                   "success without Token or IdentityId");
        FUZZ_CHECK(*tok.token, "empty Token accepted");
        FUZZ_CHECK(count_char(tok.token, '.') == 2,
                   "Token with %zu dots accepted: %s",
                   count_char(tok.token, '.'), tok.token);
        FUZZ_CHECK(tok.token[0] != '.' &&
                       tok.token[strlen(tok.token) - 1] != '.',
                   "Token with an empty part accepted: %s", tok.token);
        FUZZ_CHECK(life >= 0, "negative lifetime %" APR_INT64_T_FMT,
                   (apr_int64_t)life);
        if (tok.has_exp) {
            FUZZ_CHECK(life > 0, "zero lifetime for a token with exp");
            FUZZ_CHECK(tok.exp > FUZZ_NOW_SEC, "expired token accepted");
            if (tok.has_iat)
                FUZZ_CHECK(tok.exp > tok.iat, "exp <= iat accepted");
        }
        else {
            FUZZ_CHECK(life == 0, "lifetime without exp");
        }
        check_reply(p, &tok, now, life);
    }
    else {
        FUZZ_CHECK(err != NULL && *err, "failure without a message");
        /* The security baseline: a message never contains a token (one
         * with a dot, so that it is not merely a word of the message). */
        if (tok.token && strlen(tok.token) >= 8 && strchr(tok.token, '.'))
            FUZZ_CHECK(!strstr(err, tok.token), "message holds the token: %s",
                       err);
        check_error_reply(p, err);
    }

    fuzz_pool_destroy(p);
    return 0;
}
