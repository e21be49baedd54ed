// Why: Debian's CPU LibTorch ships the c10/cuda headers but not this generated one; the compile-only check of
// Keel's CUDA glue (kernels/CMakeLists.txt, keel_cuda_glue_check) supplies it. Never used by a CUDA LibTorch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
