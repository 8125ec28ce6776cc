/* hoshikage-launch NAME: ExecStart of hoshikage-model@NAME.service, compiled.
 *
 * The same launcher as launch.py (read that file's docstring first: the ticket, the router's
 * datagram, READY=1, the hand-over to the activator), without a Python interpreter to start:
 * A Python start on every cold start before llama-server can run is what this saves
 * (docs/performance.md). The installers build it when a C compiler is there and fall back to
 * the Python stub otherwise (launch.py's docstring says why both are kept).
 * tests/unit/test_launch.py runs both against one contract.
 *
 * Build: cc -O2 -Wall -Wextra -o hoshikage-launch hoshikage_sd/model_unit/launch.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Keep these in step with protocol.py (tests/unit/test_launch.py runs both forms). */
#define MAGIC "hoshikage-launch-1"
#define TICKET_DIR "launch"
#define DEFAULT_RUNTIME "/run/hoshikage"
#define LAUNCHED_DIR "launched"
#define ROUTER_SOCKET "router.notify"
#define NICE 19
#define POLL_NS 5000000L          /* /health polling */
#define WAIT_LIMIT 10.0           /* seconds of /health waiting before the activator takes over */
#define QUIET_WINDOW 0.05
#define QUIET_SHARE 0.1
#define HANDOVER_LIMIT 5.0
#define STOP_GRACE 8.0            /* seconds after SIGTERM before a second one, then SIGKILL */
#define MAX_TICKET (1 << 20)
#define MAX_FIELDS 4096

/* protocol.PASSED_ENV_PREFIXES and PASSED_ENV_NAMES: the unit's own environment that reaches
 * llama-server where the ticket does not set it (the contract test compares the lists). */
static const char *const PASSED_ENV_PREFIXES[] = {
    "AMD_", "CUDA_", "GGML_", "GPU_", "HIP_", "HSA_", "LLAMA_", "MESA_",
    "MKL_", "NVIDIA_", "OMP_", "ONEAPI_", "OPENBLAS_", "RADV_", "ROCR_",
    "SYCL_", "VK_", "ZES_", "ZE_", NULL};
static const char *const PASSED_ENV_NAMES[] = {"LD_LIBRARY_PATH", "DRI_PRIME", NULL};

extern char **environ;
static pid_t child = -1;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double seconds) {
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* config.NAME_RE: the name reaches a path. */
static int valid_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > 100)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || !strchr("._:-", c)))
            return 0;
    }
    return 1;
}

/* "KEY=VALUE": does KEY reach llama-server from the unit's environment? */
static int passed_env(const char *entry) {
    size_t k = strcspn(entry, "=");
    for (const char *const *n = PASSED_ENV_NAMES; *n; n++)
        if (strlen(*n) == k && strncmp(entry, *n, k) == 0)
            return 1;
    for (const char *const *p = PASSED_ENV_PREFIXES; *p; p++)
        if (strlen(*p) <= k && strncmp(entry, *p, strlen(*p)) == 0)
            return 1;
    return 0;
}

/* Does env (NULL-terminated) set the variable of "KEY=VALUE"? */
static int sets(char *const *env, const char *entry) {
    size_t k = strcspn(entry, "=");
    for (; *env; env++)
        if (strncmp(*env, entry, k) == 0 && ((*env)[k] == '=' || (*env)[k] == '\0'))
            return 1;
    return 0;
}

struct ticket {
    char *data;
    const char *socket;
    const char *health;
    char *env[MAX_FIELDS];
    char *argv[MAX_FIELDS];
};

/* The model's ticket, removed; 0 when there is none to use. */
static int take_ticket(const char *runtime_dir, const char *name, struct ticket *t) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s/%s", runtime_dir, TICKET_DIR, name) >= (int)sizeof path)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    t->data = malloc(MAX_TICKET + 1);
    ssize_t size = 0, got;
    while (t->data && size < MAX_TICKET && (got = read(fd, t->data + size, MAX_TICKET - size)) > 0)
        size += got;
    close(fd);
    unlink(path);
    if (!t->data || size <= 0 || size >= MAX_TICKET)
        return 0;
    t->data[size] = '\0';
    /* Fields are separated by NUL: magic, expiry, socket, health, env..., "", argv... */
    char *fields[2 * MAX_FIELDS];
    size_t count = 0;
    for (char *p = t->data; p <= t->data + size && count < 2 * MAX_FIELDS; p += strlen(p) + 1)
        fields[count++] = p;
    if (count < 5 || strcmp(fields[0], MAGIC) != 0)
        return 0;
    if (monotonic() > strtod(fields[1], NULL))
        return 0; /* stale: from a start that failed */
    t->socket = fields[2];
    t->health = fields[3];
    size_t i = 4, e = 0, a = 0;
    for (; i < count && fields[i][0] != '\0' && e < MAX_FIELDS - 1; i++)
        t->env[e++] = fields[i];
    t->env[e] = NULL;
    for (char **own = environ; *own && e < MAX_FIELDS - 1; own++)
        if (passed_env(*own) && !sets(t->env, *own)) {
            t->env[e++] = *own;
            t->env[e] = NULL;
        }
    if (i >= count || fields[i][0] != '\0')
        return 0;
    for (i++; i < count && a < MAX_FIELDS - 1; i++)
        t->argv[a++] = fields[i];
    t->argv[a] = NULL;
    return a > 0;
}

static int unix_address(const char *path, struct sockaddr_un *addr, socklen_t *len) {
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof addr->sun_path)
        return 0;
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    memcpy(addr->sun_path, path, n);
    if (path[0] == '@')
        addr->sun_path[0] = '\0'; /* abstract */
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    return 1;
}

/* The HTTP status of GET route on a unix socket, or 0 when nothing answers. */
static int probe(const char *path, const char *route) {
    struct sockaddr_un addr;
    socklen_t len;
    if (!unix_address(path, &addr, &len))
        return 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    char buf[4097];
    int status = 0;
    int n = snprintf(buf, sizeof buf, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", route);
    if (n > 0 && n < (int)sizeof buf && connect(fd, (struct sockaddr *)&addr, len) == 0 &&
        send(fd, buf, (size_t)n, MSG_NOSIGNAL) == n) {
        size_t have = 0;
        ssize_t got;
        buf[0] = '\0';
        while (have < sizeof buf - 1 && !strstr(buf, "\r\n") &&
               (got = recv(fd, buf + have, sizeof buf - 1 - have, 0)) > 0) {
            have += (size_t)got;
            buf[have] = '\0';
        }
        int code;
        if (strncmp(buf, "HTTP/", 5) == 0 && sscanf(buf, "HTTP/%*s %3d", &code) == 1)
            status = code;
    }
    close(fd);
    return status;
}

static void send_datagram(const char *path, const char *message) {
    struct sockaddr_un addr;
    socklen_t len;
    if (!unix_address(path, &addr, &len))
        return;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    sendto(fd, message, strlen(message), MSG_NOSIGNAL, (struct sockaddr *)&addr, len);
    close(fd);
}

/* Has the child exited? It stays unreaped, for the activator to collect its status. */
static int exited(pid_t pid) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0)
        return 1;
    return info.si_pid != 0;
}

/* CPU time all of pid's threads have used (ns, from schedstat), or -1 if unknown. */
static long long cpu_ns(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *dir = opendir(path);
    if (!dir)
        return -1;
    long long total = -1;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (d->d_name[0] == '.')
            continue;
        char stat[320];
        snprintf(stat, sizeof stat, "/proc/%d/task/%s/schedstat", (int)pid, d->d_name);
        FILE *f = fopen(stat, "re");
        long long ns;
        if (f && fscanf(f, "%lld", &ns) == 1)
            total = (total < 0 ? 0 : total) + ns;
        if (f)
            fclose(f);
    }
    closedir(dir);
    return total;
}

/* Return once llama-server has been quiet for QUIET_WINDOW, exited, or `until` passed. */
static void wait_quiet(pid_t pid, double until) {
    long long last = cpu_ns(pid);
    while (last >= 0 && !exited(pid) && monotonic() < until) {
        sleep_s(QUIET_WINDOW);
        long long now = cpu_ns(pid);
        if (now < 0 || (double)(now - last) < QUIET_WINDOW * QUIET_SHARE * 1e9)
            return;
        last = now;
    }
}

/* A stop while llama-server loads or gives its first answer: pass it on, wait for it, and
 * leave. With a request in flight llama-server can hang on SIGTERM: a second one after
 * STOP_GRACE makes it exit at once, SIGKILL follows as long after that. */
static void on_stop(int signum) {
    kill(child, signum);
    for (int round = 0; round < 2; round++) {
        double until = monotonic() + STOP_GRACE;
        while (monotonic() < until) {
            if (waitpid(child, NULL, WNOHANG) == child)
                _exit(0);
            sleep_s(0.05);
        }
        kill(child, round == 0 ? SIGTERM : SIGKILL);
    }
    waitpid(child, NULL, 0);
    _exit(0);
}

/* protocol.write_launched: "PID SPAWNED HEALTHY\n", written as protocol.write_file writes (a
 * hidden temporary name beside it, then a rename); bookkeeping only, so errors are ignored. */
static void write_launched(const char *runtime_dir, const char *name, pid_t pid, double spawned,
                           double healthy) {
    char dir[4200], path[4400], temporary[4500], text[128];
    snprintf(dir, sizeof dir, "%s/%s", runtime_dir, LAUNCHED_DIR);
    mkdir(runtime_dir, 0755);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(temporary, sizeof temporary, "%s/.%s.tmp-%d", dir, name, (int)getpid());
    int n = snprintf(text, sizeof text, "%d %.9f %.9f\n", (int)pid, spawned, healthy);
    int fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    int ok = write(fd, text, (size_t)n) == n;
    close(fd);
    if (!ok || rename(temporary, path) != 0)
        unlink(temporary);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fputs("usage: hoshikage-launch NAME\n", stderr);
        return 2;
    }
    const char *name = argv[1];
    char hoshikage[4096];
    const char *slash = strrchr(argv[0], '/');
    int dir_len = slash ? (int)(slash - argv[0]) : 1;
    if (snprintf(hoshikage, sizeof hoshikage, "%.*s/hoshikage", dir_len,
                 slash ? argv[0] : ".") >= (int)sizeof hoshikage) {
        fputs("hoshikage-launch: path too long\n", stderr);
        return 1;
    }
    /* protocol.runtime_dir: $RUNTIME_DIRECTORY's first entry, else DEFAULT_RUNTIME */
    char runtime_dir[4096] = "";
    const char *rd = getenv("RUNTIME_DIRECTORY");
    if (!rd || !*rd || *rd == ':')
        rd = DEFAULT_RUNTIME;
    snprintf(runtime_dir, sizeof runtime_dir, "%.*s", (int)strcspn(rd, ":"), rd);

    char pid_arg[32], spawned_arg[64], healthy_arg[64];
    char *command[10] = {hoshikage, "activate", (char *)name, NULL};
    static struct ticket t;
    if (runtime_dir[0] && valid_name(name) && take_ticket(runtime_dir, name, &t)) {
        unlink(t.socket); /* llama-server does not remove a stale socket itself */
        posix_spawn_file_actions_t actions;
        posix_spawnattr_t attr;
        sigset_t defaults;
        sigemptyset(&defaults);
        sigaddset(&defaults, SIGPIPE);
        sigaddset(&defaults, SIGXFSZ);
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
        posix_spawnattr_init(&attr);
        posix_spawnattr_setsigdefault(&attr, &defaults);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
        double started = monotonic();
        pid_t pid;
        if (posix_spawnp(&pid, t.argv[0], &actions, &attr, t.argv, t.env) == 0) {
            child = pid;
            signal(SIGTERM, on_stop);
            signal(SIGINT, on_stop);
            double healthy = -1;
            while (!exited(pid) && monotonic() < started + WAIT_LIMIT) {
                if (probe(t.socket, t.health) == 200) {
                    healthy = monotonic();
                    break;
                }
                sleep_s(POLL_NS / 1e9);
            }
            if (healthy >= 0) {
                char path[4200], message[256];
                snprintf(path, sizeof path, "%s/%s", runtime_dir, ROUTER_SOCKET);
                send_datagram(path, name); /* first: a request is waiting for this */
                const char *notify_socket = getenv("NOTIFY_SOCKET");
                snprintf(message, sizeof message, "READY=1\nSTATUS=serving %s", name);
                if (notify_socket)
                    send_datagram(notify_socket, message);
                write_launched(runtime_dir, name, pid, started, healthy);
                wait_quiet(pid, healthy + HANDOVER_LIMIT);
            }
            /* A stop from here until the activator can pass it on waits (blocked, kept pending
             * across exec): by default it would end this process and leave llama-server
             * serving through its unit's stop. The activator unblocks it. */
            sigset_t stops;
            sigemptyset(&stops);
            sigaddset(&stops, SIGTERM);
            sigaddset(&stops, SIGINT);
            sigprocmask(SIG_BLOCK, &stops, NULL);
            signal(SIGTERM, SIG_DFL);
            signal(SIGINT, SIG_DFL);
            snprintf(pid_arg, sizeof pid_arg, "%d", (int)pid);
            snprintf(spawned_arg, sizeof spawned_arg, "%.9f", started);
            int n = 3;
            command[n++] = "--adopt";
            command[n++] = pid_arg;
            command[n++] = "--spawned";
            command[n++] = spawned_arg;
            if (healthy >= 0) {
                snprintf(healthy_arg, sizeof healthy_arg, "%.9f", healthy);
                command[n++] = "--healthy";
                command[n++] = healthy_arg;
            }
            command[n] = NULL;
            /* Nothing waits for the activator: its imports must not slow llama-server. */
            if (setpriority(PRIO_PROCESS, 0, NICE) != 0)
                perror("hoshikage-launch: setpriority");
        } /* else: the activator tries again and says what is wrong */
    }
    execv(hoshikage, command);
    fprintf(stderr, "hoshikage-launch: cannot run %s: %s\n", hoshikage, strerror(errno));
    return 1;
}
