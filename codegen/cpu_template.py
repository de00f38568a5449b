"""The C++/OpenMP templates of the cpu target, in two parts.

``SPEC`` is what one spec compiles: its tensor reads, mask, score mod and derivatives, the mask pass
(``attncc_masks``, the keep bytes of every partial tile) and two hooks the runtime calls once per row: the
score mod over a row of scores, and the backward's softmax gradient through it (``attncc_hooks``). It is
about 200 lines and builds in a fraction of a second. ``RUNTIME`` is everything else: the fixed forward and
backward, GEMMs and micro-kernels, RoPE; it depends only on the tile size, so it is built once per machine
and tile size and shared by every spec (the disk cache keeps both). Holes: ``{name}`` fields filled by
:mod:`attncc.codegen.cpu` from the plan. The toolchain compiles the text between
``// ---- attncc: next translation unit ----`` lines as separate units (each prefixed with the shared part
before the first such line), in parallel.

Forward: one OpenMP task per (batch, head, q-block), dynamic schedule (tiles per q-block vary);
each task walks its kv-block list (CSR from the block map), computes S = Q K^T, applies the
score mod (the spec's hook) on every tile and the mask on partial tiles only, runs the online softmax (base 2) and
accumulates P V. Block products run in register-blocked FMA micro-kernels (K and V packed into
panels once per call) where the head dim and kv tile allow, else in the BLAS ``sgemm_`` torch
ships (or a portable loop). On partial tiles the micro-kernels go finer than the tile: the mask pass
records each row's and each column's kept range, and every register block (6 rows) computes only
the column panels and the shared-dimension range its rows keep (the causal diagonal, window edges,
a neighborhood's columns), in the forward and in all five backward products.
Backward: delta = rowsum(dO * O) first; then one task per (batch, kv head, kv block) walking the
transposed lists for every query head of the group; dK and dV are owned by the task, dQ goes to a
per-thread partial, and the team sums the partials into dQ at the end.
"""

# both parts: light headers (math from compiler builtins), small helpers, the tile size
# what every generated C++ file needs: infinity, min and max (also the linear-attention kernels')
BASICS = r"""constexpr float INF = __builtin_inff();
template <class T> inline T min_of(T a, T b) {{ return b < a ? b : a; }}
template <class T> inline T max_of(T a, T b) {{ return a < b ? b : a; }}
"""

# the functions the C++ expression printer (emit_cpp) calls
EXPR_HELPERS = r"""// floor division and modulo with Python/sympy semantics
inline int64_t fdiv(int64_t a, int64_t b) {{
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}}
inline int64_t fmod_i(int64_t a, int64_t b) {{
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}}
inline double fmod_f(double a, double b) {{ return a - b * __builtin_floor(a / b); }}
inline int64_t abs_i(int64_t a) {{ return a < 0 ? -a : a; }}
inline double sign_f(double a) {{ return (a > 0) - (a < 0); }}
"""

_HEAD = (
    r"""#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

namespace {{

"""
    + BASICS
    + r"""inline void fill(float* x, int64_t n, float value) {{ for (int64_t i = 0; i < n; ++i) x[i] = value; }}

// an array on the heap, uninitialized unless ``zero``, freed at the end of its scope; 64-byte aligned (a cache
// line): malloc's 16 bytes put every row of an AMX tile load or store across two lines (glibc serves blocks of
// 128 KiB and more, the forward's scores among them, by mmap at 16 bytes past a page); the aligned buffers made the
// bf16 backward 1.05-1.15x and the forward up to 1.09x faster (benchmarks/cpu_ab.py, BENCHMARKS.md)
template <class T>
struct Aligned {{
  T* p = nullptr;
  Aligned() = default;
  explicit Aligned(int64_t n, bool zero = false) {{ resize(n, zero); }}
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() {{ std::free(p); }}
  void resize(int64_t n, bool zero = false) {{
    std::free(p);
    p = nullptr;
    if (n <= 0) return;
    const size_t bytes = ((size_t)n * sizeof(T) + 63) / 64 * 64;  // (aligned_alloc takes whole alignments)
    p = (T*)std::aligned_alloc(64, bytes);
    if (zero) std::memset(p, 0, bytes);
  }}
  T* data() const {{ return p; }}
  T& operator[](int64_t i) const {{ return p[i]; }}
}};
using Buf = Aligned<float>;

constexpr int BQ = {bq};
constexpr int BKV = {bkv};
"""
)

# both parts: what a spec's code sees of a call, and the hooks the runtime calls
_CTX = r"""struct Ctx {{
  int64_t B, H, Sq, Skv;
  const void* const* tensors;
  const int64_t* dims;  // 4 dims per tensor
  int* error;
}};

// What the per-spec library gives the runtime: its score mod applied to rows of a tile, and the backward's
// per-row softmax gradient through the score mod (null when the spec has no score mod; the runtime then runs
// its own vector loops), and whether it accumulates gradients of learned tables.
typedef void (*mod_rows_t)(const Ctx* cx, float scale, float* s, int ld, int rows, int cols, int64_t b, int64_t h,
                           int64_t q0, int64_t k0);
typedef void (*backward_row_t)(const Ctx* cx, float scale, float* sr, float* dr, const uint8_t* kr, int cols,
                               float lse, float delta, int64_t b, int64_t h, int64_t q, int64_t k0, float* tg,
                               const int64_t* tg_off);
struct Hooks {{
  mod_rows_t mod_rows;
  backward_row_t backward_row;
  int table_grads;
}};
"""

# both parts: the layout of a partial tile's keep record (the spec writes it, the runtime reads it)
_RECORD = r"""// A partial tile's record in the keep buffer (filled by attncc_masks): BQ x BKV keep bytes,
// row-major, then each row's kept columns [lo, hi) as two int16 (lo = BKV, hi = 0 for a row that
// keeps nothing), then each column's kept rows the same way
constexpr int64_t KEEP_BYTES = ((int64_t)BQ * BKV + 3) / 4 * 4;  // padded: the ranges stay int16-aligned
constexpr int64_t TILE_BYTES = KEEP_BYTES + 4 * BQ + 4 * BKV;
inline const int16_t* kept_ranges(const uint8_t* tile) {{ return (const int16_t*)(tile + KEEP_BYTES); }}
inline const int16_t* kept_col_ranges(const uint8_t* tile) {{ return kept_ranges(tile) + 2 * BQ; }}
// the record of partial tile number ``rank`` of (batch, head) pair ``pair`` (its tiles start at keep_base[pair])
template <class T> inline T* tile_record(T* keep, const int64_t* keep_base, int64_t pair, int32_t rank) {{
  return keep + (keep_base[pair] + rank) * TILE_BYTES;
}}

"""

# both parts: the softmax's 2^x
_EXP2 = r"""// 2^x for the softmax, which runs in base 2 (log2(e) folds into the score scale): x = n + r with
// n = round(x) (exact), 2^r by a degree-5 minimax polynomial on [-1/2, 1/2] (relative error
// < 2e-7), 2^n through the exponent bits; vectorizable; 2^-inf = 0 exactly; 2^NaN = NaN (a NaN in q or
// k reaches the row's sum and output, as in torch, instead of looking like a masked key).
constexpr float LOG2E = 1.44269504088896341f, LN2 = 0.693147180559945309f;
inline float exp2_f(float x) {{
  if (x < -127.0f) return 0.0f;  // NaN fails this test and every step below keeps it NaN
  x = min_of(x, 127.0f);
  const float n = __builtin_nearbyintf(x), r = x - n;
  float p = 1.32646796e-3f;
  p = p * r + 9.67150275e-3f; p = p * r + 5.55073395e-2f; p = p * r + 2.40222424e-1f;
  p = p * r + 6.93147004e-1f; p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale; std::memcpy(&scale, &bits, 4);
  return p * scale;
}}
"""

SPEC = (
    r"""// attncc cpu kernel for @{name}: the spec's own code (mask, score mod, derivatives, tensor reads)
// generated from the kernel plan; tiles {bq}x{bkv}. The fixed forward and backward are in the cpu
// runtime for these tiles (see CpuKernel.runtime_source), built once per machine and shared.
// light headers only: math comes from compiler builtins
"""
    + _HEAD
    + r"""constexpr bool HAS_MOD = {has_mod};

"""
    + _CTX
    + "\n"
    + _RECORD
    + _EXP2
    + r"""
"""
    + EXPR_HELPERS
    + r"""
{accessors}

// mask: {mask_text}
inline bool mask_fn(const Ctx& cx, int64_t b, int64_t h, int64_t q, int64_t kv) {{
  (void)cx; (void)b; (void)h; (void)q; (void)kv;
  const int64_t B = cx.B, H = cx.H, Sq = cx.Sq, Skv = cx.Skv; (void)B; (void)H; (void)Sq; (void)Skv;
  return {mask_code};
}}

// score_mod: {mod_text}
inline float mod_fn(const Ctx& cx, float score, int64_t b, int64_t h, int64_t q, int64_t kv) {{
  (void)cx; (void)b; (void)h; (void)q; (void)kv;
  const int64_t B = cx.B, H = cx.H, Sq = cx.Sq, Skv = cx.Skv; (void)B; (void)H; (void)Sq; (void)Skv;
  return (float)({mod_code});
}}

// d score_mod / d score: {dmod_text}
inline float dmod_fn(const Ctx& cx, float score, int64_t b, int64_t h, int64_t q, int64_t kv) {{
  (void)cx; (void)score; (void)b; (void)h; (void)q; (void)kv;
  const int64_t B = cx.B, H = cx.H, Sq = cx.Sq, Skv = cx.Skv; (void)B; (void)H; (void)Sq; (void)Skv;
  return (float)({dmod_code});
}}

// gradients of the float tables the score mod reads (learned biases): g = dL/d(score_mod) times
// d score_mod / d entry, added to the calling thread's partial sums (table t's slice at tg_off[t])
constexpr bool TABLE_GRADS = {table_grads_on};
inline void table_grads_fn(const Ctx& cx, float g, float score, int64_t b, int64_t h, int64_t q, int64_t kv,
                           float* tg, const int64_t* tg_off) {{
  (void)cx; (void)g; (void)score; (void)b; (void)h; (void)q; (void)kv; (void)tg; (void)tg_off;
  const int64_t B = cx.B, H = cx.H, Sq = cx.Sq, Skv = cx.Skv; (void)B; (void)H; (void)Sq; (void)Skv;
{table_grads_code}
}}


}}  // namespace

// bytes of one partial tile's record in the keep buffer (checked against the runtime's by CpuKernel)
extern "C" int64_t attncc_tile_bytes() {{ return TILE_BYTES; }}

extern "C" void attncc_mod_rows(const Ctx* cx, float scale, float* s, int ld, int rows, int cols, int64_t b,
                                int64_t h, int64_t q0, int64_t k0) {{
  for (int i = 0; i < rows; ++i) {{
    float* row = s + i * ld;
    for (int j = 0; j < cols; ++j) row[j] = mod_fn(*cx, row[j] * scale, b, h, q0 + i, k0 + j);
  }}
}}

// one row of the backward through the score mod: P from the scores and lse, dS = P (dP - delta) d mod/d score
// (0 where masked, even if the derivative is not finite there), and the learned tables' gradients
extern "C" void attncc_backward_row(const Ctx* cx, float scale, float* sr, float* dr, const uint8_t* kr, int cols,
                                    float li, float di, int64_t b, int64_t h, int64_t q, int64_t k0, float* tg,
                                    const int64_t* tg_off) {{
  for (int j = 0; j < cols; ++j) {{
    const float raw = sr[j] * scale;
    const float sc = mod_fn(*cx, raw, b, h, q, k0 + j);
    const float p = (!kr || kr[j]) ? exp2_f((sc - li) * LOG2E) : 0.0f;
    const float dmod = dmod_fn(*cx, raw, b, h, q, k0 + j);
    sr[j] = p;
    if (TABLE_GRADS && tg && p != 0.0f) table_grads_fn(*cx, p * (dr[j] - di), raw, b, h, q, k0 + j, tg, tg_off);
    dr[j] = p == 0.0f ? 0.0f : p * (dr[j] - di) * dmod * scale;
  }}
}}

extern "C" const Hooks* attncc_hooks() {{
  static const Hooks hooks{{HAS_MOD ? attncc_mod_rows : nullptr, HAS_MOD ? attncc_backward_row : nullptr,
                           TABLE_GRADS ? 1 : 0}};
  return &hooks;
}}

// Evaluate the mask once per call on every partial tile of every (batch, head) pair that has its
// own mask; forward and backward then read these bytes instead of running mask code.
extern "C" int attncc_masks(
    uint8_t* keep, int64_t B, int64_t H, int64_t Sq, int64_t Skv,
    const int32_t* map_of, int64_t maps_b, int64_t maps_h,
    const int32_t* kv_ptr, const int32_t* kv_idx, const int32_t* kv_rank, const int64_t* keep_base,
    const void* const* tensors, const int64_t* dims, int threads) {{
  const int64_t nq = (Sq + BQ - 1) / BQ;
  int error = 0;
  const Ctx cx{{B, H, Sq, Skv, tensors, dims, &error}};
  #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < maps_b * maps_h * nq; ++task) {{
    const int64_t qb = task % nq, pair = task / nq, b = pair / maps_h, h = pair % maps_h;
    const int64_t row = (int64_t)map_of[pair] * nq + qb, q0 = qb * BQ;
    const int rows = (int)min_of<int64_t>(BQ, Sq - q0);
    for (int32_t t = kv_ptr[row]; t < kv_ptr[row + 1]; ++t) {{
      if (kv_rank[t] < 0) continue;
      uint8_t* out = tile_record(keep, keep_base, pair, kv_rank[t]);
      int16_t* rng = (int16_t*)(out + KEEP_BYTES);  // rows' kept columns, then columns' kept rows
      int16_t* col_rng = rng + 2 * BQ;
      for (int j = 0; j < BKV; ++j) {{ col_rng[2 * j] = BQ; col_rng[2 * j + 1] = 0; }}
      const int64_t k0 = (int64_t)kv_idx[t] * BKV;
      const int cols = (int)min_of<int64_t>(BKV, Skv - k0);
      for (int i = 0; i < BQ; ++i) {{
        int lo = BKV, hi = 0;
        for (int j = 0; i < rows && j < cols; ++j) {{
          const bool kept = mask_fn(cx, b, h, q0 + i, k0 + j);
          out[i * BKV + j] = kept ? 1 : 0;
          if (kept) {{
            lo = min_of(lo, j);
            hi = j + 1;
            col_rng[2 * j] = min_of<int16_t>(col_rng[2 * j], (int16_t)i);
            col_rng[2 * j + 1] = (int16_t)(i + 1);
          }}
        }}
        rng[2 * i] = (int16_t)lo;
        rng[2 * i + 1] = (int16_t)hi;
      }}
    }}
  }}
  return error;
}}

"""
)

RUNTIME = (
    r"""// attncc cpu runtime: the fixed forward and backward for {bq}x{bkv} tiles, shared by every spec
// with these tiles; the spec's own code (mask bytes, score mod, derivatives) comes from its library
// through Hooks
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>  // the softmax's, the native bf16 products' and the fp16 and bf16 widenings' intrinsics (the
// spec libraries stay light)
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>  // arch_prctl: Linux lends AMX tile state to processes that ask for it
#include <unistd.h>
#endif
"""
    + _HEAD
    + r"""constexpr int SPAN = {span};  // consecutive tiles of equal kind merged into one GEMM (up to SPAN tiles)
constexpr int SPAN_Q = {span_q};  // the same for the backward's runs of q-blocks
constexpr int WKV = BKV * SPAN, WQ = BQ * SPAN_Q;
// the forwards' score rows are LDS floats apart: at a power-of-two stride (WKV) the rows of a register block or
// an AMX tile share a few cache sets and evict each other
constexpr int LDS = WKV + 16;
constexpr int SPAN_MAX = SPAN > SPAN_Q ? SPAN : SPAN_Q;

typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*,
                        const float*, const int*, const float*, const int*, const float*, float*, const int*);

"""
    + _CTX
    + r""""""
    + _EXP2
    + r"""
// C[m x n] (row-major, ldc) (+)= A[m x k] * B^T where B is [n x k] row-major: "nt"
inline void gemm_nt(sgemm_t sg, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                    float* c, int ldc, float beta) {{
  if (sg) {{ const float one = 1.0f; sg("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc); return; }}
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {{
      float s = 0.0f;
      for (int d = 0; d < k; ++d) s += a[i * lda + d] * b[j * ldb + d];
      c[i * ldc + j] = beta * c[i * ldc + j] + s;
    }}
}}

// C[m x n] += A[m x k] * B[k x n], all row-major: "nn"
inline void gemm_nn(sgemm_t sg, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                    float* c, int ldc) {{
  if (sg) {{ const float one = 1.0f; sg("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc); return; }}
  for (int i = 0; i < m; ++i)
    for (int d = 0; d < k; ++d) {{
      const float av = a[i * lda + d];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[d * ldb + j];
    }}
}}

// C[m x n] += A^T * B where A is [k x m] and B is [k x n], row-major: "tn"
inline void gemm_tn(sgemm_t sg, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                    float* c, int ldc) {{
  if (sg) {{ const float one = 1.0f; sg("N", "T", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc); return; }}
  for (int d = 0; d < k; ++d)
    for (int i = 0; i < m; ++i) {{
      const float av = a[d * lda + i];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[d * ldb + j];
    }}
}}

// Register-blocked micro-kernels for the forward's two products: an MR x NR block of the result
// lives in 2 * MR vector registers while the shared dimension streams through. K is packed once
// per call into panels of NR keys ([D][NR] each, zero past Skv) so the QK^T kernel loads whole
// vectors; V is read in place (NR columns of a row are contiguous). Used where D and BKV are
// multiples of NR and the CPU has FMA vectors; otherwise the BLAS path above.
#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
#if (defined(__AVX2__) && defined(__FMA__)) || defined(__AVX512F__)
constexpr bool SIMD = true;
#else
constexpr bool SIMD = false;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // unaligned view of floats
// rows per register block: 2 * MR accumulators, the two B vectors and a broadcast fit the register file
// (AVX2: 16 vector registers, 6 rows; AVX-512: 32, 12 rows)
constexpr int MR = VW == 16 ? 12 : 6, NR = 2 * VW;

// C[M x NR] (op)= A . B over a shared dimension of n, with A(i, j) = a[i * ai + j * aj] and B's row j
// at b + j * ldb. MODE 0 stores, 1 accumulates, 2 rescales C's row i by alpha[i] first (online softmax). V = 1:
// only the first NR / 2 columns (one vector per row).
template <int M, int MODE, int V = 2>
inline void micro(int n, const float* a, int64_t ai, int64_t aj, const float* b, int64_t ldb, float* c, int64_t ldc,
                  const float* alpha) {{
  // the loops over rows unrolled by pragma, early enough that c0 and c1 become registers: left to gcc 12, they stay
  // an array on the stack that the epilogue copies through (a tenth of a 32-deep product's time; with the pragma
  // the bf16 forward ran 1.04-1.10x and the backwards 1.03-1.08x, Zen 4; micro_bf the same)
  vf c0[M], c1[M];
  #pragma GCC unroll 16
  for (int i = 0; i < M; ++i) c0[i] = c1[i] = vf{{}};
  for (int j = 0; j < n; ++j) {{
    const vf b0 = *(const vfu*)(b + j * ldb), b1 = V == 2 ? *(const vfu*)(b + j * ldb + VW) : b0;
    #pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {{
      const float x = a[i * ai + j * aj];
      c0[i] += x * b0;
      if constexpr (V == 2) c1[i] += x * b1;
    }}
  }}
  #pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {{
    vfu* out0 = (vfu*)(c + i * ldc);
    vfu* out1 = (vfu*)(c + i * ldc + VW);
    if (MODE == 0) *out0 = c0[i];
    if (MODE == 1) *out0 += c0[i];
    if (MODE == 2) *out0 = *out0 * alpha[i] + c0[i];
    if constexpr (V == 2) {{
      if (MODE == 0) *out1 = c1[i];
      if (MODE == 1) *out1 += c1[i];
      if (MODE == 2) *out1 = *out1 * alpha[i] + c1[i];
    }}
  }}
}}

// micro<m, MODE, V> for a runtime m in 1..MR
template <int MODE, int V = 2>
inline void micro_m(int m, int n, const float* a, int64_t ai, int64_t aj, const float* b, int64_t ldb, float* c,
                    int64_t ldc, const float* alpha) {{
  switch (m) {{
    case 1: micro<1, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 2: micro<2, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 3: micro<3, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 4: micro<4, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 5: micro<5, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
#if defined(__AVX512F__)
    case 6: micro<6, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 7: micro<7, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 8: micro<8, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 9: micro<9, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 10: micro<10, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
    case 11: micro<11, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
#endif
    default: micro<MR, MODE, V>(n, a, ai, aj, b, ldb, c, ldc, alpha); break;
  }}
}}

// C[rows x cols] (op)= A . B, cols a multiple of NR; B's column block x (NR wide) starts at b + x * bc
// (bc = 1: B row-major with row stride ldb; bc = n, ldb = NR: B packed in panels by pack_panels)
template <int MODE>
inline void gemm_micro(int rows, int cols, int n, const float* a, int64_t ai, int64_t aj, const float* b, int64_t bc,
                       int64_t ldb, float* c, int64_t ldc, const float* alpha = nullptr) {{
  int i = 0;
  for (; i + MR <= rows; i += MR)
    for (int x = 0; x < cols; x += NR)
      micro<MR, MODE>(n, a + i * ai, ai, aj, b + x * bc, ldb, c + i * ldc + x, ldc, alpha ? alpha + i : nullptr);
  const float* ar = a + i * ai;
  const float* al = alpha ? alpha + i : nullptr;
  for (int x = 0; x < cols && i < rows; x += NR)
    micro_m<MODE>(rows - i, n, ar, ai, aj, b + x * bc, ldb, c + i * ldc + x, ldc, al);
}}

// gemm_micro with A's rows contiguous (aj = 1), for the fp32 backward's S, dP (MODE 0) and dQ (MODE 1): on 256-key
// tiles, while one row block passes the column blocks, the next row block's A rows (MODE 0: q or dO, read once per
// kv block) or C rows (MODE 1: this thread's fp32 dQ partial, far from L1) are asked for ahead, a share with each
// column block. Those products 1.08-1.16x and the backward 1.03-1.04x at D = 128 (Zen 4, TSC per product); on the
// forward's narrower tiles (documents, D = 64) the backward lost 4%, so they run plain gemm_micro.
template <int MODE>
inline void gemm_micro_ahead(int rows, int cols, int n, const float* a, int64_t ai, const float* b, int64_t bc,
                             int64_t ldb, float* c, int64_t ldc) {{
  if constexpr (BKV < 256) {{
    gemm_micro<MODE>(rows, cols, n, a, ai, 1, b, bc, ldb, c, ldc);
  }} else {{
    const int blocks = cols / NR, lines = (MODE == 0 ? n : cols) / 16;  // 64-byte lines of one row ahead
    const float* ahead = MODE == 0 ? a : c;
    const int64_t stride = MODE == 0 ? ai : ldc;
    for (int i = 0; i < rows; i += MR) {{
      const int m = min_of(MR, rows - i), next = min_of(MR, rows - i - MR);
      for (int x = 0, xi = 0; x < cols; x += NR, ++xi) {{
        for (int r = xi; r < next * lines; r += blocks)
          __builtin_prefetch(ahead + (i + MR + r / lines) * stride + r % lines * 16, MODE, 3);
        micro_m<MODE>(m, n, a + i * ai, ai, 1, b + x * bc, ldb, c + i * ldc + x, ldc, nullptr);
      }}
    }}
  }}
}}

// whether a call runs the register-blocked products: the caller passes a workspace exactly where
// CpuKernel.products() says so (it reads the lanes from attncc_vector_lanes), and the shapes fit
inline bool use_micro(const float* work, int64_t D) {{ return work && SIMD && D % NR == 0 && BKV % NR == 0; }}

typedef uint16_t bf16_t;  // bf16 values as their bits

// an output value stored as fp32, or as bf16 rounded to nearest even (as torch's cast; a NaN stays a quiet NaN)
inline void put(float* out, float x) {{ *out = x; }}
inline void put(bf16_t* out, float x) {{
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  *out = nan ? (bf16_t)((u >> 16) | 0x40u) : (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}}

// fp16 values as their bits, for the fp32 kernels' fp16 inputs and outputs (attncc_forward and attncc_backward with
// narrow = 1, on CPUs with F16C and no AMX): widened to fp32 as they are read (exact), rounded to nearest even as
// they are written (as torch's cast; NaN stays NaN, overflow goes to inf). bf16 (narrow = 2, where the build has no
// AVX512_BF16): widened by shifting the bits up (exact), rounded by put(bf16_t*)
struct half_t {{
  uint16_t bits;
}};
#if defined(__F16C__) && ((defined(__AVX2__) && defined(__FMA__)) || defined(__AVX512F__))
constexpr bool F16C = true;
inline void put(half_t* out, float x) {{ out->bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }}
inline float widen1(const half_t* x) {{ return _cvtsh_ss(x->bits); }}
// VW fp16 values as one fp32 vector, and back
inline vf widen_h(const half_t* x) {{
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)x));
#else
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)x));
#endif
}}
inline void store_h(half_t* out, vf x) {{
#if defined(__AVX512F__)
  _mm256_storeu_si256((__m256i*)out, _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT));
#else
  _mm_storeu_si128((__m128i*)out, _mm256_cvtps_ph((__m256)x, _MM_FROUND_TO_NEAREST_INT));
#endif
}}
// n fp16 values widened into fp32 (a row of q, dO or k, before the fp32 products read it)
inline void widen_row(const half_t* x, float* out, int64_t n) {{
  int64_t c = 0;
  for (; c + VW <= n; c += VW) *(vfu*)(out + c) = widen_h(x + c);
  for (; c < n; ++c) out[c] = widen1(x + c);
}}
#else
constexpr bool F16C = false;  // (attncc_f16c says 0: the caller upcasts fp16 and never passes half)
inline void put(half_t*, float) {{}}
inline float widen1(const half_t*) {{ return 0.0f; }}
inline vf widen_h(const half_t*) {{ return vf{{}}; }}
inline void widen_row(const half_t*, float*, int64_t) {{}}
#endif

inline float widen1(const bf16_t* x) {{
  const uint32_t u = (uint32_t)*x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}}
// VW bf16 values as one fp32 vector (each value's bits shifted up 16: exact)
inline vf widen_h(const bf16_t* x) {{
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)x)), 16);
#else
  vf r;
  for (int u = 0; u < VW; ++u) r[u] = widen1(x + u);
  return r;
#endif
}}
inline void widen_row(const bf16_t* x, float* out, int64_t n) {{
  int64_t c = 0;
  for (; c + VW <= n; c += VW) *(vfu*)(out + c) = widen_h(x + c);
  for (; c < n; ++c) out[c] = widen1(x + c);
}}

// The fp32 kernels' narrow inputs and outputs (narrow: 1 fp16, 2 bf16): n values from element ``at`` of x widened
// into out, or put from fp32 x (rounded once)
inline void widen_at(const void* x, int narrow, int64_t at, float* out, int64_t n) {{
  if (narrow == 1) widen_row((const half_t*)x + at, out, n);
  else widen_row((const bf16_t*)x + at, out, n);
}}
inline void put_at(void* out, int narrow, int64_t at, const float* x, int64_t n);

// n fp32 values x * f out as T (fp32, bf16 or fp16; fp16 VW at a time)
template <class T>
inline void put_row(T* out, const float* x, int64_t n, float f = 1.0f) {{
  int64_t c = 0;
#if defined(__F16C__) && ((defined(__AVX2__) && defined(__FMA__)) || defined(__AVX512F__))
  if constexpr (std::is_same_v<T, half_t>)
    for (; c + VW <= n; c += VW) store_h(out + c, *(const vfu*)(x + c) * f);
#endif
  #pragma omp simd
  for (int64_t u = c; u < n; ++u) put(out + u, x[u] * f);
}}
inline void put_at(void* out, int narrow, int64_t at, const float* x, int64_t n) {{
  if (narrow == 1) put_row((half_t*)out + at, x, n);
  else put_row((bf16_t*)out + at, x, n);
}}

// The backwards' dQ row r (fp32 or bf16): the sum of the team's per-thread partials (thread u's rows at
// parts + u * rows_all * D), added in thread order; 64 columns at a time, threads outside, so that every
// loop is a plain vector loop (an inner loop over threads kept the compiler to scalar code)
template <class T>
inline void sum_partials(T* out, const float* parts, int64_t r, int64_t rows_all, int64_t D, int team) {{
  constexpr int64_t W = 64;
  float x[W];
  for (int64_t c0 = 0; c0 < D; c0 += W) {{
    const int64_t w = min_of<int64_t>(W, D - c0);
    const float* first = parts + r * D + c0;
    for (int64_t c = 0; c < w; ++c) x[c] = first[c];
    for (int u = 1; u < team; ++u) {{
      const float* more = parts + (u * rows_all + r) * D + c0;
      for (int64_t c = 0; c < w; ++c) x[c] += more[c];
    }}
    put_row(out + c0, x, w);
  }}
}}

// round n up to a multiple of NR
inline int up_nr(int n) {{ return (n + NR - 1) / NR * NR; }}

"""
    + _RECORD
    + r"""// the union [lo, hi) of the ranges of lines i..i+m-1 (2 int16 per line) in a tile ``ext`` long across them
inline void kept_cols(const int16_t* rng, int i, int m, int& lo, int& hi, int ext = BKV) {{
  lo = ext;
  hi = 0;
  for (int r = i; r < i + m; ++r) {{
    lo = min_of<int>(lo, rng[2 * r]);
    hi = max_of<int>(hi, rng[2 * r + 1]);
  }}
}}

// Scores S[rows x cols] = A . B of one partial tile (as gemm_micro<0>), skipping the NR-wide column panels
// that no row of a register block keeps, and the half of a panel none keeps (2-D neighborhoods: a query's keys in
// a grid row are one short run, which often lies in one half): those scores stay unset, and the keep bytes turn
// them into -inf (forward) or 0 (backward) right after. rng: the rows' kept columns.
inline void scores_kept(int rows, int cols, int n, const float* a, int64_t ai, const float* b, int64_t bc, int64_t ldb,
                        float* c, int64_t ldc, const int16_t* rng) {{
  for (int i = 0; i < rows; i += MR) {{
    const int m = min_of(MR, rows - i);
    int lo, hi;
    kept_cols(rng, i, m, lo, hi);
    for (int x = lo / NR * NR; x < min_of(hi, cols); x += NR) {{
      const float* bx = b + x * bc;
      float* cx = c + i * ldc + x;
      if (lo >= x + VW)  // the panel's kept keys all in its upper half, or all in its lower half: that half
        micro_m<0, 1>(m, n, a + i * ai, ai, 1, bx + VW, ldb, cx + VW, ldc, nullptr);
      else if (hi <= x + VW)
        micro_m<0, 1>(m, n, a + i * ai, ai, 1, bx, ldb, cx, ldc, nullptr);
      else
        micro_m<0>(m, n, a + i * ai, ai, 1, bx, ldb, cx, ldc, nullptr);
    }}
  }}
}}

// C[rows x d] (MODE 1: +=, MODE 2: = C * alpha +) P . B over a run of partial tiles stacked along the shared
// dimension (``ext`` long each), P(i, j) = p[i * ai + j * aj] zero outside row i's kept range in each tile:
// each register block of rows multiplies only the union [lo, hi) of its rows' ranges in each tile. rng[u]:
// tile u's ranges (2 int16 per row of C). B: row j at b + j * ldb.
template <int MODE>
inline void products_kept(int rows, int d, const float* p, int64_t ai, int64_t aj, int ext, const float* b,
                          int64_t ldb, float* c, int64_t ldc, const float* alpha, const int16_t* const* rng,
                          int tiles) {{
  int lo[SPAN_MAX], hi[SPAN_MAX];
  for (int i = 0; i < rows; i += MR) {{
    const int m = min_of(MR, rows - i);
    for (int u = 0; u < tiles; ++u) kept_cols(rng[u], i, m, lo[u], hi[u], ext);
    for (int x = 0; x < d; x += NR) {{
      bool first = true;  // MODE 2 rescales C once, with the first tile that has kept columns
      for (int u = 0; u < tiles; ++u) {{
        if (hi[u] <= lo[u]) continue;
        const int j0 = u * ext + lo[u];
        const float* pa = p + i * ai + j0 * aj;
        const float* pb = b + j0 * ldb + x;
        float* pc = c + i * ldc + x;
        if (MODE == 2 && first) micro_m<2>(m, hi[u] - lo[u], pa, ai, aj, pb, ldb, pc, ldc, alpha + i);
        else micro_m<1>(m, hi[u] - lo[u], pa, ai, aj, pb, ldb, pc, ldc, nullptr);
        first = false;
      }}
      if (MODE == 2 && first) micro_m<2>(m, 0, p, ai, aj, b, ldb, c + i * ldc + x, ldc, alpha + i);  // rescale only
    }}
  }}
}}

// ---- few query rows per key (decoding) in fp32: K and V read in place, no packing and no sgemm call ----
// A task of at most FEW_ROWS rows (one-token decoding: one) would make sgemm a matrix-vector product per tile, whose
// per-call dispatch costs more than its keys at Skv = 4K (MKL's sgemv: over half a GQA decode step's time).
constexpr int FEW_ROWS = 8;

// the sum of a vector's lanes
inline float lane_sum(vf x) {{
  float t = 0.0f;
  for (int u = 0; u < VW; ++u) t += x[u];
  return t;
}}

// VW values of a row as one fp32 vector: fp32 as they are, fp16 widened
inline vf load_v(const float* x) {{ return *(const vfu*)x; }}
inline vf load_v(const half_t* x) {{ return widen_h(x); }}
inline vf load_v(const bf16_t* x) {{ return widen_h(x); }}

// The lane sums of VW vectors as one vector: e[u] holds key slot_key(u)'s products and lane j of the result is key j's
// score (the tree's transposes scramble the slots; slot_key is chosen to unscramble them). log2(VW) levels, each
// adding two shuffles of pairs of vectors: VW - 1 vector adds for VW keys, where lane_sum takes VW - 1 scalar adds per
// key (one-token decoding's scores were bound by them)
#if defined(__AVX512F__)
constexpr int slot_key(int u) {{ return u % 4 * 4 + u / 4; }}
constexpr int key_slot(int j) {{ return j % 4 * 4 + j / 4; }}  // (its inverse)
__attribute__((always_inline)) inline vf sum_lanes(const vf* e) {{
  __m512 a[8], b[4], c[2];
  for (int u = 0; u < 8; ++u) {{  // [slot 2u's 8 partial sums | slot 2u + 1's]
    const __m512 x = (__m512)e[2 * u], y = (__m512)e[2 * u + 1];
    a[u] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }}
  for (int u = 0; u < 4; ++u)  // 128-bit block k: slot 4u + k's 4
    b[u] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * u], a[2 * u + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * u], a[2 * u + 1], 0xDD));
  for (int u = 0; u < 2; ++u)  // block k: slot 8u + k's 2, then slot 8u + 4 + k's 2
    c[u] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * u], b[2 * u + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * u], b[2 * u + 1], 0xEE));
  // lane 4k + p: slot k + 4p, which holds key 4k + p
  return (vf)_mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}}
#elif defined(__AVX2__)
constexpr int slot_key(int u) {{ return u % 2 * 4 + u / 2; }}
constexpr int key_slot(int j) {{ return j % 4 * 2 + j / 4; }}  // (its inverse)
__attribute__((always_inline)) inline vf sum_lanes(const vf* e) {{
  __m256 a[4], b[2];
  for (int u = 0; u < 4; ++u) {{  // [slot 2u's 4 partial sums | slot 2u + 1's]
    const __m256 x = (__m256)e[2 * u], y = (__m256)e[2 * u + 1];
    a[u] = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
  }}
  for (int u = 0; u < 2; ++u)  // block k: slot 4u + k's 2, then slot 4u + 2 + k's 2
    b[u] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * u], a[2 * u + 1], 0x44),
                         _mm256_shuffle_ps(a[2 * u], a[2 * u + 1], 0xEE));
  // lane 4k + p: slot k + 2p, which holds key 4k + p
  return (vf)_mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}}
#endif

// S[rows x cols] = Q K^T, Q's rows (d wide, d a multiple of VW) at q, K's rows (fp32, fp16 or bf16) at k. VW keys at a
// time per row: each key's products along the head dim in one vector, the VW vectors' lanes summed by sum_lanes (the
// VW keys stay in L1 for the next rows); the last cols % VW keys one at a time, each loaded once for every row
template <class T>
inline void scores_rows(int rows, int cols, int d, const float* q, const T* k, float* s, int ld) {{
  int j0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; j0 + VW <= cols; j0 += VW)
    for (int i = 0; i < rows; ++i) {{
      const float* qi = q + (int64_t)i * d;
      const T* kj = k + (int64_t)j0 * d;
      vf e[VW];
      for (int u = 0; u < VW; ++u) e[u] = vf{{}};
      #pragma GCC unroll 16
      for (int j = 0; j < VW; ++j)  // keys in memory order (the hardware prefetchers follow it), each into its slot
        for (int x = 0; x < d; x += VW) e[key_slot(j)] += *(const vfu*)(qi + x) * load_v(kj + (int64_t)j * d + x);
      *(vfu*)(s + i * ld + j0) = sum_lanes(e);
    }}
#endif
  for (int j = j0; j < cols; ++j) {{
    const T* kj = k + (int64_t)j * d;
    for (int i = 0; i < rows; ++i) {{
      const float* qi = q + (int64_t)i * d;
      vf e{{}}, o{{}};
      int x = 0;
      for (; x + 2 * VW <= d; x += 2 * VW) {{
        e += *(const vfu*)(qi + x) * load_v(kj + x);
        o += *(const vfu*)(qi + x + VW) * load_v(kj + x + VW);
      }}
      if (x < d) e += *(const vfu*)(qi + x) * load_v(kj + x);
      s[i * ld + j] = lane_sum(e + o);
    }}
  }}
}}

// out[0 .. N * VW) = out * a + p . V over cols keys (values_rows' inner loop at a constant N: no per-key checks); V's
// rows at v (stride d), even and odd keys on separate accumulators (two FMA chains)
template <int N, class T, class Load>
inline void values_cols(int cols, int d, const float* p, const T* v, float* out, float a, Load load) {{
  vf e[N], o[N];
  for (int u = 0; u < N; ++u) {{
    e[u] = a * *(const vfu*)(out + VW * u);
    o[u] = vf{{}};
  }}
  int j = 0;
  for (; j + 2 <= cols; j += 2) {{
    const T* v0 = v + (int64_t)j * d;
    for (int u = 0; u < N; ++u) {{
      e[u] += p[j] * load(v0 + VW * u);
      o[u] += p[j + 1] * load(v0 + d + VW * u);
    }}
  }}
  if (j < cols)
    for (int u = 0; u < N; ++u) e[u] += p[j] * load(v + (int64_t)j * d + VW * u);
  for (int u = 0; u < N; ++u) *(vfu*)(out + VW * u) = e[u] + o[u];
}}

// values_cols on R rows at once (p's rows at stride ld, out's at stride d, their alphas at a): each V vector loaded
// once for the R rows (a GQA group's heads in one task: keys read once), one FMA chain per accumulator
constexpr int VR = VW == 16 ? 4 : 2;  // rows of values_cols_rows: R x 4 accumulators and the V vectors in registers
template <int N, class T, class Load>
inline void values_cols_rows(int cols, int d, const float* p, int ld, const T* v, float* out, const float* a,
                             Load load) {{
  vf e[VR][N];
  for (int r = 0; r < VR; ++r)
    for (int u = 0; u < N; ++u) e[r][u] = a[r] * *(const vfu*)(out + r * d + VW * u);
  for (int j = 0; j < cols; ++j) {{
    const T* vj = v + (int64_t)j * d;
    vf x[N];
    for (int u = 0; u < N; ++u) x[u] = load(vj + VW * u);
    for (int r = 0; r < VR; ++r) {{
      const float pr = p[r * ld + j];
      for (int u = 0; u < N; ++u) e[r][u] += pr * x[u];
    }}
  }}
  for (int r = 0; r < VR; ++r)
    for (int u = 0; u < N; ++u) *(vfu*)(out + r * d + VW * u) = e[r][u];
}}

// acc[rows x d] = acc * alpha + P . V, P fp32 (stride ld), V's rows at v (d a multiple of VW), VW of a row's values
// read as one fp32 vector by load (fp32: as they are; fp16, bf16: widened); 4 vectors of columns at a time in
// registers, VR rows at a time (values_cols_rows), the rest one by one (values_cols)
template <class T, class Load>
inline void values_rows(int rows, int cols, int d, const float* p, int ld, const T* v, float* acc, const float* alpha,
                        Load load) {{
  int i0 = 0;
  for (; i0 + VR <= rows; i0 += VR)
    for (int c0 = 0; c0 < d; c0 += 4 * VW) {{
      const float* pr = p + (int64_t)i0 * ld;
      float* out = acc + i0 * d + c0;
      switch (min_of(4, (d - c0) / VW)) {{
        case 4: values_cols_rows<4>(cols, d, pr, ld, v + c0, out, alpha + i0, load); break;
        case 3: values_cols_rows<3>(cols, d, pr, ld, v + c0, out, alpha + i0, load); break;
        case 2: values_cols_rows<2>(cols, d, pr, ld, v + c0, out, alpha + i0, load); break;
        default: values_cols_rows<1>(cols, d, pr, ld, v + c0, out, alpha + i0, load); break;
      }}
    }}
  for (int i = i0; i < rows; ++i)
    for (int c0 = 0; c0 < d; c0 += 4 * VW) {{
      const float* pr = p + (int64_t)i * ld;
      float* out = acc + i * d + c0;
      switch (min_of(4, (d - c0) / VW)) {{
        case 4: values_cols<4>(cols, d, pr, v + c0, out, alpha[i], load); break;
        case 3: values_cols<3>(cols, d, pr, v + c0, out, alpha[i], load); break;
        case 2: values_cols<2>(cols, d, pr, v + c0, out, alpha[i], load); break;
        default: values_cols<1>(cols, d, pr, v + c0, out, alpha[i], load); break;
      }}
    }}
}}

// a NaN of x[0..n), or 0 when there is none (only asked of rows whose max is -inf: rare)
inline float first_nan(const float* x, int n) {{
  for (int j = 0; j < n; ++j)
    if (x[j] != x[j]) return x[j];
  return 0.0f;
}}

// max of x[0..n): vector lanes, then the lanes (gcc leaves an omp simd max reduction scalar)
inline float row_max(const float* x, int n) {{
  float r = -INF;
  int j = 0;
  if (SIMD && n >= VW) {{
    vf acc = *(const vfu*)x;
    for (j = VW; j + VW <= n; j += VW) {{
      const vf y = *(const vfu*)(x + j);
      acc = acc > y ? acc : y;
    }}
    for (int u = 0; u < VW; ++u) r = max_of(r, acc[u]);
  }}
  for (; j < n; ++j) r = max_of(r, x[j]);
  return r;
}}

// A q-block task's running state before its first tile: no output, max -inf, sum 0
inline void start_rows(float* acc, float* m, float* l, int64_t D) {{
  fill(acc, BQ * D, 0.0f);
  fill(m, BQ, -INF);
  fill(l, BQ, 0.0f);
}}

// A q-block task's rows written out (fp32 or bf16 o): o = acc / l (0 for rows that saw nothing; NaN stays NaN) and
// lse = m ln 2 + ln l (-inf for rows that saw nothing), rows starting at flat row ``first`` of [B, H, Sq]
template <class T>
inline void finish_rows(T* o, float* lse, const float* acc, const float* m, const float* l, int rows, int64_t D,
                        int64_t first) {{
  for (int i = 0; i < rows; ++i) {{
    T* out = o + (first + i) * D;
    put_row(out, acc + i * D, D, l[i] != 0.0f ? 1.0f / l[i] : 0.0f);
    lse[first + i] = l[i] != 0.0f ? m[i] * LN2 + __builtin_logf(l[i]) : -INF;
  }}
}}

// Split-kv jobs (see attncc_forward) merged exactly: split j left o_j and lse_j over its share of the keys for each
// of the ``rows`` flat output rows ([B, H, Sq]; o_j at part_o + (j * rows + r) * D); o = sum_j w_j o_j / sum_j w_j
// with w_j = exp(lse_j - max lse), lse = max lse + ln sum w (a row no split saw: zeros, -inf; NaN stays NaN)
constexpr int MAX_SPLITS = 64;
template <class T>
inline void merge_splits(T* o, float* lse, const float* part_o, const float* part_lse, int splits, int64_t rows,
                         int64_t D, int threads) {{
  #pragma omp parallel num_threads(threads)
  {{
    Buf sum_o(D);  // the row's weighted sum in fp32, then stored as T
    float* acc = sum_o.data();
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {{
      float top = -INF, w[MAX_SPLITS], sum = 0.0f;
      bool nan = false;
      for (int j = 0; j < splits; ++j) {{
        const float x = part_lse[j * rows + r];
        top = max_of(top, x);
        nan = nan || x != x;
      }}
      if (nan || top == -INF) {{  // a NaN score reached a split; or no split saw a key
        fill(acc, D, nan ? __builtin_nanf("") : 0.0f);
        lse[r] = nan ? __builtin_nanf("") : -INF;
      }} else {{
        fill(acc, D, 0.0f);
        for (int j = 0; j < splits; ++j) sum += w[j] = __builtin_expf(part_lse[j * rows + r] - top);
        for (int j = 0; j < splits; ++j) {{
          const float* src = part_o + (j * rows + r) * D;
          const float f = w[j] / sum;
          for (int64_t c = 0; c < D; ++c) acc[c] += f * src[c];
        }}
        lse[r] = top + __builtin_logf(sum);
      }}
      put_row(o + r * D, acc, D);
    }}
  }}
}}

// The kv tiles [lo, hi) of split ``split`` of ``splits`` of one q-block row's list (an equal share of its tiles)
inline void split_range(const int32_t* kv_ptr, int64_t row, int64_t split, int splits, int32_t& lo, int32_t& hi) {{
  const int64_t n = kv_ptr[row + 1] - kv_ptr[row];
  lo = kv_ptr[row] + (int32_t)(n * split / splits);
  hi = kv_ptr[row] + (int32_t)(n * (split + 1) / splits);
}}

// The forward's jobs: (b, h, q-block) tasks, each split into ``splits`` kv ranges (CpuKernel.kv_splits: when tasks are
// fewer than threads, as in decoding with few heads; or when the query heads of a GQA group would each stream the
// same long K and V from memory) whose partial (o, lse) merge_splits combines. Split jobs run in (b, q-block, kv
// head, split, query head of the group) order, a group's heads in one dynamic chunk: one thread reads a split's
// keys once from memory for all the heads that share them.
// Grouped (group: every query head of a kv head in one job, (b, kv head, split) order): the group's rows (its heads'
// Sq rows each, consecutive heads: contiguous in q and o) read each key once (few rows per key,
// CpuKernel.grouped_jobs).
struct Jobs {{
  int64_t B, H, Hkv, Sq, D, nq, rows;
  const int64_t* HEADS;
  int splits;
  bool group;
  Buf o, lse;  // splits x rows partial outputs (empty when unsplit)
  Jobs(int64_t B_, int64_t H_, int64_t Hkv_, int64_t Sq_, int64_t D_, const int64_t* heads, int kv_splits,
       bool group_ = false)
      : B(B_), H(H_), Hkv(Hkv_), Sq(Sq_), D(D_), nq((Sq_ + BQ - 1) / BQ), rows(B_ * H_ * Sq_), HEADS(heads),
        splits(max_of(1, min_of(MAX_SPLITS, kv_splits))), group(group_), o(splits > 1 ? splits * rows * D : 0),
        lse(splits > 1 ? splits * rows : 0) {{}}
  int64_t count() const {{ return B * (group ? Hkv : H) * nq * splits; }}
  int chunk() const {{  // a GQA group's jobs on one split
    int most = 1;
    for (int64_t hk = 0; splits > 1 && !group && hk < Hkv; ++hk)
      most = max_of(most, (int)(HEADS[H + hk + 1] - HEADS[H + hk]));
    return most;
  }}
  // query heads of kv head hk (grouped jobs: the job's rows are theirs, from head ``h`` on)
  int64_t heads_of(int64_t hk) const {{ return HEADS[H + hk + 1] - HEADS[H + hk]; }}
  // a job's query heads (from h on: 1 unless grouped) and rows (q-block rows from q0, of each of those heads)
  void rows_of(int64_t hk, int64_t q0, int64_t& heads, int& rows) const {{
    heads = group ? heads_of(hk) : 1;
    rows = group ? (int)(heads * Sq) : (int)min_of<int64_t>(BQ, Sq - q0);
  }}
  // whether the grouped jobs' layout holds: each kv head's query heads consecutive, all rows of a group in one task
  static bool groups_fit(int64_t H, int64_t Hkv, int64_t Sq, const int64_t* HEADS) {{
    for (int64_t h = 0; h < H; ++h)
      if (HEADS[H + Hkv + 1 + h] != h) return false;
    for (int64_t hk = 0; hk < Hkv; ++hk)
      if ((HEADS[H + hk + 1] - HEADS[H + hk]) * Sq > BQ) return false;
    return true;
  }}
  void of(int64_t job, int64_t& b, int64_t& h, int64_t& qb, int64_t& split) const {{
    if (group) {{  // (nq == 1) h: the group's first head; a kv head no query head reads has an empty job
      split = job % splits, qb = 0;
      const int64_t hk = (job / splits) % Hkv;
      b = job / (splits * Hkv), h = heads_of(hk) ? HEADS[H + hk] : -1;
      return;
    }}
    if (splits == 1) {{
      qb = job % nq, h = (job / nq) % H, b = job / (nq * H), split = 0;
      return;
    }}
    const int64_t per = H * splits, bq = job / per, *ptr = HEADS + H, *heads = HEADS + H + Hkv + 1;
    int64_t p = job % per, hk = 0;
    b = bq / nq, qb = bq % nq;
    while (p >= ptr[hk + 1] * splits) ++hk;  // (a kv head no query head reads has no jobs)
    const int64_t g = ptr[hk + 1] - ptr[hk], local = p - ptr[hk] * splits;
    split = local / g, h = heads[ptr[hk] + local % g];
  }}
  // a job's rows written out: into the output when unsplit, else into its split's partials
  template <class T>
  void finish(T* out, float* out_lse, const float* acc, const float* m, const float* l, int n, int64_t split,
              int64_t first) {{
    if (splits > 1) finish_rows(o.data() + split * rows * D, lse.data() + split * rows, acc, m, l, n, D, first);
    else finish_rows(out, out_lse, acc, m, l, n, D, first);
  }}
  template <class T>
  void merge(T* out, float* out_lse, int threads) {{
    if (splits > 1) merge_splits(out, out_lse, o.data(), lse.data(), splits, rows, D, threads);
  }}
}};

#if defined(__AVX512F__)
// 2^x on 16 lanes to 1.7e-7 relative (exp2_f's accuracy): r = x - floor(x) in [0, 1) by one VREDUCEPS, a
// degree-5 polynomial (fitted for relative error, p(0) = 1) and 2^floor(x) by VSCALEF on x clamped to -125, so no
// lane underflows (an underflowing VSCALEF takes a microcode assist: 3.5x slower softmax on masks with many -inf
// scores), and lanes below -125 (-inf among them) set to exactly 0; NaN stays NaN
inline __m512 exp2_v(__m512 x) {{
  const __m512 low = _mm512_set1_ps(-125.0f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, low, _CMP_NLT_UQ);  // x >= -125, or NaN
  x = _mm512_max_ps(low, x);  // (max_ps returns its second operand for NaN)
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.86712446e-3f), r, _mm512_set1_ps(9.01704188e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.57999052e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.40164459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.93151295e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, x);
}}

// 2^x on 16 lanes to 8.6e-5 relative, for probabilities rounded to bf16 next (whose rounding step, 2^-8, is 45x
// coarser): r = x - floor(x) in [0, 1) by one VREDUCEPS, a cubic (fitted for relative error with p(0) = 1, so a
// row's largest score gives exactly 1) and VSCALEF by floor(x); clamped, zeroed below -125 and NaN-preserving as
// exp2_v. Seven instructions where exp2_v takes nine (the bf16 forward's softmax is its largest cost at D = 64).
inline __m512 exp2_v_bf16(__m512 x) {{
  const __m512 low = _mm512_set1_ps(-125.0f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, low, _CMP_NLT_UQ);
  x = _mm512_max_ps(low, x);
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.70660192e-2f), r, _mm512_set1_ps(2.27646112e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.95116520e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, x);
}}

// row_max on 16-lane vectors (two chains, masked tail, one log-depth reduction); skips NaN as row_max does
inline float row_max_v(const float* x, int n) {{
  __m512 a = _mm512_set1_ps(-INF), b = a;
  int j = 0;
  for (; j + 32 <= n; j += 32) {{
    a = _mm512_max_ps(_mm512_loadu_ps(x + j), a);  // (a NaN is skipped: max_ps returns its second operand)
    b = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), b);
  }}
  for (; j < n; j += 16) {{
    const __mmask16 in = j + 16 <= n ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
    a = _mm512_mask_max_ps(a, in, _mm512_maskz_loadu_ps(in, x + j), a);
  }}
  return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}}

#endif

// The online softmax's step over one run of tiles: rows of scores s (stride ld, cols wide; scaled to base 2 by
// sc) become probabilities exp2(s * sc - m_new); m (base 2), l (sum) advance, alpha[i] = exp2(m_old - m_new)
// rescales the row's accumulator. A row with nothing visible so far keeps zeros (alpha 1); NaN scores make the
// row's sum, output and lse NaN. Every forward shares this bookkeeping; ``out`` writes the probabilities:
// out.exp(i, sr, sc, mx) stores 2^(sr * sc - mx) and returns their sum, out.clear(i, sr) zeros a row that has seen
// nothing (InPlace: fp32 over the scores; ToBf16: bf16 rows for the bf16 products).
// An ``Out`` that keeps the scores (Out::lazy) takes one pass per row instead of two once the row's running max is
// finite: probabilities relative to that max, the row's largest exponent found on the way (out.exp_below); the max
// moves only when a score exceeds it by more than LAZY (the row is then redone the usual way), else alpha is 1 and
// the accumulator is not rescaled. Probabilities up to 2^LAZY are as exact in fp32 and bf16 as those up to 1, and
// l, o and lse are the same functions of the scores (FlashAttention-4's conditional rescaling).
constexpr float LAZY = 8.0f;

template <class Out>
inline void softmax_step(float* s, int ld, int rows, int cols, float sc, float* m, float* l, float* alpha,
                         const Out& out) {{
  for (int i = 0; i < rows; ++i) {{
    float* sr = s + i * ld;
    if constexpr (Out::lazy) {{
      if (m[i] > -INF && m[i] < INF) {{  // (not for a NaN or infinite running max: those rows go the usual way)
        float top;
        const float sum = out.exp_below(i, sr, sc, m[i], top);
        if (top <= LAZY) {{ l[i] += sum; alpha[i] = 1.0f; continue; }}
      }}
    }}
#if defined(__AVX512F__)
    float mx = max_of(m[i], row_max_v(sr, cols) * sc);
#else
    float mx = max_of(m[i], row_max(sr, cols) * sc);
#endif
    if (mx == -INF) {{  // nothing visible so far, or only NaN scores (the max skips NaN)
      const float bad = first_nan(sr, cols);
      if (bad == 0.0f) {{ out.clear(i, sr); alpha[i] = 1.0f; continue; }}
      mx = bad;
    }}
    const float a = exp2_f(m[i] - mx);
    l[i] = l[i] * a + out.exp(i, sr, sc, mx);
    m[i] = mx;
    alpha[i] = a;
  }}
}}

// probabilities in place of the scores (fp32 products)
struct InPlace {{
  static constexpr bool lazy = false;  // the probabilities overwrite the scores: a row cannot be redone
  int cols;
  void clear(int, float* sr) const {{ fill(sr, cols, 0.0f); }}
  float exp(int, float* sr, float sc, float mx) const {{
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(sc), vm = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= cols; j += 16) {{  // whole vectors: no masks
      const __m512 e = exp2_v(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vs, vm));
      _mm512_storeu_ps(sr + j, e);
      acc = _mm512_add_ps(acc, e);
    }}
    if (j < cols) {{
      const __mmask16 in = (__mmask16)((1u << (cols - j)) - 1);
      const __m512 e = exp2_v(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, sr + j), vs, vm));
      _mm512_mask_storeu_ps(sr + j, in, e);
      acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(in, e));
    }}
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < cols; ++j) {{ const float p = exp2_f(sr[j] * sc - mx); sr[j] = p; sum += p; }}
    return sum;
#endif
  }}
}};

inline void softmax_rows(float* s, int ld, int rows, int cols, float sc, float* m, float* l, float* alpha) {{
  softmax_step(s, ld, rows, cols, sc, m, l, alpha, InPlace{{cols}});
}}

#if defined(__AVX512F__)
// out[x * ldo + j] = in[j * ld + x] for 16 rows j of 16 32-bit values x; rows from ``rows`` on read as zeros, out
// rows from ``out_rows`` on not written
// (unpack 32- and 64-bit pairs, then two rounds of 128-bit lane shuffles: 64 shuffles for 256 values)
inline void transpose16_u32(const uint32_t* in, int64_t ld, int rows, uint32_t* out, int64_t ldo, int out_rows = 16,
                            bool stream = false) {{
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_si512(in + i * ld) : _mm512_setzero_si512();
  for (int i = 0; i < 16; i += 2) {{
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }}
  for (int i = 0; i < 16; i += 4) {{
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }}
  for (int i = 0; i < 16; i += 8)
    for (int m = 0; m < 4; ++m) {{
      t[i + m] = _mm512_shuffle_i32x4(r[i + m], r[i + 4 + m], 0x88);
      t[i + 4 + m] = _mm512_shuffle_i32x4(r[i + m], r[i + 4 + m], 0xdd);
    }}
  for (int m = 0; m < 8; ++m) {{
    r[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0xdd);
  }}
  if (stream)  // (64-byte aligned rows, written past the caches: see transpose_bf16)
    for (int i = 0; i < out_rows; ++i) _mm512_stream_si512((__m512i*)(out + i * ldo), r[i]);
  else
    for (int i = 0; i < out_rows; ++i) _mm512_storeu_si512(out + i * ldo, r[i]);
}}

// one panel [w][NR] of NR contiguous rows of w 32-bit units (w a multiple of 16), rows from ``rows`` on zeros;
// stream: written with non-temporal stores (dst 64-byte aligned)
inline void panel_u32(const uint32_t* src, int64_t w, int64_t rows, uint32_t* dst, bool stream = false) {{
  for (int jb = 0; jb < NR; jb += 16)
    for (int64_t x = 0; x < w; x += 16) {{
      const int live = (int)max_of<int64_t>(0, min_of<int64_t>(16, rows - jb));
      transpose16_u32(src + jb * w + x, w, live, dst + x * NR + jb, NR, 16, stream);
    }}
}}
#endif

// pack K or V [heads, S, d] into panels of NR rows [heads][ceil(S / NR)][d / P][NR][P], zero past S: row j's
// P consecutive values x.. x + P - 1 sit together (P = 1: fp32 panels [d][NR]; P = 2: the bf16 pairs a
// vdpbf16ps lane reads), and the panel of rows j0.. (j0 a multiple of NR) starts at out + (h * up(S) + j0) * d.
// Either way a panel is a transpose of 32-bit units (a value or a pair): on AVX-512, 16 x 16 blocks in registers
// (the scalar loop's scattered 2- or 4-byte stores made packing K a tenth of a sliding window's forward).
// stream (AVX-512; out 64-byte aligned): the panels bypass the caches (see STREAM_PACKS)
template <int P = 1, class T>
inline void pack_panels(const T* k, T* out, int64_t heads, int64_t S, int64_t d, int threads, bool stream = false) {{
  static_assert(sizeof(T) * P == 4, "panels hold 32-bit units");
  const int64_t panels = (S + NR - 1) / NR, w = d / P;  // w: 32-bit units per row
  (void)stream;
  #pragma omp parallel num_threads(threads)
  {{
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * panels; ++t) {{
      const int64_t h = t / panels, p = t % panels;
      T* dst = out + (h * panels + p) * NR * d;
#if defined(__AVX512F__)
      if (w % 16 == 0 && NR % 16 == 0) {{
        panel_u32((const uint32_t*)(k + (h * S + p * NR) * d), w, S - p * NR, (uint32_t*)dst, stream);
        continue;
      }}
#endif
      for (int jj = 0; jj < NR; ++jj) {{
        const int64_t j = p * NR + jj;
        const T* src = k + (h * S + j) * d;
        for (int64_t x = 0; x < d; x += P)
          for (int u = 0; u < P; ++u) dst[x * NR + jj * P + u] = j < S ? src[x + u] : T(0);
      }}
    }}
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // (each thread's streamed panels are visible to all after the region's barrier)
#endif
  }}
}}

// pack_panels<1> of fp16 or bf16 K or V: each panel's NR rows widened to fp32 in a thread's buffer, then laid out
// as pack_panels lays out fp32 rows
template <class T>
inline void pack_panels_h(const T* k, float* out, int64_t heads, int64_t S, int64_t d, int threads,
                          bool stream = false) {{
  const int64_t panels = (S + NR - 1) / NR;
  (void)stream;
  #pragma omp parallel num_threads(threads)
  {{
    Buf rows(NR * d);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * panels; ++t) {{
      const int64_t h = t / panels, p = t % panels, live = min_of<int64_t>(NR, S - p * NR);
      for (int64_t j = 0; j < live; ++j) widen_row(k + (h * S + p * NR + j) * d, rows.data() + j * d, d);
      float* dst = out + (h * panels + p) * NR * d;
#if defined(__AVX512F__)
      if (d % 16 == 0 && NR % 16 == 0) {{
        panel_u32((const uint32_t*)rows.data(), d, live, (uint32_t*)dst, stream);
        continue;
      }}
#endif
      for (int jj = 0; jj < NR; ++jj)
        for (int64_t x = 0; x < d; ++x) dst[x * NR + jj] = jj < live ? rows[jj * d + x] : 0.0f;
    }}
#if defined(__AVX512F__)
    if (stream) _mm_sfence();
#endif
  }}
}}

// ---- native bf16 products (AVX512_BF16: vdpbf16ps, two bf16 products summed into each fp32 lane) ----
// Used by attncc_forward_bf16: q, k, v are read as bf16 (no fp32 copies); K is packed in pair panels, V in
// pair rows, the probabilities P are rounded to bf16 per tile for the P V product; scores, softmax and
// accumulation stay fp32.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool BF16 = true;

// 16 bf16 of row a and 16 of row b as one pair row: lane u holds a[u] (low half) and b[u]
inline __m512i interleave_bf16(__m256bh a, __m256bh b) {{
  return _mm512_or_si512(_mm512_cvtepu16_epi32((__m256i)a), _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16));
}}

// rows a and b (d values, a multiple of 16; nullptr: zeros) as one pair row at out: out[2c] = a[c], out[2c+1] = b[c];
// stream: written with non-temporal stores (out 64-byte aligned)
inline void pair_row(const bf16_t* a, const bf16_t* b, bf16_t* out, int64_t d, bool stream = false) {{
  for (int64_t c = 0; c < d; c += 16) {{
    const __m256i x = a ? _mm256_loadu_si256((const __m256i*)(a + c)) : _mm256_setzero_si256();
    const __m256i y = b ? _mm256_loadu_si256((const __m256i*)(b + c)) : _mm256_setzero_si256();
    if (stream) _mm512_stream_si512((__m512i*)(out + 2 * c), interleave_bf16((__m256bh)x, (__m256bh)y));
    else _mm512_storeu_si512(out + 2 * c, interleave_bf16((__m256bh)x, (__m256bh)y));
  }}
}}

// V [heads, S, d] -> pair rows [heads][up(S) / 2][d][2] (keys 2r, 2r + 1 of column c at [r][c]; up: to a multiple
// of NR), zero past S: a product over a tile's keys may read whole NR-key chunks (the AMX tiles read 32 keys)
inline void pack_v_bf16(const bf16_t* v, bf16_t* out, int64_t heads, int64_t S, int64_t d, int threads,
                        bool stream = false) {{
  const int64_t pairs = (S + NR - 1) / NR * NR / 2;
  #pragma omp parallel num_threads(threads)
  {{
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * pairs; ++t) {{
      const int64_t h = t / pairs, r = t % pairs;
      const bf16_t* a = v + (h * S + 2 * r) * d;
      pair_row(2 * r < S ? a : nullptr, 2 * r + 1 < S ? a + d : nullptr, out + t * d * 2, d, stream);
    }}
    if (stream) _mm_sfence();
  }}
}}

// what the bf16 rounding hi of x leaves, bf16(x - hi): exact for an fp16 x, else x = hi + lo to 2^-17
inline __m256bh low_part(__m512 x, __m256bh hi) {{ return _mm512_cvtneps_pbh(_mm512_sub_ps(x, _mm512_cvtpbh_ps(hi))); }}

// The fp16 products' exact splits: an fp16 value x is x_hi + x_lo, x_hi = bf16(x), x_lo = bf16(x - x_hi) (fp16 has
// 11 significant bits, two bf16s hold 16; its exponents fit bf16's). d fp16 values at x (F16C conversion) -> hi, lo
inline void split_fp16(const uint16_t* x, int64_t d, bf16_t* hi, bf16_t* lo) {{
  for (int64_t c = 0; c < d; c += 16) {{
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + c)));
    const __m256bh h = _mm512_cvtneps_pbh(f), l = low_part(f, h);
    std::memcpy(hi + c, &h, 32);
    std::memcpy(lo + c, &l, 32);
  }}
}}

// q rows for the split product: [hi | hi | lo | lo] (4d bf16; nullptr x: zeros); k rows: [hi | lo | hi | lo]
inline void split_row_q(const uint16_t* x, int64_t d, bf16_t* out) {{
  if (!x) {{ std::memset(out, 0, sizeof(bf16_t) * 4 * d); return; }}
  split_fp16(x, d, out, out + 2 * d);
  std::memcpy(out + d, out, sizeof(bf16_t) * d);
  std::memcpy(out + 3 * d, out + 2 * d, sizeof(bf16_t) * d);
}}
inline void split_row_k(const uint16_t* x, int64_t d, bf16_t* out) {{
  if (!x) {{ std::memset(out, 0, sizeof(bf16_t) * 4 * d); return; }}
  split_fp16(x, d, out, out + d);
  std::memcpy(out + 2 * d, out, sizeof(bf16_t) * 2 * d);
}}

// fp16 K [heads, S, d] -> pack_panels<2>'s pair panels of its split rows [hi | lo | hi | lo] (4d wide)
inline void pack_panels_fp16(const uint16_t* k, bf16_t* out, int64_t heads, int64_t S, int64_t d, int threads,
                             bool stream = false) {{
  const int64_t panels = (S + NR - 1) / NR, w = 2 * d;  // 32-bit units (pairs) per split row
  #pragma omp parallel num_threads(threads)
  {{
    Aligned<bf16_t> rows(NR * 4 * d, true);
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * panels; ++t) {{
      const int64_t h = t / panels, p = t % panels;
      for (int jj = 0; jj < NR; ++jj) {{
        const int64_t j = p * NR + jj;
        split_row_k(j < S ? k + (h * S + j) * d : nullptr, d, rows.data() + jj * 4 * d);
      }}
      panel_u32((const uint32_t*)rows.data(), w, NR, (uint32_t*)(out + (h * panels + p) * NR * 4 * d), stream);
    }}
    if (stream) _mm_sfence();
  }}
}}

// fp16 V [heads, S, d] -> pack_v_bf16's pair rows of its hi and lo parts
inline void pack_v_fp16(const uint16_t* v, bf16_t* hi, bf16_t* lo, int64_t heads, int64_t S, int64_t d, int threads,
                        bool stream = false) {{
  const int64_t pairs = (S + NR - 1) / NR * NR / 2;
  #pragma omp parallel num_threads(threads)
  {{
    Aligned<bf16_t> part(4 * d, true);  // hi, lo of key 2r; hi, lo of key 2r + 1
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * pairs; ++t) {{
      const int64_t h = t / pairs, r = t % pairs;
      const uint16_t* a = v + (h * S + 2 * r) * d;
      const bool first = 2 * r < S, second = 2 * r + 1 < S;
      if (first) split_fp16(a, d, part.data(), part.data() + d);
      if (second) split_fp16(a + d, d, part.data() + 2 * d, part.data() + 3 * d);
      pair_row(first ? part.data() : nullptr, second ? part.data() + 2 * d : nullptr, hi + t * d * 2, d, stream);
      pair_row(first ? part.data() + d : nullptr, second ? part.data() + 3 * d : nullptr, lo + t * d * 2, d, stream);
    }}
    if (stream) _mm_sfence();
  }}
}}

// softmax_rows for the bf16 forward: the probabilities go straight to bf16 rows p (stride pw), zero from cols up
// to pad (the products read whole pairs or 32-key chunks); s keeps the scores. SPLIT (the fp16 forward): each
// probability, to fp32 accuracy (exp2_v), as p + lo, two bf16 rows: lo = bf16(x - p) (x and p + lo agree to 2^-17)
template <bool SPLIT>
struct ToBf16 {{
  static constexpr bool lazy = true;
  int cols, pad;
  bf16_t* p;
  int pw;
  bf16_t* lo;  // (SPLIT only)
  void clear(int i, float*) const {{
    std::memset(p + i * pw, 0, sizeof(bf16_t) * pad);
    if (SPLIT) std::memset(lo + i * pw, 0, sizeof(bf16_t) * pad);
  }}
  static __m512 exp2(__m512 x) {{ return SPLIT ? exp2_v(x) : exp2_v_bf16(x); }}
  void put(int i, int j, __m512 e) const {{
    const __m256bh h = _mm512_cvtneps_pbh(e);
    std::memcpy(p + i * pw + j, &h, 32);
    if (SPLIT) {{
      const __m256bh r = low_part(e, h);
      std::memcpy(lo + i * pw + j, &r, 32);
    }}
  }}
  // exp() relative to the running max mx, and top = the largest sr * sc - mx of the row (NaN skipped; -inf when none)
  float exp_below(int i, const float* sr, float sc, float mx, float& top) const {{
    const __m512 vs = _mm512_set1_ps(sc), vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps(), hi = _mm512_set1_ps(-INF);
    int j = 0;
    if (!SPLIT) {{  // 32 at a time: one two-source conversion (VCVTNE2PS2BF16) and one store for both vectors
      __m512 sum1 = _mm512_setzero_ps(), hi1 = hi;
      for (; j + 32 <= cols; j += 32) {{
        const __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vs, vm);
        const __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j + 16), vs, vm);
        hi = _mm512_max_ps(x0, hi);
        hi1 = _mm512_max_ps(x1, hi1);
        const __m512 e0 = exp2(x0), e1 = exp2(x1);
        sum = _mm512_add_ps(sum, e0);
        sum1 = _mm512_add_ps(sum1, e1);
        _mm512_storeu_si512(p + i * pw + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }}
      sum = _mm512_add_ps(sum, sum1);
      hi = _mm512_max_ps(hi1, hi);  // (neither holds a NaN: max_ps(x, h) keeps h where x is NaN)
    }}
    for (; j + 16 <= cols; j += 16) {{
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vs, vm);
      hi = _mm512_max_ps(x, hi);  // (max_ps returns its second operand for NaN)
      const __m512 e = exp2(x);
      sum = _mm512_add_ps(sum, e);
      put(i, j, e);
    }}
    for (; j < pad; j += 16) {{  // the ragged end, then zeros
      const __mmask16 in = j < cols ? (__mmask16)((1u << (cols - j)) - 1) : 0;
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, sr + j), vs, vm);
      hi = _mm512_mask_max_ps(hi, in, x, hi);
      const __m512 e = _mm512_maskz_mov_ps(in, exp2(x));
      sum = _mm512_add_ps(sum, e);
      put(i, j, e);
    }}
    top = _mm512_reduce_max_ps(hi);
    return _mm512_reduce_add_ps(sum);
  }}
  float exp(int i, float* sr, float sc, float mx) const {{
    const __m512 vs = _mm512_set1_ps(sc), vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < pad; j += 16) {{  // whole vectors, the ragged end, then zeros
      const __mmask16 in = j + 16 <= cols ? 0xffff : j < cols ? (__mmask16)((1u << (cols - j)) - 1) : 0;
      const __m512 e = _mm512_maskz_mov_ps(in, exp2(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, sr + j), vs, vm)));
      sum = _mm512_add_ps(sum, e);
      put(i, j, e);
    }}
    return _mm512_reduce_add_ps(sum);
  }}
}};

// (plo: the SPLIT rows, or nullptr)
inline void softmax_rows_bf16(float* s, int ld, int rows, int cols, int pad, float sc, float* m, float* l,
                              float* alpha, bf16_t* p, int pw, bf16_t* plo = nullptr) {{
  if (plo) softmax_step(s, ld, rows, cols, sc, m, l, alpha, ToBf16<true>{{cols, pad, p, pw, plo}});
  else softmax_step(s, ld, rows, cols, sc, m, l, alpha, ToBf16<false>{{cols, pad, p, pw, nullptr}});
}}

// C[M x NR] (op)= A . B over the bf16 pairs [from[s], to[s]) of ``runs`` runs, one after another into the same
// accumulators (dV^T and dK^T over the pending rows that reach a column block: on a 2-D neighborhood, one run per grid
// row of queries): A's row i pair r at a + i * ai + 2 * r, B's pair row r at b + r * ldb (NR lanes x 2 bf16). MODE as
// micro(): 0 stores, 1 accumulates, 2 rescales row i by alpha[i]. V = 1: only the first NR / 2 columns (one vector
// per row; B's and C's upper halves start NR bf16s and NR / 2 floats on).
template <int M, int MODE, int V = 2>
inline void micro_bf_runs(int runs, const int* from, const int* to, const bf16_t* a, int64_t ai, const bf16_t* b,
                          int64_t ldb, float* c, int64_t ldc, const float* alpha) {{
  __m512 c0[M], c1[M];
  #pragma GCC unroll 16
  for (int i = 0; i < M; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int run = 0; run < runs; ++run)
    for (int r = from[run]; r < to[run]; ++r) {{
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + r * ldb);
      const __m512bh b1 = V == 2 ? (__m512bh)_mm512_loadu_si512(b + r * ldb + 32) : b0;
      #pragma GCC unroll 16
      for (int i = 0; i < M; ++i) {{
        uint32_t w;
        std::memcpy(&w, a + i * ai + 2 * r, 4);
        const __m512bh x = (__m512bh)_mm512_set1_epi32((int)w);
        c0[i] = _mm512_dpbf16_ps(c0[i], x, b0);
        if constexpr (V == 2) c1[i] = _mm512_dpbf16_ps(c1[i], x, b1);
      }}
    }}
  #pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {{
    float* o0 = c + i * ldc;
    float* o1 = o0 + 16;
    if (MODE == 0) {{
      _mm512_storeu_ps(o0, c0[i]);
      if constexpr (V == 2) _mm512_storeu_ps(o1, c1[i]);
    }}
    if (MODE == 1) {{
      _mm512_storeu_ps(o0, _mm512_add_ps(_mm512_loadu_ps(o0), c0[i]));
      if constexpr (V == 2) _mm512_storeu_ps(o1, _mm512_add_ps(_mm512_loadu_ps(o1), c1[i]));
    }}
    if (MODE == 2) {{
      const __m512 s = _mm512_set1_ps(alpha[i]);
      _mm512_storeu_ps(o0, _mm512_fmadd_ps(_mm512_loadu_ps(o0), s, c0[i]));
      if constexpr (V == 2) _mm512_storeu_ps(o1, _mm512_fmadd_ps(_mm512_loadu_ps(o1), s, c1[i]));
    }}
  }}
}}

// micro_bf_runs over the pairs [0, pairs)
template <int M, int MODE, int V = 2>
inline void micro_bf(int pairs, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t ldb, float* c, int64_t ldc,
                     const float* alpha) {{
  const int from = 0;
  micro_bf_runs<M, MODE, V>(1, &from, &pairs, a, ai, b, ldb, c, ldc, alpha);
}}

template <int MODE, int V = 2>
inline void micro_bf_runs_m(int m, int runs, const int* from, const int* to, const bf16_t* a, int64_t ai,
                            const bf16_t* b, int64_t ldb, float* c, int64_t ldc, const float* alpha) {{
  switch (m) {{
    case 1: micro_bf_runs<1, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 2: micro_bf_runs<2, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 3: micro_bf_runs<3, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 4: micro_bf_runs<4, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 5: micro_bf_runs<5, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 6: micro_bf_runs<6, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 7: micro_bf_runs<7, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 8: micro_bf_runs<8, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 9: micro_bf_runs<9, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 10: micro_bf_runs<10, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    case 11: micro_bf_runs<11, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
    default: micro_bf_runs<MR, MODE, V>(runs, from, to, a, ai, b, ldb, c, ldc, alpha); break;
  }}
}}

template <int MODE, int V = 2>
inline void micro_bf_m(int m, int pairs, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t ldb, float* c,
                       int64_t ldc, const float* alpha) {{
  const int from = 0;
  micro_bf_runs_m<MODE, V>(m, 1, &from, &pairs, a, ai, b, ldb, c, ldc, alpha);
}}

// C[rows x cols] (op)= A . B over bf16 pairs, cols a multiple of NR; B's column block x starts at b + x * bc
template <int MODE>
inline void gemm_bf(int rows, int cols, int pairs, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t bc,
                    int64_t ldb, float* c, int64_t ldc, const float* alpha = nullptr) {{
  for (int i = 0; i < rows; i += MR)
    for (int x = 0; x < cols; x += NR)
      micro_bf_m<MODE>(min_of(MR, rows - i), pairs, a + i * ai, ai, b + x * bc, ldb, c + i * ldc + x, ldc,
                       alpha ? alpha + i : nullptr);
}}

// gemm_bf with the column blocks outer, for the backward's S, dP (a 32-row group's A is 8 KB) and dQ: one block of
// B (K panels, K pair rows: 8-16 KB of the kv block's 64 KB in L2) stays in L1 while every row block passes; MODE 1
// (dQ) asks for each register block's C rows ahead (fp32 dQ rows, far from L1) (the backward 1.02-1.03x, Zen 4)
template <int MODE>
inline void gemm_bf_xo(int rows, int cols, int pairs, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t bc,
                       int64_t ldb, float* c, int64_t ldc) {{
  for (int x = 0; x < cols; x += NR)
    for (int i = 0; i < rows; i += MR) {{
      if (MODE == 1)
        for (int r = i; r < min_of(MR + i, rows); ++r) {{
          _mm_prefetch((const char*)(c + r * ldc + x), _MM_HINT_T0);
          _mm_prefetch((const char*)(c + r * ldc + x + 16), _MM_HINT_T0);
        }}
      micro_bf_m<MODE>(min_of(MR, rows - i), pairs, a + i * ai, ai, b + x * bc, ldb, c + i * ldc + x, ldc, nullptr);
    }}
}}

// Scores of one partial tile from bf16 pairs (as gemm_bf<0>), skipping the NR-wide column panels no row of a
// register block keeps and the half of a panel none keeps, as scores_kept (their scores stay unset; the keep bytes
// make them -inf); rng: the rows' kept columns
inline void scores_kept_bf(int rows, int cols, int pairs, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t bc,
                           int64_t ldb, float* c, int64_t ldc, const int16_t* rng) {{
  for (int i = 0; i < rows; i += MR) {{
    const int m = min_of(MR, rows - i);
    int lo, hi;
    kept_cols(rng, i, m, lo, hi);
    for (int x = lo / NR * NR; x < min_of(hi, cols); x += NR) {{
      const bf16_t* bx = b + x * bc;
      float* cx = c + i * ldc + x;
      if (lo >= x + NR / 2)  // the panel's kept keys all in its upper half, or all in its lower half: that half
        micro_bf_m<0, 1>(m, pairs, a + i * ai, ai, bx + NR, ldb, cx + NR / 2, ldc, nullptr);
      else if (hi <= x + NR / 2)
        micro_bf_m<0, 1>(m, pairs, a + i * ai, ai, bx, ldb, cx, ldc, nullptr);
      else
        micro_bf_m<0>(m, pairs, a + i * ai, ai, bx, ldb, cx, ldc, nullptr);
    }}
  }}
}}

// C[rows x d] (MODE 1: +=, MODE 2: = C * alpha +) P . B over a run of ``tiles`` partial tiles (``ext`` keys each) as
// gemm_bf: P bf16 rows (stride pw) zero outside each row's kept range in each tile, B pair rows (stride 2d: V, or K
// for dQ += dS K); each register block of rows multiplies only the pairs of its rows' union in each tile (rng[u]: tile
// u's row ranges), as products_kept. MODE 2 rescales once, with the first tile that has kept keys (a block none of
// whose rows keeps a key in the run has alpha 1, its maxima unmoved: nothing to rescale)
template <int MODE>
inline void products_kept_bf(int rows, int d, const bf16_t* p, int64_t pw, int ext, const bf16_t* b, float* c,
                             int64_t ldc, const float* alpha, const int16_t* const* rng, int tiles) {{
  int lo[SPAN_MAX], hi[SPAN_MAX];
  for (int i = 0; i < rows; i += MR) {{
    const int m = min_of(MR, rows - i);
    for (int u = 0; u < tiles; ++u) kept_cols(rng[u], i, m, lo[u], hi[u], ext);
    for (int x = 0; x < d; x += NR) {{
      bool first = true;
      for (int u = 0; u < tiles; ++u) {{
        if (hi[u] <= lo[u]) continue;
        const int p0 = (u * ext + lo[u]) / 2, p1 = (u * ext + hi[u] + 1) / 2;  // (ext is even: tiles share no pair)
        const bf16_t* pa = p + i * pw + 2 * p0;
        const bf16_t* pb = b + (int64_t)p0 * 2 * d + 2 * x;
        if (MODE == 2 && first) micro_bf_m<2>(m, p1 - p0, pa, pw, pb, 2 * d, c + i * ldc + x, ldc, alpha + i);
        else micro_bf_m<1>(m, p1 - p0, pa, pw, pb, 2 * d, c + i * ldc + x, ldc, nullptr);
        first = false;
      }}
    }}
  }}
}}

// C[rows x cols] += A . B over bf16 pairs (as gemm_bf<1>) where B is zero, in column block u (NR wide), outside rows
// [lo[u][g], hi[u][g]) of each 32-row group g < groups (rows of the shared dimension): each block multiplies only the
// pairs of those rows, as runs (adjacent groups' ranges merged). dV^T += dO^T P and dK^T += Q^T dS over the pending
// rows that keep some of the block's keys: one run where they are consecutive, one per grid row of queries on a 2-D
// neighborhood (its keys' queries are runs a grid row apart)
template <int G>
inline void gemm_bf_cols(int rows, int cols, const bf16_t* a, int64_t ai, const bf16_t* b, int64_t bc, int64_t ldb,
                         float* c, int64_t ldc, const int (*lo)[G], const int (*hi)[G], int groups) {{
  int from[BKV / NR][G], to[BKV / NR][G], runs[BKV / NR];
  for (int u = 0; u < cols / NR; ++u) {{
    runs[u] = 0;
    for (int g = 0; g < groups; ++g) {{
      if (hi[u][g] <= lo[u][g]) continue;
      const int p0 = lo[u][g] / 2, p1 = (hi[u][g] + 1) / 2, n = runs[u];
      if (n && p0 <= to[u][n - 1]) {{
        to[u][n - 1] = max_of(to[u][n - 1], p1);
      }} else {{
        from[u][n] = p0;
        to[u][n] = p1;
        runs[u] = n + 1;
      }}
    }}
  }}
  for (int i = 0; i < rows; i += MR)
    for (int x = 0; x < cols; x += NR)
      if (runs[x / NR])
        micro_bf_runs_m<1>(min_of(MR, rows - i), runs[x / NR], from[x / NR], to[x / NR], a + i * ai, ai, b + x * bc,
                           ldb, c + i * ldc + x, ldc, nullptr);
}}

// ---- few query rows per key (decoding): no packing; K and V read in place ----
// Packing K and V costs a pass over them, more than it saves when few rows read each key (CpuKernel._packed).
// Scores: lanes along the head dim (vdpbf16ps on a q row and a k row), each key's lanes summed: 16 keys at a time per
// row by sum_lanes (as scores_rows), the last cols % 16 one at a time, rows inner.
inline void scores_rows_bf(int rows, int cols, int d, const bf16_t* q, const bf16_t* k, float* s, int ld) {{
  int j0 = 0;
  for (; j0 + 16 <= cols; j0 += 16)
    for (int i = 0; i < rows; ++i) {{
      const bf16_t* kj = k + (int64_t)j0 * d;
      vf e[16];
      for (int u = 0; u < 16; ++u) e[u] = vf{{}};
      #pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)  // keys in memory order, each into its slot (as scores_rows)
        for (int x = 0; x < d; x += 32)
          e[key_slot(j)] = (vf)_mm512_dpbf16_ps((__m512)e[key_slot(j)], (__m512bh)_mm512_loadu_si512(q + i * d + x),
                                                (__m512bh)_mm512_loadu_si512(kj + (int64_t)j * d + x));
      *(vfu*)(s + i * ld + j0) = sum_lanes(e);
    }}
  for (int j = j0; j < cols; ++j) {{
    const bf16_t* kj = k + (int64_t)j * d;
    for (int i = 0; i < rows; ++i) {{
      __m512 acc = _mm512_setzero_ps();
      for (int x = 0; x < d; x += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + i * d + x), (__m512bh)_mm512_loadu_si512(kj + x));
      s[i * ld + j] = _mm512_reduce_add_ps(acc);
    }}
  }}
}}

// 16 bf16 values widened to fp32 (exact)
inline __m512 widen(const bf16_t* x) {{ return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)x)); }}

// acc[rows x d] = acc * alpha + P . V with P fp32 (stride ld) and V's bf16 rows widened to fp32 as they are read
inline void values_rows_bf(int rows, int cols, int d, const float* p, int ld, const bf16_t* v, float* acc,
                           const float* alpha) {{
  values_rows(rows, cols, d, p, ld, v, acc, alpha, [](const bf16_t* x) {{ return (vf)widen(x); }});
}}

// ---- the bf16 backward's layouts (AMX tiles and vdpbf16ps register blocks alike) ----
// x [heads][S][d] -> out [heads][d][s_pad] (the rows of the backward's Q^T and dO^T A operands) at row stride st
// (s_pad plus NR: a power-of-two stride puts a tile's 16 rows into one L1 set), zero past S
// lo (fp16 x): out gets the transpose of x's hi parts and lo that of its lo parts (split_fp16)
inline void transpose_bf16(const bf16_t* x, bf16_t* out, int64_t heads, int64_t S, int64_t d, int64_t s_pad,
                           int64_t st, int threads, bf16_t* lo = nullptr) {{
  const int64_t blocks = (s_pad + 31) / 32;
  // each 32-row block writes one 64-byte line into every one of d rows st apart: streamed past the caches (no read
  // for ownership of lines the products read back much later, from memory either way; STREAM_PACKS) where aligned
  const bool stream = ((uintptr_t)out | (uintptr_t)(lo ? lo : out) | (uintptr_t)(st * 2)) % 64 == 0;
  #pragma omp parallel num_threads(threads)
  {{
    Aligned<bf16_t> pairs(32 * d, true), pairs_lo(lo ? 32 * d : 0, true);  // 16 pair rows of a block's 32 rows
    Aligned<bf16_t> split(lo ? 4 * d : 0, true);  // hi, lo of row 2r; hi, lo of row 2r + 1
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < heads * blocks; ++t) {{  // 32 rows at a time: pair rows, then 16 x 16 transposes of pairs
      const int64_t h = t / blocks, i0 = t % blocks * 32;
      const bf16_t* src = x + (h * S + i0) * d;
      for (int64_t r = 0; r < 16; ++r) {{
        const bf16_t* a = i0 + 2 * r < S ? src + 2 * r * d : nullptr;
        const bf16_t* b = i0 + 2 * r + 1 < S ? src + (2 * r + 1) * d : nullptr;
        if (!lo) {{
          pair_row(a, b, pairs.data() + 2 * r * d, d);
          continue;
        }}
        bf16_t* y = split.data();
        if (a) split_fp16(a, d, y, y + d);
        if (b) split_fp16(b, d, y + 2 * d, y + 3 * d);
        pair_row(a ? y : nullptr, b ? y + 2 * d : nullptr, pairs.data() + 2 * r * d, d);
        pair_row(a ? y + d : nullptr, b ? y + 3 * d : nullptr, pairs_lo.data() + 2 * r * d, d);
      }}
      for (int part = 0; part < (lo ? 2 : 1); ++part) {{
        uint32_t* dst = (uint32_t*)((part ? lo : out) + h * d * st + i0);  // (st and i0 even: whole pairs)
        const uint32_t* from = (const uint32_t*)(part ? pairs_lo : pairs).data();
        for (int64_t c = 0; c < d; c += 16) transpose16_u32(from + c, d, 16, dst + c * (st / 2), st / 2, 16, stream);
      }}
    }}
    _mm_sfence();  // (the streamed rows are visible to every thread after the region's barrier)
  }}
}}

// fp32 rows of x (stride ld; real rows < rows, columns < cols) as bf16 pair rows at out (pair row r: rows 2r and
// 2r + 1 interleaved; stride ldo values) for rows32 / 2 pair rows and n16 columns, zero past rows and cols; lo (null:
// none) gets the pair rows of the low parts (low_part)
inline void to_pair_rows(const float* x, int ld, int rows, int rows32, int cols, int n16, bf16_t* out, int64_t ldo,
                         bf16_t* lo = nullptr) {{
  for (int r = 0; r < rows32 / 2; ++r) {{
    const int i0 = 2 * r, i1 = 2 * r + 1;
    for (int j = 0; j < n16; j += 16) {{
      const __mmask16 in = j + 16 <= cols ? 0xffff : j < cols ? (__mmask16)((1u << (cols - j)) - 1) : 0;
      const __m512 a = i0 < rows ? _mm512_maskz_loadu_ps(in, x + i0 * ld + j) : _mm512_setzero_ps();
      const __m512 b = i1 < rows ? _mm512_maskz_loadu_ps(in, x + i1 * ld + j) : _mm512_setzero_ps();
      const __m256bh ha = _mm512_cvtneps_pbh(a), hb = _mm512_cvtneps_pbh(b);
      _mm512_storeu_si512(out + r * ldo + 2 * j, interleave_bf16(ha, hb));
      if (lo) _mm512_storeu_si512(lo + r * ldo + 2 * j, interleave_bf16(low_part(a, ha), low_part(b, hb)));
    }}
  }}
}}

// fp32 rows of x (real rows < rows, columns < cols) as bf16 rows at out (stride ldo) for rows16 rows and n32
// columns, zero past rows and cols; lo (null: none) gets the low parts' rows
inline void to_bf16_rows(const float* x, int ld, int rows, int rows16, int cols, int n32, bf16_t* out, int64_t ldo,
                         bf16_t* lo = nullptr) {{
  for (int i = 0; i < rows16; ++i)
    for (int j = 0; j < n32; j += 16) {{
      const __mmask16 in = i >= rows ? 0 : j + 16 <= cols ? 0xffff : j < cols ? (__mmask16)((1u << (cols - j)) - 1) : 0;
      const __m512 f = _mm512_maskz_loadu_ps(in, x + i * ld + j);
      const __m256bh h = _mm512_cvtneps_pbh(f);
      std::memcpy(out + i * ldo + j, &h, 32);
      if (lo) {{
        const __m256bh l = low_part(f, h);
        std::memcpy(lo + i * ldo + j, &l, 32);
      }}
    }}
}}

// ---- AMX tiles (AMX_BF16: TDPBF16PS, a 16 x 16 fp32 tile += 16 x 32 bf16 . 32 x 16 bf16 per instruction) ----
// The native bf16 forward's two products where the CPU has AMX: the same packed K pair panels and V pair rows
// (a B tile is 16 pair rows of 16 lanes x 2 bf16: 64 bytes, exactly the layouts above), q rows and P rows as A
// tiles. Tiles 0-3 hold a 32 x 32 fp32 block of the result, 4-5 the A rows, 6-7 the B columns. Rows come in
// 16s (a ragged last q block is copied into a zeroed buffer), keys in 32s (V and P zero past the tile).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool AMX = true;

// Linux hands out AMX state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA = 18);
// asked once per process; false (and the vdpbf16ps path) where the kernel refuses
inline bool amx_granted() {{
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}}

// palette 1, every tile 16 rows x 64 bytes; per thread (the tile configuration is thread state)
inline void amx_configure() {{
  alignas(64) uint8_t cfg[64] = {{0}};
  cfg[0] = 1;
  for (int t = 0; t < 8; ++t) {{
    cfg[16 + 2 * t] = 64;
    cfg[48 + t] = 16;
  }}
  // GCC's _tile_loadconfig declares a read of only the first 8 bytes (an "m" operand of one pointer), so the
  // stores above may be dropped as dead (seen: a #GP from ldtilecfg on a config of zeros); this barrier keeps them
  __asm__ __volatile__("" : : "r"(cfg) : "memory");
  _tile_loadconfig(cfg);
}}

// S[rows16 x cols] = Q . K^T for one run of tiles: q rows at a (stride d bf16, rows16 a multiple of 16), the
// key panels of this run at b (pack_panels<2>: panel x / 32 at b + x * d, pair row r of a panel at r * 64),
// only the 32-key chunks [lo, hi) of each 32-row group; rng (partial tiles) narrows [lo, hi) per group
inline void amx_scores(int rows16, int cols, int d, const bf16_t* a, const bf16_t* b, float* s, int ld,
                       const int16_t* rng, int rows) {{
  for (int i = 0; i < rows16; i += 32) {{
    const bool two = i + 16 < rows16;
    int lo = 0, hi = cols;
    if (rng) kept_cols(rng, i, min_of(32, rows - i), lo, hi);
    for (int x = lo / NR * NR; x < min_of(hi, cols); x += NR) {{
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int c = 0; c < d; c += 32) {{
        _tile_loadd(4, a + i * d + c, 2 * d);
        _tile_loadd(6, b + x * d + c * NR, 4 * NR);
        _tile_loadd(7, b + x * d + c * NR + 32, 4 * NR);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {{
          _tile_loadd(5, a + (i + 16) * d + c, 2 * d);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }}
      }}
      _tile_stored(0, s + i * ld + x, 4 * ld);
      _tile_stored(1, s + i * ld + x + 16, 4 * ld);
      if (two) {{
        _tile_stored(2, s + (i + 16) * ld + x, 4 * ld);
        _tile_stored(3, s + (i + 16) * ld + x + 16, 4 * ld);
      }}
    }}
  }}
}}

// acc[rows16 x d] = acc * alpha (rows < rows) + P . V: P rows at p (bf16, stride pw, zero past cols up to the
// next 32), V pair rows of the run's first key at v (stride 2 * d bf16 per pair). With plo and vlo (the fp16
// forward's splits P = p + plo to 2^-17, V = v + vlo exactly): + p . vlo + plo . v too (plo . vlo, below 2^-17 of
// the terms, is left out), all three into the same accumulator tiles
inline void amx_values(int rows16, int rows, int cols, int d, const bf16_t* p, int pw, const bf16_t* v, float* acc,
                       const float* alpha, const bf16_t* plo = nullptr, const bf16_t* vlo = nullptr) {{
  for (int i = 0; i < rows; ++i) {{
    if (alpha[i] == 1.0f) continue;  // (the lazy softmax leaves most rows' running max, and alpha, as they were)
    const __m512 a = _mm512_set1_ps(alpha[i]);
    float* row = acc + i * d;
    for (int c = 0; c < d; c += 16) _mm512_storeu_ps(row + c, _mm512_mul_ps(a, _mm512_loadu_ps(row + c)));
  }}
  const int chunks = (cols + 31) / 32;
  for (int i = 0; i < rows16; i += 32) {{
    const bool two = i + 16 < rows16;
    for (int c = 0; c < d; c += 32) {{
      float* o = acc + i * d + c;
      _tile_loadd(0, o, 4 * d);
      _tile_loadd(1, o + 16, 4 * d);
      if (two) {{ _tile_loadd(2, o + 16 * d, 4 * d); _tile_loadd(3, o + 16 * d + 16, 4 * d); }}
      const auto product = [&](const bf16_t* pa, const bf16_t* vb0) {{
        for (int k = 0; k < chunks; ++k) {{
          const bf16_t* vb = vb0 + (int64_t)k * 16 * 2 * d + 2 * c;
          _tile_loadd(4, pa + i * pw + 32 * k, 2 * pw);
          _tile_loadd(6, vb, 4 * d);
          _tile_loadd(7, vb + 32, 4 * d);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {{
            _tile_loadd(5, pa + (i + 16) * pw + 32 * k, 2 * pw);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }}
        }}
      }};
      product(p, v);
      if (plo) {{
        product(p, vlo);
        product(plo, v);
      }}
      _tile_stored(0, o, 4 * d);
      _tile_stored(1, o + 16, 4 * d);
      if (two) {{ _tile_stored(2, o + 16 * d, 4 * d); _tile_stored(3, o + 16 * d + 16, 4 * d); }}
    }}
  }}
}}
// C[M x N] += A[M x K] . B[K x N] (the backward's products): A bf16 rows (K contiguous, stride lda values), B
// bf16 pair rows (pair row r holds rows 2r and 2r + 1 of B interleaved: N pairs, stride ldb values), C fp32
// (stride ldc); M and N multiples of 16, K of 32 (A or B zero where the product has no terms)
inline void amx_gemm(int M, int N, int K, const bf16_t* a, int64_t lda, const bf16_t* b, int64_t ldb, float* c,
                     int64_t ldc) {{
  for (int i = 0; i < M; i += 32) {{
    const bool two_m = i + 16 < M;
    for (int j = 0; j < N; j += 32) {{
      const bool two_n = j + 16 < N;
      float* c0 = c + i * ldc + j;
      float* c1 = c0 + 16 * ldc;
      _tile_loadd(0, c0, 4 * ldc);
      if (two_n) _tile_loadd(1, c0 + 16, 4 * ldc);
      if (two_m) _tile_loadd(2, c1, 4 * ldc);
      if (two_m && two_n) _tile_loadd(3, c1 + 16, 4 * ldc);
      for (int k = 0; k < K; k += 32) {{
        const bf16_t* bk = b + (k / 2) * ldb + 2 * j;
        _tile_loadd(4, a + i * lda + k, 2 * lda);
        _tile_loadd(6, bk, 2 * ldb);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) {{ _tile_loadd(7, bk + 32, 2 * ldb); _tile_dpbf16ps(1, 4, 7); }}
        if (two_m) {{
          _tile_loadd(5, a + (i + 16) * lda + k, 2 * lda);
          _tile_dpbf16ps(2, 5, 6);
          if (two_n) _tile_dpbf16ps(3, 5, 7);
        }}
      }}
      _tile_stored(0, c0, 4 * ldc);
      if (two_n) _tile_stored(1, c0 + 16, 4 * ldc);
      if (two_m) _tile_stored(2, c1, 4 * ldc);
      if (two_m && two_n) _tile_stored(3, c1 + 16, 4 * ldc);
    }}
  }}
}}
inline void amx_release() {{ _tile_release(); }}
#else
constexpr bool AMX = false;  // the helpers below are never called
inline bool amx_granted() {{ return false; }}
inline void amx_configure() {{}}
inline void amx_release() {{}}
inline void amx_scores(int, int, int, const bf16_t*, const bf16_t*, float*, int, const int16_t*, int) {{}}
inline void amx_values(int, int, int, int, const bf16_t*, int, const bf16_t*, float*, const float*,
                       const bf16_t* = nullptr, const bf16_t* = nullptr) {{}}
inline void amx_gemm(int, int, int, const bf16_t*, int64_t, const bf16_t*, int64_t, float*, int64_t) {{}}
#endif
#else
constexpr bool BF16 = false, AMX = false;
inline bool amx_granted() {{ return false; }}
#endif

// RoPE, rotate-half convention, on one row of D values: x' = x * c + rotate_half(x) * s with
// rotate_half(x) = [-x2, x1]; ``inverse`` applies the transpose (for gradients). In place is fine.
inline void rope_row(const float* x, float* out, const float* c, const float* s, int d, bool inverse) {{
  const int half = d / 2;
  #pragma omp simd
  for (int j = 0; j < half; ++j) {{
    const float a = x[j], b = x[j + half];
    if (!inverse) {{
      out[j] = a * c[j] - b * s[j];
      out[j + half] = b * c[j + half] + a * s[j + half];
    }} else {{
      out[j] = a * c[j] + b * s[j + half];
      out[j + half] = b * c[j + half] - a * s[j];
    }}
  }}
}}

// offset of the table row of key position ``pos`` of batch entry b (tables: [bt, Skv, D], bt = 1 or B);
// query row i sits at position i + Skv - Sq
inline int64_t rope_at(int64_t bt, int64_t b, int64_t Skv, int64_t pos, int64_t D) {{
  return ((bt > 1 ? b : 0) * Skv + pos) * D;
}}

// rotate every row of x [B, heads, S, D] into out (in place is fine) with ``threads`` threads
inline void rope_all(const float* x, float* out, int64_t B, int64_t heads, int64_t S, int64_t Skv, int64_t D,
                     const float* cs, const float* sn, int64_t bt, bool inverse, int threads) {{
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < B * heads * S; ++r) {{
    const int64_t t = rope_at(bt, r / (heads * S), Skv, r % S + Skv - S, D);
    rope_row(x + r * D, out + r * D, cs + t, sn + t, (int)D, inverse);
  }}
}}

// length of the run of consecutive block indices of equal kind starting at t (at most ``most``)
inline int run_length(const int32_t* idx, const uint8_t* full, int32_t t, int32_t end, int most) {{
  int n = 1;
  while (n < most && t + n < end && idx[t + n] == idx[t] + n && full[t + n] == full[t]) ++n;
  return n;
}}

// scores of a run of tiles: score mod (scaled scores; without a mod the caller folds SCALE into the softmax's
// base-2 factor, as for full tiles) -> mask from the precomputed keep bytes (partial tiles only; ``keep[u]`` is tile
// u of the run, its BQ x BKV bytes row-major): masked scores become -inf
inline void tile_scores(const Hooks& spec, const Ctx& cx, float SCALE, float* s, int ld, int rows, int cols,
                        const uint8_t* const* keep, int64_t b, int64_t h, int64_t q0, int64_t k0) {{
  if (spec.mod_rows) spec.mod_rows(&cx, SCALE, s, ld, rows, cols, b, h, q0, k0);
  if (!keep) return;
  for (int i = 0; i < rows; ++i)
    for (int u = 0; u * BKV < cols; ++u) {{
      const uint8_t* kr = keep[u] + i * BKV;
      float* r = s + i * ld + u * BKV;
      const int n = min_of(BKV, cols - u * BKV);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      const __m512 ninf = _mm512_set1_ps(-INF);  // (every lane rewritten: storing -inf into the masked lanes alone
      // ran 1-3% slower on fp32 2-D neighborhood forwards, ABBA)
      for (int j = 0; j < n; j += 16) {{
        const __mmask16 in = j + 16 <= n ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m128i bytes = _mm_maskz_loadu_epi8(in, kr + j);
        const __m512 x = _mm512_mask_mov_ps(ninf, _mm_test_epi8_mask(bytes, bytes), _mm512_maskz_loadu_ps(in, r + j));
        _mm512_mask_storeu_ps(r + j, in, x);
      }}
#else
      #pragma omp simd
      for (int j = 0; j < n; ++j) r[j] = kr[j] ? r[j] : -INF;
#endif
    }}
}}

// tile_scores on a job's rows, head by head: ``heads`` query heads from h on, each with rows / heads rows of the
// q-block from q0 (grouped jobs; the keep records' rows are the same for every head: one block map for all)
inline void tile_scores_heads(const Hooks& spec, const Ctx& cx, float SCALE, float* s, int ld, int64_t heads, int rows,
                              int cols, const uint8_t* const* keep, int64_t b, int64_t h, int64_t q0, int64_t k0) {{
  const int per = rows / (int)heads;
  for (int64_t g = 0; g < heads; ++g)
    tile_scores(spec, cx, SCALE, s + g * per * ld, ld, per, cols, keep, b, h + g, q0, k0);
}}

}}  // namespace

// ---- attncc: next translation unit ----
// bytes of one partial tile's record in the keep buffer (CpuKernel sizes the buffer with it)
extern "C" int64_t attncc_tile_bytes() {{ return TILE_BYTES; }}

extern "C" int attncc_forward(
    const float* q, const float* k, const float* v, float* o, float* lse,
    int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Skv, int64_t D,
    const int32_t* map_of, int64_t maps_b, int64_t maps_h,
    const int32_t* kv_ptr, const int32_t* kv_idx, const uint8_t* kv_full,
    const int32_t* kv_rank, const int64_t* keep_base, const uint8_t* keep,
    const void* const* tensors, const int64_t* dims, void* sgemm, int threads, const int64_t* HEADS, float SCALE,
    const float* rope_cos, const float* rope_sin, int64_t rope_bt, float* work, const void* hooks, int kv_splits,
    int narrow, int group, int64_t kv_stride) {{
  const int64_t nq = (Sq + BQ - 1) / BQ;
  const sgemm_t sg = (sgemm_t)sgemm;
  const Hooks& spec = *(const Hooks*)hooks;
  const bool HAS_MOD = spec.mod_rows != nullptr, ROPE = rope_cos != nullptr;
  // narrow != 0: q, k and v are fp16 (1: attncc_f16c) or bf16 (2) (o stays fp32: the backward's delta reads it
  // unrounded). Each task widens its q rows into a local tile; K is widened as it is packed, and V once into the
  // workspace after K's panels (micro-kernels), or both are read in place and widened as they are loaded (few rows,
  // unpacked: decoding). No RoPE.
  const void *q_n = q, *k_n = k, *v_n = v;
  if (narrow && (!SIMD || (narrow == 1 && !F16C) || ROPE || D % VW)) return -1;
  const bool half = narrow != 0;
  // group != 0 (CpuKernel.grouped_jobs): a kv head's query heads in one job (Jobs): with K and V in place (few rows
  // per key, vector loops) or on packed K (micro-kernels: the group's rows are one register-blocked task)
  if (group && (!SIMD || D % VW || ROPE || nq > 1 || maps_h > 1 || !Jobs::groups_fit(H, Hkv, Sq, HEADS))) return -1;
  // kv_stride: elements from one (batch, kv head)'s K rows to the next's (and V's), Skv * D when contiguous; more for
  // a view of a longer cache (k_cache[:, :, :Skv]), read where it is when K and V are read in place (work null: few
  // rows per key); packing and rotation read whole contiguous heads
  if (kv_stride != Skv * D && (work || ROPE)) return -1;
  Buf k_rot;  // prologue: K rotated once (every q-block task reads it); Q per task below
  if (ROPE) {{
    k_rot.resize(B * Hkv * Skv * D);
    rope_all(k, k_rot.data(), B, Hkv, Skv, Skv, D, rope_cos, rope_sin, rope_bt, false, threads);
    k = k_rot.data();
  }}
  const bool micro = use_micro(work, D);  // register-blocked products, else BLAS
  const int64_t skv_pad = (Skv + NR - 1) / NR * NR;
  float* k_pack = work;  // the caller's workspace: B * Hkv * skv_pad * D floats where micro
  if (micro && half) {{
    if (narrow == 1) pack_panels_h((const half_t*)k_n, k_pack, B * Hkv, Skv, D, threads);
    else pack_panels_h((const bf16_t*)k_n, k_pack, B * Hkv, Skv, D, threads);
    float* v32 = work + B * Hkv * skv_pad * D;  // (the caller's workspace holds both)
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < B * Hkv * Skv; ++r) widen_at(v_n, narrow, r * D, v32 + r * D, D);
    v = v32;
  }} else if (micro) {{
    pack_panels(k, k_pack, B * Hkv, Skv, D, threads);
  }}
  int error = 0;
  const Ctx cx{{B, H, Sq, Skv, tensors, dims, &error}};
  const int d = (int)D;
  // kv_splits > 1 (CpuKernel.kv_splits): each task's kv tiles are split into that many ranges, one job each, whose
  // (o, lse) are merged exactly at the end (see Jobs)
  Jobs jobs(B, H, Hkv, Sq, D, HEADS, kv_splits, group != 0);
  const int splits = jobs.splits, chunk = jobs.chunk();
  #pragma omp parallel num_threads(threads)
  {{
    Buf s(BQ * LDS), acc(BQ * D), m(BQ), l(BQ), alpha(BQ), q_rot(ROPE || half ? BQ * D : 0);
    std::vector<int16_t> group_rng(group && micro ? SPAN * 2 * BQ : 0);  // partial tiles' row ranges, per group row
    #pragma omp for schedule(dynamic, chunk)
    for (int64_t job = 0; job < jobs.count(); ++job) {{
      int64_t b, h, qb, split;
      jobs.of(job, b, h, qb, split);
      if (h < 0) continue;  // (grouped: a kv head without query heads)
      const int64_t hk = HEADS[h], q0 = qb * BQ;  // HEADS: kv head of each query head, then per kv head its heads
      int64_t heads;  // query heads in this job, from h on
      int rows;
      jobs.rows_of(hk, q0, heads, rows);
      // (else sgemm where not micro; fp16 and bf16 inputs take the vector loops at any rows: they come unpacked
      // only when few rows read each key, CpuKernel.narrow_forward)
      const bool few = !micro && SIMD && D % VW == 0 && (rows <= FEW_ROWS || half || group);
      const float* qp = half ? q_rot.data() : q + ((b * H + h) * Sq + q0) * D;
      if (half)  // prologue: this task's query rows widened into a local tile
        widen_at(q_n, narrow, ((b * H + h) * Sq + q0) * D, q_rot.data(), rows * D);
      else if (ROPE) {{  // prologue: this task's query rows, rotated into a local tile
        for (int i = 0; i < rows; ++i) {{
          const int64_t t = rope_at(rope_bt, b, Skv, q0 + i + Skv - Sq, D);
          rope_row(qp + i * D, q_rot.data() + i * D, rope_cos + t, rope_sin + t, d, false);
        }}
        qp = q_rot.data();
      }}
      const float* kp = half ? nullptr : k + (b * Hkv + hk) * kv_stride;
      const float* kpp = micro ? k_pack + (b * Hkv + hk) * skv_pad * D : nullptr;
      const float* vp = half && !micro ? nullptr : v + (b * Hkv + hk) * kv_stride;  // (fp16: v widened, or v_h)
      const int64_t kv_at = (b * Hkv + hk) * kv_stride;  // (fp16 and bf16 K and V read in place: few rows)
      start_rows(acc.data(), m.data(), l.data(), D);
      const int64_t pair = (maps_b > 1 ? b : 0) * maps_h + (maps_h > 1 ? h : 0);
      const int64_t row = (int64_t)map_of[pair] * nq + qb;
      const uint8_t* run_keep[SPAN];
      const int16_t* run_rng[SPAN];
      int32_t t_begin, t_end;
      split_range(kv_ptr, row, split, splits, t_begin, t_end);
      for (int32_t t = t_begin, span; t < t_end; t += span) {{
        span = run_length(kv_idx, kv_full, t, t_end, SPAN);
        const int64_t k0 = (int64_t)kv_idx[t] * BKV;
        const int cols = (int)min_of<int64_t>((int64_t)BKV * span, Skv - k0);
        const bool full = kv_full[t] != 0;
        if (!full)
          for (int u = 0; u < span; ++u) {{
            run_keep[u] = tile_record(keep, keep_base, pair, kv_rank[t + u]);
            run_rng[u] = kept_ranges(run_keep[u]);
            if (group && micro && heads > 1) {{  // (grouped rows: head g's row i is row i of the q-block)
              int16_t* to = group_rng.data() + u * 2 * BQ;
              for (int r = 0; r < rows; ++r) {{
                to[2 * r] = run_rng[u][2 * (r % Sq)];
                to[2 * r + 1] = run_rng[u][2 * (r % Sq) + 1];
              }}
              run_rng[u] = to;
            }}
          }}
        if (micro && !full)  // partial tiles: only the column panels some row keeps
          for (int u = 0; u < span; ++u)
            scores_kept(rows, up_nr(min_of(BKV, cols - u * BKV)), d, qp, d, kpp + (k0 + u * BKV) * D, d, NR,
                        s.data() + u * BKV, LDS, run_rng[u]);
        else if (micro) gemm_micro<0>(rows, up_nr(cols), d, qp, d, 1, kpp + k0 * D, d, NR, s.data(), LDS);
        else if (few && narrow == 1)
          scores_rows(rows, cols, d, qp, (const half_t*)k_n + kv_at + k0 * D, s.data(), LDS);
        else if (few && half) scores_rows(rows, cols, d, qp, (const bf16_t*)k_n + kv_at + k0 * D, s.data(), LDS);
        else if (few) scores_rows(rows, cols, d, qp, kp + k0 * D, s.data(), LDS);
        else gemm_nt(sg, rows, cols, d, qp, d, kp + k0 * D, d, s.data(), LDS, 0.0f);
        // without a score mod the scale folds into max and exp (SCALE > 0: AttentionSpec checks); partial tiles
        // then only mask, full ones skip the scores pass
        const bool plain = full && !HAS_MOD;
        if (!plain)
          tile_scores_heads(spec, cx, SCALE, s.data(), LDS, heads, rows, cols, full ? nullptr : run_keep, b, h, q0, k0);
        const float sc = HAS_MOD ? LOG2E : SCALE * LOG2E;  // scores to base 2; m[] is kept in base 2
        softmax_rows(s.data(), LDS, rows, cols, sc, m.data(), l.data(), alpha.data());
        if (micro && !full)
          products_kept<2>(rows, d, s.data(), LDS, 1, BKV, vp + k0 * D, d, acc.data(), d, alpha.data(), run_rng, span);
        else if (micro) gemm_micro<2>(rows, d, cols, s.data(), LDS, 1, vp + k0 * D, 1, d, acc.data(), d, alpha.data());
        else if (few && narrow == 1)
          values_rows(rows, cols, d, s.data(), LDS, (const half_t*)v_n + kv_at + k0 * D, acc.data(), alpha.data(),
                      [](const half_t* x) {{ return widen_h(x); }});
        else if (few && half)
          values_rows(rows, cols, d, s.data(), LDS, (const bf16_t*)v_n + kv_at + k0 * D, acc.data(), alpha.data(),
                      [](const bf16_t* x) {{ return widen_h(x); }});
        else if (few)
          values_rows(rows, cols, d, s.data(), LDS, vp + k0 * D, acc.data(), alpha.data(),
                      [](const float* x) {{ return (vf)(*(const vfu*)x); }});
        else {{
          for (int i = 0; i < rows; ++i)
            if (alpha[i] != 1.0f) for (int64_t c = 0; c < D; ++c) acc[i * D + c] *= alpha[i];
          gemm_nn(sg, rows, d, cols, s.data(), LDS, vp + k0 * D, d, acc.data(), d);
        }}
      }}
      jobs.finish(o, lse, acc.data(), m.data(), l.data(), rows, split, (b * H + h) * Sq + q0);
    }}
  }}
  jobs.merge(o, lse, threads);
  return error;
}}

// ---- attncc: next translation unit ----
// 1 when this build computes bf16 inputs natively (AVX512_BF16), else 0 (the caller upcasts to fp32)
extern "C" int attncc_bf16() {{ return BF16 ? 1 : 0; }}
// 1 when the bf16 forward's products run on AMX tiles (built with AMX_BF16 and granted by the OS), else 0
extern "C" int attncc_amx() {{ return AMX && amx_granted() ? 1 : 0; }}

// The forward on bf16 q, k, v (layouts as attncc_forward; o bf16, rounded once from fp32, and lse fp32). Needs the
// micro-kernel shapes (D and BKV multiples of NR) and a workspace of (2 * B * Hkv * up(Skv) * D) bf16 values (up: to
// NR) for the packed K and V, or none (work null: few rows read each key, K and V are read in place); returns -1
// where this build has no bf16 products. No RoPE (the caller upcasts for rotated specs).
extern "C" int attncc_forward_bf16(
    const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse,
    int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Skv, int64_t D,
    const int32_t* map_of, int64_t maps_b, int64_t maps_h,
    const int32_t* kv_ptr, const int32_t* kv_idx, const uint8_t* kv_full,
    const int32_t* kv_rank, const int64_t* keep_base, const uint8_t* keep,
    const void* const* tensors, const int64_t* dims, int threads, const int64_t* HEADS, float SCALE,
    bf16_t* work, const void* hooks, int kv_splits, int fp16, float* o32, int group, int64_t kv_stride) {{
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (D % NR || BKV % NR) return -1;
  const int64_t nq = (Sq + BQ - 1) / BQ;
  // group (as in attncc_forward): a kv head's query heads in one job, few rows per key (unpacked)
  if (group && (work || nq > 1 || maps_h > 1 || !Jobs::groups_fit(H, Hkv, Sq, HEADS))) return -1;
  if (kv_stride != Skv * D && work) return -1;  // (as in attncc_forward: K and V in place only)
  const Hooks& spec = *(const Hooks*)hooks;
  const bool HAS_MOD = spec.mod_rows != nullptr;
  const int64_t skv_pad = (Skv + NR - 1) / NR * NR;
  const bool packed = work != nullptr;  // else few rows per key: K and V read in place (scores_rows_bf)
  const bool tiles = packed && AMX && BQ % 16 == 0 && amx_granted();  // else the vdpbf16ps micro-kernels
  // hilo (fp16 q, k, v: split_fp16): q and k rows become DK = 4D wide, [q_hi | q_hi | q_lo | q_lo] and
  // [k_hi | k_lo | k_hi | k_lo], so one product of them is Q K^T exactly (then rounded as fp32 sums are); V = v_hi +
  // v_lo, and P is split as it is rounded: P V takes three products into the same accumulator tiles (amx_values)
  const bool hilo = fp16 != 0;
  if (hilo && !tiles) return -1;  // (only the AMX products take the split terms)
  const int64_t DK = hilo ? 4 * D : D;
  bf16_t* k_pack = work;
  bf16_t* v_pack = packed ? work + B * Hkv * skv_pad * DK : nullptr;
  bf16_t* vlo_pack = hilo ? v_pack + B * Hkv * skv_pad * D : nullptr;
  if (hilo) {{
    pack_panels_fp16(k, k_pack, B * Hkv, Skv, D, threads);
    pack_v_fp16(v, v_pack, vlo_pack, B * Hkv, Skv, D, threads);
  }} else if (packed) {{
    pack_panels<2>(k, k_pack, B * Hkv, Skv, D, threads);  // pair panels [D / 2][NR][2]
    pack_v_bf16(v, v_pack, B * Hkv, Skv, D, threads);
  }}
  int error = 0;
  const Ctx cx{{B, H, Sq, Skv, tensors, dims, &error}};
  const int d = (int)D, dk = (int)DK;  // (dk: the scores' depth)
  Jobs jobs(B, H, Hkv, Sq, D, HEADS, kv_splits, group != 0);  // as in attncc_forward
  const int splits = jobs.splits, chunk = jobs.chunk();
  #pragma omp parallel num_threads(threads)
  {{
    Buf s(BQ * LDS), acc(BQ * D), m(BQ), l(BQ), alpha(BQ);
    const int pw = WKV + 32;  // bf16 P row stride (room for zeros up to the next 32 keys)
    Aligned<bf16_t> pb(packed ? BQ * pw : 0, true), qpad(tiles ? BQ * DK : 0, true), plo(hilo ? BQ * pw : 0, true);
    if (tiles) amx_configure();
    #pragma omp for schedule(dynamic, chunk)
    for (int64_t job = 0; job < jobs.count(); ++job) {{
      int64_t b, h, qb, split;
      jobs.of(job, b, h, qb, split);
      if (h < 0) continue;  // (grouped: a kv head without query heads)
      const int64_t hk = HEADS[h], q0 = qb * BQ;
      int64_t heads;  // query heads in this job, from h on
      int rows;
      jobs.rows_of(hk, q0, heads, rows);
      const int rows16 = (rows + 15) / 16 * 16;
      const bf16_t* qp = q + ((b * H + h) * Sq + q0) * D;
      if (hilo) {{  // the block's split rows, zero past rows
        for (int i = 0; i < rows16; ++i) split_row_q(i < rows ? qp + i * D : nullptr, D, qpad.data() + i * DK);
        qp = qpad.data();
      }} else if (tiles && rows16 != rows) {{  // a ragged last block: tile loads read 16 rows, so pad with zeros
        std::memcpy(qpad.data(), qp, sizeof(bf16_t) * rows * D);
        std::memset(qpad.data() + rows * D, 0, sizeof(bf16_t) * (rows16 - rows) * D);
        qp = qpad.data();
      }}
      const bf16_t* kpp = packed ? k_pack + (b * Hkv + hk) * skv_pad * DK : k + (b * Hkv + hk) * kv_stride;
      const bf16_t* vpp = packed ? v_pack + (b * Hkv + hk) * skv_pad * D : v + (b * Hkv + hk) * kv_stride;
      const bf16_t* vlp = hilo ? vlo_pack + (b * Hkv + hk) * skv_pad * D : nullptr;
      start_rows(acc.data(), m.data(), l.data(), D);
      const int64_t pair = (maps_b > 1 ? b : 0) * maps_h + (maps_h > 1 ? h : 0);
      const int64_t row = (int64_t)map_of[pair] * nq + qb;
      const uint8_t* run_keep[SPAN];
      int32_t t_begin, t_end;
      split_range(kv_ptr, row, split, splits, t_begin, t_end);
      for (int32_t t = t_begin, span; t < t_end; t += span) {{
        span = run_length(kv_idx, kv_full, t, t_end, SPAN);
        const int64_t k0 = (int64_t)kv_idx[t] * BKV;
        const int cols = (int)min_of<int64_t>((int64_t)BKV * span, Skv - k0);
        const bool full = kv_full[t] != 0, plain = full && !HAS_MOD;
        const float sc = HAS_MOD ? LOG2E : SCALE * LOG2E;  // (as in attncc_forward)
        for (int u = 0; !full && u < span; ++u) run_keep[u] = tile_record(keep, keep_base, pair, kv_rank[t + u]);
        if (!packed) {{  // few rows: in place, every column (tile_scores masks a partial tile's)
          scores_rows_bf(rows, cols, d, qp, kpp + k0 * D, s.data(), LDS);  // (unsplit: dk == d)
          if (!plain)
            tile_scores_heads(spec, cx, SCALE, s.data(), LDS, heads, rows, cols, full ? nullptr : run_keep, b, h, q0,
                              k0);
          softmax_rows(s.data(), LDS, rows, cols, sc, m.data(), l.data(), alpha.data());
          values_rows_bf(rows, cols, d, s.data(), LDS, vpp + k0 * D, acc.data(), alpha.data());
          continue;
        }}
        if (tiles) {{  // AMX: 32 rows at a time through scores, softmax and P V, so their scores and P stay in cache
          for (int g = 0; g < rows16; g += 32) {{
            const int n16 = min_of(32, rows16 - g), n = min_of(32, rows - g);
            const bf16_t* qg = qp + g * DK;
            const uint8_t* group_keep[SPAN];
            for (int u = 0; !full && u < span; ++u) {{  // partial tiles: only the column panels some row keeps
              group_keep[u] = run_keep[u] + g * BKV;
              amx_scores(n16, up_nr(min_of(BKV, cols - u * BKV)), dk, qg, kpp + (k0 + u * BKV) * DK,
                         s.data() + u * BKV, LDS, kept_ranges(run_keep[u]) + 2 * g, n);
            }}
            if (full) amx_scores(n16, up_nr(cols), dk, qg, kpp + k0 * DK, s.data(), LDS, nullptr, n);
            if (!plain)
              tile_scores(spec, cx, SCALE, s.data(), LDS, n, cols, full ? nullptr : group_keep, b, h, q0 + g, k0);
            softmax_rows_bf16(s.data(), LDS, n, cols, (cols + 31) / 32 * 32, sc, m.data() + g, l.data() + g,
                              alpha.data() + g, pb.data(), pw, hilo ? plo.data() : nullptr);
            if (n16 != n) {{  // the padding rows
              std::memset(pb.data() + n * pw, 0, sizeof(bf16_t) * (n16 - n) * pw);
              if (hilo) std::memset(plo.data() + n * pw, 0, sizeof(bf16_t) * (n16 - n) * pw);
            }}
            amx_values(n16, n, cols, d, pb.data(), pw, vpp + k0 * D, acc.data() + g * D, alpha.data() + g,
                       hilo ? plo.data() : nullptr, hilo ? vlp + k0 * D : nullptr);
          }}
          continue;
        }}
        if (!full)  // partial tiles: only the column panels some row keeps
          for (int u = 0; u < span; ++u)
            scores_kept_bf(rows, up_nr(min_of(BKV, cols - u * BKV)), d / 2, qp, d, kpp + (k0 + u * BKV) * D, d, 2 * NR,
                           s.data() + u * BKV, LDS, kept_ranges(run_keep[u]));
        else gemm_bf<0>(rows, up_nr(cols), d / 2, qp, d, kpp + k0 * D, d, 2 * NR, s.data(), LDS);
        if (!plain) tile_scores(spec, cx, SCALE, s.data(), LDS, rows, cols, full ? nullptr : run_keep, b, h, q0, k0);
        softmax_rows_bf16(s.data(), LDS, rows, cols, (cols + 31) / 32 * 32, sc, m.data(), l.data(), alpha.data(),
                          pb.data(), pw);
        if (full) {{
          gemm_bf<2>(rows, d, (cols + 1) / 2, pb.data(), pw, vpp + k0 * D, 2, 2 * D, acc.data(), d, alpha.data());
        }} else {{  // partial tiles: each register block over its rows' kept keys
          const int16_t* rngs[SPAN];
          for (int u = 0; u < span; ++u) rngs[u] = kept_ranges(run_keep[u]);
          products_kept_bf<2>(rows, d, pb.data(), pw, BKV, vpp + k0 * D, acc.data(), d, alpha.data(), rngs, span);
        }}
      }}
      if (o32) jobs.finish(o32, lse, acc.data(), m.data(), l.data(), rows, split, (b * H + h) * Sq + q0);
      else jobs.finish(o, lse, acc.data(), m.data(), l.data(), rows, split, (b * H + h) * Sq + q0);
    }}
    if (tiles) amx_release();
  }}
  if (o32) jobs.merge(o32, lse, threads);
  else jobs.merge(o, lse, threads);
  return error;
#else
  (void)q; (void)k; (void)v; (void)o; (void)lse; (void)B; (void)H; (void)Hkv; (void)Sq; (void)Skv; (void)D;
  (void)map_of; (void)maps_b; (void)maps_h; (void)kv_ptr; (void)kv_idx; (void)kv_full; (void)kv_rank;
  (void)keep_base; (void)keep; (void)tensors; (void)dims; (void)threads; (void)HEADS; (void)SCALE; (void)work;
  (void)hooks; (void)kv_splits; (void)fp16; (void)o32; (void)group; (void)kv_stride;
  return -1;
#endif
}}

// ---- attncc: next translation unit ----
// lanes of the register-blocked products' vectors; 0 when this build has no FMA vectors (BLAS path)
extern "C" int attncc_vector_lanes() {{ return SIMD ? VW : 0; }}
// 1 when the fp32 forward and backward take fp16 inputs (half != 0: F16C conversions as they read and write)
extern "C" int attncc_f16c() {{ return F16C ? 1 : 0; }}

extern "C" int attncc_backward(
    const float* q, const float* k, const float* v, const float* o, const float* dout, const float* lse,
    const float* dlse, float* dq, float* dk, float* dv,
    int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Skv, int64_t D,
    const int32_t* map_of, int64_t maps_b, int64_t maps_h,
    const int32_t* q_ptr, const int32_t* q_idx, const uint8_t* q_full,
    const int32_t* q_rank, const int64_t* keep_base, const uint8_t* keep,
    const void* const* tensors, const int64_t* dims, void* sgemm, int threads, const int64_t* HEADS, float SCALE,
    const float* rope_cos, const float* rope_sin, int64_t rope_bt, float* work, float* pack, int deterministic,
    float* tgrad, const int64_t* tgrad_off, int64_t tgrad_total, const void* hooks, int narrow) {{
  const int64_t nq = (Sq + BQ - 1) / BQ, nkv = (Skv + BKV - 1) / BKV;
  const sgemm_t sg = (sgemm_t)sgemm;
  const Hooks& spec = *(const Hooks*)hooks;
  const bool HAS_MOD = spec.mod_rows != nullptr, ROPE = rope_cos != nullptr;
  // narrow != 0 (register-blocked products only, no RoPE): q, k, v, dout and dq, dk, dv are fp16 (1: attncc_f16c)
  // or bf16 (2) (o is the forward's fp32 o). K and V are widened as they are packed, each task's K rows (dQ's B)
  // and each run's q and dO rows into local fp32 tiles; the gradients are rounded once from their fp32 sums
  const void *q_n = q, *k_n = k, *v_n = v, *dout_n = dout;
  if (narrow && ((narrow == 1 && !F16C) || ROPE || !use_micro(pack, D))) return -1;
  const bool half = narrow != 0;
  Buf q_rot, k_rot;  // prologue: rotated Q and K; the epilogue rotates dQ and dK back
  if (ROPE) {{
    q_rot.resize(B * H * Sq * D);
    k_rot.resize(B * Hkv * Skv * D);
    rope_all(q, q_rot.data(), B, H, Sq, Skv, D, rope_cos, rope_sin, rope_bt, false, threads);
    rope_all(k, k_rot.data(), B, Hkv, Skv, Skv, D, rope_cos, rope_sin, rope_bt, false, threads);
    q = q_rot.data();
    k = k_rot.data();
  }}
  // the caller's workspaces: ``work`` holds per-thread dQ partials (threads * B * H * Sq * D floats) and
  // delta (B * H * Sq); ``pack`` K and V in panels (2 * B * Hkv * skv_pad * D) where the products are
  // register-blocked (null otherwise)
  const int64_t rows_all = B * H * Sq;
  float* dq_threads = work;
  float* delta = work + (int64_t)threads * rows_all * D;
  const bool micro = use_micro(pack, D);  // register-blocked products, else BLAS
  const int64_t skv_pad = (Skv + NR - 1) / NR * NR;
  float* k_pack = pack;
  float* v_pack = micro ? pack + B * Hkv * skv_pad * D : nullptr;
  // delta = rowsum(dO * O) - dlse: d lse / d s = P, so an lse gradient folds into the same dS formula
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows_all; ++r) {{
    float sum = 0.0f;
    if (half) {{
      vf acc{{}};
      for (int64_t c = 0; c < D; c += VW)
        acc += (narrow == 1 ? widen_h((const half_t*)dout_n + r * D + c) : widen_h((const bf16_t*)dout_n + r * D + c))
            * *(const vfu*)(o + r * D + c);
      sum = lane_sum(acc);
    }} else {{
      #pragma omp simd reduction(+:sum)
      for (int64_t c = 0; c < D; ++c) sum += dout[r * D + c] * o[r * D + c];
    }}
    delta[r] = dlse ? sum - dlse[r] : sum;
  }}
  if (micro) {{
    const bool stream = (uintptr_t)pack % 64 == 0;  // (as attncc_backward_bf16's STREAM_PACKS)
    if (half) {{
      if (narrow == 1) {{
        pack_panels_h((const half_t*)k_n, k_pack, B * Hkv, Skv, D, threads, stream);
        pack_panels_h((const half_t*)v_n, v_pack, B * Hkv, Skv, D, threads, stream);
      }} else {{
        pack_panels_h((const bf16_t*)k_n, k_pack, B * Hkv, Skv, D, threads, stream);
        pack_panels_h((const bf16_t*)v_n, v_pack, B * Hkv, Skv, D, threads, stream);
      }}
    }} else {{
      pack_panels(k, k_pack, B * Hkv, Skv, D, threads, stream);
      pack_panels(v, v_pack, B * Hkv, Skv, D, threads, stream);
    }}
  }}
  int error = 0;
  const Ctx cx{{B, H, Sq, Skv, tensors, dims, &error}};
  const int d = (int)D;
  (void)nq;
  // kv-block tasks go to threads dynamically (uneven tiles balance), or round-robin when the caller asks for
  // a deterministic dQ: each thread's partial then sums the same tasks in the same order on every call
  omp_sched_t saved_kind;
  int saved_chunk;
  omp_get_schedule(&saved_kind, &saved_chunk);
  omp_set_schedule(deterministic ? omp_sched_static : omp_sched_dynamic, 1);
  #pragma omp parallel num_threads(threads)
  {{
    Buf s(WQ * BKV), dp(WQ * BKV), dk_acc(BKV * D), dv_acc(BKV * D);
    Buf q_loc(half ? WQ * D : 0), do_loc(half ? WQ * D : 0), k_loc(half ? BKV * D : 0);  // (fp16: widened rows)
    int16_t run_rng[2 * WQ];  // kept columns of the rows of a partial run
    const int16_t* rng_one = run_rng;
    const int16_t* col_rngs[SPAN_Q];
    float* dq_mine = dq_threads + (int64_t)omp_get_thread_num() * rows_all * D;
    // this thread's partial table gradients (zeroed by the caller, summed by it afterwards); null: none wanted
    float* tg_mine = spec.table_grads && tgrad ? tgrad + (int64_t)omp_get_thread_num() * tgrad_total : nullptr;
    std::memset(dq_mine, 0, sizeof(float) * rows_all * D);
    #pragma omp for schedule(runtime)
    for (int64_t task = 0; task < B * Hkv * nkv; ++task) {{
      const int64_t kb = task % nkv, hk = (task / nkv) % Hkv, b = task / (nkv * Hkv);
      const int64_t k0 = kb * BKV;
      const int cols = (int)min_of<int64_t>(BKV, Skv - k0);
      const float* kp = half ? k_loc.data() : k + ((b * Hkv + hk) * Skv + k0) * D;
      if (half)
        widen_at(k_n, narrow, ((b * Hkv + hk) * Skv + k0) * D, k_loc.data(), (int64_t)cols * D);
      const float* vp = half ? nullptr : v + ((b * Hkv + hk) * Skv + k0) * D;  // (BLAS path only)
      const int64_t packed = ((b * Hkv + hk) * skv_pad + k0) * D;  // this block's K and V panels
      fill(dk_acc.data(), BKV * D, 0.0f);
      fill(dv_acc.data(), BKV * D, 0.0f);
      for (int64_t g = HEADS[H + hk]; g < HEADS[H + hk + 1]; ++g) {{  // the query heads reading kv head hk
        const int64_t h = HEADS[H + Hkv + 1 + g];
        const int64_t pair = (maps_b > 1 ? b : 0) * maps_h + (maps_h > 1 ? h : 0);
        const int64_t row = (int64_t)map_of[pair] * nkv + kb;
        for (int32_t t = q_ptr[row], span; t < q_ptr[row + 1]; t += span) {{
          span = run_length(q_idx, q_full, t, q_ptr[row + 1], SPAN_Q);
          const int64_t q0 = (int64_t)q_idx[t] * BQ;
          const int rows = (int)min_of<int64_t>((int64_t)BQ * span, Sq - q0);
          const int64_t base = (b * H + h) * Sq + q0;
          const float* qp = half ? q_loc.data() : q + base * D;
          const float* dop = half ? do_loc.data() : dout + base * D;
          if (half) {{
            widen_at(q_n, narrow, base * D, q_loc.data(), (int64_t)rows * D);
            widen_at(dout_n, narrow, base * D, do_loc.data(), (int64_t)rows * D);
          }}
          const bool full = q_full[t] != 0;
          if (micro && !full) {{  // the run's rows' kept columns and each q tile's columns' kept rows
            for (int u = 0; u < span; ++u)
              col_rngs[u] = kept_col_ranges(tile_record(keep, keep_base, pair, q_rank[t + u]));
            for (int i = 0; i < rows; ++i) {{
              const int16_t* r = kept_ranges(tile_record(keep, keep_base, pair, q_rank[t + i / BQ]));
              run_rng[2 * i] = r[2 * (i % BQ)];
              run_rng[2 * i + 1] = r[2 * (i % BQ) + 1];
            }}
          }}
          if (micro && !full) {{  // partial tiles: only the column panels some row keeps
            scores_kept(rows, up_nr(cols), d, qp, d, k_pack + packed, d, NR, s.data(), BKV, run_rng);
            scores_kept(rows, up_nr(cols), d, dop, d, v_pack + packed, d, NR, dp.data(), BKV, run_rng);
          }} else if (micro) {{
            gemm_micro_ahead<0>(rows, up_nr(cols), d, qp, d, k_pack + packed, d, NR, s.data(), BKV);
            gemm_micro_ahead<0>(rows, up_nr(cols), d, dop, d, v_pack + packed, d, NR, dp.data(), BKV);
          }} else {{
            gemm_nt(sg, rows, cols, d, qp, d, kp, d, s.data(), BKV, 0.0f);
            gemm_nt(sg, rows, cols, d, dop, d, vp, d, dp.data(), BKV, 0.0f);
          }}
          for (int i = 0; i < rows; ++i) {{
            float* sr = s.data() + i * BKV;
            float* dr = dp.data() + i * BKV;
            const float li = lse[base + i], di = delta[base + i];
            if (li == -INF) {{ fill(sr, cols, 0.0f); fill(dr, cols, 0.0f); continue; }}
            const uint8_t* kr = full ? nullptr
                : tile_record(keep, keep_base, pair, q_rank[t + i / BQ]) + (i % BQ) * BKV;
            if (!HAS_MOD) {{  // vector loops; the scale and log2(e) fold into one multiply
              const float sc2 = SCALE * LOG2E, li2 = li * LOG2E;
              if (full) {{
                #pragma omp simd
                for (int j = 0; j < cols; ++j) {{
                  const float p = exp2_f(sr[j] * sc2 - li2);
                  sr[j] = p;
                  dr[j] = p * (dr[j] - di) * SCALE;
                }}
              }} else {{
                #pragma omp simd
                for (int j = 0; j < cols; ++j) {{
                  const float p = exp2_f(sr[j] * sc2 - li2);
                  sr[j] = kr[j] ? p : 0.0f;
                  dr[j] = kr[j] ? p * (dr[j] - di) * SCALE : 0.0f;
                }}
              }}
              continue;
            }}
            spec.backward_row(&cx, SCALE, sr, dr, kr, cols, li, di, b, h, q0 + i, k0, tg_mine, tgrad_off);
          }}
          if (micro) {{
            if (full) {{
              gemm_micro<1>(cols, d, rows, s.data(), 1, BKV, dop, 1, d, dv_acc.data(), d);
              gemm_micro<1>(cols, d, rows, dp.data(), 1, BKV, qp, 1, d, dk_acc.data(), d);
              gemm_micro_ahead<1>(rows, d, cols, dp.data(), BKV, kp, 1, d, dq_mine + base * D, d);
            }} else {{  // partial tiles: each register block only over its kept rows (dV, dK) or columns (dQ)
              products_kept<1>(cols, d, s.data(), 1, BKV, BQ, dop, d, dv_acc.data(), d, nullptr, col_rngs, span);
              products_kept<1>(cols, d, dp.data(), 1, BKV, BQ, qp, d, dk_acc.data(), d, nullptr, col_rngs, span);
              products_kept<1>(rows, d, dp.data(), BKV, 1, BKV, kp, d, dq_mine + base * D, d, nullptr, &rng_one, 1);
            }}
          }} else {{
            gemm_tn(sg, cols, d, rows, s.data(), BKV, dop, d, dv_acc.data(), d);
            gemm_tn(sg, cols, d, rows, dp.data(), BKV, qp, d, dk_acc.data(), d);
            gemm_nn(sg, rows, d, cols, dp.data(), BKV, kp, d, dq_mine + base * D, d);
          }}
        }}
      }}
      float* dkp = half ? nullptr : dk + ((b * Hkv + hk) * Skv + k0) * D;  // (fp16: put_row below)
      float* dvp = half ? nullptr : dv + ((b * Hkv + hk) * Skv + k0) * D;
      if (ROPE)
        for (int j = 0; j < cols; ++j) {{
          const int64_t t = rope_at(rope_bt, b, Skv, k0 + j, D);
          rope_row(dk_acc.data() + j * D, dkp + j * D, rope_cos + t, rope_sin + t, d, true);
        }}
      else if (half)
        put_at(dk, narrow, ((b * Hkv + hk) * Skv + k0) * D, dk_acc.data(), (int64_t)cols * D);
      else
        std::memcpy(dkp, dk_acc.data(), sizeof(float) * cols * D);
      if (half)
        put_at(dv, narrow, ((b * Hkv + hk) * Skv + k0) * D, dv_acc.data(), (int64_t)cols * D);
      else
        std::memcpy(dvp, dv_acc.data(), sizeof(float) * cols * D);
    }}
    // epilogue (after the task loop's barrier): dQ = the sum of the team's partials, rotated back
    const int team = omp_get_num_threads();
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_all; ++r) {{
      if (half) {{
        if (narrow == 1) sum_partials((half_t*)dq + r * D, dq_threads, r, rows_all, D, team);
        else sum_partials((bf16_t*)dq + r * D, dq_threads, r, rows_all, D, team);
        continue;
      }}
      float* out = dq + r * D;
      sum_partials(out, dq_threads, r, rows_all, D, team);
      if (ROPE) {{
        const int64_t t = rope_at(rope_bt, r / (H * Sq), Skv, r % Sq + Skv - Sq, D);
        rope_row(out, out, rope_cos + t, rope_sin + t, d, true);
      }}
    }}
  }}
  omp_set_schedule(saved_kind, saved_chunk);
  return error;
}}

// ---- attncc: next translation unit ----
// The backward on bf16 q, k, v and dO, its five products on AMX tiles where the CPU has them and the OS grants them,
// else on vdpbf16ps register blocks (o bf16 and lse fp32 from the forward, delta from the bf16 o as in
// FlashAttention; dq, dk, dv bf16, each rounded once from its fp32 sums, as the caller's cast would; tiles, masks,
// score-mod hooks and scheduling as attncc_backward; no RoPE). Per run of q rows and kv block:
// S = Q K^T and dP = dO V^T (q and dO rows as A tiles, K and V pair panels), P and dS in fp32 rows; then, with
// P and dS as bf16 pair rows over the queries, dV^T += dO^T P and dK^T += Q^T dS (Q^T and dO^T transposed once per
// head: no per-tile transposes), and dQ += dS K (dS rows as A tiles, K pair rows). dK and dV are transposed back
// once per task. ``work``: fp32, attncc_backward's (per-thread dQ partials, then delta); ``pack``: bf16, room for
// 3 * B * Hkv * up(Skv) * D + 2 * B * H * (up(Sq) + NR) * D values (up: to NR; fp16: 10 * .. + 4 * ..). Returns -1
// where this build has no bf16 products or the shapes do not fit them (the caller then upcasts and runs
// attncc_backward).
// fp16 != 0: q, k, v and dout are fp16, each value the exact sum of two bf16s (split_fp16), as in the fp16 forward:
// S = Q K^T and dP = dO V^T are one product of rows four times as deep ([hi | hi | lo | lo] . [hi | lo | hi | lo]:
// exact), P and dS (fp32, from exp2_v) are split as they are rounded (hi + lo to 2^-17), and dV^T, dK^T and dQ each
// take three products into the same tiles (hi.hi + lo.hi + hi.lo; lo.lo is below 2^-17 of the terms). o32 is the
// forward's fp32 o; the gradients go to dq32, dk32 and dv32 in fp32 (the caller rounds them to fp16). AMX only.
extern "C" int attncc_backward_bf16(
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* o, const bf16_t* dout, const float* lse,
    const float* dlse, bf16_t* dq, bf16_t* dk, bf16_t* dv,
    int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Skv, int64_t D,
    const int32_t* map_of, int64_t maps_b, int64_t maps_h,
    const int32_t* q_ptr, const int32_t* q_idx, const uint8_t* q_full,
    const int32_t* q_rank, const int64_t* keep_base, const uint8_t* keep,
    const void* const* tensors, const int64_t* dims, int threads, const int64_t* HEADS, float SCALE,
    float* work, bf16_t* pack, int deterministic, float* tgrad, const int64_t* tgrad_off, int64_t tgrad_total,
    const void* hooks, int fp16, const float* o32, float* dq32, float* dk32, float* dv32) {{
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (D % NR || BKV % NR || BQ % 32 || NR != 32) return -1;
  const bool tiles = AMX && amx_granted();  // else vdpbf16ps register blocks (gemm_bf)
  const bool hilo = fp16 != 0;
  if (hilo && !tiles) return -1;  // (only the AMX products take the split terms)
  const int64_t DK = hilo ? 4 * D : D;  // the depth of the S and dP products' rows
  const int64_t nkv = (Skv + BKV - 1) / BKV;
  const Hooks& spec = *(const Hooks*)hooks;
  const bool HAS_MOD = spec.mod_rows != nullptr;
  const int64_t rows_all = B * H * Sq;
  float* dq_threads = work;
  float* delta = work + (int64_t)threads * rows_all * D;
  const int64_t skv_pad = (Skv + NR - 1) / NR * NR, sq_pad = (Sq + NR - 1) / NR * NR, st = sq_pad + NR;
  const int64_t kv_all = B * Hkv * skv_pad, q_all = B * H * st;
  bf16_t* k_panels = pack;                      // pack_panels<2>: S = Q K^T (fp16: of the split rows, 4D deep)
  bf16_t* v_panels = k_panels + kv_all * DK;    // dP = dO V^T
  bf16_t* k_pairs = v_panels + kv_all * DK;     // pair rows over keys: dQ = dS K
  bf16_t* k_pairs_lo = hilo ? k_pairs + kv_all * D : nullptr;
  bf16_t* q_t = k_pairs + (hilo ? 2 : 1) * kv_all * D;  // Q^T per head [D][up(Sq)] at stride st: dK^T = Q^T dS
  bf16_t* do_t = q_t + q_all * D;                       // dO^T: dV^T = dO^T P
  bf16_t* q_t_lo = hilo ? do_t + q_all * D : nullptr;   // (fp16: the low parts' transposes)
  bf16_t* do_t_lo = hilo ? q_t_lo + q_all * D : nullptr;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows_all; ++r) {{  // delta = rowsum(dO * O) - dlse, as attncc_backward
    __m512 sum = _mm512_setzero_ps();
    if (hilo)  // fp16 dO, fp32 O
      for (int64_t c = 0; c < D; c += 16)
        sum = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dout + r * D + c))),
                              _mm512_loadu_ps(o32 + r * D + c), sum);
    else
      for (int64_t c = 0; c < D; c += 16) sum = _mm512_fmadd_ps(widen(dout + r * D + c), widen(o + r * D + c), sum);
    delta[r] = dlse ? _mm512_reduce_add_ps(sum) - dlse[r] : _mm512_reduce_add_ps(sum);
  }}
  // STREAM_PACKS: the packed operands (and the transposes below) bypass the caches. They are read back by tasks
  // that start after every head is packed, so from memory either way; non-temporal stores save each line's read for
  // ownership. 1.02-1.07x faster backward on causal, document, 2-D neighborhood and sliding windows at D = 64 and
  // 128, the transposes alone 1.05x on a sliding window (ABBA, bf16; the forward's packs gained nothing). Every
  // layout's rows are whole lines from pack on, so pack's alignment decides (the workspace's: 64 bytes in torch)
  const bool stream = (uintptr_t)pack % 64 == 0;
  if (hilo) {{
    pack_panels_fp16(k, k_panels, B * Hkv, Skv, D, threads, stream);
    pack_panels_fp16(v, v_panels, B * Hkv, Skv, D, threads, stream);
    pack_v_fp16(k, k_pairs, k_pairs_lo, B * Hkv, Skv, D, threads, stream);
  }} else {{
    pack_panels<2>(k, k_panels, B * Hkv, Skv, D, threads, stream);
    pack_panels<2>(v, v_panels, B * Hkv, Skv, D, threads, stream);
    pack_v_bf16(k, k_pairs, B * Hkv, Skv, D, threads, stream);
  }}
  transpose_bf16(q, q_t, B * H, Sq, D, sq_pad, st, threads, q_t_lo);
  transpose_bf16(dout, do_t, B * H, Sq, D, sq_pad, st, threads, do_t_lo);
  int error = 0;
  const Ctx cx{{B, H, Sq, Skv, tensors, dims, &error}};
  const int d = (int)D;
  // Whole kv heads (b, hk) per thread where their tiles split evenly (largest first, to the least loaded thread):
  // each dQ row then has one writer, so the team shares one fp32 dQ (no per-thread partials to zero and sum:
  // O(threads * B * H * Sq * D) memory traffic less, a large part of a sparse mask's backward), and the result does
  // not depend on the schedule. Else (few heads, or heads of unequal work) kv blocks are dealt out dynamically.
  const int64_t groups = B * Hkv;
  std::vector<int> owner((size_t)groups, 0);
  bool own = false;
  if (threads > 1 && groups >= threads) {{
    std::vector<std::pair<int64_t, int64_t>> work_of((size_t)groups);  // (computed tiles, group)
    for (int64_t gk = 0; gk < groups; ++gk) {{
      int64_t computed = 0;
      for (int64_t g = HEADS[H + gk % Hkv]; g < HEADS[H + gk % Hkv + 1]; ++g) {{
        const int64_t h = HEADS[H + Hkv + 1 + g];
        const int64_t pair = (maps_b > 1 ? gk / Hkv : 0) * maps_h + (maps_h > 1 ? h : 0);
        computed += q_ptr[((int64_t)map_of[pair] + 1) * nkv] - q_ptr[(int64_t)map_of[pair] * nkv];
      }}
      work_of[(size_t)gk] = {{computed, gk}};
    }}
    std::sort(work_of.begin(), work_of.end(), [](const auto& a, const auto& b) {{ return a.first > b.first; }});
    std::vector<int64_t> load((size_t)threads, 0);
    int64_t total = 0;
    for (const auto& [computed, gk] : work_of) {{
      const int u = (int)(std::min_element(load.begin(), load.end()) - load.begin());
      owner[(size_t)gk] = u;
      load[(size_t)u] += computed;
      total += computed;
    }}
    own = *std::max_element(load.begin(), load.end()) * threads <= total + total / 20;  // within 5% of even
  }}
  omp_sched_t saved_kind;
  int saved_chunk;
  omp_get_schedule(&saved_kind, &saved_chunk);
  omp_set_schedule(deterministic ? omp_sched_static : omp_sched_dynamic, 1);
  #pragma omp parallel num_threads(threads)
  {{
    constexpr int LD = BKV + 16;   // fp32 rows of S and dP (a non-power-of-two stride, as LDS)
    constexpr int JW = BKV + 16;   // pairs per bf16 pair row of P and dS
    constexpr int SW = BKV + 32;   // bf16 rows of dS: a tile's keys, zero up to the next 32
    constexpr int LDT = BKV + 16;  // fp32 rows of dK^T and dV^T
    // q rows of P and dS pair rows held for one dV^T, dK^T product. AMX tiles: 256 (their products' A and B panels,
    // 256 deep, stay in L1 across a row of C tiles) beat 512 by 3-7% and 128 by 0-5% (ABBA, bf16, D = 64 and 128,
    // Sapphire Rapids). vdpbf16ps register blocks: 512 (each block's C rows loaded and stored half as often) beat 256
    // by 1.02-1.06x (dV^T and dK^T 1.03-1.05x in cycles per product; causal and prefix-LM, D = 64 and 128, Zen 4)
    constexpr int PEND_TILES = WQ > 256 ? WQ : 256, PEND_DP = WQ > 512 ? WQ : 512;
    constexpr int PEND = PEND_DP > PEND_TILES ? PEND_DP : PEND_TILES;  // (the buffers' rows)
    const int pend_most = tiles ? PEND_TILES : PEND_DP;
    Buf s(32 * LD), dp(32 * LD), dk_t(D * LDT), dv_t(D * LDT), dq_tmp(WQ * D);
    Aligned<uint32_t> t32(16 * LDT, true);  // 32 columns of dK^T or dV^T as 16 bf16 pair rows
    Aligned<bf16_t> qpad(WQ * DK, true), dopad(WQ * DK, true), pp((PEND + 32) * JW, true), dsp((PEND + 32) * JW, true),
        ds((WQ + 32) * SW, true);
    Aligned<bf16_t> pp_lo(hilo ? (PEND + 32) * JW : 0, true), dsp_lo(hilo ? (PEND + 32) * JW : 0, true),
        ds_lo(hilo ? (WQ + 32) * SW : 0, true);  // (fp16: the low parts of P and dS)
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    const bool mine_only = own && team == threads;  // (a smaller team than asked for deals kv blocks out)
    float* dq_mine = mine_only ? dq_threads : dq_threads + (int64_t)me * rows_all * D;
    float* tg_mine = spec.table_grads && tgrad ? tgrad + (int64_t)me * tgrad_total : nullptr;
    const auto my_rows = [&](auto&& rows_of) {{  // the dQ rows (b, h, all of Sq) of this thread's query heads
      for (int64_t gk = 0; gk < groups; ++gk)
        if (owner[(size_t)gk] == me)
          for (int64_t g = HEADS[H + gk % Hkv]; g < HEADS[H + gk % Hkv + 1]; ++g)
            rows_of((gk / Hkv * H + HEADS[H + Hkv + 1 + g]) * Sq);
    }};
    if (mine_only)
      my_rows([&](int64_t r0) {{ std::memset(dq_mine + r0 * D, 0, sizeof(float) * Sq * D); }});
    else
      std::memset(dq_mine, 0, sizeof(float) * rows_all * D);
    if (tiles) amx_configure();
    // (split: std::bool_constant<hilo>, so that each of the bf16 and fp16 loops compiles without the other's branches)
    const auto run_task = [&](int64_t task, auto split) {{
      constexpr bool hilo = decltype(split)::value;
      const int64_t kb = task % nkv, hk = (task / nkv) % Hkv, b = task / (nkv * Hkv);
      const int64_t k0 = kb * BKV;
      const int cols = (int)min_of<int64_t>(BKV, Skv - k0), cols32 = up_nr(cols);
      const int64_t packed = ((b * Hkv + hk) * skv_pad + k0) * D;  // this block's panels and pair rows
      fill(dk_t.data(), D * LDT, 0.0f);
      fill(dv_t.data(), D * LDT, 0.0f);
      for (int64_t g = HEADS[H + hk]; g < HEADS[H + hk + 1]; ++g) {{  // the query heads reading kv head hk
        const int64_t h = HEADS[H + Hkv + 1 + g];
        const int64_t pair = (maps_b > 1 ? b : 0) * maps_h + (maps_h > 1 ? h : 0);
        const int64_t row = (int64_t)map_of[pair] * nkv + kb;
        // dV^T and dK^T over consecutive runs of this head at once (K = their rows): their P and dS pair rows
        // gather in pp and dsp from row pend_q0 on; flushed at a gap, when full, and at the head's end
        int64_t pend_q0 = 0;
        int pend = 0;
        // vdpbf16ps products: in each 32-row group g of the pending rows, the rows [reach_lo[u][g], reach_hi[u][g])
        // that keep some key of column block u (NR keys); dV^T and dK^T take only those (P and dS are zero in the
        // others: a partial tile's rows keep a part; a 2-D neighborhood's column block is reached by runs of rows)
        int reach_lo[BKV / NR][PEND / 32], reach_hi[BKV / NR][PEND / 32];
        const auto reach_none = [&]() {{
          for (int u = 0; u < BKV / NR; ++u)
            for (int g = 0; g < PEND / 32; ++g) {{ reach_lo[u][g] = PEND + 32; reach_hi[u][g] = 0; }}
        }};
        reach_none();
        const auto flush = [&]() {{
          if (!pend) return;
          const int64_t at_t = (b * H + h) * D * st + pend_q0;
          if (tiles) {{
            amx_gemm(d, cols32, pend, do_t + at_t, st, pp.data(), 2 * JW, dv_t.data(), LDT);
            amx_gemm(d, cols32, pend, q_t + at_t, st, dsp.data(), 2 * JW, dk_t.data(), LDT);
            if (hilo) {{  // + lo . hi + hi . lo
              amx_gemm(d, cols32, pend, do_t_lo + at_t, st, pp.data(), 2 * JW, dv_t.data(), LDT);
              amx_gemm(d, cols32, pend, do_t + at_t, st, pp_lo.data(), 2 * JW, dv_t.data(), LDT);
              amx_gemm(d, cols32, pend, q_t_lo + at_t, st, dsp.data(), 2 * JW, dk_t.data(), LDT);
              amx_gemm(d, cols32, pend, q_t + at_t, st, dsp_lo.data(), 2 * JW, dk_t.data(), LDT);
            }}
          }} else {{
            const int gs = pend / 32;
            gemm_bf_cols(d, cols32, do_t + at_t, st, pp.data(), 2, 2 * JW, dv_t.data(), LDT, reach_lo, reach_hi, gs);
            gemm_bf_cols(d, cols32, q_t + at_t, st, dsp.data(), 2, 2 * JW, dk_t.data(), LDT, reach_lo, reach_hi, gs);
            reach_none();
          }}
          pend = 0;
        }};
        for (int32_t t = q_ptr[row], span; t < q_ptr[row + 1]; t += span) {{
          span = run_length(q_idx, q_full, t, q_ptr[row + 1], SPAN_Q);
          const int64_t q0 = (int64_t)q_idx[t] * BQ;
          const int rows = (int)min_of<int64_t>((int64_t)BQ * span, Sq - q0);
          const int rows16 = (rows + 15) / 16 * 16, rows32 = up_nr(rows);
          const int64_t base = (b * H + h) * Sq + q0;
          if (pend && (q0 != pend_q0 + pend || pend + rows32 > pend_most)) flush();
          if (!pend) pend_q0 = q0;
          bf16_t* ppr = pp.data() + (int64_t)pend * JW;  // this run's first pair row
          bf16_t* dspr = dsp.data() + (int64_t)pend * JW;
          bf16_t* pplr = hilo ? pp_lo.data() + (int64_t)pend * JW : nullptr;
          bf16_t* dsplr = hilo ? dsp_lo.data() + (int64_t)pend * JW : nullptr;
          const bf16_t* qp = q + base * D;
          const bf16_t* dop = dout + base * D;
          if (hilo) {{  // the run's split rows [hi | hi | lo | lo], zero past rows
            for (int i = 0; i < rows16; ++i) {{
              split_row_q(i < rows ? qp + i * D : nullptr, D, qpad.data() + i * DK);
              split_row_q(i < rows ? dop + i * D : nullptr, D, dopad.data() + i * DK);
            }}
            qp = qpad.data();
            dop = dopad.data();
          }} else if (tiles && rows16 != rows) {{  // a ragged last block: tile loads read 16 rows, so pad with zeros
            std::memcpy(qpad.data(), qp, sizeof(bf16_t) * rows * D);
            std::memset(qpad.data() + rows * D, 0, sizeof(bf16_t) * (rows16 - rows) * D);
            std::memcpy(dopad.data(), dop, sizeof(bf16_t) * rows * D);
            std::memset(dopad.data() + rows * D, 0, sizeof(bf16_t) * (rows16 - rows) * D);
            qp = qpad.data();
            dop = dopad.data();
          }}
          const bool full = q_full[t] != 0;
          for (int g0 = 0; g0 < rows16; g0 += 32) {{  // 32 rows at a time, so their fp32 S and dP stay in L1
            if (!tiles) {{  // the next 32 rows' q and dO (the next group or run of this head) on their way to L2:
              // first read by S and dP's broadcasts from 12 rows at once, they came from L3 (S and dP 1.06x, Zen 4)
              const int64_t next = min_of<int64_t>(32, (b * H + h + 1) * Sq - (base + g0 + 32));
              for (int64_t x = 0; x < next * D; x += 32) {{
                _mm_prefetch((const char*)(q + (base + g0 + 32) * D + x), _MM_HINT_T1);
                _mm_prefetch((const char*)(dout + (base + g0 + 32) * D + x), _MM_HINT_T1);
              }}
            }}
            const int n16 = min_of(32, rows16 - g0), n = min_of(32, rows - g0);
            // a partial tile: only the 32-key chunks its rows keep (the others stay unset: the keep bytes mask them)
            const int16_t* rng = full ? nullptr
                : kept_ranges(tile_record(keep, keep_base, pair, q_rank[t + g0 / BQ])) + 2 * (g0 % BQ);
            const int grp = (pend + g0) / 32;  // (pend and g0 are multiples of 32)
            if (!tiles && !rng) {{  // every row of a full tile reaches every column block
              for (int u = 0; u < cols32 / NR; ++u) {{
                reach_lo[u][grp] = pend + g0;
                reach_hi[u][grp] = pend + g0 + n;
              }}
            }} else if (!tiles) {{
              for (int i = 0; i < n; ++i)
                for (int u = rng[2 * i] / NR; u < (rng[2 * i + 1] + NR - 1) / NR; ++u) {{
                  reach_lo[u][grp] = min_of(reach_lo[u][grp], pend + g0 + i);
                  reach_hi[u][grp] = max_of(reach_hi[u][grp], pend + g0 + i + 1);
                }}
            }}
            if (tiles) {{
              const int64_t at_k = packed / D * DK;  // (the split panels are 4D deep)
              amx_scores(n16, cols32, (int)DK, qp + g0 * DK, k_panels + at_k, s.data(), LD, rng, n);
              amx_scores(n16, cols32, (int)DK, dop + g0 * DK, v_panels + at_k, dp.data(), LD, rng, n);
            }} else if (rng) {{
              scores_kept_bf(n, cols32, d / 2, qp + g0 * D, d, k_panels + packed, d, 2 * NR, s.data(), LD, rng);
              scores_kept_bf(n, cols32, d / 2, dop + g0 * D, d, v_panels + packed, d, 2 * NR, dp.data(), LD, rng);
            }} else {{
              gemm_bf_xo<0>(n, cols32, d / 2, qp + g0 * D, d, k_panels + packed, d, 2 * NR, s.data(), LD);
              gemm_bf_xo<0>(n, cols32, d / 2, dop + g0 * D, d, v_panels + packed, d, 2 * NR, dp.data(), LD);
            }}
            if (!HAS_MOD) {{  // P and dS straight to their bf16 layouts, two rows at a time (a pair row)
              // word u of a pair row: 2c + e holds row e's column c ([row i | row i + 1] -> interleaved)
              const __m512i PAIRS = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                     7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
              for (int i = 0; i < 32; i += 2) {{
                __m512 sc[2], li2[2], vd[2];
                const uint8_t* kr[2];
                bool live[2];
                for (int e = 0; e < 2; ++e) {{
                  const int at = g0 + i + e;  // the row in the run
                  live[e] = i + e < n && lse[base + at] != -INF;
                  sc[e] = _mm512_set1_ps(SCALE * LOG2E);
                  li2[e] = _mm512_set1_ps(live[e] ? lse[base + at] * LOG2E : 0.0f);
                  vd[e] = _mm512_set1_ps(live[e] ? delta[base + at] : 0.0f);
                  kr[e] = full || !live[e] ? nullptr
                      : tile_record(keep, keep_base, pair, q_rank[t + at / BQ]) + (at % BQ) * BKV;
                }}
                for (int j = 0; j < cols32; j += 16) {{
                  const __mmask16 in = j + 16 <= cols ? 0xffff : j < cols ? (__mmask16)((1u << (cols - j)) - 1) : 0;
                  __m512 pv[2], gv[2];
                  for (int e = 0; e < 2; ++e) {{
                    __mmask16 on = live[e] ? in : 0;
                    if (kr[e] && on)
                      on &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(in, kr[e] + j), _mm_setzero_si128());
                    const float* sr = s.data() + (i + e) * LD + j;
                    const float* dr = dp.data() + (i + e) * LD + j;
                    const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr), sc[e], li2[e]);
                    pv[e] = on ? _mm512_maskz_mov_ps(on, hilo ? exp2_v(x) : exp2_v_bf16(x)) : _mm512_setzero_ps();
                    const __m512 dpv = _mm512_maskz_sub_ps(on, _mm512_loadu_ps(dr), vd[e]);
                    gv[e] = _mm512_mul_ps(_mm512_mul_ps(pv[e], dpv), _mm512_set1_ps(SCALE));
                  }}
                  // both rows rounded by one VCVTNE2PS2BF16 each for P and dS ([row i | row i + 1]), then the
                  // pair row by one word permutation; dS's rows (dQ's A tiles) are the two halves
                  const __m512i p2 = (__m512i)_mm512_cvtne2ps_pbh(pv[1], pv[0]);
                  const __m512i g2 = (__m512i)_mm512_cvtne2ps_pbh(gv[1], gv[0]);
                  _mm256_storeu_si256((__m256i*)(ds.data() + (g0 + i) * SW + j), _mm512_castsi512_si256(g2));
                  _mm256_storeu_si256((__m256i*)(ds.data() + (g0 + i + 1) * SW + j), _mm512_extracti64x4_epi64(g2, 1));
                  const int64_t at = (int64_t)(g0 + i) / 2 * 2 * JW + 2 * j;  // pair row (g0 + i) / 2 of the run
                  _mm512_storeu_si512(ppr + at, _mm512_permutexvar_epi16(PAIRS, p2));
                  _mm512_storeu_si512(dspr + at, _mm512_permutexvar_epi16(PAIRS, g2));
                  if (hilo) {{  // the low parts, laid out the same way
                    const auto low_pair = [](const __m512* x, __m512i h) {{
                      const __m256bh l0 = low_part(x[0], (__m256bh)_mm512_castsi512_si256(h));
                      const __m256bh l1 = low_part(x[1], (__m256bh)_mm512_extracti64x4_epi64(h, 1));
                      return _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)l0), (__m256i)l1, 1);
                    }};
                    const __m512i pl = low_pair(pv, p2), gl = low_pair(gv, g2);
                    bf16_t* lo_rows = ds_lo.data() + (g0 + i) * SW + j;
                    _mm256_storeu_si256((__m256i*)lo_rows, _mm512_castsi512_si256(gl));
                    _mm256_storeu_si256((__m256i*)(lo_rows + SW), _mm512_extracti64x4_epi64(gl, 1));
                    _mm512_storeu_si512(pplr + at, _mm512_permutexvar_epi16(PAIRS, pl));
                    _mm512_storeu_si512(dsplr + at, _mm512_permutexvar_epi16(PAIRS, gl));
                  }}
                }}
              }}
              continue;
            }}
            for (int i = 0; i < n; ++i) {{  // through the score mod's backward hook, fp32 rows as attncc_backward
              float* sr = s.data() + i * LD;
              float* dr = dp.data() + i * LD;
              const int at = g0 + i;  // the row in the run
              const float li = lse[base + at], di = delta[base + at];
              if (li == -INF) {{ fill(sr, cols, 0.0f); fill(dr, cols, 0.0f); continue; }}
              const uint8_t* kr = full ? nullptr
                  : tile_record(keep, keep_base, pair, q_rank[t + at / BQ]) + (at % BQ) * BKV;
              spec.backward_row(&cx, SCALE, sr, dr, kr, cols, li, di, b, h, q0 + at, k0, tg_mine, tgrad_off);
            }}
            to_pair_rows(s.data(), LD, n, 32, cols, cols32, ppr + g0 * JW, 2 * JW, hilo ? pplr + g0 * JW : nullptr);
            to_pair_rows(dp.data(), LD, n, 32, cols, cols32, dspr + g0 * JW, 2 * JW, hilo ? dsplr + g0 * JW : nullptr);
            to_bf16_rows(dp.data(), LD, n, n16, cols, cols32, ds.data() + g0 * SW, SW,
                         hilo ? ds_lo.data() + g0 * SW : nullptr);
          }}
          pend += rows32;
          const auto dq_products = [&](float* c) {{  // dQ += dS K (fp16: + dS_hi K_lo + dS_lo K_hi)
            amx_gemm(rows16, d, cols32, ds.data(), SW, k_pairs + packed, 2 * D, c, D);
            if (hilo) {{
              amx_gemm(rows16, d, cols32, ds.data(), SW, k_pairs_lo + packed, 2 * D, c, D);
              amx_gemm(rows16, d, cols32, ds_lo.data(), SW, k_pairs + packed, 2 * D, c, D);
            }}
          }};
          if (!tiles && full) {{
            gemm_bf_xo<1>(rows, d, cols32 / 2, ds.data(), SW, k_pairs + packed, 2, 2 * D, dq_mine + base * D, D);
          }} else if (!tiles) {{  // a partial run: each register block of rows over its rows' kept keys
            for (int g0 = 0; g0 < rows; g0 += 32) {{
              const int16_t* rng = kept_ranges(tile_record(keep, keep_base, pair, q_rank[t + g0 / BQ])) + 2 * (g0 % BQ);
              products_kept_bf<1>(min_of(32, rows - g0), d, ds.data() + g0 * SW, SW, BKV, k_pairs + packed,
                                  dq_mine + (base + g0) * D, D, nullptr, &rng, 1);
            }}
          }} else if (rows16 == rows) {{
            dq_products(dq_mine + base * D);
          }} else {{  // tile stores write 16 rows: accumulate into a scratch block, then add the real rows
            fill(dq_tmp.data(), (int64_t)rows16 * D, 0.0f);
            dq_products(dq_tmp.data());
            float* out = dq_mine + base * D;
            for (int64_t x = 0; x < (int64_t)rows * D; ++x) out[x] += dq_tmp[x];
          }}
        }}
        flush();
      }}
      const int64_t kv_rows = ((b * Hkv + hk) * Skv + k0) * D;
      if (hilo) {{  // fp32 dK, dV: 16 x 16 transposes of dK^T, dV^T
        for (const auto& [from, to] : {{std::pair(dk_t.data(), dk32 + kv_rows),
                                       std::pair(dv_t.data(), dv32 + kv_rows)}})
          for (int c0 = 0; c0 < d; c0 += 16)
            for (int j = 0; j < cols; j += 16)
              transpose16_u32((const uint32_t*)from + (int64_t)c0 * LDT + j, LDT, 16,
                              (uint32_t*)to + (int64_t)j * D + c0, D, min_of(16, cols - j));
        return;
      }}
      for (const auto& [from, to] : {{std::pair(dk_t.data(), dk + kv_rows), std::pair(dv_t.data(), dv + kv_rows)}})
        for (int c0 = 0; c0 < d; c0 += 32) {{  // dK^T, dV^T rounded to bf16 as pair rows of columns, then transposed
          for (int r = 0; r < 16; ++r)
            for (int j = 0; j < cols32; j += 16) {{
              const float* x = from + (int64_t)(c0 + 2 * r) * LDT + j;
              const __m512i two = interleave_bf16(_mm512_cvtneps_pbh(_mm512_loadu_ps(x)),
                                                  _mm512_cvtneps_pbh(_mm512_loadu_ps(x + LDT)));
              _mm512_storeu_si512(t32.data() + r * LDT + j, two);
            }}
          for (int j = 0; j < cols; j += 16) {{  // into key rows j.. (whole pairs of columns: D and c0 are even)
            uint32_t* rows = (uint32_t*)(to + (int64_t)j * D + c0);
            transpose16_u32(t32.data() + j, LDT, 16, rows, D / 2, min_of(16, cols - j));
          }}
        }}
    }};
    const auto run = [&](int64_t task) {{
      if (hilo) run_task(task, std::true_type{{}});
      else run_task(task, std::false_type{{}});
    }};
    if (mine_only) {{
      for (int64_t gk = 0; gk < groups; ++gk)
        if (owner[(size_t)gk] == me)
          for (int64_t kb = 0; kb < nkv; ++kb) run(gk * nkv + kb);
    }} else {{
      #pragma omp for schedule(runtime)
      for (int64_t task = 0; task < B * Hkv * nkv; ++task) run(task);
    }}
    if (tiles) amx_release();
    if (mine_only) {{  // this thread's rows of the shared dQ, rounded to bf16
      my_rows([&](int64_t r0) {{
        for (int64_t r = r0; r < r0 + Sq; ++r)
          if (hilo) sum_partials(dq32 + r * D, dq_threads, r, rows_all, D, 1);
          else sum_partials(dq + r * D, dq_threads, r, rows_all, D, 1);
      }});
    }} else {{  // dQ = the sum of the team's partials (after the loop's barrier)
      #pragma omp for schedule(static)
      for (int64_t r = 0; r < rows_all; ++r)
        if (hilo) sum_partials(dq32 + r * D, dq_threads, r, rows_all, D, team);
        else sum_partials(dq + r * D, dq_threads, r, rows_all, D, team);
    }}
  }}
  omp_set_schedule(saved_kind, saved_chunk);
  return error;
#else
  (void)q; (void)k; (void)v; (void)o; (void)dout; (void)lse; (void)dlse; (void)dq; (void)dk; (void)dv; (void)B;
  (void)H; (void)Hkv; (void)Sq; (void)Skv; (void)D; (void)map_of; (void)maps_b; (void)maps_h; (void)q_ptr;
  (void)q_idx; (void)q_full; (void)q_rank; (void)keep_base; (void)keep; (void)tensors; (void)dims; (void)threads;
  (void)HEADS; (void)SCALE; (void)work; (void)pack; (void)deterministic; (void)tgrad; (void)tgrad_off;
  (void)tgrad_total; (void)hooks; (void)fp16; (void)o32; (void)dq32; (void)dk32; (void)dv32;
  return -1;
#endif
}}
"""
)
