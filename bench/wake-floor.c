// How late this machine wakes a thread, whatever the program: sleep to an absolute deadline
// every 2 ms (CLOCK_MONOTONIC, 1 ns timer slack) N times and report how late each wake-up was.
// Run it at real-time priority (chrt -f 10) next to a CPU load to see the floor under the
// shaped RTT's error: a round trip through the emulator has at least four such wake-ups
// (sender, pump, receiver, and back), and none of them can be more punctual than this.
//
// Build: cc -O2 -o /tmp/wake-floor bench/wake-floor.c
// Usage: wake-floor N
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>

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
  int over_1ms = 0;
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  for (int i = 0; i < n; i++) {
    t.tv_nsec += 2000000;
    if (t.tv_nsec >= 1000000000) {
      t.tv_nsec -= 1000000000;
      t.tv_sec++;
    }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    late[i] = ((now.tv_sec - t.tv_sec) * 1000000000L + (now.tv_nsec - t.tv_nsec)) / 1000;
    if (late[i] > 1000) over_1ms++;
    // After a long stall, start the schedule again rather than run to catch up.
    if (late[i] > 2000) clock_gettime(CLOCK_MONOTONIC, &t);
  }
  qsort(late, n, sizeof *late, cmp_long);
  printf("| %d | %ld | %ld | %ld | %ld | %ld | %d |\n", n, late[n / 2], late[n * 99 / 100],
         late[n * 999 / 1000], late[n - 1], late[0], over_1ms);
  return 0;
}
