/*
 * loadgen: a small, single-threaded, epoll-driven load generator for echo servers.
 *
 *   gcc -O2 -Wall -o build/loadgen loadgen.c
 *
 * Modes (see benchmarks/README.md):
 *   echo     C connections, each doing M-byte ping-pong (send M, read M back, verify,
 *            repeat) for --duration seconds after --warmup seconds.
 *   connect  W workers, each looping connect / send a small message / read its echo /
 *            close; reports connections per second, errors counted by kind.
 *   idle     open N connections, echo one small message on each, print "READY <n> <errors>",
 *            then hold them until stdin reaches EOF or --hold seconds pass.
 *
 * Prints one line of JSON at the end (idle mode prints its READY line first).
 * Only loopback targets (127.0.0.0/8, "localhost") are accepted, every run is bounded
 * in time (a SIGALRM watchdog backs up the normal deadlines), and no other traffic
 * is ever sent.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Bounds on what the command line may ask for: keep every run small and finite. */
#define MAX_CONNS 60000
#define MAX_SIZE (16 * 1024 * 1024)
#define MAX_DURATION_S 600.0
#define MAX_HOLD_S 3600.0
/* Small message for connect/idle modes: short enough for one segment. */
#define SMALL_MSG "greenserve-ping\n"
#define SMALL_LEN (sizeof(SMALL_MSG) - 1)
#define MAX_EVENTS 1024
/* Extra seconds the watchdog allows past the run's own deadline before killing us. */
#define WATCHDOG_SLACK_S 60

struct options {
    const char *mode;
    struct sockaddr_in addr;
    int conns;        /* echo, idle */
    int workers;      /* connect */
    int size;         /* echo message size in bytes */
    double duration;  /* measured seconds (echo, connect) */
    double warmup;    /* unmeasured seconds before that */
    double hold;      /* idle: seconds to hold at most */
    double timeout;   /* per-operation timeout (connect, idle setup) */
    int parallel;     /* idle: connection attempts in flight at once */
    int ignore_stdin; /* idle: hold the full --hold even if stdin is closed */
};

/* ---------------------------------------------------------------- utilities */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg)
{
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(2);
}

static void on_watchdog(int sig)
{
    (void)sig;
    static const char msg[] = "loadgen: watchdog expired, exiting\n";
    ssize_t ignored = write(2, msg, sizeof(msg) - 1);
    (void)ignored;
    _exit(3);
}

static void arm_watchdog(double seconds)
{
    signal(SIGALRM, on_watchdog);
    alarm((unsigned)seconds + WATCHDOG_SLACK_S);
}

/* Many idle connections need many descriptors: take everything the hard limit allows. */
static rlim_t raise_nofile_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 1024;
    rlim_t want = rl.rlim_max == RLIM_INFINITY ? (rlim_t)1 << 20 : rl.rlim_max;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            getrlimit(RLIMIT_NOFILE, &rl);
    }
    return rl.rlim_cur;
}

/* Start a non-blocking connect; returns the fd (connect in progress or done) or -1. */
static int start_connect(const struct sockaddr_in *addr, int *err)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    int one = 1;
    /* Ping-pong of small messages: without this, Nagle + delayed ACK adds 40 ms stalls. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* Spread the source address over 127.0.2.1-127.0.201.1 (the port is still chosen at connect:
     * IP_BIND_ADDRESS_NO_PORT). From one source address, connect()'s search for a free
     * port among thousands of TIME_WAIT sockets saturated the load generator's CPU at
     * ~14k connections/s for every server, uvloop included (which then reached ~28k/s). */
    static unsigned next_source;
    struct sockaddr_in source = {0};
    source.sin_family = AF_INET;
    source.sin_addr.s_addr = htonl(0x7f000001u | (2u + next_source++ % 200u) << 8);
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&source, sizeof(source)) != 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0 && errno != EINPROGRESS) {
        *err = errno;
        close(fd);
        return -1;
    }
    *err = 0;
    return fd;
}

static int socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        return errno;
    return err;
}

static void epoll_add(int ep, int fd, uint32_t events, uint32_t token)
{
    struct epoll_event ev = {.events = events, .data.u32 = token};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0)
        die("epoll_ctl ADD failed");
}

static int is_would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

/* ------------------------------------------------------------ latency stats */

struct samples {
    uint32_t *ns; /* round-trip times in ns, clamped to UINT32_MAX (4.29 s) */
    size_t len, cap;
};

static void samples_add(struct samples *s, uint64_t ns)
{
    if (s->len == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->ns = realloc(s->ns, s->cap * sizeof(*s->ns));
        if (!s->ns)
            die("out of memory for latency samples");
    }
    s->ns[s->len++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, in microseconds. */
static double percentile_us(const struct samples *s, double p)
{
    if (s->len == 0)
        return 0.0;
    size_t rank = (size_t)(p * (double)s->len + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > s->len)
        rank = s->len;
    return s->ns[rank - 1] / 1000.0;
}

static double mean_us(const struct samples *s)
{
    double total = 0;
    for (size_t i = 0; i < s->len; i++)
        total += s->ns[i];
    return s->len ? total / (double)s->len / 1000.0 : 0.0;
}

/* ---------------------------------------------------------------- echo mode */

/* The bytes of round r on connection c are pattern[(c + r) % 256 ...]: every round
 * differs from the previous one, so a server that returns stale or shifted data fails. */
#define PATTERN_SHIFTS 256

struct echo_conn {
    int fd;
    unsigned offset; /* where in the pattern this round's bytes start */
    size_t sent, received;
    uint64_t round_start_ns;
};

struct echo_state {
    const struct options *opt;
    struct echo_conn *conns;
    unsigned char *pattern, *scratch;
    uint64_t measure_start_ns, measure_end_ns;
    struct samples lat;
    long long round_trips, errors, verify_errors;
    int alive;
};

static void echo_fail(struct echo_state *st, struct echo_conn *c, int verify)
{
    if (verify)
        st->verify_errors++;
    else
        st->errors++;
    close(c->fd);
    c->fd = -1;
    st->alive--;
}

static void echo_begin_round(struct echo_conn *c, uint64_t now)
{
    c->offset = (c->offset + 1) % PATTERN_SHIFTS;
    c->sent = 0;
    c->received = 0;
    c->round_start_ns = now;
}

/* A round belongs to the measured window if it completed inside it. */
static void echo_finish_round(struct echo_state *st, struct echo_conn *c)
{
    uint64_t now = now_ns();
    if (now >= st->measure_start_ns && now < st->measure_end_ns) {
        st->round_trips++;
        samples_add(&st->lat, now - c->round_start_ns);
    }
    echo_begin_round(c, now);
}

/* Returns 1 on progress, 0 if the socket would block, -1 after failing the conn. */
static int echo_try_send(struct echo_state *st, struct echo_conn *c)
{
    size_t size = (size_t)st->opt->size;
    if (c->sent >= size)
        return 0;
    ssize_t n = send(c->fd, st->pattern + c->offset + c->sent, size - c->sent, MSG_NOSIGNAL);
    if (n > 0) {
        c->sent += (size_t)n;
        return 1;
    }
    if (n < 0 && is_would_block(errno))
        return 0;
    echo_fail(st, c, 0);
    return -1;
}

static int echo_try_recv(struct echo_state *st, struct echo_conn *c)
{
    size_t size = (size_t)st->opt->size;
    ssize_t n = recv(c->fd, st->scratch, size - c->received, 0);
    if (n < 0 && is_would_block(errno))
        return 0;
    if (n <= 0) {
        echo_fail(st, c, 0);
        return -1;
    }
    /* More bytes back than sent so far means the server invented data. */
    if (c->received + (size_t)n > c->sent ||
        memcmp(st->scratch, st->pattern + c->offset + c->received, (size_t)n) != 0) {
        echo_fail(st, c, 1);
        return -1;
    }
    c->received += (size_t)n;
    if (c->received == size)
        echo_finish_round(st, c);
    return 1;
}

/* Edge-triggered: keep going until both directions would block. */
static void echo_service(struct echo_state *st, struct echo_conn *c)
{
    for (;;) {
        int sent = echo_try_send(st, c);
        if (sent < 0)
            return;
        int got = echo_try_recv(st, c);
        if (got < 0)
            return;
        if (!sent && !got)
            return;
    }
}

/* Blocking-style connect with a timeout; returns the fd or -1 with *err set. */
static int connect_with_timeout(const struct sockaddr_in *addr, double timeout, int *err)
{
    int fd = start_connect(addr, err);
    if (fd < 0)
        return -1;
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    int ready = poll(&pfd, 1, (int)(timeout * 1000));
    *err = ready == 1 ? socket_error(fd) : ETIMEDOUT;
    if (*err == 0)
        return fd;
    close(fd);
    return -1;
}

/* Connect all C sockets before the clock starts. */
static void echo_connect_all(struct echo_state *st)
{
    for (int i = 0; i < st->opt->conns; i++) {
        int err;
        st->conns[i].fd = connect_with_timeout(&st->opt->addr, st->opt->timeout, &err);
        if (st->conns[i].fd < 0) {
            fprintf(stderr, "loadgen: connect %d failed: %s\n", i, strerror(err));
            st->errors++;
        } else {
            st->alive++;
        }
    }
}

static void echo_print(const struct echo_state *st, double measured)
{
    printf("{\"mode\":\"echo\",\"conns\":%d,\"size\":%d,\"duration_s\":%.3f,"
           "\"round_trips\":%lld,\"rps\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,"
           "\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,"
           "\"errors\":%lld,\"verify_errors\":%lld,\"alive\":%d}\n",
           st->opt->conns, st->opt->size, measured, st->round_trips,
           measured > 0 ? (double)st->round_trips / measured : 0.0,
           percentile_us(&st->lat, 0.50), percentile_us(&st->lat, 0.90),
           percentile_us(&st->lat, 0.99), percentile_us(&st->lat, 0.999),
           percentile_us(&st->lat, 1.0), mean_us(&st->lat), st->errors, st->verify_errors,
           st->alive);
}

static int run_echo(const struct options *opt)
{
    struct echo_state st = {.opt = opt};
    st.conns = calloc((size_t)opt->conns, sizeof(*st.conns));
    st.pattern = malloc((size_t)opt->size + PATTERN_SHIFTS);
    st.scratch = malloc((size_t)opt->size);
    if (!st.conns || !st.pattern || !st.scratch)
        die("out of memory");
    for (size_t i = 0; i < (size_t)opt->size + PATTERN_SHIFTS; i++)
        st.pattern[i] = (unsigned char)(i * 31u + (i >> 8) * 7u + 1u);

    echo_connect_all(&st);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    uint64_t start = now_ns();
    st.measure_start_ns = start + (uint64_t)(opt->warmup * 1e9);
    st.measure_end_ns = st.measure_start_ns + (uint64_t)(opt->duration * 1e9);
    for (int i = 0; i < opt->conns; i++) {
        struct echo_conn *c = &st.conns[i];
        if (c->fd < 0)
            continue;
        c->offset = (unsigned)i % PATTERN_SHIFTS;
        echo_begin_round(c, start);
        epoll_add(ep, c->fd, EPOLLIN | EPOLLOUT | EPOLLET, (uint32_t)i);
        echo_service(&st, c);
    }

    struct epoll_event events[MAX_EVENTS];
    while (st.alive > 0) {
        uint64_t now = now_ns();
        if (now >= st.measure_end_ns)
            break;
        int wait_ms = (int)((st.measure_end_ns - now) / 1000000u) + 1;
        int n = epoll_wait(ep, events, MAX_EVENTS, wait_ms > 100 ? 100 : wait_ms);
        for (int i = 0; i < n; i++) {
            struct echo_conn *c = &st.conns[events[i].data.u32];
            if (c->fd >= 0)
                echo_service(&st, c);
        }
    }
    uint64_t end = now_ns();
    if (end > st.measure_end_ns)
        end = st.measure_end_ns;
    double measured = end > st.measure_start_ns ? (double)(end - st.measure_start_ns) / 1e9 : 0.0;

    qsort(st.lat.ns, st.lat.len, sizeof(*st.lat.ns), cmp_u32);
    echo_print(&st, measured);
    for (int i = 0; i < opt->conns; i++)
        if (st.conns[i].fd >= 0)
            close(st.conns[i].fd);
    close(ep);
    return st.verify_errors || st.round_trips == 0 ? 1 : 0;
}

/* ------------------------------------------------------------- connect mode */

enum worker_state { W_IDLE, W_CONNECTING, W_EXCHANGING };

struct worker {
    int fd;
    enum worker_state state;
    size_t sent, received;
    double started;
};

struct error_counts {
    long long connect, reset, eof, timeout, verify, addr, other;
};

static long long error_total(const struct error_counts *e)
{
    return e->connect + e->reset + e->eof + e->timeout + e->verify + e->addr + e->other;
}

static void count_errno(struct error_counts *e, int err)
{
    if (err == ECONNREFUSED || err == ETIMEDOUT)
        e->connect++;
    else if (err == ECONNRESET || err == EPIPE || err == ECONNABORTED)
        e->reset++;
    else if (err == EADDRNOTAVAIL || err == EADDRINUSE)
        e->addr++; /* out of ephemeral ports (TIME_WAIT) */
    else
        e->other++;
}

struct connect_state {
    const struct options *opt;
    int ep;
    struct worker *workers;
    double measure_start, measure_end;
    long long completed, completed_total;
    struct error_counts err;
};

static void worker_reset(struct worker *w)
{
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
    w->state = W_IDLE;
}

static void worker_start(struct connect_state *st, struct worker *w, uint32_t token)
{
    int err;
    w->fd = start_connect(&st->opt->addr, &err);
    if (w->fd < 0) {
        count_errno(&st->err, err);
        w->state = W_IDLE; /* retried on the next loop turn */
        return;
    }
    w->state = W_CONNECTING;
    w->sent = w->received = 0;
    w->started = now_s();
    epoll_add(st->ep, w->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, token);
}

static void worker_done(struct connect_state *st, struct worker *w)
{
    double now = now_s();
    st->completed_total++;
    if (now >= st->measure_start && now < st->measure_end)
        st->completed++;
    worker_reset(w);
}

/* Returns 1 when the exchange finished, 0 if it would block, -1 on error (counted). */
static int worker_exchange(struct error_counts *err, struct worker *w)
{
    char buf[64];
    while (w->sent < SMALL_LEN) {
        ssize_t n = send(w->fd, SMALL_MSG + w->sent, SMALL_LEN - w->sent, MSG_NOSIGNAL);
        if (n < 0 && is_would_block(errno))
            return 0;
        if (n < 0) {
            count_errno(err, errno);
            return -1;
        }
        w->sent += (size_t)n;
    }
    while (w->received < SMALL_LEN) {
        ssize_t n = recv(w->fd, buf, SMALL_LEN - w->received, 0);
        if (n < 0 && is_would_block(errno))
            return 0;
        if (n < 0) {
            count_errno(err, errno);
            return -1;
        }
        if (n == 0) {
            err->eof++;
            return -1;
        }
        if (memcmp(buf, SMALL_MSG + w->received, (size_t)n) != 0) {
            err->verify++;
            return -1;
        }
        w->received += (size_t)n;
    }
    return 1;
}

static void worker_service(struct connect_state *st, struct worker *w)
{
    if (w->state == W_CONNECTING) {
        int err = socket_error(w->fd);
        if (err == EINPROGRESS || err == EALREADY)
            return;
        if (err != 0) {
            count_errno(&st->err, err);
            worker_reset(w);
            return;
        }
        w->state = W_EXCHANGING;
    }
    int r = worker_exchange(&st->err, w);
    if (r > 0)
        worker_done(st, w);
    else if (r < 0)
        worker_reset(w);
}

/* Restart idle workers and time out stuck ones; runs every loop turn (W is small). */
static void workers_tick(struct connect_state *st, int accepting_new)
{
    double now = now_s();
    for (int i = 0; i < st->opt->workers; i++) {
        struct worker *w = &st->workers[i];
        if (w->state != W_IDLE && now - w->started > st->opt->timeout) {
            st->err.timeout++;
            worker_reset(w);
        }
        if (w->state == W_IDLE && accepting_new)
            worker_start(st, w, (uint32_t)i);
    }
}

static void connect_print(const struct connect_state *st, double measured)
{
    const struct error_counts *e = &st->err;
    printf("{\"mode\":\"connect\",\"workers\":%d,\"duration_s\":%.3f,\"connections\":%lld,"
           "\"cps\":%.1f,\"connections_total\":%lld,\"errors\":%lld,\"connect_errors\":%lld,"
           "\"reset_errors\":%lld,\"eof_errors\":%lld,\"timeouts\":%lld,\"verify_errors\":%lld,"
           "\"addr_errors\":%lld,\"other_errors\":%lld}\n",
           st->opt->workers, measured, st->completed,
           measured > 0 ? (double)st->completed / measured : 0.0, st->completed_total,
           error_total(e), e->connect, e->reset, e->eof, e->timeout, e->verify, e->addr, e->other);
}

static int run_connect(const struct options *opt)
{
    struct connect_state st = {.opt = opt};
    st.ep = epoll_create1(EPOLL_CLOEXEC);
    st.workers = calloc((size_t)opt->workers, sizeof(*st.workers));
    if (!st.workers)
        die("out of memory");
    for (int i = 0; i < opt->workers; i++)
        st.workers[i].fd = -1;
    double start = now_s();
    st.measure_start = start + opt->warmup;
    st.measure_end = st.measure_start + opt->duration;

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        double now = now_s();
        if (now >= st.measure_end)
            break;
        workers_tick(&st, 1);
        int wait_ms = (int)((st.measure_end - now) * 1000) + 1;
        int n = epoll_wait(st.ep, events, MAX_EVENTS, wait_ms > 50 ? 50 : wait_ms);
        for (int i = 0; i < n; i++) {
            struct worker *w = &st.workers[events[i].data.u32];
            if (w->fd >= 0)
                worker_service(&st, w);
        }
    }
    double measured = now_s() - st.measure_start;
    if (measured > opt->duration)
        measured = opt->duration;
    for (int i = 0; i < opt->workers; i++)
        worker_reset(&st.workers[i]);
    connect_print(&st, measured);
    close(st.ep);
    return st.err.verify ? 1 : 0;
}

/* ---------------------------------------------------------------- idle mode */

/* Idle connections reuse struct worker; phase says where each one is. */
enum { I_PENDING, I_BUSY, I_READY, I_FAILED, I_CLOSED };

struct idle_state {
    const struct options *opt;
    int ep;
    struct worker *conns;
    unsigned char *phase;
    int next, in_flight, ready, failed, closed_by_peer;
    struct error_counts err;
};

static void idle_launch(struct idle_state *st)
{
    while (st->in_flight < st->opt->parallel && st->next < st->opt->conns) {
        int i = st->next++;
        struct worker *w = &st->conns[i];
        int err;
        w->fd = start_connect(&st->opt->addr, &err);
        if (w->fd < 0) {
            count_errno(&st->err, err);
            st->phase[i] = I_FAILED;
            st->failed++;
            continue;
        }
        w->state = W_CONNECTING;
        w->sent = w->received = 0;
        w->started = now_s();
        st->phase[i] = I_BUSY;
        st->in_flight++;
        epoll_add(st->ep, w->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, (uint32_t)i);
    }
}

static void idle_settle(struct idle_state *st, int i, int ok)
{
    st->in_flight--;
    if (ok) {
        st->phase[i] = I_READY;
        st->ready++;
    } else {
        st->phase[i] = I_FAILED;
        st->failed++;
        worker_reset(&st->conns[i]);
    }
}

static void idle_service_setup(struct idle_state *st, int i)
{
    struct worker *w = &st->conns[i];
    if (w->state == W_CONNECTING) {
        int err = socket_error(w->fd);
        if (err == EINPROGRESS || err == EALREADY)
            return;
        if (err != 0) {
            count_errno(&st->err, err);
            idle_settle(st, i, 0);
            return;
        }
        w->state = W_EXCHANGING;
    }
    int r = worker_exchange(&st->err, w);
    if (r != 0)
        idle_settle(st, i, r > 0);
}

/* A ready connection that becomes readable was closed (or spoken to) by the server. */
static void idle_dispatch(struct idle_state *st, const struct epoll_event *ev)
{
    int i = (int)ev->data.u32;
    if (st->phase[i] == I_BUSY) {
        idle_service_setup(st, i);
    } else if (st->phase[i] == I_READY && (ev->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
        st->phase[i] = I_CLOSED;
        st->closed_by_peer++;
        worker_reset(&st->conns[i]);
    }
}

static void idle_timeouts(struct idle_state *st)
{
    double now = now_s();
    for (int i = 0; i < st->next; i++) {
        if (st->phase[i] == I_BUSY && now - st->conns[i].started > st->opt->timeout) {
            st->err.timeout++;
            idle_settle(st, i, 0);
        }
    }
}

static void idle_setup(struct idle_state *st, double deadline)
{
    struct epoll_event events[MAX_EVENTS];
    double last_scan = now_s();
    while (st->ready + st->failed < st->opt->conns && now_s() < deadline) {
        idle_launch(st);
        int n = epoll_wait(st->ep, events, MAX_EVENTS, 50);
        for (int k = 0; k < n; k++)
            idle_dispatch(st, &events[k]);
        if (now_s() - last_scan > 0.2) {
            idle_timeouts(st);
            last_scan = now_s();
        }
    }
}

static void idle_check_peers(struct idle_state *st, int timeout_ms)
{
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(st->ep, events, MAX_EVENTS, timeout_ms);
    for (int k = 0; k < n; k++)
        idle_dispatch(st, &events[k]);
}

/* Returns 1 once stdin has reached EOF (or errored). Input lines are ignored. */
static int stdin_closed(void)
{
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    if (poll(&pfd, 1, 0) <= 0)
        return 0;
    char buf[256];
    ssize_t n = read(0, buf, sizeof(buf));
    return n <= 0;
}

static double idle_hold(struct idle_state *st)
{
    double start = now_s(), end = start + st->opt->hold;
    while (now_s() < end) {
        if (!st->opt->ignore_stdin && stdin_closed())
            break;
        idle_check_peers(st, 100);
    }
    return now_s() - start;
}

static int run_idle(const struct options *opt)
{
    struct idle_state st = {.opt = opt};
    st.ep = epoll_create1(EPOLL_CLOEXEC);
    st.conns = calloc((size_t)opt->conns, sizeof(*st.conns));
    st.phase = calloc((size_t)opt->conns, 1);
    if (!st.conns || !st.phase)
        die("out of memory");
    for (int i = 0; i < opt->conns; i++)
        st.conns[i].fd = -1;

    double setup_start = now_s();
    idle_setup(&st, setup_start + opt->duration);
    double setup_s = now_s() - setup_start;
    for (int i = 0; i < opt->conns; i++)
        if (st.phase[i] == I_BUSY) {
            st.err.timeout++;
            idle_settle(&st, i, 0);
        }
    printf("READY %d %d\n", st.ready, st.failed);
    fflush(stdout);

    double held = idle_hold(&st);
    for (int i = 0; i < opt->conns; i++)
        worker_reset(&st.conns[i]);
    printf("{\"mode\":\"idle\",\"requested\":%d,\"established\":%d,\"errors\":%lld,"
           "\"failed\":%d,\"setup_s\":%.3f,\"held_s\":%.3f,\"closed_by_peer\":%d}\n",
           opt->conns, st.ready, error_total(&st.err), st.failed, setup_s, held,
           st.closed_by_peer);
    close(st.ep);
    return 0;
}

/* ------------------------------------------------------------ command line */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen MODE --port P [options]\n"
            "  MODE: echo | connect | idle\n"
            "  --host H        loopback host (127.0.0.0/8 or localhost; default 127.0.0.1)\n"
            "  --port P        server port (required)\n"
            "  --conns N       echo: connections (default 100); idle: connections (default 5000)\n"
            "  --size B        echo: message size in bytes (default 64)\n"
            "  --workers W     connect: concurrent workers (default 50)\n"
            "  --duration S    echo/connect: measured seconds (default 5);\n"
            "                  idle: max seconds to establish all connections (default 60)\n"
            "  --warmup S      echo/connect: unmeasured seconds first (default 1)\n"
            "  --hold S        idle: hold at most S seconds (default 60)\n"
            "  --ignore-stdin  idle: do not stop when stdin reaches EOF\n"
            "  --parallel K    idle: connection attempts in flight at once (default 64)\n"
            "  --timeout S     per-operation timeout (default 5)\n");
    exit(2);
}

static void parse_host(const char *host, struct sockaddr_in *addr)
{
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &addr->sin_addr) != 1)
        die("--host must be an IPv4 loopback address (127.x.x.x) or localhost");
    if ((ntohl(addr->sin_addr.s_addr) >> 24) != 127)
        die("refusing a non-loopback host: loadgen only targets 127.0.0.0/8");
}

static double parse_seconds(const char *s, double max, const char *name)
{
    char *end;
    double v = strtod(s, &end);
    if (*end != '\0' || !(v >= 0) || v > max) {
        fprintf(stderr, "loadgen: %s must be between 0 and %.0f seconds\n", name, max);
        exit(2);
    }
    return v;
}

static int parse_int(const char *s, int lo, int hi, const char *name)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "loadgen: %s must be an integer in [%d, %d]\n", name, lo, hi);
        exit(2);
    }
    return (int)v;
}

static void parse_args(int argc, char **argv, struct options *opt)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},     {"port", required_argument, 0, 'p'},
        {"conns", required_argument, 0, 'c'},    {"size", required_argument, 0, 's'},
        {"workers", required_argument, 0, 'w'},  {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'u'},   {"hold", required_argument, 0, 'H'},
        {"parallel", required_argument, 0, 'P'}, {"timeout", required_argument, 0, 't'},
        {"ignore-stdin", no_argument, 0, 'I'},   {0, 0, 0, 0}};
    if (argc < 2)
        usage();
    opt->mode = argv[1];
    int is_idle = strcmp(opt->mode, "idle") == 0;
    *opt = (struct options){.mode = argv[1], .conns = is_idle ? 5000 : 100, .workers = 50,
                            .size = 64, .duration = is_idle ? 60 : 5, .warmup = 1, .hold = 60,
                            .timeout = 5, .parallel = 64};
    const char *host = "127.0.0.1";
    int port = -1, ch;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': host = optarg; break;
        case 'p': port = parse_int(optarg, 1, 65535, "--port"); break;
        case 'c': opt->conns = parse_int(optarg, 1, MAX_CONNS, "--conns"); break;
        case 's': opt->size = parse_int(optarg, 1, MAX_SIZE, "--size"); break;
        case 'w': opt->workers = parse_int(optarg, 1, MAX_CONNS, "--workers"); break;
        case 'd': opt->duration = parse_seconds(optarg, MAX_DURATION_S, "--duration"); break;
        case 'u': opt->warmup = parse_seconds(optarg, MAX_DURATION_S, "--warmup"); break;
        case 'H': opt->hold = parse_seconds(optarg, MAX_HOLD_S, "--hold"); break;
        case 'P': opt->parallel = parse_int(optarg, 1, MAX_CONNS, "--parallel"); break;
        case 't': opt->timeout = parse_seconds(optarg, MAX_DURATION_S, "--timeout"); break;
        case 'I': opt->ignore_stdin = 1; break;
        default: usage();
        }
    }
    if (port < 0 || optind != argc)
        usage();
    memset(&opt->addr, 0, sizeof(opt->addr));
    opt->addr.sin_family = AF_INET;
    opt->addr.sin_port = htons((uint16_t)port);
    parse_host(host, &opt->addr);
}

int main(int argc, char **argv)
{
    struct options opt;
    parse_args(argc, argv, &opt);
    signal(SIGPIPE, SIG_IGN);
    rlim_t nofile = raise_nofile_limit();
    int needed = strcmp(opt.mode, "connect") == 0 ? opt.workers : opt.conns;
    if ((rlim_t)needed + 16 > nofile) {
        fprintf(stderr, "loadgen: %d connections need more descriptors than RLIMIT_NOFILE (%llu)\n",
                needed, (unsigned long long)nofile);
        return 2;
    }
    if (strcmp(opt.mode, "echo") == 0) {
        arm_watchdog(opt.warmup + opt.duration + (double)opt.conns * opt.timeout);
        return run_echo(&opt);
    }
    if (strcmp(opt.mode, "connect") == 0) {
        arm_watchdog(opt.warmup + opt.duration);
        return run_connect(&opt);
    }
    if (strcmp(opt.mode, "idle") == 0) {
        arm_watchdog(opt.duration + opt.hold);
        return run_idle(&opt);
    }
    usage();
    return 2;
}
