/* The serving decision: what one user's cached entries mean at a given
 * time. Pure functions of the entries, the clock and the policy, so that
 * every boundary (the refresh window, the CardScanCacheMinTTL edge, exp,
 * failure entries) is unit-tested on a fake clock; mod_cardscan.c only
 * carries the decision out. */
#include "cardscan.h"

#include <string.h>

/* The end of a token's serving time: CardScanCacheMinTTL before it
 * expires, that margin capped at half the token's lifetime (as in
 * cs_entry_fresh). */
static apr_time_t serve_until(const cs_entry_t *tok,
                              apr_interval_time_t min_ttl)
{
    if (min_ttl > tok->lifetime / 2)
        min_ttl = tok->lifetime / 2;
    return tok->expires - min_ttl;
}

apr_time_t cs_serve_refresh_at(const cs_entry_t *tok, const cs_policy_t *pol)
{
    apr_time_t until;

    if (!tok || tok->kind != CS_ENTRY_TOKEN || pol->refresh_pct <= 0 ||
        !tok->expires)
        return 0;
    until = serve_until(tok, pol->min_ttl);
    if (until <= tok->created)
        return 0;
    /* divided first: an absurd exp (year 9999) times a percentage would
     * overflow 64 bits; the error is under pct microseconds */
    return until - (until - tok->created) / 100 * pol->refresh_pct;
}

static int failure_active(const cs_entry_t *fail, apr_time_t now)
{
    return fail && fail->kind == CS_ENTRY_FAILURE && now < fail->expires;
}

cs_action_e cs_serve_decide(const cs_entry_t *tok, const cs_entry_t *fail,
                            apr_time_t now, const cs_policy_t *pol)
{
    if (tok && cs_entry_fresh(tok, now, pol->min_ttl)) {
        apr_time_t at = cs_serve_refresh_at(tok, pol);
        return at && now >= at ? CS_DO_SERVE_REFRESH : CS_DO_SERVE;
    }
    if (failure_active(fail, now))
        return CS_DO_FAIL;
    return CS_DO_CALL;
}

int cs_serve_retry_after(const cs_entry_t *fail, apr_time_t now)
{
    apr_interval_time_t left = fail->expires - now;
    int secs;

    if (left <= 0)
        return 1;
    secs = (int)((left + APR_USEC_PER_SEC - 1) / APR_USEC_PER_SEC);
    return secs < 1 ? 1 : secs;
}

void cs_store_id(const unsigned char key[CS_CACHE_KEY_LEN], cs_id_kind_e kind,
                 unsigned char out[CS_STORE_ID_LEN])
{
    memcpy(out, key, CS_CACHE_KEY_LEN);
    out[CS_CACHE_KEY_LEN] = (unsigned char)kind;
}

/* The digits of value[*at..len) up to the next '/' (or the end with
 * `last`), as a number no larger than max; -1 when there are none, another
 * character comes first, or the number is larger. */
static apr_int64_t lock_field(const char *value, apr_size_t len, apr_size_t *at,
                              int last, apr_int64_t max)
{
    apr_int64_t n = 0;
    apr_size_t start = *at;

    for (; *at < len && value[*at] != '/'; (*at)++) {
        if (value[*at] < '0' || value[*at] > '9')
            return -1;
        if (n > (max - (value[*at] - '0')) / 10)
            return -1;
        n = n * 10 + (value[*at] - '0');
    }
    if (*at == start || (last ? *at != len : *at == len))
        return -1;
    if (!last)
        (*at)++;
    return n;
}

apr_status_t cs_lock_holder_parse(const char *value, apr_size_t len, char *host,
                                  apr_size_t hostsize, long *pid)
{
    const char *slash = value ? memchr(value, '/', len) : NULL;
    apr_size_t hostlen = slash ? (apr_size_t)(slash - value) : 0, at;
    apr_int64_t p;

    if (!hostlen || hostlen >= hostsize || memchr(value, '\0', hostlen))
        return APR_EINVAL;
    at = hostlen + 1;
    if ((p = lock_field(value, len, &at, 0, APR_INT32_MAX)) < 1 ||
        lock_field(value, len, &at, 0, APR_UINT32_MAX) < 0 ||
        lock_field(value, len, &at, 1, APR_INT64_MAX) < 0)
        return APR_EINVAL;
    memcpy(host, value, hostlen);
    host[hostlen] = '\0';
    *pid = (long)p;
    return APR_SUCCESS;
}
