// Problem description shared by the CPU kernel, the CUDA launcher and the device code of the norm
// family. Plain data only (no torch, no CUDA headers) so device code and the host emulation can use it.
//
// Every op of the family is one configuration of a single fused row operation on x [B, N, D]:
//   r   = x + gate * y                      (residual stage, optional; written to x_out)
//   h   = norm(r) * weight + bias           (kind: LayerNorm or RMSNorm, statistics in fp32)
//   out = h * (1 + scale) + shift           (modulation stage, optional)
// Large operands are addressed by (batch, token, feature) strides so that broadcast tensors
// (stride 0) and views such as the chunks of an adaLN output are read in place.
#pragma once
#include <cstdint>

namespace raekern::norm {

enum class Kind : int32_t { Layer = 0, Rms = 1, None = 2 };

// A [B, N, D] operand read through strides (in elements). ptr == nullptr: operand absent.
struct Operand {
  const void* ptr = nullptr;
  int64_t sb = 0, sn = 0, sd = 1;
};

// How the gradient of a broadcast operand is produced.
enum class GradMode : int32_t {
  Absent = 0,     // no such operand
  PerRow = 1,     // operand is [B, N, D]: one gradient row per (b, n), written directly
  PerSample = 2,  // operand is [B, 1, D]: summed over tokens inside the kernel
  Global = 3,     // operand is [1, 1, D] (or a [D] weight): summed over batch and tokens
};

struct GradSlot {
  GradMode mode = GradMode::Absent;
  void* ptr = nullptr;  // PerRow: [B, N, D] contiguous, operand dtype. Otherwise unused.
  int32_t partial = -1; // PerSample/Global: index of this slot in the fp32 partial-sum workspace
};

struct FwdParams {
  int64_t B = 0, N = 0, D = 0;
  int32_t device = -1;  // CUDA device index of the tensors (-1 on CPU)
  Kind kind = Kind::Layer;
  double eps = 1e-6;
  Operand x, gate, y, shift, scale;  // gate and y both present = residual stage
  const void* weight = nullptr;      // [D] contiguous, accumulator dtype (fp32, fp64 for fp64 input)
  const void* bias = nullptr;        // [D] contiguous, accumulator dtype
  void* x_out = nullptr;             // [B, N, D] contiguous: x + gate*y (residual stage only)
  void* out = nullptr;               // [B, N, D] contiguous (absent when kind == None)
  void* mean = nullptr;              // [B*N], accumulator dtype (zeros for RMSNorm)
  void* rstd = nullptr;              // [B*N], accumulator dtype
};

struct BwdParams {
  int64_t B = 0, N = 0, D = 0;
  int32_t device = -1;
  Kind kind = Kind::Layer;
  Operand dout;          // gradient of `out` (absent when kind == None)
  Operand dxo;           // gradient of `x_out` (residual stage; may be absent)
  Operand xin;           // the normalised input: x, or x_out for the residual stage
  Operand gate, y, scale;
  const void* weight = nullptr;  // accumulator dtype, [D]
  const void* bias = nullptr;
  const void* mean = nullptr;    // [B*N], accumulator dtype
  const void* rstd = nullptr;
  void* dx = nullptr;            // [B, N, D] contiguous
  void* dy = nullptr;            // [B, N, D] contiguous (residual stage)
  GradSlot dgate, dshift, dscale, dweight, dbias;
  // fp32 (fp64 for fp64 input) workspace [tasks, num_partials, D] for the reduced gradients;
  // task t covers the token range [c * rows_per_task, ...) of sample b = t / chunks.
  void* partials = nullptr;
  int32_t num_partials = 0;
  int64_t chunks = 1;         // tasks per sample
  int64_t rows_per_task = 1;  // tokens per task
};

// Split each sample's N tokens into `chunks` ranges so there are enough tasks to fill `workers`.
struct TaskPlan {
  int64_t chunks, rows_per_task;
};
inline TaskPlan plan_tasks(int64_t B, int64_t N, int64_t workers, int64_t min_rows) {
  int64_t want = (4 * workers + B - 1) / (B > 0 ? B : 1);
  int64_t max_chunks = N / (min_rows > 0 ? min_rows : 1);
  if (want > max_chunks) want = max_chunks;
  if (want < 1) want = 1;
  int64_t rows = (N + want - 1) / want;
  if (rows < 1) rows = 1;
  return {(N + rows - 1) / rows, rows};
}

}  // namespace raekern::norm
