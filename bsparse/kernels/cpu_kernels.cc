// Block-sparse (BSR) products on CPU, as XLA FFI custom calls (float32).
//
// The XLA ops path gathers the input blocks, multiplies them in a batched matmul and
// scatter-adds the products; on a CPU the gathers and scatters cost more than the block
// products. These kernels fuse the three: a register-tiled micro-kernel reads the input
// blocks in place (strided) and accumulates every stored block of one output tile in
// registers before writing it once.
//
//   bsparse_bsr_matmul: y (M, G*bo) = for each output block g, the sum over its stored
//     entries e of x[:, src[e]*bk : +bk] @ blocks[e]; blocks (nnz_max, bk, bo). The
//     entries of g are entry[offsets[g] : offsets[g+1]]. x @ W passes W's blocks and
//     rows with entries grouped by block column; x @ W.T passes the transposed blocks
//     and cols, grouped by block row.
//   bsparse_bsr_sddmm: out (nnz_max, bm, bn), out[e] = a[:, rows[e]*bm : +bm].T @
//     b[:, cols[e]*bn : +bn] for e < nnz, zero for padding entries.
//   bsparse_bsr_conv: a convolution of NHWC x (N, H, W, C) by block-sparse taps with
//     strides (sh, sw), zero-padded by pad_top rows and pad_left columns (and below and
//     right as far as y's size asks): y[n, h, w, g*bo : +bo] = the sum over g's entries e
//     and taps (i, j) of xpad[n, h*sh+i, w*sw+j, src[e]*bk : +bk] @ blocks[e, i, j],
//     blocks (nnz_max, kh, kw, bk, bo), y (N, Ho, Wo, G*bo). No patch matrix and no padded
//     copy of x: each line of output pixels copies the kh input rows it reads into a
//     padded window, and each tap's term reads that window in place. Output channels fill
//     the vector lanes, or, for output blocks at most kNarrow wide at unit stride along w,
//     output pixels do (the window then channel-major).
//   bsparse_bsr_conv_sddmm: the taps' gradient, out (nnz_max, kh, kw, bm, bn),
//     out[e, i, j] = the sum over (n, h, w) of xpad[n, h*sh+i, w*sw+j, rows[e]-block].T @
//     dy[n, h, w, cols[e]-block], padded as bsparse_bsr_conv; zero for padding entries.
//     x and dy are NHWC, (N, H, W, C) and (N, Ho, Wo, Cout), whose channel blocks each
//     entry copies out (the cheaper form when the entries are few), or block-major,
//     (C/bm, N, H, W, bm) and (Cout/bn, N, Ho, Wo, bn), read in place.
//   bsparse_bsr_conv_sddmm_by_pixels: the same for unit strides and blocks at most kNarrow
//     on each side, from NHWC x and dy, with output pixels in the vector lanes.
//
// Work is split over the XLA CPU client's intra-op thread pool; the calling thread takes
// work items too, so the kernels never wait on a pool that is busy elsewhere.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// Lane types: 8 floats, 4 floats or one float, with load/store/splat.
template <typename V>
struct Lane {
  static constexpr int kWidth = sizeof(V) / sizeof(float);
  static V Load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V Splat(float s) {
    if constexpr (kWidth == 8) {
      return V{s, s, s, s, s, s, s, s};
    } else if constexpr (kWidth == 4) {
      return V{s, s, s, s};
    } else {
      return s;
    }
  }
};

// acc[r][v] += sum_t a[r*sr + t*sk] * b[t*ldb + v*width : +width], for t < k.
template <typename V, int MR, int NV>
inline void Tile(const float* a, int64_t sr, int64_t sk, const float* b, int64_t ldb,
                 int64_t k, V (&acc)[MR][NV]) {
  using L = Lane<V>;
  for (int64_t t = 0; t < k; ++t) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = L::Load(b + t * ldb + v * L::kWidth);
    const float* at = a + t * sk;
    for (int r = 0; r < MR; ++r) {
      const V av = L::Splat(at[r * sr]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
}

// One product term of an output tile: rows of `a` against a block of `b`.
struct Term {
  const float* a;
  const float* b;
};

// Strides shared by all terms of a tile: a[r*sr + t*sk], b[t*ldb + c], t < k.
struct Strides {
  int64_t sr, sk, ldb, k;
};

// out[r, c : c + NV*width] (+)= the sum over terms, for MR rows.
template <typename V, int MR, int NV>
inline void Columns(const Term* terms, int64_t n_terms, const Strides& s, int64_t c,
                    float* out, int64_t ldo, bool accumulate) {
  using L = Lane<V>;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? L::Load(out + r * ldo + c + v * L::kWidth) : L::Splat(0.f);
    }
  }
  for (int64_t i = 0; i < n_terms; ++i) {
    Tile<V, MR, NV>(terms[i].a, s.sr, s.sk, terms[i].b + c, s.ldb, s.k, acc);
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) L::Store(out + r * ldo + c + v * L::kWidth, acc[r][v]);
  }
}

// All `width` columns of MR output rows: 16-wide chunks, then 8, 4 and single columns.
template <int MR>
void Rows(const Term* terms, int64_t n_terms, const Strides& s, int64_t width,
          float* out, int64_t ldo, bool accumulate) {
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) Columns<v8, MR, 2>(terms, n_terms, s, c, out, ldo, accumulate);
  for (; c + 8 <= width; c += 8) Columns<v8, MR, 1>(terms, n_terms, s, c, out, ldo, accumulate);
  for (; c + 4 <= width; c += 4) Columns<v4, MR, 1>(terms, n_terms, s, c, out, ldo, accumulate);
  for (; c < width; ++c) Columns<float, MR, 1>(terms, n_terms, s, c, out, ldo, accumulate);
}

constexpr int kMR = 6;  // rows per register tile (6 x 16 floats = 12 AVX registers)
constexpr int kNarrowMR = 16;  // rows per tile when it is at most 4 floats wide

// An output tile of `rows` x `width`: row r's terms start at term.a + r*s.sr. `shifted`
// is scratch for n_terms terms (the terms moved to each row tile). With `tall`, a tile at
// most 4 columns wide takes up to kNarrowMR rows in one register tile.
void OutputTile(const Term* terms, int64_t n_terms, const Strides& s, int64_t rows,
                int64_t width, float* out, int64_t ldo, bool accumulate, Term* shifted,
                bool tall = false) {
  for (int64_t r0 = 0, mr; r0 < rows; r0 += mr) {
    // 7-9 rows left: two tiles of 3-5 rather than a full one and a thin one.
    const int64_t left = rows - r0;
    mr = (left > kMR && left < kMR + 4) ? (left + 1) / 2 : std::min<int64_t>(kMR, left);
    if (tall && width <= 4 && left <= kNarrowMR) mr = left;
    for (int64_t i = 0; i < n_terms; ++i) shifted[i] = {terms[i].a + r0 * s.sr, terms[i].b};
    float* o = out + r0 * ldo;
    switch (mr) {
      case 16: Rows<16>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 15: Rows<15>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 14: Rows<14>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 13: Rows<13>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 12: Rows<12>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 11: Rows<11>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 10: Rows<10>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 9: Rows<9>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 8: Rows<8>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 7: Rows<7>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 6: Rows<6>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 5: Rows<5>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 4: Rows<4>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 3: Rows<3>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      case 2: Rows<2>(shifted, n_terms, s, width, o, ldo, accumulate); break;
      default: Rows<1>(shifted, n_terms, s, width, o, ldo, accumulate); break;
    }
  }
}

// Runs f(i) for i < n on the calling thread and the intra-op pool (work stealing).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // A helper that starts after all items are taken returns without touching f.
  auto work = [state, n, &f]() {
    int64_t count = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n; ++count) f(i);
    if (count > 0 && state->done.fetch_add(count) + count == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

constexpr int64_t kRowRange = 64;   // rows of x per work item of the product
constexpr int64_t kDepthTile = 256; // rows of a, b per pass of the sampled product

// Checks the (entry, offsets) schedule of `groups` output blocks over nnz_max entries
// whose input blocks `src` must lie below `inputs`.
ffi::Error CheckSchedule(const char* name, const int32_t* ent, const int32_t* off,
                         const int32_t* in, int64_t groups, int64_t nnz_max, int64_t inputs) {
  const std::string op(name);
  if (off[0] != 0 || off[groups] > nnz_max) {
    return ffi::Error::InvalidArgument(op + ": offsets out of range.");
  }
  for (int64_t g = 0; g < groups; ++g) {
    if (off[g + 1] < off[g]) return ffi::Error::InvalidArgument(op + ": offsets decrease.");
  }
  for (int64_t i = 0; i < off[groups]; ++i) {
    if (ent[i] < 0 || ent[i] >= nnz_max || in[ent[i]] < 0 || in[ent[i]] >= inputs) {
      return ffi::Error::InvalidArgument(op + ": block index out of range.");
    }
  }
  return ffi::Error::Success();
}

// Checks the stored block indices of entries e < count against a (m1, n1) grid.
ffi::Error CheckEntries(const char* name, const int32_t* rp, const int32_t* cp,
                        int64_t count, int64_t m1, int64_t n1) {
  for (int64_t e = 0; e < count; ++e) {
    if (rp[e] < 0 || rp[e] >= m1 || cp[e] < 0 || cp[e] >= n1) {
      return ffi::Error::InvalidArgument(std::string(name) + ": block index out of range.");
    }
  }
  return ffi::Error::Success();
}

// Checks a convolution's padding (below its taps) and strides (positive).
ffi::Error CheckWindow(const char* name, int64_t pad_top, int64_t pad_left, int64_t kh,
                       int64_t kw, int64_t sh, int64_t sw) {
  if (pad_top < 0 || pad_top >= kh || pad_left < 0 || pad_left >= kw) {
    return ffi::Error::InvalidArgument(std::string(name) + ": padding must lie in [0, taps).");
  }
  if (sh < 1 || sw < 1) {
    return ffi::Error::InvalidArgument(std::string(name) + ": strides must be positive.");
  }
  return ffi::Error::Success();
}

ffi::Error BsrMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> blocks, ffi::Buffer<ffi::S32> src,
                         ffi::Buffer<ffi::S32> entry, ffi::Buffer<ffi::S32> offsets,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || bd.size() != 3 || yd.size() != 2 || offsets.element_count() < 1) {
    return ffi::Error::InvalidArgument("bsr_matmul: x must be 2-D, blocks 3-D, y 2-D.");
  }
  const int64_t m = xd[0], k_in = xd[1], nnz_max = bd[0], bk = bd[1], bo = bd[2];
  const int64_t groups = offsets.element_count() - 1;
  if (yd[0] != m || yd[1] != groups * bo || bk == 0 || k_in % bk != 0 ||
      src.element_count() != nnz_max || entry.element_count() != nnz_max) {
    return ffi::Error::InvalidArgument("bsr_matmul: inconsistent operand shapes.");
  }
  const int32_t* ent = entry.typed_data();
  const int32_t* off = offsets.typed_data();
  const int32_t* in = src.typed_data();
  if (auto err = CheckSchedule("bsr_matmul", ent, off, in, groups, nnz_max, k_in / bk);
      err.failure()) {
    return err;
  }
  const float* xp = x.typed_data();
  const float* bp = blocks.typed_data();
  float* yp = y->typed_data();
  const int64_t n_out = groups * bo;
  const int64_t ranges = (m + kRowRange - 1) / kRowRange;
  const Strides s{k_in, 1, bo, bk};
  ParallelFor(pool, ranges * groups, [&](int64_t item) {
    const int64_t r = item / groups, g = item % groups;
    const int64_t row0 = r * kRowRange, rows = std::min(kRowRange, m - row0);
    const int64_t n_terms = off[g + 1] - off[g];
    std::unique_ptr<Term[]> terms(new Term[2 * std::max<int64_t>(n_terms, 1)]);
    for (int64_t i = 0; i < n_terms; ++i) {
      const int64_t e = ent[off[g] + i];
      terms[i] = {xp + row0 * k_in + in[e] * bk, bp + e * bk * bo};
    }
    OutputTile(terms.get(), n_terms, s, rows, bo, yp + row0 * n_out + g * bo, n_out,
               /*accumulate=*/false, terms.get() + n_terms);
  });
  return ffi::Error::Success();
}

ffi::Error BsrSddmmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> rows,
                        ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> nnz,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || od.size() != 3 || ad[0] != bd[0] ||
      nnz.element_count() != 1) {
    return ffi::Error::InvalidArgument("bsr_sddmm: a and b must be 2-D with equal rows.");
  }
  const int64_t depth = ad[0], lda = ad[1], ldb = bd[1];
  const int64_t nnz_max = od[0], bm = od[1], bn = od[2];
  if (bm == 0 || bn == 0 || lda % bm != 0 || ldb % bn != 0 ||
      rows.element_count() != nnz_max || cols.element_count() != nnz_max) {
    return ffi::Error::InvalidArgument("bsr_sddmm: inconsistent operand shapes.");
  }
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = cols.typed_data();
  const int64_t count = std::clamp<int64_t>(nnz.typed_data()[0], 0, nnz_max);
  if (auto err = CheckEntries("bsr_sddmm", rp, cp, count, lda / bm, ldb / bn); err.failure()) {
    return err;
  }
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* op = out->typed_data();
  std::fill(op + count * bm * bn, op + nnz_max * bm * bn, 0.f);
  ParallelFor(pool, count, [&](int64_t e) {
    // Depth tiles of the two column blocks are copied to contiguous (k, bm) and (k, bn)
    // buffers first: rows of a and b lie a whole feature row apart.
    std::unique_ptr<float[]> packed(new float[kDepthTile * (bm + bn)]);
    float* pa = packed.get();
    float* pb = pa + kDepthTile * bm;
    float* o = op + e * bm * bn;
    for (int64_t t0 = 0; t0 < std::max<int64_t>(depth, 1); t0 += kDepthTile) {
      const int64_t k = std::min(kDepthTile, depth - t0);
      for (int64_t t = 0; t < k; ++t) {
        std::memcpy(pa + t * bm, ap + (t0 + t) * lda + rp[e] * bm, bm * sizeof(float));
        std::memcpy(pb + t * bn, bp + (t0 + t) * ldb + cp[e] * bn, bn * sizeof(float));
      }
      const Term term{pa, pb};
      Term shifted;
      OutputTile(&term, 1, Strides{1, bm, bn, k}, bm, bn, o, bn, /*accumulate=*/t0 > 0,
                 &shifted);
    }
  });
  return ffi::Error::Success();
}

constexpr int64_t kConvPixels = 64;  // output pixels (whole lines of them) per work item
constexpr int64_t kLanes = 8;        // floats per v8: pixels per vector of the lane forms
constexpr int kNarrow = 4;           // widest block the pixel-lane forms take
constexpr int kChunkVectors = 4;     // pixel vectors per register tile of a line

// to[ch*ld + p] = row[p*c + ch] for p < pixels and ch < c: a row of NHWC pixels laid out
// channel-major, each channel's pixels ld floats after the previous channel's.
inline void ChannelMajor(const float* row, int64_t pixels, int64_t c, int64_t ld, float* to) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t ch = 0; ch < c; ++ch) to[ch * ld + p] = row[p * c + ch];
  }
}

// The operands and geometry of one bsparse_bsr_conv call (see the file comment).
struct Conv {
  const float* x;
  const float* blocks;
  const int32_t *src, *entry, *offsets;
  float* y;
  int64_t n, h_in, w_in, c, kh, kw, bk, bo, groups, ho, wo, pad_top, pad_left, sh, sw;

  int64_t lines() const { return n * ho; }
  int64_t n_out() const { return groups * bo; }
  int64_t lines_per_item() const { return std::max<int64_t>(1, kConvPixels / wo); }
  int64_t items() const { return (lines() + lines_per_item() - 1) / lines_per_item(); }
  // The most terms of one output block: its entries times the taps.
  int64_t most_terms() const {
    int64_t most = 1;
    for (int64_t g = 0; g < groups; ++g) {
      most = std::max<int64_t>(most, offsets[g + 1] - offsets[g]);
    }
    return most * kh * kw;
  }
  // Sets inside[dh] for the kh input rows output line `line` reads (whether each lies
  // inside x) and calls copy(dh, row) with each row that does, row pointing at its first
  // pixel in x.
  template <typename Copy>
  void ReadRows(int64_t line, bool* inside, const Copy& copy) const {
    for (int64_t dh = 0; dh < kh; ++dh) {
      const int64_t ih = line % ho * sh + dh - pad_top;
      inside[dh] = ih >= 0 && ih < h_in;
      if (inside[dh]) copy(dh, x + ((line / ho * h_in + ih) * w_in) * c);
    }
  }
  // The terms of output block g: each stored entry's taps whose input row lies inside x
  // (a padding row adds nothing); at(dh, dw, ch) points where tap (dh, dw) reads channel
  // ch of the tile's first output pixel. Returns their count.
  template <typename At>
  int64_t Terms(int64_t g, const bool* inside, const At& at, Term* terms) const {
    int64_t t = 0;
    for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
      const int64_t e = entry[i];
      for (int64_t dh = 0; dh < kh; ++dh) {
        if (!inside[dh]) continue;
        for (int64_t dw = 0; dw < kw; ++dw) {
          terms[t++] = {at(dh, dw, src[e] * bk), blocks + ((e * kh + dh) * kw + dw) * bk * bo};
        }
      }
    }
    return t;
  }
};

// The channels-in-lanes form: a tile's rows are output pixels, its columns (the lanes)
// output channels. A work item writes whole output lines (every group): narrow output
// blocks of one pixel share cache lines, which two threads writing them would pass back
// and forth.
void ConvByChannels(ffi::ThreadPool& pool, const Conv& cv) {
  const int64_t wp = (cv.wo - 1) * cv.sw + cv.kw, c = cv.c, kh = cv.kh;
  const int64_t copied = std::max<int64_t>(0, std::min(cv.w_in, wp - cv.pad_left));
  const int64_t most = cv.most_terms(), per_item = cv.lines_per_item();
  const Strides s{cv.sw * c, 1, cv.bo, cv.bk};  // a tile's rows are pixels sw apart
  ParallelFor(pool, cv.items(), [&](int64_t r) {
    std::unique_ptr<Term[]> terms(new Term[2 * most]);
    // The kh input rows a line reads, zero-padded to wp pixels: window[dh] holds input
    // row h*sh + dh - pad_top at columns [pad_left, pad_left + w_in).
    std::unique_ptr<float[]> window(new float[kh * wp * c]());
    std::unique_ptr<bool[]> inside(new bool[kh]);
    for (int64_t line = r * per_item; line < std::min(cv.lines(), (r + 1) * per_item);
         ++line) {
      cv.ReadRows(line, inside.get(), [&](int64_t dh, const float* in_row) {
        std::memcpy(window.get() + (dh * wp + cv.pad_left) * c, in_row,
                    copied * c * sizeof(float));
      });
      const auto at = [&](int64_t dh, int64_t dw, int64_t ch) {
        return window.get() + (dh * wp + dw) * c + ch;
      };
      for (int64_t g = 0; g < cv.groups; ++g) {
        const int64_t t = cv.Terms(g, inside.get(), at, terms.get());
        float* out = cv.y + line * cv.wo * cv.n_out() + g * cv.bo;
        OutputTile(terms.get(), t, s, cv.wo, cv.bo, out, cv.n_out(), /*accumulate=*/false,
                   terms.get() + most, /*tall=*/true);
      }
    }
  });
}

// out[(j*NV + v)*kLanes + l] = the sum over terms and t < bk of
// a[t*lda + v*kLanes + l] * b[t*BO + j]: BO output channels of NV*kLanes pixels, the
// pixels in the lanes.
template <int BO, int NV>
void PixelTile(const Term* terms, int64_t n_terms, int64_t bk, int64_t lda, float* out) {
  using L = Lane<v8>;
  v8 acc[BO][NV];
  for (int j = 0; j < BO; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = L::Splat(0.f);
  }
  for (int64_t i = 0; i < n_terms; ++i) {
    const float* a = terms[i].a;
    const float* b = terms[i].b;
    for (int64_t t = 0; t < bk; ++t, a += lda, b += BO) {
      v8 av[NV];
      for (int v = 0; v < NV; ++v) av[v] = L::Load(a + v * kLanes);
      for (int j = 0; j < BO; ++j) {
        const v8 bv = L::Splat(b[j]);
        for (int v = 0; v < NV; ++v) acc[j][v] += bv * av[v];
      }
    }
  }
  for (int j = 0; j < BO; ++j) {
    for (int v = 0; v < NV; ++v) L::Store(out + (j * NV + v) * kLanes, acc[j][v]);
  }
}

template <int BO>
void PixelTileOf(int64_t nv, const Term* terms, int64_t n_terms, int64_t bk, int64_t lda,
                 float* out) {
  switch (nv) {
    case 1: PixelTile<BO, 1>(terms, n_terms, bk, lda, out); break;
    case 2: PixelTile<BO, 2>(terms, n_terms, bk, lda, out); break;
    case 3: PixelTile<BO, 3>(terms, n_terms, bk, lda, out); break;
    default: PixelTile<BO, 4>(terms, n_terms, bk, lda, out); break;
  }
}

// PixelTile for bo <= kNarrow output channels and nv <= kChunkVectors pixel vectors.
void PixelTileOf(int64_t bo, int64_t nv, const Term* terms, int64_t n_terms, int64_t bk,
                 int64_t lda, float* out) {
  switch (bo) {
    case 1: PixelTileOf<1>(nv, terms, n_terms, bk, lda, out); break;
    case 2: PixelTileOf<2>(nv, terms, n_terms, bk, lda, out); break;
    case 3: PixelTileOf<3>(nv, terms, n_terms, bk, lda, out); break;
    default: PixelTileOf<4>(nv, terms, n_terms, bk, lda, out); break;
  }
}

// The pixels-in-lanes form, for unit stride along w and output blocks at most kNarrow
// wide (where the channels-in-lanes form leaves most lanes idle): each line's kh input
// rows are copied channel-major, c rows of wp pixels zero-padded past the line's last
// vector, and each tap's term reads kLanes neighbouring output pixels of one channel.
void ConvByPixels(ffi::ThreadPool& pool, const Conv& cv) {
  const int64_t wq = (cv.wo + kLanes - 1) / kLanes * kLanes, wp = wq + cv.kw - 1;
  const int64_t c = cv.c, kh = cv.kh, chunk = kChunkVectors * kLanes;
  const int64_t copied = std::max<int64_t>(0, std::min(cv.w_in, wp - cv.pad_left));
  const int64_t most = cv.most_terms(), per_item = cv.lines_per_item();
  ParallelFor(pool, cv.items(), [&](int64_t r) {
    std::unique_ptr<Term[]> terms(new Term[most]);
    // window[(dh*c + ch)*wp + pad_left + p] = channel ch of input pixel p of row dh.
    std::unique_ptr<float[]> window(new float[kh * c * wp]());
    std::unique_ptr<float[]> tile(new float[kNarrow * chunk]);
    std::unique_ptr<bool[]> inside(new bool[kh]);
    for (int64_t line = r * per_item; line < std::min(cv.lines(), (r + 1) * per_item);
         ++line) {
      cv.ReadRows(line, inside.get(), [&](int64_t dh, const float* in_row) {
        ChannelMajor(in_row, copied, c, wp, window.get() + dh * c * wp + cv.pad_left);
      });
      for (int64_t p0 = 0; p0 < cv.wo; p0 += chunk) {
        const int64_t width = std::min(chunk, cv.wo - p0);
        const int64_t nv = (width + kLanes - 1) / kLanes;
        const auto at = [&](int64_t dh, int64_t dw, int64_t ch) {
          return window.get() + (dh * c + ch) * wp + dw + p0;
        };
        for (int64_t g = 0; g < cv.groups; ++g) {
          const int64_t t = cv.Terms(g, inside.get(), at, terms.get());
          PixelTileOf(cv.bo, nv, terms.get(), t, cv.bk, wp, tile.get());
          float* out = cv.y + (line * cv.wo + p0) * cv.n_out() + g * cv.bo;
          for (int64_t p = 0; p < width; ++p) {
            for (int64_t j = 0; j < cv.bo; ++j) {
              out[p * cv.n_out() + j] = tile[j * nv * kLanes + p];
            }
          }
        }
      }
    }
  });
}

ffi::Error BsrConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> blocks, ffi::Buffer<ffi::S32> src,
                       ffi::Buffer<ffi::S32> entry, ffi::Buffer<ffi::S32> offsets,
                       ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left,
                       int64_t sh, int64_t sw) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || bd.size() != 5 || yd.size() != 4 || offsets.element_count() < 1) {
    return ffi::Error::InvalidArgument("bsr_conv: x must be 4-D, blocks 5-D, y 4-D.");
  }
  const Conv cv{x.typed_data(), blocks.typed_data(), src.typed_data(), entry.typed_data(),
                offsets.typed_data(), y->typed_data(),
                xd[0], xd[1], xd[2], xd[3], bd[1], bd[2], bd[3], bd[4],
                static_cast<int64_t>(offsets.element_count()) - 1, yd[1], yd[2],
                pad_top, pad_left, sh, sw};
  const int64_t nnz_max = bd[0];
  if (yd[0] != cv.n || yd[3] != cv.n_out() || cv.bk == 0 || cv.c % cv.bk != 0 ||
      src.element_count() != nnz_max || entry.element_count() != nnz_max) {
    return ffi::Error::InvalidArgument("bsr_conv: inconsistent operand shapes.");
  }
  if (auto err = CheckWindow("bsr_conv", pad_top, pad_left, cv.kh, cv.kw, sh, sw);
      err.failure()) {
    return err;
  }
  if (auto err = CheckSchedule("bsr_conv", cv.entry, cv.offsets, cv.src, cv.groups, nnz_max,
                               cv.c / cv.bk);
      err.failure()) {
    return err;
  }
  if (cv.n * cv.ho * cv.wo == 0) return ffi::Error::Success();
  if (sw == 1 && cv.bo <= kNarrow) {
    ConvByPixels(pool, cv);
  } else {
    ConvByChannels(pool, cv);
  }
  return ffi::Error::Success();
}

// A conv operand's channel blocks, NHWC (N, H, W, C) or block-major (C/b, N, H, W, b), of
// width b (0 when the layout is not one of the two).
struct ChannelBlocks {
  const float* data;
  int64_t n = 0, h = 0, w = 0, c = 0, b = 0;
  bool block_major = false;

  ChannelBlocks(const ffi::Buffer<ffi::F32>& a, int64_t width) : data(a.typed_data()) {
    const auto d = a.dimensions();
    if (d.size() == 4 && width > 0 && d[3] % width == 0) {
      n = d[0], h = d[1], w = d[2], c = d[3], b = width;
    } else if (d.size() == 5 && width > 0 && d[4] == width) {
      n = d[1], h = d[2], w = d[3], c = d[0] * width, b = width, block_major = true;
    }
  }
  int64_t pixels() const { return n * h * w; }
  // Channel block k as (pixels, b), contiguous: in place when block-major, else copied
  // into `scratch` (pixels * b floats).
  const float* Slab(int64_t k, float* scratch) const {
    if (block_major) return data + k * pixels() * b;
    for (int64_t p = 0; p < pixels(); ++p) {
      std::memcpy(scratch + p * b, data + p * c + k * b, b * sizeof(float));
    }
    return scratch;
  }
};

ffi::Error BsrConvSddmmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> rows,
                            ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> nnz,
                            ffi::ResultBuffer<ffi::F32> out, int64_t pad_top,
                            int64_t pad_left, int64_t sh, int64_t sw) {
  const auto od = out->dimensions();
  if (od.size() != 5 || nnz.element_count() != 1) {
    return ffi::Error::InvalidArgument("bsr_conv_sddmm: out must be 5-D, nnz one count.");
  }
  const int64_t nnz_max = od[0], kh = od[1], kw = od[2], bm = od[3], bn = od[4];
  const ChannelBlocks xb(x, bm), db(dy, bn);
  if (!xb.b || !db.b || xb.block_major != db.block_major || xb.n != db.n) {
    return ffi::Error::InvalidArgument(
        "bsr_conv_sddmm: x and dy must both be NHWC, or both block-major, with equal batch "
        "and channels a multiple of the block.");
  }
  if (kh < 1 || kw < 1 || rows.element_count() != nnz_max ||
      cols.element_count() != nnz_max) {
    return ffi::Error::InvalidArgument("bsr_conv_sddmm: inconsistent operand shapes.");
  }
  if (auto err = CheckWindow("bsr_conv_sddmm", pad_top, pad_left, kh, kw, sh, sw);
      err.failure()) {
    return err;
  }
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = cols.typed_data();
  const int64_t count = std::clamp<int64_t>(nnz.typed_data()[0], 0, nnz_max);
  if (auto err = CheckEntries("bsr_conv_sddmm", rp, cp, count, xb.c / bm, db.c / bn);
      err.failure()) {
    return err;
  }
  float* op = out->typed_data();
  const int64_t h_in = xb.h, w_in = xb.w, ho = db.h, wo = db.w;
  const int64_t taps = kh * kw, tap_size = bm * bn, lines = xb.n * ho;
  std::fill(op + count * taps * tap_size, op + nnz_max * taps * tap_size, 0.f);
  // One work item per entry: its x and dy channel blocks as contiguous slabs (pixels bm
  // and bn floats apart), then each tap's (bm, bn) tile summed over every output line,
  // each line a term over the pixels whose input pixel lies inside x, the same for every
  // line of the tap.
  ParallelFor(pool, count, [&](int64_t e) {
    std::unique_ptr<float[]> xcopy, dcopy;
    if (!xb.block_major) {
      xcopy.reset(new float[xb.pixels() * bm]);
      dcopy.reset(new float[db.pixels() * bn]);
    }
    const float* xs = xb.Slab(rp[e], xcopy.get());
    const float* ds = db.Slab(cp[e], dcopy.get());
    std::unique_ptr<Term[]> terms(new Term[2 * std::max<int64_t>(lines, 1)]);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int64_t dh = tap / kw, dw = tap % kw;
      // Output pixels [w0, w1) read input pixels w*sw + dw - pad_left inside [0, w_in).
      const int64_t w0 = std::max<int64_t>(0, (pad_left - dw + sw - 1) / sw);
      const int64_t w1 = std::min<int64_t>(wo, (w_in + pad_left - dw + sw - 1) / sw);
      int64_t t = 0;
      for (int64_t line = 0; line < lines && w1 > w0; ++line) {
        const int64_t b = line / ho, ih = line % ho * sh + dh - pad_top;
        if (ih < 0 || ih >= h_in) continue;
        terms[t++] = {xs + ((b * h_in + ih) * w_in + w0 * sw + dw - pad_left) * bm,
                      ds + (line * wo + w0) * bn};
      }
      OutputTile(terms.get(), t, Strides{1, sw * bm, bn, w1 - w0}, bm, bn,
                 op + (e * taps + tap) * tap_size, bn, /*accumulate=*/false,
                 terms.get() + lines);
    }
  });
  return ffi::Error::Success();
}

// sums[i*BN + j] += the sum over l < lines and p < wq of
// x[i*x_ch + l*wp + p] * dy[j*dy_ch + l*wq + p]: one tap's (BM, BN) tile from channel-major
// rows, the pixels in the lanes.
template <int BM, int BN>
void PixelSums(const float* x, int64_t x_ch, const float* dy, int64_t dy_ch, int64_t lines,
               int64_t wp, int64_t wq, float* sums) {
  using L = Lane<v8>;
  v8 acc[BM][BN];
  for (int i = 0; i < BM; ++i) {
    for (int j = 0; j < BN; ++j) acc[i][j] = L::Splat(0.f);
  }
  for (int64_t l = 0; l < lines; ++l) {
    const float* xr = x + l * wp;
    const float* dr = dy + l * wq;
    for (int64_t p = 0; p < wq; p += kLanes) {
      v8 xv[BM], dv[BN];
      for (int i = 0; i < BM; ++i) xv[i] = L::Load(xr + i * x_ch + p);
      for (int j = 0; j < BN; ++j) dv[j] = L::Load(dr + j * dy_ch + p);
      for (int i = 0; i < BM; ++i) {
        for (int j = 0; j < BN; ++j) acc[i][j] += xv[i] * dv[j];
      }
    }
  }
  for (int i = 0; i < BM; ++i) {
    for (int j = 0; j < BN; ++j) {
      float total = 0.f;
      for (int l = 0; l < kLanes; ++l) total += acc[i][j][l];
      sums[i * BN + j] += total;
    }
  }
}

using PixelSumsFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t,
                             int64_t, float*);

template <int BM>
PixelSumsFn PixelSumsOf(int64_t bn) {
  switch (bn) {
    case 1: return PixelSums<BM, 1>;
    case 2: return PixelSums<BM, 2>;
    case 3: return PixelSums<BM, 3>;
    default: return PixelSums<BM, 4>;
  }
}

// PixelSums for a (bm, bn) block, each side at most kNarrow.
PixelSumsFn PixelSumsOf(int64_t bm, int64_t bn) {
  switch (bm) {
    case 1: return PixelSumsOf<1>(bn);
    case 2: return PixelSumsOf<2>(bn);
    case 3: return PixelSumsOf<3>(bn);
    default: return PixelSumsOf<4>(bn);
  }
}

constexpr int64_t kSumLines = 16;  // output lines of one image per chunk

// bsparse_bsr_conv_sddmm_by_pixels: bsparse_bsr_conv_sddmm for unit strides and blocks at
// most kNarrow on each side, from NHWC x and dy. Each chunk of an image's output lines
// copies the input rows it reads and its dy rows channel-major (zero-padded, pixels to a
// multiple of kLanes) into a work item's buffers, and every entry's taps read them there,
// kLanes neighbouring pixels at a time. A work item sums its chunks into its own tiles;
// the items' tiles are added at the end.
ffi::Error BsrConvSddmmByPixelsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> rows,
                                    ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> nnz,
                                    ffi::ResultBuffer<ffi::F32> out, int64_t pad_top,
                                    int64_t pad_left, int64_t sh, int64_t sw) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), od = out->dimensions();
  const std::string name = "bsr_conv_sddmm_by_pixels";
  if (xd.size() != 4 || dd.size() != 4 || od.size() != 5 || nnz.element_count() != 1) {
    return ffi::Error::InvalidArgument(name + ": x and dy must be 4-D, out 5-D, nnz one count.");
  }
  const int64_t nnz_max = od[0], kh = od[1], kw = od[2], bm = od[3], bn = od[4];
  const int64_t n = xd[0], h_in = xd[1], w_in = xd[2], c = xd[3];
  const int64_t ho = dd[1], wo = dd[2], cout = dd[3];
  if (bm < 1 || bm > kNarrow || bn < 1 || bn > kNarrow || c % bm != 0 || cout % bn != 0 ||
      dd[0] != n || rows.element_count() != nnz_max || cols.element_count() != nnz_max) {
    return ffi::Error::InvalidArgument(name + ": inconsistent operand shapes.");
  }
  if (sh != 1 || sw != 1) return ffi::Error::InvalidArgument(name + ": strides must be 1.");
  if (auto err = CheckWindow(name.c_str(), pad_top, pad_left, kh, kw, sh, sw);
      err.failure()) {
    return err;
  }
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = cols.typed_data();
  const int64_t count = std::clamp<int64_t>(nnz.typed_data()[0], 0, nnz_max);
  if (auto err = CheckEntries(name.c_str(), rp, cp, count, c / bm, cout / bn);
      err.failure()) {
    return err;
  }
  const int64_t taps = kh * kw, tile = bm * bn, per_entry = taps * tile;
  float* op = out->typed_data();
  std::fill(op, op + nnz_max * per_entry, 0.f);
  if (count == 0 || n * ho * wo == 0) return ffi::Error::Success();
  const int64_t wq = (wo + kLanes - 1) / kLanes * kLanes, wp = wq + kw - 1;
  const int64_t lines = std::min(ho, kSumLines), rows_in = lines + kh - 1;
  const int64_t copied = std::max<int64_t>(0, std::min(w_in, wp - pad_left));
  const int64_t per_image = (ho + lines - 1) / lines, chunks = n * per_image;
  const int64_t items = std::min<int64_t>(chunks, 4 * (pool.num_threads() + 1));
  std::unique_ptr<float[]> partial(new float[items * count * per_entry]());
  const PixelSumsFn sums = PixelSumsOf(bm, bn);
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  ParallelFor(pool, items, [&](int64_t item) {
    // xt[(ch*rows_in + r)*wp + pad_left + p]: channel ch of input pixel p of the chunk's
    // row r; dt[(ch*lines + l)*wq + p]: channel ch of dy's pixel p of its line l.
    std::unique_ptr<float[]> xt(new float[c * rows_in * wp]);
    std::unique_ptr<float[]> dt(new float[cout * lines * wq]());
    float* mine = partial.get() + item * count * per_entry;
    for (int64_t k = item * chunks / items; k < (item + 1) * chunks / items; ++k) {
      const int64_t b = k / per_image, h0 = k % per_image * lines;
      const int64_t here = std::min(lines, ho - h0);
      std::fill(xt.get(), xt.get() + c * rows_in * wp, 0.f);
      for (int64_t r = 0; r < here + kh - 1; ++r) {
        const int64_t ih = h0 + r - pad_top;
        if (ih < 0 || ih >= h_in) continue;
        ChannelMajor(xp + (b * h_in + ih) * w_in * c, copied, c, rows_in * wp,
                     xt.get() + r * wp + pad_left);
      }
      for (int64_t l = 0; l < here; ++l) {
        ChannelMajor(dp + (b * ho + h0 + l) * wo * cout, wo, cout, lines * wq,
                     dt.get() + l * wq);
      }
      for (int64_t e = 0; e < count; ++e) {
        const float* xs = xt.get() + rp[e] * bm * rows_in * wp;
        const float* ds = dt.get() + cp[e] * bn * lines * wq;
        for (int64_t tap = 0; tap < taps; ++tap) {
          sums(xs + tap / kw * wp + tap % kw, rows_in * wp, ds, lines * wq, here, wp, wq,
               mine + e * per_entry + tap * tile);
        }
      }
    }
  });
  for (int64_t item = 0; item < items; ++item) {
    const float* from = partial.get() + item * count * per_entry;
    for (int64_t i = 0; i < count * per_entry; ++i) op[i] += from[i];
  }
  return ffi::Error::Success();
}

// All kernels take the thread pool, two f32 and three s32 operands, and return f32.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// The convolutions also take their padding and strides.
auto ConvBinding() {
  return Binding()
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BsrMatmul, BsrMatmulImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BsrSddmm, BsrSddmmImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BsrConv, BsrConvImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BsrConvSddmm, BsrConvSddmmImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BsrConvSddmmByPixels, BsrConvSddmmByPixelsImpl,
                              ConvBinding());
