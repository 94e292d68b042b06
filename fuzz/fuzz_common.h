/* Shared by the libFuzzer targets: APR set-up, one pool per input, and a
 * check that aborts with a message (so that libFuzzer records the input). */
#ifndef CS_FUZZ_COMMON_H
#define CS_FUZZ_COMMON_H

#include "lib/cardscan.h"

#include <apr_general.h>
#include <apr_pools.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static apr_pool_t *fuzz_root;
static void fuzz_pool_mode(int per_input);

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Called once per process by LLVMFuzzerInitialize. What it and the
 * target's set-up allocate lives in real pool memory until the end. */
static void fuzz_apr_init(void)
{
    fuzz_pool_mode(0);
    if (apr_initialize() != APR_SUCCESS ||
        apr_pool_create(&fuzz_root, NULL) != APR_SUCCESS) {
        fprintf(stderr, "fuzz: apr_initialize failed\n");
        abort();
    }
}

/* A fresh pool for one input, destroyed by fuzz_pool_destroy at the end of
 * the input, so that a use across inputs shows. */
static inline apr_pool_t *fuzz_pool(void)
{
    apr_pool_t *p;
    if (apr_pool_create(&p, fuzz_root) != APR_SUCCESS)
        abort();
    fuzz_pool_mode(1);
    return p;
}

static inline void fuzz_pool_destroy(apr_pool_t *p)
{
    fuzz_pool_mode(0);
    apr_pool_destroy(p);
}

#define FUZZ_CHECK(cond, ...)                                                  \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz invariant failed at %s:%d: %s: ", __FILE__,  \
                    __LINE__, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* memmem without relying on _GNU_SOURCE ordering. */
static inline const void *fuzz_memmem(const void *hay, size_t hlen,
                                      const void *needle, size_t nlen)
{
    const unsigned char *h = hay;
    if (nlen == 0)
        return hay;
    for (size_t i = 0; i + nlen <= hlen; i++)
        if (h[i] == *(const unsigned char *)needle &&
            memcmp(h + i, needle, nlen) == 0)
            return h + i;
    return NULL;
}

/* AddressSanitizer cannot see an overflow inside an APR pool: a pool hands
 * out pieces of 8 KiB blocks. So, unless CS_FUZZ_REAL_POOLS is defined, every
 * apr_palloc of this process (and apr_pcalloc, a macro over it) gets its
 * own malloc block, freed by a pool cleanup when the pool goes: an
 * off-by-one write past a lib/ buffer is then a heap-buffer-overflow report.
 * (apr_psprintf and a few APR internals still use pool memory.) */
#ifndef CS_FUZZ_REAL_POOLS
#include <dlfcn.h>

/* 1: real pool memory (set-up, cleanup records); 0: one malloc each */
static __thread int fuzz_in_palloc = 1;

static void fuzz_pool_mode(int per_input)
{
    fuzz_in_palloc = !per_input;
}

static apr_status_t fuzz_free_cleanup(void *mem)
{
    free(mem);
    return APR_SUCCESS;
}

void *apr_palloc(apr_pool_t *p, apr_size_t size);

void *apr_palloc(apr_pool_t *p, apr_size_t size)
{
    static void *(*real)(apr_pool_t *, apr_size_t);
    void *mem;

    if (!real)
        real =
            (void *(*)(apr_pool_t *, apr_size_t))dlsym(RTLD_NEXT, "apr_palloc");
    if (fuzz_in_palloc || !real)
        return real ? real(p, size) : NULL;
    mem = malloc(size ? size : 1);
    if (!mem)
        return NULL;
    fuzz_in_palloc = 1; /* the cleanup record itself comes from the pool */
    apr_pool_cleanup_register(p, mem, fuzz_free_cleanup, apr_pool_cleanup_null);
    fuzz_in_palloc = 0;
    return mem;
}
#else
static void fuzz_pool_mode(int per_input)
{
    (void)per_input;
}
#endif

#endif
