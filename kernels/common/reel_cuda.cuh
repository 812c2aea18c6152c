// Portability header: every kernel includes only this (and reel_mma.cuh). Under nvcc it is
// plain CUDA; compiled for the host with -DREEL_EMU it maps the CUDA execution model onto
// the SIMT emulator (kernels/emu): threadIdx and friends follow the running fiber,
// __syncthreads() is the block barrier, shared memory is a per-block window the emulator
// poisons before every block.
//
// Rules for kernels (the emulator enforces what it can):
// - shared memory through REEL_SHARED(type, name, [dims]) (REEL_SHARED_ALIGNED for an
//   alignment) and REEL_DYNAMIC_SHARED(type, name); a bare __shared__ does not compile under
//   REEL_EMU;
// - every launchable kernel is `extern "C" __global__` and followed by REEL_EMU_EXPORT(name),
//   which makes the emulator's entry point and exports the parameter layout the Rust launcher
//   is checked against;
// - tensor-core, ldmatrix and async-copy PTX only through the wrappers of reel_mma.cuh.
#pragma once

#ifdef REEL_EMU
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../emu/emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ _Pragma("GCC error \"use REEL_SHARED(type, name, [dims]) for shared memory: the emulator poisons it per block\"")
#define threadIdx (reel_emu::thread_idx())
#define blockIdx (reel_emu::block_idx())
#define blockDim (reel_emu::block_dim())
#define gridDim (reel_emu::grid_dim())
constexpr int warpSize = 32;

// Shared memory: a static variable is carved from the block's window (poisoned) the first
// time a thread of the block reaches its declaration; sizeof works as for an array.
namespace reel_emu_detail {
template <class T, size_t Align>
inline T& shared_var(const void* site) {
  return *static_cast<T*>(reel_emu::static_shared(site, sizeof(T), Align > alignof(T) ? Align : alignof(T)));
}
}  // namespace reel_emu_detail
#define REEL_SHARED_ALIGNED(align, type, name, dims)         \
  static const char name##_reel_site = 0;                    \
  auto& name = reel_emu_detail::shared_var<type dims, align>(&name##_reel_site)
#define REEL_SHARED(type, name, dims) REEL_SHARED_ALIGNED(1, type, name, dims)
#define REEL_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(reel_emu::dynamic_shared())

// Barriers.
#define __syncthreads() reel_emu::sync_threads()
inline int __syncthreads_count(int pred) { return reel_emu::barrier(0, 0, 1, pred); }
inline int __syncthreads_and(int pred) { return reel_emu::barrier(0, 0, 2, pred); }
inline int __syncthreads_or(int pred) { return reel_emu::barrier(0, 0, 3, pred); }
// Memory fences: fibers of one OS thread see each other's writes at once.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// Integer intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __activemask() { return reel_emu::active_lanes(); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// Vector types, with CUDA's alignment.
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// bf16 storage on the host: the bits of the upper half of an f32, rounded to nearest even
// (as __float2bfloat16 rounds), NaN kept quiet.
struct __align__(2) __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return reel_emu::bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
// A pair of bf16 (x the low half, as in a 32-bit register).
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }

// f16 storage on the host: IEEE binary16, rounded to nearest even as __float2half rounds,
// subnormals kept, NaN kept quiet.
struct __align__(2) __half {
  uint16_t x;
};
inline float __half2float(__half h) { return reel_emu::f16_bits_to_float(h.x); }
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
inline __half __float2half_rn(float f) { return __float2half(f); }
// A pair of f16 (x the low half).
struct __align__(4) __half2 {
  __half x, y;
};
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }

// Warp-collective operations, through the emulator's per-warp exchange.
namespace reel_emu_detail {
template <class T>
struct ShflSlot {
  T value;
};
// shfl.sync as the PTX ISA defines it, with the c operand CUDA's __shfl*_sync pass:
// segmask = 32 - width, clamp 0 for up and 31 otherwise.
//   maxLane = (lane & segmask) | (clamp & ~segmask), minLane = lane & segmask
//   up: j = lane - b, ok = j >= maxLane      down: j = lane + b, ok = j <= maxLane
//   bfly: j = lane ^ b, ok = j <= maxLane    idx: j = minLane | (b & ~segmask), ok = j <= maxLane
//   (b is the low 5 bits of the lane operand); when !ok the lane keeps its own value. A source
//   lane outside the mask gives an undefined value: here the poison pattern.
template <class T>
inline T shfl(unsigned mask, T v, unsigned b, int width, int mode) {
  static_assert(sizeof(ShflSlot<T>) <= reel_emu::kSlotBytes, "shuffle of a type larger than a slot");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    reel_emu::fault("shuffle width %d is not a power of two in 1..32", width);
  const int lane = static_cast<int>(reel_emu::lane_id());
  const int segmask = (32 - width) & 31;
  const int clamp = mode == 1 ? 0 : 31;
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  const int bval = static_cast<int>(b & 31u);
  int j;
  bool ok;
  switch (mode) {
    case 0: j = min_lane | (bval & ~segmask); ok = j <= max_lane; break;  // idx
    case 1: j = lane - bval; ok = j >= max_lane; break;                   // up
    case 2: j = lane + bval; ok = j <= max_lane; break;                   // down
    default: j = lane ^ bval; ok = j <= max_lane; break;                  // bfly (xor)
  }
  if (!ok) j = lane;
  ShflSlot<T> mine{v};
  const unsigned char* slots = reel_emu::warp_exchange(&mine, sizeof mine, mask);
  ShflSlot<T> got;
  std::memcpy(&got, slots + j * reel_emu::kSlotBytes, sizeof got);
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
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return reel_emu_detail::shfl(mask, v, static_cast<unsigned>(src), width, 0);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return reel_emu_detail::shfl(mask, v, d, width, 1); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return reel_emu_detail::shfl(mask, v, d, width, 2); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return reel_emu_detail::shfl(mask, v, static_cast<unsigned>(m), width, 3);
}
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

// The emulator's entry point for a kernel, taking its parameters as cuLaunchKernel does (an
// array of pointers to each), and the parameter layout (size, alignment, offset in the
// parameter buffer, kind) that the Rust launcher's argument struct is checked against.
namespace reel_emu_detail {
template <class... P, size_t... I>
inline void invoke(void (*f)(P...), void** params, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<P>*>(params[I])...);
}
template <class... P>
inline void invoke(void (*f)(P...), void** params) {
  invoke(f, params, std::index_sequence_for<P...>{});
}
template <class T>
constexpr uint32_t param_kind() {
  return std::is_pointer<T>::value          ? 'p'
         : std::is_floating_point<T>::value ? 'f'
         : std::is_integral<T>::value       ? (std::is_signed<T>::value ? 'i' : 'u')
                                            : 's';
}
template <class... P>
inline int param_layout(void (*)(P...), reel_emu::ParamInfo* out, int cap) {
  const reel_emu::ParamInfo info[] = {{static_cast<uint32_t>(sizeof(P)), static_cast<uint32_t>(alignof(P)), 0,
                                       param_kind<std::remove_cv_t<P>>()}...,
                                      {0, 1, 0, 0}};
  constexpr int n = sizeof...(P);
  uint32_t off = 0;
  for (int i = 0; i < n && i < cap; ++i) {
    off = (off + info[i].align - 1) / info[i].align * info[i].align;
    out[i] = info[i];
    out[i].offset = off;
    off += info[i].size;
  }
  return n;
}
}  // namespace reel_emu_detail
#define REEL_EMU_EXPORT(name)                                                                      \
  extern "C" int reel_emu_##name(const reel_emu::LaunchConfig* cfg, void** params) {               \
    struct Call {                                                                                  \
      static void run(void* p) { reel_emu_detail::invoke(&name, static_cast<void**>(p)); }         \
    };                                                                                             \
    return reel_emu::launch(#name, *cfg, &Call::run, params);                                     \
  }                                                                                                \
  extern "C" int reel_emu_params_##name(reel_emu::ParamInfo* out, int cap) {                       \
    return reel_emu_detail::param_layout(&name, out, cap);                                        \
  }
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>
#include <string.h>
#define REEL_SHARED_ALIGNED(align, type, name, dims) __shared__ __align__(align) type name dims
#define REEL_SHARED(type, name, dims) __shared__ type name dims
#define REEL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(1024) type name[]
#define REEL_EMU_EXPORT(name)
#endif

// Named barrier `id` (1..15; 0 is __syncthreads's) for `threads` threads, a multiple of 32:
// bar.sync id, threads.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned threads) {
#ifdef REEL_EMU
  reel_emu::barrier(id, threads, 0, 0);
#else
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
#endif
}

// Storage types kernels are written over (bf16 or f16, f32 math): Num<T>::to / from convert
// one value, pair / unpair two (as packed in a 32-bit register, low element first).
template <class T>
struct Num;
template <>
struct Num<__nv_bfloat16> {
  typedef __nv_bfloat162 T2;
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float f) { return __float2bfloat16(f); }
  static __device__ __forceinline__ T2 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 unpair(T2 v) { return __bfloat1622float2(v); }
};
template <>
struct Num<__half> {
  typedef __half2 T2;
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ T2 pair(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 unpair(T2 v) { return __half22float2(v); }
};
template <>
struct Num<float> {
  typedef float2 T2;
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float f) { return f; }
  static __device__ __forceinline__ T2 pair(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ float2 unpair(T2 v) { return v; }
};

