// The kernel's floor for a sync service's largest fan-out on this machine: one process writes
// one small websocket-sized message (30 bytes) to each of N loopback TCP sockets, another
// process reads them with epoll, and the time from the first write to the last read is
// reported. No sync service does less work per released waiter than this (one write per
// waiter, one read in the client), so it bounds what `sync-bench client barrier --waiters N`
// can show on the same machine (BENCHMARKS.md, "The kernel's floor for a 10,000-waiter
// release").
//
// Build: cc -O2 -pthread -o /tmp/fanout-floor bench/fanout-floor.c
// Usage: fanout-floor N WRITER_THREADS READER_THREADS ROUNDS [PORT]
// Needs N + a few file descriptors in each process (ulimit -n).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

// Shared between the writing and the reading process.
struct shared {
  atomic_long last_read;
  atomic_int reads;
  atomic_int ready;
};

static struct shared *sh;
static int n_socks, n_writers, n_readers;
static int *client_fds, *server_fds;
static const char msg[] = "\x81\x1c{\"id\":\"12345678\",\"error\":\"\"}";

static void *reader(void *arg) {
  long k = (long)arg;
  int ep = epoll_create1(0);
  for (int i = k; i < n_socks; i += n_readers) {
    struct epoll_event e = {.events = EPOLLIN, .data.fd = client_fds[i]};
    epoll_ctl(ep, EPOLL_CTL_ADD, client_fds[i], &e);
  }
  struct epoll_event ev[256];
  char buf[256];
  for (;;) {
    int n = epoll_wait(ep, ev, 256, -1);
    for (int j = 0; j < n; j++) {
      if (read(ev[j].data.fd, buf, sizeof buf) <= 0) return NULL;
      if (atomic_fetch_add(&sh->reads, 1) + 1 == n_socks) atomic_store(&sh->last_read, now_ns());
    }
  }
}

static void *writer(void *arg) {
  for (int i = (long)arg; i < n_socks; i += n_writers)
    if (write(server_fds[i], msg, sizeof msg - 1) != (ssize_t)(sizeof msg - 1)) perror("write");
  return NULL;
}

static int cmp_long(const void *a, const void *b) {
  long x = *(const long *)a, y = *(const long *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s N WRITER_THREADS READER_THREADS ROUNDS [PORT]\n", argv[0]);
    return 2;
  }
  n_socks = atoi(argv[1]);
  n_writers = atoi(argv[2]);
  n_readers = atoi(argv[3]);
  int rounds = atoi(argv[4]);
  int port = argc > 5 ? atoi(argv[5]) : 5999;
  if (n_socks < 1 || n_writers < 1 || n_writers > 64 || n_readers < 1 || n_readers > 64 ||
      rounds < 1 || rounds > 1000) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  int one = 1;
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(listener, (void *)&addr, sizeof addr) || listen(listener, 4096)) {
    perror("listen");
    return 1;
  }
  pid_t child = fork();
  if (child == 0) {
    close(listener);
    client_fds = malloc(n_socks * sizeof *client_fds);
    for (int i = 0; i < n_socks; i++) {
      client_fds[i] = socket(AF_INET, SOCK_STREAM, 0);
      if (client_fds[i] < 0 || connect(client_fds[i], (void *)&addr, sizeof addr)) {
        perror("connect");
        _exit(1);
      }
      setsockopt(client_fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    pthread_t threads[64];
    for (long k = 0; k < n_readers; k++) pthread_create(&threads[k], NULL, reader, (void *)k);
    atomic_store(&sh->ready, 1);
    for (long k = 0; k < n_readers; k++) pthread_join(threads[k], NULL);
    _exit(0);
  }
  server_fds = malloc(n_socks * sizeof *server_fds);
  for (int i = 0; i < n_socks; i++) {
    server_fds[i] = accept(listener, NULL, NULL);
    if (server_fds[i] < 0) {
      perror("accept");
      return 1;
    }
    setsockopt(server_fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  while (!atomic_load(&sh->ready)) usleep(1000);
  long took[1000];
  for (int r = 0; r < rounds; r++) {
    atomic_store(&sh->reads, 0);
    atomic_store(&sh->last_read, 0);
    usleep(200000);
    long t0 = now_ns();
    pthread_t threads[64];
    for (long k = 0; k < n_writers; k++) pthread_create(&threads[k], NULL, writer, (void *)k);
    for (long k = 0; k < n_writers; k++) pthread_join(threads[k], NULL);
    // The reader that counts the last message stores its time just after counting it.
    while (atomic_load(&sh->last_read) == 0) usleep(100);
    took[r] = atomic_load(&sh->last_read) - t0;
  }
  qsort(took, rounds, sizeof took[0], cmp_long);
  printf("| %d | %d | %d | %d | %.2f ms | %.2f ms | %.2f ms |\n", n_socks, n_writers, n_readers,
         rounds, took[0] / 1e6, took[rounds / 2] / 1e6, took[rounds - 1] / 1e6);
  for (int i = 0; i < n_socks; i++) close(server_fds[i]);
  waitpid(child, NULL, 0);
  return 0;
}
