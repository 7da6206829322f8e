// Running a kernel's independent pieces of work in parallel (sim_merlin.kernels).
//
// TensorFlow gives a kernel its intra-op thread pool. Training on a few cores is often fastest
// with one intra-op thread (many small ops then run side by side on the inter-op threads), but a
// fused kernel is one large op on the step's critical path: with `threads` > 1 and a one-thread
// pool, it splits its work over that many threads of its own. Those threads get the caller's
// floating-point control state (TensorFlow's threads flush denormals to zero; a new thread does
// not), so every row is computed alike whichever thread takes it.
//
// The threads of its own are helper threads: started once per process and kept, each waiting for
// the next piece of work, first spinning for a short while (kSpinNanos), then asleep. A thread
// started for each op call (as before) often began on the caller's core and shared it for
// milliseconds before the scheduler moved it: a 5 ms kernel split in two ran 1.2-1.5x faster
// than on one thread instead of 2x. Kernels running at once (on the inter-op threads) each take
// a team of helpers of their own (HelperTeam).

#pragma once

#include <pthread.h>
#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sim_merlin {

// A team of helper threads for ParallelFor (see the file comment): while one kernel uses it,
// the kernel's thread and the helpers take chunks of the work from a shared counter, so a thread
// the scheduler holds back (another process, TensorFlow's other inter-op thread, the data
// loader) delays nobody: the others take its chunks. A helper that wakes after the last chunk was
// taken joins nothing, and the kernel waits only for helpers that are running a chunk.
class HelperTeam {
 public:
  // A helper that has finished keeps polling for the next job this long, then sleeps.
  static constexpr int64_t kSpinNanos = 20'000;
  // Kernels running at once (on TensorFlow's inter-op threads) each get a team of their own.
  static constexpr int kTeams = 4;

  // Team `team` (< kTeams), started on first use.
  static HelperTeam& Get(int team) {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, &AfterFork); });
    std::atomic<HelperTeam*>& slot = Teams()[team];
    HelperTeam* found = slot.load(std::memory_order_acquire);
    if (found == nullptr) {
      std::lock_guard<std::mutex> guard(Creation());
      found = slot.load(std::memory_order_relaxed);
      if (found == nullptr) {
        found = new HelperTeam();  // never deleted: its threads live as long as the process
        slot.store(found, std::memory_order_release);
      }
    }
    return *found;
  }

  // Runs work(first, last) over chunks of `chunk` items covering [0, count), on the calling
  // thread and up to `helpers` helpers, each helper with the floating-point control state
  // `control`. False (nothing run) when another kernel has this team.
  bool TryRun(int64_t count, int64_t chunk, int helpers,
              const std::function<void(int64_t, int64_t)>& work, unsigned int control) {
    std::unique_lock<std::mutex> taken(in_use_, std::try_to_lock);
    if (!taken.owns_lock()) return false;
    while (static_cast<int>(threads_) < helpers) Start();
    work_ = &work;
    helpers_.store(static_cast<uint64_t>(helpers), std::memory_order_relaxed);  // of a larger team
    count_ = count;
    chunk_ = chunk;
    control_ = control;
    next_.store(0, std::memory_order_relaxed);
    const uint64_t job = (generation_.load(std::memory_order_relaxed) + 1) & kJobMask;
    state_.store(job << kJobShift, std::memory_order_relaxed);  // open, nobody in it
    {
      std::lock_guard<std::mutex> guard(mutex_);
      generation_.store(job, std::memory_order_release);
    }
    wake_.notify_all();
    RunChunks();
    // Close the job; wait for the helpers still running a chunk: poll a little (they are
    // about to finish), then sleep until the last one leaves (the cores may have other work).
    state_.fetch_or(kClosed, std::memory_order_acq_rel);
    for (int polls = 0; polls < kWaitPolls; ++polls) {
      if ((state_.load(std::memory_order_acquire) & kActive) == 0) return true;
      _mm_pause();
    }
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [&] { return (state_.load(std::memory_order_acquire) & kActive) == 0; });
    return true;
  }

 private:
  // state_: the job's number (<< kJobShift), whether it is closed, and the helpers in it.
  static constexpr uint64_t kActive = 0xFFFFFFFFu;
  static constexpr uint64_t kClosed = uint64_t{1} << 32;
  static constexpr int kJobShift = 33;
  static constexpr uint64_t kJobMask = (uint64_t{1} << 30) - 1;
  // Polls of a kernel waiting for its helpers before it sleeps.
  static constexpr int kWaitPolls = 2000;

  static std::mutex& Creation() {
    static std::mutex* mutex = new std::mutex();
    return *mutex;
  }

  static std::atomic<HelperTeam*>* Teams() {
    static std::atomic<HelperTeam*> teams[kTeams] = {};
    return teams;
  }

  // In a forked child only the forking thread exists: start afresh (the old teams are leaked,
  // their locks may be held by threads that are gone).
  static void AfterFork() {
    for (int team = 0; team < kTeams; ++team) {
      Teams()[team].store(nullptr, std::memory_order_release);
    }
  }

  void Start() {
    ++threads_;
    std::thread([this] { Loop(); }).detach();
  }

  void RunChunks() {
    for (;;) {
      const int64_t first = next_.fetch_add(1, std::memory_order_relaxed) * chunk_;
      if (first >= count_) return;
      (*work_)(first, std::min(count_, first + chunk_));
    }
  }

  // Joins job `job` if it is still open and short of helpers; false otherwise.
  bool Join(uint64_t job) {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((state >> kJobShift) != job || (state & kClosed) != 0 ||
          (state & kActive) >= helpers_.load(std::memory_order_relaxed)) {
        return false;
      }
      if (state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) return true;
    }
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNanos);
      int polls = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++polls % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (!Join(seen)) continue;
      _mm_setcsr(control_);
      RunChunks();
      const uint64_t before = state_.fetch_sub(1, std::memory_order_acq_rel);
      if ((before & kActive) == 1 && (before & kClosed) != 0) {
        std::lock_guard<std::mutex> guard(done_mutex_);  // the kernel may be asleep
        done_.notify_one();
      }
    }
  }

  std::mutex in_use_;  // held by the kernel using the team
  std::mutex mutex_;   // for sleeping helpers
  std::condition_variable wake_;
  std::mutex done_mutex_;  // for the kernel waiting for its helpers
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t, int64_t)>* work_ = nullptr;
  std::atomic<uint64_t> helpers_{0};  // at most this many helpers join the job
  int64_t count_ = 0, chunk_ = 1;
  unsigned int control_ = 0;
  int threads_ = 0;
};

// Work below this many cycles (cost_per_item * count) runs on the calling thread: waking a helper
// costs more.
constexpr int64_t kParallelMinCycles = 200'000;
// Chunks per thread: small enough that threads finish together, large enough to be cheap.
constexpr int64_t kChunksPerThread = 4;

// Calls work(first, last) over disjoint ranges covering [0, count); cost_per_item in cycles.
// The ranges (their number and bounds) vary from call to call: a kernel's result must not
// depend on them.
template <typename Work>
void ParallelFor(tensorflow::OpKernelContext* context, int64_t count, int64_t cost_per_item,
                 int threads, Work work) {
  if (count <= 0) return;
  auto* pool = context->device()->tensorflow_cpu_worker_threads();
  const int64_t own = std::min<int64_t>(threads, count);
  if (own <= 1 || pool->num_threads > 1) {
    tensorflow::Shard(pool->num_threads, pool->workers, count, cost_per_item,
                      [&](int64_t first, int64_t last) { work(first, last); });
    return;
  }
  if (count * std::max<int64_t>(cost_per_item, 1) < kParallelMinCycles) {
    work(0, count);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, count / (own * kChunksPerThread));
  const std::function<void(int64_t, int64_t)> range = [&](int64_t first, int64_t last) {
    work(first, last);
  };
  const unsigned int control = _mm_getcsr();
  for (int team = 0; team < HelperTeam::kTeams; ++team) {
    if (HelperTeam::Get(team).TryRun(count, chunk, static_cast<int>(own - 1), range, control)) {
      return;
    }
  }
  work(0, count);  // kTeams kernels at once already have helpers: the cores are busy
}

}  // namespace sim_merlin
