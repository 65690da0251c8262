// One x86-64 binary serves every CPU: with GCC on glibc, functions marked
// AHN_ISA_CLONES are built for AVX-512, AVX2+FMA and baseline SSE2 and one is picked
// at load time (ifunc). Measured: the fused-recurrent strip update at K = 128 takes
// 1000 ns with SSE2 and 290 ns with AVX-512 on a Sapphire Rapids core.
// Helpers called from a clone must be AHN_ALWAYS_INLINE: left out of line, GCC
// compiles them once, for SSE2 (the SSD scan ran 175 ms instead of 25 ms).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define AHN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AHN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define AHN_ISA_CLONES
#define AHN_ALWAYS_INLINE inline
#endif
