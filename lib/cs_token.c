/* The access-token reply: JSON shape, JWT structure and claims. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_base64.h>
#include <apr_strings.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

#define JWT_MAX_PART 16384

apr_status_t cs_base64url_decode(apr_pool_t *p, const char *in,
                                 apr_size_t inlen, char **out,
                                 apr_size_t *outlen)
{
    char *std;
    apr_size_t i, padded;

    if (inlen % 4 == 1 || inlen > JWT_MAX_PART)
        return APR_EINVAL;
    /* apr_base64 speaks the standard alphabet and skips what it does not
     * know, so check the alphabet here and translate. */
    padded = (inlen + 3) & ~(apr_size_t)3;
    std = apr_palloc(p, padded + 1);
    for (i = 0; i < inlen; i++) {
        char c = in[i];
        if (c == '-')
            c = '+';
        else if (c == '_')
            c = '/';
        else if (c == '=' && i + 2 >= inlen && (inlen % 4 == 0))
            ; /* tolerate padding at the end */
        else if (!apr_isalnum(c))
            return APR_EINVAL;
        std[i] = c;
    }
    for (; i < padded; i++)
        std[i] = '=';
    std[padded] = '\0';
    *out = apr_palloc(p, apr_base64_decode_len(std) + 1);
    *outlen = (apr_size_t)apr_base64_decode_binary((unsigned char *)*out, std);
    (*out)[*outlen] = '\0';
    return APR_SUCCESS;
}

/* cJSON_ParseWithLengthOpts came with cJSON 1.7.13; older releases (Ubuntu
 * 20.04's 1.7.10) parse a NUL-terminated copy instead. An embedded NUL
 * then ends the text early and the trailing-bytes check refuses the reply
 * (stricter than the length-aware parser, which lets a NUL inside a string
 * cut that string short). */
#if CJSON_VERSION_MAJOR > 1 ||                                                 \
    (CJSON_VERSION_MAJOR == 1 &&                                               \
     (CJSON_VERSION_MINOR > 7 ||                                               \
      (CJSON_VERSION_MINOR == 7 && CJSON_VERSION_PATCH >= 13)))
#define CS_CJSON_PARSE_WITH_LENGTH 1
#endif

static cJSON *parse_json(apr_pool_t *p, const char *s, apr_size_t len)
{
    const char *end = NULL;
#ifdef CS_CJSON_PARSE_WITH_LENGTH
    cJSON *j = cJSON_ParseWithLengthOpts(s, len, &end, 0);
    (void)p;
#else
    cJSON *j;
    s = apr_pstrmemdup(p, s, len);
    j = cJSON_ParseWithOpts(s, &end, 0);
#endif
    if (!j)
        return NULL;
    /* trailing garbage after the value is a malformed reply */
    while (end && (apr_size_t)(end - s) < len && apr_isspace(*end))
        end++;
    if (!end || (apr_size_t)(end - s) != len || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* A time claim: 1 when present and valid, 0 when absent, -1 when it is not
 * a number of seconds up to the end of year 9999 (expires_at must stay a
 * valid RFC 3339 date). */
static int read_claim(const cJSON *payload, const char *name, apr_int64_t *v)
{
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(payload, name);
    if (!c)
        return 0;
    if (!cJSON_IsNumber(c) || !isfinite(c->valuedouble) || c->valuedouble < 0 ||
        c->valuedouble > 253402300799.0)
        return -1;
    *v = (apr_int64_t)c->valuedouble;
    return 1;
}

/* A JWT is header.payload.signature, each base64url; header and payload
 * must decode to JSON objects. */
static apr_status_t parse_jwt(apr_pool_t *p, const char *jwt, cs_token_t *tok,
                              const char **err)
{
    const char *dot1 = strchr(jwt, '.'), *dot2;
    char *dec;
    apr_size_t declen;
    cJSON *j;

    dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    if (!dot1 || !dot2 || strchr(dot2 + 1, '.') || dot1 == jwt ||
        dot2 == dot1 + 1 || !dot2[1]) {
        *err = "the Token is not a JWT (three base64url parts)";
        return APR_EINVAL;
    }
    for (const char *c = dot2 + 1; *c; c++) {
        if (!apr_isalnum(*c) && *c != '-' && *c != '_' && *c != '=') {
            *err = "the Token's signature is not base64url";
            return APR_EINVAL;
        }
    }
    if (cs_base64url_decode(p, jwt, (apr_size_t)(dot1 - jwt), &dec, &declen) !=
            APR_SUCCESS ||
        !(j = parse_json(p, dec, declen))) {
        *err = "the Token's JWT header does not decode to a JSON object";
        return APR_EINVAL;
    }
    cJSON_Delete(j);
    if (cs_base64url_decode(p, dot1 + 1, (apr_size_t)(dot2 - dot1 - 1), &dec,
                            &declen) != APR_SUCCESS ||
        !(j = parse_json(p, dec, declen))) {
        *err = "the Token's JWT payload does not decode to a JSON object";
        return APR_EINVAL;
    }
    tok->has_exp = read_claim(j, "exp", &tok->exp);
    tok->has_iat = read_claim(j, "iat", &tok->iat);
    cJSON_Delete(j);
    if (tok->has_exp < 0 || tok->has_iat < 0) {
        *err = "the Token's exp or iat claim is not a valid time";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

static const char *string_member(apr_pool_t *p, const cJSON *o,
                                 const char *name, int *present)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    *present = v != NULL;
    if (!cJSON_IsString(v) || !v->valuestring)
        return NULL;
    return apr_pstrdup(p, v->valuestring);
}

apr_status_t cs_token_parse(apr_pool_t *p, const char *body, apr_size_t len,
                            apr_time_t now, cs_token_t *tok, const char **err)
{
    cJSON *j;
    int present;
    apr_status_t rv = APR_EINVAL;

    memset(tok, 0, sizeof(*tok));
    if (!body || !(j = parse_json(p, body, len))) {
        *err = "the reply is not a JSON object";
        return APR_EINVAL;
    }
    tok->token = string_member(p, j, "Token", &present);
    if (!tok->token || !*tok->token) {
        *err = present ? "the reply's Token is not a non-empty string"
                       : "the reply has no Token";
        goto out;
    }
    tok->identity_id = string_member(p, j, "IdentityId", &present);
    if (!tok->identity_id) {
        *err = present ? "the reply's IdentityId is not a string"
                       : "the reply has no IdentityId";
        goto out;
    }
    tok->session_id = string_member(p, j, "session_id", &present);
    if (present && !tok->session_id) {
        *err = "the reply's session_id is not a string";
        goto out;
    }
    if ((rv = parse_jwt(p, tok->token, tok, err)) != APR_SUCCESS)
        goto out;
    rv = APR_EINVAL;
    if (tok->has_exp && tok->has_iat && tok->exp <= tok->iat) {
        *err = "the Token expires before it was issued (exp <= iat)";
        goto out;
    }
    /* A token whose exp has passed on our clock is refused: either it is
     * stale, or this server's clock is ahead by more than a token's life;
     * both need a person (NTP). */
    if (tok->has_exp && tok->exp <= apr_time_sec(now)) {
        *err = apr_psprintf(p,
                            "the Token expired %" APR_INT64_T_FMT
                            " s before it arrived (check this server's "
                            "clock if this repeats)",
                            (apr_int64_t)apr_time_sec(now) - tok->exp);
        goto out;
    }
    rv = APR_SUCCESS;
out:
    cJSON_Delete(j);
    return rv;
}

apr_interval_time_t cs_token_lifetime(const cs_token_t *tok, apr_time_t now)
{
    apr_interval_time_t to_exp, issued;

    if (!tok->has_exp)
        return 0;
    /* exp - now: never served past exp by this clock, even for a token
     * issued long ago; exp - iat: never longer than the token was issued
     * for, even when this clock is behind the upstream's */
    to_exp = apr_time_from_sec(tok->exp) - now;
    if (tok->has_iat) {
        issued = apr_time_from_sec(tok->exp - tok->iat);
        if (issued < to_exp)
            to_exp = issued;
    }
    return to_exp > 0 ? to_exp : 0;
}
