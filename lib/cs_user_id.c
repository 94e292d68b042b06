/* The end user's id: what is accepted, and how it travels in the query. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <string.h>

apr_status_t cs_user_id_check(apr_pool_t *p, const char *id, const char **err)
{
    apr_size_t len = id ? strlen(id) : 0;

    if (len == 0) {
        *err = "the user id is empty: no authenticated user, or "
               "CardScanUserID evaluates to an empty string";
        return APR_EINVAL;
    }
    if (len > CS_USER_ID_MAX) {
        *err = apr_psprintf(p,
                            "the user id is %" APR_SIZE_T_FMT
                            " bytes long, over the limit of %d",
                            len, CS_USER_ID_MAX);
        return APR_EINVAL;
    }
    for (const unsigned char *c = (const unsigned char *)id; *c; c++) {
        if (*c < 0x20 || *c == 0x7f) {
            *err = apr_psprintf(p,
                                "the user id contains a control character "
                                "(0x%02x) at byte %d",
                                *c, (int)((const char *)c - id));
            return APR_EINVAL;
        }
    }
    return APR_SUCCESS;
}

apr_status_t cs_user_id_check_named(apr_pool_t *p, const char *id,
                                    const char **err)
{
    apr_size_t len;

    if (cs_user_id_check(p, id, err) != APR_SUCCESS)
        return APR_EINVAL;
    len = strlen(id);
    /* httpd merges two headers of a CGI-style backend into "a, b" */
    if (strchr(id, ',')) {
        *err = "the application named more than one user (a comma in the "
               "user header)";
        return APR_EINVAL;
    }
    if (id[0] == ' ' || id[len - 1] == ' ') {
        *err = "the user id named by the application starts or ends with a "
               "space";
        return APR_EINVAL;
    }
    for (const unsigned char *c = (const unsigned char *)id; *c; c++)
        if (*c > 0x7e) {
            *err = apr_psprintf(p,
                                "the user id named by the application is not "
                                "printable ASCII (0x%02x at byte %d)",
                                *c, (int)((const char *)c - id));
            return APR_EINVAL;
        }
    return APR_SUCCESS;
}

const char *cs_user_id_encode(apr_pool_t *p, const char *id)
{
    static const char hex[] = "0123456789ABCDEF";
    apr_size_t len = strlen(id);
    char *out = apr_palloc(p, len * 3 + 1), *o = out;

    for (const unsigned char *c = (const unsigned char *)id; *c; c++) {
        if (apr_isalnum(*c) || *c == '-' || *c == '.' || *c == '_' ||
            *c == '~') {
            *o++ = (char)*c;
        }
        else {
            *o++ = '%';
            *o++ = hex[*c >> 4];
            *o++ = hex[*c & 15];
        }
    }
    *o = '\0';
    return out;
}
