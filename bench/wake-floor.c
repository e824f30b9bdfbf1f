// How late this machine wakes a thread, whatever the program: sleep to an absolute deadline
// every 2 ms (CLOCK_MONOTONIC, 1 ns timer slack) N times and report how late each wake-up was.
// Run it at real-time priority (chrt -f 10) next to a CPU load to see the floor under the
// shaped RTT's error: a round trip through the emulator has at least four such wake-ups
// (sender, pump, receiver, and back), and none of them can be more punctual than this.
//
// Each wake-up's lateness is split with the thread's own runqueue wait (run_delay in
// /proc/thread-self/schedstat): the part the guest's scheduler accounts for (the thread was
// runnable but another task had the CPU) and the rest, which happened before the guest woke it:
// the timer fired late, i.e. the virtual CPU was not running. The last column counts wake-ups
// over 1 ms late of which over 1 ms is that rest.
//
// Build: cc -O2 -o /tmp/wake-floor bench/wake-floor.c
// Usage: wake-floor N
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <time.h>

// The thread's total runqueue wait so far (ns), or -1 where schedstat is missing.
static long long run_delay(int fd) {
  char buf[128];
  ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  buf[n] = 0;
  unsigned long long run, wait;
  if (sscanf(buf, "%llu %llu", &run, &wait) != 2) return -1;
  return (long long)wait;
}

static int cmp_long(const void *a, const void *b) {
  long x = *(const long *)a, y = *(const long *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 0;
  if (n < 10) {
    fprintf(stderr, "usage: %s N (at least 10)\n", argv[0]);
    return 2;
  }
  prctl(PR_SET_TIMERSLACK, 1);
  long *late = malloc(n * sizeof *late);
  int over_1ms = 0, over_1ms_unaccounted = 0;
  int sched_fd = open("/proc/thread-self/schedstat", O_RDONLY);
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  for (int i = 0; i < n; i++) {
    t.tv_nsec += 2000000;
    if (t.tv_nsec >= 1000000000) {
      t.tv_nsec -= 1000000000;
      t.tv_sec++;
    }
    long long wait_before = run_delay(sched_fd);
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long wait_after = run_delay(sched_fd);
    late[i] = ((now.tv_sec - t.tv_sec) * 1000000000L + (now.tv_nsec - t.tv_nsec)) / 1000;
    if (late[i] > 1000) {
      over_1ms++;
      long queued_us = wait_before < 0 ? 0 : (long)((wait_after - wait_before) / 1000);
      if (late[i] - queued_us > 1000) over_1ms_unaccounted++;
    }
    // After a long stall, start the schedule again rather than run to catch up.
    if (late[i] > 2000) clock_gettime(CLOCK_MONOTONIC, &t);
  }
  qsort(late, n, sizeof *late, cmp_long);
  printf("| %d | %ld | %ld | %ld | %ld | %ld | %d | %s%d |\n", n, late[n / 2], late[n * 99 / 100],
         late[n * 999 / 1000], late[n - 1], late[0], over_1ms, sched_fd < 0 ? "n/a " : "",
         over_1ms_unaccounted);
  return 0;
}
