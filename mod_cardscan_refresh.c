/*
 * Refresh ahead: a request that finds its user's token in the refresh
 * window is served at once and hands a refresh to one of this child's
 * refresh threads (lib's work queue), so that the user's token is renewed
 * before it leaves service and no client waits for it. The threads and the
 * users refreshed lately are private to this file.
 */
#include "mod_cardscan_private.h"

#include "ap_mpm.h"

#include "apr_thread_mutex.h"

#include <unistd.h>

/* refresh threads per process: threaded MPMs serve many users per process,
 * prefork one connection per process */
#define CS_REFRESH_THREADS 8
#define CS_REFRESH_THREADS_PREFORK 2
#define CS_REFRESH_QUEUE 256 /* refreshes waiting in a process, at most */
#define CS_REFRESH_SLOTS 64  /* users refreshed lately, per process */
/* a running refresh is waited for this long at most when the process
 * exits: its call is aborted within about a second; httpd reports a child
 * that is not gone 3 s after it was told to exit */
#define CS_REFRESH_STOP_WAIT apr_time_from_msec(2500)

/* A refresh job owns its pool: it outlives the request that started it. */
typedef struct {
    apr_pool_t *pool;
    server_rec *s;
    const cs_dir_conf *d;
    const char *user_id;
    apr_time_t seen; /* created time of the token the request found */
} cs_refresh_job;

/* Users this process started a refresh for lately. */
typedef struct {
    unsigned char id[CS_CACHE_KEY_LEN];
    apr_time_t until;
} cs_refresh_slot;

static struct {
    cs_queue_t *queue; /* NULL: no refresh threads */
    apr_thread_mutex_t *lock;
    cs_refresh_slot slots[CS_REFRESH_SLOTS];
    int failing;  /* the last refresh of this process failed */
    int stopping; /* atomic: the process is exiting (refresh_stop) */
} rf;

static int stopping(void)
{
    return __atomic_load_n(&rf.stopping, __ATOMIC_ACQUIRE);
}

/* At most one refresh per user per CS_REFRESH_RETRY from this process. */
static int refresh_claim(const cs_call *c, apr_time_t now)
{
    cs_refresh_slot *slot = &rf.slots[c->ref.bytes[3] % CS_REFRESH_SLOTS];
    int claimed = 0;

    apr_thread_mutex_lock(rf.lock);
    if (memcmp(slot->id, c->ref.bytes, CS_CACHE_KEY_LEN) != 0 ||
        now >= slot->until) {
        memcpy(slot->id, c->ref.bytes, CS_CACHE_KEY_LEN);
        slot->until = now + CS_REFRESH_RETRY;
        claimed = 1;
    }
    apr_thread_mutex_unlock(rf.lock);
    return claimed;
}

static void refresh_failed(cs_call *c, const cs_entry_t *e)
{
    /* the current token stays in service while it is fresh; no process
     * tries again for this user before the lock expires */
    int level = rf.failing ? APLOG_DEBUG : APLOG_WARNING;
    rf.failing = 1;
    cs_store_unlock(c, apr_time_now() + CS_REFRESH_RETRY);
    cs_metrics_refresh(cs_proc.metrics, CS_REFRESH_FAILED);
    cs_call_log(c, level, 0,
                APLOGNO(10532) "mod_cardscan: refreshing a token ahead of its "
                               "expiry failed%s; the current token stays in "
                               "service, retried in %" APR_TIME_T_FMT " s",
                e->kind ? "" : " (the breaker is open)",
                apr_time_sec(CS_REFRESH_RETRY));
}

static void refresh_one(void *data)
{
    cs_refresh_job *job = data;
    cs_call c;
    cs_entry_t e;
    int retry_after = 0;

    cs_call_init(&c, NULL, job->s, job->pool, job->d, job->user_id);
    if (stopping()) {
        /* the process is exiting: nothing more is done */
    }
    else if (cs_store_lock(&c) != CS_LOCK_HELD) {
        cs_metrics_refresh(cs_proc.metrics, CS_REFRESH_SKIPPED);
    }
    else if (cs_store_read(&c, CS_ID_TOKEN, &e) && e.created > job->seen) {
        /* another process or server refreshed it meanwhile */
        cs_store_unlock(&c, 0);
        cs_metrics_refresh(cs_proc.metrics, CS_REFRESH_SKIPPED);
    }
    else {
        memset(&e, 0, sizeof(e));
        if (!cs_call_breaker_refuses(&c, &retry_after))
            cs_call_fetch(&c, &e);
        if (stopping()) {
            /* abandoned (the call was aborted): the lock expires, or is
             * taken over once this process is gone */
        }
        else if (e.kind == CS_ENTRY_TOKEN && e.expires) {
            cs_store_write(&c, CS_ID_TOKEN, &e, e.expires);
            cs_store_unlock(&c, 0);
            cs_metrics_refresh(cs_proc.metrics, CS_REFRESH_OK);
            rf.failing = 0;
        }
        else
            refresh_failed(&c, &e);
    }
    apr_pool_destroy(job->pool);
}

static void refresh_drop(void *data)
{
    apr_pool_destroy(((cs_refresh_job *)data)->pool);
}

/* A pre-cleanup of the child pool, run before the queue's own: a child
 * told to exit exits at once, whatever refresh it has in flight. Under
 * prefork it runs in the handler of SIGTERM or SIGHUP, on the thread that
 * may have been interrupted in cs_queue_push or anywhere else: nothing here
 * takes a lock. A running refresh is aborted (its call ends within about a
 * second) and waited for CS_REFRESH_STOP_WAIT at most; the parent would
 * report the child as not exiting after 3 s. A refresh still running then
 * is stuck on something the exit itself releases (a cache mutex held by
 * the interrupted thread, say): the process ends here, before the pool it
 * uses is destroyed under it. */
static apr_status_t refresh_stop(void *data)
{
    (void)data;
    __atomic_store_n(&rf.stopping, 1, __ATOMIC_RELEASE);
    if (cs_proc.upstream)
        cs_upstream_abort(cs_proc.upstream);
    if (rf.queue && cs_queue_stop(rf.queue, CS_REFRESH_STOP_WAIT) != 0)
        _exit(0);
    rf.queue = NULL;
    return APR_SUCCESS;
}

void cs_refresh_child_init(apr_pool_t *p, server_rec *s)
{
    int threaded = 0;
    apr_status_t rv;

    memset(&rf, 0, sizeof(rf));
    ap_mpm_query(AP_MPMQ_IS_THREADED, &threaded);
    rv = apr_thread_mutex_create(&rf.lock, APR_THREAD_MUTEX_DEFAULT, p);
    /* the queue's threads are stopped in a pre-cleanup of p: before the
     * HTTP client made earlier in p is cleaned up */
    if (rv == APR_SUCCESS)
        rv = cs_queue_start(
            p,
            threaded == AP_MPMQ_NOT_SUPPORTED ? CS_REFRESH_THREADS_PREFORK
                                              : CS_REFRESH_THREADS,
            CS_REFRESH_QUEUE, refresh_one, refresh_drop, &rf.queue);
    if (rv == APR_SUCCESS)
        apr_pool_pre_cleanup_register(p, NULL, refresh_stop);
    else
        ap_log_error(APLOG_MARK, APLOG_ERR, rv, s,
                     APLOGNO(10534) "mod_cardscan: cannot start the refresh "
                                    "threads: tokens are not refreshed ahead "
                                    "of expiry");
}

int cs_refresh_later(const cs_call *c, const cs_entry_t *tok)
{
    cs_refresh_job *job;
    apr_pool_t *pool;

    if (!rf.queue || !refresh_claim(c, apr_time_now()))
        return 0;
    if (apr_pool_create_unmanaged_ex(&pool, NULL, NULL) != APR_SUCCESS)
        return 0;
    job = apr_pcalloc(pool, sizeof(*job));
    job->pool = pool;
    job->s = c->s;
    /* a request's merged configuration may live in its pool: copy it (what
     * it points to lives in the configuration pool) */
    job->d = apr_pmemdup(pool, c->d, sizeof(*c->d));
    job->user_id = apr_pstrdup(pool, c->user_id);
    job->seen = tok->created;
    if (!cs_queue_push(rf.queue, job)) {
        apr_pool_destroy(pool);
        return 0;
    }
    return 1;
}
