/* The value checks of mod_cardscan's directives: each turns a directive's
 * arguments into a value or a message for the administrator, so that every
 * rule is unit-tested without httpd. The shell's setters only store what
 * these return. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_uri.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

apr_status_t cs_conf_seconds(apr_pool_t *p, const char *name, const char *arg,
                             double max, apr_interval_time_t *out,
                             const char **err)
{
    char *end;
    double v = strtod(arg, &end);

    if (end == arg || *end || !(v > 0) || v > max) {
        *err = apr_psprintf(p, "%s: '%s' is not a number of seconds in (0, %g]",
                            name, arg, max);
        return APR_EINVAL;
    }
    *out = (apr_interval_time_t)(v * APR_USEC_PER_SEC);
    return APR_SUCCESS;
}

apr_status_t cs_conf_timeout(apr_pool_t *p, const char *total,
                             const char *connect, apr_interval_time_t *timeout,
                             apr_interval_time_t *connect_timeout,
                             const char **err)
{
    const char *name = "CardScanTimeout";

    if (cs_conf_seconds(p, name, total, 300, timeout, err) != APR_SUCCESS)
        return APR_EINVAL;
    *connect_timeout = *timeout < CS_CONNECT_TIMEOUT_DEFAULT
                           ? *timeout
                           : CS_CONNECT_TIMEOUT_DEFAULT;
    if (connect && cs_conf_seconds(p, name, connect, 300, connect_timeout,
                                   err) != APR_SUCCESS)
        return APR_EINVAL;
    if (*connect_timeout > *timeout) {
        *err = "CardScanTimeout: the connect timeout cannot exceed the total";
        return APR_EINVAL;
    }
    /* libcurl counts milliseconds, and takes 0 as no timeout at all */
    if (*timeout < apr_time_from_msec(1) ||
        *connect_timeout < apr_time_from_msec(1)) {
        *err = "CardScanTimeout: under 1 ms is not a timeout libcurl can keep "
               "(it would mean none at all)";
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

apr_status_t cs_conf_min_ttl(apr_pool_t *p, const char *arg,
                             apr_interval_time_t *out, const char **err)
{
    char *end;
    apr_int64_t v = apr_strtoi64(arg, &end, 10);

    if (end == arg || *end || v < 0 || v > 86400) {
        *err = apr_psprintf(p,
                            "CardScanCacheMinTTL: '%s' is not a number of "
                            "seconds between 0 and 86400",
                            arg);
        return APR_EINVAL;
    }
    *out = apr_time_from_sec(v);
    return APR_SUCCESS;
}

apr_status_t cs_conf_refresh(apr_pool_t *p, const char *arg, int *pct,
                             const char **err)
{
    char *end;
    apr_int64_t v;

    if (strcasecmp(arg, "on") == 0)
        v = CS_REFRESH_PCT_DEFAULT;
    else if (strcasecmp(arg, "off") == 0)
        v = 0;
    else {
        v = apr_strtoi64(arg, &end, 10);
        if (end == arg || (*end && strcmp(end, "%") != 0) || v < 1 || v > 50) {
            *err = apr_psprintf(p,
                                "CardScanRefreshAhead: '%s' is not on, off "
                                "or a percentage of the serving time from "
                                "1%% to 50%%",
                                arg);
            return APR_EINVAL;
        }
    }
    *pct = (int)v;
    return APR_SUCCESS;
}

apr_status_t cs_conf_breaker(apr_pool_t *p, const char *failures,
                             const char *period, apr_uint32_t *n,
                             apr_interval_time_t *out_period, const char **err)
{
    char *end;
    apr_int64_t v = apr_strtoi64(failures, &end, 10);

    if (end == failures || *end || v < 0 || v > 100000) {
        *err = "CardScanCircuitBreaker: failures must be a number (0 turns "
               "the breaker off)";
        return APR_EINVAL;
    }
    *n = (apr_uint32_t)v;
    if (period)
        return cs_conf_seconds(p, "CardScanCircuitBreaker", period, 3600,
                               out_period, err);
    return APR_SUCCESS;
}

/* headers the module would strip from every request or response */
static const char *const reserved_headers[] = {"Authorization",
                                               "Cookie",
                                               "Set-Cookie",
                                               "Host",
                                               "Content-Type",
                                               "Location",
                                               "Content-Length",
                                               "Transfer-Encoding",
                                               "Connection",
                                               "Origin",
                                               NULL};

apr_status_t cs_conf_backend_header(apr_pool_t *p, const char *arg,
                                    const char **err)
{
    if (!*arg) {
        *err = "CardScanBackendUser: give a header name";
        return APR_EINVAL;
    }
    for (const char *c = arg; *c; c++)
        if (!apr_isalnum(*c) && !strchr("!#$%&'*+-.^_`|~", *c)) {
            *err = apr_psprintf(p,
                                "CardScanBackendUser: '%s' is not a header "
                                "name",
                                arg);
            return APR_EINVAL;
        }
    for (int i = 0; reserved_headers[i]; i++)
        if (strcasecmp(arg, reserved_headers[i]) == 0) {
            *err = apr_psprintf(p,
                                "CardScanBackendUser: %s is a standard "
                                "header: use a header of its own, such as "
                                "X-CardScan-User",
                                arg);
            return APR_EINVAL;
        }
    return APR_SUCCESS;
}

int cs_header_same(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a == '_' ? '-' : (char)apr_tolower(*a);
        char y = *b == '_' ? '-' : (char)apr_tolower(*b);
        if (x != y)
            return 0;
    }
    return *a == *b;
}

apr_status_t cs_conf_proxy(apr_pool_t *p, const char *url, const char *auth,
                           const char **proxy, const char **proxy_auth,
                           const char **warning, const char **err)
{
    const char *rest = strstr(url, "://");
    apr_uri_t uri;
    char *secret = NULL;

    *warning = NULL;
    *proxy_auth = NULL;
    if (strcasecmp(url, "none") == 0) {
        *proxy = NULL;
    }
    else if (!rest || (strncasecmp(url, "http://", 7) &&
                       strncasecmp(url, "https://", 8) &&
                       strncasecmp(url, "socks5h://", 10))) {
        *err = "CardScanProxy: give the proxy as http://host:port, "
               "https://host:port or socks5h://host:port";
        return APR_EINVAL;
    }
    else if (strchr(rest + 3, '@')) {
        *err = "CardScanProxy: put the proxy's credentials in a file "
               "(CardScanProxy URL file:/path), not in the URL";
        return APR_EINVAL;
    }
    else if (apr_uri_parse(p, url, &uri) != APR_SUCCESS || !uri.hostname ||
             !*uri.hostname) {
        *err = apr_psprintf(p,
                            "CardScanProxy: '%s' names no proxy host: give "
                            "it as http://host:port",
                            url);
        return APR_EINVAL;
    }
    else {
        *proxy = apr_pstrdup(p, url);
    }
    if (!auth)
        return APR_SUCCESS;
    if (strncmp(auth, "file:", 5) != 0) {
        *err = "CardScanProxy: the credentials must be given as file:/path "
               "(a file holding user:password)";
        return APR_EINVAL;
    }
    if (cs_secret_load(p, auth, "proxy credentials", &secret, warning, err) !=
        APR_SUCCESS) {
        *err = apr_pstrcat(p, "CardScanProxy: ", *err, NULL);
        return APR_EINVAL;
    }
    if (!strchr(secret, ':')) {
        OPENSSL_cleanse(secret, strlen(secret));
        *err = "CardScanProxy: the credentials file must hold user:password";
        return APR_EINVAL;
    }
    *proxy_auth = secret;
    return APR_SUCCESS;
}

apr_status_t cs_conf_cache_secret(apr_pool_t *p, const char *spec,
                                  unsigned char seal_key[CS_SECRET_LEN],
                                  const char **warning, const char **err)
{
    char *secret = NULL;
    apr_size_t n;
    cs_key_t tmp;

    *warning = NULL;
    if (strncmp(spec, "file:", 5) != 0) {
        *err = "CardScanCacheSecret: give the secret as file:/path, so that "
               "it stays out of the configuration";
        return APR_EINVAL;
    }
    if (cs_secret_load(p, spec, "cache secret", &secret, warning, err) !=
        APR_SUCCESS) {
        *err = apr_pstrcat(p, "CardScanCacheSecret: ", *err, NULL);
        return APR_EINVAL;
    }
    n = strlen(secret);
    if (n < 16) {
        OPENSSL_cleanse(secret, n);
        *err = "CardScanCacheSecret: the secret must be at least 16 bytes "
               "(e.g. openssl rand -hex 32 > file)";
        return APR_EINVAL;
    }
    cs_key_set_seal_secret(&tmp, secret, n);
    memcpy(seal_key, tmp.seal_key, CS_SECRET_LEN);
    OPENSSL_cleanse(secret, n);
    OPENSSL_cleanse(&tmp, sizeof(tmp));
    return APR_SUCCESS;
}
