/* The native relay engine: the per-connection I/O of the TCP relay in C, decisions in Python.
 *
 * Why: profiling the asyncio relay (benchmarks/loopback/results/profile-close-2026-12-07.md)
 * showed that about half of a short connection's CPU was object machinery — two transports, a
 * dial task and its futures, ten-odd callbacks — not syscalls, and Cython could not remove it.
 * Here a connection is one C struct, its sockets are plain descriptors in one epoll set, and
 * Python is called only where a decision or an account is needed (accept: which backend; a
 * failed dial: which next; connected, first response, backend FIN, end: what the selector and
 * the counters must know).
 *
 * Threading: none. The engine's epoll descriptor is watched by the asyncio loop (add_reader),
 * whose callback is Engine.run(): it handles every ready event in C, on the loop thread, with
 * the GIL held throughout, so the Python callbacks run exactly where asyncio callbacks would.
 * Callbacks must not call back into the engine (run() is not re-entrant; it refuses).
 *
 * Per connection: two sockets (client, upstream); per direction at most one buffer of leftover
 * bytes that the receiving socket would not take (allocated only then, at most `chunk` bytes):
 * while a direction holds leftovers its source is not read (back-pressure). EOF on one side
 * becomes shutdown(SHUT_WR) on the other once the leftovers are written (half-close); when both
 * directions have ended, both sockets are closed. An error on either side (reset, broken pipe)
 * resets both (SO_LINGER 0, then close). Dial timeouts use one timerfd and a FIFO per attempt
 * index: deadlines in one FIFO only grow, so the heads are the next to expire. The idle sweep
 * walks every relay each idle/4 with "touched" flags, like the asyncio relay's sweeper.
 *
 * Freed memory: a relay that ends during run() is only unlinked; its struct is freed when run()
 * returns, because the batch of events epoll_wait returned may still point at it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SO_ORIGINAL_DST_ 80
#define MAX_ATTEMPTS 8
#define EVENTS_PER_WAIT 256
#define ACCEPTS_PER_EVENT 64
#define READS_PER_EVENT 8
#define FIN_PEEKS 4
#define NOT_REGISTERED 0xffffffffu
#define FLUSH_EVERY 1.0 /* seconds between byte-count reports of live relays */

enum kind { K_LISTENER = 1, K_SIDE = 2, K_TIMER = 3 };
enum state { DIALING = 1, RELAYING = 2, DEAD = 3 };
enum ending { END_CLOSE = 0, END_RESET = 1, END_IDLE = 2 };

struct conn;

typedef struct listener {
    uint8_t kind;
    uint8_t paused; /* out of the epoll set after EMFILE, until a relay frees descriptors */
    int fd;
    struct listener *next;
} listener;

typedef struct side {
    uint8_t kind;
    uint8_t idx;   /* 0 client, 1 upstream */
    uint8_t eof;   /* read EOF from this socket */
    uint8_t shut;  /* shutdown(SHUT_WR) done on this socket */
    uint8_t hup;   /* epoll reported HUP: never leave it registered with no interest */
    int fd;
    uint32_t ev;   /* events registered, or NOT_REGISTERED */
    char *buf;     /* bytes read from this side that the other side has not taken yet */
    size_t off, len;
    struct conn *c;
} side;

typedef struct conn {
    side s[2];
    PyObject *ctx;
    struct conn *prev, *next;   /* every live relay */
    struct conn *dprev, *dnext; /* the dial FIFO of its attempt index, while dialling */
    struct conn *dead_next;
    double dial_started, deadline, request_at;
    unsigned long long bytes[2];
    unsigned long long reported[2]; /* bytes already handed to Python (progress, finished) */
    int attempt;
    uint8_t state, in_fifo, opened, awaiting, timing, touched, idle_ticks, peeks_left;
} conn;

typedef struct {
    PyObject_HEAD
    int ep, tfd;
    uint8_t timer_kind;
    PyObject *on_accept, *on_dial_failed, *on_opened, *on_answered, *on_request;
    PyObject *on_backend_done, *on_finished, *on_rejected, *on_progress;
    PyObject *fixed_ip, *fixed_port;
    double timeouts[MAX_ATTEMPTS];
    int ntimeouts;
    double idle, next_sweep, next_flush, armed;
    size_t chunk;
    long max_conns, active;
    conn *all;
    conn *fifo_head[MAX_ATTEMPTS], *fifo_tail[MAX_ATTEMPTS];
    conn *dead;
    listener *listeners;
    int listeners_paused;
    char *scratch;
    int in_run;
    struct sockaddr_storage last_peer;
    socklen_t last_peer_len;
    PyObject *last_peer_str;
    struct sockaddr_storage last_dst;
    socklen_t last_dst_len;
    PyObject *last_dst_str;
} Engine;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- calling Python -------------------------------------------------------------------------- */

/* A callback that raised despite the Python side's own guards: report it without letting it
 * reach anything else, and treat the result as "reset this relay". */
static PyObject *call(PyObject *fn, PyObject *const *args, size_t n) {
    if (fn == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(fn, args, n, NULL);
    if (r == NULL)
        PyErr_WriteUnraisable(fn);
    return r;
}

static void call_void(PyObject *fn, PyObject *const *args, size_t n) {
    PyObject *r = call(fn, args, n);
    Py_XDECREF(r);
}

/* -- epoll bookkeeping ----------------------------------------------------------------------- */

static void ep_set(Engine *e, side *s, uint32_t events) {
    if (s->fd < 0)
        return;
    if (s->hup && events == 0) {
        /* A hung-up socket is always readable to epoll: registered with no interest it would
         * wake every run() until its relay can move on. Leave the set until there is interest. */
        if (s->ev != NOT_REGISTERED) {
            epoll_ctl(e->ep, EPOLL_CTL_DEL, s->fd, NULL);
            s->ev = NOT_REGISTERED;
        }
        return;
    }
    if (s->ev == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = s};
    int op = s->ev == NOT_REGISTERED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(e->ep, op, s->fd, &ev) == 0)
        s->ev = events;
}

static void update_interest(Engine *e, conn *c) {
    if (c->state != RELAYING)
        return;
    for (int i = 0; i < 2; i++) {
        side *s = &c->s[i];
        uint32_t want = 0;
        if (!s->eof && s->len == 0)
            want |= EPOLLIN;
        if (c->s[1 - i].len > 0)
            want |= EPOLLOUT;
        ep_set(e, s, want);
    }
}

/* -- timers ---------------------------------------------------------------------------------- */

static void fifo_remove(Engine *e, conn *c) {
    if (!c->in_fifo)
        return;
    int k = c->attempt;
    if (c->dprev)
        c->dprev->dnext = c->dnext;
    else
        e->fifo_head[k] = c->dnext;
    if (c->dnext)
        c->dnext->dprev = c->dprev;
    else
        e->fifo_tail[k] = c->dprev;
    c->dprev = c->dnext = NULL;
    c->in_fifo = 0;
}

static void fifo_append(Engine *e, conn *c) {
    int k = c->attempt;
    c->dnext = NULL;
    c->dprev = e->fifo_tail[k];
    if (e->fifo_tail[k])
        e->fifo_tail[k]->dnext = c;
    else
        e->fifo_head[k] = c;
    e->fifo_tail[k] = c;
    c->in_fifo = 1;
}

/* Arm the timerfd for the earliest of the dial deadlines and the next idle sweep, unless it is
 * already armed for earlier: a timer that fires early costs one wake-up, re-arming per dial
 * would cost a syscall per connection. */
static void rearm(Engine *e) {
    double want = e->idle > 0 ? e->next_sweep : 0;
    if (e->all && (want == 0 || e->next_flush < want))
        want = e->next_flush;
    for (int k = 0; k < e->ntimeouts; k++) {
        conn *h = e->fifo_head[k];
        if (h && (want == 0 || h->deadline < want))
            want = h->deadline;
    }
    if (want == 0 || (e->armed != 0 && e->armed <= want))
        return;
    struct itimerspec its = {0};
    if (want < 1e-6)
        want = 1e-6;
    its.it_value.tv_sec = (time_t)want;
    its.it_value.tv_nsec = (long)((want - (double)(time_t)want) * 1e9);
    if (timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        e->armed = want;
}

/* -- ending a relay -------------------------------------------------------------------------- */

static void linger_zero(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static void finish(Engine *e, conn *c, int how) {
    if (c->state == DEAD)
        return;
    int was_dialing = c->state == DIALING;
    fifo_remove(e, c);
    c->state = DEAD;
    for (int i = 0; i < 2; i++) {
        side *s = &c->s[i];
        if (s->fd >= 0) {
            /* An upstream still dialling is just closed: there is no peer to tell. */
            if (how == END_RESET && !(i == 1 && was_dialing))
                linger_zero(s->fd);
            close(s->fd); /* also leaves the epoll set: nothing else holds the descriptor */
            s->fd = -1;
        }
        free(s->buf);
        s->buf = NULL;
        s->len = s->off = 0;
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        e->all = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->dead_next = e->dead;
    e->dead = c;
    e->active--;
    PyObject *b0 = PyLong_FromUnsignedLongLong(c->bytes[0] - c->reported[0]);
    PyObject *b1 = PyLong_FromUnsignedLongLong(c->bytes[1] - c->reported[1]);
    PyObject *aw = PyLong_FromLong(c->opened ? c->awaiting : -1);
    PyObject *idle = how == END_IDLE ? Py_True : Py_False;
    c->opened = 0;
    if (b0 && b1 && aw) {
        PyObject *args[5] = {c->ctx, b0, b1, aw, idle};
        call_void(e->on_finished, args, 5);
    } else {
        PyErr_WriteUnraisable(NULL);
    }
    Py_XDECREF(b0);
    Py_XDECREF(b1);
    Py_XDECREF(aw);
}

static void free_dead(Engine *e) {
    if (e->dead && e->listeners_paused) {
        e->listeners_paused = 0;
        for (listener *l = e->listeners; l; l = l->next) {
            if (l->paused) {
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
                if (epoll_ctl(e->ep, EPOLL_CTL_ADD, l->fd, &ev) == 0)
                    l->paused = 0;
                else
                    e->listeners_paused = 1;
            }
        }
    }
    while (e->dead) {
        conn *c = e->dead;
        e->dead = c->dead_next;
        Py_CLEAR(c->ctx);
        free(c);
    }
}

/* -- accounting ------------------------------------------------------------------------------ */

static void backend_done(Engine *e, conn *c) {
    if (!c->opened)
        return;
    c->opened = 0;
    PyObject *args[2] = {c->ctx, c->awaiting ? Py_True : Py_False};
    c->awaiting = 0;
    call_void(e->on_backend_done, args, 2);
}

static void account_read(Engine *e, conn *c, int i, double now) {
    if (i == 0) {
        if (!c->awaiting && c->opened) {
            c->awaiting = 1;
            PyObject *args[1] = {c->ctx};
            call_void(e->on_request, args, 1);
        }
        if (c->timing == 1) { /* the request's first byte: time the answer from here */
            c->request_at = now;
            c->timing = 2;
        }
    } else if (c->awaiting) {
        c->awaiting = 0;
        PyObject *secs = PyFloat_FromDouble(c->timing ? now - c->request_at : -1.0);
        c->timing = 0;
        if (secs) {
            PyObject *args[2] = {c->ctx, secs};
            call_void(e->on_answered, args, 2);
            Py_DECREF(secs);
        }
    }
}

/* -- relaying -------------------------------------------------------------------------------- */

static void shut_peer(side *b) {
    if (!b->shut && b->fd >= 0) {
        shutdown(b->fd, SHUT_WR);
        b->shut = 1;
    }
}

static int both_ended(conn *c) {
    return c->s[0].eof && c->s[1].eof && c->s[0].len == 0 && c->s[1].len == 0;
}

static void relay_read(Engine *e, conn *c, int i, double now) {
    side *a = &c->s[i], *b = &c->s[1 - i];
    for (int round = 0; round < READS_PER_EVENT; round++) {
        ssize_t n = recv(a->fd, e->scratch, e->chunk, 0);
        if (n > 0) {
            c->touched = 1;
            c->bytes[i] += (unsigned long long)n;
            account_read(e, c, i, now);
            if (c->state != RELAYING)
                return;
            ssize_t w = send(b->fd, e->scratch, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    finish(e, c, END_RESET);
                    return;
                }
                w = 0;
            }
            if (w < n) {
                if (a->buf == NULL && (a->buf = malloc(e->chunk)) == NULL) {
                    finish(e, c, END_RESET);
                    return;
                }
                memcpy(a->buf, e->scratch + w, (size_t)(n - w));
                a->off = 0;
                a->len = (size_t)(n - w);
                break;
            }
            if ((size_t)n < e->chunk) {
                /* A short read among an upstream's first: read once more, so a FIN right
                 * behind the response leaves with it and the relay closes first. */
                if (i == 1 && c->peeks_left) {
                    c->peeks_left--;
                    continue;
                }
                break;
            }
        } else if (n == 0) {
            a->eof = 1;
            if (i == 1)
                backend_done(e, c);
            if (both_ended(c)) { /* close() sends the FIN a shutdown() would have */
                finish(e, c, END_CLOSE);
                return;
            }
            if (a->len == 0)
                shut_peer(b);
            break;
        } else {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            finish(e, c, END_RESET);
            return;
        }
    }
    update_interest(e, c);
}

/* Write what side a (index 1 - j) left over to side j. */
static void relay_write(Engine *e, conn *c, int j) {
    side *a = &c->s[1 - j], *b = &c->s[j];
    if (a->len == 0)
        return;
    ssize_t w = send(b->fd, a->buf + a->off, a->len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        finish(e, c, END_RESET);
        return;
    }
    a->off += (size_t)w;
    a->len -= (size_t)w;
    if (a->len == 0) {
        free(a->buf); /* an idle relay keeps no buffer */
        a->buf = NULL;
        a->off = 0;
        if (both_ended(c)) {
            finish(e, c, END_CLOSE);
            return;
        }
        if (a->eof)
            shut_peer(b);
    }
    update_interest(e, c);
}

/* -- dialling -------------------------------------------------------------------------------- */

static int parse_backend(PyObject *ip, PyObject *port, struct sockaddr_storage *sa, socklen_t *len) {
    const char *text = PyUnicode_AsUTF8(ip);
    long p = PyLong_AsLong(port);
    if (text == NULL || p < 0 || p > 65535) {
        PyErr_Clear();
        return -1;
    }
    memset(sa, 0, sizeof *sa);
    struct sockaddr_in *v4 = (struct sockaddr_in *)sa;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)sa;
    if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)p);
        *len = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)p);
        *len = sizeof *v6;
        return 0;
    }
    return -1;
}

static void connected(Engine *e, conn *c, double now);

/* Ask Python for the next backend after attempt c->attempt failed; dial it, or reset. Loops
 * rather than recursing when a dial fails at once (refused by a local stack). */
static void dial_next(Engine *e, conn *c, PyObject *choice, double now);

static void dial_failed(Engine *e, conn *c, int timed_out, double now) {
    fifo_remove(e, c);
    if (c->s[1].fd >= 0) {
        close(c->s[1].fd);
        c->s[1].fd = -1;
        c->s[1].ev = NOT_REGISTERED;
        c->s[1].hup = 0;
    }
    c->attempt++;
    PyObject *left = PyLong_FromLong(e->ntimeouts - c->attempt);
    if (left == NULL) {
        PyErr_WriteUnraisable(NULL);
        finish(e, c, END_RESET);
        return;
    }
    PyObject *args[3] = {c->ctx, left, timed_out ? Py_True : Py_False};
    PyObject *choice = call(e->on_dial_failed, args, 3);
    Py_DECREF(left);
    if (c->state == DEAD) {
        Py_XDECREF(choice);
        return;
    }
    if (choice == NULL || c->attempt >= e->ntimeouts) {
        Py_XDECREF(choice);
        finish(e, c, END_RESET);
        return;
    }
    dial_next(e, c, choice, now);
}

static void dial_next(Engine *e, conn *c, PyObject *choice, double now) {
    /* choice: (ip, port), or None. Consumes the reference. */
    if (choice == Py_None || !PyTuple_Check(choice) || PyTuple_GET_SIZE(choice) != 2) {
        Py_DECREF(choice);
        finish(e, c, END_RESET);
        return;
    }
    struct sockaddr_storage sa;
    socklen_t len;
    int bad = parse_backend(PyTuple_GET_ITEM(choice, 0), PyTuple_GET_ITEM(choice, 1), &sa, &len);
    Py_DECREF(choice);
    if (bad) {
        finish(e, c, END_RESET);
        return;
    }
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) {
        dial_failed(e, c, 0, now);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->s[1].fd = fd;
    c->s[1].ev = NOT_REGISTERED;
    c->dial_started = now;
    if (connect(fd, (struct sockaddr *)&sa, len) == 0) {
        connected(e, c, now);
        return;
    }
    if (errno != EINPROGRESS) {
        dial_failed(e, c, 0, now);
        return;
    }
    /* To a local backend the handshake completes inside connect(), which still says
     * EINPROGRESS: asking the state now saves a loop round (and two epoll_ctl) per dial. */
    struct tcp_info info;
    socklen_t info_len = sizeof info;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &info_len) == 0 &&
        info.tcpi_state == TCP_ESTABLISHED) {
        connected(e, c, now);
        return;
    }
    /* While dialling the client is registered with no interest: its bytes wait in the kernel
     * (nothing is read before there is somewhere to put it), and a reset still wakes us (epoll
     * always reports ERR/HUP), so a client that gives up ends its dial at once. */
    ep_set(e, &c->s[0], 0);
    ep_set(e, &c->s[1], EPOLLOUT);
    c->deadline = now + e->timeouts[c->attempt];
    fifo_append(e, c);
}

static void connected(Engine *e, conn *c, double now) {
    fifo_remove(e, c);
    PyObject *secs = PyFloat_FromDouble(now - c->dial_started);
    if (secs == NULL) {
        PyErr_WriteUnraisable(NULL);
        finish(e, c, END_RESET);
        return;
    }
    PyObject *args[2] = {c->ctx, secs};
    PyObject *ok = call(e->on_opened, args, 2);
    Py_DECREF(secs);
    if (c->state == DEAD) {
        Py_XDECREF(ok);
        return;
    }
    if (ok != Py_True) { /* the selector failed: nothing may be relayed to an uncounted backend */
        Py_XDECREF(ok);
        finish(e, c, END_RESET);
        return;
    }
    Py_DECREF(ok);
    c->state = RELAYING;
    c->opened = 1;
    c->awaiting = 1;
    c->timing = 1;
    c->request_at = now; /* a server that speaks first is timed from its connection */
    c->peeks_left = FIN_PEEKS;
    /* The client's request usually waits already: read it now rather than a wake-up later. */
    relay_read(e, c, 0, now);
    if (c->state == RELAYING)
        update_interest(e, c);
}

/* -- accepting ------------------------------------------------------------------------------- */

static PyObject *address_str(struct sockaddr_storage *sa, struct sockaddr_storage *cache_sa,
                             socklen_t *cache_len, PyObject **cache, socklen_t len, long *port) {
    char text[INET6_ADDRSTRLEN];
    const void *addr;
    if (sa->ss_family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)sa;
        addr = &v4->sin_addr;
        *port = ntohs(v4->sin_port);
    } else if (sa->ss_family == AF_INET6) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)sa;
        addr = &v6->sin6_addr;
        *port = ntohs(v6->sin6_port);
    } else {
        return NULL;
    }
    /* Most connections come from the same few clients and go to the same few services: reuse
     * the last string made when only the port differs. */
    int same = *cache && *cache_len == len && cache_sa->ss_family == sa->ss_family &&
               (sa->ss_family == AF_INET
                    ? ((struct sockaddr_in *)cache_sa)->sin_addr.s_addr ==
                          ((struct sockaddr_in *)sa)->sin_addr.s_addr
                    : memcmp(&((struct sockaddr_in6 *)cache_sa)->sin6_addr,
                             &((struct sockaddr_in6 *)sa)->sin6_addr, 16) == 0);
    if (same) {
        Py_INCREF(*cache);
        return *cache;
    }
    if (inet_ntop(sa->ss_family, addr, text, sizeof text) == NULL)
        return NULL;
    PyObject *s = PyUnicode_FromString(text);
    if (s == NULL)
        return NULL;
    Py_XSETREF(*cache, s);
    Py_INCREF(s);
    memcpy(cache_sa, sa, len);
    *cache_len = len;
    return s;
}

static void reject(int fd) {
    linger_zero(fd);
    close(fd);
}

static void accept_one(Engine *e, int fd, struct sockaddr_storage *peer, socklen_t plen,
                       double now) {
    if (e->active >= e->max_conns) {
        reject(fd);
        call_void(e->on_rejected, NULL, 0);
        return;
    }
    long peer_port;
    PyObject *peer_ip = address_str(peer, &e->last_peer, &e->last_peer_len, &e->last_peer_str,
                                    plen, &peer_port);
    if (peer_ip == NULL) {
        PyErr_Clear();
        peer_ip = PyUnicode_FromString("");
        if (peer_ip == NULL) {
            PyErr_WriteUnraisable(NULL);
            reject(fd);
            return;
        }
    }
    PyObject *dst_ip, *dst_port;
    if (e->fixed_ip) {
        dst_ip = Py_NewRef(e->fixed_ip);
        dst_port = Py_NewRef(e->fixed_port);
    } else {
        struct sockaddr_storage dst;
        socklen_t dlen = sizeof dst;
        int r = peer->ss_family == AF_INET6
                    ? getsockopt(fd, IPPROTO_IPV6, SO_ORIGINAL_DST_, &dst, &dlen)
                    : getsockopt(fd, IPPROTO_IP, SO_ORIGINAL_DST_, &dst, &dlen);
        long dport = 0;
        dst_ip = r == 0 ? address_str(&dst, &e->last_dst, &e->last_dst_len, &e->last_dst_str,
                                      dlen, &dport)
                        : NULL;
        if (dst_ip == NULL) {
            PyErr_Clear();
            dst_ip = Py_NewRef(Py_None); /* the handler counts an unknown destination */
        }
        dst_port = PyLong_FromLong(dport);
    }
    PyObject *r = NULL;
    if (dst_port) {
        PyObject *args[3] = {peer_ip, dst_ip, dst_port};
        r = call(e->on_accept, args, 3);
    }
    Py_DECREF(peer_ip);
    Py_DECREF(dst_ip);
    Py_XDECREF(dst_port);
    if (r == NULL || r == Py_None || !PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3) {
        Py_XDECREF(r);
        reject(fd);
        return;
    }
    conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        Py_DECREF(r);
        reject(fd);
        return;
    }
    for (int i = 0; i < 2; i++) {
        c->s[i].kind = K_SIDE;
        c->s[i].idx = (uint8_t)i;
        c->s[i].fd = -1;
        c->s[i].ev = NOT_REGISTERED;
        c->s[i].c = c;
    }
    c->ctx = Py_NewRef(PyTuple_GET_ITEM(r, 0));
    PyObject *choice = PyTuple_GetSlice(r, 1, 3);
    Py_DECREF(r);
    c->state = DIALING;
    c->s[0].fd = fd;
    if (e->all == NULL && e->next_flush < now)
        e->next_flush = now + FLUSH_EVERY;
    c->next = e->all;
    if (e->all)
        e->all->prev = c;
    e->all = c;
    e->active++;
    if (choice == NULL) {
        PyErr_WriteUnraisable(NULL);
        finish(e, c, END_RESET);
        return;
    }
    dial_next(e, c, choice, now);
}

static void on_listener(Engine *e, listener *l, double now) {
    for (int k = 0; k < ACCEPTS_PER_EVENT; k++) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        int fd = accept4(l->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of descriptors: the listener stays readable, and a level-triggered wait
                 * would spin. Leave the set until a relay ends; clients wait in the queue. */
                epoll_ctl(e->ep, EPOLL_CTL_DEL, l->fd, NULL);
                l->paused = 1;
                e->listeners_paused = 1;
            }
            return; /* EAGAIN: the queue is empty */
        }
        accept_one(e, fd, &peer, plen, now);
    }
}

/* -- the timer ------------------------------------------------------------------------------- */

static void sweep_idle(Engine *e) {
    conn *c = e->all;
    while (c) {
        conn *next = c->next;
        if (c->state == RELAYING) {
            if (c->touched) {
                c->touched = 0;
                c->idle_ticks = 0;
            } else if (++c->idle_ticks >= 4) {
                /* Close what has nothing left to send; reset what still does. */
                finish(e, c, (c->s[0].len || c->s[1].len) ? END_RESET : END_IDLE);
            }
        }
        c = next;
    }
}

/* Hand Python the bytes relayed since the last report, so a long-lived connection's traffic
 * shows in the counters while it lasts: once per FLUSH_EVERY, only for relays that moved any. */
static void flush_bytes(Engine *e) {
    for (conn *c = e->all; c; c = c->next) {
        if (c->state != RELAYING ||
            (c->bytes[0] == c->reported[0] && c->bytes[1] == c->reported[1]))
            continue;
        PyObject *b0 = PyLong_FromUnsignedLongLong(c->bytes[0] - c->reported[0]);
        PyObject *b1 = PyLong_FromUnsignedLongLong(c->bytes[1] - c->reported[1]);
        if (b0 && b1) {
            PyObject *args[3] = {c->ctx, b0, b1};
            call_void(e->on_progress, args, 3);
            c->reported[0] = c->bytes[0];
            c->reported[1] = c->bytes[1];
        } else {
            PyErr_WriteUnraisable(NULL);
        }
        Py_XDECREF(b0);
        Py_XDECREF(b1);
    }
}

static void on_timer(Engine *e, double now) {
    uint64_t expirations;
    if (read(e->tfd, &expirations, sizeof expirations) < 0) { /* spurious: nothing to read */
    }
    e->armed = 0;
    for (int k = 0; k < e->ntimeouts; k++) {
        while (e->fifo_head[k] && e->fifo_head[k]->deadline <= now) {
            conn *c = e->fifo_head[k];
            dial_failed(e, c, 1, now);
        }
    }
    if (e->idle > 0 && now >= e->next_sweep) {
        e->next_sweep = now + e->idle / 4;
        sweep_idle(e);
    }
    if (now >= e->next_flush) {
        e->next_flush = now + FLUSH_EVERY;
        flush_bytes(e);
    }
}

/* -- events ---------------------------------------------------------------------------------- */

static void on_side(Engine *e, side *s, uint32_t ev, double now) {
    conn *c = s->c;
    int i = s->idx;
    if (c->state == DEAD)
        return;
    if (ev & EPOLLHUP)
        s->hup = 1;
    if (c->state == DIALING) {
        if (i == 0) {
            if (ev & (EPOLLERR | EPOLLHUP)) /* the client gave up: so does its dial */
                finish(e, c, END_RESET);
            return;
        }
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err == 0 && !(ev & EPOLLERR))
            connected(e, c, now);
        else
            dial_failed(e, c, 0, now);
        return;
    }
    if (ev & EPOLLERR) {
        finish(e, c, END_RESET);
        return;
    }
    if (ev & EPOLLOUT) {
        relay_write(e, c, i);
        if (c->state != RELAYING)
            return;
    }
    if (ev & (EPOLLIN | EPOLLHUP)) {
        if (!s->eof && s->len == 0) {
            relay_read(e, c, i, now);
        } else if ((ev & EPOLLHUP) && s->eof) {
            /* Both directions of this socket are shut: nothing more can go to it. */
            finish(e, c, c->s[1 - i].len ? END_RESET : END_CLOSE);
        } else {
            update_interest(e, c);
        }
    }
}

/* -- the Python type ------------------------------------------------------------------------- */

static PyObject *Engine_run(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.run() called from one of its callbacks");
        return NULL;
    }
    if (e->ep < 0)
        Py_RETURN_NONE;
    e->in_run = 1;
    struct epoll_event events[EVENTS_PER_WAIT];
    for (int batch = 0; batch < 4; batch++) {
        int n = epoll_wait(e->ep, events, EVENTS_PER_WAIT, 0);
        if (n <= 0)
            break;
        double now = now_s();
        for (int k = 0; k < n; k++) {
            uint8_t kind = *(uint8_t *)events[k].data.ptr;
            if (kind == K_SIDE)
                on_side(e, (side *)events[k].data.ptr, events[k].events, now);
            else if (kind == K_LISTENER)
                on_listener(e, (listener *)events[k].data.ptr, now);
            else
                on_timer(e, now);
        }
        free_dead(e);
        if (n < EVENTS_PER_WAIT)
            break;
    }
    rearm(e);
    e->in_run = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_fileno(Engine *e, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(e->ep);
}

static PyObject *Engine_add_listener(Engine *e, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    for (listener *l = e->listeners; l; l = l->next)
        if (l->fd == fd)
            Py_RETURN_NONE;
    listener *l = calloc(1, sizeof *l);
    if (l == NULL)
        return PyErr_NoMemory();
    l->kind = K_LISTENER;
    l->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        free(l);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    l->next = e->listeners;
    e->listeners = l;
    Py_RETURN_NONE;
}

static PyObject *Engine_remove_listener(Engine *e, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (e->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "remove_listener() called from a callback");
        return NULL;
    }
    for (listener **p = &e->listeners; *p; p = &(*p)->next) {
        if ((*p)->fd == fd) {
            listener *l = *p;
            *p = l->next;
            epoll_ctl(e->ep, EPOLL_CTL_DEL, fd, NULL);
            free(l);
            break;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_reset_all(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "reset_all() called from a callback");
        return NULL;
    }
    e->in_run = 1;
    while (e->all)
        finish(e, e->all, END_RESET);
    free_dead(e);
    e->in_run = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_connections(Engine *e, PyObject *Py_UNUSED(ignored)) {
    /* (client fd, upstream fd or -1, dialling, bytes held client->upstream, upstream->client):
     * for tests and /debug, not for the connection path. */
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (conn *c = e->all; c; c = c->next) {
        PyObject *t = Py_BuildValue("(iiOnn)", c->s[0].fd, c->s[1].fd,
                                    c->state == DIALING ? Py_True : Py_False,
                                    (Py_ssize_t)c->s[0].len, (Py_ssize_t)c->s[1].len);
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
}

static PyObject *Engine_get_active(Engine *e, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(e->active);
}

static void release_fds(Engine *e) {
    while (e->listeners) {
        listener *l = e->listeners;
        e->listeners = l->next;
        free(l);
    }
    if (e->ep >= 0)
        close(e->ep);
    if (e->tfd >= 0)
        close(e->tfd);
    e->ep = e->tfd = -1;
}

static int Engine_clear(Engine *e) {
    Py_CLEAR(e->on_accept);
    Py_CLEAR(e->on_dial_failed);
    Py_CLEAR(e->on_opened);
    Py_CLEAR(e->on_answered);
    Py_CLEAR(e->on_request);
    Py_CLEAR(e->on_backend_done);
    Py_CLEAR(e->on_finished);
    Py_CLEAR(e->on_rejected);
    Py_CLEAR(e->on_progress);
    return 0;
}

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->in_run) {
        PyErr_SetString(PyExc_RuntimeError, "close() called from a callback");
        return NULL;
    }
    e->in_run = 1;
    while (e->all)
        finish(e, e->all, END_RESET);
    free_dead(e);
    e->in_run = 0;
    release_fds(e);
    Engine_clear(e);
    Py_RETURN_NONE;
}

static int Engine_traverse(Engine *e, visitproc visit, void *arg) {
    Py_VISIT(e->on_accept);
    Py_VISIT(e->on_dial_failed);
    Py_VISIT(e->on_opened);
    Py_VISIT(e->on_answered);
    Py_VISIT(e->on_request);
    Py_VISIT(e->on_backend_done);
    Py_VISIT(e->on_finished);
    Py_VISIT(e->on_rejected);
    Py_VISIT(e->on_progress);
    for (conn *c = e->all; c; c = c->next)
        Py_VISIT(c->ctx);
    return 0;
}

static void Engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    Engine_clear(e); /* no callbacks from here on: finish() skips them */
    while (e->all)
        finish(e, e->all, END_RESET);
    free_dead(e);
    release_fds(e);
    Py_CLEAR(e->fixed_ip);
    Py_CLEAR(e->fixed_port);
    Py_CLEAR(e->last_peer_str);
    Py_CLEAR(e->last_dst_str);
    free(e->scratch);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"handler",     "dial_timeouts", "idle_timeout", "max_connections",
                             "chunk",       "fixed_destination", NULL};
    PyObject *handler, *timeouts, *fixed = Py_None;
    double idle;
    long max_conns;
    Py_ssize_t chunk;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!dln|O", kwlist, &handler, &PyTuple_Type,
                                     &timeouts, &idle, &max_conns, &chunk, &fixed))
        return -1;
    if (e->ep >= 0 || e->on_accept) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ called twice");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(timeouts);
    if (n < 1 || n > MAX_ATTEMPTS) {
        PyErr_Format(PyExc_ValueError, "dial_timeouts: 1 to %d attempts, got %zd", MAX_ATTEMPTS, n);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        double t = PyFloat_AsDouble(PyTuple_GET_ITEM(timeouts, k));
        if (t == -1.0 && PyErr_Occurred())
            return -1;
        if (t <= 0) {
            PyErr_SetString(PyExc_ValueError, "dial_timeouts: each must be positive");
            return -1;
        }
        e->timeouts[k] = t;
    }
    e->ntimeouts = (int)n;
    if (chunk < 4096 || max_conns < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk must be at least 4096, max_connections >= 1");
        return -1;
    }
    if (fixed != Py_None) {
        if (!PyTuple_Check(fixed) || PyTuple_GET_SIZE(fixed) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(fixed, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(fixed, 1))) {
            PyErr_SetString(PyExc_TypeError, "fixed_destination: (ip, port) or None");
            return -1;
        }
        e->fixed_ip = Py_NewRef(PyTuple_GET_ITEM(fixed, 0));
        e->fixed_port = Py_NewRef(PyTuple_GET_ITEM(fixed, 1));
    }
    const char *names[] = {"accept",        "dial_failed", "opened",   "answered", "request_again",
                           "backend_done",  "finished",    "rejected", "progress"};
    PyObject **slots[] = {&e->on_accept,  &e->on_dial_failed,  &e->on_opened,
                          &e->on_answered, &e->on_request,     &e->on_backend_done,
                          &e->on_finished, &e->on_rejected,    &e->on_progress};
    for (int k = 0; k < 9; k++) {
        PyObject *fn = PyObject_GetAttrString(handler, names[k]);
        if (fn == NULL) {
            Engine_clear(e);
            return -1;
        }
        *slots[k] = fn;
    }
    e->idle = idle > 0 ? idle : 0;
    e->max_conns = max_conns;
    e->chunk = (size_t)chunk;
    e->scratch = malloc(e->chunk);
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (e->scratch == NULL || e->ep < 0 || e->tfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        release_fds(e);
        Engine_clear(e);
        return -1;
    }
    e->timer_kind = K_TIMER;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &e->timer_kind};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->tfd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        release_fds(e);
        Engine_clear(e);
        return -1;
    }
    if (e->idle > 0) {
        e->next_sweep = now_s() + e->idle / 4;
        rearm(e);
    }
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e) {
        e->ep = e->tfd = -1;
    }
    return (PyObject *)e;
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS, "Handle every ready event; never blocks."},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor to watch."},
    {"add_listener", (PyCFunction)Engine_add_listener, METH_O, "Accept on this listening fd."},
    {"remove_listener", (PyCFunction)Engine_remove_listener, METH_O, "Stop accepting on it."},
    {"reset_all", (PyCFunction)Engine_reset_all, METH_NOARGS, "Reset every relay."},
    {"connections", (PyCFunction)Engine_connections, METH_NOARGS, "Relays, for tests/debug."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Reset every relay, release the fds."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"active", (getter)Engine_get_active, NULL, "Relays alive (dialling or relaying).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rapproxy.dataplane._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A TCP relay engine: one epoll set, driven by run() from the asyncio loop.",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "The native TCP relay engine (see _native.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
