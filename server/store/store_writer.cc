#include "server/store/store_writer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "common/logging.h"
#include "common/sha256.h"
#include "common/status.h"
#include "server/store/layout.h"
#include "server/store/norm_stats.h"
#include "server/store/safetensors.h"
#include "server/store/shard_metadata.h"
#include "server/store/store_parts.h"

// Shards hold the in-memory little-endian representation directly.
static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
    "the store format is little-endian; big-endian hosts are not supported");

namespace retrace::store {
namespace {

constexpr char kNormStatsKey[] = "norm_stats";
constexpr int64_t kMaxReserveBytes = int64_t(1) << 30;

// What Create found in one shard file of an unfinished build.
struct InspectedShard {
  int64_t index = 0;
  std::string file;
  bool complete = false;       // a full shard of this spec that verified
  std::string discard_reason;  // when !complete
  std::string file_sha256;
  std::unique_ptr<MappedFile> map;
  SafetensorsHeader parsed;
};

}  // namespace

StoreWriter::StoreWriter(Env* env, std::string dir, StoreSpec spec,
                         std::string spec_sha256,
                         std::unique_ptr<DirectoryLock> lock,
                         std::unique_ptr<FileLock> part_lock,
                         const PartRange* part)
    : env_(env),
      dir_(std::move(dir)),
      spec_(std::move(spec)),
      spec_sha256_(std::move(spec_sha256)),
      lock_(std::move(lock)),
      part_lock_(std::move(part_lock)),
      part_(part == nullptr ? nullptr : new PartRange(*part)),
      row_elements_(RowElements(spec_.num_checkpoints(), spec_.num_slots(),
                                spec_.projection.dim)),
      slots_per_sample_(spec_.num_checkpoints() * spec_.num_slots()) {}

StoreWriter::~StoreWriter() = default;

absl::StatusOr<std::unique_ptr<StoreWriter>> StoreWriter::Create(
    const std::string& dir, const StoreSpec& spec, Env* env) {
  return CreateImpl(dir, spec, nullptr, env);
}

int64_t StoreWriter::first_shard() const {
  return part_ == nullptr ? 0 : part_->first_shard;
}

int64_t StoreWriter::CompleteShardCount(int64_t index) const {
  if (part_ == nullptr) return spec_.samples_per_shard;
  return ShardSampleCount(index, part_->total_samples, spec_.samples_per_shard);
}

absl::StatusOr<std::unique_ptr<StoreWriter>> StoreWriter::CreateImpl(
    const std::string& dir, const StoreSpec& spec, const PartRange* part,
    Env* env) {
  RETURN_IF_ERROR(Annotate(spec.Validate(), "store spec"));
  ASSIGN_OR_RETURN(std::string spec_sha256, spec.Sha256());
  RETURN_IF_ERROR(env->CreateDirectories(dir));
  // Parts share the directory; each excludes only its own twin. The
  // directory lock comes first so that a join, which holds it exclusively
  // while it removes lock files, cannot race with a part creating one.
  ASSIGN_OR_RETURN(
      std::unique_ptr<DirectoryLock> lock,
      part == nullptr
          ? DirectoryLock::Acquire(dir, DirectoryLock::Mode::kExclusive,
                                   kStoreLockHolderExclusive)
          : DirectoryLock::Acquire(dir, DirectoryLock::Mode::kShared,
                                   kStoreLockHolderShared));
  std::unique_ptr<FileLock> part_lock;
  if (part != nullptr) {
    ASSIGN_OR_RETURN(
        part_lock,
        FileLock::Acquire(absl::StrCat(
            dir, "/", PartLockFileName(part->part_index, part->num_parts))));
  }
  std::unique_ptr<StoreWriter> writer(
      new StoreWriter(env, dir, spec, std::move(spec_sha256), std::move(lock),
                      std::move(part_lock), part));
  RETURN_IF_ERROR(writer->Recover());
  return writer;
}

absl::Status StoreWriter::Recover() {
  ASSIGN_OR_RETURN(std::vector<std::string> names, env_->ListDirectory(dir_));
  // A part only ever looks at, and removes, files of its own range: other
  // parts may be writing theirs at this very moment.
  const int64_t begin_shard = first_shard();
  const int64_t end_shard =
      part_ == nullptr ? std::numeric_limits<int64_t>::max() : part_->end_shard;
  auto in_range = [&](int64_t index) {
    return index >= begin_shard && index < end_shard;
  };
  const std::string record_name =
      part_ == nullptr
          ? std::string()
          : PartRecordFileName(part_->part_index, part_->num_parts);
  std::map<int64_t, std::string> shard_files;
  std::vector<std::string> leftovers;
  for (const std::string& name : names) {
    if (name == kManifestFileName) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir_, "/", kManifestFileName,
                       ": the directory already holds a finished store; open "
                       "it with StoreReader, "
                       "or remove it to rebuild"));
    }
    int64_t index, part_index, num_parts;
    if (part_ == nullptr &&
        (ParsePartRecordFileName(name, &part_index, &num_parts) ||
         ParsePartLockFileName(name, &part_index, &num_parts))) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir_, "/", name,
          ": the directory holds a store built in parts; join them with "
          "JoinStoreParts, or remove the part files to build the whole store "
          "here"));
    }
    if (part_ != nullptr) {
      // The part's earlier record goes first: a record must never list
      // shards that are about to be removed. Finish writes it again.
      if (name == record_name ||
          name == absl::StrCat(record_name, kTempSuffix)) {
        leftovers.insert(leftovers.begin(), name);
      } else if (absl::EndsWith(name, kTempSuffix) &&
                 ParseShardFileName(
                     name.substr(0, name.size() - std::strlen(kTempSuffix)),
                     &index) &&
                 in_range(index)) {
        leftovers.push_back(name);
      } else if (ParseShardFileName(name, &index) && in_range(index)) {
        shard_files[index] = name;
      }
    } else if (absl::EndsWith(name, kTempSuffix) &&
               (absl::StartsWith(name, "shard-") ||
                name == absl::StrCat(kManifestFileName, kTempSuffix))) {
      leftovers.push_back(name);
    } else if (ParseShardFileName(name, &index)) {
      shard_files[index] = name;
    }
  }

  // First inspect everything, so that a foreign shard stops us before any
  // file is removed.
  const int64_t shard_size = spec_.samples_per_shard;
  const bool collect_norms = part_ == nullptr;
  std::vector<InspectedShard> inspected;
  for (const auto& [index, name] : shard_files) {
    InspectedShard s;
    s.index = index;
    s.file = name;
    const std::string path = absl::StrCat(dir_, "/", name);
    absl::StatusOr<std::unique_ptr<MappedFile>> map = env_->MapFile(path);
    if (!map.ok()) return map.status();
    s.map = std::move(*map);
    absl::StatusOr<SafetensorsHeader> header =
        ParseSafetensorsHeader(s.map->data(), s.map->size(), path);
    if (!header.ok()) {
      s.discard_reason = std::string(header.status().message());
      inspected.push_back(std::move(s));
      continue;
    }
    s.parsed = std::move(*header);
    const std::string theirs = MetadataOr(s.parsed, kMetaSpecSha256);
    if (MetadataOr(s.parsed, kMetaFormat) != kFormatName ||
        theirs != spec_sha256_) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": written by a build with a different spec (", kMetaSpecSha256,
          " '", theirs, "', this build '", spec_sha256_,
          "'); remove the unfinished build or build into another directory"));
    }
    const int64_t count = CompleteShardCount(index);
    ShardGeometry g{count,
                    spec_.num_checkpoints(),
                    spec_.num_slots(),
                    spec_.projection.dim,
                    spec_.dtype,
                    spec_.buckets.replay};
    if (MetadataOr(s.parsed, kMetaShardIndex) != absl::StrCat(index) ||
        MetadataOr(s.parsed, kMetaFirst) != absl::StrCat(index * shard_size)) {
      s.discard_reason =
          "shard index or first sample disagree with the file name";
    } else if (!SameTensors(s.parsed.tensors, ShardTensors(g))) {
      s.discard_reason =
          part_ == nullptr
              ? "not a full shard (the last shard of an unfinished Finish)"
              : "not a complete shard (of an unfinished build)";
    } else {
      retrace::Sha256 file_hash, data_hash;
      file_hash.Update(s.map->data(), size_t(s.parsed.data_start));
      const uint8_t* data = s.map->data() + s.parsed.data_start;
      file_hash.Update(data, size_t(s.parsed.data_size));
      data_hash.Update(data, size_t(s.parsed.data_size));
      s.file_sha256 = file_hash.HexDigest();
      std::string actual = data_hash.HexDigest();
      if (actual != MetadataOr(s.parsed, kMetaDataSha256)) {
        s.discard_reason = absl::StrCat(
            "data checksum mismatch: metadata says ",
            MetadataOr(s.parsed, kMetaDataSha256), ", data has ", actual);
      } else {
        s.complete = true;
      }
    }
    inspected.push_back(std::move(s));
  }

  // Keep the contiguous prefix of complete shards; everything after it is
  // rebuilt, so that shard i always holds the same samples.
  for (InspectedShard& s : inspected) {
    const bool keep = s.complete && s.index == begin_shard + resumed_shards_;
    if (!keep) {
      RETRACE_LOG(WARNING) << dir_ << "/" << s.file
                           << ": removed, will be rebuilt: "
                           << (s.complete ? "follows a missing or damaged shard"
                                          : s.discard_reason);
      leftovers.push_back(s.file);
      continue;
    }
    const SafetensorsHeader& h = s.parsed;
    const uint8_t* data = s.map->data() + h.data_start;
    const TensorEntry* norms = h.Find(kNormsTensor);
    const TensorEntry* ids = h.Find(kSampleIdsTensor);
    const int64_t count = CompleteShardCount(s.index);
    if (collect_norms) {
      const size_t first_norm = all_norms_.size();
      all_norms_.resize(first_norm + size_t(count * slots_per_sample_));
      std::memcpy(all_norms_.data() + first_norm, data + norms->begin,
                  size_t(norms->end - norms->begin));
    }
    for (int64_t i = 0; i < count; ++i) {
      int64_t id;
      std::memcpy(&id, data + ids->begin + 8 * i, 8);
      const int64_t global = s.index * shard_size + i;
      auto [it, inserted] = index_of_id_.emplace(id, global);
      if (!inserted) {
        return absl::FailedPreconditionError(
            absl::StrCat(dir_, "/", s.file, ": duplicate sample_id ", id,
                         " at sample indices ", it->second, " and ", global));
      }
    }
    shards_.push_back({s.file, s.index * shard_size, count, s.file_sha256});
    ++resumed_shards_;
  }
  inspected.clear();  // unmaps before removal

  for (const std::string& name : leftovers)
    RETURN_IF_ERROR(RemoveFile(env_, dir_, name));
  if (!leftovers.empty()) RETURN_IF_ERROR(env_->SyncDirectory(dir_));
  next_sample_ = (begin_shard + resumed_shards_) * shard_size;
  if (part_ != nullptr)
    next_sample_ = std::min(next_sample_, part_->total_samples);
  if (resumed_shards_ > 0) {
    RETRACE_LOG(INFO) << dir_ << ": resuming after " << resumed_shards_
                      << " complete shards at sample " << next_sample_;
  }
  return absl::OkStatus();
}

absl::Status StoreWriter::CheckWritable() const {
  if (finished_) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir_, part_ == nullptr ? ": the store is finished"
                                            : ": the part is finished"));
  }
  if (!failure_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir_, ": an earlier write failed (", failure_.message(),
                     "); create a new StoreWriter to resume"));
  }
  return absl::OkStatus();
}

absl::Status StoreWriter::Append(const SampleRecord& sample) {
  RETURN_IF_ERROR(CheckWritable());
  const int64_t n = next_sample_;
  if (part_ != nullptr && n >= part_->end_sample) {
    return absl::OutOfRangeError(
        absl::StrCat("sample ", n, ": part ", part_->part_index, " of ",
                     part_->num_parts, " holds samples [", part_->first_sample,
                     ", ", part_->end_sample, "); all of them were appended"));
  }
  const int64_t C = spec_.num_checkpoints();
  auto invalid = [&](auto&&... parts) {
    return absl::InvalidArgumentError(
        absl::StrCat("sample ", n, ": ", parts...));
  };
  if (int64_t(sample.vectors.size()) != row_elements_) {
    return invalid("vectors has ", sample.vectors.size(), " values, expected ",
                   row_elements_, " (C x S x D = ", C, " x ", spec_.num_slots(),
                   " x ", spec_.projection.dim, ")");
  }
  if (int64_t(sample.norms.size()) != slots_per_sample_) {
    return invalid("norms has ", sample.norms.size(), " values, expected ",
                   slots_per_sample_, " (C x S)");
  }
  const int64_t expected_timesteps = spec_.buckets.replay ? C : 0;
  if (int64_t(sample.train_timesteps.size()) != expected_timesteps) {
    return invalid(
        "train_timesteps has ", sample.train_timesteps.size(),
        " values, expected ", expected_timesteps,
        spec_.buckets.replay ? " (one per checkpoint)" : " (no replay slot)");
  }
  for (size_t i = 0; i < sample.vectors.size(); ++i) {
    if (!std::isfinite(sample.vectors[i])) {
      return invalid("vectors[", i, "] is not finite (", sample.vectors[i],
                     ")");
    }
  }
  for (size_t i = 0; i < sample.norms.size(); ++i) {
    if (!std::isfinite(sample.norms[i]) || sample.norms[i] < 0) {
      return invalid("norms[", i, "] must be finite and >= 0, got ",
                     sample.norms[i]);
    }
  }
  if (!std::isfinite(sample.self_influence_tracin) ||
      !std::isfinite(sample.self_influence_retrac)) {
    return invalid("self_influence is not finite");
  }
  for (size_t c = 0; c < sample.train_timesteps.size(); ++c) {
    const int32_t t = sample.train_timesteps[c];
    if (t < 0 || t >= spec_.noise_schedule.timesteps) {
      return invalid("train_timesteps[", c, "] = ", t, " is outside [0, ",
                     spec_.noise_schedule.timesteps, ")");
    }
  }
  if (auto it = index_of_id_.find(sample.sample_id); it != index_of_id_.end()) {
    return invalid("sample_id ", sample.sample_id,
                   " is already used by sample ", it->second);
  }

  const int64_t element_size = kernels::DTypeSize(spec_.dtype);
  const int64_t row_bytes = row_elements_ * element_size;
  const size_t offset = vectors_.size();
  try {
    if (buffered_ == 0) {
      // Reserve the whole shard up front (capped: a huge shard grows instead)
      // so that filling it does not copy it repeatedly.
      vectors_.reserve(size_t(
          std::min(spec_.samples_per_shard * row_bytes, kMaxReserveBytes)));
    }
    vectors_.resize(offset + size_t(row_bytes));
  } catch (const std::exception& e) {  // bad_alloc, length_error
    return absl::ResourceExhaustedError(
        absl::StrCat("sample ", n, ": cannot grow the shard buffer to ",
                     int64_t(offset) + row_bytes, " bytes (", e.what(),
                     "); lower samples_per_shard"));
  }
  uint8_t* dst = vectors_.data() + offset;
  // Finite floats beyond the 16-bit formats' range would become infinities.
  int64_t overflow = -1;
  switch (spec_.dtype) {
    case kernels::DType::kF32:
      std::memcpy(dst, sample.vectors.data(),
                  sample.vectors.size() * sizeof(float));
      break;
    case kernels::DType::kF16:
      for (size_t i = 0; i < sample.vectors.size(); ++i) {
        const uint16_t h = kernels::FloatToHalf(sample.vectors[i]);
        if ((h & 0x7fffu) == 0x7c00u && overflow < 0) overflow = int64_t(i);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
    case kernels::DType::kBF16:
      for (size_t i = 0; i < sample.vectors.size(); ++i) {
        const uint16_t h = kernels::FloatToBf16(sample.vectors[i]);
        if ((h & 0x7fffu) == 0x7f80u && overflow < 0) overflow = int64_t(i);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
  }
  if (overflow >= 0) {
    vectors_.resize(offset);
    return invalid("vectors[", overflow,
                   "] = ", sample.vectors[size_t(overflow)], " overflows ",
                   kernels::DTypeName(spec_.dtype));
  }
  index_of_id_.emplace(sample.sample_id, n);
  norms_.insert(norms_.end(), sample.norms.begin(), sample.norms.end());
  if (part_ == nullptr) {
    all_norms_.insert(all_norms_.end(), sample.norms.begin(),
                      sample.norms.end());
  }
  sample_ids_.push_back(sample.sample_id);
  labels_.push_back(sample.label);
  self_influence_.push_back(sample.self_influence_tracin);
  self_influence_.push_back(sample.self_influence_retrac);
  train_timesteps_.insert(train_timesteps_.end(),
                          sample.train_timesteps.begin(),
                          sample.train_timesteps.end());
  ++buffered_;
  ++next_sample_;
  if (buffered_ == CompleteShardCount(first_shard() + int64_t(shards_.size())))
    return WriteBufferedShard();
  return absl::OkStatus();
}

absl::Status StoreWriter::WriteBufferedShard() {
  const int64_t index = first_shard() + int64_t(shards_.size());
  const int64_t first = index * spec_.samples_per_shard;
  ShardGeometry g{buffered_,         spec_.num_checkpoints(),
                  spec_.num_slots(), spec_.projection.dim,
                  spec_.dtype,       spec_.buckets.replay};
  auto bytes_of = [](const auto& v) {
    return absl::string_view(reinterpret_cast<const char*>(v.data()),
                             v.size() * sizeof(v[0]));
  };
  const std::map<std::string, absl::string_view> buffers = {
      {kVectorsTensor, bytes_of(vectors_)},
      {kNormsTensor, bytes_of(norms_)},
      {kSampleIdsTensor, bytes_of(sample_ids_)},
      {kLabelsTensor, bytes_of(labels_)},
      {kSelfInfluenceTensor, bytes_of(self_influence_)},
      {kTrainTimestepsTensor, bytes_of(train_timesteps_)}};
  std::vector<absl::string_view> pieces(1);  // [0] is the header, filled below
  retrace::Sha256 data_hash;
  for (const TensorEntry& t : ShardTensors(g)) {
    absl::string_view piece = buffers.at(t.name);
    if (int64_t(piece.size()) != t.end - t.begin) {
      return absl::InternalError(
          absl::StrCat("store writer: tensor '", t.name, "' holds ",
                       piece.size(), " bytes, layout says ", t.end - t.begin));
    }
    data_hash.Update(piece.data(), piece.size());
    pieces.push_back(piece);
  }
  const std::map<std::string, std::string> metadata = {
      {kMetaFormat, kFormatName},
      {kMetaFormatVersion, absl::StrCat(kFormatVersion)},
      {kMetaShardIndex, absl::StrCat(index)},
      {kMetaFirst, absl::StrCat(first)},
      {kMetaSpecSha256, spec_sha256_},
      {kMetaDataSha256, data_hash.HexDigest()}};
  absl::StatusOr<std::string> header =
      EncodeSafetensorsHeader(ShardTensors(g), metadata);
  if (!header.ok()) {
    failure_ = header.status();
    return failure_;
  }
  pieces[0] = *header;
  retrace::Sha256 file_hash;
  for (absl::string_view piece : pieces)
    file_hash.Update(piece.data(), piece.size());

  const std::string name = ShardFileName(index);
  absl::Status written = WriteFileAtomically(env_, dir_, name, pieces);
  if (!written.ok()) {
    failure_ = written;
    return written;
  }
  shards_.push_back({name, first, buffered_, file_hash.HexDigest()});
  buffered_ = 0;
  vectors_.clear();
  norms_.clear();
  sample_ids_.clear();
  labels_.clear();
  self_influence_.clear();
  train_timesteps_.clear();
  return absl::OkStatus();
}

absl::StatusOr<Manifest> StoreWriter::Finish(
    const nlohmann::json& diagnostics) {
  RETURN_IF_ERROR(CheckWritable());
  if (!diagnostics.is_object()) {
    return absl::InvalidArgumentError("diagnostics must be a JSON object");
  }
  if (diagnostics.contains(kNormStatsKey)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "diagnostics: key '", kNormStatsKey, "' is reserved for the writer"));
  }
  if (buffered_ > 0) RETURN_IF_ERROR(WriteBufferedShard());

  Manifest manifest;
  manifest.spec = spec_;
  manifest.num_samples = next_sample_;
  manifest.shards = shards_;
  manifest.diagnostics = diagnostics;
  manifest.diagnostics[kNormStatsKey] = ComputeNormStats(
      all_norms_, next_sample_, spec_.num_checkpoints(), spec_.num_slots());
  ASSIGN_OR_RETURN(manifest.store_id,
                   ComputeStoreId(spec_, next_sample_, shards_));
  RETURN_IF_ERROR(manifest.Validate());
  ASSIGN_OR_RETURN(std::string text, manifest.Serialize());
  const absl::string_view piece = text;
  absl::Status written =
      WriteFileAtomically(env_, dir_, kManifestFileName, {&piece, 1});
  if (!written.ok()) {
    // The rename may have happened (e.g. the directory fsync failed): the
    // caller hears of a failure, so readers must not see a finished store.
    RemoveFile(env_, dir_, kManifestFileName).IgnoreError();
    failure_ = written;
    return written;
  }
  finished_ = true;
  return manifest;
}

}  // namespace retrace::store
