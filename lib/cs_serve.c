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
