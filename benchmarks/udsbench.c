/*
 * udsbench: the C reference peer of `udskit bench`.
 *
 * The floor that every Python contender is measured against: AF_UNIX stream sockets, the
 * same wire format (a 4-byte big-endian length, then the payload) and the same JSON-lines
 * protocol on stdout as the Python peers (src/udskit/bench/wire.py):
 *
 *     {"ready": "PATH"}                 a server accepts connections
 *     {"connected": N}                  load: N clients connected, each with one echo; it
 *                                       then waits for a line (or EOF) on stdin
 *     {"not_measured": "REASON"}        this host does not allow the job (exit status 0)
 *     {"result": {...}}                 what this side measured (times: CLOCK_MONOTONIC ns,
 *                                       which all processes share)
 *
 * Roles:
 *     rtt_server PATH         echo frames on one connection until it closes
 *     rtt_client PATH         time --count round trips of --size bytes (after --warmup)
 *     stream_receiver PATH    count frames on one connection until it closes
 *     stream_sender PATH      send --count frames of --size bytes, or for --seconds
 *                             (after --warmup frames, neither timed nor counted)
 *     echo_server PATH        epoll server echoing bytes to any number of clients, until SIGTERM
 *     load ADDRESS            --clients concurrent clients, each sending --size byte frames
 *                             and awaiting the echo, --count in all or for --seconds
 *
 * Options: --size N --count N --warmup N --seconds S --cpu N (pin to that CPU) --clients N
 *          --tcp (ADDRESS is HOST:PORT on TCP loopback rather than a socket path)
 *          --busy (poll with MSG_DONTWAIT instead of sleeping in the kernel)
 *          --buffer N (SO_SNDBUF and SO_RCVBUF on the connected sockets)
 *
 * Build: cc -O2 -o udsbench udsbench.c   (udskit bench does this into its cache directory)
 *
 * The receiver parses frames in place and never copies a payload; the sender writes header
 * and payload with one sendmsg(). Every loop is bounded by a count and by a time cap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Receive buffer: the same 256 KiB the Python peers read with. */
#define READ_CHUNK (256 * 1024)
/* The sender looks at the clock once per this many bytes sent (as the Python peers do). */
#define CLOCK_EVERY_BYTES (256 * 1024)
/* Listen backlog of the echo server: its clients connect in a burst. */
#define ECHO_BACKLOG 4096
/* Largest frame a round-trip peer handles: the round trips use small messages. */
#define RTT_MAX (1024 * 1024)
/* Descriptors besides one per client (as FD_HEADROOM in src/udskit/bench/host.py). */
#define FD_HEADROOM 256
/* How long the load generator waits for the server to accept one more client (as
 * CONNECT_STALL_SECONDS in src/udskit/bench/loader.py). */
#define CONNECT_STALL_S 10
/* How long every client's first, untimed echo may take in all (FIRST_ECHO_SECONDS). */
#define FIRST_ECHO_NS (30 * 1000000000LL)

struct options {
    const char *role;
    const char *path;
    long size;
    long count;
    long warmup;
    double seconds;
    int cpu;
    int busy;
    int buffer;
    long clients;
    int tcp;
};

static volatile sig_atomic_t stopping;

static void die(const char *what) {
    fprintf(stderr, "udsbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(const char *why) {
    fprintf(stderr, "udsbench: %s\nusage: udsbench ROLE PATH [--size N] [--count N] "
                    "[--warmup N] [--seconds S] [--cpu N] [--busy] [--buffer N]\n", why);
    exit(2);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long number(const char *text, const char *name) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || value < 0) {
        fprintf(stderr, "udsbench: %s must be a non-negative integer, not '%s'\n", name, text);
        exit(2);
    }
    return value;
}

static struct options parse_args(int argc, char **argv) {
    struct options o = {0};
    o.size = 64;
    o.cpu = -1;
    if (argc < 3) usage("missing ROLE or PATH");
    o.role = argv[1];
    o.path = argv[2];
    for (int i = 3; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(arg, "--busy")) { o.busy = 1; continue; }
        if (!strcmp(arg, "--tcp")) { o.tcp = 1; continue; }
        if (!value) usage("an option is missing its value");
        if (!strcmp(arg, "--size")) o.size = number(value, "--size");
        else if (!strcmp(arg, "--count")) o.count = number(value, "--count");
        else if (!strcmp(arg, "--warmup")) o.warmup = number(value, "--warmup");
        else if (!strcmp(arg, "--cpu")) o.cpu = (int)number(value, "--cpu");
        else if (!strcmp(arg, "--clients")) o.clients = number(value, "--clients");
        else if (!strcmp(arg, "--buffer")) o.buffer = (int)number(value, "--buffer");
        else if (!strcmp(arg, "--seconds")) o.seconds = strtod(value, NULL);
        else usage("unknown option");
        i++;
    }
    return o;
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity");
}

static struct sockaddr_un address(const char *path) {
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sun.sun_path) {
        fprintf(stderr, "udsbench: socket path longer than %zu bytes: %s\n",
                sizeof sun.sun_path - 1, path);
        exit(2);
    }
    strcpy(sun.sun_path, path);
    return sun;
}

static void tune(int fd, const struct options *o) {
    if (!o->buffer) return;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &o->buffer, sizeof o->buffer)) die("SO_SNDBUF");
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &o->buffer, sizeof o->buffer)) die("SO_RCVBUF");
}

static int listen_on(const struct options *o, int backlog) {
    struct sockaddr_un sun = address(o->path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (bind(fd, (struct sockaddr *)&sun, sizeof sun)) die(o->path);
    if (listen(fd, backlog)) die("listen");
    printf("{\"ready\": \"%s\"}\n", o->path);
    fflush(stdout);
    return fd;
}

/* Raise RLIMIT_NOFILE's soft limit to hold --clients connections; when the hard limit is too
 * low, say so on stdout ({"not_measured": ...}) and stderr, and exit 0: the figure is not
 * measured on this host, which is not the contender's failure. */
static void raise_nofile(const struct options *o, const char *who) {
    rlim_t needed = (rlim_t)o->clients + FD_HEADROOM;
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim)) die("getrlimit");
    if (lim.rlim_cur == RLIM_INFINITY || lim.rlim_cur >= needed) return;
    char reason[512];
    if (lim.rlim_max == RLIM_INFINITY || lim.rlim_max >= needed) {
        rlim_t soft = lim.rlim_cur;
        lim.rlim_cur = needed;
        if (!setrlimit(RLIMIT_NOFILE, &lim)) return;
        /* Not seen on Linux below the hard limit; a seccomp or LSM policy could do it. */
        snprintf(reason, sizeof reason,
                 "the %s cannot hold %ld clients: RLIMIT_NOFILE (open files) is %llu, below "
                 "the %llu descriptors needed, and setrlimit refused to raise it (%s); run "
                 "`ulimit -n %llu` in the shell first",
                 who, o->clients, (unsigned long long)soft, (unsigned long long)needed,
                 strerror(errno), (unsigned long long)needed);
    } else {
        snprintf(reason, sizeof reason,
                 "the %s cannot hold %ld clients: RLIMIT_NOFILE (open files) is %llu, hard "
                 "limit %llu, below the %llu descriptors needed, and only root can raise a "
                 "hard limit; raise it (as root, `ulimit -Hn %llu`, or nofile in "
                 "/etc/security/limits.conf), then `ulimit -n %llu`, and run again",
                 who, o->clients, (unsigned long long)lim.rlim_cur,
                 (unsigned long long)lim.rlim_max, (unsigned long long)needed,
                 (unsigned long long)needed, (unsigned long long)needed);
    }
    fprintf(stderr, "%s\n", reason);
    printf("{\"not_measured\": \"%s\"}\n", reason);  /* no quote or backslash in it */
    fflush(stdout);
    exit(0);
}

static int accept_one(const struct options *o) {
    int listener = listen_on(o, 1);
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) die("accept");
    close(listener);
    unlink(o->path);
    tune(fd, o);
    return fd;
}

static int connect_to(const struct options *o) {
    struct sockaddr_un sun = address(o->path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&sun, sizeof sun)) die(o->path);
    tune(fd, o);
    return fd;
}

/* recv() that sleeps in the kernel, or polls with MSG_DONTWAIT when --busy. */
static ssize_t receive(int fd, void *buf, size_t len, int busy) {
    for (;;) {
        ssize_t got = recv(fd, buf, len, busy ? MSG_DONTWAIT : 0);
        if (got >= 0) return got;
        if (errno == EINTR || (busy && errno == EAGAIN)) continue;
        die("recv");
    }
}

/* Send every byte of the iovecs, polling on a full buffer when --busy. */
static void send_all(int fd, struct iovec *iov, int n, int busy) {
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n};
    while (msg.msg_iovlen) {
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL | (busy ? MSG_DONTWAIT : 0));
        if (sent < 0) {
            if (errno == EINTR || (busy && errno == EAGAIN)) continue;
            die("send");
        }
        while (msg.msg_iovlen && (size_t)sent >= msg.msg_iov->iov_len) {
            sent -= (ssize_t)msg.msg_iov->iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen) {
            msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + sent;
            msg.msg_iov->iov_len -= (size_t)sent;
        }
    }
}

static uint32_t frame_length(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_length(unsigned char *p, uint32_t n) {
    p[0] = n >> 24; p[1] = n >> 16; p[2] = n >> 8; p[3] = n;
}

/* Read one whole frame into buf (header included); 0 at a clean end of stream. */
static size_t read_frame(int fd, unsigned char *buf, size_t cap, int busy) {
    size_t have = 0;
    for (;;) {
        if (have >= 4) {
            size_t whole = 4 + (size_t)frame_length(buf);
            if (whole > cap) { fprintf(stderr, "udsbench: frame too large\n"); exit(1); }
            if (have >= whole) return whole;
        }
        ssize_t got = receive(fd, buf + have, cap - have, busy);
        if (got == 0) {
            if (have) { fprintf(stderr, "udsbench: stream ended mid-frame\n"); exit(1); }
            return 0;
        }
        have += (size_t)got;
    }
}

static int rtt_server(const struct options *o) {
    int fd = accept_one(o);
    unsigned char *buf = malloc(RTT_MAX + 4);
    if (!buf) die("malloc");
    size_t whole;
    while ((whole = read_frame(fd, buf, RTT_MAX + 4, o->busy))) {
        struct iovec iov = {buf, whole};
        send_all(fd, &iov, 1, o->busy);
    }
    close(fd);
    free(buf);
    return 0;
}

/* What the Python contenders send too (bench/loops.py, make_payload): a repeating 0-255
 * pattern, written into every page. calloc()'s zeros above the mmap threshold are the
 * kernel's shared zero page until written: a copy from it reads one cached page. */
static void fill_payload(unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)i;
}

static int rtt_client(const struct options *o) {
    if (o->size > RTT_MAX) usage("--size too large for a round trip");
    int fd = connect_to(o);
    size_t whole = 4 + (size_t)o->size;
    unsigned char *out = calloc(1, whole), *in = malloc(RTT_MAX + 4);
    int64_t *samples = malloc(sizeof(int64_t) * (size_t)(o->count ? o->count : 1));
    if (!out || !in || !samples) die("malloc");
    fill_payload(out + 4, (size_t)o->size);
    put_length(out, (uint32_t)o->size);
    long n = 0;
    int64_t deadline = 0;
    for (long i = 0; i < o->warmup + o->count; i++) {
        if (i == o->warmup) deadline = now_ns() + (int64_t)(o->seconds * 1e9);
        int64_t start = now_ns();
        struct iovec iov = {out, whole};
        send_all(fd, &iov, 1, o->busy);
        if (!read_frame(fd, in, RTT_MAX + 4, o->busy)) {
            fprintf(stderr, "udsbench: the server closed the connection mid-test\n");
            return 1;
        }
        int64_t end = now_ns();
        if (i >= o->warmup) {
            samples[n++] = end - start;
            if (end > deadline) break;
        }
    }
    close(fd);
    printf("{\"result\": {\"samples_ns\": [");
    for (long i = 0; i < n; i++) printf(i ? ",%lld" : "%lld", (long long)samples[i]);
    printf("]}}\n");
    free(out); free(in); free(samples);
    return 0;
}

/* Frame parser state for the receiver: header bytes gathered, payload bytes still due. */
struct parser {
    unsigned char header[4];
    size_t header_have;
    size_t payload_left;
    int in_payload;
};

/* Consume len bytes; return how many frames they completed. */
static long parse_frames(struct parser *p, const unsigned char *data, size_t len) {
    long done = 0;
    while (len) {
        if (!p->in_payload) {
            size_t take = 4 - p->header_have < len ? 4 - p->header_have : len;
            memcpy(p->header + p->header_have, data, take);
            p->header_have += take; data += take; len -= take;
            if (p->header_have == 4) {
                p->payload_left = frame_length(p->header);
                p->header_have = 0;
                p->in_payload = 1;
            }
        }
        if (p->in_payload) {
            size_t take = p->payload_left < len ? p->payload_left : len;
            p->payload_left -= take; data += take; len -= take;
            if (!p->payload_left) { p->in_payload = 0; done++; }
        }
    }
    return done;
}

static int stream_receiver(const struct options *o) {
    int fd = accept_one(o);
    unsigned char *buf = malloc(READ_CHUNK);
    if (!buf) die("malloc");
    struct parser p = {0};
    int64_t last = now_ns();
    long total = 0;
    ssize_t got;
    while ((got = receive(fd, buf, READ_CHUNK, o->busy)) > 0) {
        long done = parse_frames(&p, buf, (size_t)got);
        if (done) { total += done; last = now_ns(); }
    }
    if (p.in_payload || p.header_have) {
        fprintf(stderr, "udsbench: stream ended mid-frame\n");
        return 1;
    }
    close(fd);
    free(buf);
    printf("{\"result\": {\"messages\": %ld, \"last_ns\": %lld}}\n", total, (long long)last);
    return 0;
}

static int stream_sender(const struct options *o) {
    int fd = connect_to(o);
    unsigned char header[4];
    unsigned char *payload = malloc(o->size ? (size_t)o->size : 1);
    if (!payload) die("malloc");
    fill_payload(payload, (size_t)o->size);
    put_length(header, (uint32_t)o->size);
    long check = o->size ? CLOCK_EVERY_BYTES / o->size : 1;
    if (check < 1) check = 1;
    for (long i = 0; i < o->warmup; i++) { /* untimed, uncounted: the receiver counts them */
        struct iovec iov[2] = {{header, 4}, {payload, (size_t)o->size}};
        send_all(fd, iov, o->size ? 2 : 1, o->busy);
    }
    int64_t started = now_ns(), deadline = started + (int64_t)(o->seconds * 1e9);
    long sent = 0;
    while (sent < o->count) {
        struct iovec iov[2] = {{header, 4}, {payload, (size_t)o->size}};
        send_all(fd, iov, o->size ? 2 : 1, o->busy);
        sent++;
        if (sent % check == 0 && now_ns() > deadline) break;
    }
    close(fd);
    free(payload);
    printf("{\"result\": {\"messages\": %ld, \"started_ns\": %lld, \"warmup\": %ld}}\n", sent,
           (long long)started, o->warmup);
    return 0;
}

/* One echo-server client: bytes read but not yet written back. */
struct client {
    int fd;
    size_t pending;
    size_t offset;
    unsigned char buf[64 * 1024];
};

static void on_sigterm(int signum) {
    (void)signum;
    stopping = 1;
}

static void drop(int epoll, struct client *c) {
    epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Write back what is pending; wait for EPOLLOUT (and stop reading) while it cannot. */
static int flush_client(int epoll, struct client *c) {
    while (c->pending) {
        ssize_t sent = send(c->fd, c->buf + c->offset, c->pending, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) return -1;
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(epoll, EPOLL_CTL_MOD, c->fd, &ev);
            return 0;
        }
        c->pending -= (size_t)sent;
        c->offset += (size_t)sent;
    }
    c->offset = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epoll, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

static int echo_server(const struct options *o) {
    struct sigaction sa = {.sa_handler = on_sigterm};
    sigaction(SIGTERM, &sa, NULL);
    if (o->clients) raise_nofile(o, "echo server");
    int listener = listen_on(o, ECHO_BACKLOG);
    /* Non-blocking, so that the accept loop below ends when no client is waiting. */
    if (fcntl(listener, F_SETFL, fcntl(listener, F_GETFL) | O_NONBLOCK)) die("fcntl");
    int epoll = epoll_create1(EPOLL_CLOEXEC);
    if (epoll < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &ev)) die("epoll_ctl");
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(epoll, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct client *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct client *new = calloc(1, sizeof *new);
                    if (!new) die("malloc");
                    new->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = new};
                    if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &cev)) die("epoll_ctl");
                }
                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) die("accept");
                continue;
            }
            if (!c->pending && events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t got = recv(c->fd, c->buf, sizeof c->buf, 0);
                if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (got <= 0) { drop(epoll, c); continue; }
                c->pending = (size_t)got;
            }
            if (flush_client(epoll, c)) drop(epoll, c);
        }
    }
    close(epoll);
    close(listener);
    unlink(o->path);
    return 0;
}

/* After the cap, how long the clients wait for replies still in flight (as the Python
 * load generator does): a healthy server answers in milliseconds. */
#define DRAIN_NS (5 * 1000000000LL)
/* ...plus a millisecond per client (DRAIN_PER_CLIENT_SECONDS): a thread-per-client server
 * answers 10,000 in turns for the GIL. */
#define DRAIN_PER_CLIENT_NS 1000000LL

/* One load-generator client: the reply bytes so far, and when its request left. */
struct load_client {
    int fd;
    size_t have;
    int64_t sent_at;
    unsigned char reply[];  /* header and payload: 4 + --size bytes */
};

/* A connected, non-blocking client socket; -1 with errno set on failure. */
static int load_connect(const struct options *o) {
    int fd;
    if (o->tcp) {
        char host[64];
        const char *colon = strrchr(o->path, ':');
        if (!colon || (size_t)(colon - o->path) >= sizeof host) { errno = EINVAL; return -1; }
        memcpy(host, o->path, (size_t)(colon - o->path));
        host[colon - o->path] = 0;
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
        if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) { errno = EINVAL; return -1; }
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        if (connect(fd, (struct sockaddr *)&sin, sizeof sin)) { close(fd); return -1; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    } else {
        /* A Unix connect to a full backlog: EAGAIN at once when non-blocking; when blocking,
         * a sleep until the server accepts, or until SO_SNDTIMEO, then EAGAIN (Linux,
         * unix_stream_connect; the errno survey is in src/udskit/bench/loader.py). Connect
         * blocking, bounded by SO_SNDTIMEO, and retry EAGAIN until the server has accepted
         * nobody for CONNECT_STALL_S. */
        struct sockaddr_un sun = address(o->path);
        int64_t stall = now_ns() + CONNECT_STALL_S * 1000000000LL;
        for (;;) {
            fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd < 0) return -1;
            int64_t left = stall - now_ns();
            if (left < 1000000) left = 1000000;
            struct timeval tv = {.tv_sec = left / 1000000000, .tv_usec = left % 1000000000 / 1000};
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            if (!connect(fd, (struct sockaddr *)&sun, sizeof sun)) break;
            int err = errno;
            close(fd);
            if (err == EINTR || (err == EAGAIN && now_ns() < stall)) continue;
            errno = err;
            return -1;
        }
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* Every client sends one message and awaits its echo, untimed; on a problem, errors and
 * first_error say what. */
static void first_echoes(struct load_client **clients, long n, int epoll,
                         const unsigned char *request, size_t whole, long *errors,
                         char *first_error, size_t error_size) {
    const char *problem = NULL;
    for (long i = 0; !problem && i < n; i++)
        if (send(clients[i]->fd, request, whole, MSG_NOSIGNAL) != (ssize_t)whole)
            problem = "a first message could not be sent whole";
    long waiting = n;
    int64_t give_up = now_ns() + FIRST_ECHO_NS;
    struct epoll_event events[256];
    while (!problem && waiting) {
        int64_t left = give_up - now_ns();
        int k = left > 0 ? epoll_wait(epoll, events, 256, (int)(left / 1000000) + 1) : 0;
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (k == 0 && now_ns() >= give_up) {
            snprintf(first_error, error_size,
                     "%ld of %ld clients had no echo of their first message within 30 s",
                     waiting, n);
            *errors = 1;
            return;
        }
        for (int i = 0; !problem && i < k; i++) {
            struct load_client *c = events[i].data.ptr;
            ssize_t got = recv(c->fd, c->reply + c->have, whole - c->have, 0);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got < 0) problem = strerror(errno);
            else if (got == 0) problem = "the server closed a client's connection";
            else if ((c->have += (size_t)got) == whole) {
                if (memcmp(c->reply, request, whole)) problem = "an echo differed from the message sent";
                c->have = 0;
                waiting--;
            }
        }
    }
    if (problem) {
        snprintf(first_error, error_size, "%s", problem);
        *errors = 1;
    }
}

static int load(const struct options *o) {
    size_t whole = 4 + (size_t)o->size;
    if (o->size > RTT_MAX || !o->clients) usage("load needs --clients and a --size up to 1 MiB");
    raise_nofile(o, "load generator");
    unsigned char *request = calloc(1, whole);
    struct load_client **clients = calloc((size_t)o->clients, sizeof *clients);
    size_t cap = (size_t)o->count + (size_t)o->clients;
    int64_t *samples = malloc(sizeof(int64_t) * cap);
    int epoll = epoll_create1(EPOLL_CLOEXEC);
    if (!request || !clients || !samples || epoll < 0) die("setup");
    put_length(request, (uint32_t)o->size);
    long errors = 0, connected = 0, messages = 0, waiting = 0;
    char first_error[160] = "";
    for (; connected < o->clients; connected++) {
        int fd = load_connect(o);
        if (fd < 0) {
            const char *why = errno == EAGAIN
                ? "the server accepted no connection for 10 s (its listen backlog stayed full)"
                : strerror(errno);
            snprintf(first_error, sizeof first_error, "connected %ld of %ld clients, then: %s",
                     connected, o->clients, why);
            errors = o->clients - connected;
            break;
        }
        struct load_client *c = calloc(1, sizeof *c + whole);
        if (!c) die("malloc");
        c->fd = fd;
        clients[connected] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl");
    }
    struct epoll_event events[256];
    if (!errors) first_echoes(clients, connected, epoll, request, whole, &errors, first_error,
                              sizeof first_error);
    if (!errors) {
        /* Every client connected and echoed once: the runner samples the server's memory
         * now, and says go with a line (or EOF) on stdin. */
        printf("{\"connected\": %ld}\n", connected);
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) clearerr(stdin);
    }
    int64_t start = now_ns(), last = start, deadline = start + (int64_t)(o->seconds * 1e9);
    int64_t give_up = 0, drain_ns = DRAIN_NS + DRAIN_PER_CLIENT_NS * o->clients;
    int draining = errors > 0;
    for (long i = 0; !draining && i < connected; i++) {
        clients[i]->sent_at = now_ns();
        if (send(clients[i]->fd, request, whole, MSG_NOSIGNAL) != (ssize_t)whole) {
            if (!errors++) snprintf(first_error, sizeof first_error, "sending a message: %s", strerror(errno));
            epoll_ctl(epoll, EPOLL_CTL_DEL, clients[i]->fd, NULL);
        } else {
            waiting++;
        }
    }
    while (waiting) {
        int64_t until = draining ? give_up : deadline, now = now_ns();
        int timeout = until > now ? (int)((until - now) / 1000000) + 1 : 0;
        int n = epoll_wait(epoll, events, 256, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (n == 0 && now_ns() >= until) {
            if (draining) {
                if (!errors) snprintf(first_error, sizeof first_error,
                                      "%ld replies never came within %lld s", waiting,
                                      (long long)(drain_ns / 1000000000));
                errors += waiting;
                break;
            }
            draining = 1;
            give_up = now_ns() + drain_ns;
            continue;
        }
        for (int i = 0; i < n; i++) {
            struct load_client *c = events[i].data.ptr;
            const char *problem = NULL;
            ssize_t got = recv(c->fd, c->reply + c->have, whole - c->have, 0);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got < 0) problem = strerror(errno);
            else if (got == 0) problem = "the server closed a client's connection";
            else {
                c->have += (size_t)got;
                if (c->have < whole) continue;
                if (memcmp(c->reply, request, whole)) problem = "an echo differed from the message sent";
            }
            if (!problem) {
                int64_t t = now_ns();
                samples[messages++] = t - c->sent_at;
                last = t;
                c->have = 0;
                if (!draining && (t > deadline || messages >= o->count)) {
                    draining = 1;
                    give_up = t + drain_ns;
                }
                if (!draining) {
                    c->sent_at = t;
                    if (send(c->fd, request, whole, MSG_NOSIGNAL) == (ssize_t)whole) continue;
                    problem = "a message could not be sent whole";
                }
            }
            if (problem) {
                if (!errors) snprintf(first_error, sizeof first_error, "%s", problem);
                errors++;
            }
            epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
            waiting--;
        }
    }
    printf("{\"result\": {\"clients\": %ld, \"messages\": %ld, \"seconds\": %.9f, "
           "\"errors\": %ld, \"first_error\": \"%s\", \"samples_ns\": [",
           o->clients, messages, (double)(last - start) / 1e9, errors, first_error);
    for (long i = 0; i < messages; i++) printf(i ? ",%lld" : "%lld", (long long)samples[i]);
    printf("]}}\n");
    for (long i = 0; i < connected; i++) {
        close(clients[i]->fd);
        free(clients[i]);
    }
    free(clients); free(samples); free(request);
    close(epoll);
    return 0;
}

int main(int argc, char **argv) {
    struct options o = parse_args(argc, argv);
    pin(o.cpu);
    if (!strcmp(o.role, "rtt_server")) return rtt_server(&o);
    if (!strcmp(o.role, "rtt_client")) return rtt_client(&o);
    if (!strcmp(o.role, "stream_receiver")) return stream_receiver(&o);
    if (!strcmp(o.role, "stream_sender")) return stream_sender(&o);
    if (!strcmp(o.role, "echo_server")) return echo_server(&o);
    if (!strcmp(o.role, "load")) return load(&o);
    usage("unknown ROLE");
    return 2;
}
