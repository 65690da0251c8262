// Bindings of the sliding-window attention launchers (csrc/swa/swa.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "fields.h"
#include "common/check.h"
#include "swa/swa.h"

namespace py = pybind11;

namespace {

// The struct comes from Python field by field: guard what would make the kernel read
// out of bounds or divide by zero before it runs.
void check(const ahn::SwaParams& p) {
  AHN_CHECK(p.B >= 0 && p.T >= 0 && p.N >= 0, "B, T and N must be >= 0");
  AHN_CHECK(p.B * p.T == 0 || (p.q && p.k && p.v && p.o && p.lse), "q, k, v, o and lse must be set");
  AHN_CHECK(p.cu_seqlens ? p.B == 1 : p.N == p.B, "N must equal B without cu_seqlens, and B must be 1 with it");
  AHN_CHECK(p.HQ > 0 && p.HK > 0 && p.HQ % p.HK == 0, "HK must be > 0 and divide HQ");
  AHN_CHECK(p.D >= 1 && p.D <= 256, "D must be in 1..256");
  AHN_CHECK(p.W >= 0 && p.S >= 0, "W (0 = full causal) and S must be >= 0");
}

void check(const ahn::SwaBwdParams& p) {
  check(p.fwd);
  AHN_CHECK(p.fwd.B * p.fwd.T == 0 || (p.dout && p.dq && p.dk && p.dv), "dout, dq, dk and dv must be set");
}

}  // namespace

void bind_swa(py::module_& m) {
  using P = ahn::SwaParams;
  py::class_<P> params(m, "SwaParams",
                       "Arguments of the sliding-window attention forward; see csrc/swa/swa.h. "
                       "Pointers are addresses (int, 0 = null).");
  params.def(py::init<>());
  ahn::pointer_field(params, "q", &P::q);
  ahn::pointer_field(params, "k", &P::k);
  ahn::pointer_field(params, "v", &P::v);
  ahn::pointer_field(params, "o", &P::o);
  ahn::pointer_field(params, "lse", &P::lse);
  ahn::pointer_field(params, "cu_seqlens", &P::cu_seqlens);
  using Field = std::pair<const char*, int64_t P::*>;
  const std::initializer_list<Field> sizes_and_strides = {
      {"B", &P::B},       {"T", &P::T},       {"N", &P::N},       {"HQ", &P::HQ},     {"HK", &P::HK},
      {"D", &P::D},       {"W", &P::W},       {"S", &P::S},       {"q_sb", &P::q_sb}, {"q_st", &P::q_st},
      {"q_sh", &P::q_sh}, {"k_sb", &P::k_sb}, {"k_st", &P::k_st}, {"k_sh", &P::k_sh}, {"v_sb", &P::v_sb},
      {"v_st", &P::v_st}, {"v_sh", &P::v_sh}};
  for (auto [name, field] : sizes_and_strides) params.def_readwrite(name, field);
  params.def_readwrite("scale", &P::scale);
  ahn::dtype_field(params);

  m.def(
      "launch_swa_fwd_cpu",
      [](const P& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_swa_fwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

  using BP = ahn::SwaBwdParams;
  py::class_<BP> bwd(m, "SwaBwdParams",
                     "Arguments of the sliding-window attention backward; see csrc/swa/swa.h. "
                     "Pointers are addresses (int, 0 = null).");
  bwd.def(py::init<>());
  bwd.def_readwrite("fwd", &BP::fwd);
  ahn::pointer_field(bwd, "dout", &BP::dout);
  ahn::pointer_field(bwd, "dlse", &BP::dlse);
  ahn::pointer_field(bwd, "dq", &BP::dq);
  ahn::pointer_field(bwd, "dk", &BP::dk);
  ahn::pointer_field(bwd, "dv", &BP::dv);
  bwd.def_readwrite("do_sb", &BP::do_sb);
  bwd.def_readwrite("do_st", &BP::do_st);
  bwd.def_readwrite("do_sh", &BP::do_sh);
  m.def(
      "launch_swa_bwd_cpu",
      [](const BP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_swa_bwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");
}

// ---- decode over the AHN ring-buffer cache ------------------------------------------
namespace {

void check(const ahn::SwaDecodeParams& p) {
  AHN_CHECK(p.B >= 0, "B must be >= 0");
  AHN_CHECK(p.B == 0 || (p.q && p.k_cache && p.v_cache && p.k_new && p.v_new && p.cache_seqlens && p.o),
            "q, k_cache, v_cache, k_new, v_new, cache_seqlens and o must be set");
  AHN_CHECK(p.HQ > 0 && p.HK > 0 && p.HQ % p.HK == 0, "HK must be > 0 and divide HQ");
  AHN_CHECK(p.D >= 1 && p.D <= 256, "D must be in 1..256");
  AHN_CHECK(p.W >= 1 && p.S >= 0, "W must be >= 1 and S >= 0");
}

}  // namespace

void bind_swa_decode(py::module_& m) {
  using P = ahn::SwaDecodeParams;
  py::class_<P> params(m, "SwaDecodeParams",
                       "Arguments of the ring-buffer decode step; see csrc/swa/swa.h. "
                       "Pointers are addresses (int, 0 = null).");
  params.def(py::init<>());
  ahn::pointer_field(params, "q", &P::q);
  ahn::pointer_field(params, "k_cache", &P::k_cache);
  ahn::pointer_field(params, "v_cache", &P::v_cache);
  ahn::pointer_field(params, "k_new", &P::k_new);
  ahn::pointer_field(params, "v_new", &P::v_new);
  ahn::pointer_field(params, "cache_seqlens", &P::cache_seqlens);
  ahn::pointer_field(params, "o", &P::o);
  using Field = std::pair<const char*, int64_t P::*>;
  const std::initializer_list<Field> sizes_and_strides = {
      {"B", &P::B},         {"HQ", &P::HQ},       {"HK", &P::HK},       {"D", &P::D},         {"W", &P::W},
      {"S", &P::S},         {"q_sb", &P::q_sb},   {"q_sh", &P::q_sh},   {"kc_sb", &P::kc_sb}, {"kc_st", &P::kc_st},
      {"kc_sh", &P::kc_sh}, {"vc_sb", &P::vc_sb}, {"vc_st", &P::vc_st}, {"vc_sh", &P::vc_sh}, {"kn_sb", &P::kn_sb},
      {"kn_sh", &P::kn_sh}, {"vn_sb", &P::vn_sb}, {"vn_sh", &P::vn_sh}};
  for (auto [name, field] : sizes_and_strides) params.def_readwrite(name, field);
  params.def_readwrite("scale", &P::scale);
  ahn::dtype_field(params);

  m.def(
      "launch_swa_decode_cpu",
      [](const P& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_swa_decode_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");
}
