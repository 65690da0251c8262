// Host-side precondition checks for launchers: cheap O(1) guards against a
// malformed params struct; the Python op has already validated the tensors.
#pragma once

#include <stdexcept>
#include <string>

// Throws std::invalid_argument (ValueError in Python) naming the failed condition.
#define AHN_CHECK(cond, msg)                                                              \
  do {                                                                                    \
    if (!(cond)) throw std::invalid_argument(std::string("ahn_kernels: ") + (msg) +      \
                                             " (failed: " #cond ")");                    \
  } while (0)
