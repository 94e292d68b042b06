/* Secrets given in the configuration as "file:/path", "env:NAME" or a
 * literal: the API key (CardScanAPIKey) and the cache server's password
 * (CardScanCacheAuth) take the same forms. */
#include "cardscan.h"

#include <apr_env.h>
#include <apr_file_io.h>
#include <apr_lib.h>
#include <apr_strings.h>
#include <openssl/crypto.h>
#include <string.h>

#define SECRET_FILE_MAX 4096

static apr_status_t read_secret_file(apr_pool_t *p, const char *path,
                                     const char *what, char **out,
                                     const char **warning, const char **err)
{
    apr_file_t *f;
    apr_finfo_t fi;
    apr_size_t n;
    char buf[SECRET_FILE_MAX + 1];
    apr_status_t rv;

    /* not opened at all when it is no regular file (a FIFO would block) */
    rv = apr_stat(&fi, path, APR_FINFO_TYPE, p);
    if (rv == APR_SUCCESS && fi.filetype != APR_REG) {
        *err =
            apr_psprintf(p, "the %s file %s is not a regular file", what, path);
        return APR_EINVAL;
    }
    rv = apr_file_open(&f, path, APR_FOPEN_READ, APR_FPROT_OS_DEFAULT, p);
    if (rv != APR_SUCCESS) {
        char msg[120];
        *err = apr_psprintf(p,
                            "cannot read the %s file %s: %s (it is read "
                            "once at start-up, as root)",
                            what, path, apr_strerror(rv, msg, sizeof(msg)));
        return rv;
    }
    /* the type and mode of the file that was opened: the path may have
     * been replaced since the stat above, or the stat may have failed */
    memset(&fi, 0, sizeof(fi));
    rv = apr_file_info_get(&fi, APR_FINFO_TYPE | APR_FINFO_PROT, f);
    if ((rv != APR_SUCCESS && rv != APR_INCOMPLETE) ||
        !(fi.valid & APR_FINFO_TYPE) || fi.filetype != APR_REG) {
        apr_file_close(f);
        *err =
            apr_psprintf(p, "the %s file %s is not a regular file", what, path);
        return APR_EINVAL;
    }
    rv = apr_file_read_full(f, buf, SECRET_FILE_MAX, &n);
    apr_file_close(f);
    if (rv != APR_SUCCESS && rv != APR_EOF) {
        *err = apr_psprintf(p, "cannot read the %s file %s", what, path);
        return rv;
    }
    if (n == SECRET_FILE_MAX) {
        *err = apr_psprintf(p, "the %s file %s is too large", what, path);
        return APR_EINVAL;
    }
    /* Tolerate the trailing newline editors add, and surrounding blanks. */
    while (n > 0 && apr_isspace(buf[n - 1]))
        n--;
    buf[n] = '\0';
    {
        const char *s = buf;
        while (apr_isspace(*s))
            s++;
        *out = apr_pstrdup(p, s);
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    if ((fi.valid & APR_FINFO_PROT) && (fi.protection & APR_WREAD))
        *warning = apr_psprintf(p,
                                "the %s file %s is readable by every "
                                "user of this machine: chmod 600 (or 640 "
                                "with group root) is enough for Apache",
                                what, path);
    return APR_SUCCESS;
}

/* Takes a variable out of the environment: children, piped loggers and
 * RewriteMap programs then inherit none of it. The value is kept in the
 * process's root pool (it outlives every configuration pool), keyed by
 * the name, so that the next reading of the configuration (a graceful
 * restart) finds it; a value set again replaces it. Not thread-safe, like
 * the environment: configuration time only. */
static char *env_take(apr_pool_t *p, const char *name)
{
    apr_pool_t *root = p, *parent;
    const char *tag = apr_pstrcat(p, "mod_cardscan env:", name, NULL);
    char *value = NULL;
    void *kept = NULL;

    while ((parent = apr_pool_parent_get(root)))
        root = parent;
    if (apr_env_get(&value, name, p) == APR_SUCCESS && value && *value) {
        apr_pool_userdata_get(&kept, tag, root);
        if (!kept || strcmp(kept, value) != 0) {
            kept = apr_pstrdup(root, value);
            apr_pool_userdata_set(kept, apr_pstrdup(root, tag),
                                  apr_pool_cleanup_null, root);
        }
        /* a copy: apr_env_get's value is the environment's own memory */
        value = apr_pstrdup(p, value);
        apr_env_delete(name, p);
        return value;
    }
    apr_pool_userdata_get(&kept, tag, root);
    return kept ? apr_pstrdup(p, kept) : NULL;
}

apr_status_t cs_secret_load(apr_pool_t *p, const char *spec, const char *what,
                            char **secret, const char **warning,
                            const char **err)
{
    *warning = NULL;
    if (strncmp(spec, "file:", 5) == 0)
        return read_secret_file(p, spec + 5, what, secret, warning, err);
    if (strncmp(spec, "env:", 4) == 0) {
        *secret = env_take(p, spec + 4);
        if (!*secret || !**secret) {
            *err = apr_psprintf(p,
                                "the environment variable %s holding the %s "
                                "is not set in Apache's environment (on "
                                "Debian: /etc/apache2/envvars)",
                                spec + 4, what);
            return APR_EINVAL;
        }
        return APR_SUCCESS;
    }
    *secret = (char *)spec;
    return APR_SUCCESS;
}
