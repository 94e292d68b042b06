/* lib/cs_queue.c: the refresh work queue, with its threads. The valgrind
 * stage runs this suite under helgrind. */
#include "suites.h"

#include <pthread.h>
#include <semaphore.h>
#include <string.h>
#include <unistd.h>

#include "lib/cardscan.h"

/* the counts are taken under a mutex (helgrind sees no atomics); the jobs
 * wait for `gate` while the test holds it */
typedef struct {
    pthread_mutex_t lock;
    sem_t gate; /* open: 1 */
    apr_uint32_t ran, dropped;
} counts_t;

static apr_uint32_t ran_of(counts_t *c)
{
    apr_uint32_t n;
    pthread_mutex_lock(&c->lock);
    n = c->ran;
    pthread_mutex_unlock(&c->lock);
    return n;
}

typedef struct {
    counts_t *counts;
} job_t;

static void run_job(void *data)
{
    job_t *job = data;
    sem_wait(&job->counts->gate);
    sem_post(&job->counts->gate);
    pthread_mutex_lock(&job->counts->lock);
    job->counts->ran++;
    pthread_mutex_unlock(&job->counts->lock);
}

static void drop_job(void *data)
{
    job_t *job = data;
    pthread_mutex_lock(&job->counts->lock);
    job->counts->dropped++;
    pthread_mutex_unlock(&job->counts->lock);
}

/* a queue in a new pool under tp, its jobs counting into counts */
static cs_queue_t *start_queue(apr_pool_t **p, counts_t *counts, int open,
                               int threads, unsigned int capacity)
{
    cs_queue_t *q = NULL;
    memset(counts, 0, sizeof(*counts));
    pthread_mutex_init(&counts->lock, NULL);
    sem_init(&counts->gate, 0, (unsigned int)open);
    apr_pool_create(p, tp);
    ck_assert_int_eq(
        cs_queue_start(*p, threads, capacity, run_job, drop_job, &q),
        APR_SUCCESS);
    return q;
}

START_TEST(every_job_runs_once_on_the_threads)
{
    apr_pool_t *p;
    cs_queue_t *q;
    counts_t counts;
    job_t jobs[200];
    int queued = 0;

    q = start_queue(&p, &counts, 1, 4, 256);
    ck_assert_int_eq(cs_queue_threads(q), 4);
    for (int i = 0; i < 200; i++) {
        jobs[i].counts = &counts;
        queued += cs_queue_push(q, &jobs[i]);
    }
    ck_assert_int_eq(queued, 200);
    /* bounded: 10 s at most */
    for (int i = 0; i < 10000 && ran_of(&counts) < 200; i++)
        usleep(1000);
    apr_pool_destroy(p); /* stops the queue */
    ck_assert_int_eq(counts.ran, 200);
    ck_assert_int_eq(counts.dropped, 0);
}
END_TEST

static void *open_gate_later(void *data)
{
    counts_t *counts = data;
    usleep(300 * 1000);
    sem_post(&counts->gate);
    return NULL;
}

/* A full queue refuses; stopping waits for the running job and drops the
 * queued ones; a stopped queue refuses. */
START_TEST(full_queue_refuses_and_stop_drops_the_rest)
{
    apr_pool_t *p;
    cs_queue_t *q;
    counts_t counts;
    job_t jobs[8];
    int queued = 0;

    q = start_queue(&p, &counts, 0, 1, 4);
    for (int i = 0; i < 8; i++) {
        jobs[i].counts = &counts;
        queued += cs_queue_push(q, &jobs[i]);
    }
    /* one job taken by the thread (blocked), four queued: 5; or the thread
     * has not taken one yet: 4 */
    ck_assert(queued == 4 || queued == 5);
    /* the running job ends after stop has begun: the rest are dropped */
    {
        pthread_t opener;
        ck_assert_int_eq(
            pthread_create(&opener, NULL, open_gate_later, &counts), 0);
        cs_queue_stop(q);
        pthread_join(opener, NULL);
    }
    ck_assert_int_eq(counts.ran + counts.dropped, (apr_uint32_t)queued);
    ck_assert_int_ge(counts.dropped, 3);
    ck_assert_int_eq(cs_queue_push(q, &jobs[0]), 0);
    cs_queue_stop(q); /* idempotent */
    apr_pool_destroy(p);
}
END_TEST

START_TEST(no_threads_no_queue)
{
    cs_queue_t *q = (cs_queue_t *)1;
    ck_assert_int_ne(cs_queue_start(tp, 0, 4, run_job, drop_job, &q),
                     APR_SUCCESS);
    ck_assert_ptr_null(q);
}
END_TEST

Suite *queue_suite(void)
{
    Suite *s = suite_create("queue");
    TCase *tc = tcase_create("queue");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, every_job_runs_once_on_the_threads);
    tcase_add_test(tc, full_queue_refuses_and_stop_drops_the_rest);
    tcase_add_test(tc, no_threads_no_queue);
    suite_add_tcase(s, tc);
    return s;
}
