/*
 * cardscan-mock: a stand-in for CardScan.ai's `GET /v1/access-token` API.
 *
 * mod_cardscan's integration tests, benchmark and demo cannot reach the real
 * API, so this server imitates it (including its failure modes) on 127.0.0.1
 * and offers control endpoints (/_mock/stats, /_mock/config, /_mock/reset)
 * so that tests can inject faults and see exactly what the module sent.
 * Usage: tests/mock/README.md.
 *
 * Design: one detached thread per connection (at most MAX_CONNS), blocking
 * sockets whose SO_RCVTIMEO is the keep-alive idle timeout, and all shared
 * state behind one mutex: simple, and still far from being the benchmark's
 * bottleneck.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#define MAX_CONNS 2048
#define MAX_HEADERS 100
#define REQ_BUF_SIZE (64 * 1024)
#define IDLE_TIMEOUT_SECS 30
#define MAX_BODY_BYTES (16L * 1024 * 1024)
#define MAX_LOGGED_REQUESTS 10000
#define MAX_LOGGED_USER_IDS 100000
#define HANG_MS 30000
#define MAX_SALTED_USERS 256
#define MAX_SALT_LEN 64
#define SIGNATURE_BYTES 256
#define OVERSIZED_SIGNATURE_BYTES                                              \
    (150 * 1024) /* 200 KiB once base64url-encoded */

/* Logs to stderr with --verbose only; stdout stays quiet. */
#define LOG(...)                                                               \
    do {                                                                       \
        if (opt.verbose) {                                                     \
            fputs("cardscan-mock: ", stderr);                                  \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
        }                                                                      \
    } while (0)

/* What an API call gets: a configurable fault or, past FAULT_COUNT, one of
 * the real API's replies to a bad request. */
enum fault {
    FAULT_NONE,
    FAULT_401,
    FAULT_403,
    FAULT_429,
    FAULT_500,
    FAULT_502,
    FAULT_503,
    FAULT_504,
    FAULT_HTML,
    FAULT_HTML500,
    FAULT_NOTJSON,
    FAULT_TRUNCATED,
    FAULT_OVERSIZED,
    FAULT_NOTOKEN,
    FAULT_NOTJWT,
    FAULT_BADPAYLOAD,
    FAULT_EXPIRED,
    FAULT_NOEXP,
    FAULT_NOIAT,
    FAULT_NONSTRING,
    FAULT_REDIRECT,
    FAULT_RESET,
    FAULT_CLOSE,
    FAULT_HANG,
    FAULT_COUNT,
    REPLY_BAD_KEY = FAULT_COUNT,
    REPLY_BAD_METHOD,
    REPLY_COUNT
};

#define HTML_PAGE                                                              \
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"       \
    "<body><h1>Something went wrong</h1><p>Please try again later.</p>"        \
    "</body></html>\n"

/* Per outcome: its name in /_mock/config, the HTTP status (0 = no reply at
 * all) and, where the reply is fixed, its body (HTML when it starts with '<').
 */
static const struct {
    const char *name;
    int status;
    const char *body;
} fault_info[REPLY_COUNT] = {
    [FAULT_NONE] = {"none", 200, NULL},
    [FAULT_401] =
        {"401", 401,
         "{\"message\": \"Unknown authorization error - please check your "
         "token format and try again\", \"type\": \"Unauthorized\", \"code\": "
         "401}"},
    [FAULT_403] = {"403", 403,
                   "{\"message\": \"Forbidden\", \"type\": \"Forbidden\", "
                   "\"code\": 403}"},
    [FAULT_429] = {"429", 429, "{\"message\": \"Too Many Requests\"}"},
    [FAULT_500] = {"500", 500, "{\"message\": \"Internal server error\"}"},
    [FAULT_502] = {"502", 502, "{\"message\": \"Bad Gateway\"}"},
    [FAULT_503] = {"503", 503, "{\"message\": \"Service Unavailable\"}"},
    [FAULT_504] = {"504", 504, "{\"message\": \"Endpoint request timed out\"}"},
    [FAULT_HTML] = {"html", 200, HTML_PAGE},
    [FAULT_HTML500] = {"html500", 500, HTML_PAGE},
    [FAULT_NOTJSON] = {"notjson", 200, "not json at all"},
    [FAULT_TRUNCATED] = {"truncated", 200, NULL},
    [FAULT_OVERSIZED] = {"oversized", 200, NULL},
    [FAULT_NOTOKEN] = {"notoken", 200, NULL},
    [FAULT_NOTJWT] = {"notjwt", 200, NULL},
    [FAULT_BADPAYLOAD] = {"badpayload", 200, NULL},
    [FAULT_EXPIRED] = {"expired", 200, NULL},
    [FAULT_NOEXP] = {"noexp", 200, NULL},
    [FAULT_NOIAT] = {"noiat", 200, NULL},
    [FAULT_NONSTRING] = {"nonstring", 200, NULL},
    [FAULT_REDIRECT] = {"redirect", 302, "{\"message\": \"Found\"}"},
    [FAULT_RESET] = {"reset", 0, NULL},
    [FAULT_CLOSE] = {"close", 0, NULL},
    [FAULT_HANG] = {"hang", 200, NULL},
    [REPLY_BAD_KEY] = {"none", 401,
                       "{\"message\": \"API Key is not registered\", "
                       "\"type\": \"Unauthorized\", \"code\": 401}"},
    [REPLY_BAD_METHOD] = {"none", 405, "{\"message\": \"Method Not Allowed\"}"},
};

static const char *const default_key_prefixes[] = {
    "sk_test_cardscan_ai_",
    "sk_live_cardscan_ai_",
    "secret_test_",
    "secret_live_",
};

struct config {
    enum fault fault;
    long fault_remaining; /* API calls the fault still applies to; -1 = until
                             changed */
    long latency_ms, lifetime, clock_skew, session_id, retry_after;
    char fault_user[256]; /* "": the fault applies to every user */
    long signature_bytes; /* of a token's signature part; 0 = the default */
    char identity_salt[MAX_SALT_LEN]; /* "": IdentityId = f(user_id) */
};

/* The numeric settings of /_mock/config, with their accepted ranges. */
static const struct {
    const char *name;
    size_t offset;
    long min, max;
} numeric_settings[] = {
    {"latency_ms", offsetof(struct config, latency_ms), 0, 3600000},
    {"lifetime", offsetof(struct config, lifetime), -1000000000, 1000000000},
    {"clock_skew", offsetof(struct config, clock_skew), -1000000000,
     1000000000},
    {"session_id", offsetof(struct config, session_id), 0, 1},
    {"retry_after", offsetof(struct config, retry_after), 0, 1000000000},
    {"signature_bytes", offsetof(struct config, signature_bytes), 0, 1000000},
};

/* A token the mock issued: its jti, the user it names, the IdentityId. */
struct issued {
    unsigned long jti;
    char *user_id, *identity;
};

/* Everything shared between threads, guarded by `lock`. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t
        wake; /* broadcast on shutdown and whenever a connection ends */
    bool stopping;
    struct config cfg;
    unsigned long
        epoch; /* bumped by reset, so that open connections count afresh */
    unsigned long calls, calls_ok, connections, tls_connections, next_jti,
        next_conn_id, over_cap;
    cJSON *user_ids, *requests;
    size_t n_user_ids, n_requests;
    /* every token issued: jti -> the user it names, in jti order */
    struct issued *issued;
    size_t n_issued, cap_issued;
    /* identity_salt of single users (identity_user=U) */
    struct {
        char user[256], salt[MAX_SALT_LEN];
    } salted[MAX_SALTED_USERS];
    int n_salted;
    int conn_fds[MAX_CONNS]; /* -1 = free; lets shutdown wake blocked readers */
    int active;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Command-line settings: set before any thread starts, read-only after. */
static struct {
    const char *port_file, *pid_file, *cert, *key;
    const char **api_keys;
    int n_api_keys;
    long http_port, https_port; /* https_port -1 = no TLS listener */
    long lifetime;
    bool verbose;
    SSL_CTX *ssl_ctx;
} opt = {.https_port = -1, .lifetime = 900};

struct conn {
    int fd, slot, local_port;
    SSL *ssl;
    bool tls_broken; /* after a TLS error, SSL_shutdown must not be called */
    unsigned long id, counted_epoch; /* counted_epoch 0 = not counted yet */
    size_t len;
    char buf[REQ_BUF_SIZE + 1];
};

struct request {
    char *method, *path,
        *query; /* all point into conn->buf; query may be NULL */
    struct {
        char *name, *value;
    } headers[MAX_HEADERS]; /* names lowercased */
    int n_headers;
    bool keep_alive;
};

enum action { ACT_KEEP, ACT_CLOSE, ACT_RESET };

/* ---------------------------------------------------------------- helpers */

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        abort(); /* a test mock has no better answer to OOM */
    return p;
}

static bool parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

/* Length of the valid UTF-8 sequence at p, or 0 if invalid (overlong,
 * surrogate...). */
static size_t utf8_seq_len(const unsigned char *p)
{
    static const uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
    size_t len;
    uint32_t cp;
    if (p[0] < 0x80)
        return 1;
    if ((p[0] & 0xE0) == 0xC0) {
        len = 2;
        cp = p[0] & 0x1F;
    }
    else if ((p[0] & 0xF0) == 0xE0) {
        len = 3;
        cp = p[0] & 0x0F;
    }
    else if ((p[0] & 0xF8) == 0xF0) {
        len = 4;
        cp = p[0] & 0x07;
    }
    else
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xC0) != 0x80) /* also stops at the NUL terminator */
            return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    return cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)
               ? 0
               : len;
}

/* cJSON copies bytes verbatim; replacing invalid UTF-8 with U+FFFD keeps the
 * stats and the token payload parseable JSON whatever a client sent. */
static cJSON *clean_string(const char *s)
{
    char *out = xmalloc(strlen(s) * 3 + 1), *o = out;
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        size_t n = utf8_seq_len(p);
        memcpy(o, n ? (const char *)p : "\xEF\xBF\xBD", n ? n : 3);
        o += n ? n : 3;
        p += n ? n : 1;
    }
    *o = '\0';
    cJSON *item = cJSON_CreateString(out);
    free(out);
    return item;
}

/* Form-style decoding: %XX, and '+' as space; a malformed % stays literal. */
static char *url_decode(const char *s, size_t n)
{
    char *out = xmalloc(n + 1), *o = out;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '+') {
            *o++ = ' ';
        }
        else if (s[i] == '%' && i + 2 < n &&
                 isxdigit((unsigned char)s[i + 1]) &&
                 isxdigit((unsigned char)s[i + 2])) {
            char hex[3] = {s[i + 1], s[i + 2], '\0'};
            *o++ = (char)strtol(hex, NULL, 16);
            i += 2;
        }
        else {
            *o++ = s[i];
        }
    }
    *o = '\0';
    return out;
}

/* Iterates over a raw query string: decodes the next key=value pair into
 * *key and *value (caller frees both) and advances *cursor. */
static bool next_param(const char **cursor, char **key, char **value)
{
    const char *seg = *cursor;
    while (seg && *seg == '&')
        seg++;
    if (!seg || !*seg)
        return false;
    size_t seg_len = strcspn(seg, "&");
    const char *eq = memchr(seg, '=', seg_len);
    size_t key_len = eq ? (size_t)(eq - seg) : seg_len;
    *key = url_decode(seg, key_len);
    *value = eq ? url_decode(eq + 1, seg_len - key_len - 1) : url_decode("", 0);
    *cursor = seg + seg_len;
    return true;
}

static const char *find_header(const struct request *req, const char *name)
{
    for (int i = 0; i < req->n_headers; i++)
        if (strcmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

static char *base64url(const unsigned char *data, size_t n)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = xmalloc((n + 2) / 3 * 4 + 1), *o = out;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < n)
            v |= data[i + 2];
        *o++ = alphabet[(v >> 18) & 63];
        *o++ = alphabet[(v >> 12) & 63];
        if (i + 1 < n)
            *o++ = alphabet[(v >> 6) & 63]; /* no '=' padding, as JWTs want */
        if (i + 2 < n)
            *o++ = alphabet[v & 63];
    }
    *o = '\0';
    return out;
}

/* Formats 16 bytes (random, or a hash when `version` is 5) as a UUID. */
static void format_uuid(unsigned char b[16], int version, char out[37])
{
    b[6] = (unsigned char)((b[6] & 0x0F) | (version << 4));
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    snprintf(
        out, 37,
        "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
        b[11], b[12], b[13], b[14], b[15]);
}

/* Real IdentityIds are stable per user, so derive one from SHA-256(user_id);
 * without a user_id Cognito would mint a fresh identity: random. */
static void make_ids(const char *user_id, const char *salt, char identity[48],
                     char session[37])
{
    unsigned char bytes[EVP_MAX_MD_SIZE], random[16];
    unsigned int digest_len = 0;
    char uuid[37];
    if (RAND_bytes(random, sizeof random) != 1)
        abort();
    format_uuid(random, 4, session);
    if (user_id && salt && salt[0]) {
        /* identity_salt: SHA-256(salt NUL user_id), another stable id */
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
            EVP_DigestUpdate(md, salt, strlen(salt) + 1) != 1 ||
            EVP_DigestUpdate(md, user_id, strlen(user_id)) != 1 ||
            EVP_DigestFinal_ex(md, bytes, &digest_len) != 1)
            abort();
        EVP_MD_CTX_free(md);
    }
    else if (user_id)
        EVP_Digest(user_id, strlen(user_id), bytes, &digest_len, EVP_sha256(),
                   NULL);
    else if (RAND_bytes(bytes, 16) != 1)
        abort();
    format_uuid(bytes, user_id ? 5 : 4, uuid);
    snprintf(identity, 48, "us-east-1:%s", uuid);
}

/* g.wake runs on CLOCK_MONOTONIC, so wall-clock jumps do not cut waits short.
 */
static struct timespec deadline_after(long ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    long long ns = t.tv_nsec + (ms % 1000) * 1000000LL;
    t.tv_sec += ms / 1000 + (time_t)(ns / 1000000000LL);
    t.tv_nsec = (long)(ns % 1000000000LL);
    return t;
}

/* Sleeps up to `ms`, returning early when the server shuts down. */
static void sleep_unless_stopping(long ms)
{
    struct timespec deadline = deadline_after(ms);
    pthread_mutex_lock(&g.lock);
    while (!g.stopping &&
           pthread_cond_timedwait(&g.wake, &g.lock, &deadline) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&g.lock);
}

/* ------------------------------------------------------------ connection I/O
 */

/* Returns bytes read, or 0 on EOF, error or idle timeout (all end the
 * connection). No EINTR handling: every thread blocks the signals we catch. */
static size_t conn_recv(struct conn *c, void *buf, size_t n)
{
    if (!c->ssl) {
        ssize_t r = recv(c->fd, buf, n, 0);
        return r > 0 ? (size_t)r : 0;
    }
    int r = SSL_read(c->ssl, buf, n > INT_MAX ? INT_MAX : (int)n);
    c->tls_broken |= r <= 0;
    return r > 0 ? (size_t)r : 0;
}

static bool conn_send_all(struct conn *c, const char *data, size_t n)
{
    while (n > 0) {
        ssize_t w =
            c->ssl ? SSL_write(c->ssl, data, n > INT_MAX ? INT_MAX : (int)n)
                   : send(c->fd, data, n, MSG_NOSIGNAL);
        if (w <= 0) {
            c->tls_broken = true;
            return false;
        }
        data += w;
        n -= (size_t)w;
    }
    return true;
}

static const char *reason_phrase(int status)
{
    static const struct {
        int status;
        const char *text;
    } reasons[] = {
        {200, "OK"},
        {302, "Found"},
        {400, "Bad Request"},
        {401, "Unauthorized"},
        {403, "Forbidden"},
        {404, "Not Found"},
        {405, "Method Not Allowed"},
        {413, "Payload Too Large"},
        {429, "Too Many Requests"},
        {431, "Request Header Fields Too Large"},
        {500, "Internal Server Error"},
        {501, "Not Implemented"},
        {502, "Bad Gateway"},
        {503, "Service Unavailable"},
        {504, "Gateway Timeout"},
    };
    for (size_t i = 0; i < sizeof reasons / sizeof *reasons; i++)
        if (reasons[i].status == status)
            return reasons[i].text;
    return "Unknown";
}

/* Sends a response in one write (one TLS record, no Nagle stall). The
 * Content-Length is always body_len, but only send_len bytes of the body go
 * out (fewer for `truncated`). `extra` holds "Name: value\r\n" lines or NULL.
 */
static void send_response(struct conn *c, int status, const char *content_type,
                          const char *extra, const char *body, size_t body_len,
                          size_t send_len, bool keep_alive)
{
    char date[64], head[1024];
    time_t now = time(NULL);
    struct tm tm;
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S GMT",
             gmtime_r(&now, &tm));
    int head_len = snprintf(
        head, sizeof head,
        "HTTP/1.1 %d %s\r\nServer: cardscan-mock\r\nDate: %s\r\n"
        "Content-Type: %s\r\nContent-Length: %zu\r\nConnection: %s\r\n%s\r\n",
        status, reason_phrase(status), date, content_type, body_len,
        keep_alive ? "keep-alive" : "close", extra ? extra : "");
    if (head_len < 0 || (size_t)head_len >= sizeof head)
        return;
    char *out = xmalloc((size_t)head_len + send_len);
    memcpy(out, head, (size_t)head_len);
    memcpy(out + head_len, body, send_len);
    conn_send_all(c, out, (size_t)head_len + send_len);
    free(out);
}

static void send_json(struct conn *c, int status, const char *extra,
                      const char *body, bool keep_alive)
{
    size_t n = strlen(body);
    send_response(c, status, "application/json", extra, body, n, n, keep_alive);
}

/* Reads one request into c->buf and parses it in place. Returns 1 with
 * *consumed set (bytes to drop from the buffer once it is handled), 0 if the
 * connection ended (EOF, error, idle timeout), or -STATUS to reject it. */
static int read_request(struct conn *c, struct request *req, size_t *consumed)
{
    char *end;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4))) {
        if (c->len == REQ_BUF_SIZE)
            return -431;
        size_t n = conn_recv(c, c->buf + c->len, REQ_BUF_SIZE - c->len);
        if (n == 0)
            return 0;
        c->len += n;
    }
    size_t head_len = (size_t)(end - c->buf) + 4;
    end[2] = '\0'; /* keep the last CRLF so that every line ends in "\r\n" */

    memset(req, 0, sizeof *req);
    char *line = c->buf, *eol = strstr(line, "\r\n"), *version;
    *eol = '\0';
    req->method = line;
    if (!(req->path = strchr(line, ' ')) ||
        !(version = strchr(req->path + 1, ' ')))
        return -400;
    *req->path++ = '\0';
    *version++ = '\0';
    if (strncmp(version, "HTTP/1.", 7) != 0 || req->path[0] != '/')
        return -400;
    if ((req->query = strchr(req->path, '?')))
        *req->query++ = '\0';

    for (line = eol + 2; *line; line = eol + 2) {
        eol = strstr(line, "\r\n");
        *eol = '\0';
        char *colon = strchr(line, ':'), *value, *tail;
        if (!colon || colon == line)
            return -400;
        if (req->n_headers == MAX_HEADERS)
            return -431;
        *colon = '\0';
        value = colon + 1 + strspn(colon + 1, " \t");
        for (tail = value + strlen(value);
             tail > value && (tail[-1] == ' ' || tail[-1] == '\t');)
            *--tail = '\0';
        for (char *p = line; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        req->headers[req->n_headers].name = line;
        req->headers[req->n_headers++].value = value;
    }

    const char *connection = find_header(req, "connection");
    if (strcmp(version, "HTTP/1.0") == 0)
        req->keep_alive = connection && strcasestr(connection, "keep-alive");
    else
        req->keep_alive = !(connection && strcasestr(connection, "close"));

    if (find_header(req, "transfer-encoding"))
        return -501; /* this API's clients send no bodies: chunked is not worth
                        parsing */
    const char *cl = find_header(req, "content-length");
    long body_len = 0;
    if (cl && !parse_long(cl, 0, MAX_BODY_BYTES, &body_len))
        return cl[strspn(cl, "0123456789")] ? -400 : -413;

    /* Discard the body; bytes after it (a pipelined request) stay buffered. */
    size_t buffered = c->len - head_len;
    *consumed =
        head_len + ((size_t)body_len < buffered ? (size_t)body_len : buffered);
    for (size_t remaining =
             (size_t)body_len > buffered ? (size_t)body_len - buffered : 0;
         remaining > 0;) {
        char scratch[8192];
        size_t n =
            conn_recv(c, scratch,
                      remaining < sizeof scratch ? remaining : sizeof scratch);
        if (n == 0)
            return 0;
        remaining -= n;
    }
    return 1;
}

/* ----------------------------------------------------------------- the API */

enum { JWT_NO_IAT = 1, JWT_NO_EXP = 2, JWT_BAD_PAYLOAD = 4 };

/* A JWT shaped like Cognito's (RS256), signed with random bytes: the module
 * must read its claims, never verify it. */
static char *make_jwt(const char *sub, long iat, long exp, unsigned flags,
                      unsigned long jti, size_t sig_len)
{
    static const char header[] =
        "{\"alg\":\"RS256\",\"kid\":\"mock-1\",\"typ\":\"JWT\"}";
    char *payload, jti_text[32];
    if (flags & JWT_BAD_PAYLOAD) {
        payload =
            strdup("this is not json {"); /* valid base64url, but not JSON */
    }
    else {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddItemToObject(p, "sub", clean_string(sub ? sub : "anonymous"));
        cJSON_AddStringToObject(p, "iss",
                                "https://cognito-identity.amazonaws.com");
        cJSON_AddStringToObject(p, "aud", "mock-cardscan");
        cJSON_AddItemToArray(cJSON_AddArrayToObject(p, "amr"),
                             cJSON_CreateString("authenticated"));
        if (!(flags & JWT_NO_IAT))
            cJSON_AddNumberToObject(p, "iat", (double)iat);
        if (!(flags & JWT_NO_EXP))
            cJSON_AddNumberToObject(p, "exp", (double)exp);
        snprintf(jti_text, sizeof jti_text, "%lu", jti);
        cJSON_AddStringToObject(p, "jti", jti_text);
        payload =
            cJSON_PrintUnformatted(p); /* cJSON's default hooks use malloc */
        cJSON_Delete(p);
    }
    unsigned char *sig = xmalloc(sig_len);
    if (!payload || RAND_bytes(sig, (int)sig_len) != 1)
        abort();
    char *h64 = base64url((const unsigned char *)header, strlen(header));
    char *p64 = base64url((const unsigned char *)payload, strlen(payload));
    char *s64 = base64url(sig, sig_len), *jwt;
    if (asprintf(&jwt, "%s.%s.%s", h64, p64, s64) < 0)
        abort();
    free(h64);
    free(p64);
    free(s64);
    free(sig);
    free(payload);
    return jwt;
}

static bool authorized(const struct request *req)
{
    const char *auth = find_header(req, "authorization");
    if (!auth || strncasecmp(auth, "Bearer ", 7) != 0)
        return false;
    const char *key = auth + 7;
    for (int i = 0; i < opt.n_api_keys; i++)
        if (strcmp(key, opt.api_keys[i]) == 0)
            return true;
    for (size_t i = 0; opt.n_api_keys == 0 &&
                       i < sizeof default_key_prefixes / sizeof(char *);
         i++) {
        size_t n = strlen(default_key_prefixes[i]);
        if (strncmp(key, default_key_prefixes[i], n) == 0 && key[n] != '\0')
            return true;
    }
    return false;
}

static cJSON *headers_object(const struct request *req)
{
    cJSON *obj = cJSON_CreateObject();
    for (int i = 0; i < req->n_headers; i++) {
        const char *name = req->headers[i].name, *value = req->headers[i].value;
        cJSON *prev = cJSON_GetObjectItemCaseSensitive(obj, name);
        if (!prev) {
            cJSON_AddItemToObject(obj, name, clean_string(value));
            continue;
        }
        /* A repeated header is joined, as a proxy would, so that none is
         * hidden. */
        char *joined;
        if (asprintf(&joined, "%s, %s", prev->valuestring, value) < 0)
            abort();
        cJSON_ReplaceItemInObjectCaseSensitive(obj, name, clean_string(joined));
        free(joined);
    }
    return obj;
}

/* Appends to a capped log array, dropping the oldest entry when full. */
static void log_append(cJSON *array, size_t *count, size_t cap, cJSON *item)
{
    cJSON_AddItemToArray(array, item);
    if (++*count > cap) {
        cJSON_DeleteItemFromArray(array, 0);
        --*count;
    }
}

/* The 200 reply with a token, bent the way `fault` asks. */
static enum action send_token(struct conn *c, enum fault fault,
                              const struct config *cfg, const char *user_id,
                              unsigned long jti, const char *identity,
                              const char *session, bool alive)
{
    long now = (long)time(NULL), iat = now + cfg->clock_skew,
         exp = iat + cfg->lifetime;
    unsigned flags = fault == FAULT_NOEXP        ? JWT_NO_EXP
                     : fault == FAULT_NOIAT      ? JWT_NO_IAT
                     : fault == FAULT_BADPAYLOAD ? JWT_BAD_PAYLOAD
                                                 : 0;
    if (fault == FAULT_EXPIRED) {
        iat = now - 1000;
        exp = now - 100;
    }
    char *jwt = make_jwt(user_id, iat, exp, flags, jti,
                         fault == FAULT_OVERSIZED ? OVERSIZED_SIGNATURE_BYTES
                         : cfg->signature_bytes   ? (size_t)cfg->signature_bytes
                                                  : SIGNATURE_BYTES);
    cJSON *body = cJSON_CreateObject();
    if (fault != FAULT_NOTOKEN)
        cJSON_AddStringToObject(body, "Token",
                                fault == FAULT_NOTJWT ? "not-a-jwt" : jwt);
    if (fault == FAULT_NONSTRING)
        cJSON_AddNumberToObject(body, "IdentityId", 123456789);
    else
        cJSON_AddStringToObject(body, "IdentityId", identity);
    if (cfg->session_id)
        cJSON_AddStringToObject(body, "session_id", session);
    char *text = cJSON_PrintUnformatted(body);
    size_t len = strlen(text);
    /* `truncated` promises the whole body, sends half of it, then hangs up. */
    bool truncate = fault == FAULT_TRUNCATED;
    send_response(c, 200, "application/json", NULL, text, len,
                  truncate ? len / 2 : len, alive && !truncate);
    free(text);
    cJSON_Delete(body);
    free(jwt);
    return alive && !truncate ? ACT_KEEP : ACT_CLOSE;
}

static enum action handle_api(struct conn *c, const struct request *req)
{
    cJSON *user_ids = cJSON_CreateArray();
    const char *user_id =
        NULL; /* the first user_id names the token's subject */
    char *key, *value;
    for (const char *cursor = req->query; next_param(&cursor, &key, &value);) {
        if (strcmp(key, "user_id") == 0) {
            cJSON *item = clean_string(value);
            cJSON_AddItemToArray(user_ids, item);
            user_id = user_id ? user_id : item->valuestring;
        }
        free(key);
        free(value);
    }
    bool auth_ok = authorized(req), is_get = strcmp(req->method, "GET") == 0;
    bool tls = c->ssl != NULL;

    /* Decide the outcome and record the call on arrival, so that a test
     * reading the stats while a slow reply is pending already sees it.
     * Faults take precedence over authentication (an outage hides it). */
    pthread_mutex_lock(&g.lock);
    const struct config cfg = g.cfg;
    enum fault fault = is_get ? g.cfg.fault : FAULT_NONE;
    if (g.cfg.fault_user[0] &&
        (!user_id || strcmp(user_id, g.cfg.fault_user) != 0))
        fault = FAULT_NONE; /* another user's calls are served normally */
    if (fault != FAULT_NONE && g.cfg.fault_remaining > 0 &&
        --g.cfg.fault_remaining == 0)
        g.cfg.fault = FAULT_NONE;
    enum fault outcome = !is_get               ? REPLY_BAD_METHOD
                         : fault != FAULT_NONE ? fault
                         : auth_ok             ? FAULT_NONE
                                               : REPLY_BAD_KEY;
    int status = fault_info[outcome].status;
    g.calls++;
    g.calls_ok += outcome == FAULT_NONE || outcome == FAULT_HANG;
    if (c->counted_epoch !=
        g.epoch) { /* a connection counts once it serves an API call */
        c->counted_epoch = g.epoch;
        *(tls ? &g.tls_connections : &g.connections) += 1;
    }
    unsigned long jti = ++g.next_jti;
    const char *salt = cfg.identity_salt;
    for (int i = 0; user_id && i < g.n_salted; i++)
        if (strcmp(g.salted[i].user, user_id) == 0)
            salt = g.salted[i].salt;
    char identity[48], session[37];
    make_ids(user_id, salt, identity, session);
    if (is_get && status == 200 && !fault_info[outcome].body) {
        /* a reply that carries a token: remember whose it is */
        if (g.n_issued == g.cap_issued) {
            g.cap_issued = g.cap_issued ? 2 * g.cap_issued : 4096;
            g.issued = realloc(g.issued, g.cap_issued * sizeof *g.issued);
            if (!g.issued)
                abort();
        }
        g.issued[g.n_issued++] =
            (struct issued){.jti = jti,
                            .user_id = strdup(user_id ? user_id : "anonymous"),
                            .identity = strdup(identity)};
    }
    for (cJSON *u = user_ids->child; u; u = u->next)
        log_append(g.user_ids, &g.n_user_ids, MAX_LOGGED_USER_IDS,
                   cJSON_CreateString(u->valuestring));
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddItemToObject(entry, "user_ids", cJSON_Duplicate(user_ids, true));
    cJSON_AddItemToObject(entry, "raw_query",
                          clean_string(req->query ? req->query : ""));
    cJSON_AddBoolToObject(entry, "auth_ok", auth_ok);
    cJSON_AddBoolToObject(entry, "tls", tls);
    cJSON_AddNumberToObject(entry, "status", status);
    cJSON_AddItemToObject(entry, "headers", headers_object(req));
    cJSON_AddItemToObject(entry, "method", clean_string(req->method));
    cJSON_AddItemToObject(entry, "path", clean_string(req->path));
    cJSON_AddStringToObject(entry, "fault", fault_info[fault].name);
    cJSON_AddNumberToObject(entry, "conn_id", (double)c->id);
    log_append(g.requests, &g.n_requests, MAX_LOGGED_REQUESTS, entry);
    pthread_mutex_unlock(&g.lock);

    LOG("%s %s %s?%s conn=%lu fault=%s -> %d", tls ? "https" : "http",
        req->method, req->path, req->query ? req->query : "", c->id,
        fault_info[fault].name, status);
    if (cfg.latency_ms > 0)
        sleep_unless_stopping(cfg.latency_ms);
    if (fault == FAULT_HANG)
        sleep_unless_stopping(HANG_MS);

    enum action act = req->keep_alive ? ACT_KEEP : ACT_CLOSE;
    const char *fixed_body = fault_info[outcome].body;
    char extra[256] = "";
    if (status == 429 || status == 503)
        snprintf(extra, sizeof extra, "Retry-After: %ld\r\n", cfg.retry_after);
    if (outcome == FAULT_REDIRECT)
        snprintf(extra, sizeof extra,
                 "Location: "
                 "%s://127.0.0.1:%d/v1/access-token?user_id=redirected\r\n",
                 tls ? "https" : "http", c->local_port);
    if (outcome == FAULT_RESET)
        act = ACT_RESET;
    else if (outcome == FAULT_CLOSE)
        act = ACT_CLOSE;
    else if (fixed_body)
        send_response(c, status,
                      fixed_body[0] == '<' ? "text/html; charset=utf-8"
                                           : "application/json",
                      extra, fixed_body, strlen(fixed_body), strlen(fixed_body),
                      act == ACT_KEEP);
    else
        act = send_token(c, fault, &cfg, user_id, jti, identity, session,
                         act == ACT_KEEP);
    cJSON_Delete(user_ids);
    return act;
}

/* -------------------------------------------------------- control endpoints */

/* GET /_mock/issued?from=JTI: the tokens issued from that jti on, as
 * [jti, user_id, IdentityId] (at most 100000 per reply; "next" says where
 * to go on). */
static void handle_issued(struct conn *c, const struct request *req, bool alive)
{
    long from = 0;
    char *k, *v;
    for (const char *cursor = req->query; next_param(&cursor, &k, &v);) {
        if (strcmp(k, "from") == 0)
            parse_long(v, 0, LONG_MAX, &from);
        free(k);
        free(v);
    }
    pthread_mutex_lock(&g.lock);
    size_t lo = 0, hi = g.n_issued; /* first entry with jti >= from */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (g.issued[mid].jti < (unsigned long)from)
            lo = mid + 1;
        else
            hi = mid;
    }
    cJSON *root = cJSON_CreateObject(), *list = cJSON_CreateArray();
    unsigned long next = (unsigned long)from;
    for (size_t i = lo, n = 0; i < g.n_issued && n < 100000; i++, n++) {
        cJSON *row = cJSON_CreateArray();
        cJSON_AddItemToArray(row, cJSON_CreateNumber((double)g.issued[i].jti));
        cJSON_AddItemToArray(row, clean_string(g.issued[i].user_id));
        cJSON_AddItemToArray(row, cJSON_CreateString(g.issued[i].identity));
        cJSON_AddItemToArray(list, row);
        next = g.issued[i].jti + 1;
    }
    pthread_mutex_unlock(&g.lock);
    cJSON_AddNumberToObject(root, "next", (double)next);
    cJSON_AddItemToObject(root, "issued", list);
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    send_json(c, 200, NULL, text, alive);
    free(text);
}

static void handle_stats(struct conn *c, const struct request *req, bool alive)
{
    bool brief = req->query && strstr(req->query, "brief=1");
    pthread_mutex_lock(&g.lock);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "calls", (double)g.calls);
    cJSON_AddNumberToObject(root, "connections", (double)g.connections);
    cJSON_AddNumberToObject(root, "tls_connections", (double)g.tls_connections);
    cJSON_AddNumberToObject(root, "calls_ok", (double)g.calls_ok);
    cJSON_AddNumberToObject(root, "issued", (double)g.n_issued);
    cJSON_AddNumberToObject(root, "over_cap", (double)g.over_cap);
    /* References: no copy of up to 10000 logged requests on every read. */
    if (!brief) {
        cJSON_AddItemReferenceToObject(root, "user_ids", g.user_ids);
        cJSON_AddItemReferenceToObject(root, "requests", g.requests);
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    pthread_mutex_unlock(&g.lock);
    send_json(c, 200, NULL, text, alive);
    free(text);
}

static void reset_state_locked(void)
{
    cJSON_Delete(g.user_ids);
    cJSON_Delete(g.requests);
    g.user_ids = cJSON_CreateArray();
    g.requests = cJSON_CreateArray();
    g.n_user_ids = g.n_requests = 0;
    for (size_t i = 0; i < g.n_issued; i++) {
        free(g.issued[i].user_id);
        free(g.issued[i].identity);
    }
    g.n_issued = 0;
    g.n_salted = 0;
    g.calls = g.calls_ok = g.connections = g.tls_connections = g.over_cap = 0;
    g.epoch++;
    g.cfg = (struct config){.fault = FAULT_NONE,
                            .fault_remaining = -1,
                            .lifetime = opt.lifetime,
                            .session_id = 1,
                            .retry_after = 7};
}

/* Applies every k=v of /_mock/config, or none of them if one is invalid. */
static void handle_config(struct conn *c, const struct request *req, bool alive)
{
    char error[256] = "", *k, *v;
    pthread_mutex_lock(&g.lock);
    struct config next = g.cfg;
    bool fault_set = false, salt_set = false;
    long count = -1;
    char salt[MAX_SALT_LEN] = "", salt_user[256] = "";
    for (const char *cursor = req->query;
         !error[0] && next_param(&cursor, &k, &v);) {
        bool known = true, valid = true;
        if (strcmp(k, "fault") == 0) {
            int f = 0;
            while (f < FAULT_COUNT && strcmp(v, fault_info[f].name) != 0)
                f++;
            valid = f < FAULT_COUNT;
            next.fault = (enum fault)f;
            fault_set = true;
        }
        else if (strcmp(k, "fault_count") == 0) {
            valid = parse_long(v, 0, LONG_MAX, &count);
        }
        else if (strcmp(k, "identity_salt") == 0) {
            valid = strlen(v) < sizeof next.identity_salt;
            if (valid)
                snprintf(salt, sizeof salt, "%s", v);
            salt_set = valid;
        }
        else if (strcmp(k, "identity_user") == 0) {
            valid = strlen(v) < sizeof g.salted[0].user && v[0];
            if (valid)
                snprintf(salt_user, sizeof salt_user, "%s", v);
        }
        else if (strcmp(k, "fault_user") == 0) {
            valid = strlen(v) < sizeof next.fault_user;
            if (valid)
                strcpy(next.fault_user, v);
        }
        else {
            known = false;
            for (size_t i = 0;
                 i < sizeof numeric_settings / sizeof *numeric_settings; i++) {
                if (strcmp(k, numeric_settings[i].name) == 0) {
                    known = true;
                    valid = parse_long(
                        v, numeric_settings[i].min, numeric_settings[i].max,
                        (long *)((char *)&next + numeric_settings[i].offset));
                }
            }
        }
        if (!known)
            snprintf(error, sizeof error, "unknown setting '%.100s'", k);
        else if (!valid)
            snprintf(error, sizeof error, "invalid value for %.50s: '%.100s'",
                     k, v);
        free(k);
        free(v);
    }
    if (!error[0] && salt_user[0] && !salt_set)
        snprintf(error, sizeof error, "identity_user needs identity_salt");
    if (!error[0] && salt_set && salt_user[0]) {
        int i = 0;
        while (i < g.n_salted && strcmp(g.salted[i].user, salt_user) != 0)
            i++;
        if (i == MAX_SALTED_USERS)
            snprintf(error, sizeof error, "too many identity_user values");
        else {
            if (i == g.n_salted)
                g.n_salted++;
            snprintf(g.salted[i].user, sizeof g.salted[i].user, "%s",
                     salt_user);
            snprintf(g.salted[i].salt, sizeof g.salted[i].salt, "%s", salt);
        }
    }
    else if (!error[0] && salt_set)
        snprintf(next.identity_salt, sizeof next.identity_salt, "%s", salt);
    if (!error[0]) {
        if (count >= 0)
            next.fault_remaining = count;
        else if (fault_set)
            next.fault_remaining = -1; /* a new fault lasts until changed */
        if (next.fault_remaining == 0)
            next.fault = FAULT_NONE;
        g.cfg = next;
    }
    pthread_mutex_unlock(&g.lock);
    if (!error[0]) {
        send_json(c, 200, NULL, "{\"ok\": true}", alive);
        return;
    }
    cJSON *body = cJSON_CreateObject();
    cJSON_AddBoolToObject(body, "ok", false);
    cJSON_AddItemToObject(body, "error", clean_string(error));
    char *text = cJSON_PrintUnformatted(body);
    send_json(c, 400, NULL, text, alive);
    free(text);
    cJSON_Delete(body);
}

/* ------------------------------------------------------ connection threads */

static void release_conn(struct conn *c)
{
    SSL_free(c->ssl);
    pthread_mutex_lock(&g.lock);
    close(c->fd); /* under the lock, so that shutdown never hits a reused fd */
    g.conn_fds[c->slot] = -1;
    g.active--;
    pthread_cond_broadcast(&g.wake);
    pthread_mutex_unlock(&g.lock);
    free(c);
}

static void *connection_thread(void *arg)
{
    struct conn *c = arg;
    enum action act = ACT_CLOSE;
    c->tls_broken = c->ssl && SSL_accept(c->ssl) != 1;
    while (!c->tls_broken) {
        struct request req;
        size_t consumed = 0;
        int r = read_request(c, &req, &consumed);
        if (r < 0) {
            char body[64];
            snprintf(body, sizeof body, "{\"message\": \"%s\"}",
                     reason_phrase(-r));
            send_json(c, -r, NULL, body, false);
        }
        if (r <= 0)
            break;
        act = req.keep_alive ? ACT_KEEP : ACT_CLOSE;
        size_t path_len = strlen(req.path);
        if (strcmp(req.path, "/_mock/stats") == 0) {
            handle_stats(c, &req, req.keep_alive);
        }
        else if (strcmp(req.path, "/_mock/issued") == 0) {
            handle_issued(c, &req, req.keep_alive);
        }
        else if (strcmp(req.path, "/_mock/config") == 0) {
            handle_config(c, &req, req.keep_alive);
        }
        else if (strcmp(req.path, "/_mock/reset") == 0) {
            pthread_mutex_lock(&g.lock);
            reset_state_locked();
            pthread_mutex_unlock(&g.lock);
            send_json(c, 200, NULL, "{\"ok\": true}", req.keep_alive);
        }
        else if (path_len >= 13 &&
                 strcmp(req.path + path_len - 13, "/access-token") == 0) {
            act = handle_api(c, &req);
        }
        else {
            send_json(c, 404, NULL, "{\"message\": \"Not Found\"}",
                      req.keep_alive);
        }
        if (act != ACT_KEEP)
            break;
        memmove(c->buf, c->buf + consumed, c->len - consumed);
        c->len -= consumed;
    }
    if (act == ACT_RESET) {
        /* SO_LINGER 0 makes close() send an RST instead of a FIN. */
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    else if (c->ssl && !c->tls_broken) {
        SSL_shutdown(c->ssl); /* close_notify: the client sees a clean EOF */
    }
    release_conn(c);
    return NULL;
}

static void accept_connection(int listen_fd, bool tls, int local_port)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    pthread_mutex_lock(&g.lock);
    int slot = 0;
    while (slot < MAX_CONNS && g.conn_fds[slot] >= 0)
        slot++;
    if (slot == MAX_CONNS || g.stopping) {
        g.over_cap += slot == MAX_CONNS;
        pthread_mutex_unlock(&g.lock);
        close(fd); /* over the cap: accepted, then closed at once */
        return;
    }
    g.conn_fds[slot] = fd;
    g.active++;
    unsigned long id = ++g.next_conn_id;
    pthread_mutex_unlock(&g.lock);

    struct conn *c = xmalloc(sizeof *c);
    *c = (struct conn){
        .fd = fd, .slot = slot, .local_port = local_port, .id = id};
    int one = 1;
    struct timeval timeout = {.tv_sec = IDLE_TIMEOUT_SECS};
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (tls &&
        (!(c->ssl = SSL_new(opt.ssl_ctx)) || SSL_set_fd(c->ssl, fd) != 1)) {
        release_conn(c);
        return;
    }
    pthread_attr_t attr;
    pthread_t thread;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 512 * 1024);
    if (pthread_create(&thread, &attr, connection_thread, c) != 0)
        release_conn(c);
    pthread_attr_destroy(&attr);
}

/* ------------------------------------------------------------------ startup */

static int listen_loopback(long port, int *bound_port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0),
        one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(fd, 1024) < 0 ||
        getsockname(fd, (struct sockaddr *)&addr, &len) < 0) {
        fprintf(stderr, "cardscan-mock: cannot listen on 127.0.0.1:%ld: %s\n",
                port, strerror(errno));
        close(fd);
        return -1;
    }
    *bound_port = ntohs(addr.sin_port);
    return fd;
}

/* Writes PATH.tmp.PID, then renames it: readers never see a partial file. */
static bool write_file_atomically(const char *path, const char *content)
{
    char tmp[PATH_MAX];
    FILE *f;
    bool ok = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) <
                  (int)sizeof tmp &&
              (f = fopen(tmp, "w")) != NULL;
    if (ok) {
        ok = fputs(content, f) >= 0;
        ok = fclose(f) == 0 && ok && rename(tmp, path) == 0;
        if (!ok)
            unlink(tmp);
    }
    if (!ok)
        fprintf(stderr, "cardscan-mock: cannot write %s\n", path);
    return ok;
}

static SSL_CTX *create_tls_context(void)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx && SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) == 1 &&
        SSL_CTX_use_certificate_chain_file(ctx, opt.cert) == 1 &&
        SSL_CTX_use_PrivateKey_file(ctx, opt.key, SSL_FILETYPE_PEM) == 1 &&
        SSL_CTX_check_private_key(ctx) == 1)
        return ctx;
    fprintf(stderr, "cardscan-mock: cannot load the TLS certificate or key:\n");
    ERR_print_errors_fp(stderr);
    SSL_CTX_free(ctx);
    return NULL;
}

static void usage(FILE *out)
{
    fputs(
        "Usage: cardscan-mock --port-file FILE [--http-port N]\n"
        "           [--https-port N --cert PEM --key PEM] [--api-key KEY ...]\n"
        "           [--lifetime SECS] [--pid-file FILE] [--verbose]\n"
        "Mock of CardScan.ai's GET /v1/access-token API, on 127.0.0.1 only.\n"
        "  --port-file FILE  written (atomically) once listening: http=PORT, "
        "https=PORT\n"
        "  --http-port N     HTTP port (default 0: kernel-assigned)\n"
        "  --https-port N    also serve TLS on port N (0: kernel-assigned)\n"
        "  --cert/--key PEM  TLS certificate chain and private key\n"
        "  --api-key KEY     accepted key (repeatable); default: any key "
        "starting with\n"
        "                    sk_test_cardscan_ai_, sk_live_cardscan_ai_, "
        "secret_test_, secret_live_\n"
        "  --lifetime SECS   token lifetime, exp - iat (default 900)\n"
        "  --pid-file FILE   write the process id there\n"
        "  --verbose         log each API call to stderr\n"
        "Control: GET /_mock/stats, /_mock/issued?from=JTI, "
        "/_mock/config?k=v&...,\n         /_mock/reset (see "
        "README.md)\n",
        out);
}

static void parse_args(int argc, char **argv)
{
    static const struct option options[] = {
        {"port-file", required_argument, 0, 'f'},
        {"http-port", required_argument, 0, 'p'},
        {"https-port", required_argument, 0, 's'},
        {"cert", required_argument, 0, 'c'},
        {"key", required_argument, 0, 'k'},
        {"api-key", required_argument, 0, 'a'},
        {"lifetime", required_argument, 0, 'l'},
        {"pid-file", required_argument, 0, 'P'},
        {"verbose", no_argument, 0, 'v'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    static const char *api_keys[256];
    opt.api_keys = api_keys;
    bool ok = true;
    for (int ch; (ch = getopt_long(argc, argv, "", options, NULL)) != -1;) {
        switch (ch) {
        case 'f':
            opt.port_file = optarg;
            break;
        case 'p':
            ok = ok && parse_long(optarg, 0, 65535, &opt.http_port);
            break;
        case 's':
            ok = ok && parse_long(optarg, 0, 65535, &opt.https_port);
            break;
        case 'c':
            opt.cert = optarg;
            break;
        case 'k':
            opt.key = optarg;
            break;
        case 'a':
            ok = ok && opt.n_api_keys < 256;
            if (ok)
                api_keys[opt.n_api_keys++] = optarg;
            break;
        case 'l':
            ok = ok &&
                 parse_long(optarg, -1000000000, 1000000000, &opt.lifetime);
            break;
        case 'P':
            opt.pid_file = optarg;
            break;
        case 'v':
            opt.verbose = true;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            ok = false;
            break;
        }
    }
    if (!ok || optind < argc || !opt.port_file ||
        (opt.https_port >= 0 && (!opt.cert || !opt.key))) {
        fputs("cardscan-mock: invalid arguments (--port-file is required; "
              "--https-port needs --cert and --key)\n",
              stderr);
        usage(stderr);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    /* SIGTERM/SIGINT are blocked in every thread (workers inherit the mask)
     * and read from a signalfd in the accept loop: no async handler at all. */
    sigset_t term_signals;
    sigemptyset(&term_signals);
    sigaddset(&term_signals, SIGTERM);
    sigaddset(&term_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &term_signals, NULL);
    signal(SIGPIPE,
           SIG_IGN); /* a client hanging up mid-reply must not kill us */
    pthread_condattr_t cond_attr;
    pthread_condattr_init(&cond_attr);
    pthread_condattr_setclock(&cond_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&g.wake, &cond_attr);
    pthread_condattr_destroy(&cond_attr);
    for (int i = 0; i < MAX_CONNS; i++)
        g.conn_fds[i] = -1;
    reset_state_locked(); /* no other thread exists yet */

    int http_port = 0, https_port = 0, https_fd = -1, status = 1;
    int signal_fd = signalfd(-1, &term_signals, SFD_CLOEXEC);
    int http_fd = listen_loopback(opt.http_port, &http_port);
    char text[64];
    if (signal_fd < 0 || http_fd < 0)
        goto cleanup;
    if (opt.https_port >= 0 &&
        (!(opt.ssl_ctx = create_tls_context()) ||
         (https_fd = listen_loopback(opt.https_port, &https_port)) < 0))
        goto cleanup;
    snprintf(text, sizeof text, "%ld\n", (long)getpid());
    if (opt.pid_file && !write_file_atomically(opt.pid_file, text))
        goto cleanup;
    snprintf(text, sizeof text,
             https_fd >= 0 ? "http=%d\nhttps=%d\n" : "http=%d\n", http_port,
             https_port);
    if (!write_file_atomically(opt.port_file,
                               text)) /* the readiness signal: write it last */
        goto cleanup;
    LOG("listening: http=%d https=%d", http_port,
        https_fd >= 0 ? https_port : -1);

    struct pollfd fds[3] = {
        {.fd = signal_fd, .events = POLLIN},
        {.fd = http_fd, .events = POLLIN},
        {.fd = https_fd, .events = POLLIN}}; /* fd -1 is ignored */
    while (poll(fds, 3, -1) >= 0 && !fds[0].revents) {
        if (fds[1].revents & POLLIN)
            accept_connection(http_fd, false, http_port);
        if (fds[2].revents & POLLIN)
            accept_connection(https_fd, true, https_port);
    }
    status = 0;
    LOG("shutting down");

cleanup:
    if (http_fd >= 0)
        close(http_fd);
    if (https_fd >= 0)
        close(https_fd);
    /* Wake every worker (blocked reads fail after shutdown(), sleeps see
     * `stopping`) and give them a moment to finish before freeing state. */
    pthread_mutex_lock(&g.lock);
    g.stopping = true;
    for (int i = 0; i < MAX_CONNS; i++)
        if (g.conn_fds[i] >= 0)
            shutdown(g.conn_fds[i], SHUT_RDWR);
    pthread_cond_broadcast(&g.wake);
    struct timespec deadline = deadline_after(5000);
    while (g.active > 0 &&
           pthread_cond_timedwait(&g.wake, &g.lock, &deadline) != ETIMEDOUT)
        ;
    bool idle = g.active == 0;
    if (idle) {
        cJSON_Delete(g.user_ids);
        cJSON_Delete(g.requests);
        for (size_t i = 0; i < g.n_issued; i++) {
            free(g.issued[i].user_id);
            free(g.issued[i].identity);
        }
        free(g.issued);
    }
    pthread_mutex_unlock(&g.lock);
    if (idle)
        SSL_CTX_free(opt.ssl_ctx);
    if (signal_fd >= 0)
        close(signal_fd);
    return status;
}
