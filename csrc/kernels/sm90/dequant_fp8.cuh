// FP8 KV-cache pages for the sm_90a main loop: TMA copies of the FP8 bytes and their in-place dequantisation
// into the same 16-bit, 128B-swizzled K tile the bf16/fp16 kernels read (kernels/sm90/common.cuh), so every
// wgmma after it is the dense kernel's.
//
// Why in place. Shared memory holds Q (72 KB), two 72 KB page tiles and P: 224 KB of the 227 KB a CTA can
// have, so there is no room for a separate FP8 staging buffer. An FP8 page is half a tile (36 KB), so it
// lands inside its own tile and is expanded there:
//   * the FP8 values arrive in boxes of 128 columns x 64 tokens (128 bytes per token row, no swizzle);
//     box j (columns 128 j .. 128 j + 127) lands in column tile 2 j + 1, row r at byte 128 r of that tile;
//   * its expansion, row r of column tiles 2 j and 2 j + 1 (2 x 128 bytes), overwrites only row r of tile
//     2 j + 1, i.e. the very bytes it was read from. The eight lanes of one warp that convert a row read the
//     whole row before any of them writes it (__syncwarp), so no other thread's data is ever overwritten and
//     no barrier is needed;
//   * the last 64 columns (RoPE) of the per-tensor format arrive as a 128-column box whose upper half lies
//     past the tensor's 576 columns: TMA fills it with zeros without reading memory, and the box lands in
//     tile 8, row r expanding onto itself. DeepSeek V3.2's RoPE is already bf16: it is copied straight into
//     tile 8 with the 128B swizzle, like a dense page's, and its four scales per token go to a 1 KB array.
//
// Conversion. e4m3 -> fp16 is one cvt per two values and exact (every e4m3 value is a normal fp16).
// For bf16 tiles the fp16 bit pattern is moved into bf16 positions (sign kept; exponent and the three used
// mantissa bits shifted right by 3), which is the value times 2^-112 as a normal bf16 (zero stays zero), then
// one bf16x2 multiply by 2^112 makes it exact again. V3.2 then multiplies by its group scale in a second
// bf16x2 multiply: exact for power-of-two scales (the format's, and the only ones its quantiser writes), any
// scale bf16 can hold; a scale that is not a power of two is rounded to bf16 first. (One multiply by
// 2^112 * scale would overflow bf16 for scales from 2^16.) The per-tensor k_scale is not applied here: the
// kernel folds it into the softmax scale and the output (kernels/sm90/mainloop_serial.cuh).
// e4m3 NaN (0x7f/0xff) is not preserved on the bf16 path (it becomes a large finite value); the kernels never
// let data of unused slots reach the output (masked logits by index, V tails zeroed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/sm90/common.cuh"

namespace flashmla::sm90 {

constexpr int kTileBytes = kBoxElems * 2;              // one 64 x 64 column tile of 16-bit values
constexpr int kFp8BoxCols = 128;                       // columns (bytes) of one FP8 TMA box
constexpr int kFp8BoxBytes = kFp8BoxCols * kPageSize;  // 8 KB: the size of the 16-bit tile it lands in
constexpr int kV32ScaleBytes = 4 * 4 * kPageSize;      // the four float32 scales of 64 tokens

// Bytes one FP8 page's TMA copies complete on its mbarrier.
template <int kFmt>
constexpr uint32_t fp8_page_tx_bytes() {
  // per-tensor: four 128-column boxes and the RoPE box (a full 128-column box, half of it zero fill);
  // V3.2: four 128-column boxes, the bf16 RoPE tile and the scales.
  return kFmt == kKvFp8Tensor ? 5 * kFp8BoxBytes : 4 * kFp8BoxBytes + kTileBytes + kV32ScaleBytes;
}

// Thread 0: the TMA copies of one FP8 page into the 16-bit tile at `tile` (and, for V3.2, its scales into
// `scales`), completing on `bar`; for page < 0 just complete the barrier's phase (nothing to read; the
// consumer masks or zero-fills those rows).
template <int kFmt>
__device__ __forceinline__ void issue_page_fp8(const DecodeParams& p, char* tile, float* scales,
                                               uint64_t* bar, int h_k, int page, bool evict_first) {
  if (page < 0) {
    mbar_arrive(bar);
    return;
  }
  mbar_arrive_expect_tx(bar, fp8_page_tx_bytes<kFmt>());
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    tma_load_4d(&p.tma_k, tile + (2 * j + 1) * kTileBytes, bar, j * kFp8BoxCols, h_k, page, evict_first);
  }
  if constexpr (kFmt == kKvFp8Tensor) {
    tma_load_4d(&p.tma_k, tile + kPBox * kTileBytes, bar, 4 * kFp8BoxCols, h_k, page, evict_first);
  } else {
    tma_load_4d(&p.tma_rope, tile + kPBox * kTileBytes, bar, 0, h_k, page, evict_first);
    tma_load_4d(&p.tma_scale, scales, bar, 0, h_k, page, evict_first);
  }
}

// Four e4m3 values (one 32-bit word, lowest byte first) -> two fp16x2 words, exactly.
__device__ __forceinline__ void e4m3x4_to_f16x4(uint32_t x, uint32_t& lo, uint32_t& hi) {
  asm("{\n"
      ".reg .b16 a, b;\n"
      "mov.b32 {a, b}, %2;\n"
      "cvt.rn.f16x2.e4m3x2 %0, a;\n"
      "cvt.rn.f16x2.e4m3x2 %1, b;\n"
      "}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
}

// fp16x2 holding e4m3 values -> bf16x2 of the same values (exactly), times `scale` when kScaled.
template <bool kScaled>
__device__ __forceinline__ uint32_t f16x2_to_bf16x2(uint32_t h, __nv_bfloat162 scale) {
  uint32_t t = ((h >> 3) & 0x0fff0fffu) | (h & 0x80008000u);  // value * 2^-112, a normal bf16 (or zero)
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&t);
  v = __hmul2(v, __floats2bfloat162_rn(0x1p112f, 0x1p112f));
  if constexpr (kScaled) v = __hmul2(v, scale);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 16 e4m3 values -> 16 values of T (two 16-byte chunks), times `scale` when kScaled (bf16 only).
template <typename T, bool kScaled>
__device__ __forceinline__ void convert16(const uint4& in, __nv_bfloat162 scale, uint4& out0, uint4& out1) {
  const uint32_t w[4] = {in.x, in.y, in.z, in.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    e4m3x4_to_f16x4(w[i], o[2 * i], o[2 * i + 1]);
    if constexpr (std::is_same_v<T, cutlass::bfloat16_t>) {
      o[2 * i] = f16x2_to_bf16x2<kScaled>(o[2 * i], scale);
      o[2 * i + 1] = f16x2_to_bf16x2<kScaled>(o[2 * i + 1], scale);
    }
  }
  out0 = make_uint4(o[0], o[1], o[2], o[3]);
  out1 = make_uint4(o[4], o[5], o[6], o[7]);
}

// The 128 threads of one warpgroup (wtid 0..127) expand the FP8 page in `tile` in place (see the top of this
// file). Each warp converts four token rows at a time, eight lanes per row, 16 values per lane from each of
// the page's boxes: all of a row set's boxes are loaded first (five loads in flight, not one: the expansion
// sits between P V and the next Q K^T, so its latency is what counts), then converted and stored. The caller
// fences (fence.proxy.async) and publishes the tile afterwards.
template <typename T, int kFmt>
__device__ __forceinline__ void convert_page_fp8(char* tile, const float* scales, int wtid) {
  const int warp = wtid / 32, lane = wtid % 32;
  const int c = lane % 8;                               // 16-column chunk of a 128-column box
  constexpr int kBoxes = kFmt == kKvFp8Tensor ? 5 : 4;  // box 4: per-tensor RoPE, 64 real columns, in tile 8
#pragma unroll 1
  for (int s = 0; s < kPageSize / 16; ++s) {
    const int r = s * 16 + warp * 4 + lane / 8;
    uint4 v[kBoxes];
#pragma unroll
    for (int j = 0; j < kBoxes; ++j) {
      const char* src = tile + (j == 4 ? kPBox : 2 * j + 1) * kTileBytes + r * 128 + c * 16;
      v[j] = (j < 4 || c < 4) ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
    }
    __syncwarp();  // the rows are read in full before any lane overwrites them
#pragma unroll
    for (int j = 0; j < kBoxes; ++j) {
      if (j == 4 && c >= 4) continue;
      __nv_bfloat162 scale = __floats2bfloat162_rn(1.f, 1.f);
      if constexpr (kFmt == kKvFp8V32) scale = __floats2bfloat162_rn(scales[r * 4 + j], scales[r * 4 + j]);
      uint4 o0, o1;
      convert16<T, kFmt == kKvFp8V32>(v[j], scale, o0, o1);
      // 16-byte chunks 2 (c % 4) and 2 (c % 4) + 1 of row r, swizzled (chunk ^ row % 8) like TMA's 128B mode.
      char* dst = tile + (j == 4 ? kPBox : 2 * j + c / 4) * kTileBytes + r * 128;
      const int ch = 2 * (c % 4);
      *reinterpret_cast<uint4*>(dst + ((ch ^ (r % 8)) * 16)) = o0;
      *reinterpret_cast<uint4*>(dst + (((ch + 1) ^ (r % 8)) * 16)) = o1;
    }
    __syncwarp();
  }
}

}  // namespace flashmla::sm90
