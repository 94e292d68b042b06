#include "suites.h"

#include <apr_base64.h>
#include <apr_general.h>
#include <apr_strings.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/cardscan.h"

apr_pool_t *tp;

void pool_setup(void)
{
    apr_pool_create(&tp, NULL);
}

void pool_teardown(void)
{
    apr_pool_destroy(tp);
    tp = NULL;
}

const char *write_temp_file(const char *content, int mode)
{
    char *path = apr_pstrdup(tp, "/tmp/cs-unit-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, content, strlen(content)),
                     (ssize_t)strlen(content));
    close(fd);
    chmod(path, (mode_t)mode);
    return path;
}

static char *b64url(apr_pool_t *p, const char *s)
{
    char *out = apr_palloc(p, apr_base64_encode_len((int)strlen(s)));
    int n = apr_base64_encode(out, s, (int)strlen(s));
    char *c;
    (void)n;
    for (c = out; *c; c++) {
        if (*c == '+')
            *c = '-';
        else if (*c == '/')
            *c = '_';
        else if (*c == '=') {
            *c = '\0';
            break;
        }
    }
    return out;
}

const char *make_jwt(apr_pool_t *p, const char *payload_json)
{
    return apr_pstrcat(p, b64url(p, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}"), ".",
                       b64url(p, payload_json), ".c2lnbmF0dXJl", NULL);
}

int main(void)
{
    SRunner *sr;
    int failed;
    const char *err;

    apr_initialize();
    cs_upstream_global_init(&err);
    sr = srunner_create(key_suite());
    srunner_add_suite(sr, endpoint_suite());
    srunner_add_suite(sr, user_id_suite());
    srunner_add_suite(sr, token_suite());
    srunner_add_suite(sr, reply_suite());
    srunner_add_suite(sr, cache_suite());
    srunner_add_suite(sr, upstream_suite());
    srunner_add_suite(sr, breaker_suite());
    srunner_add_suite(sr, store_suite());
    srunner_add_suite(sr, secret_suite());
    srunner_add_suite(sr, serve_suite());
    srunner_add_suite(sr, origin_suite());
    srunner_add_suite(sr, conf_suite());
    srunner_add_suite(sr, policy_suite());
    srunner_add_suite(sr, queue_suite());
    srunner_add_suite(sr, metrics_suite());
    srunner_add_suite(sr, identity_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    apr_terminate();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
