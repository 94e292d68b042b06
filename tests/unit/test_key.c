#include "suites.h"

#include <apr_env.h>
#include <apr_file_io.h>
#include <apr_strings.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/cardscan.h"

#define TEST_KEY "sk_test_cardscan_ai_0123456789abcdef"
#define LIVE_KEY "sk_live_cardscan_ai_ZYXWVUT987654321"

START_TEST(parses_test_and_live_keys)
{
    cs_key_t *k;
    const char *err = NULL;
    ck_assert_int_eq(cs_key_parse(tp, TEST_KEY, &k, &err), APR_SUCCESS);
    ck_assert_int_eq(k->mode, CS_KEY_TEST);
    ck_assert_str_eq(k->secret, TEST_KEY);
    ck_assert_int_eq(cs_key_parse(tp, LIVE_KEY, &k, &err), APR_SUCCESS);
    ck_assert_int_eq(k->mode, CS_KEY_LIVE);
    ck_assert_int_eq(cs_key_parse(tp, "secret_live_abcdefgh1234", &k, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(k->mode, CS_KEY_LIVE);
    ck_assert_int_eq(cs_key_parse(tp, "secret_test_abcdefgh1234", &k, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(k->mode, CS_KEY_TEST);
}
END_TEST

START_TEST(refuses_malformed_keys)
{
    static const char *bad[] = {"",
                                "sk_test_cardscan_ai_",
                                "sk_test_cardscan_ai_short",
                                "pk_test_cardscan_ai_0123456789abcdef",
                                "sk_test_cardscan_ai_0123456789 abcdef",
                                "sk_test_cardscan_ai_0123456789abcdef\n",
                                "Bearer sk_test_cardscan_ai_0123456789abcdef",
                                "sk_test_cardscan_ai_0123456789\"abcdef"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cs_key_t *k = NULL;
        const char *err = NULL;
        ck_assert_int_ne(cs_key_parse(tp, bad[i], &k, &err), APR_SUCCESS);
        ck_assert_ptr_nonnull(err);
        /* the message never repeats the key */
        if (strlen(bad[i]) > 30)
            ck_assert_ptr_null(strstr(err, bad[i] + 20));
    }
}
END_TEST

START_TEST(masks_keys)
{
    ck_assert_str_eq(cs_key_mask(tp, TEST_KEY),
                     "sk_test_cardscan_ai_\xE2\x80\xA6"
                     "cdef");
    /* too short to show anything of the secret part */
    ck_assert_str_eq(cs_key_mask(tp, "sk_live_cardscan_ai_abcdefgh"),
                     "sk_live_cardscan_ai_\xE2\x80\xA6");
    ck_assert_str_eq(cs_key_mask(tp, "nonsense"), "\xE2\x80\xA6");
}
END_TEST

START_TEST(derived_secrets_differ_per_key)
{
    cs_key_t *a, *b, *a2;
    const char *err;
    cs_key_parse(tp, TEST_KEY, &a, &err);
    cs_key_parse(tp, "sk_test_cardscan_ai_0123456789abcdeF", &b, &err);
    cs_key_parse(tp, TEST_KEY, &a2, &err);
    ck_assert_mem_ne(a->id_key, b->id_key, CS_SECRET_LEN);
    ck_assert_mem_ne(a->seal_key, b->seal_key, CS_SECRET_LEN);
    ck_assert_mem_ne(a->id_key, a->seal_key, CS_SECRET_LEN);
    ck_assert_mem_eq(a->id_key, a2->id_key, CS_SECRET_LEN);
}
END_TEST

START_TEST(loads_from_file)
{
    cs_key_t *k;
    const char *warn, *err = NULL;
    const char *path = write_temp_file("  " TEST_KEY "\n", 0600);
    ck_assert_int_eq(
        cs_key_load(tp, apr_pstrcat(tp, "file:", path, NULL), &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_str_eq(k->secret, TEST_KEY);
    ck_assert_ptr_null(warn);
    unlink(path);

    path = write_temp_file(TEST_KEY, 0644);
    ck_assert_int_eq(
        cs_key_load(tp, apr_pstrcat(tp, "file:", path, NULL), &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(warn);
    ck_assert_ptr_nonnull(strstr(warn, "readable by every user"));
    unlink(path);
}
END_TEST

START_TEST(refuses_missing_file_and_env)
{
    cs_key_t *k;
    const char *warn, *err = NULL;
    ck_assert_int_ne(
        cs_key_load(tp, "file:/nonexistent/cardscan.key", &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "/nonexistent/cardscan.key"));
    ck_assert_int_ne(cs_key_load(tp, "file:/tmp", &k, &warn, &err),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "not a regular file"));
    unsetenv("CS_TEST_NO_SUCH_KEY");
    ck_assert_int_ne(
        cs_key_load(tp, "env:CS_TEST_NO_SUCH_KEY", &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "CS_TEST_NO_SUCH_KEY"));
}
END_TEST

START_TEST(loads_from_env_and_removes_it)
{
    cs_key_t *k;
    const char *warn, *err = NULL;
    setenv("CS_TEST_KEY", LIVE_KEY, 1);
    ck_assert_int_eq(cs_key_load(tp, "env:CS_TEST_KEY", &k, &warn, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(k->secret, LIVE_KEY);
    /* gone from the environment: children, piped loggers and RewriteMap
     * programs inherit none of it */
    ck_assert_ptr_null(getenv("CS_TEST_KEY"));
    /* a graceful restart reads the configuration again: the process kept
     * its copy */
    ck_assert_int_eq(cs_key_load(tp, "env:CS_TEST_KEY", &k, &warn, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(k->secret, LIVE_KEY);
    ck_assert_ptr_null(getenv("CS_TEST_KEY"));
    /* a value set again (a full restart) is the one that counts */
    setenv("CS_TEST_KEY", TEST_KEY, 1);
    ck_assert_int_eq(cs_key_load(tp, "env:CS_TEST_KEY", &k, &warn, &err),
                     APR_SUCCESS);
    ck_assert_str_eq(k->secret, TEST_KEY);
    ck_assert_ptr_null(getenv("CS_TEST_KEY"));
}
END_TEST

/* The key file is replaced (rotation, an editor's save) while it is read:
 * the file's type and mode come from the file that was opened, never from
 * a stat of the path that may have failed or seen another file. */
static volatile int swapping;

static void *swap_key_file(void *data)
{
    const char *path = data;
    char tmp[256];
    snprintf(tmp, sizeof(tmp), "%s.new", path);
    while (swapping) {
        FILE *f = fopen(tmp, "w");
        if (f) {
            fputs(TEST_KEY "\n", f);
            fclose(f);
            chmod(tmp, 0600);
            rename(tmp, path);
        }
        unlink(path);
    }
    return NULL;
}

START_TEST(key_file_replaced_while_read)
{
    char dir[] = "/tmp/cs-keyrace-XXXXXX";
    const char *path, *spec;
    pthread_t th;
    int loaded = 0;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    path = apr_pstrcat(tp, dir, "/key", NULL);
    spec = apr_pstrcat(tp, "file:", path, NULL);
    swapping = 1;
    ck_assert_int_eq(pthread_create(&th, NULL, swap_key_file, (void *)path), 0);
    for (int i = 0; i < 3000; i++) {
        apr_pool_t *p;
        cs_key_t *k;
        const char *warn = NULL, *err = NULL;
        apr_pool_create(&p, tp);
        if (cs_key_load(p, spec, &k, &warn, &err) == APR_SUCCESS) {
            loaded++;
            ck_assert_str_eq(k->secret, TEST_KEY);
            /* every file written is 0600: never a warning */
            ck_assert_msg(warn == NULL, "warning for a 0600 file: %s", warn);
        }
        apr_pool_destroy(p);
    }
    swapping = 0;
    pthread_join(th, NULL);
    unlink(path);
    rmdir(dir);
    (void)loaded;
}
END_TEST

START_TEST(bad_key_in_file_is_refused)
{
    cs_key_t *k;
    const char *warn, *err = NULL;
    const char *path = write_temp_file("not a key\n", 0600);
    ck_assert_int_ne(
        cs_key_load(tp, apr_pstrcat(tp, "file:", path, NULL), &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "does not start with"));
    unlink(path);
}
END_TEST

/* "sk_test_cardscan_ai_" followed by 'a's, len characters in all */
static char *long_key(apr_size_t len)
{
    char *k = apr_palloc(tp, len + 1);
    memcpy(k, "sk_test_cardscan_ai_", 20);
    memset(k + 20, 'a', len - 20);
    k[len] = '\0';
    return k;
}

START_TEST(refuses_keys_over_512_characters)
{
    cs_key_t *k;
    const char *err = NULL;
    ck_assert_int_eq(cs_key_parse(tp, long_key(512), &k, &err), APR_SUCCESS);
    ck_assert_int_ne(cs_key_parse(tp, long_key(513), &k, &err), APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "too long"));
    ck_assert_ptr_null(strstr(err, "aaaaaaaa"));
}
END_TEST

START_TEST(refuses_key_files_of_4_kib_and_more)
{
    cs_key_t *k;
    const char *warn, *err = NULL;
    /* a good key padded with blanks: the file's size alone decides */
    char *text = apr_palloc(tp, 4097);
    memset(text, ' ', 4096);
    memcpy(text, TEST_KEY, strlen(TEST_KEY));
    text[4095] = '\0';
    const char *path = write_temp_file(text, 0600);
    ck_assert_int_eq(
        cs_key_load(tp, apr_pstrcat(tp, "file:", path, NULL), &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_str_eq(k->secret, TEST_KEY);
    unlink(path);
    text[4095] = ' ';
    text[4096] = '\0';
    path = write_temp_file(text, 0600);
    ck_assert_int_ne(
        cs_key_load(tp, apr_pstrcat(tp, "file:", path, NULL), &k, &warn, &err),
        APR_SUCCESS);
    ck_assert_ptr_nonnull(strstr(err, "too large"));
    unlink(path);
}
END_TEST

Suite *key_suite(void)
{
    Suite *s = suite_create("key");
    TCase *tc = tcase_create("key");
    tcase_add_checked_fixture(tc, pool_setup, pool_teardown);
    tcase_add_test(tc, parses_test_and_live_keys);
    tcase_add_test(tc, refuses_malformed_keys);
    tcase_add_test(tc, masks_keys);
    tcase_add_test(tc, derived_secrets_differ_per_key);
    tcase_add_test(tc, loads_from_file);
    tcase_add_test(tc, refuses_missing_file_and_env);
    tcase_add_test(tc, loads_from_env_and_removes_it);
    tcase_add_test(tc, key_file_replaced_while_read);
    tcase_add_test(tc, bad_key_in_file_is_refused);
    tcase_add_test(tc, refuses_keys_over_512_characters);
    tcase_add_test(tc, refuses_key_files_of_4_kib_and_more);
    suite_add_tcase(s, tc);
    return s;
}
