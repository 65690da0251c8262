// Shared by the binding files: params-struct fields as Python properties.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/check.h"
#include "common/dtype.h"

namespace ahn {

// Tensors cross as raw addresses (`.data_ptr()`, 0 = null).
template <class Class, class Ptr>
void pointer_field(pybind11::class_<Class>& c, const char* name, Ptr Class::*field) {
  c.def_property(
      name, [field](const Class& self) { return reinterpret_cast<std::uintptr_t>(self.*field); },
      [field](Class& self, std::uintptr_t addr) { self.*field = reinterpret_cast<Ptr>(addr); });
}

// The element type as an int code (0 f32, 1 f16, 2 bf16), checked on the way in.
template <class Class>
void dtype_field(pybind11::class_<Class>& c) {
  c.def_property(
      "dtype", [](const Class& self) { return int(self.dtype); },
      [](Class& self, int code) {
        AHN_CHECK(code >= 0 && code <= 2, "dtype must be 0 (f32), 1 (f16) or 2 (bf16), got " + std::to_string(code));
        self.dtype = DType(code);
      });
}

}  // namespace ahn
