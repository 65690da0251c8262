// Shared by the binding files: a params struct's pointer field as a Python int property.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace ahn {

// Tensors cross as raw addresses (`.data_ptr()`, 0 = null).
template <class Class, class Ptr>
void pointer_field(pybind11::class_<Class>& c, const char* name, Ptr Class::*field) {
  c.def_property(
      name, [field](const Class& self) { return reinterpret_cast<std::uintptr_t>(self.*field); },
      [field](Class& self, std::uintptr_t addr) { self.*field = reinterpret_cast<Ptr>(addr); });
}

}  // namespace ahn
