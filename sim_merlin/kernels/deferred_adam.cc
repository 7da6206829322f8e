// Dense Adam on an embedding table, with the steps of the rows a batch did not touch deferred
// until the row is read (sim_merlin.kernels).
//
// Dense Adam (the reference's; TensorFlow's ResourceApplyAdam) updates every row of a table at
// every step t. A row the batch did not touch has g = 0, yet its moments decay and its weights
// move:
//   m += (0 - m)(1 - beta1);  v += (0 * 0 - v)(1 - beta2);
//   var -= (m alpha_t) / (sqrt(v) + epsilon)
// with alpha_t = lr sqrt(1 - beta2^t) / (1 - beta1^t). Those steps depend on nothing but the row
// and alpha_t, so they can wait until the row is read. `steps[row]` counts the Adam steps applied
// to the row so far:
// - SimMerlinAdamCatchUp brings the given rows (repeats allowed) to `step` steps;
// - SimMerlinDeferredAdam applies step t to the batch's rows (repeated rows summed in the order
//   they come, as UnsortedSegmentSum does), after bringing each to t - 1.
// Each element goes through the same float operations in the same order as in TensorFlow's
// kernel, which is compiled without FMA; build.py compiles this file with -ffp-contract=off (a
// fused multiply-add would round differently), so the weights are the same bits as dense Adam's.
// A row stops moving once its m is zero (flushed to zero after some hundreds of steps, as
// TensorFlow's threads flush denormals); then only v decays, which is cheap.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "adam_step.h"
#include "variable_ops.h"  // first of the Eigen users: it sets EIGEN_USE_THREADS
#include "rows.h"

namespace {

tensorflow::Status NoOutputs(tensorflow::shape_inference::InferenceContext*) {
  return tensorflow::Status();
}

REGISTER_OP("SimMerlinAdamCatchUp")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("steps: resource")   // int32 [rows]: Adam steps applied to each row
    .Input("indices: N * Tindices")  // rows to bring to `step`: any shapes, repeats allowed
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("step: int64")        // steps the rows must have after the op
    .Attr("N: int >= 1")
    .Attr("Tindices: {int32, int64}")
    .Attr("threads: int = 0")
    .SetShapeFn(NoOutputs);

REGISTER_OP("SimMerlinDeferredAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("steps: resource")
    .Input("indices: Tindices")  // [N] rows of var, repeats allowed
    .Input("values: T")          // [N, D] gradient rows (bfloat16: widened, exactly)
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("step: int64")        // t, counted from 1: the step being applied
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Attr("Tindices: {int32, int64}")
    .Attr("threads: int = 0")
    .SetShapeFn(NoOutputs);

struct Hyper {
  float lr, beta1, beta2, epsilon;
  bool operator==(const Hyper& o) const {
    return std::memcmp(this, &o, sizeof(Hyper)) == 0;
  }
};

// alpha_t for t = 0 .. as far as asked, computed once per op instance (alpha_0 is unused).
class Alphas {
 public:
  // The table up to `last` for these hyperparameters (recomputed when they change).
  const float* Upto(const Hyper& hyper, int64_t last) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!(hyper == hyper_)) {
      hyper_ = hyper;
      values_.assign(1, 0.0f);
    }
    for (int64_t t = static_cast<int64_t>(values_.size()); t <= last; ++t) {
      // As TensorFlow: beta powers by pow() in float, then ApplyAdam's
      // lr * sqrt(1 - beta2_power) / (1 - beta1_power).
      const float step = static_cast<float>(t);
      const float beta1_power = std::pow(hyper.beta1, step);
      const float beta2_power = std::pow(hyper.beta2, step);
      values_.push_back(hyper.lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power));
    }
    return values_.data();
  }

 private:
  std::mutex mutex_;
  Hyper hyper_{-1.0f, -1.0f, -1.0f, -1.0f};
  std::vector<float> values_;
};

// One row of `width` floats through steps first .. last with g = 0.
inline void ZeroGradientStepsAnyWidth(float* __restrict w, float* __restrict m,
                                      float* __restrict v, int64_t width, int64_t first,
                                      int64_t last, const float* alphas, float one_minus_beta1,
                                      float one_minus_beta2, float epsilon) {
  int64_t t = first;
  for (; t <= last; ++t) {
    bool moving = false;
    for (int64_t j = 0; j < width; ++j) moving |= (m[j] != 0.0f);
    if (!moving) break;
    const float alpha = alphas[t];
    for (int64_t j = 0; j < width; ++j) {
      m[j] += (0.0f - m[j]) * one_minus_beta1;
      v[j] += (0.0f * 0.0f - v[j]) * one_minus_beta2;
      w[j] -= (m[j] * alpha) / (std::sqrt(v[j]) + epsilon);
    }
  }
  // m is zero: the weights stay (0 * alpha / (sqrt(v) + epsilon) is 0) and only v decays.
  for (; t <= last; ++t) {
    bool decaying = false;
    for (int64_t j = 0; j < width; ++j) {
      v[j] += (0.0f * 0.0f - v[j]) * one_minus_beta2;
      decaying |= (v[j] != 0.0f);
    }
    if (!decaying) break;
  }
}

#if defined(__AVX512F__)
// The same steps for a row of 16 * C floats held in registers from the first step to the last:
// the loop above stores and reloads the row at every step and tests m one element at a time,
// and a catch-up is mostly rows of E = 16 floats taken through a dozen or more steps. Each
// element takes the same float operations in the same order (this file is compiled without
// FMA, and a vector square root and division round as the scalar ones), and "!= 0" is the
// unordered compare, true for NaN, as in C++.
template <int C>
inline void ZeroGradientStepsInRegisters(float* w, float* m, float* v, int64_t first,
                                         int64_t last, const float* alphas,
                                         float one_minus_beta1, float one_minus_beta2,
                                         float epsilon) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 c1 = _mm512_set1_ps(one_minus_beta1), c2 = _mm512_set1_ps(one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(epsilon);
  const __m512 zero_squared = _mm512_set1_ps(0.0f * 0.0f);
  __m512 mm[C], vv[C], ww[C];
  for (int c = 0; c < C; ++c) {
    mm[c] = _mm512_loadu_ps(m + 16 * c);
    vv[c] = _mm512_loadu_ps(v + 16 * c);
    ww[c] = _mm512_loadu_ps(w + 16 * c);
  }
  int64_t t = first;
  for (; t <= last; ++t) {
    __mmask16 moving = 0;
    for (int c = 0; c < C; ++c) moving |= _mm512_cmp_ps_mask(mm[c], zero, _CMP_NEQ_UQ);
    if (!moving) break;
    const __m512 alpha = _mm512_set1_ps(alphas[t]);
    for (int c = 0; c < C; ++c) {
      mm[c] = _mm512_add_ps(mm[c], _mm512_mul_ps(_mm512_sub_ps(zero, mm[c]), c1));
      vv[c] = _mm512_add_ps(vv[c], _mm512_mul_ps(_mm512_sub_ps(zero_squared, vv[c]), c2));
      ww[c] = _mm512_sub_ps(ww[c], _mm512_div_ps(_mm512_mul_ps(mm[c], alpha),
                                                 _mm512_add_ps(_mm512_sqrt_ps(vv[c]), eps)));
    }
  }
  for (; t <= last; ++t) {
    __mmask16 decaying = 0;
    for (int c = 0; c < C; ++c) {
      vv[c] = _mm512_add_ps(vv[c], _mm512_mul_ps(_mm512_sub_ps(zero_squared, vv[c]), c2));
      decaying |= _mm512_cmp_ps_mask(vv[c], zero, _CMP_NEQ_UQ);
    }
    if (!decaying) break;
  }
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(m + 16 * c, mm[c]);
    _mm512_storeu_ps(v + 16 * c, vv[c]);
    _mm512_storeu_ps(w + 16 * c, ww[c]);
  }
}
#endif

inline void ZeroGradientSteps(float* __restrict w, float* __restrict m, float* __restrict v,
                              int64_t width, int64_t first, int64_t last, const float* alphas,
                              float one_minus_beta1, float one_minus_beta2, float epsilon) {
  if (first > last) return;
#if defined(__AVX512F__)
  static constexpr decltype(&ZeroGradientStepsInRegisters<1>) kInRegisters[] = {
      &ZeroGradientStepsInRegisters<1>, &ZeroGradientStepsInRegisters<2>,
      &ZeroGradientStepsInRegisters<3>, &ZeroGradientStepsInRegisters<4>};
  if (width % 16 == 0 && 16 <= width && width <= 64) {
    return kInRegisters[width / 16 - 1](w, m, v, first, last, alphas, one_minus_beta1,
                                        one_minus_beta2, epsilon);
  }
#endif
  ZeroGradientStepsAnyWidth(w, m, v, width, first, last, alphas, one_minus_beta1,
                            one_minus_beta2, epsilon);
}

// A table's four variables (locked by the caller) and their elements.
struct Table {
  Tensor var, m, v, steps;
  int64_t rows = 0, width = 0;
  float *w = nullptr, *mm = nullptr, *vv = nullptr;  // [rows, width] each
  int32_t* step_counts = nullptr;                     // [rows]
};

// The work is split by rows: part k of `parts` owns the rows whose multiplicative hash, scaled
// to [0, parts), is k (ids are often sorted by popularity, so ranges would not balance) and
// reads all the indices, so no two threads touch a row and each row's repeats are summed in the
// order they come. The hash costs two multiplications per index where row % parts cost a
// division.
struct RowPart {
  int64_t part, parts;
  bool Has(int64_t row) const {
    const uint64_t hashed = static_cast<uint32_t>(static_cast<uint64_t>(row) * 0x9E3779B1u);
    return static_cast<int64_t>((hashed * static_cast<uint64_t>(parts)) >> 32) == part;
  }
};

class AdamKernel : public OpKernel {
 public:
  explicit AdamKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

  // Locks the table's four variables (inputs 0-3, in TensorFlow's order) for the whole op.
  void Compute(OpKernelContext* context) final {
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {0, 1, 2, 3});
    Table table;
    if (Variables(context, &table)) Run(context, table);
  }

 protected:
  virtual void Run(OpKernelContext* context, Table& table) = 0;

  // Locks (by the caller) and reads the four variables (inputs 0-3); false after an error.
  bool Variables(OpKernelContext* context, Table* table) {
    for (int i = 0; i < 4; ++i) {
      Tensor* target = i == 0 ? &table->var : i == 1 ? &table->m : i == 2 ? &table->v
                                                                           : &table->steps;
      auto status = i < 3 ? UpdatableVariable<float>(context, i, target)
                          : UpdatableVariable<int32_t>(context, i, target);
      if (!status.ok()) {
        context->SetStatus(status);
        return false;
      }
    }
    const Tensor& var = table->var;
    if (var.dims() != 2 || table->m.shape() != var.shape() || table->v.shape() != var.shape() ||
        table->steps.dims() != 1 || table->steps.dim_size(0) != var.dim_size(0)) {
      context->SetStatus(tensorflow::errors::InvalidArgument(
          "var, m and v must be matrices of one shape [rows, width] and steps a vector [rows], "
          "got ", var.shape().DebugString(), ", ", table->m.shape().DebugString(), ", ",
          table->v.shape().DebugString(), ", ", table->steps.shape().DebugString()));
      return false;
    }
    table->rows = var.dim_size(0);
    table->width = var.dim_size(1);
    table->w = table->var.flat<float>().data();
    table->mm = table->m.flat<float>().data();
    table->vv = table->v.flat<float>().data();
    table->step_counts = table->steps.flat<int32_t>().data();
    for (const Tensor* t : {&table->var, &table->m, &table->v}) {
      AdviseHugePages(t->tensor_data().data(), t->TotalBytes());
    }
    return true;
  }

  Hyper Hyperparameters(OpKernelContext* context, int first) {
    return Hyper{context->input(first).scalar<float>()(),
                 context->input(first + 1).scalar<float>()(),
                 context->input(first + 2).scalar<float>()(),
                 context->input(first + 3).scalar<float>()()};
  }

  // Checks every index; false after setting an error.
  template <typename Index>
  static bool InTable(OpKernelContext* context, const Index* index, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; ++i) {
      if (index[i] < 0 || index[i] >= rows) {
        context->SetStatus(tensorflow::errors::InvalidArgument(
            "index ", i, " is ", static_cast<int64_t>(index[i]), ", outside the table's ",
            rows, " rows"));
        return false;
      }
    }
    return true;
  }

  // Runs work(part) over disjoint parts of the table's rows, in parallel.
  template <typename Work>
  void ForEachRowRange(OpKernelContext* context, int64_t rows, int64_t n, Work work) {
    const int64_t parts = std::max<int64_t>(
        1, std::min<int64_t>({std::max(threads_, context->device()
                                                     ->tensorflow_cpu_worker_threads()
                                                     ->num_threads),
                              16, rows}));
    sim_merlin::ParallelFor(context, parts, 1000 + n * 50, threads_,
                            [&](int64_t first, int64_t last) {
                              for (int64_t k = first; k < last; ++k) work(RowPart{k, parts});
                            });
  }

  // Rows are scattered over tables far larger than the caches: ask for what the loops below
  // will read a few iterations ahead.
  static constexpr int64_t kAhead = 16;
  static void PrefetchRow(int64_t row, int64_t width, const float* w, const float* m,
                          const float* v) {
    for (int64_t j = 0; j < width; j += 16) {
      __builtin_prefetch(w + row * width + j, 1);
      __builtin_prefetch(m + row * width + j, 1);
      __builtin_prefetch(v + row * width + j, 1);
    }
  }

  static tensorflow::Status Ahead(int64_t row, int64_t steps, int64_t step) {
    return tensorflow::errors::FailedPrecondition("row ", row, " has had ", steps,
                                                  " Adam steps, more than ", step);
  }

  int threads_ = 0;
  Alphas alphas_;
};

// A catch-up over at least this many ids per table row marks the rows read instead of listing
// them per part.
constexpr int64_t kIdsPerRowToMark = 4;

template <typename Index>
class CatchUpOp : public AdamKernel {
 public:
  using AdamKernel::AdamKernel;

  void Run(OpKernelContext* context, Table& table) override {
    tensorflow::OpInputList lists;
    OP_REQUIRES_OK(context, context->input_list("indices", &lists));
    const int first_scalar = 4 + lists.size();
    const Hyper hyper = Hyperparameters(context, first_scalar);
    const int64_t step = context->input(first_scalar + 4).scalar<int64_t>()();
    OP_REQUIRES(context, 0 <= step && step < (int64_t{1} << 31),
                tensorflow::errors::InvalidArgument("step must be in 0 .. 2^31 - 1, got ", step));
    const int64_t width = table.width;
    int64_t n = 0;
    for (int l = 0; l < lists.size(); ++l) n += lists[l].NumElements();
    const bool mark = table.rows * kIdsPerRowToMark <= n;  // (the marking checks the ids)
    for (int l = 0; l < lists.size() && !mark; ++l) {
      const Index* index = lists[l].flat<Index>().data();
      if (!InTable(context, index, lists[l].NumElements(), table.rows)) return;
    }
    const float* alphas = alphas_.Upto(hyper, step);
    int32_t* steps = table.step_counts;
    float *w = table.w, *mm = table.mm, *vv = table.vv;
    const float c1 = 1.0f - hyper.beta1, c2 = 1.0f - hyper.beta2;
    std::atomic<int64_t> ahead{-1};
    if (mark) {
      // Many ids per table row (the categories of a long history): one pass over the ids marks
      // the rows read, then row ranges catch up the marked rows that are behind. (Every part
      // hashing every id, below, had cost more than the catch-up of such a table itself.)
      std::vector<uint8_t> read(table.rows, 0);
      for (int l = 0; l < lists.size(); ++l) {
        const Index* index = lists[l].flat<Index>().data();
        const int64_t count = lists[l].NumElements();
        for (int64_t i = 0; i < count; ++i) {
          const int64_t row = static_cast<int64_t>(index[i]);
          if (row < 0 || row >= table.rows) {
            InTable(context, index, count, table.rows);  // names it
            return;
          }
          read[row] = 1;
        }
      }
      sim_merlin::ParallelFor(context, table.rows, 20 * width, threads_,
                              [&](int64_t first, int64_t last) {
        for (int64_t row = first; row < last; ++row) {
          if (!read[row] || steps[row] == step) continue;
          if (steps[row] > step) {
            ahead = row;
            continue;
          }
          const int64_t offset = row * width;
          ZeroGradientSteps(w + offset, mm + offset, vv + offset, width, steps[row] + 1, step,
                            alphas, c1, c2, hyper.epsilon);
          steps[row] = static_cast<int32_t>(step);
        }
      });
      OP_REQUIRES(context, ahead < 0, Ahead(ahead, steps[ahead], step));
      return;
    }
    ForEachRowRange(context, table.rows, n, [&](RowPart part) {
      // The part's rows that are behind, each once (its count is set as it is listed).
      std::vector<int64_t> rows, from;
      for (int l = 0; l < lists.size(); ++l) {
        const Index* index = lists[l].flat<Index>().data();
        const int64_t count = lists[l].NumElements();
        for (int64_t i = 0; i < count; ++i) {
          if (i + kAhead < count) __builtin_prefetch(steps + index[i + kAhead]);
          const int64_t row = static_cast<int64_t>(index[i]);
          if (!part.Has(row) || steps[row] == step) continue;
          if (steps[row] > step) {
            ahead = row;
            continue;
          }
          rows.push_back(row);
          from.push_back(steps[row]);
          steps[row] = static_cast<int32_t>(step);
        }
      }
      const int64_t count = static_cast<int64_t>(rows.size());
      for (int64_t k = 0; k < count; ++k) {
        if (k + kAhead < count) PrefetchRow(rows[k + kAhead], width, w, mm, vv);
        const int64_t offset = rows[k] * width;
        ZeroGradientSteps(w + offset, mm + offset, vv + offset, width, from[k] + 1, step,
                          alphas, c1, c2, hyper.epsilon);
      }
    });
    OP_REQUIRES(context, ahead < 0, Ahead(ahead, steps[ahead], step));
  }
};

// Gradient rows summed in float32; a bfloat16 row is widened exactly (rows.h).
template <typename Value>
inline void AddRow(float* __restrict into, const Value* __restrict from, int64_t width) {
  for (int64_t j = 0; j < width; ++j) into[j] += static_cast<float>(from[j]);
}
template <typename Value>
inline void AppendRow(std::vector<float>* sums, const Value* from, int64_t width) {
  const size_t size = sums->size();
  sums->resize(size + width);
  sim_merlin::Widen(from, width, sums->data() + size);
}

template <typename Index, typename Value>
class DeferredAdamOp : public AdamKernel {
 public:
  using AdamKernel::AdamKernel;

  void Run(OpKernelContext* context, Table& table) override {
    const Tensor& indices = context->input(4);
    const Tensor& values = context->input(5);
    const int64_t n = indices.NumElements(), width = table.width;
    OP_REQUIRES(context, indices.dims() == 1 && values.dims() == 2 &&
                             values.dim_size(0) == n && values.dim_size(1) == width,
                tensorflow::errors::InvalidArgument(
                    "indices must be [N] and values [N, ", width, "], got ",
                    indices.shape().DebugString(), " and ", values.shape().DebugString()));
    const Hyper hyper = Hyperparameters(context, 6);
    const int64_t step = context->input(10).scalar<int64_t>()();
    OP_REQUIRES(context, 1 <= step && step < (int64_t{1} << 31),
                tensorflow::errors::InvalidArgument("step must be in 1 .. 2^31 - 1, got ", step));
    const Index* index = indices.flat<Index>().data();
    if (!InTable(context, index, n, table.rows)) return;
    const Value* g = values.flat<Value>().data();
    const float* alphas = alphas_.Upto(hyper, step);
    int32_t* steps = table.step_counts;
    float *w = table.w, *mm = table.mm, *vv = table.vv;
    const float c1 = 1.0f - hyper.beta1, c2 = 1.0f - hyper.beta2, epsilon = hyper.epsilon;
    const float alpha = alphas[step];
    // slot[row]: the row's place in its part's sums while the op runs, -1 otherwise (kept
    // between calls: only the listed rows are reset).
    std::lock_guard<std::mutex> lock(slot_mutex_);
    if (static_cast<int64_t>(slot_.size()) != table.rows) slot_.assign(table.rows, -1);
    int32_t* slot = slot_.data();
    std::atomic<int64_t> ahead{-1};
    ForEachRowRange(context, table.rows, n, [&](RowPart part) {
      std::vector<int64_t> rows;
      std::vector<float> sums;
      rows.reserve(std::min(n, table.rows) / part.parts + 1);
      sums.reserve((std::min(n, table.rows) / part.parts + 1) * width);
      for (int64_t i = 0; i < n; ++i) {
        if (i + kAhead < n) {
          __builtin_prefetch(slot + index[i + kAhead]);
          __builtin_prefetch(steps + index[i + kAhead]);
        }
        const int64_t row = static_cast<int64_t>(index[i]);
        if (!part.Has(row)) continue;
        const Value* gi = g + i * width;
        int32_t s = slot[row];
        if (s >= 0) {
          AddRow(sums.data() + static_cast<int64_t>(s) * width, gi, width);
          continue;
        }
        if (steps[row] >= step) ahead = row;
        slot[row] = static_cast<int32_t>(rows.size());
        rows.push_back(row);
        AppendRow(&sums, gi, width);
      }
      const int64_t count = static_cast<int64_t>(rows.size());
      for (int64_t k = 0; k < count; ++k) {
        if (k + kAhead < count) {  // the listing above has long since evicted steps[row] too
          PrefetchRow(rows[k + kAhead], width, w, mm, vv);
          __builtin_prefetch(steps + rows[k + kAhead], 1);
        }
        const int64_t row = rows[k];
        slot[row] = -1;
        if (steps[row] >= step) continue;
        const int64_t offset = row * width;
        ZeroGradientSteps(w + offset, mm + offset, vv + offset, width, steps[row] + 1, step - 1,
                          alphas, c1, c2, epsilon);
        sim_merlin::ApplyStep(w + offset, mm + offset, vv + offset, sums.data() + k * width,
                              width, alpha, c1, c2, epsilon);
        steps[row] = static_cast<int32_t>(step);
      }
    });
    OP_REQUIRES(context, ahead < 0, Ahead(ahead, steps[ahead], step - 1));
  }

 private:
  std::mutex slot_mutex_;
  std::vector<int32_t> slot_;
};

#define REGISTER(name, kernel)                                                          \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name(name).Device(tensorflow::DEVICE_CPU).TypeConstraint<int32_t>("Tindices"),   \
      kernel<int32_t>);                                                                 \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name(name).Device(tensorflow::DEVICE_CPU).TypeConstraint<int64_t>("Tindices"),   \
      kernel<int64_t>);

REGISTER("SimMerlinAdamCatchUp", CatchUpOp)
#undef REGISTER

#define REGISTER(Index, Value)                                                   \
  REGISTER_KERNEL_BUILDER(Name("SimMerlinDeferredAdam")                          \
                              .Device(tensorflow::DEVICE_CPU)                    \
                              .TypeConstraint<Index>("Tindices")                 \
                              .TypeConstraint<Value>("T"),                       \
                          DeferredAdamOp<Index, Value>);
REGISTER(int32_t, float)
REGISTER(int64_t, float)
REGISTER(int32_t, Eigen::bfloat16)
REGISTER(int64_t, Eigen::bfloat16)

}  // namespace
