// How long this machine takes to give a process fresh memory: map GIB GiB, write one byte per
// 4 KiB page (no huge pages), unmap, wait WAIT seconds, ROUNDS times. On a virtual machine whose
// balloon reports free pages to its host, pages freed and reported meanwhile must be given again
// by the host, which shows as a slower round (BENCHMARKS.md, "Why the same start took twice as
// long").
//
// Build: cc -O2 -o /tmp/touch-memory bench/touch-memory.c
// Usage: touch-memory GIB WAIT [ROUNDS]   (default 3 rounds)
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s GIB WAIT [ROUNDS]\n", argv[0]);
    return 2;
  }
  size_t gib = strtoul(argv[1], NULL, 10);
  int wait = atoi(argv[2]);
  int rounds = argc > 3 ? atoi(argv[3]) : 3;
  size_t len = gib << 30;
  for (int r = 0; r < rounds; r++) {
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      perror("mmap");
      return 1;
    }
    madvise(p, len, MADV_NOHUGEPAGE);
    double s = now();
    for (size_t i = 0; i < len; i += 4096) p[i] = 1;
    double e = now();
    printf("round %d: %zu GiB touched in %.2f s, %.2f us per 4 KiB page\n", r + 1, gib, e - s,
           (e - s) * 1e6 / (double)(len / 4096));
    munmap(p, len);
    if (r + 1 < rounds) sleep(wait);
  }
  return 0;
}
