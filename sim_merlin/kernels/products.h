// Matrix products for the fused kernels: C (+)= A B over row blocks of a recurrence.
//
// Two arithmetics. float32: each element of C is a sum from zero of one fused multiply-add per k,
// in order, the same operations whatever the row's place in the block (so a sample's values do
// not depend on its batch); added to C when accumulating. bfloat16 products with float32 sums (what
// TensorFlow's oneDNN products do under mixed_bfloat16): both operands are rounded to bfloat16
// (round to nearest even) and multiplied with AVX512-BF16's dot-product instruction, which sums
// pairs of products into float32 lanes; that needs the CPU feature at build time (-march=native)
// and falls back to the float32 product otherwise.
//
// Operands are views with strides (a transposed matrix is a view), so the kernels never copy a
// matrix to transpose it. B is packed once per call when it is a weight (`PackedB`).
//
// On CPUs with AMX (Sapphire Rapids and later) the bfloat16 products run on the tile unit
// (TDPBF16PS: a 16 x 16 block of float32 sums over 32 products per instruction) when the
// operating system lets the process use it and SIM_MERLIN_KERNEL_AMX is not 0; the operands
// are then padded to whole tiles (K to 32, B's columns to 32, A's rows to 32) with zeros.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define SIM_MERLIN_AMX 1
#endif

#include "Eigen/Core"
#include "rows.h"

namespace sim_merlin {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A read-only [rows, cols] view: element (i, j) is data[i * row_stride + j * col_stride].
struct View {
  const float* data;
  int64_t rows, cols, row_stride, col_stride;

  static View Of(const Matrix& m) { return {m.data(), m.rows(), m.cols(), m.cols(), 1}; }
  View Transposed() const { return {data, cols, rows, col_stride, row_stride}; }
  float operator()(int64_t i, int64_t j) const { return data[i * row_stride + j * col_stride]; }
};

#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kHasBf16Products = true;
#else
constexpr bool kHasBf16Products = false;
#endif

// AMX usable here: built for it, not disabled (SIM_MERLIN_KERNEL_AMX=0), and the kernel grants
// this process the tile data state (Linux's arch_prctl; oneDNN asks for it the same way).
inline bool AmxUsable() {
#ifdef SIM_MERLIN_AMX
  static const bool usable = [] {
    const char* setting = std::getenv("SIM_MERLIN_KERNEL_AMX");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

inline int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Packing granularity: whole tiles for AMX, else an even K and 16 columns (one register).
inline int64_t PairMultiple() { return AmxUsable() ? 16 : 1; }
inline int64_t ColumnMultiple() { return AmxUsable() ? 32 : 16; }
inline int64_t RowMultiple() { return AmxUsable() ? 32 : 1; }

inline uint16_t ToBf16(float x) {  // round to nearest even (no NaN inputs here)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// The first min(count, 16) lanes (none when count <= 0): masked loads of a row's last columns.
inline __mmask16 TailMask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>(count <= 0 ? 0u : (1u << count) - 1u);
}
#endif

// Makes `buffer` hold at least `size` elements without clearing them: the packing below writes
// every element it uses, padding included (clearing whole buffers on every product had cost a
// tenth of the recurrent kernels' time).
template <typename Element>
inline Element* Scratch(Buffer<Element>* buffer, int64_t size) {
  if (static_cast<int64_t>(buffer->size()) < size) buffer->resize(size);
  return buffer->data();
}

// B [K, N] as bfloat16 pairs: data[((k / 2) * padded_cols + j) * 2 + k % 2], zero padded to an
// even K and to N rounded up to 16 columns (one 512-bit register of float32 sums), or to whole
// AMX tiles.
struct PackedB {
  Buffer<uint16_t> data;
  int64_t pairs = 0, cols = 0, padded_cols = 0;
};

inline void Pack(const View& b, PackedB* out) {
  const int64_t pairs = (b.rows + 1) / 2;  // holding data; the rest is padding
  out->pairs = RoundUp(pairs, PairMultiple());
  out->cols = b.cols;
  out->padded_cols = RoundUp(b.cols, ColumnMultiple());
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (b.col_stride == 1) {
    uint16_t* target = Scratch(&out->data, out->pairs * out->padded_cols * 2);
    const int64_t written = RoundUp(b.cols, 16);  // columns the loop below stores
    for (int64_t p = 0; p < out->pairs; ++p) {  // the padding: columns, then whole pairs
      const int64_t from = p < pairs ? written : 0;
      std::fill(target + (p * out->padded_cols + from) * 2,
                target + (p + 1) * out->padded_cols * 2, uint16_t{0});
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const float* even = b.data + (2 * p) * b.row_stride;
      const bool has_odd = 2 * p + 1 < b.rows;
      const float* odd = even + b.row_stride;
      for (int64_t j = 0; j < b.cols; j += 16) {  // the padding columns load as zeros
        const __mmask16 valid = TailMask(b.cols - j);
        const __m256bh lo = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, even + j));
        const __m512i lo32 = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(lo));
        __m512i pair = lo32;
        if (has_odd) {
          const __m256bh hi = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, odd + j));
          pair = _mm512_or_si512(
              lo32, _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(hi)),
                                      16));
        }
        _mm512_storeu_si512(target + (p * out->padded_cols + j) * 2, pair);
      }
    }
    return;
  }
#endif
  out->data.assign(out->pairs * out->padded_cols * 2, 0);
  uint16_t* target = out->data.data();
  for (int64_t k = 0; k < b.rows; ++k) {
    for (int64_t j = 0; j < b.cols; ++j) {
      target[((k / 2) * out->padded_cols + j) * 2 + k % 2] = ToBf16(b(k, j));
    }
  }
}

// A [M, K] as rows of bfloat16 pairs (one 32-bit word per pair of k), K padded to even (or to
// whole AMX tiles, with the rows).
inline void PackRows(const View& a, Buffer<uint32_t>* out, int64_t* pairs) {
  const int64_t filled = (a.cols + 1) / 2;
  *pairs = RoundUp(filled, PairMultiple());
  const int64_t padded_rows = RoundUp(a.rows, RowMultiple());
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (a.col_stride == 1) {
    uint32_t* target = Scratch(out, padded_rows * *pairs);
    for (int64_t i = 0; i < a.rows; ++i) {
      const float* row = a.data + i * a.row_stride;
      uint32_t* words = target + i * *pairs;
      // Masked loads: an odd K pads with a zero, and the padding pairs are stored as zeros.
      for (int64_t k = 0; k < 2 * *pairs; k += 32) {
        const __m512bh both = _mm512_cvtne2ps_pbh(
            _mm512_maskz_loadu_ps(TailMask(a.cols - k - 16), row + k + 16),
            _mm512_maskz_loadu_ps(TailMask(a.cols - k), row + k));
        _mm512_mask_storeu_epi32(words + k / 2, TailMask(*pairs - k / 2),
                                 reinterpret_cast<const __m512i&>(both));
      }
    }
    std::fill(target + a.rows * *pairs, target + padded_rows * *pairs, 0u);
    return;
  }
#endif
  out->assign(padded_rows * *pairs, 0u);
  uint32_t* target = out->data();
  for (int64_t i = 0; i < a.rows; ++i) {
    for (int64_t p = 0; p < filled; ++p) {
      const uint32_t lo = ToBf16(a(i, 2 * p));
      const uint32_t hi = 2 * p + 1 < a.cols ? ToBf16(a(i, 2 * p + 1)) : 0u;
      target[i * *pairs + p] = lo | (hi << 16);
    }
  }
}

// A's pair word (i, p) is words[i * row_step + p * pair_step].
struct PackedA {
  const uint32_t* words;
  int64_t rows, pairs, row_step, pair_step;
};

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// R rows x V registers of 16 columns, all sums held in registers over the whole K.
template <int R, int V>
inline void MicroKernel(const uint32_t* a, int64_t pairs, int64_t row_step, int64_t pair_step,
                        const uint16_t* b, int64_t padded_cols, float* c, int64_t ldc,
                        const __mmask16* masks, bool accumulate) {
  __m512 sums[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      sums[r][v] = accumulate ? _mm512_maskz_loadu_ps(masks[v], c + r * ldc + 16 * v)
                              : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh columns[V];
    for (int v = 0; v < V; ++v) {
      const __m512i packed = _mm512_loadu_si512(b + (p * padded_cols + 16 * v) * 2);
      columns[v] = reinterpret_cast<const __m512bh&>(packed);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i word = _mm512_set1_epi32(static_cast<int>(a[r * row_step + p * pair_step]));
      const __m512bh row = reinterpret_cast<const __m512bh&>(word);
      for (int v = 0; v < V; ++v) sums[r][v] = _mm512_dpbf16_ps(sums[r][v], row, columns[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, masks[v], sums[r][v]);
}

template <int V>
inline void RowsOfPanel(const PackedA& a, const uint16_t* b, int64_t padded_cols, float* c,
                        int64_t ldc, const __mmask16* masks, bool accumulate) {
  int64_t i = 0;
  auto rows = [&](auto kernel) {
    kernel(a.words + i * a.row_step, a.pairs, a.row_step, a.pair_step, b, padded_cols, c + i * ldc,
           ldc, masks, accumulate);
  };
  for (; i + 6 <= a.rows; i += 6) rows(MicroKernel<6, V>);
  // The last rows together: one row alone keeps only V sums in flight, fewer than the
  // dot-product latency covers.
  switch (a.rows - i) {
    case 5: rows(MicroKernel<5, V>); break;
    case 4: rows(MicroKernel<4, V>); break;
    case 3: rows(MicroKernel<3, V>); break;
    case 2: rows(MicroKernel<2, V>); break;
    case 1: rows(MicroKernel<1, V>); break;
    default: break;
  }
}
#endif

#ifdef SIM_MERLIN_AMX
// Copies n <= 16 floats with one masked load and store (a library call per short row had cost
// more than the tile products of the edge blocks).
inline void CopyShort(const float* from, int64_t n, float* to) {
  const __mmask16 valid = TailMask(n);
  _mm512_mask_storeu_ps(to, valid, _mm512_maskz_loadu_ps(valid, from));
}

// C (+)= A B on the tile unit, in 32 x 32 blocks of C (four accumulator tiles: 0-3; A's two row
// tiles: 4, 5; B's two column tiles: 6, 7). A's rows are contiguous pair words (row_step words
// apart, rows padded to 32), B's pairs padded to A's; edge blocks of C go through a buffer.
inline void ProductAmx(const PackedA& a, const PackedB& b, float* c, int64_t ldc,
                       bool accumulate) {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;  // palette 1: 8 tiles of up to 16 rows x 64 bytes
  for (int t = 0; t < 8; ++t) {
    config[16 + 2 * t] = 64;  // bytes per row (little-endian uint16)
    config[48 + t] = 16;      // rows
  }
  _tile_loadconfig(config);  // per call: other code (oneDNN) may use this thread's tiles between
  alignas(64) float edge[4][16 * 16];
  const uint32_t* b_words = reinterpret_cast<const uint32_t*>(b.data.data());
  const int64_t a_stride = a.row_step * 4, b_stride = b.padded_cols * 4, c_stride = ldc * 4;
  for (int64_t m0 = 0; m0 < a.rows; m0 += 32) {
    for (int64_t n0 = 0; n0 < b.cols; n0 += 32) {
      const bool inside = m0 + 32 <= a.rows && n0 + 32 <= b.cols;
      // edge: the valid part of C's 16 x 16 block q (rows m0 + 16 (q / 2), cols n0 + 16 (q % 2))
      auto for_edge = [&](int q, auto copy) {
        const int64_t row = m0 + 16 * (q / 2), col = n0 + 16 * (q % 2);
        const int64_t rows = std::clamp<int64_t>(a.rows - row, 0, 16);
        const int64_t cols = std::clamp<int64_t>(b.cols - col, 0, 16);
        for (int64_t i = 0; i < rows; ++i) copy(c + (row + i) * ldc + col, edge[q] + i * 16, cols);
      };
      if (!accumulate) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      } else if (inside) {
        _tile_loadd(0, c + m0 * ldc + n0, c_stride);
        _tile_loadd(1, c + m0 * ldc + n0 + 16, c_stride);
        _tile_loadd(2, c + (m0 + 16) * ldc + n0, c_stride);
        _tile_loadd(3, c + (m0 + 16) * ldc + n0 + 16, c_stride);
      } else {
        std::memset(edge, 0, sizeof edge);
        for (int q = 0; q < 4; ++q)
          for_edge(q, [](float* in_c, float* in_edge, int64_t n) { CopyShort(in_c, n, in_edge); });
        _tile_loadd(0, edge[0], 64); _tile_loadd(1, edge[1], 64);
        _tile_loadd(2, edge[2], 64); _tile_loadd(3, edge[3], 64);
      }
      for (int64_t p0 = 0; p0 < a.pairs; p0 += 16) {
        _tile_loadd(4, a.words + m0 * a.row_step + p0, a_stride);
        _tile_loadd(5, a.words + (m0 + 16) * a.row_step + p0, a_stride);
        _tile_loadd(6, b_words + p0 * b.padded_cols + n0, b_stride);
        _tile_loadd(7, b_words + p0 * b.padded_cols + n0 + 16, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      if (inside) {
        _tile_stored(0, c + m0 * ldc + n0, c_stride);
        _tile_stored(1, c + m0 * ldc + n0 + 16, c_stride);
        _tile_stored(2, c + (m0 + 16) * ldc + n0, c_stride);
        _tile_stored(3, c + (m0 + 16) * ldc + n0 + 16, c_stride);
      } else {
        _tile_stored(0, edge[0], 64); _tile_stored(1, edge[1], 64);
        _tile_stored(2, edge[2], 64); _tile_stored(3, edge[3], 64);
        for (int q = 0; q < 4; ++q)
          for_edge(q, [](float* in_c, float* in_edge, int64_t n) { CopyShort(in_edge, n, in_c); });
      }
    }
  }
  _tile_release();
}
#endif

// C [M, N] (row stride ldc) = or += A B, both rounded to bfloat16, sums in float32.
inline void ProductBf16(const PackedA& a, const PackedB& b, float* c, int64_t ldc,
                        bool accumulate) {
#ifdef SIM_MERLIN_AMX
  if (AmxUsable()) return ProductAmx(a, b, c, ldc, accumulate);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const int64_t registers = b.padded_cols / 16;
  for (int64_t v0 = 0; v0 < registers; v0 += 4) {
    const int width = static_cast<int>(std::min<int64_t>(4, registers - v0));
    __mmask16 masks[4];
    for (int v = 0; v < width; ++v) {
      const int64_t valid = std::clamp<int64_t>(b.cols - 16 * (v0 + v), 0, 16);
      masks[v] = static_cast<__mmask16>((1u << valid) - 1u);
    }
    const uint16_t* panel = b.data.data() + 16 * v0 * 2;
    float* target = c + 16 * v0;
    switch (width) {
      case 4: RowsOfPanel<4>(a, panel, b.padded_cols, target, ldc, masks, accumulate); break;
      case 3: RowsOfPanel<3>(a, panel, b.padded_cols, target, ldc, masks, accumulate); break;
      case 2: RowsOfPanel<2>(a, panel, b.padded_cols, target, ldc, masks, accumulate); break;
      default: RowsOfPanel<1>(a, panel, b.padded_cols, target, ldc, masks, accumulate);
    }
  }
#else
  (void)a; (void)b; (void)c; (void)ldc; (void)accumulate;
#endif
}

// B [K, N] with unit column stride and whole registers of columns: row k starts at
// data + k * row_stride and has RoundUp(N, 16) readable columns (padding zero).
struct FloatRows {
  const float* data;
  int64_t rows, cols, row_stride;
};

// B itself when its columns are contiguous and fill whole registers, else a padded copy in
// `copy` (whole registers let the kernel load columns unmasked: with masked loads in its loop
// GCC stored every sum to memory at every k).
inline FloatRows FloatRowsOf(const View& b, FloatBuffer* copy) {
  if (b.col_stride == 1 && b.cols % 16 == 0) return {b.data, b.rows, b.cols, b.row_stride};
  const int64_t padded = RoundUp(b.cols, 16);
  float* target = Scratch(copy, b.rows * padded);
  for (int64_t k = 0; k < b.rows; ++k) {
    float* row = target + k * padded;
    if (b.col_stride == 1) {
      std::memcpy(row, b.data + k * b.row_stride, b.cols * sizeof(float));
    } else {
      for (int64_t j = 0; j < b.cols; ++j) row[j] = b(k, j);
    }
    std::fill(row + b.cols, row + padded, 0.0f);
  }
  return {target, b.rows, b.cols, padded};
}

#if defined(__AVX512F__)
// R rows x V registers of 16 columns of C: each sum starts at zero and takes one fused
// multiply-add per k in order, then is added to C when accumulating; the same operations for
// every element whatever R, V or its lane.
template <int R, int V>
inline void FloatMicroKernel(const View& a, int64_t first_row, const float* b, int64_t ldb,
                             float* c, int64_t ldc, const __mmask16* masks, bool accumulate) {
  __m512 sums[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) sums[r][v] = _mm512_setzero_ps();
  const int64_t row_stride = a.row_stride, col_stride = a.col_stride, depth = a.cols;
  const float* left = a.data + first_row * row_stride;
  for (int64_t k = 0; k < depth; ++k) {
    __m512 columns[V];
    for (int v = 0; v < V; ++v) columns[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    const float* column = left + k * col_stride;
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_broadcastss_ps(_mm_load_ss(column + r * row_stride));
      for (int v = 0; v < V; ++v) sums[r][v] = _mm512_fmadd_ps(x, columns[v], sums[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      float* target = c + r * ldc + 16 * v;
      const __m512 out = accumulate
          ? _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], target), sums[r][v]) : sums[r][v];
      _mm512_mask_storeu_ps(target, masks[v], out);
    }
  }
}

template <int V>
inline void FloatRowsOfPanel(const View& a, const float* b, int64_t ldb, float* c, int64_t ldc,
                             const __mmask16* masks, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= a.rows; i += 6)
    FloatMicroKernel<6, V>(a, i, b, ldb, c + i * ldc, ldc, masks, accumulate);
  for (; i < a.rows; ++i)
    FloatMicroKernel<1, V>(a, i, b, ldb, c + i * ldc, ldc, masks, accumulate);
}
#endif

// C [M, N] (row stride ldc) = or += A B in float32, in panels of 64 columns.
inline void ProductFloat(const View& a, const FloatRows& b, float* c, int64_t ldc,
                         bool accumulate) {
#if defined(__AVX512F__)
  const int64_t registers = (b.cols + 15) / 16;
  for (int64_t v0 = 0; v0 < registers; v0 += 4) {
    const int width = static_cast<int>(std::min<int64_t>(4, registers - v0));
    __mmask16 masks[4];
    for (int v = 0; v < width; ++v) masks[v] = TailMask(b.cols - 16 * (v0 + v));
    const float* panel = b.data + 16 * v0;
    float* target = c + 16 * v0;
    switch (width) {
      case 4: FloatRowsOfPanel<4>(a, panel, b.row_stride, target, ldc, masks, accumulate); break;
      case 3: FloatRowsOfPanel<3>(a, panel, b.row_stride, target, ldc, masks, accumulate); break;
      case 2: FloatRowsOfPanel<2>(a, panel, b.row_stride, target, ldc, masks, accumulate); break;
      default: FloatRowsOfPanel<1>(a, panel, b.row_stride, target, ldc, masks, accumulate);
    }
  }
#else
  std::vector<float> sums(b.cols);
  for (int64_t i = 0; i < a.rows; ++i) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (int64_t k = 0; k < a.cols; ++k) {
      const float x = a(i, k);
      const float* row = b.data + k * b.row_stride;
      for (int64_t j = 0; j < b.cols; ++j) sums[j] = std::fma(x, row[j], sums[j]);
    }
    float* target = c + i * ldc;
    for (int64_t j = 0; j < b.cols; ++j) target[j] = accumulate ? target[j] + sums[j] : sums[j];
  }
#endif
}

// A weight used as B in every step: its float32 view, and its packing when products are bf16.
struct Weight {
  View view;
  PackedB packed;
  FloatBuffer float_copy;  // the view's rows made contiguous, when its columns are not

  Weight(View v, bool bf16) : view(v) {
    if (bf16) Pack(view, &packed);
    FloatRowsOf(view, &float_copy);  // a copy (of a small weight) only when needed
  }
  FloatRows float_rows() const {
    if (view.col_stride == 1 && view.cols % 16 == 0)
      return {view.data, view.rows, view.cols, view.row_stride};
    return {float_copy.data(), view.rows, view.cols, RoundUp(view.cols, 16)};
  }
};

#if defined(__AVX512F__)
// The 16 x 16 block of 32-bit words at `source` (rows `source_step` words apart) transposed into
// `target` (rows `target_step` apart), in registers: 16 loads, four rounds of 16 shuffles, 16
// stores.
inline void Transpose16x16Words(const uint32_t* source, int64_t source_step, uint32_t* target,
                                int64_t target_step) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(source + i * source_step);
  for (int i = 0; i < 16; i += 2) {  // words of rows i, i + 1 interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then word pairs of rows i..i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4g + j]'s 128-bit lane l now holds word 4l + j of rows 4g..4g + 3; two rounds of lane
  // shuffles gather the four groups: r[k] is then word k of all 16 rows.
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);  // words j, 8 + j of groups 0, 1
    t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);  // words 4 + j, 12 + j
    t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);  // the same of groups 2, 3
    t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xDD);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_si512(target + k * target_step, r[k]);
}
#endif

// target[i * pairs + p] = words[p * columns + i] for i < RoundUp(rows, 16) (whole blocks of 16:
// `columns` is at least that, its padding zero), p < pairs: a packed B's pair
// words turned into an AMX A's rows. With AVX-512 in 16 x 16 blocks transposed in registers (a
// strided scalar loop had cost a quarter of the gradient kernels' time; a gather of 16 words at a
// time took 4x as long as these shuffles in a standalone test, 128 rows x 100 columns).
inline void TransposeWords(const uint32_t* words, int64_t columns, int64_t pairs, int64_t rows,
                           uint32_t* target) {
  const int64_t blocks_of_rows = RoundUp(rows, 16);
  int64_t p0 = 0;
#if defined(__AVX512F__)
  for (; p0 + 16 <= pairs; p0 += 16)
    for (int64_t i = 0; i < blocks_of_rows; i += 16)
      Transpose16x16Words(words + p0 * columns + i, columns, target + i * pairs + p0, pairs);
#endif
  for (int64_t p = p0; p < pairs; ++p)
    for (int64_t i = 0; i < blocks_of_rows; ++i) target[i * pairs + p] = words[p * columns + i];
}

// <row, column b> over n elements (b may be strided), summed in one fixed order.
inline float Dot(const float* row, const View& b, int64_t n) {
  int64_t k = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  if (b.row_stride == 1) {
    __m512 sums = _mm512_setzero_ps();
    for (; k < n; k += 16) {
      const __mmask16 valid = static_cast<__mmask16>(
          n - k >= 16 ? 0xFFFFu : (1u << (n - k)) - 1u);
      sums = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, row + k),
                             _mm512_maskz_loadu_ps(valid, b.data + k), sums);
    }
    return _mm512_reduce_add_ps(sums);
  }
#endif
  for (; k < n; ++k) sum += row[k] * b(k, 0);
  return sum;
}

// The products of one row block (one thread): scratch space for packing the other operand.
class Products {
 public:
  explicit Products(bool bf16) : bf16_(bf16 && kHasBf16Products) {}

  // c (row stride ldc) = or += a w
  void Multiply(const View& a, const Weight& w, float* c, int64_t ldc, bool accumulate) {
    if (!bf16_) return MultiplyFloat(a, w.view, &w, c, ldc, accumulate);
    ProductBf16(PackLeft(a), w.packed, c, ldc, accumulate);
  }

  // c = or += a b, b packed for this product only
  void Multiply(const View& a, const View& b, float* c, int64_t ldc, bool accumulate) {
    if (!bf16_) return MultiplyFloat(a, b, nullptr, c, ldc, accumulate);
    const PackedA left = PackLeft(a);
    Pack(b, &columns_);
    ProductBf16(left, columns_, c, ldc, accumulate);
  }

 private:
  // A transposed row-major matrix (columns contiguous) is packed as the B of its transpose: its
  // pair words are then read with the strides swapped (for AMX, whose A tiles need each row's
  // pairs contiguous, the words are transposed); others are packed row by row.
  PackedA PackLeft(const View& a) {
    if (a.row_stride == 1 && a.col_stride != 1) {
      Pack(a.Transposed(), &left_columns_);
      const auto* words = reinterpret_cast<const uint32_t*>(left_columns_.data.data());
      const int64_t pairs = left_columns_.pairs, columns = left_columns_.padded_cols;
      if (!AmxUsable()) return {words, a.rows, pairs, 1, columns};
      const int64_t padded_rows = RoundUp(a.rows, RowMultiple());
      uint32_t* target = Scratch(&rows_, padded_rows * pairs);
      TransposeWords(words, columns, pairs, a.rows, target);  // whole blocks of 16 rows
      std::fill(target + RoundUp(a.rows, 16) * pairs, target + padded_rows * pairs, 0u);
      return {target, a.rows, pairs, pairs, 1};
    }
    int64_t pairs;
    PackRows(a, &rows_, &pairs);
    return {rows_.data(), a.rows, pairs, pairs, 1};
  }

  // Float products: every element of C is the same sequence of operations whatever its row's
  // place in the block (Eigen's kernels round a row by its place: a sample's values then
  // depended on its batch). A product with one column (an output layer of one unit) or an outer
  // product (its gradient) is a plain loop.
  // `weight`, when given, is b with its float rows prepared.
  void MultiplyFloat(const View& a, const View& b, const Weight* weight, float* c, int64_t ldc,
                     bool accumulate) {
    if (a.cols == 1) {  // outer product: one multiplication per element
      for (int64_t i = 0; i < a.rows; ++i) {
        const float left = a(i, 0);
        float* row = c + i * ldc;
        for (int64_t j = 0; j < b.cols; ++j) row[j] = (accumulate ? row[j] : 0.0f) + left * b(0, j);
      }
      return;
    }
    if (b.cols == 1 && a.row_stride == 1) {  // A's columns contiguous: sums of scaled columns
      if (!accumulate)
        for (int64_t i = 0; i < a.rows; ++i) c[i * ldc] = 0.0f;
      for (int64_t k = 0; k < a.cols; ++k) {
        const float* column = a.data + k * a.col_stride;
        const float scale = b(k, 0);
        for (int64_t i = 0; i < a.rows; ++i) c[i * ldc] += column[i] * scale;
      }
      return;
    }
    if (b.cols == 1 && a.col_stride == 1) {  // one dot product per row, the same for every row
      for (int64_t i = 0; i < a.rows; ++i) {
        const float dot = Dot(a.data + i * a.row_stride, b, a.cols);
        c[i * ldc] = accumulate ? c[i * ldc] + dot : dot;
      }
      return;
    }
    ProductFloat(a, weight != nullptr ? weight->float_rows() : FloatRowsOf(b, &float_columns_), c,
                 ldc, accumulate);
  }

  bool bf16_;
  Buffer<uint32_t> rows_;
  PackedB columns_, left_columns_;
  FloatBuffer float_columns_;
};

}  // namespace sim_merlin
