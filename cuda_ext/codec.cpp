// division._C: compress / decompress in the bit format of division/format.py (version 1).
//
// CUDA tensors run the kernels of codec_cuda.cu. CPU tensors run the CPU twin: the same phase
// functions (codec_phases.h) executed thread by thread, block by block, so that a machine without
// a GPU tests the kernels' indexing, work split, reductions and packing against the reference.
// division/codec.py sends only CUDA tensors here; the CPU twin exists for tests.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "codec.h"

namespace division {
namespace {

// q, j and q0 + 32 of a plane stay below 2^31 (FastDiv and the int32 element indices)
constexpr int64_t kMaxPlaneNumel = (int64_t{1} << 31) - 64;

int parse_mode(const std::string& mode, const char* what) {
  if (mode == "division") return kDivision;
  if (mode == "lfc_only") return kLfcOnly;
  TORCH_CHECK(mode == "hfc_only", what, ": mode '", mode, "' is not one of division, lfc_only, ",
              "hfc_only (exact mode keeps the input itself and never reaches the kernels)");
  return kHfcOnly;
}

bool is_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

int lfc_kind_of(at::ScalarType dtype, const char* what) {
  if (dtype == at::kBFloat16) return kLfcBFloat16;
  if (dtype == at::kHalf) return kLfcFloat16;
  TORCH_CHECK(dtype == at::kFloat, what, ": the LFC dtype must be bfloat16, float16 or float32, got ",
              dtype);
  return kLfcFloat32;
}

void check_bits(int64_t bits, const char* what) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, what,
              ": bits must be 1, 2, 4 or 8, got ", bits);
}

int log2_of_bits(int64_t bits) { return bits == 1 ? 0 : bits == 2 ? 1 : bits == 4 ? 2 : 3; }

Geometry make_geometry(at::IntArrayRef shape, int64_t block, int64_t bits, bool channels_last,
                       const char* what) {
  TORCH_CHECK(shape.size() >= 3 && shape.size() <= 5, what,
              ": expected an (N, C, *spatial) shape with 1 to 3 spatial dims, got ", shape);
  TORCH_CHECK(block >= 1, what, ": block_size must be >= 1, got ", block);
  check_bits(bits, what);
  for (size_t d = 0; d < shape.size(); ++d) {
    TORCH_CHECK(shape[d] >= 0, what, ": negative size in shape ", shape);
    TORCH_CHECK(d < 2 || shape[d] > 0, what, ": spatial sizes must be positive, got shape ", shape);
  }
  const size_t dims = shape.size() - 2;
  int64_t size[3] = {1, 1, 1};  // (D, H, W), missing leading dims = 1
  for (size_t d = 0; d < dims; ++d) size[3 - dims + d] = shape[2 + d];
  int64_t numel = 1;
  for (int64_t s : size) {
    numel *= s;
    TORCH_CHECK(numel <= kMaxPlaneNumel, what, ": a plane of shape ", shape, " holds ",
                "2^31 or more elements, more than the kernels index");
  }
  Geometry g{};
  g.planes = shape[0] * shape[1];
  g.channels = shape[1];
  g.plane_bytes = (numel * bits + 31) / 32 * 4;
  int32_t* sizes[3] = {&g.d, &g.h, &g.w};
  int32_t* sides[3] = {&g.bd, &g.bh, &g.bw};
  int32_t* counts[3] = {&g.ld, &g.lh, &g.lw};
  int64_t lfc_numel = 1;
  for (int k = 0; k < 3; ++k) {
    const int64_t side = std::min(block, size[k]);
    *sizes[k] = static_cast<int32_t>(size[k]);
    *sides[k] = static_cast<int32_t>(side);
    *counts[k] = static_cast<int32_t>((size[k] + side - 1) / side);
    lfc_numel *= *counts[k];
  }
  g.numel = static_cast<int32_t>(numel);
  g.lfc_numel = static_cast<int32_t>(lfc_numel);
  g.words = static_cast<int32_t>(g.plane_bytes / 4);
  g.div_w = FastDiv::make(g.w);
  g.div_h = FastDiv::make(g.h);
  g.div_bd = FastDiv::make(g.bd);
  g.div_bh = FastDiv::make(g.bh);
  g.div_bw = FastDiv::make(g.bw);
  g.div_lw = FastDiv::make(g.lw);
  g.div_lh = FastDiv::make(g.lh);
  g.channels_last = channels_last;
  return g;
}

std::vector<int64_t> lfc_sizes(at::IntArrayRef shape, int64_t block) {
  std::vector<int64_t> sizes{shape[0], shape[1]};
  for (size_t d = 2; d < shape.size(); ++d) {
    const int64_t side = std::min(block, shape[d]);
    sizes.push_back((shape[d] + side - 1) / side);
  }
  return sizes;
}

// threads_per_plane == 0: the launch shape the kernels use (codec_phases.h); otherwise the one
// asked for (tests sweep them: the results must not depend on it).
Launch pick_launch(const Geometry& g, bool for_compress, int64_t threads_per_plane, bool plane_minor,
                   const char* what) {
  if (threads_per_plane == 0) return for_compress ? compress_launch(g) : decompress_launch(g);
  TORCH_CHECK(threads_per_plane >= 1 && threads_per_plane <= kBlockThreads &&
                  (threads_per_plane & (threads_per_plane - 1)) == 0,
              what, ": threads_per_plane must be 0 (automatic) or a power of two up to ",
              kBlockThreads, ", got ", threads_per_plane);
  return make_launch(static_cast<int>(threads_per_plane), plane_minor);
}

// The CPU twin's executor: each phase for thread ids 0..kBlockThreads-1 in turn; a barrier is the
// end of a phase.
struct HostExec {
  template <typename F>
  void each(F&& f) {
    for (int tid = 0; tid < kBlockThreads; ++tid) f(tid);
  }
  void sync() {}
};

template <typename scalar_t>
void compress_host(const CompressArgs& args) {
  at::parallel_for(0, blocks_for(args.g, args.l), 1, [&](int64_t begin, int64_t end) {
    HostExec ex;
    CompressShared shared;
    for (int64_t block = begin; block < end; ++block) compress_block<scalar_t>(ex, args, shared, block);
  });
}

template <typename scalar_t>
void decompress_host(const DecompressArgs& args) {
  at::parallel_for(0, blocks_for(args.g, args.l), 1, [&](int64_t begin, int64_t end) {
    HostExec ex;
    for (int64_t block = begin; block < end; ++block) decompress_block<scalar_t>(ex, args, block);
  });
}

// The layout the kernels read x in: NCHW-contiguous, or channels_last / channels_last_3d in
// place (as format.memory_format_of decides); any other strides are made contiguous first.
std::pair<at::Tensor, bool> kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, true};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {x, true};
  return {x.contiguous(), false};
}

void check_device(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() || t.is_cpu(), what, ": tensors must be on a CUDA device or the CPU, got ",
              t.device());
}

}  // namespace

using Compressed = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Compressed compress_with(const at::Tensor& input, int64_t block_size, int64_t bits,
                         at::ScalarType lfc_dtype, const std::string& mode_name, int64_t seed,
                         int64_t threads_per_plane, bool plane_minor) {
  const char* what = "division._C.compress";
  TORCH_CHECK(input.defined(), what, ": x is undefined");
  check_device(input, what);
  TORCH_CHECK(is_input_dtype(input.scalar_type()), what, ": unsupported dtype ", input.scalar_type(),
              "; expected float32, float16 or bfloat16");
  TORCH_CHECK(seed >= 0, what, ": seed must be in [0, 2^63), got ", seed);
  const int mode = parse_mode(mode_name, what);
  const int kind = lfc_kind_of(lfc_dtype, what);
  const auto [x, channels_last] = kernel_layout(input);
  const Geometry g = make_geometry(x.sizes(), block_size, bits, channels_last, what);
  const Launch launch = pick_launch(g, true, threads_per_plane, plane_minor, what);
  const auto opts = x.options();
  // hfc_only needs the LFC as scratch: the HFC is taken against the rounded LFC in every mode
  at::Tensor lfc = at::empty(lfc_sizes(x.sizes(), block_size), opts.dtype(lfc_dtype));
  at::Tensor codes, lo, step;
  if (mode != kLfcOnly) {
    codes = at::empty({g.planes, g.plane_bytes}, opts.dtype(at::kByte));
    lo = at::empty({x.size(0), x.size(1)}, opts.dtype(at::kFloat));
    step = at::empty({x.size(0), x.size(1)}, opts.dtype(at::kFloat));
  }
  if (g.planes > 0) {
    CompressArgs args{};
    args.x = x.data_ptr();
    args.g = g;
    args.l = launch;
    args.bits = static_cast<int>(bits);
    args.bits_log2 = log2_of_bits(bits);
    args.levels = (1 << bits) - 1;
    args.mode = mode;
    args.lfc_kind = kind;
    args.seed = static_cast<uint64_t>(seed);
    args.lfc = lfc.data_ptr();
    if (mode != kLfcOnly) {
      args.codes = reinterpret_cast<uint32_t*>(codes.data_ptr<uint8_t>());
      args.lo_out = lo.data_ptr<float>();
      args.step_out = step.data_ptr<float>();
    }
    if (x.is_cuda()) {
      compress_cuda(args, x.scalar_type(), x);
    } else {
      DIVISION_DISPATCH(x.scalar_type(), "division_compress_cpu", [&] { compress_host<scalar_t>(args); });
    }
  }
  if (mode == kHfcOnly) lfc = at::Tensor();  // as reference.py: no LFC kept (None)
  return {lfc, codes, lo, step};
}

Compressed compress(const at::Tensor& x, int64_t block_size, int64_t bits, at::ScalarType lfc_dtype,
                    const std::string& mode, int64_t seed) {
  return compress_with(x, block_size, bits, lfc_dtype, mode, seed, 0, false);
}

at::Tensor decompress_with(const std::optional<at::Tensor>& lfc_in,
                           const std::optional<at::Tensor>& codes_in,
                           const std::optional<at::Tensor>& lo_in,
                           const std::optional<at::Tensor>& step_in, std::vector<int64_t> shape,
                           at::ScalarType dtype, bool is_contiguous_format, int64_t block_size,
                           int64_t bits, const std::string& mode_name, int64_t threads_per_plane,
                           bool plane_minor) {
  const char* what = "division._C.decompress";
  const int mode = parse_mode(mode_name, what);
  TORCH_CHECK(is_input_dtype(dtype), what, ": unsupported output dtype ", dtype,
              "; expected float32, float16 or bfloat16");
  TORCH_CHECK(is_contiguous_format || shape.size() == 4 || shape.size() == 5, what,
              ": a channels_last output needs a 4-D or 5-D shape, got ", shape.size(), "-D");
  const bool channels_last = !is_contiguous_format;
  const Geometry g = make_geometry(shape, block_size, bits, channels_last, what);
  const Launch launch = pick_launch(g, false, threads_per_plane, plane_minor, what);
  const bool use_lfc = mode != kHfcOnly, use_hfc = mode != kLfcOnly;
  auto present = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  TORCH_CHECK(!use_lfc || present(lfc_in), what, ": mode ", mode_name, " needs the LFC tensor");
  TORCH_CHECK(!use_hfc || (present(codes_in) && present(lo_in) && present(step_in)), what,
              ": mode ", mode_name, " needs the codes, lo and step tensors");
  const at::Tensor& any = use_lfc ? *lfc_in : *codes_in;
  check_device(any, what);
  DecompressArgs args{};
  at::Tensor lfc, codes, lo, step;  // contiguous versions, alive until the kernel is queued
  if (use_lfc) {
    lfc = lfc_in->contiguous();
    args.lfc_kind = lfc_kind_of(lfc.scalar_type(), what);
    TORCH_CHECK(lfc.device() == any.device() && lfc.numel() == g.planes * g.lfc_numel, what,
                ": the LFC (", lfc.sizes(), ") does not match shape ", shape, " and block_size ",
                block_size);
    args.lfc = lfc.data_ptr();
  }
  if (use_hfc) {
    codes = codes_in->contiguous();
    if (reinterpret_cast<uintptr_t>(codes.data_ptr()) % 4 != 0) codes = codes.clone();  // words
    lo = lo_in->contiguous();
    step = step_in->contiguous();
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == g.planes * g.plane_bytes, what,
                ": the codes (", codes.sizes(), ", ", codes.scalar_type(), ") do not match shape ",
                shape, " and bits=", bits, " (expected uint8 (", g.planes, ", ", g.plane_bytes, "))");
    TORCH_CHECK(lo.scalar_type() == at::kFloat && step.scalar_type() == at::kFloat &&
                    lo.numel() == g.planes && step.numel() == g.planes,
                what, ": lo and step must be float32 (N, C) tensors");
    TORCH_CHECK(codes.device() == any.device() && lo.device() == any.device() &&
                    step.device() == any.device(),
                what, ": all tensors must be on one device");
    args.codes = reinterpret_cast<const uint32_t*>(codes.data_ptr<uint8_t>());
    args.lo = lo.data_ptr<float>();
    args.step = step.data_ptr<float>();
  }
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (channels_last) fmt = shape.size() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  at::Tensor out = at::empty(shape, any.options().dtype(dtype).memory_format(fmt));
  if (g.planes == 0) return out;
  args.g = g;
  args.l = launch;
  args.bits = static_cast<int>(bits);
  args.bits_log2 = log2_of_bits(bits);
  args.mode = mode;
  args.out = out.data_ptr();
  if (out.is_cuda()) {
    decompress_cuda(args, dtype, out);
  } else {
    DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { decompress_host<scalar_t>(args); });
  }
  return out;
}

at::Tensor decompress(const std::optional<at::Tensor>& lfc, const std::optional<at::Tensor>& codes,
                      const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& step,
                      std::vector<int64_t> shape, at::ScalarType dtype, bool is_contiguous_format,
                      int64_t block_size, int64_t bits, const std::string& mode) {
  return decompress_with(lfc, codes, lo, step, std::move(shape), dtype, is_contiguous_format,
                         block_size, bits, mode, 0, false);
}

// (threads_per_plane, planes_per_block, plane_minor) of the automatic launch shapes, for tests
// and benchmarks.
std::tuple<std::tuple<int, int, bool>, std::tuple<int, int, bool>> launch_shapes(
    std::vector<int64_t> shape, int64_t block_size, int64_t bits, bool channels_last) {
  const Geometry g = make_geometry(shape, block_size, bits, channels_last, "division._C.launch_shapes");
  const Launch c = compress_launch(g), d = decompress_launch(g);
  return {{c.threads_per_plane, c.planes_per_block, c.plane_minor},
          {d.threads_per_plane, d.planes_per_block, d.plane_minor}};
}

// uniform24(seed, start + k) for k < count, on the CPU: the hash of division_math.h, for tests
// against division.hashing.uniform.
at::Tensor uniform(int64_t seed, int64_t start, int64_t count) {
  TORCH_CHECK(seed >= 0 && start >= 0 && count >= 0, "division._C._uniform: negative argument");
  at::Tensor out = at::empty({count}, at::kFloat);
  float* p = out.data_ptr<float>();
  for (int64_t k = 0; k < count; ++k) p[k] = uniform24(static_cast<uint64_t>(seed), static_cast<uint64_t>(start + k));
  return out;
}

}  // namespace division

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "DIVISION codec kernels, bit format v1 (division/format.py). CUDA tensors run the "
            "CUDA kernels; CPU tensors their CPU twin (for tests).";
  m.def("compress", &division::compress,
        "compress(x, block_size, bits, lfc_dtype, mode, seed) -> (lfc, codes, lo, step); "
        "None where reference.py keeps None",
        py::arg("x"), py::arg("block_size"), py::arg("bits"), py::arg("lfc_dtype"), py::arg("mode"),
        py::arg("seed"));
  m.def("decompress", &division::decompress,
        "decompress(lfc, codes, lo, step, shape, dtype, is_contiguous_format, block_size, bits, "
        "mode) -> Tensor",
        py::arg("lfc"), py::arg("codes"), py::arg("lo"), py::arg("step"), py::arg("shape"),
        py::arg("dtype"), py::arg("is_contiguous_format"), py::arg("block_size"), py::arg("bits"),
        py::arg("mode"));
  m.def("_compress_with", &division::compress_with,
        "compress with a chosen launch shape (threads_per_plane 0 = automatic); for tests",
        py::arg("x"), py::arg("block_size"), py::arg("bits"), py::arg("lfc_dtype"), py::arg("mode"),
        py::arg("seed"), py::arg("threads_per_plane"), py::arg("plane_minor"));
  m.def("_decompress_with", &division::decompress_with,
        "decompress with a chosen launch shape (threads_per_plane 0 = automatic); for tests",
        py::arg("lfc"), py::arg("codes"), py::arg("lo"), py::arg("step"), py::arg("shape"),
        py::arg("dtype"), py::arg("is_contiguous_format"), py::arg("block_size"), py::arg("bits"),
        py::arg("mode"), py::arg("threads_per_plane"), py::arg("plane_minor"));
  m.def("launch_shapes", &division::launch_shapes,
        "((T, G, plane_minor) of compress, (T, G, plane_minor) of decompress) for a shape",
        py::arg("shape"), py::arg("block_size"), py::arg("bits"), py::arg("channels_last"));
  m.def("_uniform", &division::uniform, "the kernels' uniforms for indices start .. start+count-1",
        py::arg("seed"), py::arg("start"), py::arg("count"));
  m.attr("FORMAT_VERSION") = 1;
  m.attr("BLOCK_THREADS") = division::kBlockThreads;
}
