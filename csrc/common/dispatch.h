// Runtime dtype -> compile-time element type.
#pragma once

#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace ahn {

// Calls f(T{}) with T = float, f16 or bf16 per `dtype`, e.g.
//   dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p); });
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::f16: return f(f16{});
    case DType::bf16: return f(bf16{});
  }
  throw std::invalid_argument("ahn_kernels: unknown dtype code " + std::to_string(int(dtype)));
}

}  // namespace ahn
