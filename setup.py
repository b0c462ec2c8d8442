"""Builds the C++ extension fastssl._C; all other metadata lives in pyproject.toml.

Every csrc/*.cpp and csrc/cpu/*.cpp is compiled. csrc/cuda/*.cu is added when torch was built
with CUDA and nvcc is found (CUDA_HOME); set FASTSSL_NO_CUDA=1 to skip it.
"""

import os
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

root = Path(__file__).parent
sources = sorted(str(p.relative_to(root)) for p in [*root.glob("csrc/*.cpp"), *root.glob("csrc/cpu/*.cpp")])
cuda_sources = sorted(str(p.relative_to(root)) for p in root.glob("csrc/cuda/*.cu"))
with_cuda = (
    bool(cuda_sources)
    and cpp_extension.CUDA_HOME is not None
    and __import__("torch").version.cuda is not None
    and os.environ.get("FASTSSL_NO_CUDA") != "1"
)

# OpenMP: at::parallel_for is inlined from ATen's headers, so without -fopenmp it runs serially.
# -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC does
# not turn the selects of the branch-free row loops (csrc/cpu/vec_math.h) into vector blends, so
# those loops stay scalar. Values are unchanged (no reassociation: that would be -ffast-math).
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
link_flags = ["-fopenmp"]
if with_cuda:
    ext = cpp_extension.CUDAExtension(
        "fastssl._C",
        sources + cuda_sources,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
        extra_link_args=link_flags,
    )
else:
    ext = cpp_extension.CppExtension(
        "fastssl._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )

setup(ext_modules=[ext], cmdclass={"build_ext": cpp_extension.BuildExtension})
