/* CORS origins: the exact scheme://host[:port] a browser sends in Origin. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <stdlib.h>
#include <string.h>

static char *lower_dup(apr_pool_t *p, const char *s, apr_size_t len)
{
    char *out = apr_pstrmemdup(p, s, len);
    for (char *c = out; *c; c++)
        *c = (char)apr_tolower(*c);
    return out;
}

apr_status_t cs_origin_check(apr_pool_t *p, const char *origin,
                             const char **norm, const char **err)
{
    const char *host, *end, *port = NULL;
    char *scheme;
    apr_size_t slen;
    long n = 0;

    host = strstr(origin, "://");
    if (!host) {
        *err = apr_psprintf(p, "'%s' is not scheme://host[:port]", origin);
        return APR_EINVAL;
    }
    slen = (apr_size_t)(host - origin);
    scheme = lower_dup(p, origin, slen);
    if (strcmp(scheme, "https") != 0 && strcmp(scheme, "http") != 0) {
        *err =
            apr_psprintf(p, "'%s': the scheme must be https or http", origin);
        return APR_EINVAL;
    }
    host += 3;
    if (*host == '[') { /* an IPv6 literal */
        end = strchr(host, ']');
        if (!end || end == host + 1)
            goto bad_host;
        for (const char *c = host + 1; c < end; c++)
            if (!apr_isxdigit(*c) && *c != ':' && *c != '.')
                goto bad_host;
        end++;
    }
    else {
        for (end = host; apr_isalnum(*end) || *end == '-' || *end == '.'; end++)
            ;
        if (end == host)
            goto bad_host;
    }
    if (*end == ':') {
        char *stop;
        port = end + 1;
        n = strtol(port, &stop, 10);
        if (!apr_isdigit(*port) || *stop || n < 1 || n > 65535) {
            *err = apr_psprintf(p,
                                "'%s': the port must be 1 to 65535, and "
                                "nothing may follow it (no path, no "
                                "trailing slash)",
                                origin);
            return APR_EINVAL;
        }
    }
    else if (*end) {
        *err = apr_psprintf(p,
                            "'%s': an origin has no path, query or "
                            "trailing slash",
                            origin);
        return APR_EINVAL;
    }
    {
        char *h = lower_dup(p, host, (apr_size_t)(end - host));
        /* browsers leave the scheme's default port out of Origin */
        if (port &&
            ((n == 443 && scheme[4] == 's') || (n == 80 && scheme[4] == '\0')))
            port = NULL;
        *norm = port ? apr_psprintf(p, "%s://%s:%ld", scheme, h, n)
                     : apr_pstrcat(p, scheme, "://", h, NULL);
    }
    return APR_SUCCESS;

bad_host:
    *err = apr_psprintf(p,
                        "'%s': no valid host name (wildcards are not "
                        "allowed: list each origin)",
                        origin);
    return APR_EINVAL;
}

int cs_origin_listed(const apr_array_header_t *origins, const char *origin)
{
    if (!origins || !origin || !*origin)
        return 0;
    for (int i = 0; i < origins->nelts; i++)
        if (strcmp(APR_ARRAY_IDX(origins, i, const char *), origin) == 0)
            return 1;
    return 0;
}
