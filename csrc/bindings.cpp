// Python bindings of the subspace ops and the networks' GroupNorm (module aniso_fast._C). Only aniso_fast/ops calls
// these, after it has validated and prepared the arguments (preconditions in subspace.h and norm.h).
#include <torch/extension.h>

#include "cpu/isa.h"
#include "norm.h"
#include "subspace.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aniso_fast native subspace ops (see csrc/subspace.h for the preconditions)";
  m.def("separable_combine_cpu", &separable_combine_cpu);
  m.def("separable_dot_cpu", &separable_dot_cpu);
  m.def("lowrank_combine_cpu", &lowrank_combine_cpu);
  m.def("lowrank_dot_cpu", &lowrank_dot_cpu);
  m.def("separable_block_combine_cpu", &separable_block_combine_cpu);
  m.def("lowrank_block_combine_cpu", &lowrank_block_combine_cpu);
  m.def("group_norm_nhwc_cpu", &group_norm_nhwc_cpu);
  // The instruction set the CPU kernels use now: the CPU's widest, capped by ANISO_FAST_CPU_ISA (csrc/cpu/isa.h).
  m.def("cpu_isa", [] {
    const Isa isa = best_isa();
    return std::string(isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx ? "avx" : "base");
  });
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("separable_combine_cuda", &separable_combine_cuda);
  m.def("separable_dot_cuda", &separable_dot_cuda);
  m.def("lowrank_combine_cuda", &lowrank_combine_cuda);
  m.def("lowrank_dot_cuda", &lowrank_dot_cuda);
  m.def("separable_block_combine_cuda", &separable_block_combine_cuda);
  m.def("lowrank_block_combine_cuda", &lowrank_block_combine_cuda);
#else
  m.attr("with_cuda") = false;
#endif
}
