#include "core/parallel.h"

#include <omp.h>

#include <thread>

namespace zi {

namespace {
int g_threads = 0;
}  // namespace

void set_num_threads(int n) {
  if (n <= 0) n = int(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  g_threads = n;
  omp_set_num_threads(n);
  // Every sgemm runs single-threaded inside our own fixed tiling (backends/cpu): OpenBLAS's
  // pool is never used, so its threads neither spin nor change results with the count.
  set_blas_threads(1);
}

void adopt_num_threads() { omp_set_num_threads(num_threads()); }

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

}  // namespace zi
