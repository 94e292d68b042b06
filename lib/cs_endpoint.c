/* The upstream base URL: defaults from the key, and the checks that keep a
 * key on https and on the environment it belongs to. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_uri.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#define SANDBOX_HOST "sandbox.cardscan.ai"
#define LIVE_HOST "api.cardscan.ai"

const char *cs_endpoint_default(const cs_key_t *key)
{
    return key->mode == CS_KEY_LIVE ? CS_LIVE_URL : CS_SANDBOX_URL;
}

/* Loopback by address, parsed (never by prefix: 127.0.0.256 or 127.1.2.3.4
 * would go to DNS), or by the one name that means it. */
static int host_is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    char buf[INET6_ADDRSTRLEN + 1];
    apr_size_t n;

    if (!host)
        return 0;
    if (strcasecmp(host, "localhost") == 0)
        return 1;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']' && n - 2 < sizeof(buf)) {
        memcpy(buf, host + 1, n - 2);
        buf[n - 2] = '\0';
        host = buf;
    }
    return inet_pton(AF_INET6, host, &a6) == 1 &&
           memcmp(&a6, &in6addr_loopback, sizeof(a6)) == 0;
}

apr_status_t cs_endpoint_check(apr_pool_t *p, const char *url,
                               const char **norm, const char **err)
{
    apr_uri_t uri;
    char *copy;
    apr_size_t n;

    if (apr_uri_parse(p, url, &uri) != APR_SUCCESS || !uri.scheme ||
        !uri.hostname || !*uri.hostname) {
        *err = apr_psprintf(p, "'%s' is not an absolute URL", url);
        return APR_EINVAL;
    }
    if (uri.query || uri.fragment || uri.user || uri.password) {
        *err = apr_psprintf(p,
                            "the endpoint URL must not carry a query, a "
                            "fragment or credentials: give the base such "
                            "as %s",
                            CS_SANDBOX_URL);
        return APR_EINVAL;
    }
    if (strcasecmp(uri.scheme, "https") != 0) {
        if (strcasecmp(uri.scheme, "http") != 0) {
            *err = apr_psprintf(p, "the endpoint scheme '%s' is not https",
                                uri.scheme);
            return APR_EINVAL;
        }
        if (!host_is_loopback(uri.hostname)) {
            *err = apr_psprintf(p,
                                "http:// is allowed only to a loopback host "
                                "(127.0.0.1, ::1, localhost); '%s' would send "
                                "the API key in the clear: use https://",
                                uri.hostname);
            return APR_EINVAL;
        }
    }
    copy = apr_pstrdup(p, url);
    n = strlen(copy);
    while (n > 0 && copy[n - 1] == '/')
        copy[--n] = '\0';
    *norm = copy;
    return APR_SUCCESS;
}

apr_status_t cs_endpoint_check_key(apr_pool_t *p, const char *url,
                                   const cs_key_t *key, const char **err)
{
    apr_uri_t uri;

    if (apr_uri_parse(p, url, &uri) != APR_SUCCESS || !uri.hostname)
        return APR_SUCCESS; /* cs_endpoint_check reports bad URLs */
    if (key->mode == CS_KEY_LIVE &&
        strcasecmp(uri.hostname, SANDBOX_HOST) == 0) {
        *err = apr_psprintf(p,
                            "the live key %s is configured against the "
                            "sandbox (%s): use a sk_test_ key there, or "
                            "CardScanEndpoint %s",
                            key->masked, url, CS_LIVE_URL);
        return APR_EINVAL;
    }
    if (key->mode == CS_KEY_TEST && strcasecmp(uri.hostname, LIVE_HOST) == 0) {
        *err = apr_psprintf(p,
                            "the test key %s is configured against the live "
                            "API (%s): use a sk_live_ key there, or "
                            "CardScanEndpoint %s",
                            key->masked, url, CS_SANDBOX_URL);
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}
