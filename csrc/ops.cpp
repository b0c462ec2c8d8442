// The compiled extension fastssl._C: one binding per kernel. The GIL is released while a kernel
// runs, so Python threads (data loaders, other streams) are not blocked by it.
#include <torch/extension.h>

#include "ops.h"
#include "tiles.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastssl C++ kernels (CPU)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  auto nogil = py::call_guard<py::gil_scoped_release>();
  // csrc/tiles.h: whether bf16 kernels may multiply their tiles with bf16 dot products
  m.def("bf16_dots_enabled", &fastssl::Bf16Dots::enabled);
  m.def("bf16_micro_kernels", &fastssl::TileProducts::available);
  m.def("ntxent_lse_fwd_cpu", &ntxent_lse_fwd_cpu, nogil);
  m.def("ntxent_lse_bwd_cpu", &ntxent_lse_bwd_cpu, nogil);
  m.def("masking_rank_cpu", &masking_rank_cpu, nogil);
  m.def("masking_gather_cpu", &masking_gather_cpu, nogil);
  m.def("masking_unshuffle_cpu", &masking_unshuffle_cpu, nogil);
  m.def("masked_mse_fwd_cpu", &masked_mse_fwd_cpu, nogil);
  m.def("pgd_step_cpu", &pgd_step_cpu, nogil);
#ifdef WITH_CUDA
  m.def("pgd_step_cuda", &pgd_step_cuda, nogil);
#endif
  m.def("mochi_mix_fwd_cpu", &mochi_mix_fwd_cpu, nogil);
  m.def("mochi_mix_bwd_cpu", &mochi_mix_bwd_cpu, nogil);
  m.def("mochi_hard_set_cpu", &mochi_hard_set_cpu, nogil);
  m.def("mochi_queue_rows_cpu", &mochi_queue_rows_cpu, nogil);
  m.def("row_scales_cpu", &row_scales_cpu, nogil);
  m.def("info_nce_lse_fwd_cpu", &info_nce_lse_fwd_cpu, nogil);
  m.def("info_nce_lse_bwd_cpu", &info_nce_lse_bwd_cpu, nogil);
  m.def("dino_teacher_lse_cpu", &dino_teacher_lse_cpu, nogil);
  m.def("dino_sinkhorn_sums_cpu", &dino_sinkhorn_sums_cpu, nogil);
  m.def("dino_sinkhorn_cpu", &dino_sinkhorn_cpu, nogil);
  m.def("dino_loss_fwd_cpu", &dino_loss_fwd_cpu, nogil);
  m.def("dino_loss_bwd_cpu", &dino_loss_bwd_cpu, nogil);
  m.def("siglip_fwd_cpu", &siglip_fwd_cpu, nogil);
  m.def("siglip_bwd_cpu", &siglip_bwd_cpu, nogil);
  m.def("siglip_fused_cpu", &siglip_fused_cpu, nogil);
  m.def("kmeans_pp_step_cpu", &kmeans_pp_step_cpu, nogil);
  m.def("knn_search_cpu", &knn_search_cpu, nogil);
  m.def("knn_bf16_dots_supported", &knn_bf16_dots_supported);
}
