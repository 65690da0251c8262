// Bindings of the AHN cache's memory decode step (csrc/cache/cache.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "fields.h"
#include "cache/cache.h"
#include "common/check.h"

namespace py = pybind11;

namespace {

// The struct comes from Python field by field: guard what would make the kernel read
// out of bounds or divide by zero before it runs.
void check(const ahn::EvictUpdateParams& p) {
  AHN_CHECK(p.B >= 0, "B must be >= 0");
  AHN_CHECK(p.B == 0 || (p.state && p.q && p.k_cache && p.v_cache && p.gates && p.gates_new && p.cache_seqlens && p.o),
            "state, q, k_cache, v_cache, gates, gates_new, cache_seqlens and o must be set");
  AHN_CHECK(p.HQ > 0 && p.HK > 0 && p.HS > 0 && p.HS % p.HQ == 0 && p.HS % p.HK == 0, "HQ and HK must divide HS");
  AHN_CHECK(p.K >= 1 && p.K <= 256 && p.V >= 1 && p.V <= 256, "K and V must be in 1..256");
  AHN_CHECK(p.W >= 1 && p.S >= 0, "W must be >= 1 and S >= 0");
  const int rule = int(p.rule);
  AHN_CHECK(rule >= 0 && rule <= 2, "rule must be 0 (delta), 1 (gated_delta) or 2 (ssd)");
  AHN_CHECK(p.n_gates == (p.rule == ahn::MemoryRule::gated_delta ? 2 : 1), "n_gates must be 2 for gated_delta, else 1");
  AHN_CHECK(p.B == 0 || p.rule != ahn::MemoryRule::ssd || p.A, "A must be set for ssd");
}

}  // namespace

void bind_cache(py::module_& m) {
  using P = ahn::EvictUpdateParams;
  py::class_<P> params(m, "EvictUpdateParams",
                       "Arguments of the AHN memory decode step (evict, fold, read); see csrc/cache/cache.h. "
                       "Pointers are addresses (int, 0 = null).");
  params.def(py::init<>());
  ahn::pointer_field(params, "state", &P::state);
  ahn::pointer_field(params, "q", &P::q);
  ahn::pointer_field(params, "k_cache", &P::k_cache);
  ahn::pointer_field(params, "v_cache", &P::v_cache);
  ahn::pointer_field(params, "gates", &P::gates);
  ahn::pointer_field(params, "gates_new", &P::gates_new);
  ahn::pointer_field(params, "cache_seqlens", &P::cache_seqlens);
  ahn::pointer_field(params, "A", &P::A);
  ahn::pointer_field(params, "o", &P::o);
  using Field = std::pair<const char*, int64_t P::*>;
  const std::initializer_list<Field> sizes_and_strides = {
      {"B", &P::B},           {"HQ", &P::HQ},         {"HK", &P::HK},         {"HS", &P::HS},
      {"K", &P::K},           {"V", &P::V},           {"W", &P::W},           {"S", &P::S},
      {"n_gates", &P::n_gates}, {"state_sb", &P::state_sb}, {"state_sh", &P::state_sh},
      {"state_sk", &P::state_sk}, {"q_sb", &P::q_sb},   {"q_sh", &P::q_sh},     {"kc_sb", &P::kc_sb},
      {"kc_st", &P::kc_st},   {"kc_sh", &P::kc_sh},   {"vc_sb", &P::vc_sb},   {"vc_st", &P::vc_st},
      {"vc_sh", &P::vc_sh},   {"g_sb", &P::g_sb},     {"g_st", &P::g_st},     {"g_sh", &P::g_sh},
      {"gn_sb", &P::gn_sb},   {"gn_sh", &P::gn_sh}};
  for (auto [name, field] : sizes_and_strides) params.def_readwrite(name, field);
  params.def_property(
      "rule", [](const P& self) { return int(self.rule); },
      [](P& self, int code) { self.rule = ahn::MemoryRule(code); });
  params.def_readwrite("scale", &P::scale);
  ahn::dtype_field(params);

  m.def(
      "launch_ahn_evict_update_cpu",
      [](const P& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_ahn_evict_update_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");
}
