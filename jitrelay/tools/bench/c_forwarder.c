/* The limit for any user-space relay on this machine: a compiled raw-bytes forwarder.
 *
 * Listens on a Unix stream socket; epoll tells it which connection has bytes; it
 * recv()s them into its one buffer and send()s them, blocking, to every other
 * connection. No framing, no parsing, no queue: a slow reader holds everyone back
 * (like the relay's block policy, without any limit). jitrelay bench builds it with
 * the system C compiler (limit_relay.py) and runs it as the "limit" relay.
 *
 *     c_forwarder /tmp/limit.sock
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define BUFFER_BYTES (4 << 20)

static char buffer[BUFFER_BYTES];
static int conns[MAX_CONNS];
static int nconns;
static volatile sig_atomic_t stopping;

static void on_signal(int signum) { (void)signum; stopping = 1; }

static void drop(int epfd, int fd) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    for (int i = 0; i < nconns; i++)
        if (conns[i] == fd) { conns[i] = conns[--nconns]; break; }
}

/* Every byte of buffer[0, n) to fd, blocking; 0 once sent, -1 when fd is gone. */
static int send_all(int fd, const char *data, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, data, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        data += k;
        n -= (size_t)k;
    }
    return 0;
}

static void forward(int epfd, int from) {
    ssize_t n = recv(from, buffer, BUFFER_BYTES, MSG_DONTWAIT); /* a stale event: no wait */
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) { drop(epfd, from); return; }
    for (int i = 0; i < nconns; i++) {
        int to = conns[i];
        if (to != from && send_all(to, buffer, (size_t)n) < 0) { drop(epfd, to); i--; }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s SOCKET\n", argv[0]); return 2; }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) { fprintf(stderr, "socket path too long\n"); return 2; }
    strcpy(addr.sun_path, argv[1]);
    struct sigaction stop = {.sa_handler = on_signal};
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGINT, &stop, NULL);
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 1024) < 0) {
        perror(argv[1]);
        return 1;
    }
    int epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);
    fprintf(stderr, "limit forwarder listening on %s\n", argv[1]);
    struct epoll_event ready[64];
    while (!stopping) {
        int n = epoll_wait(epfd, ready, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd != listener) { forward(epfd, fd); continue; }
            int conn = accept(listener, NULL, NULL);
            if (conn < 0) continue;
            if (nconns == MAX_CONNS) { close(conn); continue; }
            conns[nconns++] = conn;
            ev.data.fd = conn;
            epoll_ctl(epfd, EPOLL_CTL_ADD, conn, &ev);
        }
    }
    unlink(argv[1]);
    return 0;
}
