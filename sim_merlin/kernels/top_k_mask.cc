// The k best positions of each row as a mask (sim_merlin.kernels): SIM's search unit.
//
// The GSU keeps the top_k behaviours of a long history by relevance; the ESU reads that choice as
// a mask over the history (it is order-free). In TensorFlow ops that is a sort (TopKV2 over the
// whole row), then a histogram of the picked positions (DenseBincount) and a logical and: this op
// selects each row's k best valid positions in one pass (a partial selection, O(length)).
//
// SimMerlinTopKMask: selection[b, t] = valid[b, t] and t is among the k valid positions of row b
// with the highest keys (all valid positions when there are at most k). Equal keys rank by
// position, lower first; a NaN key ranks below every number.

#include <algorithm>
#include <cmath>
#include <vector>

#include "parallel.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("SimMerlinTopKMask")
    .Attr("k: int >= 0")
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .Input("keys: float")   // [B, L]
    .Input("valid: bool")   // [B, L]
    .Output("selection: bool")  // [B, L]
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle keys, valid, merged;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &valid));
      TF_RETURN_IF_ERROR(c->Merge(keys, valid, &merged));
      c->set_output(0, merged);
      return Status();
    });

class TopKMaskOp : public OpKernel {
 public:
  explicit TopKMaskOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor &keys = context->input(0), &valid = context->input(1);
    OP_REQUIRES(context, keys.dims() == 2 && keys.shape() == valid.shape(),
                tensorflow::errors::InvalidArgument(
                    "keys and valid must be [batch, length] of one shape, got ",
                    keys.shape().DebugString(), " and ", valid.shape().DebugString()));
    Tensor* selection = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, keys.shape(), &selection));
    const int64_t rows = keys.dim_size(0), length = keys.dim_size(1);
    const float* key = keys.flat<float>().data();
    const bool* is_valid = valid.flat<bool>().data();
    bool* picked = selection->flat<bool>().data();
    const int64_t k = k_;
    sim_merlin::ParallelFor(
        context, rows, 20 * length, threads_, [&](int64_t first, int64_t last) {
          std::vector<int64_t> candidates;
          candidates.reserve(length);
          for (int64_t b = first; b < last; ++b) {
            const float* row_keys = key + b * length;
            const bool* row_valid = is_valid + b * length;
            bool* row_picked = picked + b * length;
            candidates.clear();
            for (int64_t t = 0; t < length; ++t) {
              if (row_valid[t]) candidates.push_back(t);
            }
            if (static_cast<int64_t>(candidates.size()) <= k) {
              std::copy_n(row_valid, length, row_picked);
              continue;
            }
            std::fill_n(row_picked, length, false);
            if (k == 0) continue;
            // higher key first, NaN last, then lower position first: a strict weak order
            auto better = [row_keys](int64_t a, int64_t c) {
              const float x = row_keys[a], y = row_keys[c];
              const bool x_nan = std::isnan(x), y_nan = std::isnan(y);
              if (x_nan != y_nan) return y_nan;
              if (!x_nan && x != y) return x > y;
              return a < c;
            };
            std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(),
                             better);
            for (int64_t i = 0; i < k; ++i) row_picked[candidates[i]] = true;
          }
        });
  }

 private:
  int k_ = 0, threads_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("SimMerlinTopKMask").Device(DEVICE_CPU), TopKMaskOp);

}  // namespace
