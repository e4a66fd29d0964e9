// division._C: the DIVISION ops of bit format v3 (division/format.py), registered with
// torch.library as division::compress, division::decompress, division::relu_pack(_),
// division::pack_bool, division::relu_backward, division::dropout_backward, division::max_pool2d
// and division::max_pool2d_backward (their shapes for torch.compile: division/ops.py).
//
// CUDA tensors run the kernels of compress_cuda.cu, decompress_cuda.cu and mask_cuda.cu. CPU tensors
// run their CPU twin (codec_twin.cpp, mask_twin.cpp): the same phase functions (exec.h)
// executed thread by thread, block by block, so that a machine without a GPU tests the kernels'
// indexing, work split, reductions and packing, and so that the ops have a CPU implementation for
// CPU training and torch.compile.
#include <torch/extension.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "twin.h"

namespace division {
namespace {

constexpr int kFormatVersion = 3;
// q, j and q0 + 64 of a plane stay below 2^31 (FastDiv and the int32 element indices)
constexpr int64_t kMaxPlaneNumel = (int64_t{1} << 31) - 64;
constexpr int64_t kSharedTarget = 48 * 1024;    // bytes of planes a staged block aims at

int parse_mode(c10::string_view mode, const char* what) {
  if (mode == "division") return kDivision;
  if (mode == "lfc_only") return kLfcOnly;
  TORCH_CHECK(mode == "hfc_only", what, ": mode '", mode, "' is not one of division, lfc_only, ",
              "hfc_only (exact mode keeps the input itself and never reaches the kernels)");
  return kHfcOnly;
}

bool is_kernel_dtype(at::ScalarType t) {
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

void check_device(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() || t.is_cpu(), what, ": tensors must be on a CUDA device or the CPU, got ",
              t.device());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
  g.bits = static_cast<int32_t>(bits);
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

// Which kernel and launch shape; the defaults are what the ops use, tests sweep the others (the
// results must not depend on them).
struct CodecOptions {
  std::string path = "auto";      // compress: auto | staged | generic; decompress: auto | word | word_direct | plane | vec | tile | channel | generic
  int64_t threads_per_plane = 0;  // generic kernels: 0 = automatic
  bool plane_minor = false;
  int64_t smem_target = 0;        // staged compress: 0 = kSharedTarget
  int64_t smem_limit = 0;         // staged compress: 0 = the device's (the twin: an H100's)
};

Launch generic_launch(const Geometry& g, bool for_compress, const CodecOptions& o, const char* what) {
  if (o.threads_per_plane == 0) return for_compress ? compress_launch(g) : decompress_launch(g);
  const int64_t t = o.threads_per_plane;
  TORCH_CHECK(t >= 1 && t <= kBlockThreads && (t & (t - 1)) == 0, what,
              ": threads_per_plane must be 0 (automatic) or a power of two up to ", kBlockThreads,
              ", got ", t);
  return make_launch(static_cast<int>(t), o.plane_minor);
}

// The layout the kernels read x in: NCHW-contiguous, or channels_last / channels_last_3d in
// place (as format.memory_format_of decides); any other strides are made contiguous first.
std::pair<at::Tensor, bool> kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, true};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {x, true};
  return {x.contiguous(), false};
}

// An explicit smem_target is taken as it is (channels_last planes per block are not grown to
// 16-byte loads), so that a sweep of targets measures each choice. The twin plans as an H100:
// clusters allowed (`clusters` false forbids them, the fallback when a cluster launch fails).
StagedPlan make_staged_plan(const Geometry& g, const at::Tensor& x, const CodecOptions& o, bool clusters = true) {
  const int64_t limit = o.smem_limit > 0 ? o.smem_limit
                        : x.is_cuda()    ? max_shared_bytes(x)
                                         : kTwinSharedLimit;
  const int64_t target = std::min(o.smem_target > 0 ? o.smem_target : kSharedTarget, limit);
  clusters = clusters && (!x.is_cuda() || supports_clusters(x));
  return staged_plan(g, x.element_size(), target, limit, aligned16(x.data_ptr()), o.smem_target == 0, clusters);
}

// ---- compress / decompress ---------------------------------------------------------------------

using Compressed = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Compress on the GPU with plan `s` (planes == 0: the generic kernel). Where the device refuses the
// plan's thread-block cluster (no room for it, or code built for an architecture without
// clusters), the shape is planned again without one, which may leave its planes too large to
// stage: the generic kernel then takes them, unless the staged kernel was asked for.
void compress_cuda(const CompressArgs& a, const Geometry& g, const at::Tensor& x, StagedPlan s,
                   const CodecOptions& o, const char* what) {
  if (s.planes > 0 && launch_staged_compress(a, s, x.scalar_type(), x)) return;
  if (s.planes > 0) {
    s = make_staged_plan(g, x, o, false);
    TORCH_CHECK(o.path != "staged" || s.planes > 0, what, ": the staged kernel cannot take shape ", x.sizes(),
                " without a thread-block cluster, which this device refused");
    if (s.planes > 0 && launch_staged_compress(a, s, x.scalar_type(), x)) return;
  }
  launch_generic_compress(a, generic_launch(g, true, o, what), x.scalar_type(), x);
}

Compressed compress_with(const at::Tensor& input, const at::Tensor& seed, int64_t block_size,
                         int64_t bits, at::ScalarType lfc_dtype, c10::string_view mode_name,
                         int64_t first_plane, const CodecOptions& o) {
  const char* what = "division.compress";
  TORCH_CHECK(input.defined(), what, ": x is undefined");
  check_device(input, what);
  TORCH_CHECK(is_kernel_dtype(input.scalar_type()), what, ": unsupported dtype ",
              input.scalar_type(), "; expected float32, float16 or bfloat16");
  TORCH_CHECK(seed.defined() && seed.scalar_type() == at::kLong && seed.numel() == 1, what,
              ": seed must be a one-element int64 tensor");
  TORCH_CHECK(seed.device() == input.device(), what, ": seed is on ", seed.device(),
              " but x is on ", input.device(), "; draw it there (division.hashing.draw_seed)");
  TORCH_CHECK(first_plane >= 0, what, ": first_plane must be >= 0, got ", first_plane);
  const int mode = parse_mode(mode_name, what);
  const int kind = lfc_kind_of(lfc_dtype, what);
  const auto [x, channels_last] = kernel_layout(input);
  const Geometry g = make_geometry(x.sizes(), block_size, bits, channels_last, what);
  const auto opts = x.options();
  // hfc_only needs the LFC as scratch: the HFC is taken against the rounded LFC in every mode
  at::Tensor lfc = at::empty(lfc_sizes(x.sizes(), block_size), opts.dtype(lfc_dtype));
  const bool keep_hfc = mode != kLfcOnly;
  at::Tensor codes = at::empty(keep_hfc ? std::vector<int64_t>{g.planes, g.plane_bytes} : std::vector<int64_t>{0}, opts.dtype(at::kByte));
  const std::vector<int64_t> per_plane = keep_hfc ? std::vector<int64_t>{x.size(0), x.size(1)} : std::vector<int64_t>{0};
  at::Tensor lo = at::empty(per_plane, opts.dtype(at::kFloat));
  at::Tensor step = at::empty_like(lo);
  at::Tensor shift = at::empty(per_plane, opts.dtype(at::kChar));
  if (g.planes > 0) {
    CompressArgs a{};
    a.x = x.data_ptr();
    a.g = g;
    a.bits = static_cast<int>(bits);
    a.bits_log2 = log2_of_bits(bits);
    a.levels = (1 << bits) - 1;
    a.mode = mode;
    a.lfc_kind = kind;
    const at::Tensor seed_c = seed.contiguous();
    a.seed = seed_c.data_ptr<int64_t>();
    a.first_plane = static_cast<uint64_t>(first_plane);
    a.lfc = lfc.data_ptr();
    if (keep_hfc) {
      a.codes = reinterpret_cast<uint32_t*>(codes.data_ptr<uint8_t>());
      a.lo_out = lo.data_ptr<float>();
      a.step_out = step.data_ptr<float>();
      a.shift_out = shift.data_ptr<int8_t>();
    }
    TORCH_CHECK(o.path == "auto" || o.path == "staged" || o.path == "generic", what,
                ": path must be auto, staged or generic, got ", o.path);
    StagedPlan s{};
    if (o.path != "generic") s = make_staged_plan(g, x, o);
    TORCH_CHECK(o.path != "staged" || s.planes > 0, what, ": the staged kernel cannot take shape ",
                x.sizes(), " in the shared memory allowed");
    if (x.is_cuda()) {
      compress_cuda(a, g, x, s, o, what);
    } else if (s.planes > 0) {
      twin_staged_compress(a, s, x.scalar_type());
    } else {
      const Launch l = generic_launch(g, true, o, what);
      twin_generic_compress(a, l, x.scalar_type());
    }
  }
  if (mode == kHfcOnly) lfc = at::empty({0}, opts.dtype(lfc_dtype));  // as reference.py: no LFC kept
  return {lfc, codes, lo, step, shift};
}

Compressed compress_op(const at::Tensor& x, const at::Tensor& seed, int64_t block_size, int64_t bits,
                       at::ScalarType lfc_dtype, c10::string_view mode, int64_t first_plane) {
  return compress_with(x, seed, block_size, bits, lfc_dtype, mode, first_plane, CodecOptions{});
}

// NCHW: word (staged through shared memory) where planes are whole code words of whole 16-byte
// pieces, else plane where planes are at most kPlaneBytes, else plane_words where P % 4 == 0 and
// a plane is at most a quarter of its stage, else vec; channels_last: channel where C allows
// 16-byte stores of channels, else the tile transpose (4-D) or the generic kernel (5-D).
std::string decompress_path(const Geometry& g, const WordPlan& w, const PlanePlan& pp, const PlaneWordsPlan& pw,
                            const ChannelPlan& c, size_t dims) {
  if (!g.channels_last) return w.run > 0 ? "word" : pp.bytes > 0 ? "plane" : pw.planes > 0 ? "plane_words" : "vec";
  if (c.vec > 0) return "channel";
  return dims == 4 ? "tile" : "generic";
}

at::Tensor decompress_with(const at::Tensor& lfc_in, const at::Tensor& codes_in,
                           const at::Tensor& lo_in, const at::Tensor& step_in,
                           const at::Tensor& shift_in, at::IntArrayRef shape, at::ScalarType dtype, bool channels_last,
                           int64_t block_size, int64_t bits, c10::string_view mode_name,
                           const CodecOptions& o) {
  const char* what = "division.decompress";
  const int mode = parse_mode(mode_name, what);
  TORCH_CHECK(is_kernel_dtype(dtype), what, ": unsupported output dtype ", dtype,
              "; expected float32, float16 or bfloat16");
  TORCH_CHECK(!channels_last || shape.size() == 4 || shape.size() == 5, what,
              ": a channels_last output needs a 4-D or 5-D shape, got ", shape.size(), "-D");
  const Geometry g = make_geometry(shape, block_size, bits, channels_last, what);
  const bool use_lfc = mode != kHfcOnly, use_hfc = mode != kLfcOnly;
  const at::Tensor& any = use_lfc ? lfc_in : codes_in;
  TORCH_CHECK(any.defined(), what, ": mode ", mode_name, " needs the ", use_lfc ? "LFC" : "codes", " tensor");
  check_device(any, what);
  DecompressArgs a{};
  at::Tensor lfc, codes, lo, step, shift;  // contiguous versions, alive until the kernel is queued
  if (use_lfc) {
    lfc = lfc_in.contiguous();
    a.lfc_kind = lfc_kind_of(lfc.scalar_type(), what);
    TORCH_CHECK(lfc.device() == any.device() && lfc.numel() == g.planes * g.lfc_numel, what,
                ": the LFC (", lfc.sizes(), ") does not match shape ", shape, " and block_size ",
                block_size);
    a.lfc = lfc.data_ptr();
  }
  if (use_hfc) {
    TORCH_CHECK(codes_in.defined() && lo_in.defined() && step_in.defined() && shift_in.defined(),
                what, ": mode ", mode_name, " needs the codes, lo, step and shift tensors");
    codes = codes_in.contiguous();
    if (reinterpret_cast<uintptr_t>(codes.data_ptr()) % 4 != 0)
      codes = codes.clone();  // read as 32-bit words
    lo = lo_in.contiguous();
    step = step_in.contiguous();
    shift = shift_in.contiguous();
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == g.planes * g.plane_bytes, what,
                ": the codes (", codes.sizes(), ", ", codes.scalar_type(), ") do not match shape ",
                shape, " and bits=", bits, " (expected uint8 (", g.planes, ", ", g.plane_bytes, "))");
    TORCH_CHECK(lo.scalar_type() == at::kFloat && step.scalar_type() == at::kFloat &&
                    shift.scalar_type() == at::kChar && lo.numel() == g.planes &&
                    step.numel() == g.planes && shift.numel() == g.planes,
                what, ": lo and step must be float32 and shift int8 (N, C) tensors");
    TORCH_CHECK(codes.device() == any.device() && lo.device() == any.device() &&
                    step.device() == any.device() && shift.device() == any.device(),
                what, ": all tensors must be on one device");
    a.codes = reinterpret_cast<const uint32_t*>(codes.data_ptr<uint8_t>());
    a.lo = lo.data_ptr<float>();
    a.step = step.data_ptr<float>();
    a.shift = shift.data_ptr<int8_t>();
  }
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (channels_last) fmt = shape.size() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  at::Tensor out = at::empty(shape, any.options().dtype(dtype).memory_format(fmt));
  if (g.planes == 0) return out;
  a.g = g;
  a.bits = static_cast<int>(bits);
  a.bits_log2 = log2_of_bits(bits);
  a.mode = mode;
  a.out = out.data_ptr();
  const ChannelPlan c = channel_plan(g, out.element_size(), a.bits);
  const WordPlan w = word_plan(g, out.element_size());
  const PlanePlan pp = plane_plan(g, out.element_size());
  const PlaneWordsPlan pw = plane_words_plan(g, out.element_size());
  std::string path = o.path;
  if (path == "auto") path = decompress_path(g, w, pp, pw, c, shape.size());
  TORCH_CHECK(path == "word" || path == "word_direct" || path == "plane" || path == "plane_words" || path == "vec" ||
                  path == "tile" || path == "channel" || path == "generic",
              what, ": path must be auto, word, word_direct, plane, plane_words, vec, tile, channel or generic, got ",
              path);
  TORCH_CHECK(path != "plane" || pp.bytes > 0, what, ": the plane kernel writes NCHW outputs of at most ",
              kPlaneBytes, " bytes per plane; got shape ", shape, channels_last ? ", channels_last" : "");
  TORCH_CHECK(path != "plane_words" || pw.planes > 0, what,
              ": the plane_words kernel writes NCHW outputs whose planes are a multiple of 4 elements and at most ",
              kPlaneWordsStage / 4, " bytes; got shape ", shape, channels_last ? ", channels_last" : "");
  TORCH_CHECK(path != "vec" || !channels_last, what, ": the vec kernel writes NCHW outputs");
  TORCH_CHECK((path != "word" && path != "word_direct") || w.run > 0, what,
              ": the word kernel writes NCHW outputs whose planes are whole code words of whole 16-byte "
              "stores, with W and the block width multiples of 4; got shape ", shape, ", block_size ",
              block_size, ", bits ", bits, channels_last ? ", channels_last" : "");
  TORCH_CHECK(path != "tile" || (channels_last && shape.size() == 4), what,
              ": the tile kernel writes 4-D channels_last outputs");
  TORCH_CHECK(path != "channel" || c.vec > 0, what,
              ": the channel kernel writes channels_last outputs whose C is a multiple of 16 bytes' "
              "worth of elements, got C = ", g.channels, " (", channels_last ? "channels_last" : "NCHW", ")");
  if (path == "channel") {
    if (out.is_cuda()) {
      launch_channel_decompress(a, c, dtype, out);
    } else {
      twin_channel_decompress(a, c, dtype);
    }
  } else if (path == "word" || path == "word_direct") {
    const bool staged = path == "word";
    if (out.is_cuda()) {
      launch_word_decompress(a, w, staged, dtype, out);
    } else {
      twin_word_decompress(a, w, staged, dtype);
    }
  } else if (path == "plane") {
    if (out.is_cuda()) {
      launch_plane_decompress(a, pp, dtype, out);
    } else {
      twin_plane_decompress(a, pp, dtype);
    }
  } else if (path == "plane_words") {
    if (out.is_cuda()) {
      launch_plane_words_decompress(a, pw, dtype, out);
    } else {
      twin_plane_words_decompress(a, pw, dtype);
    }
  } else if (path == "vec") {
    const VecPlan v = vec_plan(g, out.element_size());
    if (out.is_cuda()) {
      launch_vec_decompress(a, v, dtype, out);
    } else {
      twin_vec_decompress(a, v, dtype);
    }
  } else if (path == "tile") {
    const TilePlan t = tile_plan(g);
    if (out.is_cuda()) {
      launch_tile_decompress(a, t, dtype, out);
    } else {
      twin_tile_decompress(a, t, dtype);
    }
  } else {
    const Launch l = generic_launch(g, false, o, what);
    if (out.is_cuda()) {
      launch_generic_decompress(a, l, dtype, out);
    } else {
      twin_generic_decompress(a, l, dtype);
    }
  }
  return out;
}

at::Tensor decompress_op(const at::Tensor& lfc, const at::Tensor& codes, const at::Tensor& lo,
                         const at::Tensor& step, const at::Tensor& shift, c10::SymIntArrayRef shape,
                         at::ScalarType dtype, bool channels_last, int64_t block_size, int64_t bits,
                         c10::string_view mode) {
  return decompress_with(lfc, codes, lo, step, shift, C10_AS_INTARRAYREF_SLOW(shape), dtype,
                         channels_last, block_size, bits, mode, CodecOptions{});
}

// ---- masks -------------------------------------------------------------------------------------

// Masks describe a dense tensor in its memory order: contiguous, channels_last or channels_last_3d.
void check_dense(const at::Tensor& t, const char* what) {
  check_device(t, what);
  TORCH_CHECK(t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)),
              what, ": expected a contiguous or channels_last tensor (masks follow memory order), got strides ",
              t.strides());
}

at::Tensor mask_words(const at::Tensor& like) {
  return at::empty({(like.numel() + 31) / 32 * 4}, like.options().dtype(at::kByte));
}

int vec_for(const at::Tensor& t, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return static_cast<int>(16 / t.element_size());
}

void relu_pack_into(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bits) {
  const char* what = "division.relu_pack";
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), what, ": unsupported dtype ", x.scalar_type());
  PackArgs a{x.data_ptr(), y.data_ptr(), reinterpret_cast<uint32_t*>(bits.data_ptr<uint8_t>()), x.numel()};
  const int vec = vec_for(x, {x.data_ptr(), y.data_ptr()});
  if (x.is_cuda()) return launch_relu_pack(a, vec, x.scalar_type(), x);
  twin_relu_pack(a, vec, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> relu_pack_op(const at::Tensor& x) {
  check_dense(x, "division.relu_pack");
  at::Tensor y = at::empty_like(x);
  at::Tensor bits = mask_words(x);
  relu_pack_into(x, y, bits);
  return {y, bits};
}

at::Tensor relu_pack_inplace_op(at::Tensor& x) {
  check_dense(x, "division.relu_pack_");
  at::Tensor bits = mask_words(x);
  relu_pack_into(x, x, bits);
  return bits;
}

at::Tensor pack_bool_op(const at::Tensor& mask) {
  const char* what = "division.pack_bool";
  check_dense(mask, what);
  TORCH_CHECK(mask.scalar_type() == at::kBool, what, ": expected a bool tensor, got ", mask.scalar_type());
  at::Tensor bits = mask_words(mask);
  PackArgs a{mask.data_ptr(), nullptr, reinterpret_cast<uint32_t*>(bits.data_ptr<uint8_t>()), mask.numel()};
  const int vec = aligned16(mask.data_ptr()) ? 16 : 1;
  if (mask.is_cuda()) {
    launch_pack_bool(a, vec, mask);
  } else {
    twin_pack_bool(a, vec);
  }
  return bits;
}

at::Tensor mask_grad(const at::Tensor& grad, const at::Tensor& mask_bits, double scale, bool relu, const char* what) {
  check_dense(grad, what);
  TORCH_CHECK(is_kernel_dtype(grad.scalar_type()), what, ": unsupported dtype ", grad.scalar_type());
  TORCH_CHECK(mask_bits.scalar_type() == at::kByte && mask_bits.is_contiguous() &&
                  mask_bits.numel() == (grad.numel() + 31) / 32 * 4 && mask_bits.device() == grad.device(),
              what, ": the mask (", mask_bits.sizes(), ") does not match a gradient of ", grad.numel(),
              " elements on ", grad.device());
  // the kernels read whole 32-bit words: a view at an odd byte offset is copied (a GPU would fault)
  const at::Tensor bits = reinterpret_cast<uintptr_t>(mask_bits.data_ptr()) % 4 != 0 ? mask_bits.clone() : mask_bits;
  at::Tensor out = at::empty_like(grad);
  MaskGradArgs a{grad.data_ptr(), reinterpret_cast<const uint32_t*>(bits.data_ptr<uint8_t>()),
                 out.data_ptr(), grad.numel(), static_cast<float>(scale)};
  const int vec = vec_for(grad, {grad.data_ptr(), out.data_ptr()});
  if (grad.is_cuda()) {
    launch_mask_grad(a, vec, relu, grad.scalar_type(), grad);
  } else {
    twin_mask_grad(a, vec, relu, grad.scalar_type());
  }
  return out;
}

at::Tensor relu_backward_op(const at::Tensor& grad, const at::Tensor& bits) {
  return mask_grad(grad, bits, 1.0, true, "division.relu_backward");
}

at::Tensor dropout_backward_op(const at::Tensor& grad, const at::Tensor& bits, double scale) {
  return mask_grad(grad, bits, scale, false, "division.dropout_backward");
}

// ---- max pooling -------------------------------------------------------------------------------

int offset_bits(int64_t window, const char* what) {
  for (int bits : {1, 2, 4, 8})
    if (window <= (int64_t{1} << bits)) return bits;
  TORCH_CHECK(false, what, ": a max-pool window of ", window, " elements is larger than 256");
  return 8;
}

// ATen's pooling_output_shape (ceil_mode: the last window must start inside the input or its
// left padding).
int64_t pool_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

PoolArgs pool_args(at::IntArrayRef in, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                   at::IntArrayRef d, bool ceil_mode, bool channels_last, const char* what) {
  TORCH_CHECK(in.size() == 4, what, ": expected an (N, C, H, W) input, got ", in);
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, what,
              ": kernel_size, stride, padding and dilation must have two values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(k[i] > 0 && s[i] > 0 && d[i] > 0, what, ": kernel_size, stride and dilation must be positive");
    TORCH_CHECK(p[i] >= 0 && p[i] <= ((k[i] - 1) * d[i] + 1) / 2, what,
                ": pad should be at most half of effective kernel size, but got pad=", p[i],
                ", kernel_size=", k[i], " and dilation=", d[i]);
  }
  // stock's two further checks (pool2d_shape_check): with them every window holds a tap of the input
  TORCH_CHECK(in[1] > 0 && in[2] > 0 && in[3] > 0, what,
              ": expected a 4D (batch mode) tensor with optional 0 dim batch size for input, but got: ", in);
  TORCH_CHECK(p[0] <= k[0] / 2 && p[1] <= k[1] / 2, what,
              ": pad should be smaller than or equal to half of kernel size, but got padW = ", p[1], ", padH = ", p[0],
              ", kW = ", k[1], ", kH = ", k[0]);
  PoolArgs a{};
  a.channels = in[1];
  a.h = static_cast<int32_t>(in[2]);
  a.w = static_cast<int32_t>(in[3]);
  const int64_t oh = pool_out(in[2], k[0], s[0], p[0], d[0], ceil_mode);
  const int64_t ow = pool_out(in[3], k[1], s[1], p[1], d[1], ceil_mode);
  TORCH_CHECK(oh > 0 && ow > 0, what, ": the output of an input of ", in, " would be ", oh, "x", ow,
              ": too small");
  a.oh = static_cast<int32_t>(oh);
  a.ow = static_cast<int32_t>(ow);
  a.kh = static_cast<int32_t>(k[0]);
  a.kw = static_cast<int32_t>(k[1]);
  a.sh = static_cast<int32_t>(s[0]);
  a.sw = static_cast<int32_t>(s[1]);
  a.ph = static_cast<int32_t>(p[0]);
  a.pw = static_cast<int32_t>(p[1]);
  a.dh = static_cast<int32_t>(d[0]);
  a.dw = static_cast<int32_t>(d[1]);
  a.bits = offset_bits(k[0] * k[1], what);
  a.channels_last = channels_last;
  a.out_numel = in[0] * in[1] * oh * ow;
  a.in_numel = in[0] * in[1] * in[2] * in[3];
  const uint64_t c = static_cast<uint64_t>(std::max<int64_t>(in[1], 1));
  a.div_c = FastDiv64::make(c);
  a.div_h = FastDiv64::make(static_cast<uint64_t>(a.h));
  a.div_w = FastDiv64::make(static_cast<uint64_t>(a.w));
  a.div_oh = FastDiv64::make(static_cast<uint64_t>(a.oh));
  a.div_ow = FastDiv64::make(static_cast<uint64_t>(a.ow));
  a.div_sh = FastDiv::make(static_cast<uint32_t>(a.sh));
  a.div_sw = FastDiv::make(static_cast<uint32_t>(a.sw));
  a.div_dh = FastDiv::make(static_cast<uint32_t>(a.dh));
  a.div_dw = FastDiv::make(static_cast<uint32_t>(a.dw));
  return a;
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_op(const at::Tensor& x, at::IntArrayRef kernel,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, bool ceil_mode) {
  const char* what = "division.max_pool2d";
  check_dense(x, what);
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), what, ": unsupported dtype ", x.scalar_type());
  const bool cl = is_channels_last(x);
  PoolArgs a = pool_args(x.sizes(), kernel, stride, padding, dilation, ceil_mode, cl, what);
  at::Tensor y = at::empty({x.size(0), x.size(1), a.oh, a.ow},
                           x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  at::Tensor offsets = at::empty({(a.out_numel * a.bits + 31) / 32 * 4}, x.options().dtype(at::kByte));
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.offsets = reinterpret_cast<uint32_t*>(offsets.data_ptr<uint8_t>());
  if (x.is_cuda()) {
    launch_pool_forward(a, x.scalar_type(), x);
  } else {
    twin_pool_forward(a, x.scalar_type());
  }
  return {y, offsets};
}

// channels_last: the layout of x and of the gradient returned; grad (the output's gradient) must
// be dense in it, as y was (a 1x1 or one-channel output is both).
at::Tensor max_pool2d_backward_op(const at::Tensor& grad, const at::Tensor& offsets,
                                  c10::SymIntArrayRef input_shape, at::IntArrayRef kernel,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool ceil_mode, bool channels_last) {
  const char* what = "division.max_pool2d_backward";
  check_device(grad, what);
  TORCH_CHECK(is_kernel_dtype(grad.scalar_type()), what, ": unsupported dtype ", grad.scalar_type());
  const at::IntArrayRef in = C10_AS_INTARRAYREF_SLOW(input_shape);
  const bool cl = channels_last;
  TORCH_CHECK(grad.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous), what,
              ": the gradient must be ", cl ? "channels_last" : "contiguous", " like the input, got strides ",
              grad.strides());
  PoolArgs a = pool_args(in, kernel, stride, padding, dilation, ceil_mode, cl, what);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == in[0] && grad.size(1) == in[1] &&
                  grad.size(2) == a.oh && grad.size(3) == a.ow,
              what, ": a gradient of shape ", grad.sizes(), " does not match the output of ", in);
  TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.is_contiguous() &&
                  offsets.numel() == (a.out_numel * a.bits + 31) / 32 * 4 && offsets.device() == grad.device(),
              what, ": the offsets (", offsets.sizes(), ") do not match the output");
  at::Tensor gx = at::empty(in, grad.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  a.offsets = reinterpret_cast<uint32_t*>(offsets.data_ptr<uint8_t>());
  a.grad = grad.data_ptr();
  a.grad_in = gx.data_ptr();
  if (grad.is_cuda()) {
    launch_pool_backward(a, grad.scalar_type(), grad);
  } else {
    twin_pool_backward(a, grad.scalar_type());
  }
  return gx;
}

// ---- test helpers (not ops) ------------------------------------------------------------------

CodecOptions options(const std::string& path, int64_t threads_per_plane, bool plane_minor,
                     int64_t smem_target, int64_t smem_limit) {
  return CodecOptions{path, threads_per_plane, plane_minor, smem_target, smem_limit};
}

// What compress would run for x: ("staged", G, shared bytes, blocks, vec, run, ranks) or
// ("generic", T, G, blocks, 0, 0, 0).
std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> compress_plan(
    const at::Tensor& x, int64_t block_size, int64_t bits, int64_t smem_target, int64_t smem_limit) {
  const auto [xc, cl] = kernel_layout(x);
  const Geometry g = make_geometry(xc.sizes(), block_size, bits, cl, "division._C.compress_plan");
  const CodecOptions o{"auto", 0, false, smem_target, smem_limit};
  const StagedPlan s = make_staged_plan(g, xc, o);
  if (s.planes > 0) return {"staged", s.planes, s.smem_bytes, s.blocks, s.vec, s.run, s.ranks};
  const Launch l = compress_launch(g);
  return {"generic", l.threads_per_plane, l.planes_per_block, blocks_for(g, l), 0, 0, 0};
}

// The kernels' uniforms of elements 0 .. numel-1 of planes first .. first + planes - 1, on the CPU.
at::Tensor uniforms(int64_t seed, int64_t first_plane, int64_t planes, int64_t numel) {
  TORCH_CHECK(seed >= 0 && first_plane >= 0 && planes >= 0 && numel >= 0, "division._C._uniforms: negative argument");
  at::Tensor out = at::empty({planes, numel}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < planes; ++p) {
    const uint32_t key = plane_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(first_plane + p));
    for (int64_t q = 0; q < numel; ++q) {
      const uint32_t h = pair_hash(key, static_cast<uint32_t>(q >> 1));
      o[p * numel + q] = (q & 1) ? uniform_odd(h) : uniform_even(h);
    }
  }
  return out;
}

}  // namespace
}  // namespace division

TORCH_LIBRARY(division, m) {
  m.def("compress(Tensor x, Tensor seed, int block_size, int bits, ScalarType lfc_dtype, str mode, "
        "int first_plane=0) "
        "-> (Tensor lfc, Tensor codes, Tensor lo, Tensor step, Tensor shift)");
  m.def("decompress(Tensor lfc, Tensor codes, Tensor lo, Tensor step, Tensor shift, SymInt[] shape, "
        "ScalarType dtype, bool channels_last, int block_size, int bits, str mode) -> Tensor");
  m.def("relu_pack(Tensor x) -> (Tensor y, Tensor mask)");
  m.def("relu_pack_(Tensor(a!) x) -> Tensor mask");
  m.def("pack_bool(Tensor mask) -> Tensor");
  m.def("relu_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def("dropout_backward(Tensor grad, Tensor mask, float scale) -> Tensor");
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode) -> (Tensor y, Tensor offsets)");
  m.def("max_pool2d_backward(Tensor grad, Tensor offsets, SymInt[] input_shape, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, bool channels_last) -> Tensor");
}

#define DIVISION_IMPLS(m)                                          \
  m.impl("compress", &division::compress_op);                      \
  m.impl("decompress", &division::decompress_op);                  \
  m.impl("relu_pack", &division::relu_pack_op);                    \
  m.impl("relu_pack_", &division::relu_pack_inplace_op);           \
  m.impl("pack_bool", &division::pack_bool_op);                    \
  m.impl("relu_backward", &division::relu_backward_op);            \
  m.impl("dropout_backward", &division::dropout_backward_op);      \
  m.impl("max_pool2d", &division::max_pool2d_op);                  \
  m.impl("max_pool2d_backward", &division::max_pool2d_backward_op)

TORCH_LIBRARY_IMPL(division, CPU, m) { DIVISION_IMPLS(m); }

TORCH_LIBRARY_IMPL(division, CUDA, m) { DIVISION_IMPLS(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "DIVISION kernels, bit format v3 (division/format.py): the ops are torch.ops.division.*; "
            "these are helpers for tests and benchmarks.";
  m.attr("FORMAT_VERSION") = division::kFormatVersion;
  m.attr("BLOCK_THREADS") = division::kBlockThreads;
  m.def("_compress_with",
        [](const at::Tensor& x, const at::Tensor& seed, int64_t block_size, int64_t bits,
           at::ScalarType lfc_dtype, const std::string& mode, const std::string& path,
           int64_t threads_per_plane, bool plane_minor, int64_t smem_target, int64_t smem_limit,
           int64_t first_plane) {
          return division::compress_with(x, seed, block_size, bits, lfc_dtype, mode, first_plane,
                                         division::options(path, threads_per_plane, plane_minor, smem_target, smem_limit));
        },
        "compress with a chosen kernel (path: auto | staged | generic), launch shape and shared memory",
        py::arg("x"), py::arg("seed"), py::arg("block_size"), py::arg("bits"), py::arg("lfc_dtype"),
        py::arg("mode"), py::arg("path") = "auto", py::arg("threads_per_plane") = 0,
        py::arg("plane_minor") = false, py::arg("smem_target") = 0, py::arg("smem_limit") = 0,
        py::arg("first_plane") = 0);
  m.def("_decompress_with",
        [](const at::Tensor& lfc, const at::Tensor& codes, const at::Tensor& lo, const at::Tensor& step,
           const at::Tensor& shift, std::vector<int64_t> shape, at::ScalarType dtype, bool channels_last,
           int64_t block_size, int64_t bits, const std::string& mode, const std::string& path,
           int64_t threads_per_plane, bool plane_minor) {
          return division::decompress_with(lfc, codes, lo, step, shift, shape, dtype, channels_last, block_size,
                                           bits, mode, division::options(path, threads_per_plane, plane_minor, 0, 0));
        },
        "decompress with a chosen kernel (path: auto | word | word_direct | plane | plane_words | vec | tile | channel | generic) and launch shape",
        py::arg("lfc"), py::arg("codes"), py::arg("lo"), py::arg("step"), py::arg("shift"), py::arg("shape"),
        py::arg("dtype"), py::arg("channels_last"), py::arg("block_size"), py::arg("bits"),
        py::arg("mode"), py::arg("path") = "auto", py::arg("threads_per_plane") = 0,
        py::arg("plane_minor") = false);
  m.def("decompress_plan",
        [](std::vector<int64_t> shape, at::ScalarType dtype, bool channels_last, int64_t block_size,
           int64_t bits) -> py::tuple {
          const division::Geometry g = division::make_geometry(shape, block_size, bits, channels_last, "division.decompress_plan");
          const int64_t esize = at::elementSize(dtype);
          const division::ChannelPlan c = division::channel_plan(g, esize, static_cast<int>(bits));
          const division::WordPlan w = division::word_plan(g, esize);
          const division::PlanePlan pp = division::plane_plan(g, esize);
          const division::PlaneWordsPlan pw = division::plane_words_plan(g, esize);
          const std::string path = division::decompress_path(g, w, pp, pw, c, shape.size());
          if (path == "word") return py::make_tuple(path, static_cast<int>(w.run), true);
          if (path == "plane") return py::make_tuple(path, static_cast<int>(g.numel), g.lfc_numel == 1);
          if (path == "plane_words") return py::make_tuple(path, static_cast<int>(32 / bits), false);
          if (path == "vec") {
            const division::VecPlan v = division::vec_plan(g, esize);
            return py::make_tuple(path, static_cast<int>(v.vec), v.runs != 0);
          }
          if (path == "channel") return py::make_tuple(path, static_cast<int>(c.vec * c.run), true);
          return py::make_tuple(path, 1, path == "tile" && division::runs_of_four(g));
        },
        "the kernel decompress takes by default and its work per thread: (path, elements per thread, runs of "
        "four; plane: whether the plane is one LFC block), path word, plane, plane_words or vec (NCHW), channel, "
        "tile or generic (channels_last)",
        py::arg("shape"), py::arg("dtype"), py::arg("channels_last"), py::arg("block_size"), py::arg("bits"));
  m.def("compress_plan", &division::compress_plan,
        "('staged', planes per block, shared bytes, blocks, vec, run, ranks) or ('generic', T, G, blocks, 0, 0, 0)",
        py::arg("x"), py::arg("block_size"), py::arg("bits"), py::arg("smem_target") = 0,
        py::arg("smem_limit") = 0);
  m.def("_twin_thread_order", [] { return std::string(division::twin_reverse_order() ? "reverse" : "forward"); },
        "the order the CPU twin runs a phase's threads in (DIVISION_TWIN_ORDER=reverse: reverse), for tests");
  m.def("_twin_phases",
        [](const std::string& sequence) {
          division::HostExec<32> ex;
          int ran = 0;
          for (const char step : sequence) {
            if (step == 't') ex.each([&](int) { ++ran; });
            else if (step == 'w') ex.each_warp([&](int, division::HostLanes&) { ++ran; });
            else if (step == 's') ex.sync();
            else TORCH_CHECK(false, "division._C._twin_phases: steps are t, w and s, got '", step, "'");
          }
          return ran;
        },
        "runs a block of the CPU twin through `sequence` (t: a per-thread phase, w: a per-warp phase, s: a "
        "barrier) and returns how many thread or warp bodies ran, for tests of its barrier check",
        py::arg("sequence"));
  m.def("_uniforms", &division::uniforms, "the kernels' uniforms (CPU), for tests of division.hashing",
        py::arg("seed"), py::arg("first_plane"), py::arg("planes"), py::arg("numel"));
}
