/* A work queue served by a fixed number of threads: the refresh-ahead jobs
 * of one child. A bounded ring under a mutex; a semaphore counts the jobs
 * (and, at stop, wakes every thread). The threads are plain POSIX threads,
 * started with every signal blocked (signals are the MPM's business): an
 * APR thread would own a pool under the caller's pool and destroy it as it
 * exits, which under prefork (whose child pool has no allocator mutex)
 * corrupted that allocator.
 *
 * Stopping must not hang a child that is told to exit. prefork destroys
 * its child pool, and so stops the queue, from the handler of SIGTERM or
 * SIGHUP, on a thread that may have been interrupted anywhere, in
 * cs_queue_push with the mutex held included. So stopping takes no lock:
 * it sets an atomic flag and posts the semaphore once per thread (sem_post
 * is async-signal-safe); a thread waiting for the mutex gives up when the
 * flag is set; and a running job is waited for a bounded time, counted on
 * a second semaphore the threads post as they end. The queue's memory is
 * not the pool's: a thread still running after that time keeps using it. */
#include "cardscan.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>

/* a thread waiting for the mutex looks at the stop flag this often */
#define LOCK_POLL_MS 100

struct cs_queue {
    pthread_mutex_t lock; /* guards the ring */
    sem_t jobs;           /* a post per queued job, and per thread at stop */
    sem_t ended;          /* a post per thread that ended */
    cs_queue_fn run, drop;
    pthread_t *threads;
    int nthreads, joined;
    int stopping; /* atomic */
    void **ring;
    unsigned int capacity, head, count;
};

static int stopping(cs_queue_t *q)
{
    return __atomic_load_n(&q->stopping, __ATOMIC_ACQUIRE);
}

static struct timespec deadline_in(apr_interval_time_t usec)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(usec / APR_USEC_PER_SEC);
    ts.tv_nsec += (long)(usec % APR_USEC_PER_SEC) * 1000;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* The mutex, unless the queue stops first (its holder may be a thread that
 * a signal interrupted for good). */
static int lock_unless_stopping(cs_queue_t *q)
{
    for (;;) {
        struct timespec ts = deadline_in(apr_time_from_msec(LOCK_POLL_MS));
        if (pthread_mutex_timedlock(&q->lock, &ts) == 0)
            return 1;
        if (stopping(q))
            return 0;
    }
}

static void *queue_thread(void *data)
{
    cs_queue_t *q = data;

    for (;;) {
        void *job = NULL;
        while (sem_wait(&q->jobs) != 0 && errno == EINTR)
            ;
        if (stopping(q) || !lock_unless_stopping(q))
            break;
        if (q->count) {
            job = q->ring[q->head];
            q->head = (q->head + 1) % q->capacity;
            q->count--;
        }
        pthread_mutex_unlock(&q->lock);
        if (job)
            q->run(job);
    }
    sem_post(&q->ended); /* the last use of q by this thread */
    return NULL;
}

static void queue_free(cs_queue_t *q)
{
    sem_destroy(&q->ended);
    sem_destroy(&q->jobs);
    pthread_mutex_destroy(&q->lock);
    free(q->ring);
    free(q->threads);
    free(q);
}

static apr_status_t queue_cleanup(void *data)
{
    cs_queue_t *q = data;
    /* threads still running keep the queue: it is never freed then */
    if (cs_queue_stop(q, CS_QUEUE_STOP_WAIT) == 0)
        queue_free(q);
    return APR_SUCCESS;
}

apr_status_t cs_queue_start(apr_pool_t *p, int nthreads, unsigned int capacity,
                            cs_queue_fn run, cs_queue_fn drop, cs_queue_t **out)
{
    cs_queue_t *q;
    sigset_t all, old;
    int rv = 0;

    *out = NULL;
    if (nthreads < 1 || capacity < 1)
        return APR_EINVAL;
    if (!(q = calloc(1, sizeof(*q))))
        return APR_ENOMEM;
    q->run = run;
    q->drop = drop;
    q->capacity = capacity;
    q->ring = calloc(capacity, sizeof(*q->ring));
    q->threads = calloc((size_t)nthreads, sizeof(*q->threads));
    if (!q->ring || !q->threads ||
        (rv = pthread_mutex_init(&q->lock, NULL)) != 0) {
        free(q->ring);
        free(q->threads);
        free(q);
        return rv ? rv : APR_ENOMEM;
    }
    sem_init(&q->jobs, 0, 0);
    sem_init(&q->ended, 0, 0);
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

    if (stopping(q))
        return 0;
    pthread_mutex_lock(&q->lock);
    if (!stopping(q) && q->count < q->capacity) {
        q->ring[(q->head + q->count) % q->capacity] = job;
        q->count++;
        queued = 1;
    }
    pthread_mutex_unlock(&q->lock);
    if (queued)
        sem_post(&q->jobs);
    return queued;
}

int cs_queue_stop(cs_queue_t *q, apr_interval_time_t wait)
{
    struct timespec until = deadline_in(wait);
    int n;

    if (!__atomic_exchange_n(&q->stopping, 1, __ATOMIC_ACQ_REL))
        for (n = 0; n < q->nthreads; n++)
            sem_post(&q->jobs);
    while (q->joined < q->nthreads) {
        if (sem_timedwait(&q->ended, &until) == 0)
            q->joined++;
        else if (errno != EINTR)
            return q->nthreads - q->joined;
    }
    /* every thread has ended (or is returning): joined at once */
    for (n = 0; n < q->nthreads; n++)
        pthread_join(q->threads[n], NULL);
    q->nthreads = q->joined = 0;
    /* the jobs never started; not when the mutex is held, by the thread
     * this runs on (interrupted) or one that pushes: they are left then */
    if (pthread_mutex_trylock(&q->lock) == 0) {
        for (; q->count; q->count--, q->head = (q->head + 1) % q->capacity)
            if (q->drop)
                q->drop(q->ring[q->head]);
        pthread_mutex_unlock(&q->lock);
    }
    return 0;
}

int cs_queue_threads(const cs_queue_t *q)
{
    return q->nthreads;
}
