/* What the client gets: the token reply CardScan's SDKs read, and errors. */
#include "cardscan.h"

#include <apr_strings.h>
#include <cjson/cJSON.h>

static char *print_to_pool(apr_pool_t *p, cJSON *obj)
{
    char *s = cJSON_PrintUnformatted(obj), *out;
    cJSON_Delete(obj);
    if (!s)
        return NULL;
    out = apr_pstrdup(p, s);
    cJSON_free(s);
    return out;
}

const char *cs_rfc3339(apr_pool_t *p, apr_time_t t)
{
    apr_time_exp_t x;
    apr_time_exp_gmt(&x, t);
    return apr_psprintf(p, "%04d-%02d-%02dT%02d:%02d:%02dZ", x.tm_year + 1900,
                        x.tm_mon + 1, x.tm_mday, x.tm_hour, x.tm_min, x.tm_sec);
}

char *cs_reply_token(apr_pool_t *p, const cs_token_t *tok, apr_time_t expires,
                     cs_key_mode_e mode)
{
    cJSON *o = cJSON_CreateObject();

    /* Every value is a string: the Swift example decodes [String: String].
     * "session" repeats the token for the Swift and Kotlin examples. */
    cJSON_AddStringToObject(o, "Token", tok->token);
    cJSON_AddStringToObject(o, "IdentityId", tok->identity_id);
    if (tok->session_id)
        cJSON_AddStringToObject(o, "session_id", tok->session_id);
    cJSON_AddStringToObject(o, "session", tok->token);
    if (expires)
        cJSON_AddStringToObject(o, "expires_at", cs_rfc3339(p, expires));
    /* a string too: the React and Swift SDKs take it as their live flag */
    cJSON_AddStringToObject(o, "live", mode == CS_KEY_LIVE ? "true" : "false");
    return print_to_pool(p, o);
}

char *cs_reply_error(apr_pool_t *p, const char *code, const char *message)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", code);
    cJSON_AddStringToObject(o, "message", message);
    return print_to_pool(p, o);
}

char *cs_reply_identity_mismatch(apr_pool_t *p)
{
    return cs_reply_error(
        p, CS_ERR_IDENTITY_MISMATCH,
        "the CardScan API issued this user a token of another identity than "
        "before; it was refused: ask the site's administrators");
}
