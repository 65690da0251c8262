// ahn_kernels._C, ssd part: ScanParams, ScanBwdParams, StateUpdateParams and their CPU launchers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

#include "fields.h"
#include "common/check.h"
#include "ssd/ssd.h"

namespace py = pybind11;
using ahn::dtype_field;
using ahn::pointer_field;

namespace {

// The structs come from Python field by field: guard what would make a kernel read
// out of bounds or divide by zero before any launcher runs.
// What the scan forward and backward share.
void check_inputs(const ahn::ScanParams& p) {
  AHN_CHECK(p.B >= 0 && p.T >= 0 && p.N >= 0, "B, T and N must be >= 0");
  AHN_CHECK(p.B * p.T == 0 || (p.x && p.dt && p.Bm && p.Cm), "x, dt, B and C must be set");
  AHN_CHECK(p.N * p.H == 0 || p.A, "A must be set");
  AHN_CHECK(p.cu_seqlens ? p.B == 1 : p.N == p.B, "N must equal B without cu_seqlens, and B must be 1 with it");
  AHN_CHECK(p.H > 0 && p.G > 0 && p.H % p.G == 0, "G must divide H");
  AHN_CHECK(p.P >= 1 && p.P <= 256 && p.NS >= 1 && p.NS <= 256, "P and NS must be in 1..256");
  AHN_CHECK(p.C >= 1, "C must be >= 1");
  AHN_CHECK(p.W >= 0 && p.S >= 0 && (p.W > 0 || p.S == 0), "W and S must be >= 0, and S = 0 without a window");
}

void check(const ahn::ScanParams& p) {
  check_inputs(p);
  AHN_CHECK(p.B * p.T == 0 || p.y, "y must be set");
  AHN_CHECK(p.N * p.H == 0 || p.ht, "ht must be set");
}

void check(const ahn::ScanBwdParams& q) {
  const ahn::ScanParams& p = q.scan;
  check_inputs(p);
  AHN_CHECK(p.B * p.T == 0 || (q.dout && q.dx && q.ddt && q.dB && q.dC), "dout, dx, ddt, dB and dC must be set");
  AHN_CHECK(q.dA && (p.N * p.H == 0 || (q.dht && q.dh0)), "dA, dht and dh0 must be set");
  AHN_CHECK(!p.D == !q.dD && !p.z == !q.dz && !p.dt_bias == !q.ddt_bias,
            "dD, dz and ddt_bias must be set exactly when D, z and dt_bias are");
}

void check(const ahn::StateUpdateParams& p) {
  AHN_CHECK(p.B >= 0 && p.NB >= 0, "B and NB must be >= 0");
  AHN_CHECK(p.B == 0 || (p.state && p.x && p.dt && p.A && p.Bm && p.Cm && p.y),
            "state, x, dt, A, B, C and y must be set");
  AHN_CHECK(p.idx || p.NB >= p.B, "without idx the state needs a slot per row");
  AHN_CHECK(p.H > 0 && p.G > 0 && p.H % p.G == 0, "G must divide H");
  AHN_CHECK(p.P >= 1 && p.P <= 256 && p.NS >= 1 && p.NS <= 256, "P and NS must be in 1..256");
}

}  // namespace

void bind_ssd(py::module_& m) {
  using SP = ahn::ScanParams;
  py::class_<SP> scan(m, "SsdScanParams",
                      "Arguments of the token-serial SSD scan forward with lag; see csrc/ssd/ssd.h. "
                      "Pointers are addresses (int, 0 = null).");
  scan.def(py::init<>());
  pointer_field(scan, "x", &SP::x);
  pointer_field(scan, "dt", &SP::dt);
  pointer_field(scan, "A", &SP::A);
  pointer_field(scan, "B_ptr", &SP::Bm);
  pointer_field(scan, "C_ptr", &SP::Cm);
  pointer_field(scan, "D", &SP::D);
  pointer_field(scan, "z", &SP::z);
  pointer_field(scan, "dt_bias", &SP::dt_bias);
  pointer_field(scan, "h0", &SP::h0);
  pointer_field(scan, "y", &SP::y);
  pointer_field(scan, "ht", &SP::ht);
  pointer_field(scan, "cu_seqlens", &SP::cu_seqlens);
  using ScanField = std::pair<const char*, int64_t SP::*>;
  const std::initializer_list<ScanField> scan_ints = {
      {"B", &SP::B},       {"T", &SP::T},       {"N", &SP::N},       {"H", &SP::H},       {"G", &SP::G},
      {"P", &SP::P},       {"NS", &SP::NS},     {"C", &SP::C},       {"W", &SP::W},       {"S", &SP::S},
      {"x_sb", &SP::x_sb}, {"x_st", &SP::x_st}, {"x_sh", &SP::x_sh}, {"dt_sb", &SP::dt_sb}, {"dt_st", &SP::dt_st},
      {"dt_sh", &SP::dt_sh}, {"B_sb", &SP::B_sb}, {"B_st", &SP::B_st}, {"B_sg", &SP::B_sg},
      {"C_sb", &SP::C_sb}, {"C_st", &SP::C_st}, {"C_sg", &SP::C_sg}, {"z_sb", &SP::z_sb},
      {"z_st", &SP::z_st}, {"z_sh", &SP::z_sh}, {"D_sh", &SP::D_sh}, {"D_sp", &SP::D_sp}};
  for (auto [name, field] : scan_ints) scan.def_readwrite(name, field);
  scan.def_readwrite("dt_softplus", &SP::dt_softplus);
  scan.def_readwrite("dt_min", &SP::dt_min);
  scan.def_readwrite("dt_max", &SP::dt_max);
  dtype_field(scan);
  m.def(
      "launch_ssd_scan_fwd_cpu",
      [](const SP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_ssd_scan_fwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

  using BP = ahn::ScanBwdParams;
  py::class_<BP> bwd(m, "SsdScanBwdParams",
                     "Arguments of the token-serial SSD scan backward: the forward's in `scan`, the upstream "
                     "gradients and the gradient outputs; see csrc/ssd/ssd.h. Pointers are addresses (int, 0 = null).");
  bwd.def(py::init<>());
  bwd.def_readwrite("scan", &BP::scan);
  pointer_field(bwd, "dout", &BP::dout);
  pointer_field(bwd, "dht", &BP::dht);
  pointer_field(bwd, "dx", &BP::dx);
  pointer_field(bwd, "ddt", &BP::ddt);
  pointer_field(bwd, "dA", &BP::dA);
  pointer_field(bwd, "dB", &BP::dB);
  pointer_field(bwd, "dC", &BP::dC);
  pointer_field(bwd, "dD", &BP::dD);
  pointer_field(bwd, "dz", &BP::dz);
  pointer_field(bwd, "ddt_bias", &BP::ddt_bias);
  pointer_field(bwd, "dh0", &BP::dh0);
  bwd.def_readwrite("dout_sb", &BP::dout_sb);
  bwd.def_readwrite("dout_st", &BP::dout_st);
  bwd.def_readwrite("dout_sh", &BP::dout_sh);
  m.def(
      "launch_ssd_scan_bwd_cpu",
      [](const BP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_ssd_scan_bwd_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");

  using UP = ahn::StateUpdateParams;
  py::class_<UP> step(m, "SsdStateUpdateParams",
                      "Arguments of the SSD decode step; see csrc/ssd/ssd.h. Pointers are addresses (int, 0 = null).");
  step.def(py::init<>());
  pointer_field(step, "state", &UP::state);
  pointer_field(step, "x", &UP::x);
  pointer_field(step, "dt", &UP::dt);
  pointer_field(step, "A", &UP::A);
  pointer_field(step, "B_ptr", &UP::Bm);
  pointer_field(step, "C_ptr", &UP::Cm);
  pointer_field(step, "D", &UP::D);
  pointer_field(step, "z", &UP::z);
  pointer_field(step, "dt_bias", &UP::dt_bias);
  pointer_field(step, "idx", &UP::idx);
  pointer_field(step, "y", &UP::y);
  using StepField = std::pair<const char*, int64_t UP::*>;
  const std::initializer_list<StepField> step_ints = {
      {"B", &UP::B},           {"NB", &UP::NB},         {"H", &UP::H},           {"G", &UP::G},
      {"P", &UP::P},           {"NS", &UP::NS},         {"state_sb", &UP::state_sb}, {"state_sh", &UP::state_sh},
      {"state_sp", &UP::state_sp}, {"x_sb", &UP::x_sb}, {"x_sh", &UP::x_sh},     {"dt_sb", &UP::dt_sb},
      {"dt_sh", &UP::dt_sh},   {"B_sb", &UP::B_sb},     {"B_sg", &UP::B_sg},     {"C_sb", &UP::C_sb},
      {"C_sg", &UP::C_sg},     {"z_sb", &UP::z_sb},     {"z_sh", &UP::z_sh},     {"D_sh", &UP::D_sh},
      {"D_sp", &UP::D_sp}};
  for (auto [name, field] : step_ints) step.def_readwrite(name, field);
  step.def_readwrite("dt_softplus", &UP::dt_softplus);
  dtype_field(step);
  m.def(
      "launch_ssd_state_update_cpu",
      [](const UP& p, int num_threads) {
        check(p);
        py::gil_scoped_release release;
        ahn::launch_ssd_state_update_cpu(p, num_threads);
      },
      py::arg("p"), py::arg("num_threads"), "Run on host memory with `num_threads` OpenMP threads.");
}
