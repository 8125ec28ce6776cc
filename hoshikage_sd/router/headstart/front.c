/* hoshikage-front ROUTER [ARGS...]: hoshikage.service's first process, compiled.
 *
 * The head start (this directory's __init__.py) without a Python interpreter to start first:
 * take the connection that woke the router from the socket systemd passed, peek at its
 * request (MSG_PEEK: its bytes stay in the socket for the router), find its model in the
 * index the last router left (front.index, written by lastgood.py from the head-start
 * section of manifest.json: the same data, in lines), admit it when no model unit is up,
 * leave the same admitted record and launch ticket as protocol.py, start its unit over
 * sd-bus, and exec ROUTER with the listening sockets as systemd passed them and the
 * connection named in HOSHIKAGE_FRONT (take.py reads it).
 *
 * It decides only what it can decide exactly as take.py would; anything else (no index, an
 * unknown or ambiguous name, a body over its bound, a model up, parse trouble of any kind) is
 * handed over untouched, and the Python head start does what it does without a front. It
 * never answers a request itself. Request bytes are untrusted: reads are bounded, the
 * request's name only selects an entry of the index (paths and unit names come from the
 * index's own names), and the HTTP syntax taken is router/http1.py's (anything odd: handed
 * over). tests/unit/test_front.py runs its decisions against the Python head start's.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -fstack-protector-strong -D_FORTIFY_SOURCE=2 \
 *        -o hoshikage-front front.c -lsystemd
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-bus.h>

/* Keep in step with protocol.py, request.py and lastgood.py (the contract test checks). */
#define MAGIC "hoshikage-launch-1"
#define TICKET_TTL 30.0
#define DEFAULT_RUNTIME "/run/hoshikage"
#define DEFAULT_MANIFEST "/etc/hoshikage/models.yaml"
#define INDEX_NAME "front.index"
#define INDEX_MAGIC "hoshikage-front 1"
#define MAX_PEEK (1 << 20)   /* request.MAX_PEEK */
#define PEEK_WAIT_NS 50000000L /* request.PEEK_WAIT */
#define MAX_INDEX (4 << 20)
#define MAX_DEPTH 64
#define UNIT_PREFIX "hoshikage-model@"

static char request[MAX_PEEK];
static char index_data[MAX_INDEX + 1];

static long long now_usec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* ---- the request: router/http1.py's syntax, request.parse's reading ------------------ */

typedef struct { const char *p; size_t n; } span;

static int span_is(span s, const char *text) {
    size_t n = strlen(text);
    return s.n == n && memcmp(s.p, text, n) == 0;
}

static int tchar(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int lower_is(span s, const char *text) {
    size_t n = strlen(text);
    if (s.n != n) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c >= 'A' && c <= 'Z') c = (unsigned char)(c + 32);
        if (c != (unsigned char)text[i]) return 0;
    }
    return 1;
}

typedef struct {
    span method, path, query, body;
} parsed;

enum { COMPLETE = 0, INCOMPLETE = 1, REFUSED = 2 };

/* request.parse: COMPLETE with `out`, INCOMPLETE while more may come, REFUSED for what
 * http1.split_head or framing refuse, or what request.parse does not take (chunked). */
static int parse_request(const char *data, size_t n, parsed *out) {
    const char *end = memmem(data, n, "\r\n\r\n", 4);
    if (end == NULL) return INCOMPLETE;
    size_t head = (size_t)(end - data);
    /* every byte a field line's (HTAB, SP, VCHAR, obs-text), CR and LF only as a pair */
    for (size_t i = 0; i < head; i++) {
        unsigned char c = (unsigned char)data[i];
        if (c == '\r') {
            if (i + 1 >= head || data[i + 1] != '\n') return REFUSED;
            i++;
        } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
            return REFUSED;
        }
    }
    const char *line_end = memmem(data, head, "\r\n", 2);
    size_t first = line_end ? (size_t)(line_end - data) : head;
    /* method SP target SP version: exactly two spaces */
    const char *sp1 = memchr(data, ' ', first);
    if (sp1 == NULL) return REFUSED;
    const char *sp2 = memchr(sp1 + 1, ' ', first - (size_t)(sp1 + 1 - data));
    if (sp2 == NULL || memchr(sp2 + 1, ' ', first - (size_t)(sp2 + 1 - data))) return REFUSED;
    span method = {data, (size_t)(sp1 - data)};
    span target = {sp1 + 1, (size_t)(sp2 - sp1 - 1)};
    span version = {sp2 + 1, first - (size_t)(sp2 + 1 - data)};
    if (!span_is(version, "HTTP/1.1") && !span_is(version, "HTTP/1.0")) return REFUSED;
    if (target.n == 0 || memchr(target.p, '\t', target.n)) return REFUSED;
    if (method.n == 0) return REFUSED;
    for (size_t i = 0; i < method.n; i++)
        if (!tchar((unsigned char)method.p[i])) return REFUSED;
    /* field lines: name ":" value; names tokens; framing's checks */
    long long length = -1;
    span given = {NULL, 0};
    int host = 0;
    size_t at = first;
    while (at < head) {
        at += 2; /* the CRLF before this line */
        const char *next = memmem(data + at, head - at, "\r\n", 2);
        size_t stop = next ? (size_t)(next - data) : head;
        span line = {data + at, stop - at};
        at = stop;
        const char *colon = memchr(line.p, ':', line.n);
        if (colon == NULL || colon == line.p) return REFUSED;
        span name = {line.p, (size_t)(colon - line.p)};
        for (size_t i = 0; i < name.n; i++)
            if (!tchar((unsigned char)name.p[i])) return REFUSED;
        span value = {colon + 1, line.n - name.n - 1};
        while (value.n && (value.p[0] == ' ' || value.p[0] == '\t')) value.p++, value.n--;
        while (value.n && (value.p[value.n - 1] == ' ' || value.p[value.n - 1] == '\t'))
            value.n--;
        if (lower_is(name, "content-length")) {
            if (value.n == 0) return REFUSED;
            for (size_t i = 0; i < value.n; i++)
                if (value.p[i] < '0' || value.p[i] > '9') return REFUSED;
            if (given.p && (given.n != value.n || memcmp(given.p, value.p, value.n)))
                return REFUSED;
            given = value;
            span digits = value;
            while (digits.n && digits.p[0] == '0') digits.p++, digits.n--;
            if (digits.n > 9) return REFUSED; /* past any body this front reads */
            length = 0;
            for (size_t i = 0; i < digits.n; i++) length = length * 10 + (digits.p[i] - '0');
        } else if (lower_is(name, "transfer-encoding")) {
            return REFUSED; /* chunked, or a 501 or a 400: not request.parse's */
        } else if (lower_is(name, "host")) {
            if (host) return REFUSED;
            host = 1;
        }
    }
    if (length < 0) length = 0;
    size_t rest = n - head - 4;
    if ((size_t)length > rest) return length >= MAX_PEEK ? REFUSED : INCOMPLETE;
    out->method = method;
    const char *q = memchr(target.p, '?', target.n);
    out->path = (span){target.p, q ? (size_t)(q - target.p) : target.n};
    out->query = q ? (span){q + 1, target.n - out->path.n - 1} : (span){q, 0};
    out->body = (span){end + 4, (size_t)length};
    return COMPLETE;
}

/* query.get(key): the first pair with that key, its value raw (request.parse) */
static int query_get(span query, const char *key, span *value) {
    size_t at = 0;
    while (at <= query.n && query.p) {
        const char *amp = memchr(query.p + at, '&', query.n - at);
        size_t stop = amp ? (size_t)(amp - query.p) : query.n;
        span pair = {query.p + at, stop - at};
        if (pair.n) {
            const char *eq = memchr(pair.p, '=', pair.n);
            span k = {pair.p, eq ? (size_t)(eq - pair.p) : pair.n};
            if (span_is(k, key)) {
                *value = eq ? (span){eq + 1, pair.n - k.n - 1} : (span){pair.p + pair.n, 0};
                return 1;
            }
        }
        if (!amp) break;
        at = stop + 1;
    }
    return 0;
}

/* ---- JSON: a strict reader of the body, for its top-level "model" --------------------- */

typedef struct {
    const char *p, *end;
    span model;
    int models;     /* how many top-level "model" keys */
    int model_ok;   /* the last one's value is a string without escapes */
} json;

static void ws(json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* one UTF-8 character at j->p (strict: no overlong forms, no surrogates, <= U+10FFFF) */
static int utf8(json *j) {
    const unsigned char *s = (const unsigned char *)j->p;
    size_t left = (size_t)(j->end - j->p);
    unsigned char c = s[0];
    size_t n;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) { j->p++; return 1; }
    if (c >= 0xc2 && c <= 0xdf) n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return 0;
    if (left < n || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf) return 0;
    j->p += n;
    return 1;
}

static int hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* a string at j->p (at its quote); `raw` its bytes between the quotes; `escaped` whether
 * any escape is in it */
static int string(json *j, span *raw, int *escaped) {
    j->p++;
    const char *start = j->p;
    *escaped = 0;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p;
        if (c == '"') {
            *raw = (span){start, (size_t)(j->p - start)};
            j->p++;
            return 1;
        }
        if (c < 0x20) return 0;
        if (c == '\\') {
            *escaped = 1;
            if (j->end - j->p < 2) return 0;
            char e = j->p[1];
            if (e == 'u') {
                if (j->end - j->p < 6) return 0;
                for (int i = 2; i < 6; i++)
                    if (!hex(j->p[i])) return 0;
                j->p += 6;
            } else if (e && strchr("\"\\/bfnrt", e)) {
                j->p += 2;
            } else {
                return 0;
            }
            continue;
        }
        if (!utf8(j)) return 0;
    }
    return 0;
}

static int digits(json *j) {
    const char *start = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return j->p > start;
}

static int number(json *j) {
    const char *start = j->p;
    if (*j->p == '-') j->p++;
    if (j->p >= j->end) return 0;
    if (*j->p == '0') j->p++;
    else if (!digits(j)) return 0;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!digits(j)) return 0;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (!digits(j)) return 0;
    }
    return j->p - start <= 4000; /* json.loads refuses an int of over 4300 digits */
}

static int word(json *j, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n)) return 0;
    j->p += n;
    return 1;
}

static int value(json *j, int depth);

static int object(json *j, int depth) {
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return 1; }
    for (;;) {
        span key;
        int escaped;
        if (j->p >= j->end || *j->p != '"' || !string(j, &key, &escaped)) return 0;
        /* a top-level key with an escape could be "model" spelled otherwise: not ours */
        if (depth == 1 && escaped) return 0;
        ws(j);
        if (j->p >= j->end || *j->p != ':') return 0;
        j->p++;
        ws(j);
        if (depth == 1 && span_is(key, "model")) {
            j->models++;
            j->model_ok = 0;
            if (j->p < j->end && *j->p == '"') {
                if (!string(j, &j->model, &escaped)) return 0;
                j->model_ok = !escaped;
            } else if (!value(j, depth)) {
                return 0;
            }
        } else if (!value(j, depth)) {
            return 0;
        }
        ws(j);
        if (j->p >= j->end) return 0;
        if (*j->p == '}') { j->p++; return 1; }
        if (*j->p != ',') return 0;
        j->p++;
        ws(j);
    }
}

static int value(json *j, int depth) {
    if (j->p >= j->end || depth >= MAX_DEPTH) return 0;
    char c = *j->p;
    if (c == '{') return object(j, depth + 1);
    if (c == '[') {
        j->p++;
        ws(j);
        if (j->p < j->end && *j->p == ']') { j->p++; return 1; }
        for (;;) {
            if (!value(j, depth + 1)) return 0;
            ws(j);
            if (j->p >= j->end) return 0;
            if (*j->p == ']') { j->p++; return 1; }
            if (*j->p != ',') return 0;
            j->p++;
            ws(j);
        }
    }
    if (c == '"') {
        span s;
        int escaped;
        return string(j, &s, &escaped);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return number(j);
    return word(j, "true") || word(j, "false") || word(j, "null");
}

/* request.model_name_of for a body this front reads: 1 with the name (`*none`: no name,
 * the default model), 0 for anything to hand over */
static int model_of(span body, span query, span *name, int *none) {
    *none = 0;
    int blank = 1;
    for (size_t i = 0; i < body.n; i++)
        if (!strchr(" \t\n\r\x0b\x0c", body.p[i]) || !body.p[i]) { blank = 0; break; }
    if (!blank) {
        /* json.loads(bytes) reads UTF-8 here only without a NUL (utf-16/32 otherwise) and
         * without a BOM (utf-8-sig): both handed over */
        if (memchr(body.p, 0, body.n)) return 0;
        json j = {body.p, body.p + body.n, {NULL, 0}, 0, 0};
        ws(&j);
        if (j.p >= j.end || *j.p != '{' || !object(&j, 1)) return 0;
        ws(&j);
        if (j.p != j.end || j.models > 1) return 0;
        if (j.models == 1) {
            if (!j.model_ok) return 0;
            *name = j.model;
            return 1;
        }
    }
    if (!query_get(query, "model", name)) {
        *none = 1;
        return 1;
    }
    /* ?model= is read as Latin-1 by the router: only ASCII compares the same here */
    for (size_t i = 0; i < name->n; i++)
        if ((unsigned char)name->p[i] >= 0x80) return 0;
    return 1;
}

/* ---- the index (lastgood.py's front.index) -------------------------------------------- */

#define MAX_MODELS 1024
#define MAX_NAMES 16384

typedef struct {
    span name;
    int keyed;
    int launch;
    long long estimate, needed, size, mtime_ns;
    span source, staged, ticket;
} model;

typedef struct {
    int model;    /* which model */
    char kind;    /* 'n' its name, 'a' an alias, 't' a tag, 'l' a lowercased name or alias */
    span text;
} entry;

typedef struct {
    int api_keys;
    long long max_body;
    span def, runtime;
    int nmodels, nentries;
    model models[MAX_MODELS];
    entry entries[MAX_NAMES];
    /* the forward routes: "route METHODS PATH", "prefix PATH", "named PATH" */
    span routes[256], route_methods[256], prefixes[32], named[32];
    int nroutes, nprefixes, nnamed;
} front_index;

static front_index idx;

static int to_ll(span s, long long *out) {
    char buf[32];
    if (s.n == 0 || s.n >= sizeof buf) return 0;
    memcpy(buf, s.p, s.n);
    buf[s.n] = 0;
    char *end;
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (errno || *end) return 0;
    *out = v;
    return 1;
}

/* the next space-separated word of `*rest` */
static span next_word(span *rest) {
    const char *sp = memchr(rest->p, ' ', rest->n);
    span w = {rest->p, sp ? (size_t)(sp - rest->p) : rest->n};
    rest->p += w.n + (sp ? 1 : 0);
    rest->n -= w.n + (sp ? 1 : 0);
    return w;
}

/* a NUL-terminated copy of `s` in `buf` (0 when it does not fit or holds a NUL) */
static int cstr(span s, char *buf, size_t size) {
    if (s.n >= size || memchr(s.p, 0, s.n)) return 0;
    memcpy(buf, s.p, s.n);
    buf[s.n] = 0;
    return 1;
}

/* lastgood.current for one "file" line: "file DEV INO SIZE MTIME CTIME PATH" or
 * "file - PATH" (it was not there) */
static int file_current(span rest) {
    long long want[5];
    struct stat st;
    char path[4096];
    span first = next_word(&rest);
    if (span_is(first, "-")) {
        if (!cstr(rest, path, sizeof path)) return 0;
        return stat(path, &st) != 0;
    }
    if (!to_ll(first, &want[0])) return 0;
    for (int i = 1; i < 5; i++)
        if (!to_ll(next_word(&rest), &want[i])) return 0;
    if (!cstr(rest, path, sizeof path) || stat(path, &st) != 0) return 0;
    return (long long)st.st_dev == want[0] && (long long)st.st_ino == want[1] &&
           (long long)st.st_size == want[2] &&
           (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec == want[3] &&
           (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec == want[4];
}

/* read and check the index: NULL when usable, else why not */
static const char *read_index(const char *runtime) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", runtime, INDEX_NAME) >= sizeof path)
        return "no-index";
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return "no-index";
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_uid != geteuid() && st.st_uid != 0) ||
        st.st_size > MAX_INDEX) {
        close(fd);
        return "no-index";
    }
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, index_data + n, MAX_INDEX - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { close(fd); return "no-index"; }
        if (r == 0) break;
        n += (size_t)r;
        if (n == MAX_INDEX) { close(fd); return "no-index"; }
    }
    close(fd);
    const char *source = getenv("HOSHIKAGE_CONFIG");
    if (source == NULL || !*source) source = DEFAULT_MANIFEST;
    span rest = {index_data, n};
    int lines = 0, files = 0, sourced = 0;
    model *m = NULL;
    while (rest.n) {
        const char *nl = memchr(rest.p, '\n', rest.n);
        if (nl == NULL) return "index-broken";
        span line = {rest.p, (size_t)(nl - rest.p)};
        rest.p = nl + 1;
        rest.n -= line.n + 1;
        if (lines++ == 0) {
            if (!span_is(line, INDEX_MAGIC)) return "index-version";
            continue;
        }
        span key = next_word(&line);
        if (span_is(key, "manifest")) {
            if (!span_is(line, source)) return "another-manifest";
            sourced = 1;
        } else if (span_is(key, "file")) {
            if (!file_current(line)) return "index-stale";
            files++;
        } else if (span_is(key, "api_keys")) {
            idx.api_keys = span_is(line, "1");
        } else if (span_is(key, "max_body")) {
            if (!to_ll(line, &idx.max_body)) return "index-broken";
        } else if (span_is(key, "default")) {
            idx.def = line;
        } else if (span_is(key, "runtime")) {
            idx.runtime = line;
        } else if (span_is(key, "route")) {
            if (idx.nroutes == 256) return "index-broken";
            idx.route_methods[idx.nroutes] = next_word(&line);
            idx.routes[idx.nroutes++] = line;
        } else if (span_is(key, "prefix")) {
            if (idx.nprefixes == 32) return "index-broken";
            idx.prefixes[idx.nprefixes++] = line;
        } else if (span_is(key, "named")) {
            if (idx.nnamed == 32) return "index-broken";
            idx.named[idx.nnamed++] = line;
        } else if (span_is(key, "model")) {
            if (idx.nmodels == MAX_MODELS) return "index-broken";
            m = &idx.models[idx.nmodels++];
            m->keyed = span_is(next_word(&line), "1");
            m->name = line;
            if (idx.nentries == MAX_NAMES) return "index-broken";
            idx.entries[idx.nentries++] = (entry){idx.nmodels - 1, 'n', line};
        } else if (m && (span_is(key, "alias") || span_is(key, "tag") ||
                         span_is(key, "lower"))) {
            if (idx.nentries == MAX_NAMES) return "index-broken";
            idx.entries[idx.nentries++] = (entry){idx.nmodels - 1, key.p[0], line};
        } else if (m && span_is(key, "launch")) {
            m->launch = 1;
            if (!to_ll(next_word(&line), &m->estimate) || !to_ll(next_word(&line), &m->needed)
                || !to_ll(next_word(&line), &m->size) || !to_ll(line, &m->mtime_ns))
                return "index-broken";
        } else if (m && span_is(key, "source")) {
            m->source = line;
        } else if (m && span_is(key, "staged")) {
            m->staged = line;
        } else if (m && span_is(key, "ticket")) {
            /* "ticket LENGTH", then LENGTH raw bytes and a newline */
            long long len;
            if (!to_ll(line, &len) || len < 0 || (size_t)len + 1 > rest.n ||
                rest.p[len] != '\n')
                return "index-broken";
            m->ticket = (span){rest.p, (size_t)len};
            rest.p += len + 1;
            rest.n -= (size_t)len + 1;
        } else if (span_is(key, "end")) {
            if (!sourced || !files || !idx.runtime.n) return "index-broken";
            return NULL;
        }
        /* other keys: a later writer's, read by a later front */
    }
    return "index-broken"; /* no "end": cut short */
}

/* routes.classify(...) == Route.FORWARD, from the index's copy of routes.py's tables */
static int forwarded(parsed *r) {
    if (span_is(r->method, "OPTIONS")) return 0;
    for (int i = 0; i < idx.nroutes; i++) {
        if (r->path.n == idx.routes[i].n && !memcmp(r->path.p, idx.routes[i].p, r->path.n)) {
            span methods = idx.route_methods[i];
            while (methods.n) {
                span w = {methods.p, 0};
                const char *comma = memchr(methods.p, ',', methods.n);
                w.n = comma ? (size_t)(comma - methods.p) : methods.n;
                if (w.n == r->method.n && !memcmp(w.p, r->method.p, w.n)) return 1;
                methods.p += w.n + (comma ? 1 : 0);
                methods.n -= w.n + (comma ? 1 : 0);
            }
            return 0;
        }
    }
    for (int i = 0; i < idx.nprefixes; i++)
        if (r->path.n >= idx.prefixes[i].n &&
            !memcmp(r->path.p, idx.prefixes[i].p, idx.prefixes[i].n))
            return span_is(r->method, "POST");
    span unused;
    for (int i = 0; i < idx.nnamed; i++)
        if (r->path.n == idx.named[i].n && !memcmp(r->path.p, idx.named[i].p, r->path.n))
            return query_get(r->query, "model", &unused);
    return 0;
}

static int same(span a, span b) { return a.n == b.n && !memcmp(a.p, b.p, a.n); }

/* index.lookup (naming.matches over the index's table): the model's position, -1 for
 * none, -2 for several (index.Ambiguous), -3 for a name this front cannot compare */
static int lookup(span name, int none) {
    if (none || name.n == 0) {
        for (int i = 0; idx.def.n && i < idx.nmodels; i++)
            if (same(idx.models[i].name, idx.def)) return i;
        return -1;
    }
    for (int i = 0; i < idx.nentries; i++)
        if (idx.entries[i].kind == 'n' && same(idx.entries[i].text, name))
            return idx.entries[i].model;
    for (const char *kind = "at"; *kind; kind++)
        for (int i = 0; i < idx.nentries; i++)
            if (idx.entries[i].kind == *kind && same(idx.entries[i].text, name))
                return idx.entries[i].model;
    /* partial: name.lower() in each name's and alias's lower(), which the writer keeps
     * (str.lower of non-ASCII text is Unicode's: only an ASCII needle is compared here) */
    char needle[256];
    if (name.n >= sizeof needle) return -3;
    for (size_t i = 0; i < name.n; i++) {
        unsigned char c = (unsigned char)name.p[i];
        if (c >= 0x80 || c == 0) return -3;
        needle[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    int found = -1;
    for (int i = 0; i < idx.nentries; i++) {
        entry *e = &idx.entries[i];
        if (e->kind == 'l' && e->model != found && memmem(e->text.p, e->text.n, needle, name.n)) {
            if (found >= 0) return -2;
            found = e->model;
        }
    }
    return found;
}

/* ---- admission, ticket, start: admit.py and take.start ------------------------------ */

/* units.escape: systemd-escape of an instance string */
static int escape(span name, char *out, size_t size) {
    size_t at = 0;
    for (size_t i = 0; i < name.n; i++) {
        unsigned char c = (unsigned char)name.p[i];
        int plain = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
                    || c == ':' || c == '_' || (c == '.' && i > 0);
        int need = c == '/' || plain ? 1 : 4;
        if (at + (size_t)need >= size) return 0;
        if (c == '/') out[at++] = '-';
        else if (plain) out[at++] = (char)c;
        else at += (size_t)snprintf(out + at, size - at, "\\x%02x", c);
    }
    out[at] = 0;
    return 1;
}

static long long mem_available(void) {
    char buf[8192];
    int fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *at = strstr(buf, "\nMemAvailable:");
    if (at == NULL) return -1;
    return strtoll(at + 14, NULL, 10) * 1024;
}

/* protocol.write_file: a hidden temporary beside `path`, then a rename */
static int write_file(const char *dir, const char *sub, const char *name, const char *suffix,
                      const char *data, size_t n, mode_t mode) {
    char parent[4096], path[4096], temporary[4096];
    if ((size_t)snprintf(parent, sizeof parent, "%s/%s", dir, sub) >= sizeof parent ||
        (size_t)snprintf(path, sizeof path, "%s/%s%s", parent, name, suffix) >= sizeof path ||
        (size_t)snprintf(temporary, sizeof temporary, "%s/.%s%s.tmp-%d", parent, name, suffix,
                         (int)getpid()) >= sizeof temporary)
        return 0;
    if ((mkdir(dir, 0755) != 0 && errno != EEXIST) || (mkdir(parent, 0755) != 0 && errno != EEXIST))
        return 0;
    int fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0) return 0;
    int ok = fchmod(fd, mode) == 0;
    for (size_t at = 0; ok && at < n;) {
        ssize_t w = write(fd, data + at, n - at);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) ok = 0;
        else at += (size_t)w;
    }
    close(fd);
    if (!ok || rename(temporary, path) != 0) {
        unlink(temporary);
        return 0;
    }
    return 1;
}

static void withdraw(const char *runtime, const char *name) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/launch/%s", runtime, name) < sizeof path)
        unlink(path);
    if ((size_t)snprintf(path, sizeof path, "%s/admitted/%s.json", runtime, name) < sizeof path)
        unlink(path);
}

/* protocol.write_admitted and protocol.write_ticket for `m` */
static int leave_ticket(const char *runtime, const char *name, model *m) {
    char record[64];
    int n = snprintf(record, sizeof record, "{\"estimate\": %lld}", m->estimate);
    if (!write_file(runtime, "admitted", name, ".json", record, (size_t)n, 0644)) return 0;
    size_t size = sizeof MAGIC + 40 + m->ticket.n;
    char *ticket = malloc(size);
    if (ticket == NULL) return 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int head = snprintf(ticket, size, "%s%c%.9f%c", MAGIC, 0,
                        (double)ts.tv_sec + (double)ts.tv_nsec / 1e9 + TICKET_TTL, 0);
    memcpy(ticket + head, m->ticket.p, m->ticket.n);
    int ok = write_file(runtime, "launch", name, "", ticket, (size_t)head + m->ticket.n, 0600);
    free(ticket);
    return ok;
}

#define MANAGER "org.freedesktop.systemd1", "/org/freedesktop/systemd1", \
                "org.freedesktop.systemd1.Manager"

/* when the bus was open, the units listed, the ticket left (for the router's log) */
static long long stamps[3];

/* admit.admit and take.start for `m`: NULL when its unit was started, else why not.
 * `available`: MemAvailable at the admission. */
static const char *admit_and_start(model *m, long long *available) {
    char runtime[4096], name[256], unit[1200], path[4096];
    if (!m->launch) return "no-launch";
    if (!cstr(idx.runtime, runtime, sizeof runtime) || !cstr(m->name, name, sizeof name))
        return "index-broken";
    /* protocol.valid_name: the index's names reach paths and a unit name */
    for (size_t i = 0; i < m->name.n; i++) {
        char c = name[i];
        int ok = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                 (i > 0 && (c == '.' || c == '_' || c == ':' || c == '-'));
        if (!ok) return "index-broken";
    }
    if (m->name.n == 0 || m->name.n > 100 || !escape(m->name, unit, sizeof unit - 40))
        return "index-broken";
    memmove(unit + strlen(UNIT_PREFIX), unit, strlen(unit) + 1);
    memcpy(unit, UNIT_PREFIX, strlen(UNIT_PREFIX));
    strcat(unit, ".service");
    struct stat st;
    if (!cstr(m->source, path, sizeof path) || stat(path, &st) != 0 ||
        (long long)st.st_size != m->size ||
        (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec != m->mtime_ns)
        return "file-changed";
    if (!cstr(m->staged, path, sizeof path) || stat(path, &st) == 0) return "staged";
    *available = mem_available();
    if (*available < m->needed) return "memory";

    if ((size_t)snprintf(path, sizeof path, "%s/admission.lock", runtime) >= sizeof path)
        return "index-broken";
    int lock = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock < 0) return "no-lock";
    if (flock(lock, LOCK_EX) != 0) { close(lock); return "no-lock"; }
    sd_bus *bus = NULL;
    sd_bus_error error = SD_BUS_ERROR_NULL;
    sd_bus_message *reply = NULL;
    const char *why = NULL;
    char state[32] = "inactive";
    int opened = sd_bus_open_system(&bus);
    stamps[0] = now_usec();
    if (opened < 0 ||
        sd_bus_call_method(bus, MANAGER, "ListUnitsByPatterns", &error, &reply, "asas", 0, 1,
                           UNIT_PREFIX "*.service") < 0 ||
        sd_bus_message_enter_container(reply, 'a', "(ssssssouso)") < 0) {
        why = "bus-error";
    } else {
        const char *u, *active, *ignore;
        uint32_t job;
        int r;
        while ((r = sd_bus_message_read(reply, "(ssssssouso)", &u, &ignore, &ignore, &active,
                                        &ignore, &ignore, &ignore, &job, &ignore, &ignore)) > 0) {
            if (!strcmp(u, unit)) snprintf(state, sizeof state, "%s", active);
            if (!strcmp(active, "active") || !strcmp(active, "activating") ||
                !strcmp(active, "deactivating") || !strcmp(active, "reloading"))
                why = "unit-up"; /* units.UP_STATES: the router's to judge */
        }
        if (r < 0) why = "bus-error";
    }
    reply = sd_bus_message_unref(reply);
    sd_bus_error_free(&error);
    stamps[1] = now_usec();
    if (why == NULL && !leave_ticket(runtime, name, m)) {
        withdraw(runtime, name);
        why = "no-ticket";
    }
    close(lock);
    stamps[2] = now_usec();
    if (why == NULL) {
        /* units.start_unit: a failed unit is reset first (its failure is not this start's) */
        if (!strcmp(state, "failed"))
            sd_bus_call_method(bus, MANAGER, "ResetFailedUnit", &error, NULL, "s", unit);
        sd_bus_error_free(&error);
        if (sd_bus_call_method(bus, MANAGER, "StartUnit", &error, NULL, "ss", unit,
                               "replace") < 0) {
            withdraw(runtime, name);
            why = "start-failed";
        }
        sd_bus_error_free(&error);
    }
    sd_bus_flush_close_unref(bus);
    return why;
}

/* ---- the front ---------------------------------------------------------------------- */

#define LISTEN_FDS_START 3

/* sd_listen_fds(3) without its side effects: the sockets stay inheritable and LISTEN_*
 * stay set, for the router this execs (the same process: LISTEN_PID stays true) */
static int listen_fds(void) {
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    long long p, n;
    if (!pid || !fds || !to_ll((span){pid, strlen(pid)}, &p) || p != (long long)getpid() ||
        !to_ll((span){fds, strlen(fds)}, &n) || n < 1 || n > 64)
        return 0;
    return (int)n;
}

static int peek(int fd, size_t *n) {
    long long deadline = now_usec() + PEEK_WAIT_NS / 1000;
    for (;;) {
        long long left = deadline - now_usec();
        struct pollfd p = {fd, POLLIN, 0};
        if (left <= 0 || poll(&p, 1, (int)((left + 999) / 1000)) <= 0) return 0;
        ssize_t r = recv(fd, request, sizeof request, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (r <= 0 || (size_t)r >= sizeof request) return 0;
        parsed unused;
        int state = parse_request(request, (size_t)r, &unused);
        *n = (size_t)r;
        if (state != INCOMPLETE) return 1;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL); /* the rest is on its way */
    }
}

/* the decision for a complete request in `data`: NULL with the model's position in
 * `*which`, else the reason to hand it over */
static const char *decide(const char *data, size_t n, int *which) {
    parsed r;
    if (parse_request(data, n, &r) != COMPLETE) return "not-parsed";
    if (!forwarded(&r)) return "not-forwarded";
    if (idx.api_keys) return "api-keys";
    if ((long long)r.body.n > idx.max_body) return "body-too-large";
    span name;
    int none;
    if (!model_of(r.body, r.query, &name, &none)) return "body-not-read";
    int found = lookup(name, none);
    if (found == -1) return "unknown-name";
    if (found == -2) return "ambiguous";
    if (found == -3) return "name-not-compared";
    if (idx.models[found].keyed) return "keyed";
    *which = found;
    return NULL;
}

static char front_env[512];

static void front(long long began) {
    int len = snprintf(front_env, sizeof front_env, "began=%lld", began);
    const char *runtime_env = getenv("RUNTIME_DIRECTORY");
    char runtime[4096] = DEFAULT_RUNTIME;
    if (runtime_env && *runtime_env && runtime_env[0] != ':')
        snprintf(runtime, sizeof runtime, "%.*s", (int)strcspn(runtime_env, ":"), runtime_env);
    const char *why = NULL;
    if (listen_fds() < 1) {
        why = "no-socket";
    } else {
        int listener = LISTEN_FDS_START;
        int flags = fcntl(listener, F_GETFL);
        int conn = -1;
        if (flags >= 0 && fcntl(listener, F_SETFL, flags | O_NONBLOCK) == 0) {
            conn = accept4(listener, NULL, NULL, 0); /* inherited by the router: no CLOEXEC */
            fcntl(listener, F_SETFL, flags);
        }
        size_t n = 0;
        int which = -1;
        long long available = 0;
        if (conn < 0) {
            why = "no-connection";
        } else {
            len += snprintf(front_env + len, sizeof front_env - (size_t)len, " conn=%d", conn);
            if (!peek(conn, &n)) why = "no-request";
            else if ((why = read_index(runtime)) == NULL)
                why = decide(request, n, &which);
        }
        long long looked = now_usec();
        if (why == NULL) why = admit_and_start(&idx.models[which], &available);
        if (why == NULL) {
            model *m = &idx.models[which];
            snprintf(front_env + len, sizeof front_env - (size_t)len,
                     " read=%lld bus=%lld listed=%lld ticket=%lld done=%lld started=%.*s"
                     " estimate=%lld available=%lld", looked, stamps[0], stamps[1], stamps[2],
                     now_usec(), (int)(m->name.n < 200 ? m->name.n : 0), m->name.p,
                     m->estimate, available);
            return;
        }
    }
    snprintf(front_env + len, sizeof front_env - (size_t)len, " handed=%s", why);
}

int main(int argc, char **argv) {
    long long began = now_usec();
    if (argc >= 2 && !strcmp(argv[1], "--decide")) {
        /* tests: the decision for the request on stdin, with the index in $RUNTIME_DIRECTORY
         * (with --ticket, the files it leaves too) */
        size_t n = 0;
        ssize_t r;
        while (n < sizeof request && (r = read(0, request + n, sizeof request - n)) > 0)
            n += (size_t)r;
        const char *dir = getenv("RUNTIME_DIRECTORY");
        const char *why = read_index(dir && *dir ? dir : DEFAULT_RUNTIME);
        int which = -1;
        if (why == NULL) why = decide(request, n, &which);
        if (why == NULL && argc >= 3 && !strcmp(argv[2], "--ticket")) {
            /* and the admitted record and ticket it would leave (no lock, no bus) */
            model *m = &idx.models[which];
            char runtime[4096], name[256];
            if (!m->launch || !cstr(idx.runtime, runtime, sizeof runtime) ||
                !cstr(m->name, name, sizeof name) || !leave_ticket(runtime, name, m))
                why = "no-ticket";
        }
        if (why == NULL) printf("start %.*s\n", (int)idx.models[which].name.n,
                                idx.models[which].name.p);
        else printf("hand-over %s\n", why);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "--escape")) {
        for (int i = 2; i < argc; i++) {
            char out[4096];
            span s = {argv[i], strlen(argv[i])};
            if (escape(s, out, sizeof out)) printf("%s\n", out);
        }
        return 0;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: hoshikage-front ROUTER [ARGS...]\n");
        return 2;
    }
    front(began);
    setenv("HOSHIKAGE_FRONT", front_env, 1);
    execv(argv[1], argv + 1);
    perror("hoshikage-front: exec");
    return 127;
}
