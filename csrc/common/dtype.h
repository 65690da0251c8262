// Element types crossing the Python boundary, and fp32 conversion for loads and stores.
#pragma once

#include <cstdint>
#include <cstring>

namespace ahn {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

}  // namespace ahn
