// First touch of the whole-sequence buffers the CPU kernels write (outputs, scratch).
//
// glibc serves a request of 32 MiB or more with a fresh mmap on every call and gives it
// back on free, while smaller ones are recycled from its heap: the chunked delta rule's
// output [1, T, 8, 128] fp32 is 16 MiB at T = 4096 (recycled: no page faults per call) and
// 64 MiB at T = 16384 (16385 faults per call, 43-62 ms of system time against a ~170 ms
// kernel), which alone made the op superlinear in T. Huge pages cut the faults 30x, and
// faulting the pages in up front, each thread a contiguous share, has the threads zero
// different pages instead of both walking every page (each head's rows span them all) and
// meeting on the same faults (huge pages alone: 21-57 ms system time; with this: 8-11).
// Op time T = 16384 / T = 4096, 2 threads, 3 runs each: 4.17-4.51x -> 3.82-4.00x.

#pragma once

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ahn {

// Prepares bytes at p for writing: huge pages where the kernel allows them, then every
// page faulted in by num_threads threads. Buffers without a whole 2 MiB page inside are
// left alone (their faults cost less than the parallel region).
inline void prepare_pages(void* p, int64_t bytes, int num_threads) {
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;  // x86-64 and arm64 (4 KiB base pages): 2 MiB
  constexpr int64_t kPage = 4096;
  const uintptr_t first = (uintptr_t(p) + kHuge - 1) & ~(kHuge - 1), last = (uintptr_t(p) + bytes) & ~(kHuge - 1);
  if (last <= first) return;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: where refused, 4 KiB pages
#endif
  // A write that keeps the byte: one fault per page, and a buffer the caller filled (the
  // tests' NaN poison) keeps its contents until the kernel writes it.
  char* const c = static_cast<char*>(p);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < bytes; b += kPage) __atomic_fetch_or(c + b, char(0), __ATOMIC_RELAXED);
}

}  // namespace ahn
