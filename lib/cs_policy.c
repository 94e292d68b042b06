/* The policy of one call to the API, as pure functions: what a reply means
 * for the client (classification and the user's negative cache), whether
 * to try once more, and the back-off of a failing token store. The shell
 * carries them out and logs; every rule here is unit-tested on a fake
 * clock. */
#include "cardscan.h"

#include <apr_strings.h>
#include <string.h>

void cs_classify(apr_pool_t *p, const cs_upstream_resp_t *resp, apr_time_t now,
                 cs_verdict_t *v)
{
    memset(v, 0, sizeof(*v));
    v->status = 502;
    v->code = "upstream_error";
    if (resp->result == CS_UP_OK && resp->status == 200) {
        if (cs_token_parse(p, resp->body, resp->body_len, now, &v->token,
                           &v->detail) == APR_SUCCESS) {
            v->kind = CS_VERDICT_TOKEN;
            v->status = 200;
            v->code = NULL;
            return;
        }
        v->kind = CS_VERDICT_INVALID;
        v->message = "the CardScan API sent an invalid token reply";
    }
    else if (resp->result == CS_UP_OK &&
             (resp->status == 401 || resp->status == 403)) {
        v->kind = CS_VERDICT_KEY_REJECTED;
        v->code = "upstream_auth_failed";
        v->message = "the CardScan API rejected this server's API key";
    }
    else if (resp->result == CS_UP_OK && resp->status == 429) {
        int ra = cs_retry_after(resp->retry_after, now);
        v->kind = CS_VERDICT_RATE_LIMITED;
        v->status = 503;
        v->code = "upstream_rate_limited";
        v->message = "the CardScan API is rate limiting this server; retry "
                     "later";
        v->retry_after = ra ? ra : 5;
    }
    else if (resp->result == CS_UP_OK) {
        v->kind = CS_VERDICT_HTTP_ERROR;
        v->message =
            apr_psprintf(p, "the CardScan API answered HTTP %d", resp->status);
    }
    else if (resp->result == CS_UP_TIMEOUT) {
        v->kind = CS_VERDICT_TIMEOUT;
        v->status = 504;
        v->code = "upstream_timeout";
        v->message = "the CardScan API did not answer in time";
    }
    else {
        v->kind = CS_VERDICT_UNREACHABLE;
        v->message = resp->result == CS_UP_TOO_BIG
                         ? "the CardScan API sent an oversized reply"
                         : "the CardScan API could not be reached";
    }
}

void cs_entry_failure(apr_pool_t *p, const cs_verdict_t *v, apr_time_t now,
                      cs_entry_t *e)
{
    apr_interval_time_t ttl = apr_time_from_sec(v->retry_after);

    memset(e, 0, sizeof(*e));
    e->kind = CS_ENTRY_FAILURE;
    e->created = now;
    e->status = v->status;
    e->retry_after = v->retry_after;
    e->expires = now + (ttl > CS_NEGATIVE_TTL ? ttl : CS_NEGATIVE_TTL);
    e->body = cs_reply_error(p, v->code, v->message);
    e->body_len = strlen(e->body);
}

int cs_call_retry(const cs_upstream_resp_t *resp, int attempt,
                  apr_interval_time_t left, int breaker_open)
{
    return attempt == 0 && cs_upstream_retryable(resp) &&
           left >= CS_RETRY_MIN_LEFT && !breaker_open;
}

apr_interval_time_t cs_backoff_failed(cs_backoff_t *b, apr_time_t now)
{
    apr_int64_t pause = __atomic_load_n(&b->pause, __ATOMIC_RELAXED);

    /* the operations that met a stalled store together fail together:
     * once paused, their failures do not lengthen the pause */
    if (now >= __atomic_load_n(&b->until, __ATOMIC_ACQUIRE)) {
        pause = pause ? 2 * pause : CS_BACKOFF_MIN;
        if (pause > CS_BACKOFF_MAX)
            pause = CS_BACKOFF_MAX;
        __atomic_store_n(&b->pause, pause, __ATOMIC_RELAXED);
        __atomic_store_n(&b->until, now + pause, __ATOMIC_RELEASE);
    }
    return pause;
}

void cs_backoff_ok(cs_backoff_t *b)
{
    if (__atomic_load_n(&b->pause, __ATOMIC_RELAXED))
        __atomic_store_n(&b->pause, 0, __ATOMIC_RELAXED);
}

int cs_backoff_usable(const cs_backoff_t *b, apr_time_t now)
{
    return now >= __atomic_load_n(&b->until, __ATOMIC_ACQUIRE);
}
