// Host side of the CUDA operator: argument checks, layouts at the boundary, the work split, and the
// choice of kernel instantiation. Written over a `Runner` that launches the kernels (register.cu) or
// runs their bodies on CPU (the emulation in tests/), so both go through exactly this code.
//
// Runner interface (T, KT, V as in kernels.cuh):
//   template <typename T, int KT, int V, bool kGradFeatures, bool kMul, bool kAdd>
//   void gather(const GatherArgs<T>&, int rows);   (kMul, kAdd: whether the ghost kernels are given)
//   template <typename T, int KT, int V> void attn_ghost(const AttnGhostArgs<T>&, int blocks_x);
//   template <typename A> void ghost_reduce(const GhostReduceArgs<A>&, int64_t items);
//   template <typename T> void chunk_sum(const ChunkSumArgs<T>&);
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../elsa_common.h"
#include "kernels.cuh"

namespace elsa_op::gpu {

constexpr int kItemThreads = 256;  // threads per block of the per-item kernels
constexpr int kMaxGridY = 65535;

// Grid of the per-item kernels: x covers the items of a row (check_int32 keeps them below 2^31), y the rows,
// strided when there are more than kMaxGridY.
struct ItemGrid {
  int64_t x, y;
};
inline ItemGrid item_grid(int64_t items_per_row, int64_t rows) {
  return ItemGrid{(items_per_row + kItemThreads - 1) / kItemThreads, std::min<int64_t>(rows, kMaxGridY)};
}

// Blocks of ghost_reduce: kReduceItems items each.
inline int64_t ghost_reduce_blocks(int64_t items) {
  return (items + kReduceItems - 1) / kReduceItems;
}

// Grid of the grid-stride kernel chunk_sum.
inline int64_t stride_grid(int64_t items) {
  return std::min<int64_t>((items + kItemThreads - 1) / kItemThreads, int64_t(1) << 20);
}

// Calls f.template operator()<T, KT, V>() for the instantiation that serves this call: K a compile-time
// constant for odd K up to 13 with full 16-byte vectors; the runtime-K kernel for larger K, for double,
// and for channel counts or strides that 16-byte vectors do not fit (V = 1).
template <class F>
void dispatch(at::ScalarType type, int64_t K, bool full_vectors, F&& f) {
  auto by_k = [&]<typename T, int V>() {
    if constexpr (V > 1 && !std::is_same_v<T, double>) {
      switch (K) {
        case 1:
          return f.template operator()<T, 1, V>();
        case 3:
          return f.template operator()<T, 3, V>();
        case 5:
          return f.template operator()<T, 5, V>();
        case 7:
          return f.template operator()<T, 7, V>();
        case 9:
          return f.template operator()<T, 9, V>();
        case 11:
          return f.template operator()<T, 11, V>();
        case 13:
          return f.template operator()<T, 13, V>();
        default:
          return f.template operator()<T, 0, V>();
      }
    } else {
      return f.template operator()<T, 0, V>();
    }
  };
  auto by_v = [&]<typename T>() {
    constexpr int full = 16 / sizeof(T);
    if (full_vectors) return by_k.template operator()<T, full>();
    return by_k.template operator()<T, 1>();
  };
  switch (type) {
    case at::kFloat:
      return by_v.template operator()<float>();
    case at::kDouble:
      return by_v.template operator()<double>();
    case at::kHalf:
      return by_v.template operator()<c10::Half>();
    case at::kBFloat16:
      return by_v.template operator()<c10::BFloat16>();
    default:
      TORCH_CHECK(false, "elsa: unsupported dtype ", type);
  }
}

// Elements per 16-byte vector.
inline int full_vector(at::ScalarType type) {
  return 16 / static_cast<int>(c10::elementSize(type));
}

// Compact copies in the kernels' layouts: channels-last [B, H, W, C] memory, and the attention's
// [B, Ho, Wo, G, K*K]. Fresh tensors, where .contiguous() would keep a view whose odd strides belong to
// dimensions of size 1.
inline at::Tensor compact_channels_last(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(t);
}
inline at::Tensor compact_taps_last(const at::Tensor& h) {
  const auto taps_last = h.permute({0, 3, 4, 1, 2});
  return at::empty(taps_last.sizes(), h.options()).copy_(taps_last).permute({0, 3, 4, 1, 2});
}

// Channels-last view of features or gradients: kept when channels are unit-stride, else copied once.
inline at::Tensor as_channels_last(const at::Tensor& t) {
  return t.size(1) == 1 || t.stride(1) == 1 ? t : compact_channels_last(t);
}

// Attention with unit tap stride: kept when it has it ([B, Ho, Wo, G, K*K] memory), else copied once.
inline at::Tensor attn_taps_last(const at::Tensor& h) {
  return h.size(2) == 1 || h.stride(2) == 1 ? h : compact_taps_last(h);
}

inline PixelStrides strides_of(const at::Tensor& t) {
  return PixelStrides{t.stride(0), t.stride(2), t.stride(3)};
}
inline AttentionStrides attn_strides_of(const at::Tensor& h) {
  return AttentionStrides{h.stride(0), h.stride(3), h.stride(4), h.stride(1)};
}

// Whether 16-byte vectors fit: whole vectors per head, and vector-aligned pointers and pixel strides.
inline bool vectors_fit(const Geometry<int64_t>& g, std::initializer_list<const at::Tensor*> tensors) {
  const int v = full_vector((*tensors.begin())->scalar_type());
  if ((g.C / g.G) % v != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    for (int d : {0, 2, 3})
      if (t->size(d) > 1 && t->stride(d) % v != 0) return false;
  }
  return true;
}

// Ghost kernels as tap-major [U, K*K, C] tables in the accumulation type (a copy of C*K*K values per unit):
// the lanes of a warp, which own neighbouring channel vectors, then read one tap's values from neighbouring
// bytes. The kernels load them as 16-byte vectors, so a table off 16-byte alignment (a view of the
// caller's tensor, as K = 1 can leave it) is copied.
inline at::Tensor ghost_table(const std::optional<at::Tensor>& t, const Geometry<int64_t>& g, at::ScalarType acc) {
  if (!t) return at::Tensor();
  auto table = t->to(acc).reshape({t->dim() == 4 ? g.B : 1, g.C, g.taps()}).transpose(1, 2).contiguous();
  return reinterpret_cast<uintptr_t>(table.const_data_ptr()) % 16 == 0 ? table : table.clone();
}

// Whether the 32-bit offsets of the gathers' inside-the-image paths fit: along a window row and from a
// run's first pixel to its last, in the source and in the attention (whose taps add K), and a window row
// of the ghost tables (else every run takes the border path, with 64-bit offsets).
inline bool narrow_offsets(const Geometry<int64_t>& g, const at::Tensor& source, const at::Tensor& attention) {
  constexpr int64_t lim = int64_t(1) << 31;
  const int64_t along = std::max<int64_t>(g.K - 1, 1) * g.dilation, run = kRunPixels - 1;
  return std::max(along, run * g.stride) * std::abs(source.stride(3)) < lim &&
         std::max(along, run) * std::abs(attention.stride(4)) + g.K < lim && g.K * g.C < lim;
}

// The kernels compute in-plane coordinates and per-row indices in 32 bits.
inline void check_int32(const Geometry<int64_t>& g) {
  constexpr int64_t lim = (int64_t(1) << 31) - 1;
  TORCH_CHECK(std::max(g.H, g.W) + g.radius() * g.dilation + g.stride < lim && g.C < lim &&
                  g.B * std::max(g.H, g.Ho) < lim && std::max(g.W, g.Wo) * g.C < lim,
              "elsa (CUDA): this geometry (", g.H, "x", g.W, " image, ", g.C, " channels, batch ", g.B,
              ", kernel_size ", g.K, ", dilation ", g.dilation,
              ") needs coordinates beyond 32 bits; "
              "use a smaller dilation or image, or the CPU operator");
}

// The geometry in the kernels' 32-bit integers (check_int32 has checked that it fits).
inline Geometry<int> geometry32(const Geometry<int64_t>& g) {
  return g.as<int>();
}

// What the kernels get for a tensor (null for an undefined one): its data pointer on the GPU. In the CPU
// emulation (ELSA_CHECK_ACCESS) a pointer that carries the tensor's storage and view, against which every
// access of the kernels is checked (access.h); `name` says which tensor a failed check was about.
template <typename T>
Global<T> global_ptr(const at::Tensor& t, const char* name) {
  if (!t.defined()) return nullptr;
  using U = std::remove_const_t<T>;
  T* p;
  if constexpr (std::is_const_v<T>) {
    p = t.const_data_ptr<U>();
  } else {
    p = t.mutable_data_ptr<U>();
  }
#ifdef ELSA_CHECK_ACCESS
  const auto& s = t.storage();
  return Global<T>(p, access::watch(name, s.data(), int64_t(s.nbytes()), p, int64_t(t.element_size()), t.sizes().vec(),
                                    t.strides().vec()));
#else
  (void)name;
  return p;
#endif
}
inline int64_t table_batch_stride(const at::Tensor& t, const Geometry<int64_t>& g) {
  return t.defined() && t.size(0) > 1 ? g.taps() * g.C : 0;
}

// ---------------------------------------------------------------------------------------------------
// Forward (values = features, written on the output grid) or grad features (values = grad_out, written on
// the features' grid): the two directions of kernels.cuh's weighted gather.
template <bool kGradFeatures, class Runner>
at::Tensor gather_impl(Runner& run, const Geometry<int64_t>& g, const at::Tensor& values, const at::Tensor& h_attn,
                       const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add) {
  check_int32(g);
  const auto acc = accumulation_type(values.scalar_type());
  const auto src = as_channels_last(values), h = attn_taps_last(h_attn);
  const int64_t rows = kGradFeatures ? g.H : g.Ho, cols = kGradFeatures ? g.W : g.Wo;
  auto dst = at::empty({g.B, g.C, rows, cols}, src.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dst.numel() > 0) {
    dispatch(src.scalar_type(), g.K, vectors_fit(g, {&src, &dst}), [&]<typename T, int KT, int V>() {
      using A = acc_of<T>;
      const auto m = ghost_table(ghost_mul, g, acc), a = ghost_table(ghost_add, g, acc);
      GatherArgs<T> args{};
      args.geometry = geometry32(g);
      args.channels_per_group = int(g.C / g.G);
      args.channel_vectors = int(g.C / V);
      args.dilation_div_stride = int(g.dilation / g.stride);
      args.dilation_mod_stride = int(g.dilation % g.stride);
      args.narrow_offsets = narrow_offsets(g, src, h);
      args.source = global_ptr<const T>(src, kGradFeatures ? "grad_out" : "features");
      args.source_strides = strides_of(src);
      args.attention = global_ptr<const T>(h, "attention");
      args.attention_strides = attn_strides_of(h);
      args.ghost_mul = global_ptr<const A>(m, "ghost_mul table");
      args.ghost_mul_batch_stride = table_batch_stride(m, g);
      args.ghost_add = global_ptr<const A>(a, "ghost_add table");
      args.ghost_add_batch_stride = table_batch_stride(a, g);
      args.destination = global_ptr<T>(dst, kGradFeatures ? "grad features" : "output");
      args.destination_strides = strides_of(dst);
      // The ghost kernels' presence is compiled in, so that m * w + a is one FFMA and an absent term is free.
      auto launch = [&]<bool kMul, bool kAdd>() {
        run.template gather<T, KT, V, kGradFeatures, kMul, kAdd>(args, int(g.B * rows));
      };
      if (m.defined() && a.defined()) {
        launch.template operator()<true, true>();
      } else if (m.defined()) {
        launch.template operator()<true, false>();
      } else if (a.defined()) {
        launch.template operator()<false, true>();
      } else {
        launch.template operator()<false, false>();
      }
    });
  }
  return to_caller_layout(dst, is_channels_last(values));
}

template <class Runner>
at::Tensor forward_impl(Runner& run, const at::Tensor& features, const at::Tensor& h_attn,
                        const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                        int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_forward_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
  return gather_impl<false>(run, g, features, h_attn, ghost_mul, ghost_add);
}

template <class Runner>
at::Tensor backward_features_impl(Runner& run, const at::Tensor& grad_out, const at::Tensor& h_attn,
                                  const std::optional<at::Tensor>& ghost_mul,
                                  const std::optional<at::Tensor>& ghost_add, int64_t height, int64_t width,
                                  int64_t kernel_size, int64_t dilation, int64_t stride) {
  const auto g = check_backward_features_args(grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size,
                                              dilation, stride);
  return gather_impl<true>(run, g, grad_out, h_attn, ghost_mul, ghost_add);
}

// How the attention/ghost pass splits its work (see attn_ghost_block).
struct AttnGhostPlan {
  int chunk_vectors, chunk_taps;     // channel vectors and taps per chunk of a head
  int channel_chunks, tap_chunks;    // chunks along the head's channel vectors and taps
  int step_pixels;                   // run slots per step
  int tiles_per_image, tile_pixels;  // tiles of an image, run slots per tile
};

inline AttnGhostPlan plan_attn_ghost(const Geometry<int64_t>& g, int V, int64_t acc_size) {
  AttnGhostPlan p{};
  const int cv = int(g.C / g.G / V), kk = int(g.taps());
  // Largest divisor of the head's channel vectors with chunk_vectors * min(K*K, ...) pairs within kMaxPairs.
  p.chunk_vectors = 1;
  for (int d = 1; d <= cv; ++d)
    if (cv % d == 0 && int64_t(d) * std::min(kk, kMaxPairs) <= kMaxPairs) p.chunk_vectors = d;
  p.chunk_taps = std::min(kk, kMaxPairs / p.chunk_vectors);
  p.channel_chunks = cv / p.chunk_vectors;
  p.tap_chunks = (kk + p.chunk_taps - 1) / p.chunk_taps;
  // Shared memory for the step's weighted sums: at most 32 KiB, for one run of pixels or more (kMaxPairs pairs of
  // 8-byte sums and their padding to an odd stride, at most 2 * kMaxPairs slots, take 32 KiB at 4 run slots).
  p.step_pixels = int(
      std::clamp<int64_t>(32768 / (int64_t(attn_ghost_sum_stride(p.chunk_vectors)) * p.chunk_taps * acc_size), 1, 8));
  p.step_pixels = std::max(p.step_pixels / kRunPixels, 1) * kRunPixels;
  // About 4096 blocks in all, each tile a multiple of P run slots. The split depends only on the shapes, so
  // the reduction order, and with it every bit of the result, is the same on every run and GPU.
  const int64_t plane = g.Ho * attn_ghost_row_slots(g),
                others = std::max<int64_t>(1, g.B * g.G * p.channel_chunks * p.tap_chunks);
  const int64_t want =
      std::clamp<int64_t>((4096 + others - 1) / others, 1, (plane + p.step_pixels - 1) / p.step_pixels);
  const int64_t per_tile = ((plane + want - 1) / want + p.step_pixels - 1) / p.step_pixels * p.step_pixels;
  p.tile_pixels = int(per_tile);
  p.tiles_per_image = int((plane + per_tile - 1) / per_tile);
  TORCH_CHECK(plane + per_tile < (int64_t(1) << 31), "elsa (CUDA): an output grid of ", g.Ho, "x", g.Wo,
              " pixels needs pixel indices beyond 32 bits; use a smaller image or the CPU operator");
  return p;
}

// Gradients of the attention (in the features' dtype) and of the ghost kernels (in the accumulation type:
// float32 under half or bfloat16). One not asked for is an empty tensor.
template <class Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_attn_ghost_impl(
    Runner& run, const at::Tensor& grad_out, const at::Tensor& features, const std::optional<at::Tensor>& h_attn,
    const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size, int64_t dilation, int64_t stride,
    bool need_attn, bool need_mul, bool need_add, bool mul_batched, bool add_batched) {
  const auto g = check_backward_attn_ghost_args(grad_out, features, h_attn, ghost_mul, groups, kernel_size, dilation,
                                                stride, need_mul);
  check_int32(g);
  const auto acc = accumulation_type(features.scalar_type());
  auto go = as_channels_last(grad_out), x = as_channels_last(features);
  auto h = need_mul ? attn_taps_last(*h_attn) : at::Tensor();
  // The kernel steps from one pixel of a run to the next with 32-bit offsets: a view whose column step does
  // not fit (a rare strided view) is copied to the compact layout, where the steps are C, stride * C (below
  // W * C when there are two output columns) and G * K * K. With one output column no step reaches a pixel.
  const auto run_steps_fit = [&] {
    constexpr int64_t lim = int64_t(1) << 31;
    return g.Wo == 1 || (go.stride(3) < lim && g.stride * x.stride(3) < lim && (!h.defined() || h.stride(4) < lim));
  };
  if (!run_steps_fit()) {
    go = compact_channels_last(go);
    x = compact_channels_last(x);
    if (h.defined()) h = compact_taps_last(h);
    TORCH_CHECK(run_steps_fit(), "elsa (CUDA): a stride of ", g.stride, " over ", g.C,
                " channels needs offsets beyond 32 bits; use the CPU operator");
  }
  const auto empty = at::empty({0}, x.options());
  auto gh = need_attn ? at::empty({g.B, g.Ho, g.Wo, g.G, g.taps()}, x.options()) : empty;
  at::Tensor gm, ga;
  std::tie(gm, ga) = empty_ghost_grads(g, mul_batched, add_batched, need_mul, need_add, x.options().dtype(acc));
  if (!need_attn && !need_mul && !need_add) return {empty, gm, ga};
  const int V = vectors_fit(g, {&go, &x}) ? full_vector(x.scalar_type()) : 1;
  const auto plan = plan_attn_ghost(g, V, c10::elementSize(acc));
  const int64_t tiles = g.B * plan.tiles_per_image;
  TORCH_CHECK(
      tiles < (int64_t(1) << 31) && g.G <= kMaxGridY && int64_t(plan.channel_chunks) * plan.tap_chunks <= kMaxGridY,
      "elsa (CUDA): too many heads or blocks for one launch");
  auto part_opts = x.options().dtype(acc);
  const auto part_mul = need_mul ? at::empty({tiles, g.taps(), g.C}, part_opts) : at::Tensor();
  const auto part_add = need_add ? at::empty({tiles, g.taps(), g.C}, part_opts) : at::Tensor();
  const auto gh_part =
      need_attn && plan.channel_chunks > 1 ? at::empty({plan.channel_chunks, gh.numel()}, part_opts) : at::Tensor();
  dispatch(x.scalar_type(), g.K, V > 1, [&]<typename T, int KT, int VV>() {
    using A = acc_of<T>;
    const auto m = need_attn ? ghost_table(ghost_mul, g, acc) : at::Tensor();
    AttnGhostArgs<T> args{};
    args.geometry = geometry32(g);
    args.channels_per_group = int(g.C / g.G);
    args.grad_out = global_ptr<const T>(go, "grad_out");
    args.grad_out_strides = strides_of(go);
    args.features = global_ptr<const T>(x, "features");
    args.feature_strides = strides_of(x);
    args.attention = need_mul ? global_ptr<const T>(h, "attention") : Global<const T>(nullptr);
    args.attention_strides = need_mul ? attn_strides_of(h) : AttentionStrides{};
    args.ghost_mul = global_ptr<const A>(m, "ghost_mul table");
    args.ghost_mul_batch_stride = table_batch_stride(m, g);
    args.grad_attention =
        need_attn && plan.channel_chunks == 1 ? global_ptr<T>(gh, "grad attention") : Global<T>(nullptr);
    args.grad_attention_partials = global_ptr<A>(gh_part, "grad attention partials");
    args.ghost_mul_partials = global_ptr<A>(part_mul, "ghost_mul partials");
    args.ghost_add_partials = global_ptr<A>(part_add, "ghost_add partials");
    args.tiles_per_image = plan.tiles_per_image;
    args.tile_pixels = plan.tile_pixels;
    args.step_pixels = plan.step_pixels;
    args.chunk_vectors = plan.chunk_vectors;
    args.chunk_taps = plan.chunk_taps;
    args.channel_chunks = plan.channel_chunks;
    if (tiles > 0) run.template attn_ghost<T, KT, VV>(args, int(tiles));
    if (gh_part.defined() && gh.numel() > 0)
      run.template chunk_sum<T>(ChunkSumArgs<T>{global_ptr<const A>(gh_part, "grad attention partials"),
                                                global_ptr<T>(gh, "grad attention"), gh.numel(), plan.channel_chunks});
    for (auto [need, batched, part, out] :
         {std::tuple{need_mul, mul_batched, &part_mul, &gm}, std::tuple{need_add, add_batched, &part_add, &ga}}) {
      if (!need) continue;
      const int64_t units = batched ? g.B : 1;
      // (An empty batch has no tiles: a broadcast kernel's gradient is then a sum of nothing, 0.)
      const GhostReduceArgs<A> r{tiles > 0 ? global_ptr<const A>(*part, "ghost partials") : Global<const A>(nullptr),
                                 global_ptr<A>(*out, "ghost gradient"),
                                 units,
                                 batched ? plan.tiles_per_image : tiles,
                                 g.taps(),
                                 g.C};
      TORCH_CHECK(ghost_reduce_blocks(out->numel()) < (int64_t(1) << 31),
                  "elsa (CUDA): too many ghost kernel weights for one launch");
      if (out->numel() > 0) run.template ghost_reduce<A>(r, out->numel());
    }
  });
  // The attention gradient in the layout a channels-last model makes its attention, else NCHW-like.
  const auto gh_view = need_attn ? gh.permute({0, 3, 4, 1, 2}) : gh;
  return {need_attn ? to_caller_layout(gh_view, is_channels_last(features)) : gh_view, gm, ga};
}

}  // namespace elsa_op::gpu
