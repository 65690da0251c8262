// Element types crossing the Python boundary, and fp32 conversion for loads and stores.
//
// f16 and bf16 are bare 16-bit storage: kernels load them into fp32, compute in fp32
// and round once at the store (round to nearest even, as torch's casts do).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define AHN_HOST_DEVICE __host__ __device__
#else
#define AHN_HOST_DEVICE
#endif

namespace ahn {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

AHN_HOST_DEVICE inline float bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

AHN_HOST_DEVICE inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

AHN_HOST_DEVICE inline float to_f32(float x) { return x; }

AHN_HOST_DEVICE inline float to_f32(bf16 x) { return bits_to_f32(uint32_t(x.bits) << 16); }

AHN_HOST_DEVICE inline float to_f32(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf, nan
  if (exp != 0) return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));  // rebias 15 -> 127
  const float sub = float(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
  return sign ? -sub : sub;
#endif
}

template <class T>
AHN_HOST_DEVICE inline T from_f32(float x);

template <>
AHN_HOST_DEVICE inline float from_f32<float>(float x) {
  return x;
}

template <>
AHN_HOST_DEVICE inline bf16 from_f32<bf16>(float x) {
#if defined(__CUDA_ARCH__)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  const uint32_t u = f32_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // keep nan a nan
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
#endif
}

template <>
AHN_HOST_DEVICE inline f16 from_f32<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  // Integer-only rounding, so that a flush-to-zero FPU mode cannot change it.
  const uint32_t u = f32_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                       // normal half: >= 2^-14
    const uint32_t r = a - 0x38000000u;                         // rebias 127 -> 15
    return f16{uint16_t(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
  }
  // Subnormal half: a multiple of 2^-24. shift >= 14 here; >= 25 is below half the smallest.
  const uint32_t shift = 126u - (a >> 23);
  if (shift >= 25u) return f16{sign};
  const uint32_t man = (a & 0x7fffffu) | 0x800000u;
  const uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return f16{uint16_t(sign | (q + (rem > half || (rem == half && (q & 1u)))))};
#endif
}

}  // namespace ahn
