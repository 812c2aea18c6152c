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
#define __align__(n) __attribute__((aligned(n)))
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

// f16 storage on the host: IEEE binary16, rounded to nearest even as __float2half rounds,
// subnormals kept, NaN kept quiet.
struct __half {
  uint16_t x;
};
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal: exact
    return sign ? -f : f;
  }
  const uint32_t u = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  if (a >= 0x38800000u) {  // normal in f16 (or overflowing to infinity)
    if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};
    uint32_t m = a - 0x38000000u;  // rebias the exponent from 127 to 15
    m += 0xfffu + ((m >> 13) & 1u);
    return __half{static_cast<uint16_t>(sign | (m >> 13))};
  }
  float af;
  std::memcpy(&af, &a, 4);
  // Subnormal: units of 2^-24, rounded to nearest even (the default rounding mode).
  return __half{static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)))};
}

// Warp-collective operations, through the emulator's per-warp exchange.
namespace reel_emu_detail {
template <class T>
struct ShflSlot {
  T value;
  int src;
};
template <class T>
inline T shfl(unsigned mask, T v, int src, int width, int mode) {
  static_assert(sizeof(ShflSlot<T>) <= reel_emu::kSlotBytes, "shuffle of a type larger than a slot");
  const int lane = static_cast<int>(reel_emu::lane_id());
  const int base = lane & ~(width - 1);
  int from;
  switch (mode) {
    case 0: from = base + (src & (width - 1)); break;                                     // idx
    case 1: from = (lane - base) >= src ? lane - src : lane; break;                       // up
    case 2: from = (lane - base) + src < width ? lane + src : lane; break;                // down
    default: from = ((lane ^ src) & ~(width - 1)) == base ? lane ^ src : lane; break;     // xor
  }
  ShflSlot<T> mine{v, from};
  const unsigned char* slots = reel_emu::warp_exchange(&mine, sizeof mine, mask);
  ShflSlot<T> got;
  std::memcpy(&got, slots + from * reel_emu::kSlotBytes, sizeof got);
  return got.value;
}
inline unsigned ballot(unsigned mask, int pred) {
  const unsigned char* slots = reel_emu::warp_exchange(&pred, sizeof pred, mask);
  const unsigned need = mask & reel_emu::warp_lanes();
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) {
    int p;
    std::memcpy(&p, slots + l * reel_emu::kSlotBytes, sizeof p);
    if (((need >> l) & 1u) && p) out |= 1u << l;
  }
  return out;
}
}  // namespace reel_emu_detail
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return reel_emu_detail::shfl(mask, v, src, width, 0); }
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return reel_emu_detail::shfl(mask, v, static_cast<int>(d), width, 1); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return reel_emu_detail::shfl(mask, v, static_cast<int>(d), width, 2); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return reel_emu_detail::shfl(mask, v, m, width, 3); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return reel_emu_detail::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return reel_emu_detail::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return reel_emu_detail::ballot(mask, pred) == (mask & reel_emu::warp_lanes()); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { reel_emu::warp_exchange(nullptr, 0, mask); }

// Atomics: fibers never preempt one another and a launch runs on one OS thread, so plain
// read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <class T>
inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <class T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

// Host versions of the math intrinsics the kernels use.
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }

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
#include <stdint.h>
#include <string.h>
#include <cuda_fp16.h>
#define REEL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define REEL_EMU_EXPORT(name, Args, ...)
#endif
