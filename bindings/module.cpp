// ahn_kernels._C: the launcher table. Tensors cross as raw addresses (Python ints
// from `.data_ptr()`, 0 = null), sizes and element strides; streams as integer
// handles. No torch here, so one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fields.h"
#include "common/check.h"
#include "delta_rule/delta_rule.h"

namespace py = pybind11;
using ahn::dtype_field;
using ahn::pointer_field;
void bind_cache(py::module_& m);  // bindings/cache.cpp
void bind_ssd(py::module_& m);  // bindings/ssd.cpp
void bind_swa(py::module_& m);  // bindings/swa.cpp
void bind_swa_decode(py::module_& m);  // bindings/swa.cpp

namespace {

// The struct comes from Python field by field: guard what would make a kernel read
// out of bounds or divide by zero before any launcher runs.
void check(const ahn::FusedRecurrentParams& p) {
  AHN_CHECK(p.B >= 0 && p.T >= 0 && p.N >= 0, "B, T and N must be >= 0");
  AHN_CHECK(p.B * p.T == 0 || (p.q && p.k && p.v && p.beta && p.o), "q, k, v, beta and o must be set");
  AHN_CHECK(p.cu_seqlens ? p.B == 1 : p.N == p.B, "N must equal B without cu_seqlens, and B must be 1 with it");
  AHN_CHECK(p.HQ > 0 && p.HK > 0 && p.HV > 0 && p.HS > 0, "head counts must be > 0");
  AHN_CHECK(p.HS % p.HQ == 0 && p.HS % p.HK == 0 && p.HS % p.HV == 0, "HQ, HK and HV must divide HS");
  AHN_CHECK(p.K >= 1 && p.K <= 256 && p.V >= 1 && p.V <= 256, "K and V must be in 1..256");
}

void check(const ahn::ChunkParams& p) {
  AHN_CHECK(p.B >= 0 && p.T >= 0 && p.N >= 0, "B, T and N must be >= 0");
  AHN_CHECK(p.B * p.T == 0 || (p.q && p.k && p.v && p.beta && p.o), "q, k, v, beta and o must be set");
  AHN_CHECK(p.N * p.HS == 0 || p.ht, "ht must be set");
  AHN_CHECK(p.cu_seqlens ? p.B == 1 : p.N == p.B, "N must equal B without cu_seqlens, and B must be 1 with it");
  AHN_CHECK(p.HQ > 0 && p.HK > 0 && p.HV > 0 && p.HS > 0, "head counts must be > 0");
  AHN_CHECK(p.HS % p.HQ == 0 && p.HS % p.HK == 0 && p.HS % p.HV == 0, "HQ, HK and HV must divide HS");
  AHN_CHECK(p.K >= 1 && p.K <= 256 && p.V >= 1 && p.V <= 256, "K and V must be in 1..256");
  AHN_CHECK(p.C == 16 || p.C == 32 || p.C == 64, "C must be 16, 32 or 64");
  AHN_CHECK(p.W >= 0 && p.S >= 0 && (p.W > 0 || p.S == 0), "W and S must be >= 0, and S = 0 without a window");
}

void check(const ahn::ChunkBwdParams& p) {
  const ahn::ChunkParams& f = p.fwd;
  AHN_CHECK(f.B >= 0 && f.T >= 0 && f.N >= 0, "B, T and N must be >= 0");
  AHN_CHECK(f.B * f.T == 0 || (f.q && f.k && f.v && f.beta && p.grad_o && p.dq && p.dk && p.dv && p.dbeta),
            "q, k, v, beta, grad_o, dq, dk, dv and dbeta must be set");
  AHN_CHECK(f.B * f.T == 0 || !f.g || p.dg, "dg must be set with g");
  AHN_CHECK(f.N * f.HS == 0 || (p.grad_ht && p.dh0), "grad_ht and dh0 must be set");
  AHN_CHECK(f.cu_seqlens ? f.B == 1 : f.N == f.B, "N must equal B without cu_seqlens, and B must be 1 with it");
  AHN_CHECK(f.HQ > 0 && f.HK > 0 && f.HV > 0 && f.HS > 0, "head counts must be > 0");
  AHN_CHECK(f.HS % f.HQ == 0 && f.HS % f.HK == 0 && f.HS % f.HV == 0, "HQ, HK and HV must divide HS");
  AHN_CHECK(f.K >= 1 && f.K <= 256 && f.V >= 1 && f.V <= 256, "K and V must be in 1..256");
  AHN_CHECK(f.C == 16 || f.C == 32 || f.C == 64, "C must be 16, 32 or 64");
  AHN_CHECK(f.W >= 0 && f.S >= 0 && (f.W > 0 || f.S == 0), "W and S must be >= 0, and S = 0 without a window");
}

py::dict build_info() {
  py::dict d;
  d["cpu"] = true;
#ifdef AHN_WITH_CUDA
  d["cuda"] = true;
  std::vector<std::string> archs;
  const std::string list = AHN_CUDA_ARCHS;  // e.g. "sm_80,sm_90a,compute_90"
  for (size_t start = 0, end; start < list.size(); start = end + 1) {
    end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    if (end > start) archs.push_back(list.substr(start, end - start));
  }
  d["cuda_archs"] = archs;
  d["cuda_compiler"] = AHN_CUDA_COMPILER;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::vector<std::string>{};
  d["cuda_compiler"] = py::none();
#endif
  d["cxx_compiler"] = AHN_CXX_COMPILER;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["native"] = bool(AHN_NATIVE);
  d["sanitize"] = bool(AHN_SANITIZE);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ahn_kernels compiled kernels (torch-free launchers on raw pointers)";
  m.def("build_info", &build_info, "What this build holds: backends, CUDA archs, compilers, flags.");
  bind_cache(m);
  bind_ssd(m);
  bind_swa(m);
  bind_swa_decode(m);

  // ---- delta_rule -------------------------------------------------------------
  using P = ahn::FusedRecurrentParams;
  py::class_<P> params(m, "FusedRecurrentParams",
                       "Arguments of the fused recurrent (token-serial) delta rule forward; see "
                       "csrc/delta_rule/delta_rule.h. Pointers are addresses (int, 0 = null).");
  params.def(py::init<>());
  pointer_field(params, "q", &P::q);
  pointer_field(params, "k", &P::k);
  pointer_field(params, "v", &P::v);
  pointer_field(params, "g", &P::g);
  pointer_field(params, "beta", &P::beta);
  pointer_field(params, "h0", &P::h0);
  pointer_field(params, "o", &P::o);
  pointer_field(params, "ht", &P::ht);
  pointer_field(params, "cu_seqlens", &P::cu_seqlens);
  using Field = std::pair<const char*, int64_t P::*>;
  const std::initializer_list<Field> sizes_and_strides = {
      {"B", &P::B},         {"T", &P::T},         {"N", &P::N},        {"HQ", &P::HQ},  {"HK", &P::HK},
      {"HV", &P::HV},       {"HS", &P::HS},       {"K", &P::K},        {"V", &P::V},    {"q_sb", &P::q_sb},
      {"q_st", &P::q_st},   {"q_sh", &P::q_sh},   {"k_sb", &P::k_sb},  {"k_st", &P::k_st},
      {"k_sh", &P::k_sh},   {"v_sb", &P::v_sb},   {"v_st", &P::v_st},  {"v_sh", &P::v_sh},
      {"g_sb", &P::g_sb},   {"g_st", &P::g_st},   {"g_sh", &P::g_sh},  {"beta_sb", &P::beta_sb},
      {"beta_st", &P::beta_st}, {"beta_sh", &P::beta_sh}};
  for (auto [name, field] : sizes_and_strides) params.def_readwrite(name, field);
  params.def_readwrite("scale", &P::scale);
  params.def_readwrite("l2norm", &P::l2norm);
  dtype_field(params);

  m.def(
      "launch_fused_recurrent_fwd_cpu",
      [](const P& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_fused_recurrent_fwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

  using CP = ahn::ChunkParams;
  py::class_<CP, P> chunk(m, "ChunkParams",
                          "Arguments of the chunked (WY / UT) delta rule forward with lag: FusedRecurrentParams' "
                          "fields plus C, W, S; see csrc/delta_rule/delta_rule.h.");
  chunk.def(py::init<>());
  for (auto [name, field] : {std::pair<const char*, int64_t CP::*>{"C", &CP::C}, {"W", &CP::W}, {"S", &CP::S}})
    chunk.def_readwrite(name, field);
  m.def(
      "launch_chunk_fwd_cpu",
      [](const CP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_chunk_fwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

  using BP = ahn::ChunkBwdParams;
  py::class_<BP> chunk_bwd(m, "ChunkBwdParams",
                           "Arguments of the chunked delta rule backward: the forward's ChunkParams (`fwd`) "
                           "plus upstream gradients and gradient outputs; see csrc/delta_rule/delta_rule.h.");
  chunk_bwd.def(py::init<>());
  chunk_bwd.def_readwrite("fwd", &BP::fwd);
  pointer_field(chunk_bwd, "grad_o", &BP::grad_o);
  pointer_field(chunk_bwd, "grad_ht", &BP::grad_ht);
  pointer_field(chunk_bwd, "dq", &BP::dq);
  pointer_field(chunk_bwd, "dk", &BP::dk);
  pointer_field(chunk_bwd, "dv", &BP::dv);
  pointer_field(chunk_bwd, "dbeta", &BP::dbeta);
  pointer_field(chunk_bwd, "dg", &BP::dg);
  pointer_field(chunk_bwd, "dh0", &BP::dh0);
  chunk_bwd.def_readwrite("do_sb", &BP::do_sb);
  chunk_bwd.def_readwrite("do_st", &BP::do_st);
  chunk_bwd.def_readwrite("do_sh", &BP::do_sh);
  m.def(
      "launch_chunk_bwd_cpu",
      [](const BP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_chunk_bwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

#ifdef AHN_WITH_CUDA
  m.def(
      "launch_fused_recurrent_fwd_cuda",
      [](const P& p, bool int64_offsets, std::uintptr_t stream) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_fused_recurrent_fwd_cuda(p, int64_offsets, reinterpret_cast<void*>(stream));
      },
      py::arg("p"), py::arg("int64_offsets"), py::arg("stream"),
      "Enqueue on the cudaStream_t `stream` (int handle, 0 = legacy default); does not synchronise. "
      "`int64_offsets`: compute element offsets in 64 bits (needed when one can reach 2^31).");
#endif
}
