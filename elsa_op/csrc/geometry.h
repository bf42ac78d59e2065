// The geometry of one ELSA call, one struct for the schema checks, the CPU kernels and the CUDA kernels.
//
// Plain C++ with no library headers, so that the CPU kernels built for other instruction sets, nvcc's
// device code and the host-compiled CUDA emulation all include the same definition. `Index` is int64_t on
// the CPU and on the host; the CUDA kernels use int once the launcher has checked that every in-plane
// coordinate fits in 32 bits (offsets into tensors stay 64-bit there).
//
// The CPU kernels built for AVX2 include this header before they switch the instruction set, so that an
// out-of-line copy of these members, which the linker may share between builds, is always baseline code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ELSA_HOST_DEVICE __host__ __device__
#else
#define ELSA_HOST_DEVICE
#endif

namespace elsa_op {

template <typename Index>
struct Geometry {
  Index B, C, H, W;  // batch, channels, input height and width
  Index G;           // attention groups (heads): C / G neighbouring channels share one attention map
  Index K;           // window size, odd: K * K taps centred on the output pixel
  Index dilation;    // spacing between taps, in input pixels
  Index stride;      // spacing between output pixels, in input pixels
  Index Ho, Wo;      // output height and width, (H - 1) / stride + 1 and (W - 1) / stride + 1

  ELSA_HOST_DEVICE Index radius() const { return K / 2; }
  ELSA_HOST_DEVICE Index taps() const { return K * K; }
  ELSA_HOST_DEVICE Index channels_per_group() const { return C / G; }

  // The same geometry in another index type; the caller has checked that every value fits.
  template <typename To>
  ELSA_HOST_DEVICE Geometry<To> as() const {
    return Geometry<To>{To(B), To(C), To(H), To(W), To(G), To(K), To(dilation), To(stride), To(Ho), To(Wo)};
  }
};

// Where the pixels of a channels-last tensor lie: element strides from one image, row or column to the
// next (channels are unit-stride). The kernels take them as they come, so that a channel slice of a wider
// tensor (the q/k/v projection of a channels-last model) is read in place.
struct PixelStrides {
  int64_t batch, row, column;
};

}  // namespace elsa_op
