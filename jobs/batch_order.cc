#include "jobs/batch_order.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace retrace::jobs {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

}  // namespace

uint64_t Mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<int64_t> EpochPermutation(uint64_t run_seed, int64_t epoch,
                                      int64_t num_samples) {
  std::vector<int64_t> permutation(static_cast<size_t>(num_samples));
  for (int64_t i = 0; i < num_samples; ++i) permutation[i] = i;
  uint64_t state = run_seed ^ Mix64(static_cast<uint64_t>(epoch) + 1);
  for (int64_t i = num_samples - 1; i > 0; --i) {
    state += kGolden;
    const uint64_t draw = Mix64(state);
    const auto j = static_cast<int64_t>(
        (static_cast<unsigned __int128>(draw) * static_cast<uint64_t>(i + 1)) >>
        64);
    std::swap(permutation[i], permutation[j]);
  }
  return permutation;
}

absl::StatusOr<BatchOrder> BatchOrder::Create(uint64_t run_seed,
                                              int64_t num_samples,
                                              int64_t batch_size) {
  if (batch_size < 1 || batch_size > num_samples) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch size ", batch_size,
                     " must be between 1 and the number of "
                     "training samples (",
                     num_samples, ")"));
  }
  return BatchOrder(run_seed, num_samples, batch_size);
}

std::vector<int64_t> BatchOrder::Batch(int64_t step) {
  const int64_t epoch = step / steps_per_epoch();
  if (epoch != cached_epoch_) {
    cached_permutation_ = EpochPermutation(run_seed_, epoch, num_samples_);
    cached_epoch_ = epoch;
  }
  const int64_t first = (step % steps_per_epoch()) * batch_size_;
  return std::vector<int64_t>(
      cached_permutation_.begin() + first,
      cached_permutation_.begin() + first + batch_size_);
}

absl::StatusOr<model::ReplayLog> BuildReplayLog(
    uint64_t run_seed, int num_timesteps, BatchOrder& order,
    const std::vector<int64_t>& checkpoint_steps,
    const std::vector<int64_t>& sample_ids) {
  if (static_cast<int64_t>(sample_ids.size()) != order.num_samples()) {
    return absl::InvalidArgumentError(
        absl::StrCat("replay log: ", sample_ids.size(), " sample ids for ",
                     order.num_samples(), " samples"));
  }
  absl::StatusOr<model::ReplayLog> log =
      model::ReplayLog::Create(run_seed, num_timesteps, order.batch_size(),
                               checkpoint_steps, sample_ids);
  if (!log.ok()) return log.status();
  std::vector<model::ReplayRecord> last(sample_ids.size());
  int64_t step = 0;
  for (size_t c = 0; c < checkpoint_steps.size(); ++c) {
    for (; step < checkpoint_steps[c]; ++step) {
      const std::vector<int64_t> batch = order.Batch(step);
      for (size_t p = 0; p < batch.size(); ++p) {
        model::ReplayRecord& record = last[static_cast<size_t>(batch[p])];
        record.step = step;
        record.batch_position = static_cast<int32_t>(p);
        record.timestep = static_cast<int32_t>(model::TrainTimestep(
            run_seed, step, static_cast<int64_t>(p), num_timesteps));
      }
    }
    for (size_t n = 0; n < last.size(); ++n) {
      log->At(static_cast<int64_t>(c), static_cast<int64_t>(n)) = last[n];
    }
  }
  return log;
}

}  // namespace retrace::jobs
