/* lib/cs_queue.c: the refresh work queue, with its threads. The valgrind
 * stage runs this suite under helgrind. */
#include "suites.h"

#include <pthread.h>
#include <signal.h>
#include <semaphore.h>
#include <string.h>
#include <time.h>
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
        ck_assert_int_eq(cs_queue_stop(q, apr_time_from_sec(10)), 0);
        pthread_join(opener, NULL);
    }
    ck_assert_int_eq(counts.ran + counts.dropped, (apr_uint32_t)queued);
    ck_assert_int_ge(counts.dropped, 3);
    ck_assert_int_eq(cs_queue_push(q, &jobs[0]), 0);
    ck_assert_int_eq(cs_queue_stop(q, 0), 0); /* idempotent */
    apr_pool_destroy(p);
}
END_TEST

/* A job that does not end is waited for a bounded time: stop returns with
 * the thread still running, and a later stop joins it once it has ended. */
START_TEST(stop_waits_for_a_running_job_a_bounded_time)
{
    apr_pool_t *p;
    cs_queue_t *q;
    counts_t counts;
    job_t job;
    apr_time_t t0;

    q = start_queue(&p, &counts, 0, 2, 4);
    job.counts = &counts;
    ck_assert_int_eq(cs_queue_push(q, &job), 1);
    usleep(100 * 1000); /* taken by a thread, which waits for the gate */
    t0 = apr_time_now();
    ck_assert_int_eq(cs_queue_stop(q, apr_time_from_msec(300)), 1);
    ck_assert_int_lt(apr_time_now() - t0, apr_time_from_sec(2));
    ck_assert_int_eq(cs_queue_push(q, &job), 0);
    sem_post(&counts.gate);
    ck_assert_int_eq(cs_queue_stop(q, apr_time_from_sec(10)), 0);
    ck_assert_int_eq(cs_queue_threads(q), 0);
    ck_assert_int_eq(counts.ran, 1);
    apr_pool_destroy(p);
}
END_TEST

/* prefork stops the queue from a signal handler (its child pool is
 * destroyed from SIGTERM's): on a thread that may have been interrupted in
 * cs_queue_push, the queue's mutex held. Stopping must neither deadlock
 * nor wait for the idle threads. */
static cs_queue_t *signal_q;
/* semaphores (sem_post is async-signal-safe), which helgrind also sees */
static sem_t signal_done, pushing_done;
static int signal_stopped;

static void stop_from_handler(int sig)
{
    (void)sig;
    signal_stopped = cs_queue_stop(signal_q, apr_time_from_sec(5));
    sem_post(&signal_done);
}

static void *push_until_stopped(void *data)
{
    job_t *jobs = data;
    unsigned int i = 0;
    while (sem_trywait(&pushing_done) != 0)
        cs_queue_push(signal_q, &jobs[i++ % 64]);
    return NULL;
}

START_TEST(stop_in_a_signal_handler_that_interrupted_push)
{
    struct sigaction sa, old;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = stop_from_handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, &old);
    sem_init(&signal_done, 0, 0);
    sem_init(&pushing_done, 0, 0);
    for (int round = 0; round < 20; round++) {
        apr_pool_t *p;
        counts_t counts;
        job_t jobs[64];
        pthread_t pusher;
        struct timespec ts;

        signal_q = start_queue(&p, &counts, 1, 2, 8);
        for (int i = 0; i < 64; i++)
            jobs[i].counts = &counts;
        signal_stopped = -1;
        ck_assert_int_eq(
            pthread_create(&pusher, NULL, push_until_stopped, jobs), 0);
        usleep(20 * 1000);
        pthread_kill(pusher, SIGUSR2);
        /* bounded: 10 s at most */
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 10;
        ck_assert_int_eq(sem_timedwait(&signal_done, &ts), 0);
        sem_post(&pushing_done);
        pthread_join(pusher, NULL);
        ck_assert_int_eq(signal_stopped, 0);
        ck_assert_int_eq(cs_queue_threads(signal_q), 0);
        ck_assert_int_eq(cs_queue_push(signal_q, &jobs[0]), 0);
        apr_pool_destroy(p);
    }
    sigaction(SIGUSR2, &old, NULL);
    sem_destroy(&signal_done);
    sem_destroy(&pushing_done);
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
    tcase_add_test(tc, stop_waits_for_a_running_job_a_bounded_time);
    tcase_add_test(tc, stop_in_a_signal_handler_that_interrupted_push);
    tcase_add_test(tc, no_threads_no_queue);
    suite_add_tcase(s, tc);
    return s;
}
