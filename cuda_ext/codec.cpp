// division._C: compress / decompress in the bit format of division/format.py.
//
// CUDA tensors go to the fused kernels in codec_cuda.cu; CPU tensors to a straightforward twin that
// shares every per-element operation (division_math.h), so that the CPU build tests the arithmetic
// and indexing against the pure-PyTorch reference on machines without a GPU.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "codec.h"
#include "division_math.h"

namespace division {

int parse_mode(const std::string& mode) {
  if (mode == "division") return kDivision;
  if (mode == "lfc_only") return kLfcOnly;
  if (mode == "hfc_only") return kHfcOnly;
  TORCH_CHECK(false, "division._C: mode '", mode, "' is not one of division, lfc_only, hfc_only ",
              "(exact mode keeps the input and never reaches the kernels)");
}

int lfc_kind(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return kLfcBFloat16;
  if (dtype == at::kHalf) return kLfcFloat16;
  TORCH_CHECK(dtype == at::kFloat, "division._C: LFC dtype must be bfloat16, float16 or float32, got ", dtype);
  return kLfcFloat32;
}

int64_t plane_bytes(int64_t numel, int64_t bits) { return (numel * bits + 31) / 32 * 4; }

PlaneGeometry make_geometry(at::IntArrayRef shape, int64_t block, bool channels_last) {
  PlaneGeometry g{};
  const int64_t dims = static_cast<int64_t>(shape.size()) - 2;
  const int64_t d = dims == 3 ? shape[2] : 1;
  const int64_t h = dims >= 2 ? shape[dims == 3 ? 3 : 2] : 1;
  const int64_t w = shape[shape.size() - 1];
  g.d = d, g.h = h, g.w = w;
  g.bd = std::min(block, d), g.bh = std::min(block, h), g.bw = std::min(block, w);
  g.ld = (d + g.bd - 1) / g.bd, g.lh = (h + g.bh - 1) / g.bh, g.lw = (w + g.bw - 1) / g.bw;
  g.numel = d * h * w;
  g.lfc_numel = g.ld * g.lh * g.lw;
  g.channels = shape[1];
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

namespace {

void check_compress_args(const at::Tensor& x, int64_t block, int64_t bits) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, "division._C.compress: expected an (N, C, *spatial) tensor with 1 to 3 ",
              "spatial dims, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "division._C.compress: unsupported dtype ", x.scalar_type(), "; expected float32, float16 or bfloat16");
  TORCH_CHECK(block >= 1, "division._C.compress: block_size must be >= 1, got ", block);
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "division._C.compress: bits must be 1, 2, 4 or 8, got ", bits);
  for (int64_t d = 2; d < x.dim(); ++d) TORCH_CHECK(x.size(d) > 0, "division._C.compress: empty spatial dim in ", x.sizes());
}

// channels_last (4-D) / channels_last_3d (5-D) inputs are read in place; other layouts are copied.
std::pair<at::Tensor, bool> normalized_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, true};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {x, true};
  return {x.contiguous(), false};
}

template <typename scalar_t>
void compress_cpu_impl(const at::Tensor& x, const PlaneGeometry& g, int64_t planes, int bits, int mode,
                       uint64_t seed, int kind, at::Tensor& lfc, at::Tensor& codes, at::Tensor& lo_t,
                       at::Tensor& step_t) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  void* lfc_p = lfc.data_ptr();
  const bool keep_hfc = mode != kLfcOnly;
  const int levels = (1 << bits) - 1;
  const int64_t pbytes = plane_bytes(g.numel, bits);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> up(g.lfc_numel);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < g.lfc_numel; ++j) {
        up[j] = round_lfc(block_mean(xp, g, p, j), kind);
        store_lfc(lfc_p, kind, p * g.lfc_numel + j, up[j]);
      }
      if (!keep_hfc) continue;
      float lo = kFltMax, hi = -kFltMax;
      bool first = true;
      for (int64_t q = 0; q < g.numel; ++q) {
        const float h = fsub(static_cast<float>(xp[element_offset(g, p, q)]), up[block_of(g, q)]);
        if (first || h < lo) lo = h;
        if (first || h > hi) hi = h;
        first = false;
      }
      const PlaneScale s = plane_scale(lo, hi, levels);
      lo_t.data_ptr<float>()[p] = s.lo;
      step_t.data_ptr<float>()[p] = s.step;
      uint8_t* out = codes.data_ptr<uint8_t>() + p * pbytes;
      std::fill(out, out + pbytes, 0);
      for (int64_t q = 0; q < g.numel; ++q) {
        const float h = fsub(static_cast<float>(xp[element_offset(g, p, q)]), up[block_of(g, q)]);
        const float u = uniform24(seed, static_cast<uint64_t>(p * g.numel + q));
        const uint32_t code = quantize(h, s.lo, s.scale, u, levels);
        out[(q * bits) / 8] |= static_cast<uint8_t>(code << ((q * bits) % 8));
      }
    }
  });
}

template <typename scalar_t>
void decompress_cpu_impl(const PlaneGeometry& g, int64_t planes, int bits, int mode, int kind,
                         const void* lfc_p, const uint8_t* codes, const float* lo, const float* step, at::Tensor& out) {
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t pbytes = plane_bytes(g.numel, bits);
  const uint32_t mask = (1u << bits) - 1;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t q = 0; q < g.numel; ++q) {
        const float up = mode == kHfcOnly ? 0.f : load_lfc(lfc_p, kind, p * g.lfc_numel + block_of(g, q));
        uint32_t code = 0;
        float st = 0.f, l = 0.f;
        if (mode != kLfcOnly) {
          code = (codes[p * pbytes + (q * bits) / 8] >> ((q * bits) % 8)) & mask;
          st = step[p];
          l = lo[p];
        }
        op[element_offset(g, p, q)] = static_cast<scalar_t>(reconstruct(mode, up, code, st, l));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress(const at::Tensor& input, int64_t block,
                                                                    int64_t bits, at::ScalarType lfc_dtype,
                                                                    const std::string& mode_name, int64_t seed) {
  check_compress_args(input, block, bits);
  TORCH_CHECK(seed >= 0, "division._C.compress: seed must be in [0, 2^63), got ", seed);
  const int mode = parse_mode(mode_name);
  const int kind = lfc_kind(lfc_dtype);
  auto [x, channels_last] = normalized_layout(input);
  const PlaneGeometry g = make_geometry(x.sizes(), block, channels_last);
  const int64_t planes = x.size(0) * x.size(1);
  auto opts = x.options();
  at::Tensor lfc = at::empty(lfc_sizes(x.sizes(), block), opts.dtype(lfc_dtype));
  at::Tensor codes, lo, step;
  if (mode != kLfcOnly) {
    codes = at::empty({planes, plane_bytes(g.numel, bits)}, opts.dtype(at::kByte));
    lo = at::empty({x.size(0), x.size(1)}, opts.dtype(at::kFloat));
    step = at::empty({x.size(0), x.size(1)}, opts.dtype(at::kFloat));
  }
  if (planes > 0) {
    if (x.is_cuda()) {
#ifdef WITH_CUDA
      compress_cuda(x, g, planes, static_cast<int>(bits), mode, static_cast<uint64_t>(seed), kind, lfc, codes, lo, step);
#else
      TORCH_CHECK(false, "division._C was built without CUDA");
#endif
    } else {
      TORCH_CHECK(x.device().is_cpu(), "division._C.compress: unsupported device ", x.device());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "division_compress_cpu", [&] {
        compress_cpu_impl<scalar_t>(x, g, planes, static_cast<int>(bits), mode, static_cast<uint64_t>(seed), kind,
                                    lfc, codes, lo, step);
      });
    }
  }
  if (mode == kHfcOnly) lfc = at::Tensor();
  return {lfc, codes, lo, step};
}

at::Tensor decompress(const std::optional<at::Tensor>& lfc, const std::optional<at::Tensor>& codes,
                      const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& step,
                      std::vector<int64_t> shape, at::ScalarType dtype, bool is_contiguous_format, int64_t block,
                      int64_t bits, const std::string& mode_name) {
  const int mode = parse_mode(mode_name);
  TORCH_CHECK(shape.size() >= 3 && shape.size() <= 5, "division._C.decompress: bad shape ", shape.size(), "-D");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "division._C.decompress: bits must be 1, 2, 4 or 8");
  const bool need_lfc = mode != kHfcOnly, need_hfc = mode != kLfcOnly;
  TORCH_CHECK(!need_lfc || (lfc.has_value() && lfc->defined()), "division._C.decompress: mode ", mode_name, " needs the LFC");
  TORCH_CHECK(!need_hfc || (codes.has_value() && codes->defined() && lo.has_value() && step.has_value()),
              "division._C.decompress: mode ", mode_name, " needs codes, lo and step");
  const at::Tensor& ref = need_lfc ? *lfc : *codes;
  const bool channels_last = !is_contiguous_format && (shape.size() == 4 || shape.size() == 5);
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (channels_last) fmt = shape.size() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  at::Tensor out = at::empty(shape, ref.options().dtype(dtype).memory_format(fmt));
  const PlaneGeometry g = make_geometry(out.sizes(), block, channels_last);
  const int64_t planes = shape[0] * shape[1];
  const int kind = need_lfc ? lfc_kind(lfc->scalar_type()) : kLfcFloat32;
  const void* lfc_p = need_lfc ? lfc->data_ptr() : nullptr;
  const uint8_t* codes_p = need_hfc ? codes->data_ptr<uint8_t>() : nullptr;
  const float* lo_p = need_hfc ? lo->data_ptr<float>() : nullptr;
  const float* step_p = need_hfc ? step->data_ptr<float>() : nullptr;
  if (need_lfc) TORCH_CHECK(lfc->is_contiguous() && lfc->numel() == planes * g.lfc_numel, "division._C.decompress: LFC does not match the shape");
  if (need_hfc) {
    TORCH_CHECK(codes->is_contiguous() && codes->numel() == planes * plane_bytes(g.numel, bits),
                "division._C.decompress: codes do not match the shape and bits");
    TORCH_CHECK(lo->scalar_type() == at::kFloat && step->scalar_type() == at::kFloat && lo->numel() == planes &&
                step->numel() == planes, "division._C.decompress: lo and step must be float32 (N, C)");
  }
  if (planes == 0) return out;
  if (out.is_cuda()) {
#ifdef WITH_CUDA
    decompress_cuda(g, planes, static_cast<int>(bits), mode, kind, lfc_p, codes_p, lo_p, step_p, out);
#else
    TORCH_CHECK(false, "division._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "division_decompress_cpu", [&] {
      decompress_cpu_impl<scalar_t>(g, planes, static_cast<int>(bits), mode, kind, lfc_p, codes_p, lo_p, step_p, out);
    });
  }
  return out;
}

}  // namespace division

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DIVISION codec kernels (bit format v1, see division/format.py)";
  m.def("compress", &division::compress, "compress(x, block_size, bits, lfc_dtype, mode, seed) -> (lfc, codes, lo, step)",
        py::arg("x"), py::arg("block_size"), py::arg("bits"), py::arg("lfc_dtype"), py::arg("mode"), py::arg("seed"));
  m.def("decompress", &division::decompress,
        "decompress(lfc, codes, lo, step, shape, dtype, is_contiguous_format, block_size, bits, mode) -> Tensor",
        py::arg("lfc"), py::arg("codes"), py::arg("lo"), py::arg("step"), py::arg("shape"), py::arg("dtype"),
        py::arg("is_contiguous_format"), py::arg("block_size"), py::arg("bits"), py::arg("mode"));
  m.attr("FORMAT_VERSION") = 1;
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
