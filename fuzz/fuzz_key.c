/* Fuzzes API-key parsing, masking and loading (cs_key_parse, cs_key_mask,
 * cs_key_load for a literal, an env: variable and a file: key file).
 *
 * The input, NUL-terminated, is a key as written in the configuration; an
 * embedded NUL simply ends it (checked: the bytes after it change nothing).
 * Invariants:
 *  - the mask is the recognised prefix, an ellipsis, and at most the last 4
 *    characters of the part after the prefix, and shows any of them only when
 *    at least 8 stay hidden;
 *  - the secret part (after the prefix; the whole input without one), when
 *    8 bytes or longer, never appears in the mask or in an error message;
 *  - cs_key_parse accepts exactly the documented format: a known prefix, at
 *    least 8 more characters of [A-Za-z0-9_-], at most 512 in all; the parsed
 *    key holds the input, its mask and the prefix's mode;
 *  - cs_key_load of a literal, and of env:NAME holding the input, agree with
 *    cs_key_parse (same result, same message);
 *  - cs_key_load of file:PATH holding the input bytes is cs_key_parse of
 *    those bytes with blanks trimmed at both ends (up to a NUL), refuses a
 *    file of 4096 bytes or more, and warns exactly when the file is
 *    world-readable (the input's length decides its mode).
 */
#include "fuzz_common.h"

#include <apr_lib.h>
#include <apr_strings.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define ENV_NAME "CS_FUZZ_API_KEY"
#define KEY_FILE_MAX 4096

static char key_file[256];

static void remove_key_file(void)
{
    unlink(key_file);
}

#define ELLIPSIS "\xE2\x80\xA6"

static const struct {
    const char *prefix;
    cs_key_mode_e mode;
} prefixes[] = {
    {"sk_test_cardscan_ai_", CS_KEY_TEST},
    {"sk_live_cardscan_ai_", CS_KEY_LIVE},
    {"secret_test_", CS_KEY_TEST},
    {"secret_live_", CS_KEY_LIVE},
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_apr_init();
    {
        /* scripts/fuzz points CS_FUZZ_TMPDIR at its scratch directory, so
         * that a crash (no atexit) leaves nothing behind */
        const char *dir = getenv("CS_FUZZ_TMPDIR") ? getenv("CS_FUZZ_TMPDIR")
                          : access("/dev/shm", W_OK) == 0 ? "/dev/shm"
                                                          : "/tmp";
        int fd;
        snprintf(key_file, sizeof(key_file), "%s/cs-fuzz-key.XXXXXX", dir);
        fd = mkstemp(key_file);
        if (fd < 0) {
            perror("fuzz: mkstemp");
            abort();
        }
        close(fd);
        atexit(remove_key_file);
    }
    return 0;
}

static int c_isspace(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* The key file holds the input bytes; cs_key_load must read what the
 * documented trimming gives, through cs_key_parse. */
static void check_key_file(apr_pool_t *p, const uint8_t *data, size_t size)
{
    int world = size & 1, fd;
    size_t n = size, start = 0;
    char *expect;
    const char *err = NULL, *err2 = NULL, *warn = NULL;
    cs_key_t *key = NULL, *key2 = NULL;
    apr_status_t rv, rv2;

    fd = open(key_file, O_WRONLY | O_TRUNC | O_CREAT, 0600);
    FUZZ_CHECK(fd >= 0, "cannot write %s", key_file);
    FUZZ_CHECK(fchmod(fd, world ? 0644 : 0600) == 0, "fchmod");
    FUZZ_CHECK(write(fd, data, size) == (ssize_t)size, "short write");
    close(fd);

    rv = cs_key_load(p, apr_pstrcat(p, "file:", key_file, NULL), &key, &warn,
                     &err);
    if (size >= KEY_FILE_MAX) {
        FUZZ_CHECK(rv != APR_SUCCESS, "a %zu-byte key file was read", size);
        return;
    }
    while (n > 0 && c_isspace(data[n - 1]))
        n--;
    expect = apr_pstrmemdup(p, (const char *)data, n);
    while (c_isspace((unsigned char)expect[start]))
        start++;
    expect += start;
    rv2 = cs_key_parse(p, expect, &key2, &err2);
    FUZZ_CHECK(rv == rv2, "the key file gives %d, its trimmed content %d", rv,
               rv2);
    if (rv == APR_SUCCESS)
        FUZZ_CHECK(strcmp(key->secret, expect) == 0,
                   "the key file's key is not its trimmed content");
    else
        FUZZ_CHECK(strcmp(err, err2) == 0, "messages differ: %s / %s", err,
                   err2);
    FUZZ_CHECK(!warn == !world, "a %s key file %s a warning",
               world ? "world-readable" : "private", warn ? "gave" : "gave no");
}

/* env:NAME holding the input as a C string. The loader keeps a value it
 * took out of the environment in the root of its pool, for the next
 * reading of the configuration: a root pool of its own per input, so that
 * no input sees an earlier one's. */
static void check_key_env_in(apr_pool_t *p, const char *s);

static void check_key_env(apr_pool_t *parent, const char *s)
{
    apr_pool_t *p = NULL;
    (void)parent;
    FUZZ_CHECK(apr_pool_create_unmanaged_ex(&p, NULL, NULL) == APR_SUCCESS,
               "pool");
    check_key_env_in(p, s);
    apr_pool_destroy(p);
}

static void check_key_env_in(apr_pool_t *p, const char *s)
{
    const char *err = NULL, *err2 = NULL, *warn = "unset";
    cs_key_t *key = NULL, *key2 = NULL;
    apr_status_t rv, rv2;

    /* putenv over a buffer of ours: setenv would keep every value ever set */
    static char *envbuf;
    static size_t envcap;
    size_t need = strlen(ENV_NAME "=") + strlen(s) + 1;
    if (need > envcap) {
        char *nb = malloc(need * 2);
        FUZZ_CHECK(nb != NULL, "malloc");
        snprintf(nb, need, "%s=%s", ENV_NAME, s);
        FUZZ_CHECK(putenv(nb) == 0, "putenv");
        free(envbuf);
        envbuf = nb;
        envcap = need * 2;
    }
    else {
        snprintf(envbuf, need, "%s=%s", ENV_NAME, s);
        /* the loader takes the variable out of the environment: put the
         * buffer back */
        FUZZ_CHECK(putenv(envbuf) == 0, "putenv");
    }
    rv = cs_key_load(p, "env:" ENV_NAME, &key, &warn, &err);
    if (!*s) {
        FUZZ_CHECK(rv != APR_SUCCESS, "an empty variable gave a key");
        return;
    }
    rv2 = cs_key_parse(p, s, &key2, &err2);
    FUZZ_CHECK(rv == rv2, "env: gives %d, cs_key_parse %d", rv, rv2);
    FUZZ_CHECK(warn == NULL, "env: gave a warning");
    if (rv == APR_SUCCESS)
        FUZZ_CHECK(strcmp(key->secret, s) == 0, "env: key differs");
    else
        FUZZ_CHECK(strcmp(err, err2) == 0, "messages differ: %s / %s", err,
                   err2);
}

static size_t prefix_of(const char *s, cs_key_mode_e *mode)
{
    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++) {
        size_t n = strlen(prefixes[i].prefix);
        if (strncmp(s, prefixes[i].prefix, n) == 0) {
            *mode = prefixes[i].mode;
            return n;
        }
    }
    return 0;
}

/* The documented format, independently of lib/. */
static int well_formed(const char *s, size_t pre)
{
    size_t len = strlen(s);
    if (!pre || len - pre < 8 || len > 512)
        return 0;
    for (const char *c = s + pre; *c; c++)
        if (!apr_isalnum(*c) && *c != '_' && *c != '-')
            return 0;
    return 1;
}

/* Whether `secret` occurs in `text` outside the occurrences of `mask` (the
 * mask is checked on its own). */
static int occurs_outside(const char *text, const char *mask,
                          const char *secret)
{
    size_t slen = strlen(secret), mlen = strlen(mask);
    const char *seg = text;

    for (;;) {
        const char *m = mlen ? strstr(seg, mask) : NULL;
        size_t seglen = m ? (size_t)(m - seg) : strlen(seg);
        if (fuzz_memmem(seg, seglen, secret, slen))
            return 1;
        if (!m)
            return 0;
        seg = m + mlen;
    }
}

/* The same key with each letter and digit of its secret part replaced by
 * another of its class (rot13, digits + 5): the same prefix, length and
 * failure, but another secret. */
static char *twin_of(apr_pool_t *p, const char *s, size_t pre)
{
    char *t = apr_pstrdup(p, s);
    for (char *c = t + pre; *c; c++) {
        if (*c >= 'a' && *c <= 'z')
            *c = (char)('a' + (*c - 'a' + 13) % 26);
        else if (*c >= 'A' && *c <= 'Z')
            *c = (char)('A' + (*c - 'A' + 13) % 26);
        else if (*c >= '0' && *c <= '9')
            *c = (char)('0' + (*c - '0' + 5) % 10);
    }
    return t;
}

static void check_mask(const char *s, size_t pre, const char *mask)
{
    size_t len = strlen(s), secret_len = len - pre, mlen, tail;

    FUZZ_CHECK(mask != NULL, "NULL mask");
    mlen = strlen(mask);
    FUZZ_CHECK(mlen >= pre + 3 && strncmp(mask, s, pre) == 0 &&
                   memcmp(mask + pre, ELLIPSIS, 3) == 0,
               "mask is not prefix + ellipsis: %s", mask);
    tail = mlen - pre - 3;
    FUZZ_CHECK(tail <= 4, "mask shows %zu characters", tail);
    FUZZ_CHECK(tail <= secret_len &&
                   memcmp(mask + pre + 3, s + len - tail, tail) == 0,
               "mask tail is not the end of the key: %s", mask);
    FUZZ_CHECK(tail == 0 || secret_len - tail >= 8,
               "mask shows %zu of a %zu-character secret", tail, secret_len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    char *s = apr_pstrmemdup(p, (const char *)data, size);
    char *cut = apr_pstrdup(p, s); /* what a C string of the input is */
    cs_key_mode_e mode = CS_KEY_TEST;
    size_t pre = prefix_of(s, &mode), len = strlen(s);
    const char *secret = s + pre, *mask, *err = NULL, *err2 = NULL, *warn;
    cs_key_t *key = NULL, *key2 = NULL;
    apr_status_t rv, rv2;
    int leak_check = strlen(secret) >= 8;

    mask = cs_key_mask(p, s);
    check_mask(s, pre, mask);
    FUZZ_CHECK(strcmp(mask, cs_key_mask(p, cut)) == 0,
               "bytes after a NUL change the mask");
    if (leak_check)
        FUZZ_CHECK(!strstr(mask + pre, secret), "mask holds the secret");

    rv = cs_key_parse(p, s, &key, &err);
    FUZZ_CHECK((rv == APR_SUCCESS) == well_formed(s, pre),
               "cs_key_parse %s a key that is %s (length %zu)",
               rv == APR_SUCCESS ? "accepts" : "rejects",
               well_formed(s, pre) ? "well formed" : "malformed", len);
    if (rv == APR_SUCCESS) {
        FUZZ_CHECK(key && key->secret && strcmp(key->secret, s) == 0,
                   "parsed key does not hold the input");
        FUZZ_CHECK(key->masked && strcmp(key->masked, mask) == 0,
                   "parsed key's mask differs from cs_key_mask");
        FUZZ_CHECK(key->mode == mode, "mode %d for prefix mode %d",
                   (int)key->mode, (int)mode);
    }
    else {
        FUZZ_CHECK(err != NULL && *err, "failure without a message");
        /* A message may hold the secret only as words of its own text:
         * then the twin key's message holds it too. */
        if (leak_check && occurs_outside(err, mask, secret)) {
            char *twin = twin_of(p, s, pre);
            cs_key_t *tk = NULL;
            const char *terr = NULL;
            if (cs_key_parse(p, twin, &tk, &terr) == APR_SUCCESS || !terr ||
                !occurs_outside(terr, cs_key_mask(p, twin), secret))
                FUZZ_CHECK(0, "error message holds the secret: %s", err);
        }
    }

    /* embedded NUL: the C string is all that counts */
    rv2 = cs_key_parse(p, cut, &key2, &err2);
    FUZZ_CHECK(rv2 == rv, "bytes after a NUL change the result");
    if (rv != APR_SUCCESS)
        FUZZ_CHECK(strcmp(err, err2) == 0,
                   "bytes after a NUL change the message");

    check_key_file(p, data, size);
    check_key_env(p, s);

    /* a literal through cs_key_load (a literal file: or env: spec is not
     * tried: it would read this machine's files and environment) */
    if (*s && strncmp(s, "file:", 5) != 0 && strncmp(s, "env:", 4) != 0) {
        cs_key_t *key3 = NULL;
        const char *err3 = NULL;
        warn = "unset";
        rv2 = cs_key_load(p, s, &key3, &warn, &err3);
        FUZZ_CHECK(rv2 == rv, "cs_key_load and cs_key_parse disagree");
        FUZZ_CHECK(warn == NULL, "a literal key gave a warning");
        if (rv2 == APR_SUCCESS)
            FUZZ_CHECK(
                memcmp(key3->id_key, key->id_key, CS_SECRET_LEN) == 0 &&
                    memcmp(key3->seal_key, key->seal_key, CS_SECRET_LEN) == 0,
                "derived secrets are not deterministic");
    }

    fuzz_pool_destroy(p);
    return 0;
}
