/* The fleet stores of a build without their client library (configure
 * --without-hiredis, --without-libmemcached): creating one fails with a
 * message that says how to get it, which the shell logs when it refuses to
 * start (CardScanCache redis:... or memcache:...). Makefile.am compiles
 * this file with CS_STORE_NONE_REDIS and/or CS_STORE_NONE_MEMCACHE in
 * place of lib/cs_store_redis.c and/or lib/cs_store_memcache.c. */
#include "cs_store.h"

#include <apr_errno.h>

#ifdef CS_STORE_NONE_REDIS
apr_status_t cs_store_redis_create(apr_pool_t *p, const char *spec,
                                   const cs_store_opts_t *opts, cs_store_t **st,
                                   const char **err)
{
    (void)p;
    (void)spec;
    (void)opts;
    *st = NULL;
    *err = CS_STORE_NONE_REDIS_MSG;
    return APR_ENOTIMPL;
}
#endif

#ifdef CS_STORE_NONE_MEMCACHE
apr_status_t cs_store_memcache_create(apr_pool_t *p, const char *spec,
                                      const cs_store_opts_t *opts,
                                      cs_store_t **st, const char **err)
{
    (void)p;
    (void)spec;
    (void)opts;
    *st = NULL;
    *err = CS_STORE_NONE_MEMCACHE_MSG;
    return APR_ENOTIMPL;
}
#endif

/* a translation unit is never empty (scripts/fuzz compiles all of lib/) */
typedef int cs_store_none_unused;
