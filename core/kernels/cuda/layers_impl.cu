// The one instance of the CUDA backend's layers.
#include "core/kernels/cuda/layers_impl.h"

namespace q3vl {

const CudaLayers& cuda_layers() {
  static const cuda::CudaLayersImpl impl;
  return impl;
}

}  // namespace q3vl
