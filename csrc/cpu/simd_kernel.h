// The vectorised chunk kernel, written once with GCC vector extensions and
// compiled once per ISA. Not a normal header: kernel_avx2.cpp and
// kernel_avx512.cpp include it inside `namespace torchhealth::cpu::<isa>`,
// under `#pragma GCC target`, after every other include (so no inline function
// of ATen, c10 or stats.h is ever emitted with AVX2/AVX-512 code, which would
// break the one-definition rule on older CPUs). The includer defines kLanes
// before and the ISA primitives declared below after including it.
//
// Semantics are exactly those of update() in stats.h, which this file calls for
// chunk tails and for values the vector paths leave out. How:
//
//  * A chunk is cut into blocks of kBlock = 240 * kLanes float32 values.
//    float32 and bfloat16 (bits << 16, exact) are read in place; float16 and
//    float8 are widened exactly into an L1-resident buffer first, and so is
//    bfloat16 by pass 1 when the histogram follows (pass 2 reads float32
//    from L1 more cheaply than it widens bfloat16 again).
//  * Pass 1 (fast) reads a block and computes, per lane, min, max, the
//    smallest nonzero |x| (anz) and the sums in double; float16 also counts
//    |x| below small_bits (its subnormals), and the zero count is kept except
//    for float32/bfloat16 with the histogram, where pass 2 gives it (a clean
//    block's zeros are its values pass 2 does not bin). The block is then
//    checked: NaN and Inf make the sums non-finite; for float32 and bfloat16
//    no nonzero |x| may be below 2^-63 (anz). A block that fails (rare: it
//    holds a NaN, Inf, float32/bfloat16-subnormal or tiny value, or a value
//    whose square overflows float32) is read again by the careful variant,
//    which counts every class with masks. A block that passes but whose
//    max(-min, max) reaches the saturation threshold (a threshold below the
//    dtype's range, as watch sets for sigmoid outputs) has only its saturated
//    values counted, from L1, by count_saturated().
//  * Pass 2 (histogram) re-reads the block from L1. Magnitudes in a block span
//    few binary exponents, so a window of 16 exponents per sign, topped at the
//    block's largest exponent E, holds nearly every value: the value's window
//    slot k (0..15 positive, 16..31 negative) becomes a one-hot bit in a 32-bit
//    lane, and the 32 bit positions are counted by a positional popcount
//    (Harley-Seal carry-save adders into 8 bit-planes; Klarqvist, Mula and
//    Lemire 2019). A lane counts at most kBlock/kLanes = 240 values, which 8
//    planes (up to 255) hold exactly. Values below the window (and
//    subnormals, which are binned by mantissa) are rare and go one by one
//    through hist_bin().
//
// Cost (benchmarks/RESULTS.md): pass 1 is ~8 vector ops per register of
// float32 values with the histogram (AVX-512: load, abs, anz 2, min, max, a
// float32 add and an FMA for the sums, see add_sums, plus 4 conversions and 4
// double adds per kFlush registers; without the histogram the zero and small
// counts take 4 instead of anz's 2); pass 2 another ~8 (AVX-512) to
// ~11 (AVX2, whose carry-save adders take 5 ops instead of one vpternlogd
// pair), plus a transpose and reduction per block. On CPUs that split 512-bit
// ops in two, both ISAs then run at about the same speed.

// The includer defines kUnsignedMin, whether the ISA has a vector unsigned
// min (SSE4.1 and later; not SSE2), kHalfInHardware, whether half_to_float is
// one instruction (F16C, fcvtl) rather than integer arithmetic, and kLanes, the
// float32 lanes of its registers (8 for AVX2, 16 for AVX-512; 4 for the
// generic kernel), so that every GCC vector is one
// machine register: wider vectors than the ISA has are lowered lane by lane
// through the stack.
// Registers per block: <= 255, so that a lane's count fits the 8 bit-planes of
// pass 2; a multiple of 16 (pass 2's unrolled loop). 240 rather than 128 nearly halves
// the per-block work (reductions, transpose, merge); 15 KB at AVX-512.
constexpr int kBlockRegs = 240;
constexpr int kBlock = kBlockRegs * kLanes;

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef double vd __attribute__((vector_size(4 * kLanes)));  // kLanes / 2 doubles
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));

// ---- ISA primitives, defined by the includer -------------------------------
// 1 << k per lane, 0 when k >= 32 (vpsllvd; C++ shifts leave that undefined).
inline vu one_bit(vu k);
// float16 bits to float32, exactly (vcvtph2ps).
inline vf half_to_float(vh h);
// kLanes bfloat16 values at p as float32 (their bits shifted up by 16), in
// one or two instructions: GCC widens the portable form (a vector of uint16
// converted to uint32, then shifted) half a register at a time, two to three
// more per register (benchmarks/RESULTS.md).
inline vf bf16_to_float(const uint16_t* p);
// Whether any lane is nonzero.
inline bool any_lane(vu m);
// The low and high halves of a vector, converted exactly to double.
inline vd lo_double(vf x);
inline vd hi_double(vf x);
// The smaller and the larger of a and b per lane, for the fast pass, which
// may take either operand where one is NaN (it reads every block holding a
// NaN again) or where both are zeros (a zero min or max is reported as +0):
// minps/maxps on x86, fmin/fmax on aarch64, where the compare and select of
// `a < b ? a : b` take two or three instructions.
inline vf fast_min(vf a, vf b);
inline vf fast_max(vf a, vf b);
// a * b + c per lane, rounded once where the ISA has FMA (see add_sums for the
// error bound, which holds either way).
inline vf fmadd(vf a, vf b, vf c);
// The sum of the lanes (callers keep it below 2^32).
inline uint32_t reduce_add(vu v);
// Bitwise majority and parity of three vectors: one vpternlogd each on AVX-512.
inline vu maj3(vu a, vu b, vu c);
inline vu xor3(vu a, vu b, vu c);
// acc + 1 in the lanes where a == 0 (AVX-512: one masked add on a vptestnmd
// mask, instead of materialising the mask as a vector and subtracting it).
inline vu count_zero(vu acc, vu a);
// acc + 1 in the lanes where (int32) a < (int32) lim.
inline vu count_lt(vu acc, vi a, vi lim);

// ---- Helpers ----------------------------------------------------------------
inline vu splat(uint32_t x) { return vu{} + x; }
inline vi splat_i(int32_t x) { return vi{} + x; }

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float float_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t hmax_u31(vu v) {  // lanes below 2^31
  uint32_t m = 0;
  for (int l = 0; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

inline uint32_t hmin_u(vu v) {
  uint32_t m = ~0u;
  for (int l = 0; l < kLanes; ++l) m = v[l] < m ? v[l] : m;
  return m;
}

inline int64_t hsum_u(vu v) { return reduce_add(v); }  // block counts: <= kBlock

// Lane-parallel partial results of one block.
struct Block {
  vu amax, anz, zero, small, nan, pinf, ninf, sub, sat;
  vf vmin, vmax;
  vd s0, s1, q0, q1;

  void init() {
    amax = zero = small = nan = pinf = ninf = sub = sat = vu{};
    anz = splat(~0u);
    vmin = vf{} + std::numeric_limits<float>::infinity();
    vmax = vf{} - std::numeric_limits<float>::infinity();
    s0 = s1 = q0 = q1 = vd{};
  }
};

struct Consts {
  uint32_t sat_bits;   // |x| bits >= sat_bits: saturated (finite values only)
  uint32_t mn_bits;    // bits of the dtype's smallest normal, as float32
  // The fast pass counts |x| bits < small_bits. For float16 that is the
  // smallest normal, so small - zero is the subnormal count (float16
  // subnormals are common). For bfloat16 and float32 it is 2^-63: a block with
  // a smaller nonzero value (subnormals included) goes to the careful pass.
  uint32_t small_bits;
  bool small_is_subnormal;
  bool prefetch;  // pass 1 reads the input itself (see kPrefetchBytes), not the block buffer
};

// Pass 1 asks for the input kPrefetchBytes ahead of what it reads: the hardware
// prefetcher alone keeps too few lines in flight for a loop this long per cache
// line, and a tensor in DRAM was read well below the memory floor without it
// (benchmarks/RESULTS.md; 1 to 4 KB ahead measured about alike). Prefetches do
// not fault, so asking past the end of a tensor is harmless (the address is made
// as an integer: a pointer past the end would be undefined).
constexpr int kPrefetchBytes = 2048;

// The sums. The fast pass adds each lane's values in float32 over kFlush
// registers, then flushes the two float32 partials exactly into the lane's
// float64 accumulators; the careful pass adds every value in float64.
//
// Why the documented bound |sum - exact| <= SUM_RTOL * sum|x| (1e-6,
// torchhealth/stats.py) still holds, for sum and sumsq alike: a float32 partial
// of k = kFlush = 8 values starts from 0, so it is reached by at most k
// roundings (the first add is exact; each square is rounded once by the FMA,
// or twice without FMA: then each term carries one rounding for the product
// and one for the add, which is the same count as a dot product of length k),
// each of relative error u = 2^-24 on a partial whose magnitude is at most the
// sum of the |terms| so far. So |partial - exact| <= gamma_k * sum|terms| with
// gamma_k = k*u / (1 - k*u) < 4.8e-7 for k = 8 (k <= 16 would still give
// 9.5e-7). The float64 part adds one rounding of 2^-53 per flush and per
// chunk merge (chunks of 2^16 values are merged in order): below 1e-8
// relative for any tensor under 2^40 values. Two conditions keep the float32 partials
// meaningful, and the fast pass checks both for every block: no nonzero |x|
// below 2^-63 (anz, for float32 and bfloat16; float16 and float8 values are
// at least 2^-24), so every square is at least 2^-126 and normal and every
// partial of x is a multiple of 2^-86, never subnormal, whatever the FTZ/DAZ
// state; and no float overflow (a square or partial above FLT_MAX becomes
// Inf, the block's sums turn non-finite and the careful pass, all in float64,
// recomputes it). Sums of the same data split differently into tensors or
// chunks may then differ by ~1e-8 relative, inside the bound.
constexpr int kFlush = 8;
template <typename L>
constexpr int kFlushBytes = kFlush * kLanes * static_cast<int>(sizeof(typename L::type));

inline void add_sums(vd dl, vd dh, Block& b) {
  b.s0 += dl;
  b.s1 += dh;
  b.q0 += dl * dl;
  b.q1 += dh * dh;
}
inline void accumulate_sums(vf x, Block& b) { add_sums(lo_double(x), hi_double(x), b); }
// Flushes float32 partials s (sum) and q (sum of squares) exactly.
inline void flush_sums(vf s, vf q, Block& b) {
  b.s0 += lo_double(s);
  b.s1 += hi_double(s);
  b.q0 += lo_double(q);
  b.q1 += hi_double(q);
}

// How each input dtype reaches float32. load_v() gives a register of kLanes
// values as float32; kDirect dtypes are read that way by pass 1 and pass 2
// (bfloat16: bits << 16 is exact and costs one or two ops, bf16_to_float, less
// than writing and re-reading a widened copy); the others are widened into the
// block buffer by to_buf() first. to_buf() also makes the private float32 copy
// that the careful pass and its pass 2 read.
struct FromFloat {
  using type = float;
  static constexpr bool kDirect = true;
  static vf load_v(const float* p) { return load(p); }
  static void to_buf(const float* p, int n, float* buf) { std::memcpy(buf, p, sizeof(float) * n); }
  static float scalar(float x) { return x; }
};
struct FromBFloat16 {
  using type = uint16_t;
  static constexpr bool kDirect = true;
  static vf load_v(const uint16_t* p) { return bf16_to_float(p); }
  static void to_buf(const uint16_t* p, int n, float* buf) {
    for (int i = 0; i < n; i += kLanes) {
      const vf w = load_v(p + i);
      std::memcpy(buf + i, &w, sizeof w);
    }
  }
  static float scalar(uint16_t x) { return float_from_bits(static_cast<uint32_t>(x) << 16); }
};
struct FromHalf {
  using type = uint16_t;
  static constexpr bool kDirect = false;
  static void to_buf(const uint16_t* p, int n, float* buf) {
    for (int i = 0; i < n; i += kLanes) {
      vh h;
      std::memcpy(&h, p + i, sizeof h);
      const vf w = half_to_float(h);
      std::memcpy(buf + i, &w, sizeof w);
    }
  }
  static float scalar(uint16_t x) { return static_cast<float>(c10::Half(x, c10::Half::from_bits())); }
};

// float8 to float32 exactly, then the float16 path (float8 subnormals are
// counted by the fast pass, as float16's are). With a hardware half_to_float,
// through float16, by bits: an e5m2 byte is the high byte of the float16 of
// the same value. An e4m3fn byte moved into float16's fields (exponent bias 15
// instead of 7) is its value times 2^-8, subnormals included, so the float32
// is multiplied by 2^8: exact, and never with a subnormal operand or result,
// so flush-to-zero cannot change it. Its NaN (S.1111.111; e4m3fn has no Inf)
// is made a float16 NaN first. Without one (the generic kernel except on
// aarch64), where that integer arithmetic took twice the time of a lookup
// (benchmarks/RESULTS.md), and for scalar() (chunk tails): the tables of the
// 256 values (float8_tables.cpp).
template <bool kE4M3>
struct FromFloat8 {
  using type = uint8_t;
  static constexpr bool kDirect = false;
  static const float* table() { return kE4M3 ? float8_e4m3fn_table() : float8_e5m2_table(); }
  static void to_buf(const uint8_t* p, int n, float* buf) {
    if constexpr (!kHalfInHardware) {
      const float* t = table();
      for (int i = 0; i < n; ++i) buf[i] = t[p[i]];
    } else {
      typedef uint8_t vb __attribute__((vector_size(kLanes)));
      for (int i = 0; i < n; i += kLanes) {
        vb b;
        std::memcpy(&b, p + i, sizeof b);
        vh h = __builtin_convertvector(b, vh);
        vf w;
        if constexpr (kE4M3) {
          const vh em = h & 0x7f;
          h = em == 0x7f ? vh{} + 0x7e00 : (h & 0x80) << 8 | em << 7;
          w = half_to_float(h) * 256.0f;
        } else {
          w = half_to_float(h << 8);
        }
        std::memcpy(buf + i, &w, sizeof w);
      }
    }
  }
  static float scalar(uint8_t x) { return table()[x]; }
};

// Pass 1 over nv > 0 vectors. kCareful=false is the fast pass: it assumes
// every value is finite, below the saturation threshold and not tiny (see
// Consts), and the caller checks that afterwards from the sums (NaN and Inf
// make them non-finite), amax and anz or small; kCareful=true makes no
// assumption. anz (the smallest nonzero |x| bits, minus 1) serves the
// histogram and then the tiny-value check of float32 and bfloat16 (anz >=
// small_bits - 1: no nonzero |x| below small_bits), since pass 2 needs it and
// the zero count is left out. kSmall (count |x| bits < small_bits) gives
// float16's subnormal count and, without the histogram, the tiny-value check
// of float32 and bfloat16 (small == zero): a signed compare, where anz needs
// an unsigned min that SSE2 (the generic kernel) lacks.
// kZero=false leaves the zero count out: with the histogram, the caller
// derives it from pass 2 (a clean block's values are all finite, so its zeros
// are the values pass 2 does not bin).
template <bool kCareful, bool kAnz, bool kSmall = true, bool kZero = true, typename L = FromFloat,
          bool kCopy = false>
inline void pass1(const typename L::type* p, int nv, const Consts& c, Block& out, float* copy = nullptr) {
  // A local copy: float loads from p could alias out's float vectors, which
  // would then be stored to memory on every iteration.
  Block b = out;
  const vu absmask = splat(0x7fffffffu);
  const vu inf = splat(0x7f800000u);
  if (!kCareful) {
    const vi small = splat_i(static_cast<int32_t>(c.small_bits));
    // A pointer-sized index: an int one was sign-extended for every register's address.
    auto step = [&](std::ptrdiff_t v, vf& ps, vf& pq) {
      const vf x = L::load_v(p + v * kLanes);
      if (kCopy) std::memcpy(copy + v * kLanes, &x, sizeof x);
      const vu a = (vu)x & absmask;
      if (kZero) b.zero = count_zero(b.zero, a);
      if (kSmall) b.small = count_lt(b.small, (vi)a, small);
      if (kAnz) {
        const vu a1 = a - 1;  // zero wraps to the largest value: min ignores zeros
        b.anz = a1 < b.anz ? a1 : b.anz;
      }
      b.vmin = fast_min(x, b.vmin);
      b.vmax = fast_max(x, b.vmax);
      ps += x;
      pq = fmadd(x, x, pq);
    };
    std::ptrdiff_t v = 0;
    for (; v + kFlush <= nv; v += kFlush) {
      if (c.prefetch) {
        // An address, not a pointer into the tensor: it may lie past its end.
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(p + v * kLanes) + kPrefetchBytes;
        for (int o = 0; o < kFlushBytes<L>; o += 64) {
          __builtin_prefetch(reinterpret_cast<const void*>(ahead + o));
        }
      }
      vf ps{}, pq{};
      for (int j = 0; j < kFlush; ++j) step(v + j, ps, pq);
      flush_sums(ps, pq, b);
    }
    if (v < nv) {
      vf ps{}, pq{};
      for (; v < nv; ++v) step(v, ps, pq);
      flush_sums(ps, pq, b);
    }
    // Every lane saw a value and, if the block is clean, all were finite.
    const vf neg_min = -b.vmin;
    b.amax = (vu)(b.vmax > neg_min ? b.vmax : neg_min) & absmask;
    if (kSmall && c.small_is_subnormal) b.sub = b.small - b.zero;
    out = b;
    return;
  }
  for (int v = 0; v < nv; ++v) {
    const vf x = L::load_v(p + v * kLanes);
    const vu bits = (vu)x;
    const vu a = bits & absmask;
    const vu a1 = a - 1;  // zero wraps to the largest value: min ignores zeros
    b.zero -= (vu)(a == 0);
    {
      const vi fin = (vi)a < (vi)inf;
      const vi isinf = a == inf;
      const vi neg = (vi)bits < 0;
      b.nan -= (vu)((vi)a > (vi)inf);
      b.pinf -= (vu)(isinf & ~neg);
      b.ninf -= (vu)(isinf & neg);
      b.sat -= (vu)(fin & ((vi)a >= splat_i(static_cast<int32_t>(c.sat_bits))));
      b.sub -= (vu)(a1 < splat(c.mn_bits - 1));
      const vu af = (vu)fin & a;
      b.amax = (vi)af > (vi)b.amax ? af : b.amax;
      const vu a1f = a1 | ~(vu)fin;
      b.anz = a1f < b.anz ? a1f : b.anz;
      b.vmin = (fin & (x < b.vmin)) ? x : b.vmin;
      b.vmax = (fin & (x > b.vmax)) ? x : b.vmax;
      accumulate_sums((vf)((vu)fin & bits), b);  // non-finite values add +0
    }
  }
  out = b;
}

// One value's window slot as a one-hot bit. In the unmasked variant
// (kMasked = 0) the caller guarantees that every nonzero value of the block
// lies in the window and that 16 < base <= 224, so zeros of either sign shift
// out. The masked variants clear out-of-window lanes and bin the finite
// nonzero ones one by one: kMasked = 1 for a clean block (every value finite,
// 16 < base <= 224: only nonzero values below the window need masking, and
// the block's largest value sets the window's top, so none is above it),
// kMasked = 2 for any block.
template <int kMasked, typename L>
inline vu one_hot(const typename L::type* p, uint32_t base, HistOut* h, int& nout) {
  const vu bits = (vu)L::load_v(p);
  // sign|exponent minus base: j for a positive value in the window, 256 + j
  // for a negative one, whose slot 16 + j is then the smaller (unsigned) of k0
  // and k0 - 240, or k0 - 240 taken by the sign bit where the ISA has no
  // unsigned min (SSE2; the two agree on every lane the variants keep).
  // Positive values below the window wrap to huge shifts; -0 gives
  // min(256 - base, wrapped 16 - base) >= 32 when 16 < base <= 224.
  const vu k0 = (bits >> 23) - base;
  vu k;
  if constexpr (kUnsignedMin) {
    const vu k1 = k0 - 240u;
    k = k0 < k1 ? k0 : k1;
  } else {
    k = k0 - ((vu)((vi)bits >> 31) & 240u);
  }
  vu oh = one_bit(k);
  if (kMasked == 1) {
    // a - 1 < base_bits - 1 (unsigned): nonzero and below the window.
    const vu a1 = (bits & 0x7fffffffu) - 1u;
    const vu out = (vu)(a1 < splat((base << 23) - 1u));
    oh &= ~out;
    if (__builtin_expect(any_lane(out), 0)) {
      for (int l = 0; l < kLanes; ++l) {
        if (out[l]) {
          h->add(hist_bin(float_from_bits(bits[l])), 1);
          ++nout;
        }
      }
    }
  }
  if (kMasked == 2) {
    const vi a = (vi)(bits & 0x7fffffffu);
    const vi base_bits = splat_i(static_cast<int32_t>(base << 23));
    oh &= (vu)((a >= base_bits) & (a < splat_i(0x7f800000)));
    const vu out = (vu)((a != 0) & (a < base_bits));
    if (__builtin_expect(any_lane(out), 0)) {
      for (int l = 0; l < kLanes; ++l) {
        if (out[l]) {
          h->add(hist_bin(float_from_bits(bits[l])), 1);
          ++nout;
        }
      }
    }
  }
  return oh;
}

// Carry-save adder: h:l = a + b + c, bitwise. A function, not a macro: the
// one_hot() arguments have side effects (out-of-window values are binned one
// by one) and must be evaluated exactly once.
inline void csa(vu& h, vu& l, vu a, vu b, vu c) {
  h = maj3(a, b, c);
  l = xor3(a, b, c);
}

// Pass 2 over nv <= kBlockRegs vectors: the histogram of the window [base, base+16)
// of biased float32 exponents, both signs. Returns how many values it binned
// (every finite nonzero value of the block).
// ``ahead``: the next block of the input, or nullptr. Pass 2 reads its block
// from L1 and computes; meanwhile it asks for the next block (one 16-register
// step's share per iteration, into L2 so that two blocks never crowd L1), which
// pass 1 would otherwise wait for (benchmarks/RESULTS.md).
template <int kMasked, typename L>
inline int64_t pass2(const typename L::type* p, int nv, uint32_t base, HistOut* h, const char* ahead,
                     int ahead_step) {
  int nout = 0;  // out-of-window values binned one by one (masked variant)
  int64_t binned = 0;
  // plane[i] holds bit i of each (lane, position) count.
  vu ones{}, twos{}, fours{}, eights{}, p16{}, p32{}, p64{}, p128{};
  int v = 0;
  for (; v + 16 <= nv; v += 16) {
    const typename L::type* q = p + v * kLanes;
    if (ahead != nullptr) {
      const char* a = ahead + (v / 16) * ahead_step;
      for (int o = 0; o < ahead_step; o += 64) __builtin_prefetch(a + o, 0, 2);
    }
    vu twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
#define TORCHHEALTH_D(i) one_hot<kMasked, L>(q + (i) * kLanes, base, h, nout)
    csa(twosA, ones, ones, TORCHHEALTH_D(0), TORCHHEALTH_D(1));
    csa(twosB, ones, ones, TORCHHEALTH_D(2), TORCHHEALTH_D(3));
    csa(foursA, twos, twos, twosA, twosB);
    csa(twosA, ones, ones, TORCHHEALTH_D(4), TORCHHEALTH_D(5));
    csa(twosB, ones, ones, TORCHHEALTH_D(6), TORCHHEALTH_D(7));
    csa(foursB, twos, twos, twosA, twosB);
    csa(eightsA, fours, fours, foursA, foursB);
    csa(twosA, ones, ones, TORCHHEALTH_D(8), TORCHHEALTH_D(9));
    csa(twosB, ones, ones, TORCHHEALTH_D(10), TORCHHEALTH_D(11));
    csa(foursA, twos, twos, twosA, twosB);
    csa(twosA, ones, ones, TORCHHEALTH_D(12), TORCHHEALTH_D(13));
    csa(twosB, ones, ones, TORCHHEALTH_D(14), TORCHHEALTH_D(15));
    csa(foursB, twos, twos, twosA, twosB);
    csa(eightsB, fours, fours, foursA, foursB);
    csa(sixteens, eights, eights, eightsA, eightsB);
#undef TORCHHEALTH_D
    // Add sixteens into the upper planes (a ripple of half adders).
    vu c = sixteens, t;
    t = p16 & c; p16 ^= c; c = t;
    t = p32 & c; p32 ^= c; c = t;
    t = p64 & c; p64 ^= c; c = t;
    p128 ^= c;  // no carry out: a count never exceeds kBlockRegs <= 255
  }
  for (; v < nv; ++v) {
    vu c = one_hot<kMasked, L>(p + v * kLanes, base, h, nout), t;
    t = ones & c; ones ^= c; c = t;
    t = twos & c; twos ^= c; c = t;
    t = fours & c; fours ^= c; c = t;
    t = eights & c; eights ^= c; c = t;
    t = p16 & c; p16 ^= c; c = t;
    t = p32 & c; p32 ^= c; c = t;
    t = p64 & c; p64 ^= c; c = t;
    p128 ^= c;
  }
  // Transpose: bytes[i] byte b of lane l = count of position 8b+i in lane l
  // (at most kBlockRegs <= 255, so a byte holds it). Per byte, planes[pl] bit i is the 8x8
  // bit matrix M[pl][i]; three butterfly stages swap its off-diagonal halves,
  // quarters and bits, so that afterwards planes[i] bit pl = M[pl][i].
  vu bytes[8] = {ones, twos, fours, eights, p16, p32, p64, p128};
  for (int d = 4; d >= 1; d /= 2) {
    const vu mask = splat(d == 4 ? 0x0f0f0f0fu : d == 2 ? 0x33333333u : 0x55555555u);
    for (int r = 0; r < 8; ++r) {
      if (r & d) continue;
      const vu t = ((bytes[r] >> d) ^ bytes[r + d]) & mask;
      bytes[r + d] ^= t;
      bytes[r] ^= t << d;
    }
  }
  // Normal float32 bins: slot = biased exponent + 23 (see hist_bin). Window
  // slot j < 16 is the positive bin pos[j], slot 16 + j the negative neg[j].
  // Added without a branch per slot (zero counts add nothing); the touched
  // range is widened once per sign.
  int64_t* const pos = h->counts + kBinsPerSign + static_cast<int>(base) + 23;
  int64_t* const neg = h->counts + static_cast<int>(base) + 23;
  const vu even = splat(0x00ff00ffu);
  int64_t npos = 0, nneg = 0;
  for (int i = 0; i < 8; ++i) {
    // 16-bit fields: sums over kLanes <= 16 lanes stay <= 16 * kBlockRegs.
    const int64_t lo = reduce_add(bytes[i] & even);         // bytes 0 and 2
    const int64_t hi = reduce_add((bytes[i] >> 8) & even);  // bytes 1 and 3
    // Byte b of slot-row i counts window slot 8 * b + i.
    pos[i] += lo & 0xffff;
    pos[8 + i] += hi & 0xffff;
    neg[i] += lo >> 16;
    neg[8 + i] += hi >> 16;
    npos += (lo & 0xffff) + (hi & 0xffff);
    nneg += (lo >> 16) + (hi >> 16);
  }
  if (npos != 0) {
    const int b0 = static_cast<int>(pos - h->counts);
    h->lo = b0 < h->lo ? b0 : h->lo;
    h->hi = b0 + 16 > h->hi ? b0 + 16 : h->hi;
  }
  if (nneg != 0) {
    const int b0 = static_cast<int>(neg - h->counts);
    h->lo = b0 < h->lo ? b0 : h->lo;
    h->hi = b0 + 16 > h->hi ? b0 + 16 : h->hi;
  }
  binned += npos + nneg;
  return binned + nout;
}

// Whether the fast pass met no NaN or Inf (they make its sums non-finite; so
// do, harmlessly, float overflows of finite values, which then take the careful
// pass). Lane sums stay far from double overflow.
inline bool sums_are_finite(const Block& b) {
  double t = 0;
  for (int l = 0; l < kLanes / 2; ++l) t += (b.s0[l] + b.s1[l]) + (b.q0[l] + b.q1[l]);
  return t - t == 0;
}

// Chunk-level accumulators; blocks are merged in order.
struct ChunkAcc {
  int64_t zero = 0, nan = 0, pinf = 0, ninf = 0, sub = 0, sat = 0;
  vu amax{};
  vf vmin = vf{} + std::numeric_limits<float>::infinity();
  vf vmax = vf{} - std::numeric_limits<float>::infinity();
  vd s0{}, s1{}, q0{}, q1{};

  void merge(const Block& b, bool careful) {
    zero += hsum_u(b.zero);
    sub += hsum_u(b.sub);
    sat += hsum_u(b.sat);
    if (careful) {
      nan += hsum_u(b.nan);
      pinf += hsum_u(b.pinf);
      ninf += hsum_u(b.ninf);
    }
    amax = (vi)b.amax > (vi)amax ? b.amax : amax;
    vmin = b.vmin < vmin ? b.vmin : vmin;
    vmax = b.vmax > vmax ? b.vmax : vmax;
    s0 += b.s0;
    s1 += b.s1;
    q0 += b.q0;
    q1 += b.q1;
  }

  Acc finish() const {
    Acc a = Acc::identity();
    a.nan = nan;
    a.posinf = pinf;
    a.neginf = ninf;
    a.zero = zero;
    a.subnormal = sub;
    a.saturated = sat;
    float mn = std::numeric_limits<float>::infinity();
    float mx = -mn;
    for (int l = 0; l < kLanes; ++l) {
      mn = vmin[l] < mn ? vmin[l] : mn;
      mx = vmax[l] > mx ? vmax[l] : mx;
    }
    a.min = mn == 0 ? 0.0 : static_cast<double>(mn);  // -0 -> +0
    a.max = mx == 0 ? 0.0 : static_cast<double>(mx);
    a.absmax = static_cast<double>(float_from_bits(hmax_u31(amax)));
    double s = 0, q = 0;
    for (int l = 0; l < kLanes / 2; ++l) {
      s += s0[l] + s1[l];
      q += q0[l] + q1[l];
    }
    a.sum = s;
    a.sumsq = q;
    return a;
  }
};

// Pass 1 (fast) over a block in the variant its dtype and the histogram need;
// with copy (bfloat16 with the histogram), it also stores the widened values
// there for pass 2, which then reads float32 again.
template <typename L>
inline void fast_pass1(const typename L::type* f, int nv, const Consts& c, bool hist, Block& b,
                       float* copy) {
  // float32, bfloat16: anz also checks for tiny values; with the histogram
  // the zeros of a clean block are counted from pass 2.
  if (hist && !c.small_is_subnormal) {
    if constexpr (!std::is_same_v<L, FromFloat>) {
      if (copy != nullptr) return pass1<false, true, false, false, L, true>(f, nv, c, b, copy);
    }
    pass1<false, true, false, false, L>(f, nv, c, b);
  } else if (!c.small_is_subnormal) {
    // No histogram: counting |x| below 2^-63 (a signed compare) checks for
    // tiny values; anz would need an unsigned min, which SSE2 lacks.
    pass1<false, false, true, true, L>(f, nv, c, b);
  } else if (hist) {
    pass1<false, true, true, true, L>(f, nv, c, b);
  } else {
    pass1<false, false, true, true, L>(f, nv, c, b);
  }
}

// Per lane, how many of the nv registers at p hold a value with |x| bits >=
// sat_bits, for a clean block (all finite): one compare and one add a register.
template <typename L>
inline vu count_saturated(const typename L::type* p, int nv, uint32_t sat_bits) {
  const vu absmask = splat(0x7fffffffu);
  const vi lim = splat_i(static_cast<int32_t>(sat_bits));
  vu below{};
  for (int v = 0; v < nv; ++v) below = count_lt(below, (vi)((vu)L::load_v(p + v * kLanes) & absmask), lim);
  return splat(static_cast<uint32_t>(nv)) - below;
}

// Pass 2 over a block whose largest finite |x| bits are amax != 0 and smallest
// nonzero ones anz + 1. Returns how many values it binned.
template <typename L>
inline int64_t hist_pass2(const typename L::type* f, int nv, uint32_t amax, uint32_t anz, bool clean,
                          HistOut* h, const char* ahead, int ahead_step) {
  const uint32_t top = amax >> 23;  // largest biased exponent of a finite value
  const uint32_t base = top > 16 ? top - 15 : 1;  // never exponent 0 (subnormals)
  if (clean && base > 16 && base <= 224) {
    if (anz + 1 >= (base << 23)) return pass2<0, L>(f, nv, base, h, ahead, ahead_step);
    return pass2<1, L>(f, nv, base, h, ahead, ahead_step);  // a few values below the window
  }
  return pass2<2, L>(f, nv, base, h, ahead, ahead_step);
}

template <typename From>
Acc chunk(const typename From::type* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  alignas(64) float buf[kBlock];
  static_assert(kLanes <= 16, "byte counts of pass 2 are summed in 16-bit fields");
  // Pass 1 and pass 2 of a clean block read the input (kDirect) or its
  // float32 copy in buf.
  using Fast = std::conditional_t<From::kDirect, From, FromFloat>;
  // bfloat16 with the histogram: pass 1 also writes the float32 copy to buf,
  // which pass 2 reads more cheaply than it would widen again.
  const bool copied = From::kDirect && !std::is_same_v<From, FromFloat> && h->counts != nullptr;
  Consts c;
  c.sat_bits = bits_of(lim.saturation);
  c.mn_bits = bits_of(lim.min_normal);
  c.small_bits = c.mn_bits > 0x20000000u ? c.mn_bits : 0x20000000u;  // 2^-63
  c.small_is_subnormal = c.small_bits == c.mn_bits;
  c.prefetch = From::kDirect;
  const bool hist = h->counts != nullptr;
  const bool zero_from_hist = hist && !c.small_is_subnormal;
  ChunkAcc ck;
  Acc tail = Acc::identity();
  for (int64_t off = 0; off < n; off += kBlock) {
    const int len = static_cast<int>(n - off < kBlock ? n - off : kBlock);
    const int nv = len / kLanes;
    if (nv > 0) {
      const typename From::type* src = p + off;
      const typename Fast::type* f;
      if constexpr (From::kDirect) {
        f = src;
      } else {
        From::to_buf(src, nv * kLanes, buf);
        f = buf;
      }
      Block b;
      b.init();
      fast_pass1<Fast>(f, nv, c, hist, b, copied ? buf : nullptr);
      uint32_t amax = hmax_u31(b.amax);
      uint32_t anz = hmin_u(b.anz);
      // float32, bfloat16: no nonzero |x| below small_bits: from anz with the
      // histogram, else from the count of small values, all zeros.
      const bool no_tiny = c.small_is_subnormal ||
                           (hist ? anz >= c.small_bits - 1 : hsum_u(b.small) == hsum_u(b.zero));
      // Finite sums: every value is finite (a NaN or Inf, or a square above
      // FLT_MAX, would have made them non-finite).
      const bool clean = sums_are_finite(b) && no_tiny;
      if (clean && amax >= c.sat_bits) b.sat = count_saturated<Fast>(f, nv, c.sat_bits);
      if (!clean) {
        // The careful pass and pass 2 read one private copy: were another
        // thread writing the tensor, both still see the same values, so each
        // value is classified exactly once (buf already holds a copy of
        // the other dtypes, and of bfloat16 when copied).
        if (From::kDirect && !copied) From::to_buf(src, nv * kLanes, buf);
        b.init();
        pass1<true, true>(buf, nv, c, b);
        amax = hmax_u31(b.amax);
        anz = hmin_u(b.anz);
      }
      ck.merge(b, !clean);  // b.zero is 0 when clean && zero_from_hist
      int64_t binned = 0;
      if (hist && amax != 0) {
        // Pass 2 prefetches the next block, if it is a whole one, in 15 steps.
        const char* ahead = off + 2 * kBlock <= n ? reinterpret_cast<const char*>(src + kBlock) : nullptr;
        constexpr int step = kBlock * sizeof(typename From::type) / (kBlockRegs / 16);
        binned = clean && !copied ? hist_pass2<Fast>(f, nv, amax, anz, true, h, ahead, step)
                                  : hist_pass2<FromFloat>(buf, nv, amax, anz, clean, h, ahead, step);
      }
      // A clean block holds only finite values: the ones not binned are zeros.
      if (clean && zero_from_hist) ck.zero += int64_t{nv} * kLanes - binned;
    }
    for (int i = nv * kLanes; i < len; ++i) {
      const int bin = update<float>(tail, From::scalar(p[off + i]), lim);
      if (hist && bin >= 0) h->add(bin, 1);
    }
  }
  Acc a = ck.finish();
  a.merge(tail);
  return a;
}

Acc chunk_f32(const float* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  return chunk<FromFloat>(p, n, lim, h);
}
Acc chunk_bf16(const c10::BFloat16* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  return chunk<FromBFloat16>(reinterpret_cast<const uint16_t*>(p), n, lim, h);
}
Acc chunk_f16(const c10::Half* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  return chunk<FromHalf>(reinterpret_cast<const uint16_t*>(p), n, lim, h);
}
Acc chunk_f8e4m3(const c10::Float8_e4m3fn* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  return chunk<FromFloat8<true>>(reinterpret_cast<const uint8_t*>(p), n, lim, h);
}
Acc chunk_f8e5m2(const c10::Float8_e5m2* p, int64_t n, const Limits<float>& lim, HistOut* h) {
  return chunk<FromFloat8<false>>(reinterpret_cast<const uint8_t*>(p), n, lim, h);
}

// ---- float64 ------------------------------------------------------------------
// The same fast/careful split with kLanes / 2 doubles per register: a block
// whose values are all finite, below the saturation threshold and, when
// nonzero, within [2^-500, 2^500] (so x*x neither underflows nor overflows and
// no value is subnormal) is summarised by vector min, max, zero count and
// sums; any other block goes value by value through update(). The histogram
// of a fast block is binned value by value with hist_bin(), whose float64 bins
// are not contiguous in the window sense of pass 2.
typedef uint64_t vq __attribute__((vector_size(4 * kLanes)));
typedef int64_t vl __attribute__((vector_size(4 * kLanes)));
constexpr int kDLanes = kLanes / 2;

inline vd load_d(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline double double_from_bits(uint64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

Acc chunk_f64(const double* p, int64_t n, const Limits<double>& lim, HistOut* h) {
  constexpr uint64_t kInfBits = 0x7ff0000000000000ull;
  constexpr uint64_t kSmallBits = uint64_t{1023 - 500} << 52;  // 2^-500
  constexpr uint64_t kBigBits = uint64_t{1023 + 500} << 52;    // 2^500
  const uint64_t sat_bits = bits_of(lim.saturation);
  uint64_t clean_max = sat_bits < kInfBits ? sat_bits : kInfBits;
  clean_max = clean_max < kBigBits ? clean_max : kBigBits;
  const bool hist = h->counts != nullptr;
  const vq absmask = vq{} + 0x7fffffffffffffffull;
  const vl small = vl{} + static_cast<int64_t>(kSmallBits);
  Acc a = Acc::identity();
  constexpr int kBlockD = 64 * kLanes;  // doubles per block (as many bytes as float32)
  for (int64_t off = 0; off < n; off += kBlockD) {
    const int len = static_cast<int>(n - off < kBlockD ? n - off : kBlockD);
    const int nv = len / kDLanes;
    const double* q = p + off;
    bool clean = false;
    if (nv > 0) {
      vq zero{}, nsmall{};
      vd vmin = vd{} + std::numeric_limits<double>::infinity();
      vd vmax = vd{} - std::numeric_limits<double>::infinity();
      vd s{}, ss{};
      for (int v = 0; v < nv; ++v) {
        const vd x = load_d(q + v * kDLanes);
        const vq ab = (vq)x & absmask;
        zero -= (vq)(ab == 0);
        nsmall -= (vq)((vl)ab < small);
        vmin = x < vmin ? x : vmin;
        vmax = x > vmax ? x : vmax;
        s += x;
        ss += x * x;
      }
      double mn = std::numeric_limits<double>::infinity(), mx = -mn, sum = 0, sumsq = 0;
      int64_t nz = 0, ns = 0;
      for (int l = 0; l < kDLanes; ++l) {
        mn = vmin[l] < mn ? vmin[l] : mn;
        mx = vmax[l] > mx ? vmax[l] : mx;
        sum += s[l];
        sumsq += ss[l];
        nz += static_cast<int64_t>(zero[l]);
        ns += static_cast<int64_t>(nsmall[l]);
      }
      const double am = mx > -mn ? mx : -mn;
      // NaN and Inf make the sums non-finite (and Inf the extremes).
      clean = sum - sum == 0 && sumsq - sumsq == 0 && (bits_of(am) & ~(uint64_t{1} << 63)) < clean_max &&
              ns == nz;
      if (clean) {
        Acc b = Acc::identity();
        b.zero = nz;
        b.min = mn == 0 ? 0.0 : mn;  // -0 -> +0
        b.max = mx == 0 ? 0.0 : mx;
        b.absmax = am == 0 ? 0.0 : am;
        b.sum = sum;
        b.sumsq = sumsq;
        if (hist) {
          // A clean block holds only finite values: its zeros are the values
          // not binned, counted from this same read (a concurrent writer then
          // cannot make zero + binned exceed the block).
          int64_t binned = 0;
          for (int i = 0; i < nv * kDLanes; ++i) {
            const double x = q[i];
            if ((bits_of(x) << 1) != 0) {
              h->add(hist_bin(x), 1);
              ++binned;
            }
          }
          b.zero = int64_t{nv} * kDLanes - binned;
        }
        a.merge(b);
      }
    }
    for (int i = clean ? nv * kDLanes : 0; i < len; ++i) {
      const int bin = update<double>(a, q[i], lim);
      if (hist && bin >= 0) h->add(bin, 1);
    }
  }
  return a;
}
