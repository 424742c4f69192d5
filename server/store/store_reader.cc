#include "server/store/store_reader.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/status.h"
#include "server/store/layout.h"
#include "server/store/listed_shard.h"
#include "server/store/safetensors.h"
#include "server/store/shard_metadata.h"
#include "server/store/store_parts.h"

namespace retrace::store {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

StoreReader::StoreReader(std::string dir, Manifest manifest)
    : dir_(std::move(dir)), manifest_(std::move(manifest)) {}

StoreReader::~StoreReader() = default;

int64_t StoreReader::row_bytes() const {
  return RowBytes(num_checkpoints(), num_slots(), dim(), dtype());
}

int64_t StoreReader::total_vector_bytes() const {
  return served_samples() * row_bytes();
}

absl::StatusOr<std::unique_ptr<StoreReader>> StoreReader::Open(
    const std::string& dir, const Options& options) {
  const std::string manifest_path = absl::StrCat(dir, "/", kManifestFileName);
  absl::StatusOr<std::string> text = options.env->ReadFile(manifest_path);
  if (absl::IsNotFound(text.status())) {
    return absl::NotFoundError(absl::StrCat(
        manifest_path,
        ": missing (not a retrace store, or its build did not finish)"));
  }
  if (!text.ok()) return text.status();
  ASSIGN_OR_RETURN(Manifest manifest, Manifest::Parse(*text, manifest_path));
  absl::StatusOr<std::string> spec_sha256 = manifest.spec.Sha256();
  if (!spec_sha256.ok()) return Annotate(spec_sha256.status(), manifest_path);
  if (options.num_parts < 1 || options.num_parts > kMaxParts ||
      options.part_index < 0 || options.part_index >= options.num_parts) {
    return absl::InvalidArgumentError(
        absl::StrCat("store part ", options.part_index, "/", options.num_parts,
                     " is not a part: need 0 <= i < n <= ", kMaxParts));
  }
  std::unique_ptr<StoreReader> reader(
      new StoreReader(dir, std::move(manifest)));
  const std::vector<ShardInfo>& files = reader->manifest_.shards;
  const int64_t j = int64_t(files.size());
  const int64_t first = options.part_index * j / options.num_parts;
  const int64_t end = (options.part_index + 1) * j / options.num_parts;
  reader->part_index_ = options.part_index;
  reader->num_parts_ = options.num_parts;
  // A part without files (more parts than files) serves an empty range at
  // the place where its files would start.
  reader->served_first_ =
      first < j ? files[size_t(first)].first : reader->manifest_.num_samples;
  reader->served_end_ =
      end < j ? files[size_t(end)].first : reader->manifest_.num_samples;
  for (int64_t i = first; i < end; ++i) {
    RETURN_IF_ERROR(reader->OpenShard(i, *spec_sha256, options));
  }
  RETURN_IF_ERROR(reader->CheckDuplicateIds());
  return reader;
}

absl::Status StoreReader::OpenShard(int64_t index,
                                    const std::string& spec_sha256,
                                    const Options& options) {
  const ShardInfo& info = manifest_.shards[size_t(index)];
  const std::string path = absl::StrCat(dir_, "/", info.file);
  const std::string field =
      absl::StrCat(kManifestFileName, " shards[", index, "]");
  ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map,
                   MapListedShard(options.env, path, field));
  const MappedFile& file = *map;
  ASSIGN_OR_RETURN(SafetensorsHeader header,
                   ParseSafetensorsHeader(file.data(), file.size(), path));
  if (options.verify_checksums) {
    RETURN_IF_ERROR(VerifyShardChecksum(file, field, info.sha256));
  }

  const StoreSpec& spec = manifest_.spec;
  const int64_t n = info.count, C = spec.num_checkpoints(),
                S = spec.num_slots();
  struct Expected {
    const char* name;
    std::string dtype;
    std::vector<int64_t> shape;
    const char* source;  // which manifest fields determine it
  };
  std::vector<Expected> expected = {
      {kVectorsTensor,
       kernels::DTypeName(spec.dtype),
       {n, C, S, spec.projection.dim},
       "count, model.checkpoints, buckets, projection.dim, dtype"},
      {kNormsTensor, "F32", {n, C, S}, "count, model.checkpoints, buckets"},
      {kSampleIdsTensor, "I64", {n}, "count"},
      {kLabelsTensor, "I32", {n}, "count"},
      {kSelfInfluenceTensor, "F32", {n, kSelfInfluenceColumns}, "count"}};
  if (spec.buckets.replay) {
    expected.push_back(
        {kTrainTimestepsTensor, "I32", {n, C}, "count, model.checkpoints"});
  } else if (header.Find(kTrainTimestepsTensor) != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": unexpected tensor '", kTrainTimestepsTensor, "' (",
        kManifestFileName, " field 'buckets.replay' is false)"));
  }

  SampleBlock block;
  block.shard = index;
  block.first = info.first;
  block.count = n;
  for (const Expected& e : expected) {
    const TensorEntry* t = header.Find(e.name);
    if (t == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": tensor '", e.name, "' missing"));
    }
    if (t->dtype != e.dtype) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": tensor '", e.name, "' has dtype ", t->dtype,
                       ", ", kManifestFileName, " implies ", e.dtype));
    }
    if (t->shape != e.shape) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": tensor '", e.name, "' has shape ", ShapeString(t->shape),
          ", ", kManifestFileName, " implies ", ShapeString(e.shape), " (from ",
          field, ".", e.source, ")"));
    }
    const uint8_t* p = file.data() + header.data_start + t->begin;
    const int64_t element_size = SafetensorsDTypeSize(t->dtype);
    // Typed pointers into the map must be aligned (the mapping itself is
    // page-aligned, so this is a property of the file's offsets).
    if (reinterpret_cast<uintptr_t>(p) % uintptr_t(element_size) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": tensor '", e.name, "' starts at file offset ",
                       header.data_start + t->begin,
                       ", not a multiple of its element size ", element_size));
    }
    const std::string name = e.name;
    if (name == kVectorsTensor) {
      block.vectors = p;
    } else if (name == kNormsTensor) {
      block.norms = reinterpret_cast<const float*>(p);
    } else if (name == kSampleIdsTensor) {
      block.sample_ids = reinterpret_cast<const int64_t*>(p);
    } else if (name == kLabelsTensor) {
      block.labels = reinterpret_cast<const int32_t*>(p);
    } else if (name == kSelfInfluenceTensor) {
      block.self_influence = reinterpret_cast<const float*>(p);
    } else if (name == kTrainTimestepsTensor) {
      block.train_timesteps = reinterpret_cast<const int32_t*>(p);
    }
  }
  // Shards written by retrace record the sha256 of the build's spec; the
  // manifest has no checksum of its own, so this is what catches a changed
  // spec field that no tensor shape depends on (a checkpoint's sha256, the
  // projection seed). Other writers may leave the metadata out.
  const std::string recorded = MetadataOr(header, kMetaSpecSha256);
  if (!recorded.empty() && recorded != spec_sha256) {
    return absl::DataLossError(absl::StrCat(
        path, ": metadata ", kMetaSpecSha256, " is ", recorded,
        " but the spec in ", kManifestFileName, " hashes to ", spec_sha256,
        " (", kManifestFileName, " or the shard was changed after the build)"));
  }
  maps_.push_back(std::move(map));
  shards_.push_back(block);
  return absl::OkStatus();
}

absl::Status StoreReader::CheckDuplicateIds() const {
  std::unordered_map<int64_t, int64_t> index_of_id;
  index_of_id.reserve(size_t(num_samples()));
  for (const SampleBlock& block : shards_) {
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t global = block.first + i;
      auto [it, inserted] = index_of_id.emplace(block.sample_ids[i], global);
      if (!inserted) {
        // ShardOf cannot fail: both indices are inside the store.
        const int64_t other_shard = *ShardOf(it->second);
        return absl::FailedPreconditionError(absl::StrCat(
            dir_, ": duplicate sample_id ", block.sample_ids[i],
            " at sample indices ", it->second, " (",
            manifest_.shards[size_t(other_shard)].file, ") and ", global, " (",
            manifest_.shards[size_t(block.shard)].file, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> StoreReader::ShardOf(int64_t sample) const {
  if (sample < served_first_ || sample >= served_end_) {
    return absl::OutOfRangeError(
        absl::StrCat("sample ", sample, " is outside the served [",
                     served_first_, ", ", served_end_, ")"));
  }
  auto it = std::upper_bound(
      shards_.begin(), shards_.end(), sample,
      [](int64_t s, const SampleBlock& block) { return s < block.first; });
  return int64_t(it - shards_.begin()) - 1;
}

SampleBlock StoreReader::Slice(const SampleBlock& block, int64_t offset,
                               int64_t count) const {
  const int64_t C = num_checkpoints(), S = num_slots();
  SampleBlock out = block;
  out.first = block.first + offset;
  out.count = count;
  out.vectors = static_cast<const uint8_t*>(block.vectors) +
                RowByteOffset(offset, C, S, dim(), dtype());
  out.norms = block.norms + offset * C * S;
  out.sample_ids = block.sample_ids + offset;
  out.labels = block.labels + offset;
  out.self_influence = block.self_influence + offset * kSelfInfluenceColumns;
  if (block.train_timesteps != nullptr)
    out.train_timesteps = block.train_timesteps + offset * C;
  return out;
}

absl::StatusOr<std::vector<SampleBlock>> StoreReader::Range(int64_t begin,
                                                            int64_t end) const {
  if (begin < served_first_ || begin > end || end > served_end_) {
    return absl::OutOfRangeError(absl::StrCat(
        "sample range [", begin, ", ", end, ") is not inside the served [",
        served_first_, ", ", served_end_, ")"));
  }
  std::vector<SampleBlock> blocks;
  if (begin == end) return blocks;
  ASSIGN_OR_RETURN(int64_t shard, ShardOf(begin));
  for (int64_t s = begin; s < end; ++shard) {
    const SampleBlock& block = shards_[size_t(shard)];
    const int64_t offset = s - block.first;
    const int64_t count = std::min(end, block.first + block.count) - s;
    blocks.push_back(Slice(block, offset, count));
    s += count;
  }
  return blocks;
}

absl::StatusOr<SampleBlock> StoreReader::Sample(int64_t sample) const {
  ASSIGN_OR_RETURN(int64_t shard, ShardOf(sample));
  const SampleBlock& block = shards_[size_t(shard)];
  return Slice(block, sample - block.first, 1);
}

}  // namespace retrace::store
