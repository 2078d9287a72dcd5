// Per-element math shared by fastpeft's CUDA kernels and the module's host test entry points:
// Philox4x32 (the counter-based generator Triton's tl.randint4x implements), the dropout keep
// decision of fastpeft.ops.dropout_mask, and the adapter activations with their derivatives.
//
// OPT-IN: no GPU has run the kernels that use this header yet. The functions are __host__
// __device__, so the tests run exactly this code on the CPU (fastpeft._C.philox4x32_host,
// keep_mask_host, activation_host) against Triton's interpreter and torch.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {

// Philox rounds of fastpeft's dropout masks (fastpeft.ops.dropout_mask.PHILOX_ROUNDS: 7, which
// passes BigCrush; a test checks the two agree).
constexpr int kPhiloxRounds = 7;

// Philox4x32 round and key constants (Salmon et al., SC'11; identical to Triton's and cuRAND's).
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct Philox4 {
  uint32_t x, y, z, w;
};

FASTPEFT_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Triton's randint4x(seed, counter): state (counter_lo, counter_hi, 0, 0), key (seed_lo, seed_hi).
FASTPEFT_HD Philox4 philox4x32(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = umulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// Lane `lane` (0..3) of a Philox result, by selects (a dynamic index would put it on the stack).
FASTPEFT_HD uint32_t philox_lane(const Philox4& r, int64_t lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// Dropout keep decision of element (row, col) of a rows x cols activation
// (fastpeft.ops.dropout_mask): lane col % 4 of Philox at counter row * ceil(cols / 4) + col / 4,
// kept iff its top 31 bits are >= threshold = round(p * 2^31).
FASTPEFT_HD uint64_t dropout_counter(int64_t row, int64_t col, int64_t cols) {
  return static_cast<uint64_t>(row) * static_cast<uint64_t>((cols + 3) / 4) + static_cast<uint64_t>(col / 4);
}

FASTPEFT_HD bool keep_bits(uint32_t bits, uint32_t threshold) { return (bits >> 1) >= threshold; }

FASTPEFT_HD bool keep_element(uint64_t seed, int64_t row, int64_t col, int64_t cols, uint32_t threshold) {
  return keep_bits(philox_lane(philox4x32(dropout_counter(row, col, cols), seed), col & 3), threshold);
}

// Adapter activations (AdapterHub's set). The codes are the module's ACTIVATIONS dict.
enum Activation : int { kIdentity = 0, kRelu = 1, kGeluErf = 2, kGeluTanh = 3, kSilu = 4 };

constexpr float kSqrtHalf = 0.70710678118654752f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // sqrt(2 / pi)
constexpr float kGeluTanhCubic = 0.044715f;            // torch's gelu(approximate="tanh")

FASTPEFT_HD float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

FASTPEFT_HD float activate(int act, float z) {
  switch (act) {
    case kRelu:
      return z > 0.0f ? z : 0.0f;
    case kGeluErf:
      return 0.5f * z * (1.0f + erff(z * kSqrtHalf));
    case kGeluTanh:
      return 0.5f * z * (1.0f + tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z)));
    case kSilu:
      return z * sigmoid(z);
    default:
      return z;
  }
}

// d act(z) / dz (relu's derivative at 0 is 0, as torch's).
FASTPEFT_HD float activate_grad(int act, float z) {
  switch (act) {
    case kRelu:
      return z > 0.0f ? 1.0f : 0.0f;
    case kGeluErf:
      return 0.5f * (1.0f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
    case kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z));
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * z * z);
    }
    case kSilu: {
      const float s = sigmoid(z);
      return s * (1.0f + z * (1.0f - s));
    }
    default:
      return 1.0f;
  }
}

}  // namespace fastpeft
