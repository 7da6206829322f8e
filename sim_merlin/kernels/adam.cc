// LazyAdam's update of an embedding table from its sparse gradient, as one op (sim_merlin.kernels).
//
// The gradient is the batch's rows, with repeats. SimMerlinLazyAdam sums the repeated rows into a
// compact buffer (in the order they come: deterministic), then updates only those rows in place:
//   m += (g - m)(1 - beta1); v += (g^2 - v)(1 - beta2); var -= alpha m / (sqrt(v) + epsilon)
// with alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t) (the global step t, as tfa's LazyAdam).
// In TensorFlow ops the same takes a unique, a scatter, two gathers and three scatter updates.

#include <cmath>
#include <cstdint>
#include <vector>

#include "adam_step.h"
#include "variable_ops.h"

namespace {

REGISTER_OP("SimMerlinLazyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("indices: Tindices")  // [N] rows of var, repeats allowed
    .Input("values: float")      // [N, D] gradient rows
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("step: float")        // t, counted from 1
    .Attr("Tindices: {int32, int64}")
    .Attr("threads: int = 0")  // > 1: own threads when the intra-op pool has one (parallel.h)
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext*) {
      return tensorflow::Status();
    });

template <typename Index>
class LazyAdamOp : public OpKernel {
 public:
  explicit LazyAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
  }

  void Compute(OpKernelContext* context) override {
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        context, /*do_lock=*/true, /*sparse=*/false, {0, 1, 2});
    Tensor var, m, v;
    OP_REQUIRES_OK(context, UpdatableVariable<float>(context, 0, &var));
    OP_REQUIRES_OK(context, UpdatableVariable<float>(context, 1, &m));
    OP_REQUIRES_OK(context, UpdatableVariable<float>(context, 2, &v));
    OP_REQUIRES(context, var.dims() == 2 && m.shape() == var.shape() && v.shape() == var.shape(),
                tensorflow::errors::InvalidArgument(
                    "var, m and v must be matrices of one shape, got ", var.shape().DebugString(),
                    ", ", m.shape().DebugString(), ", ", v.shape().DebugString()));
    const Tensor& indices = context->input(3);
    const Tensor& values = context->input(4);
    const int64_t rows = var.dim_size(0), width = var.dim_size(1), n = indices.NumElements();
    OP_REQUIRES(context, values.dims() == 2 && values.dim_size(0) == n &&
                             values.dim_size(1) == width,
                tensorflow::errors::InvalidArgument("values must be [", n, ", ", width,
                                                    "], got ", values.shape().DebugString()));
    const float lr = context->input(5).scalar<float>()();
    const float beta1 = context->input(6).scalar<float>()();
    const float beta2 = context->input(7).scalar<float>()();
    const float epsilon = context->input(8).scalar<float>()();
    const float step = context->input(9).scalar<float>()();
    const float alpha = lr * std::sqrt(1.0f - std::pow(beta2, step)) / (1.0f - std::pow(beta1, step));

    // Sum the repeated rows: slot[row] is the row's place in `sums` (-1: not in the batch).
    const Index* index = indices.flat<Index>().data();
    const float* g = values.flat<float>().data();
    std::vector<int32_t> slot(rows, -1);
    std::vector<int64_t> touched;
    touched.reserve(std::min<int64_t>(n, rows));
    std::vector<float> sums;
    sums.reserve(std::min<int64_t>(n, rows) * width);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = static_cast<int64_t>(index[i]);
      OP_REQUIRES(context, 0 <= row && row < rows,
                  tensorflow::errors::InvalidArgument("gradient row ", i, " has index ", row,
                                                      ", outside the table's ", rows, " rows"));
      int32_t& s = slot[row];
      if (s < 0) {
        s = static_cast<int32_t>(touched.size());
        touched.push_back(row);
        sums.insert(sums.end(), g + i * width, g + (i + 1) * width);
      } else {
        float* target = sums.data() + static_cast<int64_t>(s) * width;
        for (int64_t j = 0; j < width; ++j) target[j] += g[i * width + j];
      }
    }
    float* w = var.flat<float>().data();
    float* mm = m.flat<float>().data();
    float* vv = v.flat<float>().data();
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
    const int64_t count = static_cast<int64_t>(touched.size());
    sim_merlin::ParallelFor(context, count, width * 20, threads_, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const int64_t offset = touched[k] * width;
        sim_merlin::ApplyStep(w + offset, mm + offset, vv + offset, sums.data() + k * width,
                              width, alpha, one_minus_beta1, one_minus_beta2, epsilon);
      }
    });
  }

 private:
  int threads_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("SimMerlinLazyAdam")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<int32_t>("Tindices"),
                        LazyAdamOp<int32_t>);
REGISTER_KERNEL_BUILDER(Name("SimMerlinLazyAdam")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<int64_t>("Tindices"),
                        LazyAdamOp<int64_t>);

}  // namespace
