// Portability header: every kernel includes only this. Under nvcc it is plain CUDA; compiled
// for the host with -DREEL_EMU it maps the CUDA execution model onto the SIMT emulator
// (kernels/emu): threadIdx and friends follow the running fiber, __syncthreads() is the
// block barrier, __shared__ is static thread_local (blocks of a launch run one at a time on
// one OS thread).
#pragma once

#ifdef REEL_EMU
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../emu/emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static thread_local
#define threadIdx (reel_emu::thread_idx())
#define blockIdx (reel_emu::block_idx())
#define blockDim (reel_emu::block_dim())
#define gridDim (reel_emu::grid_dim())
#define __syncthreads() reel_emu::sync_threads()
#define REEL_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(reel_emu::dynamic_shared())

// bf16 storage on the host: the bits of the upper half of an f32, rounded to nearest even
// (as __float2bfloat16 rounds), NaN kept quiet.
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// Host versions of the math intrinsics the kernels use.
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }

// Defines extern "C" reel_emu_<name>(grid, block, shared_bytes, Args*) calling the kernel
// with the fields of Args (a struct the .cu declares, mirrored #[repr(C)] in Rust).
#define REEL_EMU_EXPORT(name, Args, ...)                                                        \
  extern "C" void reel_emu_##name(dim3 grid, dim3 block, size_t shared, const Args* a) {       \
    struct Call {                                                                               \
      static void run(void* p) {                                                                \
        const Args& a = *static_cast<const Args*>(p);                                           \
        name(__VA_ARGS__);                                                                      \
      }                                                                                         \
    };                                                                                          \
    reel_emu::launch(grid, block, shared, &Call::run, const_cast<Args*>(a));                    \
  }
#else
#include <cuda_bf16.h>
#define REEL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define REEL_EMU_EXPORT(name, Args, ...)
#endif
