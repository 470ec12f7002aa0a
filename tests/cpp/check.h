// The checks of the standalone C++ test programs: each failed CHECK prints where and counts; main
// returns report(), which prints the count (or "ok") and is non-zero when any failed.
#pragma once

#include <cstdio>

inline int failures = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

#define CHECK_EQ(a, b)                                                                                    \
  do {                                                                                                    \
    const long long va = static_cast<long long>(a), vb = static_cast<long long>(b);                      \
    if (va != vb) {                                                                                       \
      std::fprintf(stderr, "%s:%d: CHECK_EQ(%s, %s) failed: %lld != %lld\n", __FILE__, __LINE__, #a, #b, \
                   va, vb);                                                                               \
      ++failures;                                                                                         \
    }                                                                                                     \
  } while (0)

inline int report() {
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
