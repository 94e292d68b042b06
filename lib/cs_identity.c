/* Identity pinning: the verdict on a new token's IdentityId against the
 * user's pin, the pin's cache entry and the directives' value checks. Pure
 * functions of the pin, the token and the clock, so that every branch is
 * unit-tested on a fake clock; the shell reads and stores the pin and
 * carries the verdict out. */
#include "cardscan.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <string.h>

cs_pin_verdict_e cs_pin_decide(const cs_pin_t *pin, const char *identity_id,
                               cs_pin_mode_e mode, apr_time_t now)
{
    if (mode == CS_PIN_OFF || !pin || !pin->identity_id || now >= pin->expires)
        return CS_PIN_ACCEPT;
    if (strcmp(pin->identity_id, identity_id ? identity_id : "") == 0)
        return CS_PIN_ACCEPT;
    return mode == CS_PIN_ENFORCE ? CS_PIN_REFUSE : CS_PIN_CHANGED;
}

void cs_pin_make(cs_pin_t *pin, const char *identity_id, apr_time_t now,
                 apr_interval_time_t ttl)
{
    pin->identity_id = identity_id ? identity_id : "";
    pin->pinned = now;
    pin->expires = now + ttl;
}

void cs_pin_to_entry(const cs_pin_t *pin, cs_entry_t *e)
{
    memset(e, 0, sizeof(*e));
    e->kind = CS_ENTRY_PIN;
    e->created = pin->pinned;
    e->expires = pin->expires;
    e->lifetime = pin->expires - pin->pinned;
    e->body = pin->identity_id;
    e->body_len = strlen(pin->identity_id);
}

apr_status_t cs_pin_from_entry(const cs_entry_t *e, cs_pin_t *pin,
                               const char **err)
{
    if (e->kind != CS_ENTRY_PIN || !e->body || strlen(e->body) != e->body_len) {
        *err = "the cache entry is not an identity pin";
        return APR_EINVAL;
    }
    pin->identity_id = e->body;
    pin->pinned = e->created;
    pin->expires = e->expires;
    return APR_SUCCESS;
}

apr_status_t cs_pin_mode_parse(apr_pool_t *p, const char *arg,
                               cs_pin_mode_e *mode, const char **err)
{
    if (!strcasecmp(arg, "alarm"))
        *mode = CS_PIN_ALARM;
    else if (!strcasecmp(arg, "enforce"))
        *mode = CS_PIN_ENFORCE;
    else if (!strcasecmp(arg, "off"))
        *mode = CS_PIN_OFF;
    else {
        *err = apr_psprintf(p, "'%s' is not alarm, enforce or off", arg);
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

apr_status_t cs_pin_ttl_parse(apr_pool_t *p, const char *arg,
                              apr_interval_time_t *ttl, const char **err)
{
    apr_int64_t secs = 0;
    const char *c = arg;

    for (; *c && apr_isdigit(*c) && secs <= CS_PIN_TTL_MAX; c++)
        secs = secs * 10 + (*c - '0');
    if (c == arg || *c || secs < CS_PIN_TTL_MIN || secs > CS_PIN_TTL_MAX) {
        *err = apr_psprintf(p,
                            "'%s' is not a whole number of seconds from %d "
                            "(a minute) to %d (30 days)",
                            arg, CS_PIN_TTL_MIN, CS_PIN_TTL_MAX);
        return APR_EINVAL;
    }
    *ttl = apr_time_from_sec(secs);
    return APR_SUCCESS;
}
