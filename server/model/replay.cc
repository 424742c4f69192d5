#include "server/model/replay.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "server/model/counter_rng.h"

namespace retrace::model {
namespace {

constexpr char kMagic[] = "RTRPLAY1";
constexpr size_t kMagicSize = 8;
constexpr uint32_t kVersion = 1;
constexpr size_t kDigestSize = 64;
constexpr size_t kRecordSize = 16;
// magic, version, num_timesteps, run_seed, C, N, batch_size
constexpr size_t kHeaderSize = kMagicSize + 4 + 4 + 8 + 8 + 8 + 8;

// The format is little-endian; the hosts retrace runs on are too, so values
// are copied as they are (checked once here rather than byte-swapped).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "replay.bin I/O assumes a little-endian host");

template <typename T>
void Append(std::string* out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out->append(bytes, sizeof(T));
}

template <typename T>
T ReadAt(absl::string_view bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

RngKey TrainKey(uint64_t run_seed, RngStream stream, int64_t step,
                int64_t batch_position) {
  return RngKey{run_seed, stream, static_cast<uint32_t>(step),
                static_cast<uint32_t>(batch_position), 0};
}

}  // namespace

int64_t TrainTimestep(uint64_t run_seed, int64_t step, int64_t batch_position,
                      int num_timesteps) {
  return UniformInt(
      TrainKey(run_seed, RngStream::kTrainTimestep, step, batch_position), 0,
      num_timesteps);
}

void TrainNoise(uint64_t run_seed, int64_t step, int64_t batch_position,
                float* out, int64_t count) {
  GaussianFill(TrainKey(run_seed, RngStream::kTrainNoise, step, batch_position),
               out, count);
}

TrainDraw ReplayDraw(uint64_t run_seed, int64_t step, int64_t batch_position,
                     int num_timesteps, absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  TrainDraw draw;
  draw.timestep = TrainTimestep(run_seed, step, batch_position, num_timesteps);
  draw.noise.resize(static_cast<size_t>(count));
  TrainNoise(run_seed, step, batch_position, draw.noise.data(), count);
  return draw;
}

absl::StatusOr<ReplayLog> ReplayLog::Create(
    uint64_t run_seed, int num_timesteps, int64_t batch_size,
    std::vector<int64_t> checkpoint_steps, std::vector<int64_t> sample_ids) {
  if (num_timesteps < 1 || batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("replay log: num_timesteps (", num_timesteps,
                     ") and batch_size (", batch_size, ") must be positive"));
  }
  for (size_t c = 0; c < checkpoint_steps.size(); ++c) {
    if (checkpoint_steps[c] < 1 ||
        (c > 0 && checkpoint_steps[c] <= checkpoint_steps[c - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "replay log: checkpoint steps must be positive and increasing; "
          "checkpoint ",
          c, " has step ", checkpoint_steps[c]));
    }
  }
  ReplayLog log;
  log.run_seed_ = run_seed;
  log.num_timesteps_ = num_timesteps;
  log.batch_size_ = batch_size;
  log.checkpoint_steps_ = std::move(checkpoint_steps);
  log.sample_ids_ = std::move(sample_ids);
  log.records_.assign(log.checkpoint_steps_.size() * log.sample_ids_.size(),
                      ReplayRecord{});
  return log;
}

const ReplayRecord& ReplayLog::At(int64_t c, int64_t n) const {
  if (c < 0 || c >= num_checkpoints() || n < 0 || n >= num_samples()) {
    std::abort();
  }
  return records_[static_cast<size_t>(c * num_samples() + n)];
}

ReplayRecord& ReplayLog::At(int64_t c, int64_t n) {
  return const_cast<ReplayRecord&>(std::as_const(*this).At(c, n));
}

absl::StatusOr<TrainDraw> ReplayLog::Draw(
    int64_t c, int64_t n, absl::Span<const int64_t> shape) const {
  const ReplayRecord& record = At(c, n);
  if (!record.seen()) {
    return absl::FailedPreconditionError(
        absl::StrCat("replay log: sample ", n, " (id ", sample_ids_[n],
                     ") was not used in training before checkpoint ", c,
                     " (step ", checkpoint_steps_[c], ")"));
  }
  return ReplayDraw(run_seed_, record.step, record.batch_position,
                    num_timesteps_, shape);
}

std::string ReplayLog::Serialize() const {
  std::string out;
  out.reserve(kHeaderSize +
              8 * (checkpoint_steps_.size() + sample_ids_.size()) +
              kRecordSize * records_.size() + kDigestSize);
  out.append(kMagic, kMagicSize);
  Append<uint32_t>(&out, kVersion);
  Append<uint32_t>(&out, static_cast<uint32_t>(num_timesteps_));
  Append<uint64_t>(&out, run_seed_);
  Append<int64_t>(&out, num_checkpoints());
  Append<int64_t>(&out, num_samples());
  Append<int64_t>(&out, batch_size_);
  for (int64_t step : checkpoint_steps_) Append<int64_t>(&out, step);
  for (int64_t id : sample_ids_) Append<int64_t>(&out, id);
  for (const ReplayRecord& r : records_) {
    Append<int64_t>(&out, r.step);
    Append<int32_t>(&out, r.batch_position);
    Append<int32_t>(&out, r.timestep);
  }
  out += Sha256Hex(out);
  return out;
}

absl::StatusOr<ReplayLog> ReplayLog::Parse(absl::string_view bytes,
                                           absl::string_view name) {
  auto data_loss = [&](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("replay log ", name, ": ", what));
  };
  if (bytes.size() < kHeaderSize + kDigestSize ||
      bytes.substr(0, kMagicSize) != absl::string_view(kMagic, kMagicSize)) {
    return data_loss("not a replay log (bad magic or truncated header)");
  }
  const uint32_t version = ReadAt<uint32_t>(bytes, 8);
  if (version != kVersion) {
    return data_loss(absl::StrCat("unsupported version ", version,
                                  " (this build reads ", kVersion, ")"));
  }
  const uint32_t num_timesteps = ReadAt<uint32_t>(bytes, 12);
  const uint64_t run_seed = ReadAt<uint64_t>(bytes, 16);
  const int64_t num_checkpoints = ReadAt<int64_t>(bytes, 24);
  const int64_t num_samples = ReadAt<int64_t>(bytes, 32);
  const int64_t batch_size = ReadAt<int64_t>(bytes, 40);
  constexpr int64_t kMaxCount = int64_t{1} << 40;
  if (num_checkpoints < 0 || num_samples < 0 || num_checkpoints > kMaxCount ||
      num_samples > kMaxCount ||
      (num_checkpoints > 0 && num_samples > kMaxCount / num_checkpoints)) {
    return data_loss(
        absl::StrCat("bad sizes C = ", num_checkpoints, ", N = ", num_samples));
  }
  const uint64_t expected =
      kHeaderSize + 8 * static_cast<uint64_t>(num_checkpoints + num_samples) +
      kRecordSize * static_cast<uint64_t>(num_checkpoints * num_samples) +
      kDigestSize;
  if (bytes.size() != expected) {
    return data_loss(absl::StrCat("size ", bytes.size(), " bytes, expected ",
                                  expected, " for C = ", num_checkpoints,
                                  ", N = ", num_samples));
  }
  const absl::string_view body = bytes.substr(0, expected - kDigestSize);
  if (Sha256Hex(body) != bytes.substr(expected - kDigestSize)) {
    return data_loss("checksum mismatch (file damaged)");
  }
  size_t offset = kHeaderSize;
  std::vector<int64_t> checkpoint_steps(num_checkpoints);
  for (int64_t& step : checkpoint_steps) {
    step = ReadAt<int64_t>(bytes, offset);
    offset += 8;
  }
  std::vector<int64_t> sample_ids(num_samples);
  for (int64_t& id : sample_ids) {
    id = ReadAt<int64_t>(bytes, offset);
    offset += 8;
  }
  absl::StatusOr<ReplayLog> log =
      Create(run_seed, static_cast<int>(num_timesteps), batch_size,
             std::move(checkpoint_steps), std::move(sample_ids));
  if (!log.ok()) return data_loss(log.status().message());
  for (size_t i = 0; i < log->records_.size(); ++i) {
    ReplayRecord& r = log->records_[i];
    r.step = ReadAt<int64_t>(bytes, offset);
    r.batch_position = ReadAt<int32_t>(bytes, offset + 8);
    r.timestep = ReadAt<int32_t>(bytes, offset + 12);
    offset += kRecordSize;
    const bool consistent =
        r.seen() ? (r.batch_position >= 0 && r.batch_position < batch_size &&
                    r.timestep >= 0 &&
                    r.timestep < static_cast<int64_t>(num_timesteps))
                 : (r.step == -1 && r.batch_position == -1 && r.timestep == -1);
    if (!consistent) {
      return data_loss(absl::StrCat("record (c = ", i / num_samples, ", n = ",
                                    i % num_samples, ") is out of range"));
    }
  }
  return log;
}

absl::StatusOr<ReplayLog> ReplayLog::Load(const std::string& run_dir) {
  const std::string path = absl::StrCat(run_dir, "/", kReplayLogFile);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("replay log ", path, " does not exist or is unreadable"));
  }
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) {
    return absl::DataLossError(
        absl::StrCat("replay log ", path, ": read error"));
  }
  return Parse(content.str(), path);
}

}  // namespace retrace::model
