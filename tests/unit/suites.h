/* The check suites of lib/, one per source file. */
#ifndef CS_TEST_SUITES_H
#define CS_TEST_SUITES_H

#include <check.h>
#include <apr_pools.h>

Suite *key_suite(void);
Suite *endpoint_suite(void);
Suite *user_id_suite(void);
Suite *token_suite(void);
Suite *reply_suite(void);
Suite *cache_suite(void);
Suite *upstream_suite(void);
Suite *breaker_suite(void);
Suite *store_suite(void);
Suite *secret_suite(void);
Suite *serve_suite(void);
Suite *origin_suite(void);
Suite *conf_suite(void);
Suite *policy_suite(void);
Suite *queue_suite(void);
Suite *metrics_suite(void);
Suite *identity_suite(void);

/* a fresh pool per test, destroyed by the fixture */
extern apr_pool_t *tp;
void pool_setup(void);
void pool_teardown(void);

/* a new file in /tmp holding content, with that mode; the test unlinks it */
const char *write_temp_file(const char *content, int mode);

/* a JWT with the given payload JSON, unsigned */
const char *make_jwt(apr_pool_t *p, const char *payload_json);

#endif
