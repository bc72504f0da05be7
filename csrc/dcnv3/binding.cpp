// PyTorch binding of the DCNv3 kernels: validates shapes, dtypes, devices, contiguity and alignment, owns
// all memory (outputs and workspaces come from torch's caching allocator), and dispatches per dtype. The
// composition into the DCN block (sampling kernel + projection GEMMs) lives in pretrain/ops/cuda.py.
//
// Built two ways from this one file: for CUDA tensors (the extension), and with DCNV3_EMULATION for CPU
// tensors, where the same kernels run in the CPU emulation of csrc/emu (the tests' and counters' backend).
#include <torch/extension.h>
#ifdef DCNV3_EMULATION
#include "../emu/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "launch.h"

namespace {

using dcnv3::DcnParams;
using dcnv3::GemmParams;

enum class DT { f32, f16, bf16 };

DT dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT::f32;
    case at::kHalf: return DT::f16;
    case at::kBFloat16: return DT::bf16;
    default: TORCH_CHECK(false, "dcnv3 CUDA: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
}

#ifdef DCNV3_EMULATION
constexpr bool kOnDevice = false;  // the emulation takes CPU tensors
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
cudaStream_t stream() { return nullptr; }
int sm_count(const at::Tensor&) { return 132; }  // an H100/H200's: split-K layouts match the GPU's
bool has_clusters(const at::Tensor&) { return true; }  // the emulation runs thread-block clusters as sm_90 does
void check_launch() {}                           // emulation errors are C++ exceptions
#else
constexpr bool kOnDevice = true;
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int sm_count(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()));
  return sms;
}

// Thread-block clusters (and distributed shared memory) need sm_90.
bool has_clusters(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  return major >= 9;
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
#endif

// A kernel output. The emulation fills it with NaN first, so an element a kernel fails to write shows up.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (!kOnDevice && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, bool same_dtype = true) {
  TORCH_CHECK(kOnDevice ? t.is_cuda() : t.is_cpu(), "dcnv3 CUDA: ", name, " must be a ",
              kOnDevice ? "CUDA" : "CPU (emulation)", " tensor");
  TORCH_CHECK(t.device() == like.device(), "dcnv3 CUDA: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "dcnv3 CUDA: ", name, " must be contiguous");
  if (same_dtype)
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dcnv3 CUDA: ", name, " has dtype ", t.scalar_type(),
                ", expected ", like.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "dcnv3 CUDA: ", name,
              " must be 16-byte aligned (call .clone())");
}

// geom = [kh, kw, sh, sw, ph, pw, dh, dw, group, remove_center]
DcnParams make_params(const at::Tensor& value, int64_t ho, int64_t wo, const std::vector<int64_t>& geom,
                      double offset_scale, bool apply_softmax, bool has_cfs) {
  TORCH_CHECK(geom.size() == 10, "dcnv3 CUDA: geometry must be [kh, kw, sh, sw, ph, pw, dh, dw, group, remove_center]");
  TORCH_CHECK(value.dim() == 4, "dcnv3 CUDA: value must be (N, H, W, C)");
  const int64_t kh = geom[0], kw = geom[1], group = geom[8];
  const bool remove_center = geom[9] != 0;
  const int64_t c = value.size(3);
  TORCH_CHECK(group > 0 && c % group == 0, "dcnv3 CUDA: channels ", c, " not divisible by group ", group);
  TORCH_CHECK(dcnv3::supported_channels_per_group(static_cast<int>(c / group)),
              "dcnv3 CUDA: channels per group ", c / group, " has no kernel (16 or 32)");
  const int64_t points = kh * kw - (remove_center ? 1 : 0);
  TORCH_CHECK(kh % 2 == 1 && kw % 2 == 1 && points <= dcnv3::kMaxPoints && 3 * points + 1 <= dcnv3::kGroupCols,
              "dcnv3 CUDA: kernel ", kh, "x", kw, " has ", points, " points; the kernels take at most ",
              dcnv3::kMaxPoints);
  DcnParams p{};
  p.N = static_cast<int>(value.size(0));
  p.H = static_cast<int>(value.size(1));
  p.W = static_cast<int>(value.size(2));
  p.C = static_cast<int>(c);
  p.G = static_cast<int>(group);
  p.Ho = static_cast<int>(ho);
  p.Wo = static_cast<int>(wo);
  p.P = static_cast<int>(points);
  p.stride_h = static_cast<int>(geom[2]);
  p.stride_w = static_cast<int>(geom[3]);
  p.pad_h = static_cast<int>(geom[4]);
  p.pad_w = static_cast<int>(geom[5]);
  const int dh = static_cast<int>(geom[6]), dw = static_cast<int>(geom[7]);
  p.center_h = dh * static_cast<int>(kh - 1) / 2;
  p.center_w = dw * static_cast<int>(kw - 1) / 2;
  p.offset_scale = static_cast<float>(offset_scale);
  p.apply_softmax = apply_softmax;
  p.has_cfs = has_cfs;
  TORCH_CHECK(!has_cfs || (ho == p.H && wo == p.W), "dcnv3 CUDA: center-feature-scale needs output size == input size");
  TORCH_CHECK(int64_t(p.N) * ho * wo * c < (int64_t(1) << 31), "dcnv3 CUDA: tensor too large for 32-bit pixel indices");
  // Official point order: p = i*kh + j, i the width tap (major), j the height tap; center dropped if asked.
  int q = 0;
  for (int i = 0; i < kw; ++i)
    for (int j = 0; j < kh; ++j) {
      if (remove_center && i == (kw - 1) / 2 && j == (kh - 1) / 2) continue;
      p.tap_x[q] = i * dw - p.center_w;
      p.tap_y[q] = j * dh - p.center_h;
      ++q;
    }
  p.value = value.data_ptr();
  return p;
}

#define DCNV3_DISPATCH(dt, fn, ...)                      \
  switch (dt) {                                          \
    case DT::f32: dcnv3::fn##_f32(__VA_ARGS__); break;   \
    case DT::f16: dcnv3::fn##_f16(__VA_ARGS__); break;   \
    case DT::bf16: dcnv3::fn##_bf16(__VA_ARGS__); break; \
  }

// Packed-logits source: either (x1 (N,Ho,Wo,C), wpack (L, C), bpack (L)) or logits (N,Ho,Wo,L), L = packed_cols(G)
// (params.h: 28 columns per group, rows padded to 8).
void bind_logit_source(DcnParams& p, const at::Tensor& value, const c10::optional<at::Tensor>& x1,
                       const c10::optional<at::Tensor>& wpack, const c10::optional<at::Tensor>& bpack,
                       const c10::optional<at::Tensor>& logits) {
  const int64_t cols = dcnv3::packed_cols(p.G);
  if (logits.has_value()) {
    check_tensor(*logits, "logits", value);
    TORCH_CHECK(logits->numel() == int64_t(p.N) * p.Ho * p.Wo * cols, "dcnv3 CUDA: logits must be (N, Ho, Wo, ",
                cols, ")");
    p.logits = logits->data_ptr();
  } else {
    TORCH_CHECK(x1.has_value() && wpack.has_value() && bpack.has_value(),
                "dcnv3 CUDA: give either logits or x1 + wpack + bpack");
    check_tensor(*x1, "x1", value);
    check_tensor(*wpack, "wpack", value);
    check_tensor(*bpack, "bpack", value);
    TORCH_CHECK(x1->dim() == 4 && x1->size(0) == p.N && x1->size(1) == p.Ho && x1->size(2) == p.Wo &&
                    x1->size(3) == p.C, "dcnv3 CUDA: x1 must be (N, Ho, Wo, C) = (", p.N, ", ", p.Ho, ", ", p.Wo,
                ", ", p.C, ")");
    TORCH_CHECK(wpack->dim() == 2 && wpack->size(0) == cols && wpack->size(1) == p.C,
                "dcnv3 CUDA: wpack must be (", cols, ", C)");
    TORCH_CHECK(bpack->numel() == cols, "dcnv3 CUDA: bpack must be (", cols, ",)");
    p.x1 = x1->data_ptr();
    p.wpack = wpack->data_ptr();
    p.bpack = bpack->data_ptr();
  }
}

// The reach tensor (N, reach_row(Ho, Wo, G)) int32, zeroed (params.h: DcnParams::reach).
at::Tensor new_reach(const at::Tensor& value, int64_t ho, int64_t wo, int groups) {
  return at::zeros({value.size(0), dcnv3::reach_row(ho, wo, groups)}, value.options().dtype(at::kInt));
}

void check_reach(const at::Tensor& reach, const at::Tensor& value, const DcnParams& p, const char* producer) {
  check_tensor(reach, "reach", value, /*same_dtype=*/false);
  TORCH_CHECK(reach.scalar_type() == at::kInt && reach.numel() == p.N * dcnv3::reach_row(p.Ho, p.Wo, p.G),
              "dcnv3 CUDA: reach must be ", producer, "'s output for these shapes");
}

// -> (y (N, Ho, Wo, C), reach (N, 1 + reach tiles) int32: how far each output tile samples, for sample_bwd).
// logits_out (block_fwd's stored logits, from x1): where the kernel also writes its fp32 logits, or null.
std::vector<at::Tensor> sample_fwd_into(const at::Tensor& value, const c10::optional<at::Tensor>& x1,
                                        const c10::optional<at::Tensor>& wpack, const c10::optional<at::Tensor>& bpack,
                                        const c10::optional<at::Tensor>& logits, int64_t ho, int64_t wo,
                                        std::vector<int64_t> geom, double offset_scale, bool apply_softmax,
                                        bool has_cfs, float* logits_out) {
  check_tensor(value, "value", value);
  const DeviceGuard guard(value.device());
  DT dt = dtype_of(value);
  DcnParams p = make_params(value, ho, wo, geom, offset_scale, apply_softmax, has_cfs);
  bind_logit_source(p, value, x1, wpack, bpack, logits);
  at::Tensor y = new_output({p.N, ho, wo, p.C}, value.options());
  at::Tensor reach = new_reach(value, ho, wo, p.G);
  p.y = y.data_ptr();
  p.reach = reach.data_ptr<int>();
  p.logits_out = logits_out;
  if (y.numel() == 0) return {y, reach};
  DCNV3_DISPATCH(dt, dcn_fwd, p.C / p.G, p, stream());
  check_launch();
  return {y, reach};
}

std::vector<at::Tensor> sample_fwd(const at::Tensor& value, const c10::optional<at::Tensor>& x1,
                                   const c10::optional<at::Tensor>& wpack, const c10::optional<at::Tensor>& bpack,
                                   const c10::optional<at::Tensor>& logits, int64_t ho, int64_t wo,
                                   std::vector<int64_t> geom, double offset_scale, bool apply_softmax, bool has_cfs) {
  return sample_fwd_into(value, x1, wpack, bpack, logits, ho, wo, geom, offset_scale, apply_softmax, has_cfs,
                         nullptr);
}

// Whether block_fwd/block_bwd fuse the output projection and grad x1 into the sampling kernels where they fit
// (the default), or run them as GEMMs of their own: the GPU session times both (`pretrain bench dcn`, impls
// kernel and kernel-split), since the fused tiles trade HBM bytes for shared memory, that is occupancy.
bool g_fuse_epilogues = true;

void set_fused_epilogues(bool enabled) { g_fuse_epilogues = enabled; }

// Threads per CTA of the one-launch backward (sample_bwd and block_bwd at stride 1, same padding): 128 (4 warps,
// the default) or 256 (8 warps: two per scheduler at one CTA per SM, for latency hiding; the same results). The
// GPU session times both (`pretrain bench dcn`, impl kernel-8w).
int g_backward_threads = 128;

void set_backward_threads(int threads) {
  TORCH_CHECK(threads == 128 || threads == 256, "dcnv3: the backward runs 128 or 256 threads per CTA, not ", threads);
  g_backward_threads = threads;
}

// Whether the one-launch backward skips the halo's source pixels whose touch masks (recorded by the forward) rule
// the value tile out (the default), or recomputes every pixel within the tile reach's rectangles: the same results
// (the skipped pixels add nothing), less tensor-core work; kept switchable so that a GPU times both.
bool g_halo_masks = true;

// Whether block_bwd computes grad_y = grad_out . wout once, in a GEMM launch, and the sampling backward reads it
// (stored grad_y: 2 C more HBM bytes per pixel, grad_y written and read back), instead of recomputing it per
// chunk of its own tile and halo (the default: grad_y never goes through HBM). The same results: the recompute
// rounds to T as the stored one is. The halo's grad_y GEMMs are tensor-core work the stages that wait on their
// mma (InternImage-H stage 2 and above, by the step-25 roofline) pay in time; kept switchable so that a GPU times
// both (`pretrain bench dcn`, impl kernel-stored-grad-y).
bool g_stored_grad_y = false;

// Whether block_fwd, when it saves y for training, also stores its fp32 logits (x1 . wpack^T + bpack: packed_cols(G)
// floats a pixel) for block_bwd to read instead of recomputing them per chunk of each CTA's own tile and halo (the
// default recomputes: the logits never go through HBM). The same results; 3.5 C (16 channels a group) or 1.75 C
// (32) HBM bytes a pixel written and as many read back, against the backward's logits GEMMs. Kept switchable so
// that a GPU times both (`pretrain bench dcn`, impl kernel-stored-logits).
bool g_stored_logits = false;

// Whether block_bwd accumulates grad wpack and grad bpack in the sampling kernel's persistent CTAs where their fp32
// partials fit (the default), or stores grad logits and reduces them in a GEMM launch: the same gradients up to the
// fp32 summation order. The GPU session times both (`pretrain bench dcn`, impl kernel-wpack-gemm).
bool g_wpack_in_backward = true;

void set_wpack_in_backward(bool enabled) { g_wpack_in_backward = enabled; }

// The number of those persistent CTAs (slots): 0 lets block_bwd decide (one per SM, and the GEMM instead where the
// input is too small for that to pay); n > 0 takes the in-kernel path wherever it fits, with min(n, tiles) CTAs:
// for tests (several tiles per CTA) and for counting what a large batch pays per pixel at a fixed number of slots
// (the bench's --marginal: at scale the slots are one per SM, a per-launch cost).
int g_wpack_slots = 0;

void set_wpack_slots(int slots) {
  TORCH_CHECK(slots >= 0, "dcnv3: wpack_slots must be 0 (automatic) or positive, not ", slots);
  g_wpack_slots = slots;
}

// CTAs per cluster of the in-kernel grad wpack, each holding a slice of the partial's rows: 0 lets block_bwd take
// the smallest of 1, 2, 4, 8 whose slice fits (clusters need sm_90; InternImage-T stage 3 and -H stage 1 take 8);
// k > 0 takes k wherever its slice fits (tests: clusters where one CTA would do).
int g_wpack_cluster = 0;

void set_wpack_cluster(int cluster) {
  TORCH_CHECK(cluster >= 0 && cluster <= 8, "dcnv3: wpack_cluster must be 0 (automatic) or 1 to 8, not ", cluster);
  g_wpack_cluster = cluster;
}

// DCNV3_DISPATCH for a launcher-side query that returns a value.
#define DCNV3_QUERY(dt, fn, ...)                                                   \
  ((dt) == DT::f32 ? dcnv3::fn##_f32(__VA_ARGS__)                                  \
                   : (dt) == DT::f16 ? dcnv3::fn##_f16(__VA_ARGS__) : dcnv3::fn##_bf16(__VA_ARGS__))

// The cluster size for grad wpack in the backward (dtype dt, G groups, C channels), or 0 where no size fits.
int wpack_cluster_for(DT dt, int G, int C, bool clusters) {
  auto fits = [&](int k) { return DCNV3_QUERY(dt, dcn_bwd_wpack_fits, C / G, G, C, k); };
  if (g_wpack_cluster > 0) return (g_wpack_cluster == 1 || clusters) && fits(g_wpack_cluster) ? g_wpack_cluster : 0;
  for (int k = 1; k <= (clusters ? 8 : 1); k *= 2)
    if (fits(k)) return k;
  return 0;
}

at::Tensor linear_fwd(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

// The block ops' common checks (value, x1 + wpack + bpack, wout (Cout, C)) -> the sampling parameters of the fused
// geometry (output size == input size, softmax over the mask logits). The caller holds the device guard.
DcnParams block_params(const at::Tensor& value, const at::Tensor& x1, const at::Tensor& wpack, const at::Tensor& bpack,
                       const at::Tensor& wout, const std::vector<int64_t>& geom, double offset_scale, bool has_cfs) {
  check_tensor(value, "value", value);
  DcnParams p = make_params(value, value.size(1), value.size(2), geom, offset_scale, /*apply_softmax=*/true, has_cfs);
  bind_logit_source(p, value, x1, wpack, bpack, c10::nullopt);
  check_tensor(wout, "wout", value);
  TORCH_CHECK(wout.dim() == 2 && wout.size(1) == p.C, "dcnv3 CUDA: wout must be (Cout, C) with C = ", p.C);
  return p;
}

// The DCN block's forward from x1: -> (out (N, H, W, Cout) = y . wout^T + bout, y (N, H, W, C) when save_y (for
// grad wout; else an empty tensor), reach, the fp32 logits (N, H, W, packed_cols(G)) when save_y and
// g_stored_logits (else an empty tensor)). One launch, the output projection as the sampling kernel's epilogue,
// when the tile's y fits in shared memory (fwd_out_fits); else the sampling kernel, then the GEMM.
std::vector<at::Tensor> block_fwd(const at::Tensor& value, const at::Tensor& x1, const at::Tensor& wpack,
                                  const at::Tensor& bpack, const at::Tensor& wout, const at::Tensor& bout,
                                  std::vector<int64_t> geom, double offset_scale, bool has_cfs, bool save_y) {
  const DeviceGuard guard(value.device());
  DcnParams p = block_params(value, x1, wpack, bpack, wout, geom, offset_scale, has_cfs);
  check_tensor(bout, "bout", value);
  TORCH_CHECK(bout.numel() == wout.size(0), "dcnv3 CUDA: bout must be (Cout,)");
  const DT dt = dtype_of(value);
  const int64_t h = p.H, w = p.W;
  const int cg = p.C / p.G;
  const bool store_logits = save_y && g_stored_logits;
  at::Tensor logits = store_logits ? new_output({p.N, h, w, dcnv3::packed_cols(p.G)}, value.options().dtype(at::kFloat))
                                   : value.new_empty({0}, value.options().dtype(at::kFloat));
  float* logits_out = store_logits && logits.numel() > 0 ? logits.data_ptr<float>() : nullptr;
  if (!g_fuse_epilogues || !DCNV3_QUERY(dt, dcn_fwd_out_fits, cg, p.C)) {
    std::vector<at::Tensor> y_reach = sample_fwd_into(value, x1, wpack, bpack, c10::nullopt, h, w, geom,
                                                      offset_scale, true, has_cfs, logits_out);
    at::Tensor out = linear_fwd(y_reach[0], wout, bout);
    return {out, save_y ? y_reach[0] : value.new_empty({0}), y_reach[1], logits};
  }
  at::Tensor out = new_output({p.N, h, w, wout.size(0)}, value.options());
  at::Tensor y = save_y ? new_output(value.sizes(), value.options()) : value.new_empty({0});
  at::Tensor reach = new_reach(value, h, w, p.G);
  if (out.numel() == 0) return {out, y, reach, logits};
  p.logits_out = logits_out;
  p.y = save_y ? y.data_ptr() : nullptr;
  p.reach = reach.data_ptr<int>();
  p.wout = wout.data_ptr();
  p.bout = bout.data_ptr();
  p.out = out.data_ptr();
  p.Cout = static_cast<int>(wout.size(0));
  DCNV3_DISPATCH(dt, dcn_fwd, cg, p, stream());
  check_launch();
  return {out, y, reach, logits};
}

// -> (grad_value (N,H,W,C) dtype of value, grad_logits (N,Ho,Wo,packed_cols(G)) dtype of value), the core op's
// backward: max |grad_y| per image and channel (the fixed-point scales) first, then the sampling backward.
std::vector<at::Tensor> sample_bwd(const at::Tensor& grad_y, const at::Tensor& value,
                                   const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& wpack,
                                   const c10::optional<at::Tensor>& bpack, const c10::optional<at::Tensor>& logits,
                                   int64_t ho, int64_t wo, std::vector<int64_t> geom, double offset_scale,
                                   bool apply_softmax, bool has_cfs, const at::Tensor& reach) {
  check_tensor(value, "value", value);
  const DeviceGuard guard(value.device());
  DT dt = dtype_of(value);
  DcnParams p = make_params(value, ho, wo, geom, offset_scale, apply_softmax, has_cfs);
  bind_logit_source(p, value, x1, wpack, bpack, logits);
  check_tensor(grad_y, "grad_y", value);
  TORCH_CHECK(grad_y.numel() == int64_t(p.N) * ho * wo * p.C, "dcnv3 CUDA: grad_y must be (N, Ho, Wo, C)");
  at::Tensor absmax = at::zeros({p.N, p.C}, value.options().dtype(at::kFloat));
  check_reach(reach, value, p, "sample_fwd");
  at::Tensor grad_logits = new_output({p.N, ho, wo, dcnv3::packed_cols(p.G)}, value.options());
  at::Tensor grad_value = new_output(value.sizes(), value.options());
  if (grad_y.numel() == 0) return {grad_value.zero_(), grad_logits.zero_()};
  DCNV3_DISPATCH(dt, absmax_rows, grad_y.data_ptr(), p.N, static_cast<int>(ho * wo), p.C, absmax.data_ptr<float>(),
                 stream());
  check_launch();
  p.grad_y = grad_y.data_ptr();
  p.grad_y_absmax = absmax.data_ptr<float>();
  p.grad_logits = grad_logits.data_ptr();
  p.grad_value = grad_value.data_ptr();
  p.reach = reach.data_ptr<int>();
  p.cta_threads = g_backward_threads;
  p.halo_masks = g_halo_masks;
  DCNV3_DISPATCH(dt, dcn_bwd, p.C / p.G, p, stream());
  check_launch();
  return {grad_value, grad_logits};
}

// out (M, N) = a (M, K) . w (N, K)^T + bias; a is any (..., K) tensor, out keeps its leading dims.
at::Tensor linear_fwd(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_tensor(a, "input", a);
  check_tensor(w, "weight", a);
  const DeviceGuard guard(a.device());
  DT dt = dtype_of(a);
  TORCH_CHECK(w.dim() == 2 && a.size(-1) == w.size(1), "dcnv3 CUDA: linear weight must be (N, K) with K = input's last dim");
  const int64_t K = w.size(1), N = w.size(0), M = a.numel() / std::max<int64_t>(K, 1);
  auto sizes = a.sizes().vec();
  sizes.back() = N;
  at::Tensor out = new_output(sizes, a.options());
  if (bias.has_value()) {
    check_tensor(*bias, "bias", a);
    TORCH_CHECK(bias->numel() == N, "dcnv3 CUDA: bias must be (N,)");
  }
  if (out.numel() == 0) return out;
  GemmParams p{};
  p.a = a.data_ptr(); p.a_m = K; p.a_k = 1;
  p.b = w.data_ptr(); p.b_n = K; p.b_k = 1;
  p.M = static_cast<int>(M); p.N = static_cast<int>(N); p.K = static_cast<int>(K);
  p.k_per_split = static_cast<int>(K);
  p.out = out.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  DCNV3_DISPATCH(dt, gemm, p, 1, stream());
  check_launch();
  return out;
}

// grad_a (M, K) = grad (M, N) . w (N, K).
at::Tensor linear_bwd_input(const at::Tensor& grad, const at::Tensor& w) {
  check_tensor(grad, "grad", grad);
  check_tensor(w, "weight", grad);
  const DeviceGuard guard(grad.device());
  DT dt = dtype_of(grad);
  TORCH_CHECK(w.dim() == 2 && grad.size(-1) == w.size(0), "dcnv3 CUDA: weight must be (N, K) with N = grad's last dim");
  const int64_t N = w.size(0), K = w.size(1), M = grad.numel() / std::max<int64_t>(N, 1);
  auto sizes = grad.sizes().vec();
  sizes.back() = K;
  at::Tensor out = new_output(sizes, grad.options());
  if (out.numel() == 0) return out;
  GemmParams p{};
  // A(m, n) = grad[m*N + n]; B(k, n) = w[n*K + k]  (w read transposed in place).
  p.a = grad.data_ptr(); p.a_m = N; p.a_k = 1;
  p.b = w.data_ptr(); p.b_n = 1; p.b_k = K;
  p.M = static_cast<int>(M); p.N = static_cast<int>(K); p.K = static_cast<int>(N);
  p.k_per_split = static_cast<int>(N);
  p.out = out.data_ptr();
  DCNV3_DISPATCH(dt, gemm, p, 1, stream());
  check_launch();
  return out;
}

// grad_w (N, K) = grad (M, N)^T . a (M, K) and grad_b (N) = column sums of grad, in one launch: deterministic
// split-K over the M rows, the last split of each output tile summing the fp32 partials in split order. With
// grad_absmax_rows > 0 also max |grad| per group of that many rows and column (M / rows, N) fp32, a third output,
// taken while the bias gradient's loop reads grad.
std::vector<at::Tensor> linear_bwd_weight(const at::Tensor& grad, const at::Tensor& a, int64_t grad_absmax_rows) {
  check_tensor(grad, "grad", grad);
  check_tensor(a, "input", grad);
  const DeviceGuard guard(grad.device());
  DT dt = dtype_of(grad);
  const int64_t N = grad.size(-1), K = a.size(-1), M = grad.numel() / std::max<int64_t>(N, 1);
  TORCH_CHECK(a.numel() == M * K, "dcnv3 CUDA: input and grad disagree on the number of rows");
  at::Tensor gw = new_output({N, K}, grad.options());
  at::Tensor gb = new_output({N}, grad.options());
  TORCH_CHECK(grad_absmax_rows == 0 || (grad_absmax_rows > 0 && M % grad_absmax_rows == 0),
              "dcnv3 CUDA: grad_absmax_rows must divide grad's rows");
  at::Tensor absmax = at::zeros({grad_absmax_rows > 0 ? M / grad_absmax_rows : 0, N},
                                grad.options().dtype(at::kFloat));
  if (M == 0) return {gw.zero_(), gb.zero_(), absmax};
  const int sms = sm_count(grad);
  // Output tiles as launch_gemm picks them (128 wide where the matrix is wider than 64).
  const int64_t tile_m = N > 64 ? 128 : 64, tile_n = K > 64 ? 128 : 64;
  const int64_t tiles_m = (N + tile_m - 1) / tile_m, tiles_n = (K + tile_n - 1) / tile_n;
  // About two CTAs per SM, but at least 16 max(N, K) rows per split: the fp32 partials (splits x N x K) then stay
  // under 1/8 of the bytes the GEMM reads (M x (N + K)).
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((2 * sms + tiles_m * tiles_n - 1) / (tiles_m * tiles_n),
                                                          M / (16 * std::max(N, K))));
  int64_t k_per_split = ((M + splits - 1) / splits + 31) / 32 * 32;
  splits = (M + k_per_split - 1) / k_per_split;
  auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor partial = new_output({splits, N, K}, f32);
  at::Tensor row_partial = new_output({splits, N}, f32);
  at::Tensor counters = at::zeros({tiles_m * tiles_n}, grad.options().dtype(at::kInt));
  GemmParams p{};
  // A(n, m) = grad[m*N + n]; B(k, m) = a[m*K + k]: both read transposed in place.
  p.a = grad.data_ptr(); p.a_m = 1; p.a_k = N;
  p.b = a.data_ptr(); p.b_n = 1; p.b_k = K;
  p.M = static_cast<int>(N); p.N = static_cast<int>(K); p.K = static_cast<int>(M);
  p.k_per_split = static_cast<int>(k_per_split);
  p.out_f32 = partial.data_ptr<float>();
  p.out_split_stride = N * K;
  p.out = gw.data_ptr();
  p.tile_counters = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
  p.row_sum_partial = row_partial.data_ptr<float>();
  p.row_sum_out = gb.data_ptr();
  if (grad_absmax_rows > 0) {
    p.a_absmax = absmax.data_ptr<float>();
    p.a_rows_per_group = static_cast<int>(grad_absmax_rows);
  }
  DCNV3_DISPATCH(dt, gemm, p, static_cast<int>(splits), stream());
  check_launch();
  return {gw, gb, absmax};
}

// The DCN block's backward -> grads of (value, x1, wpack, bpack, wout, bout), in three launches:
//   1. grad wout, grad bout (split-K GEMM over grad_out and y), which also takes max |grad_out| per image and
//      channel while it reads grad_out's rows: sum_k max|grad_out[n, :, k]| |wout[k, c]| bounds |grad_y[n, :, c]|,
//      the fixed-point scale of grad value (a bound costs a few of its 24 spare bits, and no pass over grad_y);
//   2. the sampling backward, grad_y recomputed per tile from grad_out (it never goes through HBM; or, with
//      g_stored_grad_y, computed once by a GEMM launch before it and read), the logits recomputed from x1 (or read
//      where the forward stored them): grad value, grad logits, and grad x1 = grad logits . wpack as its epilogue
//      (where the tile's grad logits of all groups fit in shared memory; else a GEMM launch of its own);
//   3. grad wpack, grad bpack.
std::vector<at::Tensor> block_bwd(const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& x1,
                                  const at::Tensor& wpack, const at::Tensor& bpack, const at::Tensor& wout,
                                  const at::Tensor& y, const at::Tensor& reach, const at::Tensor& logits,
                                  std::vector<int64_t> geom, double offset_scale, bool has_cfs) {
  const DeviceGuard guard(value.device());
  DcnParams p = block_params(value, x1, wpack, bpack, wout, geom, offset_scale, has_cfs);
  const DT dt = dtype_of(value);
  const int64_t h = p.H, w = p.W;
  check_tensor(grad_out, "grad_out", value);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == p.N && grad_out.size(1) == h && grad_out.size(2) == w &&
                  grad_out.size(3) == wout.size(0), "dcnv3 CUDA: grad_out must be (N, H, W, Cout)");
  TORCH_CHECK(y.sizes() == value.sizes(), "dcnv3 CUDA: y must be block_fwd's, saved with save_y");
  check_reach(reach, value, p, "block_fwd");
  const int cols = dcnv3::packed_cols(p.G);
  if (logits.numel() > 0) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.device() == value.device() &&
                    logits.numel() == p.N * h * w * cols && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0,
                "dcnv3 CUDA: logits must be block_fwd's stored logits (N, H, W, packed_cols(G)) fp32, or empty");
    p.logits_in = logits.data_ptr<float>();
  }
  std::vector<at::Tensor> wout_grads = linear_bwd_weight(grad_out, y, h * w);
  at::Tensor grad_value = new_output(value.sizes(), value.options());
  at::Tensor grad_y_bound = at::matmul(wout_grads[2], wout.to(at::kFloat).abs());  // (N, C), tiny
  const bool x1_fused = g_fuse_epilogues && DCNV3_QUERY(dt, dcn_bwd_x1_fits, p.C / p.G, p.G) && grad_out.numel() > 0;
  // grad wpack in the sampling launch's persistent CTAs, one per SM (they need over half of one) and at most one per
  // tile, each with its own fp32 partial: where the partials fit, and where their traffic (written, then read by
  // sum_slots) is at most half of the HBM bytes they save, per pixel the grad logits written and read back and x1
  // read a second time (InternImage-T at 224 px on 132 SMs: stage 1 from 9 images, stage 2 from 68). Below that
  // the GEMM path keeps every SM busy with fewer bytes. wpack_slots > 0 forces it.
  // Where one CTA cannot hold the partial, clusters of 2-8 CTAs (sm_90) can, each CTA a slice of its rows: one
  // partial (slot) per cluster, a cluster per 8 SMs (InternImage-T stage 3 and -H stage 1 at 224 px: from 64 and 5
  // images).
  const int64_t tiles = p.N * ((h + 7) / 8) * ((w + 7) / 8);
  int cluster = wpack_cluster_for(dt, p.G, p.C, has_clusters(value));
  // How many clusters the device holds at once (8 SMs of one GPC each): at most that many slots, none at all where
  // none fits (the GEMM then).
  const int resident = cluster > 1 ? DCNV3_QUERY(dt, dcn_bwd_wpack_clusters, p.C / p.G, p.G, p.C, cluster,
                                                  g_backward_threads)
                                   : std::numeric_limits<int>::max();
  if (resident == 0) cluster = 0;
  const int64_t cluster_tiles = (tiles + std::max(cluster, 1) - 1) / std::max(cluster, 1);
  const int64_t slots =
      g_wpack_slots > 0
          ? std::min<int64_t>(g_wpack_slots, cluster_tiles)
          : std::max<int64_t>(1, std::min<int64_t>({cluster_tiles, sm_count(value) / std::max(cluster, 1),
                                                    int64_t(resident)}));
  const int64_t saved_bytes = p.N * h * w * (2 * cols + p.C) * value.element_size();
  const int64_t partial_bytes = dcnv3::wpack_partial_floats(p.G, p.C) * int64_t(sizeof(float));
  const bool wpack_fused = x1_fused && g_wpack_in_backward && cluster > 0 &&
                           (g_wpack_slots > 0 || 4 * slots * partial_bytes <= saved_bytes);
  at::Tensor grad_x1 = x1_fused ? new_output(x1.sizes(), value.options()) : at::Tensor();
  // grad logits go through HBM only for a GEMM that reads them back (grad wpack, or grad x1 where not fused).
  at::Tensor grad_logits = wpack_fused ? at::Tensor() : new_output({p.N, h, w, cols}, value.options());
  at::Tensor wpack_partial;
  if (wpack_fused) {
    wpack_partial = new_output({slots, dcnv3::wpack_partial_floats(p.G, p.C)}, value.options().dtype(at::kFloat));
    p.grad_wpack_partial = wpack_partial.data_ptr<float>();
    p.wpack_slots = static_cast<int>(slots);
    p.wpack_cluster = cluster;
  }
  // Stored grad_y: the GEMM's K order is the tile GEMM's (no split), so it holds the recompute's bits.
  const at::Tensor grad_y = g_stored_grad_y && grad_out.numel() > 0 ? linear_bwd_input(grad_out, wout) : at::Tensor();
  if (grad_out.numel() > 0) {
    if (grad_y.defined()) {
      p.grad_y = grad_y.data_ptr();
    } else {
      p.grad_out = grad_out.data_ptr();
      p.wout = wout.data_ptr();
      p.Cout = static_cast<int>(wout.size(0));
    }
    p.grad_y_absmax = grad_y_bound.data_ptr<float>();
    p.grad_logits = wpack_fused ? nullptr : grad_logits.data_ptr();
    p.grad_value = grad_value.data_ptr();
    p.reach = reach.data_ptr<int>();
    p.grad_x1 = x1_fused ? grad_x1.data_ptr() : nullptr;
    p.cta_threads = g_backward_threads;
    p.halo_masks = g_halo_masks;
    DCNV3_DISPATCH(dt, dcn_bwd, p.C / p.G, p, stream());
    check_launch();
  } else {
    grad_value.zero_();
    grad_logits.zero_();
  }
  if (!x1_fused) grad_x1 = linear_bwd_input(grad_logits, wpack);
  if (!wpack_fused) {
    std::vector<at::Tensor> wpack_grads = linear_bwd_weight(grad_logits, x1, 0);
    return {grad_value, grad_x1, wpack_grads[0], wpack_grads[1], wout_grads[0], wout_grads[1]};
  }
  at::Tensor grad_wpack = new_output({cols, p.C}, value.options());
  at::Tensor grad_bpack = new_output({cols}, value.options());
  DCNV3_DISPATCH(dt, sum_slots, p.grad_wpack_partial, p.wpack_slots, wpack_partial.size(1), grad_wpack.numel(),
                 grad_wpack.data_ptr(), grad_bpack.data_ptr(), stream());
  check_launch();
  return {grad_value, grad_x1, grad_wpack, grad_bpack, wout_grads[0], wout_grads[1]};
}

#ifdef DCNV3_EMULATION
void emu_set_order(const std::string& mode, int64_t seed) {
  if (mode == "forward") emu::set_order(emu::OrderMode::Forward, 0);
  else if (mode == "reverse") emu::set_order(emu::OrderMode::Reverse, 0);
  else if (mode == "shuffle") emu::set_order(emu::OrderMode::Shuffle, static_cast<uint64_t>(seed));
  else TORCH_CHECK(false, "dcnv3 emulation: thread order must be forward, reverse or shuffle, not ", mode);
}

py::list emu_stop_counting() {
  py::list out;
  for (const auto& c : emu::stop_counting()) {
    py::dict d;
    d["kernel"] = c.name;
    d["grid"] = c.grid;
    d["block"] = c.block;
    d["load_bytes"] = c.load_bytes;
    d["store_bytes"] = c.store_bytes;
    d["load_sectors"] = c.load_sectors;
    d["store_sectors"] = c.store_sectors;
    d["load_requests"] = c.load_requests;
    d["store_requests"] = c.store_requests;
    d["unique_load_sectors"] = c.unique_load_sectors;
    d["unique_store_sectors"] = c.unique_store_sectors;
    d["atomics"] = c.atomics;
    d["shared_atomics"] = c.shared_atomics;
    d["atomic_sectors"] = c.atomic_sectors;
    d["atomic_requests"] = c.atomic_requests;
    d["unique_atomic_sectors"] = c.unique_atomic_sectors;
    d["shared_load_bytes"] = c.shared_load_bytes;
    d["shared_store_bytes"] = c.shared_store_bytes;
    d["shared_loads"] = c.shared_loads;
    d["shared_stores"] = c.shared_stores;
    d["shared_requests"] = c.shared_requests;
    d["shared_wavefronts"] = c.shared_wavefronts;
    d["shared_atomic_requests"] = c.shared_atomic_requests;
    d["shared_atomic_wavefronts"] = c.shared_atomic_wavefronts;
    d["mma"] = c.mma;
    d["dsmem_requests"] = c.dsmem_requests;
    d["dsmem_bytes"] = c.dsmem_bytes;
    py::list sites;
    for (const auto& t : c.sites) sites.append(py::make_tuple(t.offset, t.kind, t.requests, t.sectors));
    d["sites"] = sites;
    out.append(d);
  }
  return out;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused DCNv3 kernels (CUTLASS/CuTe): sampling fused with the offset/mask projection, and GEMMs";
  m.def("sample_fwd", &sample_fwd, "(y, reach): y = sample(value, logits or x1.wpack^T+bpack)");
  m.def("block_fwd", &block_fwd,
        "(out, y or empty, reach, stored logits or empty): the block forward, output projection fused as the sampling "
        "epilogue if it fits");
  m.def("set_fused_epilogues", &set_fused_epilogues,
        "fuse the output projection (forward) and grad x1 (backward) into the sampling kernels where they fit");
  m.def("fused_epilogues", [] { return g_fuse_epilogues; }, "whether block_fwd/block_bwd fuse their epilogues");
  m.def("set_wpack_in_backward", &set_wpack_in_backward,
        "accumulate grad wpack in the backward's sampling kernel where it fits (true) or in a GEMM launch");
  m.def("wpack_in_backward", [] { return g_wpack_in_backward; }, "whether block_bwd accumulates grad wpack in-kernel");
  m.def("set_wpack_slots", &set_wpack_slots, "persistent CTAs of the in-kernel grad wpack: 0 = automatic");
  m.def(
      "bwd_wpack_fits",
      [](const at::Tensor& like, int64_t groups, int64_t channels, int64_t cluster) {
        return DCNV3_QUERY(dtype_of(like), dcn_bwd_wpack_fits, static_cast<int>(channels / groups),
                           static_cast<int>(groups), static_cast<int>(channels), static_cast<int>(cluster));
      },
      py::arg("like"), py::arg("groups"), py::arg("channels"), py::arg("cluster") = 1,
      "whether a CTA's slice of grad wpack's partial fits in the backward for (like's dtype, groups, channels) in "
      "clusters of `cluster` CTAs");
  m.def(
      "wpack_clusters_resident",
      [](const at::Tensor& like, int64_t groups, int64_t channels, int64_t cluster) {
        return DCNV3_QUERY(dtype_of(like), dcn_bwd_wpack_clusters, static_cast<int>(channels / groups),
                           static_cast<int>(groups), static_cast<int>(channels), static_cast<int>(cluster),
                           g_backward_threads);
      },
      "how many clusters of `cluster` CTAs of the grad wpack backward the device holds at once (0: none fits)");
  m.def("set_wpack_cluster", &set_wpack_cluster, "CTAs per cluster of the in-kernel grad wpack: 0 = automatic");
  m.def("wpack_cluster", [] { return g_wpack_cluster; }, "CTAs per cluster of the in-kernel grad wpack (0: automatic)");
  m.def("wpack_slots", [] { return g_wpack_slots; }, "persistent CTAs of the in-kernel grad wpack (0: automatic)");
  m.def("set_halo_masks", [](bool enabled) { g_halo_masks = enabled; },
        "whether the one-launch backward skips halo pixels by the forward's touch masks");
  m.def("halo_masks", [] { return g_halo_masks; }, "whether the one-launch backward uses the touch masks");
  m.def("set_stored_grad_y", [](bool enabled) { g_stored_grad_y = enabled; },
        "whether block_bwd stores grad_y (a GEMM launch) instead of recomputing it in the sampling backward");
  m.def("stored_grad_y", [] { return g_stored_grad_y; }, "whether block_bwd stores grad_y");
  m.def("set_stored_logits", [](bool enabled) { g_stored_logits = enabled; },
        "whether block_fwd stores its fp32 logits (with y) for block_bwd to read instead of recomputing them");
  m.def("stored_logits", [] { return g_stored_logits; }, "whether block_fwd stores its logits for the backward");
  m.def("set_backward_threads", &set_backward_threads, "threads per CTA of the one-launch backward: 128 or 256");
  m.def("backward_threads", [] { return g_backward_threads; }, "threads per CTA of the one-launch backward");
  m.def("block_bwd", &block_bwd,
        "grads of (value, x1, wpack, bpack, wout, bout): the block backward, grad_y recomputed in the sampling kernel");
  m.def("sample_bwd", &sample_bwd, "(grad_value, grad_logits) of sample_fwd, given its reach");
  m.def("linear_fwd", &linear_fwd, "a . w^T + bias (tensor-core tiles, fp32 accumulation)");
  m.def("linear_bwd_input", &linear_bwd_input, "grad . w");
  m.def("linear_bwd_weight", &linear_bwd_weight,
        "(grad^T . a, column sums of grad, max |grad| per group of grad_absmax_rows rows or empty): deterministic split-K",
        py::arg("grad"), py::arg("a"), py::arg("grad_absmax_rows") = 0);
  m.attr("kMaxPoints") = dcnv3::kMaxPoints;
  m.attr("kGroupCols") = dcnv3::kGroupCols;
  m.def("packed_cols", [](int64_t G) { return dcnv3::packed_cols(static_cast<int>(G)); },
        "row length of the packed logits for G groups (28 per group, padded to 8)");
#ifdef DCNV3_EMULATION
  m.attr("emulation") = true;
  m.def("emu_set_order", &emu_set_order, "resume order of a CTA's threads: forward, reverse or shuffle (seeded)");
  m.def("emu_start_counting", &emu::start_counting, "count memory traffic, atomics and mma per launch from now");
  m.def("emu_set_shared_statics", &emu::set_shared_statics,
        "(offset, size) of each __shared__ static: poisoned with 0xFF before every CTA");
  m.def("emu_stop_counting", &emu_stop_counting, "stop counting; -> one dict of counters per kernel launch");
  m.def("emu_last_dynamic_smem", [] { return py::bytes(emu::last_dynamic_smem()); },
        "the last launch's dynamic shared memory as its last CTA left it");
#else
  m.attr("emulation") = false;
#endif
}
