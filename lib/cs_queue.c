/* A work queue served by a fixed number of threads: the refresh-ahead jobs
 * of one child process. A bounded ring under one mutex and one condition;
 * stopping wakes every thread, joins them, and hands the jobs still queued
 * to `drop`. The threads are plain POSIX threads, started with every signal
 * blocked (signals are the MPM's business): an APR thread would own a pool
 * under the caller's pool and destroy it as it exits, which under prefork
 * (whose child pool has no allocator mutex) corrupted that allocator. */
#include "cardscan.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

struct cs_queue {
    pthread_mutex_t lock;
    pthread_cond_t more;
    cs_queue_fn run, drop;
    pthread_t *threads;
    int nthreads, stopping;
    void **ring;
    unsigned int capacity, head, count;
};

static void *queue_thread(void *data)
{
    cs_queue_t *q = data;

    for (;;) {
        void *job;
        pthread_mutex_lock(&q->lock);
        while (!q->count && !q->stopping)
            pthread_cond_wait(&q->more, &q->lock);
        if (q->stopping) {
            pthread_mutex_unlock(&q->lock);
            return NULL;
        }
        job = q->ring[q->head];
        q->head = (q->head + 1) % q->capacity;
        q->count--;
        pthread_mutex_unlock(&q->lock);
        q->run(job);
    }
}

static apr_status_t queue_cleanup(void *data)
{
    cs_queue_t *q = data;
    cs_queue_stop(q);
    pthread_cond_destroy(&q->more);
    pthread_mutex_destroy(&q->lock);
    return APR_SUCCESS;
}

apr_status_t cs_queue_start(apr_pool_t *p, int nthreads, unsigned int capacity,
                            cs_queue_fn run, cs_queue_fn drop, cs_queue_t **out)
{
    cs_queue_t *q = apr_pcalloc(p, sizeof(*q));
    sigset_t all, old;
    int rv = 0;

    *out = NULL;
    if (nthreads < 1 || capacity < 1)
        return APR_EINVAL;
    q->run = run;
    q->drop = drop;
    q->capacity = capacity;
    q->ring = apr_pcalloc(p, capacity * sizeof(*q->ring));
    q->threads = apr_pcalloc(p, (apr_size_t)nthreads * sizeof(*q->threads));
    if ((rv = pthread_mutex_init(&q->lock, NULL)) != 0)
        return rv;
    if ((rv = pthread_cond_init(&q->more, NULL)) != 0) {
        pthread_mutex_destroy(&q->lock);
        return rv;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    while (q->nthreads < nthreads &&
           (rv = pthread_create(&q->threads[q->nthreads], NULL, queue_thread,
                                q)) == 0)
        q->nthreads++;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    /* a pre-cleanup: the threads are gone before anything else of p (what
     * the jobs use, such as an HTTP client made earlier) is cleaned up */
    apr_pool_pre_cleanup_register(p, q, queue_cleanup);
    if (!q->nthreads)
        return rv ? rv : APR_EGENERAL;
    *out = q;
    return APR_SUCCESS;
}

int cs_queue_push(cs_queue_t *q, void *job)
{
    int queued = 0;

    pthread_mutex_lock(&q->lock);
    if (!q->stopping && q->count < q->capacity) {
        q->ring[(q->head + q->count) % q->capacity] = job;
        q->count++;
        pthread_cond_signal(&q->more);
        queued = 1;
    }
    pthread_mutex_unlock(&q->lock);
    return queued;
}

void cs_queue_stop(cs_queue_t *q)
{
    int n;

    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        return;
    }
    q->stopping = 1;
    pthread_cond_broadcast(&q->more);
    pthread_mutex_unlock(&q->lock);
    for (n = 0; n < q->nthreads; n++)
        pthread_join(q->threads[n], NULL);
    q->nthreads = 0;
    for (; q->count; q->count--, q->head = (q->head + 1) % q->capacity)
        if (q->drop)
            q->drop(q->ring[q->head]);
}

int cs_queue_threads(const cs_queue_t *q)
{
    return q->nthreads;
}
