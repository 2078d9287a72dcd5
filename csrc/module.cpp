// pybind11 module fastpeft._C: fastpeft's CUDA C++ kernels behind raw-pointer entry points, plus
// host entry points that run the kernels' per-element math (elementwise.h) on the CPU for tests.
// Links only cudart (no torch C++ ABI): tensors arrive as data_ptr() integers, the stream as
// torch.cuda.current_stream().cuda_stream. Loaded through fastpeft.cuda_ext, which checks
// cuda_device_count() first so a machine without a device gets a clear error, not a crash.
//
// OPT-IN: no GPU has run these kernels yet.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "block.h"
#include "elementwise.h"
#include "launchers.h"

namespace py = pybind11;
using namespace fastpeft;

namespace {

// (cudaError_t code, its name and description, device count): never raises, so a machine
// without a driver or device reports why instead of failing at the first launch.
std::tuple<int, std::string, int> cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so a later call starts clean
    return {static_cast<int>(err), std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err), 0};
  }
  return {0, "cudaSuccess", count};
}

DType dtype_code(int code) {
  if (code < 0 || code > static_cast<int>(DType::kBFloat16)) throw std::invalid_argument("fastpeft._C: unknown dtype code");
  return static_cast<DType>(code);
}

std::vector<std::tuple<uint32_t, uint32_t, uint32_t, uint32_t>> philox4x32_host(uint64_t seed,
                                                                                const std::vector<uint64_t>& counters) {
  std::vector<std::tuple<uint32_t, uint32_t, uint32_t, uint32_t>> out;
  out.reserve(counters.size());
  for (uint64_t c : counters) {
    const Philox4 r = philox4x32(c, seed);
    out.emplace_back(r.x, r.y, r.z, r.w);
  }
  return out;
}

py::bytes keep_mask_host(uint64_t seed, int64_t rows, int64_t cols, uint32_t threshold) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("keep_mask_host: rows and cols must be >= 0");
  std::string mask(static_cast<size_t>(rows * cols), '\0');
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t d = 0; d < cols; ++d) mask[m * cols + d] = keep_element(seed, m, d, cols, threshold) ? 1 : 0;
  return py::bytes(mask);
}

std::pair<std::vector<float>, std::vector<float>> activation_host(int act, const std::vector<float>& zs) {
  if (act < kIdentity || act > kSilu) throw std::invalid_argument("activation_host: unknown activation code");
  std::vector<float> values, grads;
  for (float z : zs) {
    values.push_back(activate(act, z));
    grads.push_back(activate_grad(act, z));
  }
  return {values, grads};
}

// Python tuples -> the launchers' argument structs.
using MatrixArg = std::tuple<uintptr_t, int64_t, int64_t>;  // (address, stride 0, stride 1)
using VectorArg = std::tuple<uintptr_t, int64_t>;           // (address or 0, stride)
using ScalingArg = std::tuple<uintptr_t, float>;            // (fp32 device address or 0, value)
using DropoutArg = std::tuple<uintptr_t, uint32_t, float>;  // (seed address or 0, threshold, 1/(1-p))

Matrix matrix(const MatrixArg& t) { return Matrix{std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }
Vector vector(const VectorArg& t) { return Vector{std::get<0>(t), std::get<1>(t)}; }
Scaling scaling(const ScalingArg& t) { return Scaling{std::get<0>(t), std::get<1>(t)}; }
Dropout dropout(const DropoutArg& t) { return Dropout{std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }

// Binds `name` (launch on the given stream) and `name`_emulated (the same kernels' code run on the
// CPU, block by block, on host memory; `stream` is ignored): make(emulate) returns the function.
template <typename Make, typename... Args>
void def_with_emulation(py::module_& m, const std::string& name, Make make, const std::string& doc,
                        const Args&... args) {
  m.def(name.c_str(), make(false), doc.c_str(), args...);
  const std::string emulated_doc = "The CPU emulation of " + name + " (tests): same arguments, host addresses";
  m.def((name + "_emulated").c_str(), make(true), emulated_doc.c_str(), args...);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft's CUDA C++ kernels (opt-in: no GPU has run them yet). Use fastpeft.cuda_ext.load().";
  m.attr("PHILOX_ROUNDS") = kPhiloxRounds;
  m.attr("BOTTLENECK_MAX_RANK") = kBottleneckMaxRank;
  m.attr("ROW_BLOCK") = kRowBlock;
  m.attr("OUTER_ROWS") = kOuterRows;
  m.attr("OUTER_TILE") = kOuterTileSize;
  m.attr("BGMV_SLICE_K") = kBgmvSliceK;
  py::dict acts;
  acts["identity"] = static_cast<int>(kIdentity);
  acts["relu"] = static_cast<int>(kRelu);
  acts["gelu"] = static_cast<int>(kGeluErf);
  acts["gelu_tanh"] = static_cast<int>(kGeluTanh);
  acts["silu"] = static_cast<int>(kSilu);
  m.attr("ACTIVATIONS") = acts;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::kFloat32);
  dtypes["float16"] = static_cast<int>(DType::kFloat16);
  dtypes["bfloat16"] = static_cast<int>(DType::kBFloat16);
  m.attr("DTYPES") = dtypes;

  m.def("cuda_device_count", &cuda_device_count,
        "(error code, error text, device count) from cudaGetDeviceCount; never raises");
  m.def("philox4x32_host", &philox4x32_host, py::arg("seed"), py::arg("counters"),
        "Philox4x32 (PHILOX_ROUNDS rounds) on the CPU, as the kernels draw it: 4 uint32 per counter");
  m.def("keep_mask_host", &keep_mask_host, py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("threshold"),
        "The kernels' dropout keep-mask [rows, cols] computed on the CPU, as bytes of 0/1");
  m.def("activation_host", &activation_host, py::arg("activation"), py::arg("zs"),
        "(act(z), act'(z)) for each z, computed on the CPU with the kernels' code");

  m.def(
      "emulation_drop_barrier", [](const std::string& site) { HostShared::dropped_barrier() = site; }, py::arg("site"),
      "Tests: make the CPU emulation skip the B::sync() at `site` (\"bottleneck.cu:109\"), as if the line were "
      "removed; \"\" restores every barrier (block.h: HostShared)");
  m.def(
      "emulation_block_order", [](uint64_t seed) { emulation_block_order() = seed; }, py::arg("seed"),
      "Tests: run the CPU emulation's blocks in index order (0) or in a permutation drawn from `seed` (block.h: "
      "emulate_grid), as a GPU runs them in no set order");
  m.def(
      "emulation_load_counts",
      []() {
        EmulationCounts& counts = EmulationCounts::current();
        const std::pair<int64_t, int64_t> seen{counts.vector_loads, counts.scalar_loads};
        counts = EmulationCounts{};
        return seen;
      },
      "Tests: (vector groups, element-by-element groups) the CPU emulation's load_group read since the last call "
      "(dtypes.cuh), then resets both counts");
  def_with_emulation(
      m, "bottleneck_forward",
      [](bool emulate) {
        return [emulate](const MatrixArg& h, const MatrixArg& w_down, const VectorArg& b_down, const MatrixArg& w_up,
                         const VectorArg& b_up, const MatrixArg& residual, uintptr_t out, uintptr_t z, int64_t M,
                         int64_t D, int64_t R, int activation, const ScalingArg& scale, const DropoutArg& drop,
                         int dtype, int weight_dtype, uintptr_t stream) {
          const BottleneckForward args{matrix(h), matrix(w_down), matrix(w_up), matrix(residual), vector(b_down),
                                       vector(b_up), out, z, M, D, R, activation, scaling(scale), dropout(drop),
                                       dtype_code(dtype), dtype_code(weight_dtype)};
          emulate ? bottleneck_forward_emulated(args) : bottleneck_forward(args, stream);
        };
      },
      "Launch the fused bottleneck forward (launchers.h: BottleneckForward). Matrices are (address, stride0, "
      "stride1), vectors (address or 0, stride), scaling (fp32 address or 0, value), dropout (seed address or 0, "
      "threshold, 1/(1-p))",
      py::arg("h"), py::arg("w_down"), py::arg("b_down"), py::arg("w_up"), py::arg("b_up"), py::arg("residual"),
      py::arg("out"), py::arg("z"), py::arg("M"), py::arg("D"), py::arg("R"), py::arg("activation"),
      py::arg("scaling"), py::arg("dropout"), py::arg("dtype"), py::arg("weight_dtype"), py::arg("stream"));
  def_with_emulation(
      m, "bottleneck_backward",
      [](bool emulate) {
        return [emulate](const MatrixArg& dout, const MatrixArg& h, const MatrixArg& w_down, const MatrixArg& w_up,
                         uintptr_t z, uintptr_t dz, uintptr_t ds_partials, uintptr_t dh, uintptr_t wu_partials,
                         uintptr_t bu_partials, uintptr_t wd_partials, uintptr_t bd_partials, int64_t M, int64_t D,
                         int64_t R, int64_t splits, int64_t rows_per_split, int activation, const ScalingArg& scale,
                         bool add_dout, const DropoutArg& drop, int dtype, int weight_dtype, uintptr_t stream) {
          const BottleneckBackward args{matrix(dout), matrix(h), matrix(w_down), matrix(w_up), z, dz, ds_partials,
                                        dh, wu_partials, bu_partials, wd_partials, bd_partials, M, D, R, splits,
                                        rows_per_split, activation, scaling(scale), add_dout, dropout(drop),
                                        dtype_code(dtype), dtype_code(weight_dtype)};
          emulate ? bottleneck_backward_emulated(args) : bottleneck_backward(args, stream);
        };
      },
      "Launch the bottleneck backward (launchers.h: BottleneckBackward); outputs at address 0 are skipped",
      py::arg("dout"), py::arg("h"), py::arg("w_down"), py::arg("w_up"), py::arg("z"), py::arg("dz"),
      py::arg("ds_partials"), py::arg("dh"), py::arg("wu_partials"), py::arg("bu_partials"), py::arg("wd_partials"),
      py::arg("bd_partials"), py::arg("M"), py::arg("D"), py::arg("R"), py::arg("splits"), py::arg("rows_per_split"),
      py::arg("activation"), py::arg("scaling"), py::arg("add_dout"), py::arg("dropout"), py::arg("dtype"),
      py::arg("weight_dtype"), py::arg("stream"));
  def_with_emulation(
      m, "bgmv_forward",
      [](bool emulate) {
        return [emulate](uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t scalings, uintptr_t adapter_ids,
                         uintptr_t ranks, uintptr_t y, uintptr_t shrunk, int64_t T, int64_t K, int64_t N, int64_t L,
                         int64_t R_max, int64_t ld_x, int64_t ld_y, int dtype, int lora_dtype, uintptr_t stream) {
          const BgmvForward args{x, lora_a, lora_b, scalings, adapter_ids, ranks, y, shrunk, T, K, N, L, R_max,
                                 ld_x, ld_y, dtype_code(dtype), dtype_code(lora_dtype)};
          emulate ? bgmv_forward_emulated(args) : bgmv_forward(args, stream);
        };
      },
      "Launch the multi-LoRA decode shrink + expand (launchers.h: BgmvForward)", py::arg("x"), py::arg("lora_a"),
      py::arg("lora_b"), py::arg("scalings"), py::arg("adapter_ids"), py::arg("ranks"), py::arg("y"),
      py::arg("shrunk"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("L"), py::arg("R_max"), py::arg("ld_x"),
      py::arg("ld_y"), py::arg("dtype"), py::arg("lora_dtype"), py::arg("stream"));
}
