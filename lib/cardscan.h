/*
 * mod_cardscan core: everything that can be tested without httpd.
 *
 * One error convention across lib/: functions return an apr_status_t and,
 * on failure, set *err to a message (allocated in the given pool) that the
 * caller can log or show. No message ever contains the API key or a token.
 */
#ifndef CARDSCAN_H
#define CARDSCAN_H

#include <apr_pools.h>
#include <apr_time.h>
#include <apr_tables.h>
#include <apr_thread_mutex.h>

#define CS_VERSION "0.1.0"
#define CS_USER_AGENT "mod_cardscan/" CS_VERSION

/* ------------------------------------------------------------------ keys */

typedef enum { CS_KEY_TEST = 0, CS_KEY_LIVE = 1 } cs_key_mode_e;

#define CS_SECRET_LEN 32

/* A parsed API key and the secrets derived from it once, at start-up. */
typedef struct cs_key {
    const char *secret; /* the key itself: never log, never reply */
    const char *masked; /* sk_test_cardscan_ai_...abcd, safe to log */
    cs_key_mode_e mode; /* from the prefix */
    /* keys the cache ids and the cache entries' encryption derive from */
    unsigned char id_key[CS_SECRET_LEN];
    unsigned char seal_key[CS_SECRET_LEN];
} cs_key_t;

/* Checks the format of a literal key and derives its secrets. */
apr_status_t cs_key_parse(apr_pool_t *p, const char *secret, cs_key_t **key,
                          const char **err);

/* Loads a key from "file:/path", "env:NAME" or a literal, then parses it.
 * *warning is set (or NULL) for a usable key with a risk worth logging,
 * such as a key file that other users can read. An env: variable is
 * removed from the process environment once read, so that no child
 * program inherits it; the process keeps its value (in its root pool) for
 * the next reading of the configuration. */
apr_status_t cs_key_load(apr_pool_t *p, const char *spec, cs_key_t **key,
                         const char **warning, const char **err);

/* Reads a secret given as "file:/path" (read now: at start-up, as root),
 * "env:NAME" (taken out of the environment, and kept for the next reading
 * of the configuration) or a literal. `what` names it in messages ("API
 * key", "cache password"); *secret is a copy the caller may cleanse unless
 * it is spec itself. *warning as for cs_key_load. Never puts the secret in
 * *err. */
apr_status_t cs_secret_load(apr_pool_t *p, const char *spec, const char *what,
                            char **secret, const char **warning,
                            const char **err);

/* The masked form of any string given as a key: prefix, ellipsis, last 4. */
const char *cs_key_mask(apr_pool_t *p, const char *secret);

/* Replaces the cache encryption secret (CardScanCacheSecret). */
void cs_key_set_seal_secret(cs_key_t *key, const void *secret, apr_size_t len);

/* ------------------------------------------------------------- endpoint */

#define CS_SANDBOX_URL "https://sandbox.cardscan.ai/v1"
#define CS_LIVE_URL "https://api.cardscan.ai/v1"

const char *cs_endpoint_default(const cs_key_t *key);

/* Checks an endpoint URL: https, or http only to a loopback host (an
 * address in 127.0.0.0/8 or ::1, or the name localhost); no query.
 * *norm receives the URL without trailing slashes. */
apr_status_t cs_endpoint_check(apr_pool_t *p, const char *url,
                               const char **norm, const char **err);

/* Refuses a live key against the sandbox host and the reverse. */
apr_status_t cs_endpoint_check_key(apr_pool_t *p, const char *url,
                                   const cs_key_t *key, const char **err);

/* -------------------------------------------------------------- user id */

#define CS_USER_ID_MAX 1024

/* Refuses an empty id, one over CS_USER_ID_MAX bytes or one with control
 * characters. */
apr_status_t cs_user_id_check(apr_pool_t *p, const char *id, const char **err);

/* An id named by a backend in a response header (CardScanBackendUser):
 * cs_user_id_check, and printable ASCII (0x20-0x7E) with no comma (httpd
 * merges two headers of a CGI-style backend into "a, b") and no space at
 * either end. */
apr_status_t cs_user_id_check_named(apr_pool_t *p, const char *id,
                                    const char **err);

/* Percent-encodes every byte but RFC 3986 unreserved ones, so that the id
 * reaches the API as exactly one query value. */
const char *cs_user_id_encode(apr_pool_t *p, const char *id);

/* --------------------------------------------------------------- origin */

/* Checks a CORS origin as configured: scheme://host[:port], scheme http or
 * https, no path, no wildcard. *norm receives it as browsers send it:
 * scheme and host in lower case, without the scheme's default port. */
apr_status_t cs_origin_check(apr_pool_t *p, const char *origin,
                             const char **norm, const char **err);

/* Whether a request's Origin header is one of the normalised origins (an
 * exact match; "null" and a missing Origin never are). */
int cs_origin_listed(const apr_array_header_t *origins, const char *origin);

/* ---------------------------------------------------------------- token */

typedef struct cs_token {
    const char *token; /* the JWT */
    const char *identity_id;
    const char *session_id; /* NULL when the upstream sent none */
    apr_int64_t iat, exp;   /* JWT claims, seconds since the epoch */
    int has_iat, has_exp;
} cs_token_t;

/* Parses and validates an access-token reply body: a JSON object whose
 * Token is a JWT with a decodable payload, IdentityId a string and
 * session_id, when present, a string. `now` is the local time of receipt;
 * a token already expired at that time is refused. */
apr_status_t cs_token_parse(apr_pool_t *p, const char *body, apr_size_t len,
                            apr_time_t now, cs_token_t *tok, const char **err);

/* How long the token lives from its receipt at `now`: the earlier of
 * exp - iat (not longer than issued for, whatever this clock says) and
 * exp - now (never past exp by this clock); 0 without exp (not
 * cacheable). */
apr_interval_time_t cs_token_lifetime(const cs_token_t *tok, apr_time_t now);

/* Decodes base64url (padding optional) into a NUL-terminated buffer. */
apr_status_t cs_base64url_decode(apr_pool_t *p, const char *in,
                                 apr_size_t inlen, char **out,
                                 apr_size_t *outlen);

/* ---------------------------------------------------------------- reply */

/* The JSON body sent to the client for a token; expires is the local time
 * the token expires (0: unknown, then expires_at is left out). live is the
 * key's mode: "live": "true" or "false" tells the client SDK which CardScan
 * environment the token belongs to. */
char *cs_reply_token(apr_pool_t *p, const cs_token_t *tok, apr_time_t expires,
                     cs_key_mode_e mode);

/* {"error": code, "message": message} */
char *cs_reply_error(apr_pool_t *p, const char *code, const char *message);

/* The error code, and the body, of a token refused by identity pinning
 * (CardScanIdentityPinning enforce): sent with 502 Bad Gateway. Names
 * neither identity. */
#define CS_ERR_IDENTITY_MISMATCH "identity_mismatch"
char *cs_reply_identity_mismatch(apr_pool_t *p);

/* RFC 3339 UTC, second precision: 2026-11-27T20:15:00Z */
const char *cs_rfc3339(apr_pool_t *p, apr_time_t t);

/* ---------------------------------------------------------------- cache */

#define CS_CACHE_ID_LEN 64  /* hex of a SHA-256 HMAC */
#define CS_CACHE_KEY_LEN 32 /* the same HMAC as bytes: the socache id */

/* The cache id of one (API key, endpoint, user id): a keyed hash, so that
 * tenants never share an entry and ids in a shared cache reveal no user.
 * out must hold CS_CACHE_ID_LEN + 1 bytes. */
void cs_cache_id(const cs_key_t *key, const char *endpoint, const char *user_id,
                 char *out);

/* The SHA-256 of the n strings, each with its NUL (so that ("a", "bc") and
 * ("ab", "c") differ); NULL counts as "". 0 when OpenSSL failed (no
 * memory): out is then all zero and means nothing. */
#define CS_SHA256_LEN 32
int cs_sha256_strings(const char *const *parts, int n,
                      unsigned char out[CS_SHA256_LEN]);

/* The socache id of a cache id: its 32 bytes. shmcb picks a sub-cache by
 * the first byte of an id, so hex (16 values) would use a fraction of it. */
void cs_cache_key_bytes(const char *id, unsigned char out[CS_CACHE_KEY_LEN]);

typedef enum {
    CS_ENTRY_TOKEN = 1,   /* body is the client reply */
    CS_ENTRY_FAILURE = 2, /* a failed call: the user's negative cache */
    CS_ENTRY_PIN = 3      /* the user's pinned IdentityId (cs_pin_t) */
} cs_entry_kind_e;

typedef struct cs_entry {
    cs_entry_kind_e kind;
    apr_time_t created;           /* local time of receipt */
    apr_time_t expires;           /* local time the token expires */
    apr_interval_time_t lifetime; /* the token's whole lifetime */
    int status;                   /* failure: the HTTP status for clients */
    int retry_after;              /* failure: seconds, 0 if none */
    const char *body;             /* token: reply JSON; failure: error JSON */
    apr_size_t body_len;
} cs_entry_t;

/* Overhead of sealing an entry: header, nonce and tag. */
#define CS_ENTRY_OVERHEAD 80

/* Encodes and seals an entry (AES-256-GCM under the key's seal secret,
 * bound to the cache id) into out. */
apr_status_t cs_entry_seal(apr_pool_t *p, const cs_key_t *key, const char *id,
                           const cs_entry_t *e, unsigned char **out,
                           apr_size_t *outlen, const char **err);

/* Opens a sealed entry. A tampered, truncated or foreign entry is an
 * error (the caller treats it as a miss): APR_EMISMATCH when the bytes are
 * no sealed entry at all (a cache server answering garbage), APR_EINVAL
 * when a well-formed entry does not open (sealed with another key, or
 * tampered with). */
apr_status_t cs_entry_open(apr_pool_t *p, const cs_key_t *key, const char *id,
                           const unsigned char *in, apr_size_t inlen,
                           cs_entry_t *e, const char **err);

/* Whether a token entry may still be served at `now`: at least min_ttl of
 * life left, min_ttl capped at half the token's lifetime. */
int cs_entry_fresh(const cs_entry_t *e, apr_time_t now,
                   apr_interval_time_t min_ttl);

/* ------------------------------------------------------------- upstream */

typedef enum {
    CS_UP_OK = 0,   /* an HTTP reply arrived (any status) */
    CS_UP_TIMEOUT,  /* the deadline passed */
    CS_UP_CONNECT,  /* could not connect (refused, unreachable, DNS) */
    CS_UP_TLS,      /* TLS handshake or verification failed */
    CS_UP_TOO_BIG,  /* the body exceeded the cap */
    CS_UP_PROTOCOL, /* reset, truncated or otherwise broken exchange */
    CS_UP_ABORTED   /* cs_upstream_abort: the process is going away */
} cs_up_result_e;

typedef struct cs_upstream_req {
    const char *endpoint; /* base URL, no trailing slash */
    const char *user_id;  /* raw; encoded by the client */
    const cs_key_t *key;
    const char *ca_file;    /* NULL: system bundle */
    const char *proxy;      /* NULL: none */
    const char *proxy_auth; /* "user:password" for the proxy, or NULL */
    apr_interval_time_t timeout, connect_timeout;
    apr_size_t max_body;
    /* libcurl's verbose output, with secrets masked; NULL: none */
    void (*trace)(void *baton, const char *line);
    void *trace_baton;
} cs_upstream_req_t;

typedef struct cs_upstream_resp {
    cs_up_result_e result;
    int status;       /* HTTP status, when result is CS_UP_OK */
    const char *body; /* NUL-terminated */
    apr_size_t body_len;
    const char *retry_after; /* the Retry-After header, or NULL */
    const char *detail;      /* what went wrong, for the log */
    long new_connections;    /* connections this exchange opened */
    apr_interval_time_t elapsed;
} cs_upstream_resp_t;

typedef struct cs_upstream cs_upstream_t;

/* Global libcurl set-up: call once in the parent before any thread. */
apr_status_t cs_upstream_global_init(const char **err);

/* A per-process client: keeps its libcurl handles and a share of
 * connections, DNS and TLS sessions alive between requests. Freed with p. */
apr_status_t cs_upstream_create(apr_pool_t *p, cs_upstream_t **u,
                                const char **err);

/* GET {endpoint}/access-token?user_id=... */
void cs_upstream_fetch(cs_upstream_t *u, apr_pool_t *p,
                       const cs_upstream_req_t *req, cs_upstream_resp_t *resp);

/* Ends every exchange of u, running (within about a second: libcurl's
 * progress callback) or to come, with CS_UP_ABORTED: the process is going
 * away and a call in flight is abandoned. For good; async-signal-safe. */
void cs_upstream_abort(cs_upstream_t *u);

/* What to add to a failed connect's detail for the system's errno: a hint
 * at SELinux for EACCES; NULL for any other. */
const char *cs_upstream_os_hint(int os_errno);

/* Copies one line of libcurl's verbose output into out (outsize bytes,
 * always NUL-terminated) with every credential masked, wherever it is in
 * the line and whatever the protocol's way of printing headers. Returns
 * the length written. */
apr_size_t cs_trace_mask(char *out, apr_size_t outsize, const char *line,
                         apr_size_t len);

/* The seconds a Retry-After header value asks for at `now`: 0 when absent
 * or unparseable, else delta-seconds or an HTTP-date, clamped to
 * [1, 3600]. */
int cs_retry_after(const char *header, apr_time_t now);

/* The full URL of a request, for tests and logs (no secrets in it). */
const char *cs_upstream_url(apr_pool_t *p, const char *endpoint,
                            const char *user_id);

/* ------------------------------------------------------ circuit breaker */

/* One breaker per upstream endpoint, in memory shared by every child
 * process; all fields are updated with atomic operations. */
#define CS_BREAKER_USERS 8 /* the users of the last failures, remembered */
/* A breaker opens only when the failures in a row came from at least this
 * many distinct users (or from all of them, below this threshold): one
 * user's broken account never stops everyone's calls. */
#define CS_BREAKER_MIN_USERS 3

typedef struct cs_breaker {
    apr_uint64_t endpoint_hash; /* 0: free slot */
    apr_uint32_t failures;      /* consecutive failed exchanges */
    apr_uint32_t next_user;     /* next slot of users[] */
    apr_int64_t open_until;     /* apr_time_t; 0: closed */
    apr_int64_t probe_started;  /* apr_time_t of the probe; 0: none */
    apr_uint64_t opened_total;
    apr_uint32_t users[CS_BREAKER_USERS]; /* hashes; 0: none */
    apr_uint32_t probe_user;              /* the user of the probe in flight */
    apr_uint32_t failed_probe_user; /* the user of the last failed probe */
} cs_breaker_t;

#define CS_BREAKER_SLOTS 16

/* The slot of an endpoint in a table of CS_BREAKER_SLOTS (claimed on first
 * use; a full table shares the last slot). */
cs_breaker_t *cs_breaker_slot(cs_breaker_t *table, const char *endpoint);

/* Whether a request may call the upstream now. When not, *retry_after is
 * the number of seconds until the next probe. */
int cs_breaker_allow(cs_breaker_t *b, apr_time_t now, int *retry_after);

/* The same for one user's call (user_hash != 0): the probe is then that
 * user's, and only its own result (cs_breaker_record with the same user)
 * decides the half-open breaker; a failed probe of the user whose probe
 * failed last time closes it instead of re-opening it, so that one user
 * whose calls always fail cannot hold it open. */
int cs_breaker_allow_user(cs_breaker_t *b, apr_time_t now,
                          apr_uint32_t user_hash, int *retry_after);

/* Records the outcome of an exchange made for the user whose cache id
 * starts with `user_hash` (any nonzero 32-bit value per user). The breaker
 * opens for `period` after `threshold` consecutive failures that came from
 * at least min(threshold, CS_BREAKER_MIN_USERS) distinct users; a failed
 * half-open probe opens it again at once. Returns 1 when this call opened
 * it. */
int cs_breaker_record(cs_breaker_t *b, apr_time_t now, int ok,
                      apr_uint32_t user_hash, apr_uint32_t threshold,
                      apr_interval_time_t period);

int cs_breaker_is_open(const cs_breaker_t *b, apr_time_t now);

/* -------------------------------------------------------------- metrics */

typedef enum {
    CS_OUT_HIT = 0,     /* served from the cache */
    CS_OUT_FETCHED,     /* this request called the API */
    CS_OUT_WAITED,      /* served by another request's call (single flight) */
    CS_OUT_REFRESHED,   /* served from the cache; started a refresh ahead */
    CS_OUT_DENIED,      /* refused before any call: method, no user, bad id */
    CS_OUT_ERROR,       /* the call failed */
    CS_OUT_UNAVAILABLE, /* the breaker is open */
    CS_OUT_COUNT
} cs_outcome_e;

typedef enum {
    CS_CLASS_2XX = 0,
    CS_CLASS_3XX,
    CS_CLASS_4XX,
    CS_CLASS_5XX,
    CS_CLASS_TIMEOUT,
    CS_CLASS_CONNECT,
    CS_CLASS_TLS,
    CS_CLASS_OTHER,
    CS_CLASS_COUNT
} cs_class_e;

#define CS_LATENCY_BUCKETS 10

typedef enum {
    CS_REFRESH_OK = 0,  /* a new token was stored ahead of expiry */
    CS_REFRESH_FAILED,  /* the call failed; the current token stays */
    CS_REFRESH_SKIPPED, /* another process or server was refreshing */
    CS_REFRESH_COUNT
} cs_refresh_e;

/* The back-off of a failing token store, shared by every child: a store
 * that failed is left alone until `until` (apr_time_t), the pause doubling
 * from CS_BACKOFF_MIN to CS_BACKOFF_MAX with each failure after a pause
 * (lib/cs_policy.c). A lost update between two processes only changes when
 * the next attempt happens. */
typedef struct cs_backoff {
    apr_int64_t until;
    apr_int64_t pause;
} cs_backoff_t;

#define CS_BACKOFF_MIN apr_time_from_sec(2)
#define CS_BACKOFF_MAX apr_time_from_sec(60)

/* After a failure: starts or doubles the pause unless one is running;
 * returns the pause. */
apr_interval_time_t cs_backoff_failed(cs_backoff_t *b, apr_time_t now);
/* After a success: the next failure starts again from CS_BACKOFF_MIN. */
void cs_backoff_ok(cs_backoff_t *b);
/* Whether the store may be asked at `now`. */
int cs_backoff_usable(const cs_backoff_t *b, apr_time_t now);

/* Counters shared by all children; updated with atomic adds. */
typedef struct cs_metrics {
    apr_uint64_t requests[CS_OUT_COUNT];
    apr_uint64_t cache_hits, cache_misses;
    apr_uint64_t upstream[CS_CLASS_COUNT];
    apr_uint64_t latency_bucket[CS_LATENCY_BUCKETS]; /* not cumulative */
    apr_uint64_t latency_count, latency_sum_usec;
    apr_uint64_t singleflight_waits;
    apr_uint64_t refreshes[CS_REFRESH_COUNT];
    apr_uint64_t store_errors; /* store operations that failed or timed out */
    /* the shared store's back-off, for every child (cs_backoff_failed) */
    cs_backoff_t store_backoff;
    /* 1 + the configuration generation whose refused store credentials
     * were logged: named once per generation across the processes */
    apr_uint32_t store_auth_logged;
    cs_breaker_t breakers[CS_BREAKER_SLOTS];
    /* new tokens whose IdentityId differed from the user's pin (alarm and
     * enforce alike) */
    apr_uint64_t identity_changes;
    /* apr_time_t of the last API answer in 2xx; 0: none yet */
    apr_int64_t upstream_last_success;
} cs_metrics_t;

void cs_metrics_request(cs_metrics_t *m, cs_outcome_e outcome);

/* The outcome's label: "hit", "fetched", ... (the metric's outcome label and
 * the cardscan-outcome request note). */
const char *cs_outcome_name(cs_outcome_e outcome);
void cs_metrics_cache(cs_metrics_t *m, int hit);
void cs_metrics_wait(cs_metrics_t *m);
void cs_metrics_refresh(cs_metrics_t *m, cs_refresh_e result);
/* Counts one exchange with the API; an answer in 2xx also sets
 * upstream_last_success to the current time. */
void cs_metrics_upstream(cs_metrics_t *m, cs_up_result_e result, int status,
                         apr_interval_time_t elapsed);
/* A new token carried another IdentityId than the user's pin. */
void cs_metrics_identity_change(cs_metrics_t *m);

/* Prometheus text exposition format 0.0.4. */
char *cs_metrics_render(apr_pool_t *p, const cs_metrics_t *m, apr_time_t now);

/* The latency buckets' upper bounds, in seconds. */
extern const double cs_latency_bounds[CS_LATENCY_BUCKETS];

/* Whether an upstream outcome is worth one retry: a connect failure or a
 * 502/503/504. */
int cs_upstream_retryable(const cs_upstream_resp_t *resp);

/* Whether an outcome counts against the upstream's health: transport
 * failures, timeouts and 5xx. */
int cs_upstream_failed(const cs_upstream_resp_t *resp);

/* ---------------------------------------------------------------- serve */

/* What one user's entries mean at a given time: the serving decision, a
 * pure function of the entries, the clock and the policy (lib/cs_serve.c).
 *
 * A token is served while it is fresh (cs_entry_fresh: CardScanCacheMinTTL
 * of life left, capped at half its lifetime). With refresh ahead, the last
 * `refresh_pct` percent of that serving time is the refresh window: a
 * request in it is served at once and starts one refresh in the
 * background. A failed call is remembered for the user alone (the negative
 * cache, under its own key so that it never replaces a token): while it
 * lasts, that user's requests get the same error without a call. */

#define CS_REFRESH_PCT_DEFAULT 25
/* how long a failed call is answered from the negative cache, at least */
#define CS_NEGATIVE_TTL apr_time_from_sec(5)
/* a failed refresh is not tried again for the user before this */
#define CS_REFRESH_RETRY apr_time_from_sec(5)

typedef struct cs_policy {
    apr_interval_time_t min_ttl; /* CardScanCacheMinTTL */
    int refresh_pct;             /* 0: no refresh ahead */
} cs_policy_t;

typedef enum {
    CS_DO_CALL = 0,      /* nothing to serve: call the API (as the user's one
                            caller, when the lock can be had) */
    CS_DO_SERVE,         /* serve the token */
    CS_DO_SERVE_REFRESH, /* serve the token; refresh it in the background */
    CS_DO_FAIL           /* answer the user's recent failure */
} cs_action_e;

/* tok: the user's token entry or NULL; fail: the user's failure entry or
 * NULL. Whether another request is calling for the user is not an entry:
 * the store's lock tells (the shell waits on it). */
cs_action_e cs_serve_decide(const cs_entry_t *tok, const cs_entry_t *fail,
                            apr_time_t now, const cs_policy_t *pol);

/* When the refresh window of a token starts (0: never). */
apr_time_t cs_serve_refresh_at(const cs_entry_t *tok, const cs_policy_t *pol);

/* The seconds a failure entry tells clients to wait (Retry-After), >= 1. */
int cs_serve_retry_after(const cs_entry_t *fail, apr_time_t now);

/* The store ids of one user: the token, the failure (negative cache), the
 * call lock and the identity pin. Each is the 32-byte cache key and a tag
 * byte. */
#define CS_STORE_ID_LEN (CS_CACHE_KEY_LEN + 1)
typedef enum {
    CS_ID_TOKEN = 'T',
    CS_ID_FAILURE = 'F',
    CS_ID_LOCK = 'L',
    CS_ID_PIN = 'P'
} cs_id_kind_e;
void cs_store_id(const unsigned char key[CS_CACHE_KEY_LEN], cs_id_kind_e kind,
                 unsigned char out[CS_STORE_ID_LEN]);

/* The holder of a user's call lock, from the lock's value
 * "host/pid/counter/time" (the shell makes it when it takes the lock): a
 * lock whose holder process is gone from this host can be taken over. The
 * value comes from a shared store, not NUL-terminated: anything but that
 * form (an empty or oversized host, a pid that is not a positive decimal
 * number, a missing or non-numeric field) is refused with APR_EINVAL. host
 * receives the host tag NUL-terminated in at most hostsize bytes. */
apr_status_t cs_lock_holder_parse(const char *value, apr_size_t len, char *host,
                                  apr_size_t hostsize, long *pid);

/* --------------------------------------------------------- call policy */

/* What an API reply means for the client (lib/cs_policy.c). */
typedef enum {
    CS_VERDICT_TOKEN = 0,    /* a valid token: v->token */
    CS_VERDICT_INVALID,      /* a 200 without a valid token: v->detail */
    CS_VERDICT_KEY_REJECTED, /* 401/403: the API key is wrong */
    CS_VERDICT_RATE_LIMITED, /* 429 */
    CS_VERDICT_HTTP_ERROR,   /* any other status (5xx, 3xx: no redirects) */
    CS_VERDICT_TIMEOUT,      /* no answer in time */
    CS_VERDICT_UNREACHABLE   /* connect, TLS, oversized or other failure */
} cs_verdict_e;

typedef struct cs_verdict {
    cs_verdict_e kind;
    int status;          /* for the client: 200, 502, 503 or 504 */
    const char *code;    /* the error code (NULL for a token) */
    const char *message; /* for a person */
    int retry_after;     /* seconds the API asked us to wait (429), else 0 */
    const char *detail;  /* CS_VERDICT_INVALID: why, for the log */
    cs_token_t token;    /* CS_VERDICT_TOKEN */
} cs_verdict_t;

/* Classifies an exchange received at `now` (parsing the token of a 200). */
void cs_classify(apr_pool_t *p, const cs_upstream_resp_t *resp, apr_time_t now,
                 cs_verdict_t *v);

/* The failure entry of a verdict other than a token: the user's negative
 * cache, kept CS_NEGATIVE_TTL or as long as the API asked us to wait. */
void cs_entry_failure(apr_pool_t *p, const cs_verdict_t *v, apr_time_t now,
                      cs_entry_t *e);

/* a retry needs at least this much of the deadline left */
#define CS_RETRY_MIN_LEFT apr_time_from_msec(100)

/* Whether to try once more after the exchange `attempt` (0: the first):
 * once, after a connect failure or a 502/503/504, while `left` of the
 * deadline allows and the breaker is not open. */
int cs_call_retry(const cs_upstream_resp_t *resp, int attempt,
                  apr_interval_time_t left, int breaker_open);

/* ---------------------------------------------------------- directives */

/* The value checks of directives (lib/cs_conf.c): each sets its output or
 * *err, a message naming the directive. */
#define CS_CONNECT_TIMEOUT_DEFAULT apr_time_from_sec(2)

/* A number of seconds in (0, max]. */
apr_status_t cs_conf_seconds(apr_pool_t *p, const char *name, const char *arg,
                             double max, apr_interval_time_t *out,
                             const char **err);
/* CardScanTimeout total [connect]: connect defaults to the lesser of the
 * total and CS_CONNECT_TIMEOUT_DEFAULT; both at least 1 ms. */
apr_status_t cs_conf_timeout(apr_pool_t *p, const char *total,
                             const char *connect, apr_interval_time_t *timeout,
                             apr_interval_time_t *connect_timeout,
                             const char **err);
/* CardScanCacheMinTTL: whole seconds, 0 to 86400. */
apr_status_t cs_conf_min_ttl(apr_pool_t *p, const char *arg,
                             apr_interval_time_t *out, const char **err);
/* CardScanRefreshAhead on|off|N%: a percentage, 0 (off) or 1 to 50. */
apr_status_t cs_conf_refresh(apr_pool_t *p, const char *arg, int *pct,
                             const char **err);
/* CardScanCircuitBreaker failures [seconds]. */
apr_status_t cs_conf_breaker(apr_pool_t *p, const char *failures,
                             const char *period, apr_uint32_t *n,
                             apr_interval_time_t *out_period, const char **err);
/* CardScanBackendUser: a header name (RFC 9110 token) of its own, not a
 * standard header the module would strip. */
apr_status_t cs_conf_backend_header(apr_pool_t *p, const char *arg,
                                    const char **err);
/* Header names as CGI sees them: X-CardScan-User and X_CardScan_User are
 * one variable there (HTTP_X_CARDSCAN_USER). */
int cs_header_same(const char *a, const char *b);
/* CardScanProxy URL|none [file:/path]: *proxy NULL for none; the
 * credentials file holds user:password (read through cs_secret_load). */
apr_status_t cs_conf_proxy(apr_pool_t *p, const char *url, const char *auth,
                           const char **proxy, const char **proxy_auth,
                           const char **warning, const char **err);
/* CardScanCacheSecret file:/path: at least 16 bytes, turned into the key
 * that seals cache entries. */
apr_status_t cs_conf_cache_secret(apr_pool_t *p, const char *spec,
                                  unsigned char seal_key[CS_SECRET_LEN],
                                  const char **warning, const char **err);

/* --------------------------------------------------------------- queue */

/* A work queue served by `nthreads` threads (lib/cs_queue.c): the refresh
 * jobs of a child. Stopped (threads woken and joined, queued jobs handed to
 * `drop`) by cs_queue_stop or, at the latest, before anything else of the
 * pool it was started with is cleaned up (then waiting CS_QUEUE_STOP_WAIT
 * at most for a running job). */
typedef struct cs_queue cs_queue_t;
typedef void (*cs_queue_fn)(void *job);

#define CS_QUEUE_STOP_WAIT apr_time_from_sec(2)

apr_status_t cs_queue_start(apr_pool_t *p, int nthreads, unsigned int capacity,
                            cs_queue_fn run, cs_queue_fn drop, cs_queue_t **q);
/* 1 when queued; 0 when the queue is full or stopping */
int cs_queue_push(cs_queue_t *q, void *job);
/* Stops the queue: no job is started any more, idle threads end at once,
 * and a running job is waited for `wait` at most (the caller makes its jobs
 * end soon: a child that is told to exit must not hang on one). Returns
 * the threads still running then (0: all joined): these go on with their
 * job, and the queue is left to them (never freed). Takes no lock that the
 * calling thread may hold: it may run in a signal handler that interrupted
 * cs_queue_push (prefork destroys its child pool from SIGTERM's handler).
 * Idempotent. */
int cs_queue_stop(cs_queue_t *q, apr_interval_time_t wait);
/* the threads that were started */
int cs_queue_threads(const cs_queue_t *q);
/* ----------------------------------------------------- identity pinning */

/* CardScan's IdentityId names the identity a user's tokens belong to. For
 * one (API key, endpoint, user id) it should never change: a new token with
 * another IdentityId than the one before means something upstream mixed
 * people up. The IdentityId of the user's last accepted token is kept as a
 * pin, a cache entry of its own (CS_ID_PIN, kind CS_ENTRY_PIN) that lives
 * longer than any token (CardScanIdentityPinTTL); every new token, fetched
 * or refreshed, is compared with it (lib/cs_identity.c). */

typedef enum {
    CS_PIN_OFF = 0, /* no check; accepted tokens still re-pin */
    CS_PIN_ALARM,   /* a change is logged and counted, the token served */
    CS_PIN_ENFORCE  /* a change is logged, counted and refused */
} cs_pin_mode_e;

#define CS_PIN_MODE_DEFAULT CS_PIN_ALARM
#define CS_PIN_TTL_DEFAULT apr_time_from_sec(86400)
#define CS_PIN_TTL_MIN 60      /* seconds */
#define CS_PIN_TTL_MAX 2592000 /* 30 days */

/* A user's pin: the IdentityId of their last accepted token. */
typedef struct cs_pin {
    const char *identity_id;
    apr_time_t pinned;  /* when it was (last) confirmed */
    apr_time_t expires; /* forgotten then: the next token pins afresh */
} cs_pin_t;

typedef enum {
    CS_PIN_ACCEPT = 0, /* no live pin, the same IdentityId, or pinning off:
                          serve the token and (re)pin its IdentityId */
    CS_PIN_CHANGED,    /* another IdentityId, alarm: serve the token, count
                          and log the change, pin the new IdentityId */
    CS_PIN_REFUSE      /* another IdentityId, enforce: count and log the
                          change, neither serve nor cache the token (502
                          identity_mismatch); the pin stays as it was, so
                          that it runs out CardScanIdentityPinTTL after the
                          last token that matched it */
} cs_pin_verdict_e;

/* The verdict on a new token's IdentityId. pin: the user's pin or NULL
 * (none, or it did not open); an expired pin counts as none. */
cs_pin_verdict_e cs_pin_decide(const cs_pin_t *pin, const char *identity_id,
                               cs_pin_mode_e mode, apr_time_t now);

/* The pin to store after an accepted token (CS_PIN_ACCEPT, CS_PIN_CHANGED):
 * pinned now, expiring ttl later. identity_id is referenced, not copied. */
void cs_pin_make(cs_pin_t *pin, const char *identity_id, apr_time_t now,
                 apr_interval_time_t ttl);

/* A pin as a cache entry, sealed with cs_entry_seal like the others (the
 * IdentityId is its body) and stored under CS_ID_PIN until pin->expires. */
void cs_pin_to_entry(const cs_pin_t *pin, cs_entry_t *e);

/* The pin an opened entry holds; an entry of another kind is an error (a
 * token or a failure never reads as a pin). */
apr_status_t cs_pin_from_entry(const cs_entry_t *e, cs_pin_t *pin,
                               const char **err);

/* CardScanIdentityPinning alarm|enforce|off (any case). */
apr_status_t cs_pin_mode_parse(apr_pool_t *p, const char *arg,
                               cs_pin_mode_e *mode, const char **err);

/* CardScanIdentityPinTTL seconds: a whole number in
 * [CS_PIN_TTL_MIN, CS_PIN_TTL_MAX]. */
apr_status_t cs_pin_ttl_parse(apr_pool_t *p, const char *arg,
                              apr_interval_time_t *ttl, const char **err);

#endif /* CARDSCAN_H */
