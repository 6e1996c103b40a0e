// Kronecker-structured rotations Q x for OrthoAdam on the CPU, in cache-sized tiles.
//
// Why this exists: a rotation is a chain of small Kronecker factors (see ds_orthoadam/rotations.py). Applied as one
// GEMM per factor, each factor is a full pass over memory and CPU BLAS runs such small-K GEMMs at a fraction of its
// peak (2.4x a memory copy at K = 8). Here the factors are applied to tiles that stay in L1/L2 -- one row at a time
// for the "in" (contiguous) axis, a group of "out" digits times a strip of columns for the other axis -- with
// explicit SIMD vectors, Hadamard factors as butterflies, so a rotation costs a few memory passes.
//
// Layout: x is a (rows, cols) row-major matrix; rows = the product of the out digits, cols = the product of the in
// digits. A digit has a kind: IDENTITY (only as a whole axis: nothing to do), DENSE (an f x f row-major factor),
// HADAMARD (the orthonormal Sylvester-Hadamard matrix of size f, a power of two) or WINDOWS (an odd size f: three
// signed Hadamard transforms of width w = 2^floor(log2 f) on the digit values [0, w), [f-w, f), [0, w); its "factor"
// holds the three sign vectors of w, scaled by 1/sqrt(w)). Signs (length rows / cols, or null) are applied before
// all factors (rotate) or after them (signs_last = 1, the transpose: its caller passes the transposed dense factors,
// and window digits run their windows backwards, signs after each transform). Only plain C types cross the
// boundary: the library is loaded with ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Kind : int32_t { kIdentity = 0, kDense = 1, kHadamard = 2, kWindows = 3 };

// Out-axis tiles hold about this many elements (128 KiB in float32, two copies stay in L2).
constexpr int64_t kTileElements = 32768;
// Out-axis digits are grouped while their product stays at most this, so that tiles stay at least 64 columns wide.
constexpr int64_t kMaxOutGroup = 512;
// A Hadamard digit spanning more bytes than this runs two stages per pass (four vectors): its vectors would lie too
// far apart for the one-pass version (measured slower on the out-axis tiles, and on the 1376-wide rows' windows).
constexpr int64_t kMaxFusedSpan = 2048;
// Below this many elements a rotation runs on one thread (a parallel region costs more than it saves).
constexpr int64_t kParallelElements = 1 << 16;

// 32-byte vectors (AVX on x86, two NEON registers elsewhere), unaligned loads and stores.
template <typename T>
struct Simd {
  static constexpr int64_t kLanes = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
  static V load(const T* p) { return *reinterpret_cast<const V*>(p); }
  static void store(T* p, V v) { *reinterpret_cast<V*>(p) = v; }
  static V splat(T x) {
    V v;
    for (int64_t lane = 0; lane < kLanes; ++lane) v[lane] = x;
    return v;
  }
};

// Lane permutations: kSwap<d> gives x[lane ^ d] (the partner in a butterfly of distance d), kRepeat<p> gives
// x[lane % p] (the first p elements repeated).
#if defined(__clang__)
#define DSO_SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define DSO_SHUFFLE(x, ...) __builtin_shuffle(x, typename Mask<T>::M{__VA_ARGS__})
#endif
template <typename T>
struct Mask;
template <>
struct Mask<float> {
  typedef int32_t M __attribute__((vector_size(32)));
};
template <>
struct Mask<double> {
  typedef int64_t M __attribute__((vector_size(32)));
};

enum Permutation { kSwap1, kSwap2, kSwap4, kRepeat1, kRepeat2, kRepeat4 };

template <typename T>
inline typename Simd<T>::V permute(typename Simd<T>::V x, Permutation p) {
  if constexpr (Simd<T>::kLanes == 8) {
    switch (p) {
      case kSwap1: return DSO_SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6);
      case kSwap2: return DSO_SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5);
      case kSwap4: return DSO_SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3);
      case kRepeat1: return DSO_SHUFFLE(x, 0, 0, 0, 0, 0, 0, 0, 0);
      case kRepeat2: return DSO_SHUFFLE(x, 0, 1, 0, 1, 0, 1, 0, 1);
      default: return DSO_SHUFFLE(x, 0, 1, 2, 3, 0, 1, 2, 3);
    }
  } else {  // an else branch, not code after the if: clang would type-check 4-lane shuffles of 8-lane vectors
    if (p == kSwap1) return DSO_SHUFFLE(x, 1, 0, 3, 2);
    if (p == kSwap2) return DSO_SHUFFLE(x, 2, 3, 0, 1);
    return p == kRepeat1 ? DSO_SHUFFLE(x, 0, 0, 0, 0) : DSO_SHUFFLE(x, 0, 1, 0, 1);
  }
}

template <typename T>
struct Digit {
  int64_t size;
  int32_t kind;
  const T* factor;
  // A dense digit whose rows are shorter than a vector (see dense_short_digit): its factor laid out as the vectors
  // it is multiplied with, built once per call by prepare_short_digits.
  std::vector<T> short_weights = {};
};

template <typename T>
int64_t digits_product(const std::vector<Digit<T>>& digits) {
  int64_t product = 1;
  for (const auto& d : digits) product *= d.size;
  return product;
}

// dst[i][t] = sum_c F[i][c] src[c][t] for rows i0..i0+IB and TV vectors of t from t0 (a register tile).
template <typename T, int TV, int IB>
inline void dense_tile(const T* __restrict src, T* __restrict dst, const T* __restrict factor, int64_t f,
                       int64_t inner, int64_t t0, int64_t i0) {
  using S = Simd<T>;
  typename S::V acc[IB][TV];
  for (int ib = 0; ib < IB; ++ib) {
    for (int v = 0; v < TV; ++v) acc[ib][v] = S::splat(T(0));
  }
  for (int64_t c = 0; c < f; ++c) {
    typename S::V x[TV];
    for (int v = 0; v < TV; ++v) x[v] = S::load(src + c * inner + t0 + v * S::kLanes);
    for (int ib = 0; ib < IB; ++ib) {
      const typename S::V w = S::splat(factor[(i0 + ib) * f + c]);
      for (int v = 0; v < TV; ++v) acc[ib][v] += w * x[v];
    }
  }
  for (int ib = 0; ib < IB; ++ib) {
    for (int v = 0; v < TV; ++v) S::store(dst + (i0 + ib) * inner + t0 + v * S::kLanes, acc[ib][v]);
  }
}

template <typename T, int TV, int IB>
void dense_columns(const T* src, T* dst, const T* factor, int64_t f, int64_t inner, int64_t t0) {
  int64_t i0 = 0;
  for (; i0 + IB <= f; i0 += IB) dense_tile<T, TV, IB>(src, dst, factor, f, inner, t0, i0);
  for (; i0 < f; ++i0) dense_tile<T, TV, 1>(src, dst, factor, f, inner, t0, i0);
}

// A digit whose rows are shorter than a vector (Inner < kLanes, e.g. the 8-wide Haar block of 1376 = 43 * 8 * 4
// with inner 4): each vector holds kLanes / Inner output rows i (lanes i * Inner + t), multiplied with the input row
// x[c] repeated; the vector at weights + (b * f + c) * kLanes holds F[i][c] on the lanes of output row i of vector b.
template <typename T, int Inner>
void dense_short_digit(const T* __restrict src, T* __restrict dst, const T* __restrict weights, int64_t f) {
  using S = Simd<T>;
  constexpr Permutation repeat = Inner == 1 ? kRepeat1 : Inner == 2 ? kRepeat2 : kRepeat4;
  for (int64_t b = 0; b < f * Inner / S::kLanes; ++b) {
    typename S::V acc = {};
    for (int64_t c = 0; c < f; ++c) {
      acc += S::load(weights + (b * f + c) * S::kLanes) * permute<T>(S::load(src + c * Inner), repeat);
    }
    S::store(dst + b * S::kLanes, acc);
  }
}

template <typename T>
bool is_short(const Digit<T>& d, int64_t inner) {
  constexpr int64_t L = Simd<T>::kLanes;
  return d.kind == kDense && inner < L && L % inner == 0 && d.size % (L / inner) == 0;
}

// Lays out the factors of the short dense digits among `digits` (applied to [...][width] buffers) for
// dense_short_digit.
template <typename T>
void prepare_short_digits(std::vector<Digit<T>>& digits, int64_t width) {
  constexpr int64_t L = Simd<T>::kLanes;
  int64_t inner = width;
  for (auto d = digits.rbegin(); d != digits.rend(); inner *= (d++)->size) {
    if (!is_short(*d, inner)) continue;
    const int64_t f = d->size;
    d->short_weights.resize(f * inner / L * f * L);
    for (int64_t b = 0; b < f * inner / L; ++b) {
      for (int64_t c = 0; c < f; ++c) {
        for (int64_t lane = 0; lane < L; ++lane) {
          d->short_weights[(b * f + c) * L + lane] = d->factor[(b * L + lane) / inner * f + c];
        }
      }
    }
  }
}

// dst = F src along the middle axis of an [outer][f][inner] buffer.
template <typename T>
void dense_digit(const T* src, T* dst, const Digit<T>& digit, int64_t outer, int64_t inner) {
  constexpr int64_t L = Simd<T>::kLanes;
  const T* factor = digit.factor;
  const int64_t f = digit.size;
  for (int64_t o = 0; o < outer; ++o) {
    const T* s = src + o * f * inner;
    T* d = dst + o * f * inner;
    if (!digit.short_weights.empty()) {
      const auto* w = digit.short_weights.data();
      if (inner == 1) {
        dense_short_digit<T, 1>(s, d, w, f);
      } else if (inner == 2) {
        dense_short_digit<T, 2>(s, d, w, f);
      } else if constexpr (L > 4) {  // inner 4, below the vector only with 8 lanes
        dense_short_digit<T, 4>(s, d, w, f);
      }
      continue;
    }
    if (inner % L != 0) {  // an awkward shape: scalar
      for (int64_t i = 0; i < f; ++i) {
        for (int64_t t = 0; t < inner; ++t) {
          T acc = 0;
          for (int64_t c = 0; c < f; ++c) acc += factor[i * f + c] * s[c * inner + t];
          d[i * inner + t] = acc;
        }
      }
      continue;
    }
    int64_t t0 = 0;
    for (; t0 + 4 * L <= inner; t0 += 4 * L) dense_columns<T, 4, 2>(s, d, factor, f, inner, t0);
    for (; t0 + 2 * L <= inner; t0 += 2 * L) dense_columns<T, 2, 4>(s, d, factor, f, inner, t0);
    for (; t0 < inner; t0 += L) dense_columns<T, 1, 8>(s, d, factor, f, inner, t0);
  }
}

// Butterfly stages of distances D, 2D, ... (Stages of them, all below the vector width) inside one vector:
// x <- sign * x + partner, sign = -1 on the lanes whose partner comes first. Distances are compile-time constants
// so that every shuffle is a single instruction.
template <typename T, int D, int Stages>
inline typename Simd<T>::V lane_butterflies(typename Simd<T>::V x) {
  if constexpr (Stages > 0 && D < Simd<T>::kLanes) {
    typename Simd<T>::V sign;
    for (int64_t lane = 0; lane < Simd<T>::kLanes; ++lane) sign[lane] = (lane & D) ? T(-1) : T(1);
    constexpr Permutation swap = D == 1 ? kSwap1 : D == 2 ? kSwap2 : kSwap4;
    return lane_butterflies<T, 2 * D, Stages - 1>(sign * x + permute<T>(x, swap));
  } else {
    return x;
  }
}

// One pass of a whole Hadamard digit with the block in registers: `groups` groups of F vectors, `stride` elements
// apart (each group spans F * stride elements, stride / kLanes vector columns). Every vector first gets the stages
// inside it (distances D.., Stages of them), then the F vectors get the stages between them.
template <typename T, int F, int D, int Stages>
void hadamard_pass(T* buf, int64_t groups, int64_t stride) {
  using S = Simd<T>;
  for (int64_t g = 0; g < groups; ++g) {
    T* block = buf + g * F * stride;
    for (int64_t t = 0; t < stride; t += S::kLanes) {
      typename S::V x[F];
      for (int j = 0; j < F; ++j) x[j] = lane_butterflies<T, D, Stages>(S::load(block + j * stride + t));
      for (int h = 1; h < F; h <<= 1) {
        for (int i = 0; i < F; i += 2 * h) {
          for (int j = i; j < i + h; ++j) {
            const typename S::V a = x[j], b = x[j + h];
            x[j] = a + b;
            x[j + h] = a - b;
          }
        }
      }
      for (int j = 0; j < F; ++j) S::store(block + j * stride + t, x[j]);
    }
  }
}

// The lane-stage variants of hadamard_pass for F vectors; false if (distance, stages) has none.
template <typename T, int F>
bool hadamard_pass_lanes(T* buf, int64_t groups, int64_t stride, int64_t distance, int stages) {
  switch (stages == 0 ? 0 : distance * 4 + stages) {
    case 0: hadamard_pass<T, F, 1, 0>(buf, groups, stride); return true;
    case 5: hadamard_pass<T, F, 1, 1>(buf, groups, stride); return true;
    case 6: hadamard_pass<T, F, 1, 2>(buf, groups, stride); return true;
    case 7: hadamard_pass<T, F, 1, 3>(buf, groups, stride); return true;
    case 9: hadamard_pass<T, F, 2, 1>(buf, groups, stride); return true;
    case 10: hadamard_pass<T, F, 2, 2>(buf, groups, stride); return true;
    case 17: hadamard_pass<T, F, 4, 1>(buf, groups, stride); return true;
    default: return false;
  }
}

// Unnormalised Sylvester-Hadamard transform of size f along the middle axis of an [outer][f][inner] buffer, in
// place. Digits are powers of two up to 16 and inner is a multiple of the vector width or a power of two below it
// (then the block's stages below a vector run inside the vectors): one pass, the block in registers. Anything else
// takes the scalar stage-by-stage loop.
template <typename T>
void hadamard_digit(T* buf, int64_t outer, int64_t f, int64_t inner) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  const int64_t total = outer * f * inner;
  if (inner % L == 0 && f * inner * static_cast<int64_t>(sizeof(T)) > kMaxFusedSpan) {  // radix 4, then 2
    int64_t d = inner;
    for (; 4 * d <= f * inner; d <<= 2) {
      for (int64_t base = 0; base < total; base += 4 * d) {
        T* __restrict x0 = buf + base;
        T* __restrict x1 = x0 + d;
        T* __restrict x2 = x0 + 2 * d;
        T* __restrict x3 = x0 + 3 * d;
        for (int64_t t = 0; t < d; t += L) {
          const typename S::V a = S::load(x0 + t), b = S::load(x1 + t), c = S::load(x2 + t), e = S::load(x3 + t);
          const typename S::V s0 = a + b, s1 = a - b, s2 = c + e, s3 = c - e;
          S::store(x0 + t, s0 + s2);
          S::store(x1 + t, s1 + s3);
          S::store(x2 + t, s0 - s2);
          S::store(x3 + t, s1 - s3);
        }
      }
    }
    for (; d < f * inner; d <<= 1) {
      for (int64_t base = 0; base < total; base += 2 * d) {
        T* __restrict x = buf + base;
        T* __restrict y = buf + base + d;
        for (int64_t t = 0; t < d; t += L) {
          const typename S::V a = S::load(x + t), b = S::load(y + t);
          S::store(x + t, a + b);
          S::store(y + t, a - b);
        }
      }
    }
    return;
  }
  if (inner % L == 0 || (L % inner == 0 && total % L == 0)) {
    int stages = 0;  // the stages below a vector
    while (inner < L && (inner << stages) < std::min(f * inner, L)) ++stages;
    const int64_t vectors = inner < L ? std::max<int64_t>(1, f * inner / L) : f;
    const int64_t stride = inner < L ? L : inner;
    const int64_t groups = total / (vectors * stride);
    bool done = false;
    switch (vectors) {
      case 1: done = hadamard_pass_lanes<T, 1>(buf, groups, stride, inner, stages); break;
      case 2: done = hadamard_pass_lanes<T, 2>(buf, groups, stride, inner, stages); break;
      case 4: done = hadamard_pass_lanes<T, 4>(buf, groups, stride, inner, stages); break;
      case 8: done = hadamard_pass_lanes<T, 8>(buf, groups, stride, inner, stages); break;
      case 16: done = hadamard_pass_lanes<T, 16>(buf, groups, stride, inner, stages); break;
      default: break;
    }
    if (done) return;
  }
  for (int64_t d = inner; d < f * inner; d <<= 1) {
    for (int64_t base = 0; base < total; base += 2 * d) {
      for (int64_t t = 0; t < d; ++t) {
        const T a = buf[base + t], b = buf[base + d + t];
        buf[base + t] = a + b;
        buf[base + d + t] = a - b;
      }
    }
  }
}

// x[j][t] *= signs[j] for an [f][inner] block.
template <typename T>
void scale_rows(T* __restrict x, const T* __restrict signs, int64_t f, int64_t inner) {
  using S = Simd<T>;
  for (int64_t j = 0; j < f; ++j) {
    T* row = x + j * inner;
    int64_t t = 0;
    if (inner % S::kLanes == 0) {
      const typename S::V s = S::splat(signs[j]);
      for (; t < inner; t += S::kLanes) S::store(row + t, S::load(row + t) * s);
    }
    for (; t < inner; ++t) row[t] *= signs[j];
  }
}

// The largest power of two below an odd window-digit size (> size / 2, so the windows overlap).
inline int64_t window_width(int64_t size) {
  int64_t width = 1;
  while (2 * width < size) width <<= 1;
  return width;
}

// A WINDOWS digit along the middle axis of an [outer][f][inner] buffer, in place: each window is a signed,
// unnormalised Hadamard transform of its w digit values (the 1/sqrt(w) is in the signs), split into Hadamard
// digits of at most 16 (H_ab = H_a (x) H_b in Sylvester order).
template <typename T>
void windows_digit(T* buf, const Digit<T>& digit, int64_t outer, int64_t inner, bool transpose) {
  const int64_t f = digit.size, w = window_width(f);
  const int64_t starts[3] = {0, f - w, 0};
  int64_t log2_w = 0;
  while ((int64_t{1} << log2_w) < w) ++log2_w;
  const int64_t pieces = (log2_w + 3) / 4;
  for (int64_t o = 0; o < outer; ++o) {
    for (int step = 0; step < 3; ++step) {
      const int window = transpose ? 2 - step : step;
      T* x = buf + (o * f + starts[window]) * inner;
      const T* signs = digit.factor + window * w;
      if (!transpose) scale_rows(x, signs, w, inner);
      int64_t before = 1, after = w;
      for (int64_t piece = 0; piece < pieces; ++piece) {
        const int64_t bits = log2_w / pieces + (piece < log2_w % pieces ? 1 : 0);
        after >>= bits;
        hadamard_digit(x, before, int64_t{1} << bits, after * inner);
        before <<= bits;
      }
      if (transpose) scale_rows(x, signs, w, inner);
    }
  }
}

// Applies consecutive digits to a [product of their sizes][width] buffer; returns the buffer holding the result
// (buf or spare) and multiplies `scale` by the Hadamard normalisations still to be applied.
template <typename T>
T* apply_digits(const std::vector<Digit<T>>& digits, T* buf, T* spare, int64_t width, T& scale, bool transpose) {
  int64_t outer = 1, total = width;
  for (const auto& d : digits) total *= d.size;
  for (const auto& d : digits) {
    const int64_t inner = total / (outer * d.size);
    if (d.kind == kDense) {
      dense_digit(buf, spare, d, outer, inner);
      std::swap(buf, spare);
    } else if (d.kind == kHadamard) {
      hadamard_digit(buf, outer, d.size, inner);
      scale /= std::sqrt(static_cast<T>(d.size));
    } else if (d.kind == kWindows) {
      windows_digit(buf, d, outer, inner, transpose);
    }
    outer *= d.size;
  }
  return buf;
}

// dst[t] = src[t] * scale (* signs[t]) for t < n.
template <typename T>
void scaled_copy(const T* __restrict src, T* __restrict dst, int64_t n, T scale, const T* __restrict signs) {
  using S = Simd<T>;
  const typename S::V s = S::splat(scale);
  int64_t t = 0;
  if (signs) {
    for (; t + S::kLanes <= n; t += S::kLanes) S::store(dst + t, S::load(src + t) * S::load(signs + t) * s);
    for (; t < n; ++t) dst[t] = src[t] * signs[t] * scale;
  } else {
    for (; t + S::kLanes <= n; t += S::kLanes) S::store(dst + t, S::load(src + t) * s);
    for (; t < n; ++t) dst[t] = src[t] * scale;
  }
}

// One pass over a group of out digits: x viewed as [A][D][inner_len], tiles of D x width columns (width padded to
// whole vectors in the buffer; the padding lanes are computed on but never mix with real ones, nor are they
// written out). src == dst is allowed. Tiles are independent: OpenMP threads (torch's own pool size) take them in
// turns.
template <typename T>
void out_pass(const T* src, T* dst, const std::vector<Digit<T>>& group, int64_t total, int64_t inner_len,
              bool transpose) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t group_size = digits_product(group);
  const int64_t outer = total / (group_size * inner_len);
  const int64_t width = std::min<int64_t>(inner_len, std::max<int64_t>(L, kTileElements / group_size));
  const int64_t strips = (inner_len + width - 1) / width;
  const int64_t buffer_size = group_size * ((width + L - 1) / L * L);
#pragma omp parallel if (total >= kParallelElements)
  {
    std::vector<T> buf(buffer_size, T(0)), spare(buffer_size, T(0));
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < outer * strips; ++tile) {
      const int64_t a = tile / strips, l0 = (tile % strips) * width;
      const int64_t w = std::min(width, inner_len - l0);
      const int64_t stride = (w + L - 1) / L * L;
      const T* s = src + a * group_size * inner_len + l0;
      for (int64_t k = 0; k < group_size; ++k) std::memcpy(&buf[k * stride], s + k * inner_len, sizeof(T) * w);
      T scale = 1;
      const T* result = apply_digits(group, buf.data(), spare.data(), stride, scale, transpose);
      T* d = dst + a * group_size * inner_len + l0;
      for (int64_t k = 0; k < group_size; ++k) scaled_copy<T>(result + k * stride, d + k * inner_len, w, scale, nullptr);
    }
  }
}

// The in-axis pass, one row at a time (rows split between OpenMP threads); the signs of both axes are applied on the
// way in (rotate) or out (transpose). The row buffers have a vector of slack: a digit shorter than a vector loads
// whole vectors (dense_short_digit).
template <typename T>
void in_pass(const T* src, T* dst, const std::vector<Digit<T>>& digits, int64_t rows, int64_t cols,
             const T* out_signs, const T* in_signs, bool signs_last) {
#pragma omp parallel if (rows * cols >= kParallelElements)
  {
    std::vector<T> buf(cols + Simd<T>::kLanes, T(0)), spare(cols + Simd<T>::kLanes, T(0));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T row_sign = out_signs ? out_signs[r] : T(1);
      scaled_copy<T>(src + r * cols, buf.data(), cols, signs_last ? T(1) : row_sign, signs_last ? nullptr : in_signs);
      T scale = 1;
      const T* result = apply_digits(digits, buf.data(), spare.data(), 1, scale, signs_last);
      scaled_copy<T>(result, dst + r * cols, cols, signs_last ? scale * row_sign : scale,
                     signs_last ? in_signs : nullptr);
    }
  }
}

template <typename T>
std::vector<Digit<T>> make_digits(int32_t count, const int64_t* sizes, const int32_t* kinds, const T* const* factors) {
  std::vector<Digit<T>> digits;
  for (int32_t i = 0; i < count; ++i) {
    if (kinds[i] != kIdentity) digits.push_back({sizes[i], kinds[i], factors[i]});
  }
  return digits;
}

// Consecutive out-axis digits grouped greedily while their product stays within kMaxOutGroup.
template <typename T>
std::vector<std::vector<Digit<T>>> group_digits(const std::vector<Digit<T>>& digits) {
  std::vector<std::vector<Digit<T>>> groups;
  int64_t product = 0;
  for (const auto& d : digits) {
    if (groups.empty() || product * d.size > kMaxOutGroup) {
      groups.push_back({});
      product = 1;
    }
    groups.back().push_back(d);
    product *= d.size;
  }
  return groups;
}

template <typename T>
void kron_apply(const T* src, T* dst, int64_t rows, int64_t cols, int32_t n_out, const int64_t* out_sizes,
                const int32_t* out_kinds, const T* const* out_factors, const T* out_signs, int32_t n_in,
                const int64_t* in_sizes, const int32_t* in_kinds, const T* const* in_factors, const T* in_signs,
                int32_t signs_last) {
  const auto out_groups = group_digits(make_digits(n_out, out_sizes, out_kinds, out_factors));
  auto in_digits = make_digits(n_in, in_sizes, in_kinds, in_factors);
  prepare_short_digits(in_digits, 1);
  const bool has_in_pass = !in_digits.empty() || out_signs || in_signs;
  const int64_t total = rows * cols;
  if (out_groups.empty() && !has_in_pass) {
    if (src != dst) std::memcpy(dst, src, sizeof(T) * total);
    return;
  }
  const T* current = src;
  if (has_in_pass && !signs_last) {
    in_pass(current, dst, in_digits, rows, cols, out_signs, in_signs, false);
    current = dst;
  }
  int64_t inner_len = cols;  // the last group's columns; each earlier group's are the later groups' times cols
  for (auto g = out_groups.rbegin(); g != out_groups.rend(); ++g) {
    out_pass(current, dst, *g, total, inner_len, signs_last);
    current = dst;
    inner_len *= digits_product(*g);
  }
  if (has_in_pass && signs_last) in_pass(current, dst, in_digits, rows, cols, out_signs, in_signs, true);
}

}  // namespace

// The C entry points, one per dtype: dso_kron_apply_f32 and dso_kron_apply_f64.
#define DSO_KRON_APPLY(NAME, T)                                                                                     \
  void NAME(const T* src, T* dst, int64_t rows, int64_t cols, int32_t n_out, const int64_t* out_sizes,               \
            const int32_t* out_kinds, const T* const* out_factors, const T* out_signs, int32_t n_in,                 \
            const int64_t* in_sizes, const int32_t* in_kinds, const T* const* in_factors, const T* in_signs,         \
            int32_t signs_last) {                                                                                    \
    kron_apply<T>(src, dst, rows, cols, n_out, out_sizes, out_kinds, out_factors, out_signs, n_in, in_sizes,       \
                  in_kinds, in_factors, in_signs, signs_last);                                                       \
  }

extern "C" {
DSO_KRON_APPLY(dso_kron_apply_f32, float)
DSO_KRON_APPLY(dso_kron_apply_f64, double)
}  // extern "C"
