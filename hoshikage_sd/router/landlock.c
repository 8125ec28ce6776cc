/* hoshikage-landlock [--read DIR]... PROGRAM [ARG...]: run PROGRAM confined by Landlock, in
 * place of a mount namespace (hoshikage.service; README, "The router's confinement").
 *
 * The confinement ProtectSystem=strict, ProtectHome=read-only, PrivateTmp= and
 * PrivateDevices= give, without a mount namespace: systemd builds one at every start, on
 * each cold request's path (docs/performance.md), while Landlock is a few system calls.
 *   - read and execute beneath every directory in / but /dev and /tmp (and /var/tmp), as
 *     they are at its start: a mount beneath one is covered, a directory made in / later is
 *     not until the next start (the router exits when idle);
 *   - write only beneath the unit's own directories ($RUNTIME_DIRECTORY, $STATE_DIRECTORY,
 *     $CACHE_DIRECTORY, $LOGS_DIRECTORY, which systemd sets from RuntimeDirectory= etc.);
 *   - of /dev, /dev/null (read, write) and /dev/zero, /dev/random, /dev/urandom (read);
 *   - read and execute beneath each --read DIR too (a checkout under /tmp: testbed/deploy.py).
 * Connecting to a socket (the journal, D-Bus) is not a file access Landlock governs.
 *
 * It parses nothing but its environment and argv. A kernel without Landlock (not built,
 * or not in the boot's lsm= list) gets a warning on stderr, and PROGRAM runs unconfined
 * as before Landlock: `hoshikage check` says so too (--probe). Exit 127 when PROGRAM
 * cannot be run, as a shell does.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* newer than some build hosts' headers (linux-libc-dev 6.1 has ABI 2) */
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif
#ifndef LANDLOCK_ACCESS_FS_IOCTL_DEV
#define LANDLOCK_ACCESS_FS_IOCTL_DEV (1ULL << 15)
#endif

#define READ (LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR)
#define EXEC LANDLOCK_ACCESS_FS_EXECUTE
#define FILE_WRITE (LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_TRUNCATE)

static const char *const HIDDEN[] = {"/dev", "/tmp", "/var/tmp", NULL};
static const char *const DIRECTORIES[] = {"RUNTIME_DIRECTORY", "STATE_DIRECTORY",
                                          "CACHE_DIRECTORY", "LOGS_DIRECTORY", NULL};

static __u64 handled;  /* every file-system right this kernel's ABI knows */

static int abi(void) {
    return (int)syscall(SYS_landlock_create_ruleset, NULL, 0,
                        LANDLOCK_CREATE_RULESET_VERSION);
}

static __u64 rights_of(int version) {
    __u64 all = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;  /* ABI 1: bits 0-12 */
    if (version >= 2) all |= LANDLOCK_ACCESS_FS_REFER;
    if (version >= 3) all |= LANDLOCK_ACCESS_FS_TRUNCATE;
    if (version >= 5) all |= LANDLOCK_ACCESS_FS_IOCTL_DEV;
    return all;
}

/* `path` with `access` (of those the kernel handles) beneath it; a path that is not there
 * is skipped (an unused directory variable, a machine without /srv), and so is one that
 * cannot be opened at all when `optional` (an entry of / such as a link into /root). */
static int allow_path(int ruleset, const char *path, __u64 access, int optional) {
    struct landlock_path_beneath_attr rule = {.allowed_access = access & handled};
    rule.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (rule.parent_fd < 0) return errno == ENOENT || optional ? 0 : -1;
    struct stat st;
    if (fstat(rule.parent_fd, &st) == 0 && !S_ISDIR(st.st_mode))
        /* a file takes only the rights that act on files */
        rule.allowed_access &= EXEC | FILE_WRITE | LANDLOCK_ACCESS_FS_READ_FILE;
    int r = (int)syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
    int saved = errno;
    close(rule.parent_fd);
    errno = saved;
    return r;
}

static int allow(int ruleset, const char *path, __u64 access) {
    return allow_path(ruleset, path, access, 0);
}

static int is_hidden(const char *path) {
    for (int i = 0; HIDDEN[i]; i++)
        if (!strcmp(path, HIDDEN[i])) return 1;
    return 0;
}

/* 1 when a hidden path lies beneath `path` (its entries are then allowed one by one) */
static int holds_hidden(const char *path) {
    size_t n = strlen(path);
    for (int i = 0; HIDDEN[i]; i++)
        if (!strncmp(HIDDEN[i], path, n) && HIDDEN[i][n] == '/') return 1;
    return 0;
}

/* read and execute beneath each entry of `dir` ("" for /), hidden ones left out */
static int allow_reading(int ruleset, const char *dir) {
    DIR *d = opendir(*dir ? dir : "/");
    if (!d) return -1;
    struct dirent *e;
    char path[4096];
    int r = 0;
    while (r == 0 && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path) continue;
        if (is_hidden(path)) continue;
        r = holds_hidden(path) ? allow_reading(ruleset, path)
                               : allow_path(ruleset, path, READ | EXEC, 1);
    }
    closedir(d);
    return r;
}

static int allow_writing(int ruleset) {
    for (int i = 0; DIRECTORIES[i]; i++) {
        const char *value = getenv(DIRECTORIES[i]);
        if (!value) continue;
        char *list = strdup(value), *save = NULL;
        if (!list) return -1;
        for (char *p = strtok_r(list, ":", &save); p; p = strtok_r(NULL, ":", &save))
            if (allow(ruleset, p, handled) < 0) {
                free(list);
                return -1;
            }
        free(list);
    }
    return 0;
}

static int confine(int version, char **reads, int count) {
    handled = rights_of(version);
    struct landlock_ruleset_attr attr = {.handled_access_fs = handled};
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
    if (ruleset < 0) return -1;
    int r = allow_reading(ruleset, "");
    if (r == 0) r = allow_writing(ruleset);
    for (int i = 0; r == 0 && i < count; i++) r = allow(ruleset, reads[i], READ | EXEC);
    if (r == 0) r = allow(ruleset, "/dev/null", READ | FILE_WRITE);
    if (r == 0) r = allow(ruleset, "/dev/zero", READ);
    if (r == 0) r = allow(ruleset, "/dev/random", READ);
    if (r == 0) r = allow(ruleset, "/dev/urandom", READ);
    /* Landlock wants no_new_privs (NoNewPrivileges= sets it already) */
    if (r == 0) r = prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (r == 0) r = (int)syscall(SYS_landlock_restrict_self, ruleset, 0);
    int saved = errno;
    close(ruleset);
    errno = saved;
    return r;
}

int main(int argc, char **argv) {
    int first = 1;
    while (first < argc - 1 && !strcmp(argv[first], "--read")) first += 2;
    if (first >= argc || !strcmp(argv[first], "--read")) {
        fprintf(stderr, "usage: hoshikage-landlock [--read DIR]... PROGRAM [ARG...] | --probe\n");
        return 2;
    }
    /* the --read directories: argv[2], argv[4], ... */
    char *reads[argc / 2 + 1];
    int count = 0;
    for (int i = 2; i < first; i += 2) reads[count++] = argv[i];
    argv += first - 1;
    int version = abi();
    if (!strcmp(argv[1], "--probe")) {  /* for hoshikage check: the ABI, or why none */
        if (version < 0) {
            printf("none: %s\n", strerror(errno));
            return 1;
        }
        printf("%d\n", version);
        return 0;
    }
    if (version < 0)
        fprintf(stderr, "hoshikage-landlock: this kernel has no Landlock (%s): %s runs "
                "without its file-system confinement\n", strerror(errno), argv[1]);
    else if (confine(version, reads, count) < 0) {
        /* the rules are ours: failing to apply them is a bug, not the kernel's choice */
        fprintf(stderr, "hoshikage-landlock: cannot confine %s: %s\n", argv[1],
                strerror(errno));
        return 1;
    }
    execv(argv[1], argv + 1);
    fprintf(stderr, "hoshikage-landlock: cannot run %s: %s\n", argv[1], strerror(errno));
    return 127;
}
