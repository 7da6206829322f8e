// Rows of several embedding tables, side by side, in the model's dtype (sim_merlin.kernels).
//
// A behaviour sequence embeds each step with one row of every item-feature table (item id,
// category id, ...) and concatenates them. In TensorFlow ops that is, per table, a gather of
// float32 rows, a cast to the compute dtype (bfloat16 under mixed_bfloat16), then one concat:
// three passes over the result and two float32 copies of it. SimMerlinEmbeddingRows writes each
// output row once: out[n] = [T(tables[0][ids[0][n]]), T(tables[1][ids[1][n]]), ...], with
// float32 -> bfloat16 rounded to nearest even exactly as TensorFlow's Cast (every NaN becomes
// the quiet NaN 0x7FC0, as its vectorised cast does), so the values are the same bits. The
// gradient (Python, sim_merlin/kernels/embedding_rows.py) is one IndexedSlices per table, as a
// gather's (summed per table row for a small table read many times: EmbeddingRowsGradOp).
// With a mask (M = 1, bool of shape S) a position whose mask is false gets a row of zeros and no
// gradient (zero rows), as multiplying the rows by the mask would give (up to the sign of zero)
// without that product's two passes, forward and backward: the padded steps of a history.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "variable_ops.h"  // first: it sets EIGEN_USE_THREADS
#include "tensorflow/core/framework/resource_mgr.h"

namespace {

REGISTER_OP("SimMerlinEmbeddingRows")
    .Input("tables: N * resource")   // float32 [rows_k, widths[k]]
    .Input("ids: N * Tindices")      // one shape S for all
    .Input("masks: M * bool")        // none, or one of shape S: false -> a row of zeros
    .Output("rows: T")               // S + [sum(widths)]
    .Attr("N: int >= 1")
    .Attr("M: int >= 0 = 0")
    .Attr("widths: list(int) >= 1")
    .Attr("table_rows: list(int) = []")  // the tables' row counts, for the gradient
    .Attr("T: {float, bfloat16}")
    .Attr("Tindices: {int32, int64}")
    .Attr("threads: int = 0")
    .SetIsStateful()  // reads variables: ordered with their updates like a ResourceGather
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      int n = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      std::vector<int64_t> widths;
      TF_RETURN_IF_ERROR(c->GetAttr("widths", &widths));
      if (static_cast<int>(widths.size()) != n) {
        return tensorflow::errors::InvalidArgument("widths must have N = ", n, " entries");
      }
      int64_t total = 0;
      for (int64_t w : widths) total += w;
      tensorflow::shape_inference::ShapeHandle shape = c->input(n);
      for (int k = 1; k < n; ++k) TF_RETURN_IF_ERROR(c->Merge(shape, c->input(n + k), &shape));
      for (int k = 2 * n; k < c->num_inputs(); ++k) {
        TF_RETURN_IF_ERROR(c->Merge(shape, c->input(k), &shape));
      }
      tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Concatenate(shape, c->Vector(total), &out));
      c->set_output(0, out);
      return tensorflow::Status();
    });

// float32 -> bfloat16 bits, round to nearest even; any NaN -> 0x7FC0 (TensorFlow's Cast).
inline uint16_t Bf16Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline void CopyRow(const float* __restrict source, float* __restrict target, int64_t width) {
  std::memcpy(target, source, width * sizeof(float));
}

inline void CopyRow(const float* __restrict source, Eigen::bfloat16* __restrict target,
                    int64_t width) {
  uint16_t* out = reinterpret_cast<uint16_t*>(target);
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), infinity = _mm512_set1_epi32(0x7F800000);
  const __m512i nan = _mm512_set1_epi32(0x7FC0);
  for (; j + 16 <= width; j += 16) {
    const __m512i u = _mm512_loadu_si512(source + j);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, magnitude), infinity);
    rounded = _mm512_mask_mov_epi32(rounded, is_nan, nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi32_epi16(rounded));
  }
#endif
  for (; j < width; ++j) out[j] = Bf16Bits(source[j]);
}

constexpr int64_t kAhead = 16;  // rows prefetched ahead of the copy

// Which groups of lookups an op makes. SimMerlinEmbeddingRows is one group (its mask given by
// M); SimMerlinEmbeddingRowGroups has G groups, `masked` saying which have a mask. The inputs
// are laid out alike: group g's ids of table k at ids[g * N + k], then the groups' masks in
// group order.
struct GroupLayout {
  int groups = 1;
  std::vector<bool> masked;

  // " of group g" in an error message, when there are several groups.
  std::string Of(int64_t g) const {
    return groups > 1 ? " of group " + std::to_string(g) : "";
  }

  tensorflow::Status Read(OpKernelConstruction* context) {
    if (context->HasAttr("G")) {
      TF_RETURN_IF_ERROR(context->GetAttr("G", &groups));
      TF_RETURN_IF_ERROR(context->GetAttr("masked", &masked));
      if (static_cast<int>(masked.size()) != groups) {
        return tensorflow::errors::InvalidArgument("masked must have G = ", groups, " entries");
      }
      return tensorflow::Status();
    }
    int m = 0;
    TF_RETURN_IF_ERROR(context->GetAttr("M", &m));
    masked.assign(1, m > 0);
    return tensorflow::Status();
  }
};

template <typename T, typename Index>
class EmbeddingRowsOp : public OpKernel {
 public:
  explicit EmbeddingRowsOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("N", &n_));
    OP_REQUIRES_OK(context, context->GetAttr("widths", &widths_));
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
    OP_REQUIRES_OK(context, layout_.Read(context));
    OP_REQUIRES(context, static_cast<int>(widths_.size()) == n_,
                tensorflow::errors::InvalidArgument("widths must have N entries"));
  }

  void Compute(OpKernelContext* context) override {
    std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> variables(n_);
    for (int k = 0; k < n_; ++k) {
      OP_REQUIRES_OK(context, tensorflow::LookupResource(
                                  context, tensorflow::HandleFromInput(context, k),
                                  &variables[k]));
      OP_REQUIRES_OK(context, (tensorflow::EnsureSparseVariableAccess<CPUDevice, float>(
                                  context, variables[k].get())));
    }
    // Shared locks, taken in address order (as TensorFlow's ops that lock several variables).
    std::vector<tensorflow::Var*> order;
    for (auto& v : variables) order.push_back(v.get());
    std::sort(order.begin(), order.end());
    order.erase(std::unique(order.begin(), order.end()), order.end());
    std::vector<std::unique_ptr<tensorflow::tf_shared_lock>> locks;
    for (tensorflow::Var* v : order) {
      locks.push_back(std::make_unique<tensorflow::tf_shared_lock>(*v->mu()));
    }
    int64_t total = 0;
    std::vector<const float*> tables(n_);
    std::vector<int64_t> rows(n_);
    for (int k = 0; k < n_; ++k) {
      const Tensor& table = *variables[k]->tensor();
      OP_REQUIRES(context, table.dtype() == tensorflow::DT_FLOAT && table.dims() == 2 &&
                               table.dim_size(1) == widths_[k],
                  tensorflow::errors::InvalidArgument(
                      "table ", k, " must be a float32 matrix of width ", widths_[k], ", got ",
                      tensorflow::DataTypeString(table.dtype()), " ",
                      table.shape().DebugString()));
      tables[k] = table.flat<float>().data();
      rows[k] = table.dim_size(0);
      total += widths_[k];
    }
    int mask_input = n_ + n_ * layout_.groups;
    for (int g = 0; g < layout_.groups; ++g) {
      const int first = n_ + g * n_;  // the group's first ids input
      const Tensor& first_ids = context->input(first);
      std::vector<const Index*> ids(n_);
      for (int k = 0; k < n_; ++k) {
        const Tensor& index = context->input(first + k);
        OP_REQUIRES(context, index.shape() == first_ids.shape(),
                    tensorflow::errors::InvalidArgument(
                        "all ids", layout_.Of(g), " must have one shape, got ",
                        first_ids.shape().DebugString(), " and ", index.shape().DebugString()));
        ids[k] = index.flat<Index>().data();
      }
      const bool* keep = nullptr;  // the mask, when given
      if (layout_.masked[g]) {
        const Tensor& mask = context->input(mask_input++);
        OP_REQUIRES(context, mask.shape() == first_ids.shape(),
                    tensorflow::errors::InvalidArgument(
                        "the mask", layout_.Of(g), " must have the ids' shape ",
                        first_ids.shape().DebugString(), ", got ", mask.shape().DebugString()));
        keep = mask.flat<bool>().data();
      }
      tensorflow::TensorShape shape = first_ids.shape();
      shape.AddDim(total);
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(g, shape, &output));
      const int64_t count = first_ids.NumElements();
      const int64_t where = Write(context, tables, rows, ids, keep, count, total,
                                  output->flat<T>().data());
      if (where >= 0) {
        const int k = static_cast<int>(where / count);
        const int64_t i = where % count;
        context->SetStatus(tensorflow::errors::InvalidArgument(
            "ids[", k, "]", layout_.Of(g), " (flat position ", i, ") = ",
            static_cast<int64_t>(ids[k][i]), " is not in [0, ", rows[k], "): the table has ",
            rows[k], " rows"));
        return;
      }
    }
  }

 private:
  // One group's rows into out [count, total]; an id outside its table: k * count + i, else -1.
  int64_t Write(OpKernelContext* context, const std::vector<const float*>& tables,
                const std::vector<int64_t>& rows, const std::vector<const Index*>& ids,
                const bool* keep, int64_t count, int64_t total, T* out) {
    std::atomic<int64_t> bad{-1};
    sim_merlin::ParallelFor(context, count, 40 * total, threads_, [&](int64_t first,
                                                                      int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        T* target = out + i * total;
        if (i + kAhead < last) {  // the rows are random reads: ask for them early
          for (int k = 0; k < n_; ++k) {
            const int64_t ahead = static_cast<int64_t>(ids[k][i + kAhead]);
            if (ahead >= 0 && ahead < rows[k]) {
              __builtin_prefetch(tables[k] + ahead * widths_[k]);
            }
          }
        }
        const bool masked = keep != nullptr && !keep[i];
        for (int k = 0; k < n_; ++k) {
          const int64_t row = static_cast<int64_t>(ids[k][i]);
          const bool outside = row < 0 || row >= rows[k];
          if (outside) bad.store(k * count + i);
          if (outside || masked) {
            std::memset(static_cast<void*>(target), 0, widths_[k] * sizeof(T));
          } else {
            CopyRow(tables[k] + row * widths_[k], target, widths_[k]);
          }
          target += widths_[k];
        }
      }
    });
    return bad.load();
  }

  int n_ = 0;
  int threads_ = 0;
  std::vector<int64_t> widths_;
  GroupLayout layout_;
};

// The gradient of the lookups of table k, from each group's rows_grad [count_g, sum(widths)]
// (column block k), the groups' rows one after the other:
// - by default the float32 rows [sum of count_g, widths[k]], one per id (a split and N casts in
//   TensorFlow ops), for an IndexedSlices over the ids;
// - for a small table read many times (table_rows[k] <= kMaxSummedRows and the ids number at
//   least kRepeats * rows[k], e.g. the categories of a long history), the rows already summed
//   per table row, [rows[k], widths[k]], with indices 0 .. rows[k] - 1: the optimizer then gets
//   one row per table row instead of one per id. Sums run over fixed blocks of ids (each inside
//   one group), then the blocks' sums in block order, so they do not depend on the threads.
// `indices` k is [m] when summed and otherwise the ids, as int64, of all groups in order; except
// that SimMerlinEmbeddingRowsGrad (one group) gives [0] for a table too large to sum (the caller
// reshapes its ids, no copy).
constexpr int64_t kMaxSummedRows = 32768;
constexpr int64_t kRepeats = 16;
constexpr int64_t kIdsPerSumBlock = 16384;

inline bool MaySum(int64_t rows) { return rows > 0 && rows <= kMaxSummedRows; }

template <typename T, typename Index>
class EmbeddingRowsGradOp : public OpKernel {
 public:
  explicit EmbeddingRowsGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("widths", &widths_));
    OP_REQUIRES_OK(context, context->GetAttr("table_rows", &rows_));
    OP_REQUIRES_OK(context, context->GetAttr("threads", &threads_));
    OP_REQUIRES_OK(context, layout_.Read(context));
    grouped_ = context->HasAttr("G");
    OP_REQUIRES(context, rows_.size() == widths_.size(),
                tensorflow::errors::InvalidArgument("table_rows must have one entry per table"));
    half_.assign(widths_.size(), false);
    if (context->HasAttr("Tvalues")) {
      tensorflow::DataTypeVector types;
      OP_REQUIRES_OK(context, context->GetAttr("Tvalues", &types));
      OP_REQUIRES(context, types.size() == widths_.size(),
                  tensorflow::errors::InvalidArgument("Tvalues must have one entry per table"));
      for (size_t k = 0; k < types.size(); ++k) {
        half_[k] = types[k] == tensorflow::DT_BFLOAT16;
        OP_REQUIRES(context, !half_[k] || (std::is_same<T, Eigen::bfloat16>::value &&
                                           !MaySum(rows_[k])),
                    tensorflow::errors::InvalidArgument(
                        "bfloat16 gradient rows need bfloat16 rows_grad and a table of more "
                        "than ", kMaxSummedRows, " rows (never summed); table ", k, " has ",
                        rows_[k]));
      }
    }
  }

  void Compute(OpKernelContext* context) override {
    int64_t total = 0;
    for (int64_t w : widths_) total += w;
    const int n = static_cast<int>(widths_.size());
    const int groups = layout_.groups;
    std::vector<Group> parts(groups);
    int64_t all = 0;  // ids of all groups
    int mask_input = groups + n * groups;
    for (int g = 0; g < groups; ++g) {
      const Tensor& grad = context->input(g);
      OP_REQUIRES(context, grad.dims() >= 1 && grad.dim_size(grad.dims() - 1) == total,
                  tensorflow::errors::InvalidArgument("rows_grad ", g, " must end in ", total,
                                                      " columns, got ",
                                                      grad.shape().DebugString()));
      Group& part = parts[g];
      part.source = grad.flat<T>().data();
      part.count = grad.NumElements() / std::max<int64_t>(total, 1);
      part.first = all;
      all += part.count;
      for (int k = 0; k < n; ++k) {
        const Tensor& table_ids = context->input(groups + g * n + k);
        OP_REQUIRES(context, table_ids.NumElements() == part.count,
                    tensorflow::errors::InvalidArgument("ids ", k, layout_.Of(g), " must have ",
                                                        part.count, " elements, got ",
                                                        table_ids.shape().DebugString()));
        part.ids.push_back(table_ids.flat<Index>().data());
      }
      if (layout_.masked[g]) {
        const Tensor& mask = context->input(mask_input++);
        OP_REQUIRES(context, mask.NumElements() == part.count,
                    tensorflow::errors::InvalidArgument("the mask", layout_.Of(g), " must have ",
                                                        part.count, " elements, got ",
                                                        mask.shape().DebugString()));
        part.keep = mask.flat<bool>().data();
      }
    }
    tensorflow::OpOutputList values, indices;
    OP_REQUIRES_OK(context, context->output_list("values", &values));
    OP_REQUIRES_OK(context, context->output_list("indices", &indices));
    std::vector<void*> targets(n);  // float, or T where half_[k]
    std::vector<int64_t> offsets(n);
    std::vector<bool> summed(n);
    std::vector<int> rows_by_id;  // the tables whose rows are written one per id
    for (int k = 0, offset = 0; k < n; offset += widths_[k], ++k) {
      offsets[k] = offset;
      summed[k] = MaySum(rows_[k]) && all >= kRepeats * rows_[k];
      if (summed[k]) continue;  // Sum allocates its outputs
      Tensor* output = nullptr;
      OP_REQUIRES_OK(context, values.allocate(k, tensorflow::TensorShape({all, widths_[k]}),
                                              &output));
      targets[k] = output->data();
      Tensor* index = nullptr;
      const int64_t index_rows = grouped_ || MaySum(rows_[k]) ? all : 0;
      OP_REQUIRES_OK(context, indices.allocate(k, tensorflow::TensorShape({index_rows}), &index));
      if (index_rows > 0) {
        int64_t* out = index->flat<int64_t>().data();
        for (const Group& part : parts) {
          for (int64_t i = 0; i < part.count; ++i) {
            out[part.first + i] = static_cast<int64_t>(part.ids[k][i]);
          }
        }
      }
      rows_by_id.push_back(k);
    }
    if (!rows_by_id.empty()) {
      for (const Group& part : parts) {
        sim_merlin::ParallelFor(context, part.count, 4 * total, threads_, [&](int64_t first,
                                                                              int64_t last) {
          for (int64_t i = first; i < last; ++i) {
            const T* row = part.source + i * total;
            const bool masked = part.keep != nullptr && !part.keep[i];
            for (int k : rows_by_id) {
              const int64_t width = widths_[k], place = (part.first + i) * width;
              const T* from = row + offsets[k];
              if (half_[k]) {  // T is bfloat16 (checked): the rows as they come
                T* target = static_cast<T*>(targets[k]) + place;
                if (masked) {
                  std::memset(static_cast<void*>(target), 0, width * sizeof(T));  // +0.0
                } else {
                  std::memcpy(static_cast<void*>(target), from, width * sizeof(T));
                }
                continue;
              }
              float* target = static_cast<float*>(targets[k]) + place;
              if (masked) {
                std::fill_n(target, width, 0.0f);
                continue;
              }
              for (int64_t j = 0; j < width; ++j) target[j] = static_cast<float>(from[j]);
            }
          }
        });
      }
    }
    for (int k = 0; k < n; ++k) {
      if (summed[k]) OP_REQUIRES_OK(context, Sum(context, parts, total, k, offsets[k],
                                                 &values, &indices));
    }
  }

 private:
  // One group's gradient rows, ids (per table) and mask; `first`: the place of its first id
  // among all groups' ids.
  struct Group {
    const T* source = nullptr;
    int64_t count = 0, first = 0;
    std::vector<const Index*> ids;
    const bool* keep = nullptr;
  };

  // Outputs k: the summed rows of the table rows read (ascending) and those rows.
  // A masked position's row is read (listed) with nothing added, as a zero gradient row.
  tensorflow::Status Sum(OpKernelContext* context, const std::vector<Group>& parts,
                         int64_t total, int k, int64_t offset, tensorflow::OpOutputList* values,
                         tensorflow::OpOutputList* indices) {
    const int64_t rows = rows_[k], width = widths_[k];
    struct Block {
      const Group* part;
      int64_t begin, end;
    };
    std::vector<Block> blocks;  // fixed blocks of ids, each inside one group
    for (const Group& part : parts) {
      for (int64_t begin = 0; begin < part.count; begin += kIdsPerSumBlock) {
        blocks.push_back({&part, begin, std::min(part.count, begin + kIdsPerSumBlock)});
      }
    }
    const int64_t block_count = static_cast<int64_t>(blocks.size());
    std::vector<float> partial(block_count * rows * width, 0.0f);
    std::vector<uint8_t> read(block_count * rows, 0);
    std::atomic<int64_t> bad{-1};  // block * kIdsPerSumBlock + place in the block
    sim_merlin::ParallelFor(context, block_count, 4 * total * kIdsPerSumBlock, threads_,
                            [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const Block& block = blocks[b];
        const Index* ids = block.part->ids[k];
        const bool* keep = block.part->keep;
        float* sums = partial.data() + b * rows * width;
        uint8_t* seen = read.data() + b * rows;
        for (int64_t i = block.begin; i < block.end; ++i) {
          const int64_t row = static_cast<int64_t>(ids[i]);
          if (row < 0 || row >= rows) {
            bad.store(b * kIdsPerSumBlock + (i - block.begin));
            continue;
          }
          seen[row] = 1;
          if (keep != nullptr && !keep[i]) continue;
          float* into = sums + row * width;
          const T* from = block.part->source + i * total + offset;
          for (int64_t j = 0; j < width; ++j) into[j] += static_cast<float>(from[j]);
        }
      }
    });
    if (bad.load() >= 0) {
      const Block& block = blocks[bad.load() / kIdsPerSumBlock];
      const int64_t i = block.begin + bad.load() % kIdsPerSumBlock;
      const int64_t g = block.part - parts.data();
      return tensorflow::errors::InvalidArgument(
          "ids[", k, "]", layout_.Of(g),
          " (flat position ", i, ") = ", static_cast<int64_t>(block.part->ids[k][i]),
          " is not in [0, ", rows, ")");
    }
    // The rows read (a row not read keeps no entry: a lazy optimizer must not touch it), their
    // sums added block after block.
    std::vector<int64_t> touched;
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t b = 0; b < block_count; ++b) {
        if (read[b * rows + row]) {
          touched.push_back(row);
          break;
        }
      }
    }
    const int64_t m = static_cast<int64_t>(touched.size());
    Tensor* output = nullptr;
    TF_RETURN_IF_ERROR(values->allocate(k, tensorflow::TensorShape({m, width}), &output));
    Tensor* index = nullptr;
    TF_RETURN_IF_ERROR(indices->allocate(k, tensorflow::TensorShape({m}), &index));
    float* target = output->flat<float>().data();
    auto out = index->flat<int64_t>();
    for (int64_t e = 0; e < m; ++e) {
      const int64_t row = touched[e];
      out(e) = row;
      float* into = target + e * width;
      std::copy(partial.data() + row * width, partial.data() + (row + 1) * width, into);
      for (int64_t b = 1; b < block_count; ++b) {
        const float* sums = partial.data() + (b * rows + row) * width;
        for (int64_t j = 0; j < width; ++j) into[j] += sums[j];
      }
    }
    return tensorflow::Status();
  }

  int threads_ = 0;
  bool grouped_ = false;
  std::vector<int64_t> widths_, rows_;
  std::vector<bool> half_;  // table k's rows are given as T (bfloat16), not float
  GroupLayout layout_;
};

// values k: [?, widths[k]]; indices k: [?].
tensorflow::Status GradientShapes(tensorflow::shape_inference::InferenceContext* c) {
  std::vector<int64_t> widths;
  TF_RETURN_IF_ERROR(c->GetAttr("widths", &widths));
  const int n = static_cast<int>(widths.size());
  for (int k = 0; k < n; ++k) {
    c->set_output(k, c->Matrix(c->UnknownDim(), widths[k]));
    c->set_output(n + k, c->Vector(c->UnknownDim()));
  }
  return tensorflow::Status();
}

REGISTER_OP("SimMerlinEmbeddingRowsGrad")
    .Input("rows_grad: T")        // [..., sum(widths)]
    .Input("ids: N * Tindices")   // the forward op's ids
    .Input("masks: M * bool")     // the forward op's mask: false -> zero gradient rows
    .Output("values: N * float")  // [count or m, widths[k]]
    .Output("indices: N * int64")  // [m], [count] or [0] (see above)
    .Attr("N: int >= 1")
    .Attr("M: int >= 0 = 0")
    .Attr("widths: list(int) >= 1")
    .Attr("table_rows: list(int)")
    .Attr("T: {float, bfloat16}")
    .Attr("Tindices: {int32, int64}")
    .Attr("threads: int = 0")
    .SetShapeFn(GradientShapes);

// The attributes the grouped lookup and its gradient share.
#define GROUP_ATTRS                   \
  .Attr("N: int >= 1")                \
  .Attr("G: int >= 1")                \
  .Attr("NG: int >= 1")               \
  .Attr("M: int >= 0 = 0")            \
  .Attr("masked: list(bool)")         \
  .Attr("widths: list(int) >= 1")     \
  .Attr("T: {float, bfloat16}")       \
  .Attr("Tindices: {int32, int64}")   \
  .Attr("threads: int = 0")

// Several lookups of the same tables (a target item and its history) as one op: one gradient
// op then gives one IndexedSlices per table for all of them, where separate lookups give one
// each, which the gradient tape concatenates (a copy of every gradient row) before the update.
REGISTER_OP("SimMerlinEmbeddingRowGroups")
    .Input("tables: N * resource")   // float32 [rows_k, widths[k]]
    .Input("ids: NG * Tindices")     // group g's ids of table k at g * N + k; one shape S_g
    .Input("masks: M * bool")        // the masks of the groups whose `masked` entry is true
    .Output("rows: G * T")           // S_g + [sum(widths)]
    GROUP_ATTRS
    .Attr("table_rows: list(int) = []")
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      int n = 0, groups = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      TF_RETURN_IF_ERROR(c->GetAttr("G", &groups));
      std::vector<int64_t> widths;
      TF_RETURN_IF_ERROR(c->GetAttr("widths", &widths));
      std::vector<bool> masked;
      TF_RETURN_IF_ERROR(c->GetAttr("masked", &masked));
      if (static_cast<int>(widths.size()) != n ||
          static_cast<int>(masked.size()) != groups || c->num_inputs() < n + n * groups) {
        return tensorflow::errors::InvalidArgument(
            "need N widths, G masked entries and NG = N * G ids");
      }
      int64_t total = 0;
      for (int64_t w : widths) total += w;
      int mask_input = n + n * groups;
      for (int g = 0; g < groups; ++g) {
        tensorflow::shape_inference::ShapeHandle shape = c->input(n + g * n);
        for (int k = 1; k < n; ++k) {
          TF_RETURN_IF_ERROR(c->Merge(shape, c->input(n + g * n + k), &shape));
        }
        if (masked[g]) TF_RETURN_IF_ERROR(c->Merge(shape, c->input(mask_input++), &shape));
        tensorflow::shape_inference::ShapeHandle out;
        TF_RETURN_IF_ERROR(c->Concatenate(shape, c->Vector(total), &out));
        c->set_output(g, out);
      }
      return tensorflow::Status();
    });

REGISTER_OP("SimMerlinEmbeddingRowGroupsGrad")
    .Input("rows_grad: G * T")      // each group's [..., sum(widths)]
    .Input("ids: NG * Tindices")    // the forward op's ids
    .Input("masks: M * bool")       // the forward op's masks
    .Output("values: Tvalues")      // [sum of counts or m, widths[k]]
    .Output("indices: N * int64")   // [m] or all groups' ids
    GROUP_ATTRS
    .Attr("table_rows: list(int)")
    // Per table: float, or bfloat16 (only with T = bfloat16, for a table never summed) to give
    // the gradient rows in the dtype they come in (exact; half the bytes of float32).
    .Attr("Tvalues: list({float, bfloat16})")
    .SetShapeFn(GradientShapes);

#define REGISTER(op, kernel, T, Index)                                  \
  REGISTER_KERNEL_BUILDER(Name(op)                                      \
                              .Device(tensorflow::DEVICE_CPU)           \
                              .TypeConstraint<T>("T")                   \
                              .TypeConstraint<Index>("Tindices"),       \
                          kernel<T, Index>);
#define REGISTER_BOTH(T, Index)                                                  \
  REGISTER("SimMerlinEmbeddingRows", EmbeddingRowsOp, T, Index)                 \
  REGISTER("SimMerlinEmbeddingRowsGrad", EmbeddingRowsGradOp, T, Index)         \
  REGISTER("SimMerlinEmbeddingRowGroups", EmbeddingRowsOp, T, Index)            \
  REGISTER("SimMerlinEmbeddingRowGroupsGrad", EmbeddingRowsGradOp, T, Index)
REGISTER_BOTH(float, int32_t)
REGISTER_BOTH(float, int64_t)
REGISTER_BOTH(Eigen::bfloat16, int32_t)
REGISTER_BOTH(Eigen::bfloat16, int64_t)
#undef REGISTER_BOTH
#undef GROUP_ATTRS
#undef REGISTER

}  // namespace
