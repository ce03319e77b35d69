// 2-D convolutions through oneDNN, as XLA FFI handlers (models/onednn.py is the Python side).
//
// Three handlers, float32, NHWC activations and HWIO kernels (JAX's layouts), stride and
// explicit (possibly asymmetric) padding, no dilation, no groups:
//   convnets_onednn_conv_fwd(x, w) -> y
//   convnets_onednn_conv_dx(dy, w) -> dx     (the input gradient; dx's shape is the result's)
//   convnets_onednn_conv_dw(x, dy) -> dw     (the weight gradient; dw's shape is the result's)
// Attributes (int64): stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, layout.
//
// `layout` chooses the memory formats oneDNN's primitive is created with:
//   0  plain: activations NHWC and weights HWIO, as XLA holds them (no reorders);
//   1  weights `any`, activations NHWC: oneDNN picks the weights' (small) blocked layout and
//      the kernel reads and writes NHWC activations itself;
//   2  everything `any`: oneDNN picks blocked layouts for all three (its AVX-512 kernels on
//      nChw16c), and every operand is reordered in and the result reordered out.
// Which one wins depends on the pass and the shape: benchmarks/onednn_parts.py measures it.
//
// Primitives (and their reorders) are created once per shape, attributes and OpenMP thread
// count, and cached behind a mutex; executing a cached primitive from several threads at once
// is safe because every call brings its own scratchpad (scratchpad_mode::user) and reorder
// buffers (a per-thread arena). oneDNN's threads are OpenMP's (this is the GNU OpenMP build):
// `convnets_onednn_set_threads(n)` fixes how many each call uses (0: OpenMP's default).

#include <omp.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wattributes"
#pragma GCC diagnostic ignored "-Wreturn-type"
#pragma GCC diagnostic ignored "-Wsign-compare"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Pass : int64_t { kFwd = 0, kDx = 1, kDw = 2 };

std::atomic<int> g_threads{0};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One cached computation: the primitive, and for each of its three operands (two inputs,
// then the output) the user's memory descriptor, the primitive's, the oneDNN argument id and,
// where the two differ, the reorder between them.
struct Plan {
  dnnl::primitive primitive;
  std::array<int, 3> arg{};
  std::array<memory::desc, 3> user_md;
  std::array<memory::desc, 3> prim_md;
  std::array<bool, 3> reordered{};
  std::array<dnnl::reorder, 3> reorder;
  size_t scratchpad_bytes = 0;
  std::string impl;
};

// The key: pass, N, H, W, C, OH, OW, K, KH, KW, strides, paddings, layout, threads.
using Key = std::array<int64_t, 18>;

std::mutex g_mutex;
std::map<Key, std::shared_ptr<const Plan>>& Cache() {
  static auto* cache = new std::map<Key, std::shared_ptr<const Plan>>();
  return *cache;
}

// Per-thread buffers for reordered operands and the scratchpad; they grow and are kept.
struct Arena {
  char* data = nullptr;
  size_t size = 0;
  ~Arena() { std::free(data); }
  char* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = static_cast<char*>(std::aligned_alloc(4096, size));
      if (data == nullptr) size = 0;
    }
    return data;
  }
};
thread_local Arena t_arena;

size_t Align(size_t n) { return (n + 63) / 64 * 64; }

struct Shape {
  int64_t n, h, w, c, oh, ow, k, kh, kw;
};

std::shared_ptr<const Plan> MakePlan(Pass pass, const Shape& s, const memory::dims& strides,
                                     const memory::dims& pad_l, const memory::dims& pad_r,
                                     int64_t layout) {
  const auto f32 = memory::data_type::f32;
  const memory::dims src_dims = {s.n, s.c, s.h, s.w};
  const memory::dims wei_dims = {s.k, s.c, s.kh, s.kw};
  const memory::dims dst_dims = {s.n, s.k, s.oh, s.ow};
  const memory::desc src_user(src_dims, f32, tag::nhwc);
  const memory::desc wei_user(wei_dims, f32, tag::hwio);
  const memory::desc dst_user(dst_dims, f32, tag::nhwc);
  const bool act_any = layout == 2;
  const bool wei_any = layout >= 1;
  const memory::desc src_md = act_any ? memory::desc(src_dims, f32, tag::any) : src_user;
  const memory::desc wei_md = wei_any ? memory::desc(wei_dims, f32, tag::any) : wei_user;
  const memory::desc dst_md = act_any ? memory::desc(dst_dims, f32, tag::any) : dst_user;

  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& engine = Engine();
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd_pd(
      engine, dnnl::prop_kind::forward_training, algo, src_md, wei_md, dst_md, strides, pad_l,
      pad_r, attr);

  auto plan = std::make_shared<Plan>();
  std::array<memory::desc, 3> user;
  dnnl::primitive_desc_base* pd = nullptr;
  dnnl::convolution_backward_data::primitive_desc dx_pd;
  dnnl::convolution_backward_weights::primitive_desc dw_pd;
  switch (pass) {
    case kFwd:
      pd = &fwd_pd;
      plan->primitive = dnnl::convolution_forward(fwd_pd);
      plan->arg = {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST};
      user = {src_user, wei_user, dst_user};
      plan->prim_md = {fwd_pd.src_desc(), fwd_pd.weights_desc(), fwd_pd.dst_desc()};
      break;
    case kDx:
      dx_pd = dnnl::convolution_backward_data::primitive_desc(
          engine, algo, src_md, wei_md, dst_md, strides, pad_l, pad_r, fwd_pd, attr);
      pd = &dx_pd;
      plan->primitive = dnnl::convolution_backward_data(dx_pd);
      plan->arg = {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC};
      user = {dst_user, wei_user, src_user};
      plan->prim_md = {dx_pd.diff_dst_desc(), dx_pd.weights_desc(), dx_pd.diff_src_desc()};
      break;
    case kDw:
      dw_pd = dnnl::convolution_backward_weights::primitive_desc(
          engine, algo, src_md, wei_md, dst_md, strides, pad_l, pad_r, fwd_pd, attr);
      pd = &dw_pd;
      plan->primitive = dnnl::convolution_backward_weights(dw_pd);
      plan->arg = {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS};
      user = {src_user, dst_user, wei_user};
      plan->prim_md = {dw_pd.src_desc(), dw_pd.diff_dst_desc(), dw_pd.diff_weights_desc()};
      break;
  }
  plan->user_md = user;
  plan->scratchpad_bytes = pd->scratchpad_desc().get_size();
  plan->impl = pd->impl_info_str();
  for (int i = 0; i < 3; ++i) {
    plan->reordered[i] = plan->prim_md[i] != plan->user_md[i];
    if (!plan->reordered[i]) continue;
    dnnl::primitive_attr reorder_attr;
    reorder_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (i < 2) {
      plan->reorder[i] = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine, plan->user_md[i], engine, plan->prim_md[i], reorder_attr));
    } else {
      plan->reorder[i] = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine, plan->prim_md[i], engine, plan->user_md[i], reorder_attr));
    }
  }
  return plan;
}

std::shared_ptr<const Plan> GetPlan(Pass pass, const Shape& s, int64_t sh, int64_t sw,
                                    int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                    int64_t layout, int threads) {
  const Key key = {pass, s.n, s.h, s.w, s.c, s.oh, s.ow, s.k, s.kh,
                   s.kw, sh,  sw,  pt,  pb,  pl,   pr,   layout, threads};
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto plan = MakePlan(pass, s, {sh, sw}, {pt, pl}, {pb, pr}, layout);
  cache.emplace(key, plan);
  return plan;
}

// Runs `plan` on the user's buffers (two inputs, one output).
void Execute(const Plan& plan, std::array<void*, 3> user_data) {
  auto& engine = Engine();
  dnnl::stream stream(engine);
  size_t offsets[3] = {0, 0, 0};
  size_t total = Align(plan.scratchpad_bytes);
  for (int i = 0; i < 3; ++i) {
    if (!plan.reordered[i]) continue;
    offsets[i] = total;
    total += Align(plan.prim_md[i].get_size());
  }
  char* arena = t_arena.Get(total > 0 ? total : 64);
  if (arena == nullptr) throw std::bad_alloc();
  std::array<memory, 3> prim_mem;
  for (int i = 0; i < 3; ++i) {
    memory user_mem(plan.user_md[i], engine, user_data[i]);
    if (plan.reordered[i]) {
      prim_mem[i] = memory(plan.prim_md[i], engine, arena + offsets[i]);
      if (i < 2) {
        plan.reorder[i].execute(stream, user_mem, prim_mem[i]);
      }
    } else {
      prim_mem[i] = user_mem;
    }
  }
  memory scratchpad(memory::desc({static_cast<int64_t>(plan.scratchpad_bytes)},
                                 memory::data_type::u8, tag::a),
                    engine, arena);
  plan.primitive.execute(stream, {{plan.arg[0], prim_mem[0]},
                                  {plan.arg[1], prim_mem[1]},
                                  {plan.arg[2], prim_mem[2]},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
  if (plan.reordered[2]) {
    memory user_out(plan.user_md[2], engine, user_data[2]);
    plan.reorder[2].execute(stream, prim_mem[2], user_out);
  }
  stream.wait();
}

int SetThreads() {
  const int threads = g_threads.load(std::memory_order_relaxed);
  if (threads > 0 && omp_get_max_threads() != threads) omp_set_num_threads(threads);
  return omp_get_max_threads();
}

ffi::Error Run(Pass pass, const Shape& s, std::array<void*, 3> data, int64_t sh, int64_t sw,
               int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t layout) {
  if (sh < 1 || sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0 || layout < 0 || layout > 2) {
    return ffi::Error::InvalidArgument("onednn conv: bad stride, padding or layout attribute");
  }
  if ((s.h + pt + pb - s.kh) < 0 || (s.w + pl + pr - s.kw) < 0 ||
      (s.h + pt + pb - s.kh) / sh + 1 != s.oh || (s.w + pl + pr - s.kw) / sw + 1 != s.ow) {
    return ffi::Error::InvalidArgument("onednn conv: output size does not match the input, "
                                       "kernel, stride and padding");
  }
  try {
    const int threads = SetThreads();
    auto plan = GetPlan(pass, s, sh, sw, pt, pb, pl, pr, layout, threads);
    Execute(*plan, data);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32R4 = ffi::BufferR4<ffi::F32>;
using F32R4Out = ffi::ResultBufferR4<ffi::F32>;

ffi::Error Fwd(F32R4 x, F32R4 w, F32R4Out y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int64_t layout) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (wd[2] != xd[3] || yd[0] != xd[0] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn conv fwd: shapes do not match");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[3], wd[0], wd[1]};
  return Run(kFwd, s, {x.untyped_data(), w.untyped_data(), y->untyped_data()}, sh, sw, pt, pb,
             pl, pr, layout);
}

ffi::Error Dx(F32R4 dy, F32R4 w, F32R4Out dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
              int64_t pl, int64_t pr, int64_t layout) {
  auto yd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  if (wd[2] != xd[3] || yd[0] != xd[0] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn conv dx: shapes do not match");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[3], wd[0], wd[1]};
  return Run(kDx, s, {dy.untyped_data(), w.untyped_data(), dx->untyped_data()}, sh, sw, pt, pb,
             pl, pr, layout);
}

ffi::Error Dw(F32R4 x, F32R4 dy, F32R4Out dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
              int64_t pl, int64_t pr, int64_t layout) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (wd[2] != xd[3] || yd[0] != xd[0] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn conv dw: shapes do not match");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[3], wd[0], wd[1]};
  return Run(kDw, s, {x.untyped_data(), dy.untyped_data(), dw->untyped_data()}, sh, sw, pt, pb,
             pl, pr, layout);
}

auto BindConv() {
  return ffi::Ffi::Bind()
      .Arg<F32R4>()
      .Arg<F32R4>()
      .Ret<F32R4>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right")
      .Attr<int64_t>("layout");
}

// --- BatchNorm's training pass and its gradient ---------------------------------------------
//
//   convnets_onednn_bn_fwd(x, scale, shift) -> (y, mean, var)            attribute: epsilon
//   convnets_onednn_bn_bwd(x, dy, scale, mean, var) -> (dx, dscale, dshift)   epsilon
// over the last axis of NHWC float32 x with the batch's mean and biased variance, y = (x -
// mean) / sqrt(var + epsilon) * scale + shift (oneDNN's batch_normalization, as nnx.BatchNorm
// computes it). Plans are cached per shape, epsilon and thread count like the convolutions'.

struct NormPlan {
  dnnl::primitive primitive;
  memory::desc data_md, stat_md;
  size_t scratchpad_bytes = 0;
};

// The key: pass (3 forward, 4 backward), N, H, W, C, epsilon's bits, threads.
using NormKey = std::array<int64_t, 7>;

std::map<NormKey, std::shared_ptr<const NormPlan>>& NormCache() {
  static auto* cache = new std::map<NormKey, std::shared_ptr<const NormPlan>>();
  return *cache;
}

std::shared_ptr<const NormPlan> GetNormPlan(bool backward, const memory::dims& dims,
                                            float epsilon, int threads) {
  int32_t bits;
  std::memcpy(&bits, &epsilon, sizeof bits);
  const NormKey key = {backward ? 4 : 3, dims[0], dims[2], dims[3], dims[1], bits, threads};
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& cache = NormCache();
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto& engine = Engine();
  const auto f32 = memory::data_type::f32;
  const memory::desc data_md(dims, f32, tag::nhwc);
  const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::batch_normalization_forward::primitive_desc fwd_pd(
      engine, dnnl::prop_kind::forward_training, data_md, data_md, epsilon, flags, attr);
  auto plan = std::make_shared<NormPlan>();
  plan->data_md = data_md;
  plan->stat_md = fwd_pd.mean_desc();
  if (backward) {
    dnnl::batch_normalization_backward::primitive_desc bwd_pd(
        engine, dnnl::prop_kind::backward, data_md, data_md, data_md, epsilon, flags, fwd_pd,
        attr);
    plan->primitive = dnnl::batch_normalization_backward(bwd_pd);
    plan->scratchpad_bytes = bwd_pd.scratchpad_desc().get_size();
  } else {
    plan->primitive = dnnl::batch_normalization_forward(fwd_pd);
    plan->scratchpad_bytes = fwd_pd.scratchpad_desc().get_size();
  }
  cache.emplace(key, plan);
  return plan;
}

// Runs the forward (args: x, scale, shift, y, mean, var) or backward (x, dy, scale, mean,
// var, dx, dscale, dshift) pass on the caller's buffers.
ffi::Error RunNorm(bool backward, const memory::dims& dims, float epsilon,
                   const std::vector<void*>& data) {
  if (!(epsilon >= 0.0f)) return ffi::Error::InvalidArgument("onednn bn: epsilon must be >= 0");
  try {
    const int threads = SetThreads();
    auto plan = GetNormPlan(backward, dims, epsilon, threads);
    auto& engine = Engine();
    dnnl::stream stream(engine);
    char* arena = t_arena.Get(plan->scratchpad_bytes > 0 ? plan->scratchpad_bytes : 64);
    if (arena == nullptr) throw std::bad_alloc();
    memory scratchpad(memory::desc({static_cast<int64_t>(plan->scratchpad_bytes)},
                                   memory::data_type::u8, tag::a),
                      engine, arena);
    // the caller's buffers in order, each a oneDNN argument of the data's or the statistics'
    // shape
    static const std::vector<std::pair<int, bool>> kForward = {
        {DNNL_ARG_SRC, true},   {DNNL_ARG_SCALE, false}, {DNNL_ARG_SHIFT, false},
        {DNNL_ARG_DST, true},   {DNNL_ARG_MEAN, false},  {DNNL_ARG_VARIANCE, false}};
    static const std::vector<std::pair<int, bool>> kBackward = {
        {DNNL_ARG_SRC, true},         {DNNL_ARG_DIFF_DST, true},    {DNNL_ARG_SCALE, false},
        {DNNL_ARG_MEAN, false},       {DNNL_ARG_VARIANCE, false},   {DNNL_ARG_DIFF_SRC, true},
        {DNNL_ARG_DIFF_SCALE, false}, {DNNL_ARG_DIFF_SHIFT, false}};
    const auto& args = backward ? kBackward : kForward;
    if (args.size() != data.size()) throw std::invalid_argument("wrong number of buffers");
    std::unordered_map<int, memory> bound = {{DNNL_ARG_SCRATCHPAD, scratchpad}};
    for (size_t i = 0; i < args.size(); ++i) {
      const auto& md = args[i].second ? plan->data_md : plan->stat_md;
      bound.emplace(args[i].first, memory(md, engine, data[i]));
    }
    plan->primitive.execute(stream, bound);
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn bn: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32R1 = ffi::BufferR1<ffi::F32>;
using F32R1Out = ffi::ResultBufferR1<ffi::F32>;

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

bool ChannelsMatch(int64_t c, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s != c) return false;
  }
  return true;
}

ffi::Error NormFwd(F32R4 x, F32R1 scale, F32R1 shift, F32R4Out y, F32R1Out mean, F32R1Out var,
                   float epsilon) {
  auto d = x.dimensions();
  if (!SameDims(y->dimensions(), d) ||
      !ChannelsMatch(d[3], {scale.dimensions()[0], shift.dimensions()[0],
                            mean->dimensions()[0], var->dimensions()[0]})) {
    return ffi::Error::InvalidArgument("onednn bn fwd: shapes do not match");
  }
  return RunNorm(false, {d[0], d[3], d[1], d[2]}, epsilon,
                 {x.untyped_data(), scale.untyped_data(), shift.untyped_data(),
                  y->untyped_data(), mean->untyped_data(), var->untyped_data()});
}

ffi::Error NormBwd(F32R4 x, F32R4 dy, F32R1 scale, F32R1 mean, F32R1 var, F32R4Out dx,
                   F32R1Out dscale, F32R1Out dshift, float epsilon) {
  auto d = x.dimensions();
  if (!SameDims(dy.dimensions(), d) || !SameDims(dx->dimensions(), d) ||
      !ChannelsMatch(d[3], {scale.dimensions()[0], mean.dimensions()[0], var.dimensions()[0],
                            dscale->dimensions()[0], dshift->dimensions()[0]})) {
    return ffi::Error::InvalidArgument("onednn bn bwd: shapes do not match");
  }
  return RunNorm(true, {d[0], d[3], d[1], d[2]}, epsilon,
                 {x.untyped_data(), dy.untyped_data(), scale.untyped_data(), mean.untyped_data(),
                  var.untyped_data(), dx->untyped_data(), dscale->untyped_data(),
                  dshift->untyped_data()});
}

// Both BatchNorm handlers return a tensor of the data's shape and two of the channels' (y,
// mean, var forward; dx, dscale, dshift backward) and take epsilon.
template <typename Binding>
auto BindNormResults(Binding binding) {
  return std::move(binding)
      .template Ret<F32R4>()
      .template Ret<F32R1>()
      .template Ret<F32R1>()
      .template Attr<float>("epsilon");
}

}  // namespace

// The library is built with hidden visibility: these are its only exported symbols.
#define EXPORT __attribute__((visibility("default")))
extern "C" EXPORT XLA_FFI_Error* convnets_onednn_conv_fwd(XLA_FFI_CallFrame*);
extern "C" EXPORT XLA_FFI_Error* convnets_onednn_conv_dx(XLA_FFI_CallFrame*);
extern "C" EXPORT XLA_FFI_Error* convnets_onednn_conv_dw(XLA_FFI_CallFrame*);
extern "C" EXPORT XLA_FFI_Error* convnets_onednn_bn_fwd(XLA_FFI_CallFrame*);
extern "C" EXPORT XLA_FFI_Error* convnets_onednn_bn_bwd(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(convnets_onednn_conv_fwd, Fwd, BindConv());
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnets_onednn_conv_dx, Dx, BindConv());
XLA_FFI_DEFINE_HANDLER_SYMBOL(convnets_onednn_conv_dw, Dw, BindConv());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    convnets_onednn_bn_fwd, NormFwd,
    BindNormResults(ffi::Ffi::Bind().Arg<F32R4>().Arg<F32R1>().Arg<F32R1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    convnets_onednn_bn_bwd, NormBwd,
    BindNormResults(
        ffi::Ffi::Bind().Arg<F32R4>().Arg<F32R4>().Arg<F32R1>().Arg<F32R1>().Arg<F32R1>()));

extern "C" {

// How many OpenMP threads each call uses from now on (0: OpenMP's default).
EXPORT void convnets_onednn_set_threads(int threads) {
  g_threads.store(threads < 0 ? 0 : threads, std::memory_order_relaxed);
}

// The oneDNN version, as major * 10000 + minor * 100 + patch.
EXPORT int convnets_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Writes the implementation oneDNN picks for a convolution (e.g. "brg:avx512_core") into
// `out` (at most `size` bytes, NUL-terminated); returns 0, or -1 if no primitive exists.
EXPORT int convnets_onednn_impl(int64_t pass, int64_t n, int64_t h, int64_t w, int64_t c, int64_t k,
                         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                         int64_t pl, int64_t pr, int64_t layout, char* out, int64_t size) {
  if (size <= 0 || pass < 0 || pass > 2) return -1;
  const int64_t oh = (h + pt + pb - kh) / sh + 1, ow = (w + pl + pr - kw) / sw + 1;
  const Shape s{n, h, w, c, oh, ow, k, kh, kw};
  try {
    const int threads = SetThreads();
    auto plan = GetPlan(static_cast<Pass>(pass), s, sh, sw, pt, pb, pl, pr, layout, threads);
    std::string text = plan->impl;
    for (int i = 0; i < 3; ++i) text += plan->reordered[i] ? " R" : " -";
    std::strncpy(out, text.c_str(), size - 1);
    out[size - 1] = '\0';
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // extern "C"
