// The ELSA operator on CPU tensors: layouts, dtypes and threads around the kernels of kernels.h.
//
// A channels-last model hands over its values as channel slices of the q/k/v projection and its attention
// as [B, Ho, Wo, G, K*K] memory straight from the softmax; both are read in place. Half and bfloat16 are
// computed in float.
#include "launch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"

namespace elsa_op::cpu {
namespace {

// Features or gradients with unit channel stride, in the compute type; copied only when they are not.
at::Tensor as_channels_last(const at::Tensor& t, at::ScalarType type) {
  auto r = t.to(type);
  return r.stride(1) == 1 ? r : r.contiguous(at::MemoryFormat::ChannelsLast);
}

// [B, G, K*K, Ho, Wo] attention as contiguous [B, Ho, Wo, G, K*K].
at::Tensor attn_taps_last(const at::Tensor& h, at::ScalarType type) {
  return h.to(type).permute({0, 3, 4, 1, 2}).contiguous();
}

// (C, K, K) or (B, C, K, K) ghost kernels as [K*K, C] tables, one per batch element when batched.
at::Tensor ghost_table(const std::optional<at::Tensor>& t, const Geometry<int64_t>& g, at::ScalarType type) {
  if (!t) return at::Tensor();
  const auto flat = t->to(type).reshape({t->dim() == 4 ? g.B : 1, g.C, g.taps()});
  return flat.transpose(1, 2).contiguous();
}

PixelStrides pixel_strides(const at::Tensor& t) {
  return PixelStrides{t.stride(0), t.stride(2), t.stride(3)};
}

// `in` on the features' grid, `out` on the output's.
GridStrides grid_strides(const at::Tensor& in, const at::Tensor& out) {
  return GridStrides{pixel_strides(in), pixel_strides(out)};
}

template <typename T>
Ghost<T> ghost_of(const at::Tensor& m, const at::Tensor& a, const Geometry<int64_t>& g) {
  const auto batch_stride = [&](const at::Tensor& t) { return t.defined() && t.size(0) > 1 ? g.taps() * g.C : 0; };
  return Ghost<T>{m.defined() ? m.const_data_ptr<T>() : nullptr, batch_stride(m),
                  a.defined() ? a.const_data_ptr<T>() : nullptr, batch_stride(a)};
}

// About 32k multiply-adds per task.
int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

}  // namespace

namespace {

// Forward and grad-features are one weighted gather that runs in opposite directions: from features to
// the output grid, or from grad_out back to the feature grid.
at::Tensor weighted_gather(const Geometry<int64_t>& g, const at::Tensor& values, const at::Tensor& h_attn,
                           const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                           bool grad_x) {
  const auto type = accumulation_type(values.scalar_type());
  const auto v = as_channels_last(values, type), h = attn_taps_last(h_attn, type);
  const auto m = ghost_table(ghost_mul, g, type), a = ghost_table(ghost_add, g, type);
  const int64_t rows = grad_x ? g.H : g.Ho, cols = grad_x ? g.W : g.Wo;
  auto result = at::empty({g.B, g.C, rows, cols}, v.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto strides = grad_x ? grid_strides(result, v) : grid_strides(v, result);
  AT_DISPATCH_FLOATING_TYPES(type, "elsa_weighted_gather_cpu", [&] {
    const auto& kernels = selected_kernels<scalar_t>();
    const auto kernel = grad_x ? kernels.grad_features : kernels.forward;
    const auto ghost = ghost_of<scalar_t>(m, a, g);
    at::parallel_for(0, g.B * rows, grain_for(cols * g.C * g.taps()), [&](int64_t begin, int64_t end) {
      kernel(g, strides, v.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), ghost,
             result.mutable_data_ptr<scalar_t>(), begin, end);
    });
  });
  return result.to(values.scalar_type());
}

}  // namespace

at::Tensor launch_forward(const Geometry<int64_t>& g, const at::Tensor& features, const at::Tensor& h_attn,
                          const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add) {
  return weighted_gather(g, features, h_attn, ghost_mul, ghost_add, false);
}

at::Tensor launch_backward_features(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& h_attn,
                                    const std::optional<at::Tensor>& ghost_mul,
                                    const std::optional<at::Tensor>& ghost_add) {
  return weighted_gather(g, grad_out, h_attn, ghost_mul, ghost_add, true);
}

at::Tensor launch_backward_attn(const Geometry<int64_t>& g, const at::Tensor& grad_out, const at::Tensor& features,
                                const std::optional<at::Tensor>& ghost_mul) {
  const auto type = accumulation_type(features.scalar_type());
  const auto go = as_channels_last(grad_out, type), x = as_channels_last(features, type);
  const auto m = ghost_table(ghost_mul, g, type);
  auto gh = at::empty({g.B, g.Ho, g.Wo, g.G, g.taps()}, x.options());
  const auto strides = grid_strides(x, go);
  AT_DISPATCH_FLOATING_TYPES(type, "elsa_backward_attn_cpu", [&] {
    const auto& kernels = selected_kernels<scalar_t>();
    const auto ghost = ghost_of<scalar_t>(m, at::Tensor(), g);
    at::parallel_for(0, g.B * g.Ho, grain_for(g.Wo * g.C * g.taps()), [&](int64_t begin, int64_t end) {
      kernels.grad_attn(g, strides, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ghost.mul,
                        ghost.mul_batch_stride, gh.mutable_data_ptr<scalar_t>(), begin, end);
    });
  });
  return gh.to(features.scalar_type()).permute({0, 3, 4, 1, 2});
}

// Partial sums over fixed tiles of output rows (never split by thread), then a sum of the tiles in order,
// in double: the result does not depend on the number of threads.
std::tuple<at::Tensor, at::Tensor> launch_backward_ghost(const Geometry<int64_t>& g, const at::Tensor& grad_out,
                                                         const at::Tensor& features,
                                                         const std::optional<at::Tensor>& h_attn, bool batched,
                                                         bool need_mul, bool need_add) {
  const auto type = accumulation_type(features.scalar_type());
  const auto go = as_channels_last(grad_out, type), x = as_channels_last(features, type);
  const auto h = need_mul ? attn_taps_last(*h_attn, type) : at::Tensor();
  const int64_t tile_rows = std::max<int64_t>(1, 512 / g.Wo);
  const int64_t tiles_per_image = (g.Ho + tile_rows - 1) / tile_rows, tiles = g.B * tiles_per_image;
  const int64_t table = g.taps() * g.C;
  const auto part_mul = need_mul ? at::zeros({tiles, table}, x.options()) : at::Tensor();
  const auto part_add = need_add ? at::zeros({tiles, table}, x.options()) : at::Tensor();
  const auto strides = grid_strides(x, go);
  const int64_t units = batched ? g.B : 1;
  auto sum_mul = at::empty({need_mul ? units : 0, g.C, g.taps()}, x.options().dtype(at::kDouble));
  auto sum_add = at::empty({need_add ? units : 0, g.C, g.taps()}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(type, "elsa_backward_ghost_cpu", [&] {
    const auto& kernels = selected_kernels<scalar_t>();
    scalar_t* pm = need_mul ? part_mul.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pa = need_add ? part_add.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b = tile / tiles_per_image, row0 = (tile % tiles_per_image) * tile_rows;
        kernels.grad_ghost(g, strides, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                           need_mul ? h.const_data_ptr<scalar_t>() : nullptr, pm ? pm + tile * table : nullptr,
                           pa ? pa + tile * table : nullptr, b, row0, std::min(g.Ho, row0 + tile_rows));
      }
    });
    // sum[u, c, t] = sum of part[tile, t, c] over the tiles of unit u (one image, or all of them).
    // (Not tiles / units: an empty batch of per-image kernels has no units.)
    const int64_t tiles_per_unit = batched ? tiles_per_image : tiles;
    // (Asked for by flag: an empty batch has no tiles, so its parts may have no storage, and its sums are 0.)
    for (auto [needed, part, sum] : {std::tuple{need_mul, pm, &sum_mul}, std::tuple{need_add, pa, &sum_add}}) {
      if (!needed) continue;
      double* dst = sum->mutable_data_ptr<double>();
      at::parallel_for(0, units * table, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t u = e / table, c = (e % table) / g.taps(), t = e % g.taps();
          double total = 0;
          for (int64_t tile = u * tiles_per_unit; tile < (u + 1) * tiles_per_unit; ++tile)
            total += part[tile * table + t * g.C + c];
          dst[e] = total;
        }
      });
    }
  });
  at::Tensor gm, ga;
  std::tie(gm, ga) = empty_ghost_grads(g, batched, batched, need_mul, need_add, features.options().dtype(type));
  if (need_mul) gm.copy_(sum_mul.view(gm.sizes()));
  if (need_add) ga.copy_(sum_add.view(ga.sizes()));
  return {gm, ga};
}

}  // namespace elsa_op::cpu
