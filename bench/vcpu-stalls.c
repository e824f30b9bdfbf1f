// When does each virtual CPU stop running, and do they stop together? One thread per CPU, pinned,
// spins on CLOCK_MONOTONIC for S seconds and records every gap over G µs between two readings in
// which its own runqueue wait (run_delay, /proc/thread-self/schedstat) did not grow: time the
// thread was neither running nor waiting for the CPU in the guest, so the virtual CPU itself was
// not running (or the guest sat in an interrupt that long). Then, for each gap on one CPU, it
// checks whether another CPU had a gap overlapping it.
//
// Issue 12, item 2: if the CPUs stall independently, a timer kept on two CPUs would not meet
// both stalls at once; if they stall together, nothing inside the guest can hide them.
//
// Build: cc -O2 -pthread -o /tmp/vcpu-stalls bench/vcpu-stalls.c
// Usage: vcpu-stalls SECONDS [GAP_US]   (on a machine without other work)
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAX_GAPS 100000

struct gap {
  long long start_ns, len_ns;
};

struct worker {
  int cpu;
  long long end_ns, gap_ns;
  struct gap *gaps;
  int n;
  int queued; // gaps over the threshold explained by the runqueue wait (not counted as stalls)
};

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static long long run_delay(int fd) {
  char buf[128];
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  buf[n] = 0;
  unsigned long long run, wait;
  if (sscanf(buf, "%llu %llu", &run, &wait) != 2) return -1;
  return (long long)wait;
}

static void *spin(void *arg) {
  struct worker *w = arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(w->cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
    fprintf(stderr, "cannot pin to CPU %d\n", w->cpu);
    exit(1);
  }
  int fd = open("/proc/thread-self/schedstat", O_RDONLY);
  if (fd < 0) {
    perror("/proc/thread-self/schedstat");
    exit(1);
  }
  long long last = now_ns(), wait = run_delay(fd);
  while (last < w->end_ns) {
    long long t = now_ns();
    if (t - last > w->gap_ns) {
      // A gap: was it spent on the guest's runqueue?
      long long wait_now = run_delay(fd);
      if (wait_now - wait > (t - last) / 2) {
        w->queued++;
      } else if (w->n < MAX_GAPS) {
        w->gaps[w->n].start_ns = last;
        w->gaps[w->n].len_ns = t - last;
        w->n++;
      }
      wait = wait_now;
      t = now_ns();
    }
    last = t;
  }
  return NULL;
}

int main(int argc, char **argv) {
  int secs = argc > 1 ? atoi(argv[1]) : 0;
  long gap_us = argc > 2 ? atol(argv[2]) : 200;
  if (secs < 1 || gap_us < 1) {
    fprintf(stderr, "usage: %s SECONDS [GAP_US]\n", argv[0]);
    return 2;
  }
  int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
  struct worker *ws = calloc(ncpu, sizeof *ws);
  pthread_t *th = calloc(ncpu, sizeof *th);
  long long end = now_ns() + secs * 1000000000LL;
  for (int c = 0; c < ncpu; c++) {
    ws[c] = (struct worker){.cpu = c, .end_ns = end, .gap_ns = gap_us * 1000};
    ws[c].gaps = calloc(MAX_GAPS, sizeof(struct gap));
    pthread_create(&th[c], NULL, spin, &ws[c]);
  }
  for (int c = 0; c < ncpu; c++) pthread_join(th[c], NULL);
  printf("| CPU | stalls over %ld µs | over 1 ms | longest (µs) | stalled in all (ms) | "
         "of which another CPU was stalled too (ms) | stalls overlapping another CPU's | "
         "runqueue waits (not counted) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
         gap_us);
  for (int c = 0; c < ncpu; c++) {
    struct worker *w = &ws[c];
    long long total = 0, both = 0, longest = 0;
    int over_ms = 0, overlapping = 0;
    for (int i = 0; i < w->n; i++) {
      struct gap g = w->gaps[i];
      total += g.len_ns;
      if (g.len_ns > longest) longest = g.len_ns;
      if (g.len_ns > 1000000) over_ms++;
      int hit = 0;
      for (int o = 0; o < ncpu; o++) {
        if (o == c) continue;
        for (int j = 0; j < ws[o].n; j++) {
          struct gap h = ws[o].gaps[j];
          long long s = g.start_ns > h.start_ns ? g.start_ns : h.start_ns;
          long long e1 = g.start_ns + g.len_ns, e2 = h.start_ns + h.len_ns;
          long long e = e1 < e2 ? e1 : e2;
          if (e > s) {
            both += e - s;
            hit = 1;
          }
        }
      }
      overlapping += hit;
    }
    printf("| %d | %d | %d | %lld | %.1f | %.1f | %d | %d |\n", c, w->n, over_ms, longest / 1000,
           total / 1e6, both / 1e6, overlapping, w->queued);
  }
  return 0;
}
