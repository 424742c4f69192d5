#include "server/store/store_parts.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <unordered_map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status.h"
#include "server/store/layout.h"
#include "server/store/listed_shard.h"
#include "server/store/norm_stats.h"
#include "server/store/safetensors.h"
#include "server/store/shard_metadata.h"

namespace retrace::store {
namespace {

using nlohmann::json;

constexpr char kNormStatsKey[] = "norm_stats";
constexpr char kRecordSuffix[] = ".json";
constexpr char kLockSuffix[] = ".lock";

std::string PartFileName(int64_t part_index, int64_t num_parts,
                         const char* suffix) {
  return absl::StrFormat("part-%04d-of-%04d%s", part_index, num_parts, suffix);
}

// Inverse of PartFileName for one suffix; the round trip rejects names with
// extra leading zeros, signs or spaces.
bool ParsePartFileName(const std::string& name, const char* suffix,
                       int64_t* part_index, int64_t* num_parts) {
  constexpr absl::string_view kPrefix = "part-", kOf = "-of-";
  if (!absl::StartsWith(name, kPrefix) || !absl::EndsWith(name, suffix))
    return false;
  const std::string middle = name.substr(
      kPrefix.size(), name.size() - kPrefix.size() - std::strlen(suffix));
  const size_t of = middle.find(kOf.data(), 0, kOf.size());
  if (of == std::string::npos) return false;
  const std::string first = middle.substr(0, of);
  const std::string second = middle.substr(of + kOf.size());
  for (const std::string* digits : {&first, &second}) {
    if (digits->empty() || digits->size() > 12) return false;
    for (char ch : *digits) {
      if (ch < '0' || ch > '9') return false;
    }
  }
  if (!absl::SimpleAtoi(first, part_index) ||
      !absl::SimpleAtoi(second, num_parts)) {
    return false;
  }
  return *part_index < *num_parts &&
         PartFileName(*part_index, *num_parts, suffix) == name;
}

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char ch : s) {
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
  }
  return true;
}

absl::Status RecordFieldError(absl::string_view source, absl::string_view field,
                              absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": field '", field, "' ", what));
}

absl::StatusOr<int64_t> IntField(const json& object, absl::string_view source,
                                 const std::string& prefix,
                                 const std::string& name) {
  const std::string field = prefix.empty() ? name : prefix + "." + name;
  auto it = object.find(name);
  if (it == object.end()) return RecordFieldError(source, field, "missing");
  if (!it->is_number_integer())
    return RecordFieldError(source, field, "must be an integer");
  if (it->is_number_unsigned() &&
      it->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) {
    return RecordFieldError(source, field, "is too large");
  }
  return it->get<int64_t>();
}

absl::StatusOr<std::string> StringField(const json& object,
                                        absl::string_view source,
                                        const std::string& prefix,
                                        const std::string& name) {
  const std::string field = prefix.empty() ? name : prefix + "." + name;
  auto it = object.find(name);
  if (it == object.end()) return RecordFieldError(source, field, "missing");
  if (!it->is_string())
    return RecordFieldError(source, field, "must be a string");
  return it->get<std::string>();
}

}  // namespace

// --- the split ---

bool PartRange::operator==(const PartRange& o) const {
  return part_index == o.part_index && num_parts == o.num_parts &&
         total_samples == o.total_samples &&
         samples_per_shard == o.samples_per_shard &&
         first_shard == o.first_shard && end_shard == o.end_shard &&
         first_sample == o.first_sample && end_sample == o.end_sample;
}

absl::StatusOr<PartRange> ComputePartRange(int64_t total_samples,
                                           int64_t samples_per_shard,
                                           int64_t part_index,
                                           int64_t num_parts) {
  // Both below 2^62, so that J * samples_per_shard <= N + samples_per_shard
  // stays below 2^63 even for values read from a damaged record.
  constexpr int64_t kMaxCount = int64_t(1) << 62;
  if (total_samples < 0 || total_samples > kMaxCount) {
    return absl::InvalidArgumentError(absl::StrCat(
        "total_samples must be in [0, 2^62], got ", total_samples));
  }
  if (samples_per_shard < 1 || samples_per_shard > kMaxCount) {
    return absl::InvalidArgumentError(absl::StrCat(
        "samples_per_shard must be in [1, 2^62], got ", samples_per_shard));
  }
  if (num_parts < 1 || num_parts > kMaxParts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_parts must be in [1, ", kMaxParts, "], got ", num_parts));
  }
  if (part_index < 0 || part_index >= num_parts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "part_index must be in [0, ", num_parts, "), got ", part_index));
  }
  PartRange r;
  r.part_index = part_index;
  r.num_parts = num_parts;
  r.total_samples = total_samples;
  r.samples_per_shard = samples_per_shard;
  const int64_t shards = NumShards(total_samples, samples_per_shard);
  // 128-bit products: shards * num_parts can pass 2^63 for huge stores.
  r.first_shard = int64_t(__int128(part_index) * shards / num_parts);
  r.end_shard = int64_t(__int128(part_index + 1) * shards / num_parts);
  r.first_sample = std::min(r.first_shard * samples_per_shard, total_samples);
  r.end_sample = std::min(r.end_shard * samples_per_shard, total_samples);
  return r;
}

std::string PartRecordFileName(int64_t part_index, int64_t num_parts) {
  return PartFileName(part_index, num_parts, kRecordSuffix);
}

std::string PartLockFileName(int64_t part_index, int64_t num_parts) {
  return PartFileName(part_index, num_parts, kLockSuffix);
}

bool ParsePartRecordFileName(const std::string& name, int64_t* part_index,
                             int64_t* num_parts) {
  return ParsePartFileName(name, kRecordSuffix, part_index, num_parts);
}

bool ParsePartLockFileName(const std::string& name, int64_t* part_index,
                           int64_t* num_parts) {
  return ParsePartFileName(name, kLockSuffix, part_index, num_parts);
}

// --- the part record ---

bool PartRecord::operator==(const PartRecord& o) const {
  return spec_sha256 == o.spec_sha256 && range == o.range && shards == o.shards;
}

std::string PartRecord::Serialize() const {
  json shard_list = json::array();
  for (const ShardInfo& s : shards) {
    shard_list.push_back({{"file", s.file},
                          {"first", s.first},
                          {"count", s.count},
                          {"sha256", s.sha256}});
  }
  // nlohmann::json objects are std::maps: keys come out sorted.
  const json j = {{"format", kPartFormatName},
                  {"format_version", kPartFormatVersion},
                  {"spec_sha256", spec_sha256},
                  {"num_samples", range.total_samples},
                  {"samples_per_shard", range.samples_per_shard},
                  {"part_index", range.part_index},
                  {"num_parts", range.num_parts},
                  {"first_shard", range.first_shard},
                  {"end_shard", range.end_shard},
                  {"first_sample", range.first_sample},
                  {"end_sample", range.end_sample},
                  {"shards", shard_list}};
  return j.dump(2) + "\n";
}

absl::StatusOr<PartRecord> PartRecord::Parse(absl::string_view text,
                                             absl::string_view source) {
  json j = json::parse(text.begin(), text.end(), nullptr,
                       /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not a JSON object"));
  }
  ASSIGN_OR_RETURN(std::string format, StringField(j, source, "", "format"));
  ASSIGN_OR_RETURN(int64_t version, IntField(j, source, "", "format_version"));
  if (format != kPartFormatName || version != kPartFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat(source, ": format '", format, "' version ", version,
                     " is not a part record this build reads ('",
                     kPartFormatName, "' version ", kPartFormatVersion, ")"));
  }
  PartRecord r;
  ASSIGN_OR_RETURN(r.spec_sha256, StringField(j, source, "", "spec_sha256"));
  if (!IsHex64(r.spec_sha256)) {
    return RecordFieldError(source, "spec_sha256",
                            "must be 64 lowercase hex digits");
  }
  ASSIGN_OR_RETURN(int64_t total, IntField(j, source, "", "num_samples"));
  ASSIGN_OR_RETURN(int64_t per_shard,
                   IntField(j, source, "", "samples_per_shard"));
  ASSIGN_OR_RETURN(int64_t index, IntField(j, source, "", "part_index"));
  ASSIGN_OR_RETURN(int64_t parts, IntField(j, source, "", "num_parts"));
  absl::StatusOr<PartRange> expected =
      ComputePartRange(total, per_shard, index, parts);
  if (!expected.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": ", expected.status().message()));
  }
  const std::pair<const char*, int64_t> bounds[] = {
      {"first_shard", expected->first_shard},
      {"end_shard", expected->end_shard},
      {"first_sample", expected->first_sample},
      {"end_sample", expected->end_sample}};
  for (const auto& [name, want] : bounds) {
    ASSIGN_OR_RETURN(int64_t got, IntField(j, source, "", name));
    if (got != want) {
      return RecordFieldError(
          source, name,
          absl::StrCat("is ", got, ", but part ", index, " of ", parts,
                       " of a store of ", total, " samples with ", per_shard,
                       " samples per shard has ", want));
    }
  }
  r.range = *expected;
  auto it = j.find("shards");
  if (it == j.end()) return RecordFieldError(source, "shards", "missing");
  if (!it->is_array())
    return RecordFieldError(source, "shards", "must be an array");
  for (size_t k = 0; k < it->size(); ++k) {
    const json& s = (*it)[k];
    const std::string prefix = absl::StrCat("shards[", k, "]");
    if (!s.is_object())
      return RecordFieldError(source, prefix, "must be an object");
    ShardInfo info;
    ASSIGN_OR_RETURN(info.file, StringField(s, source, prefix, "file"));
    ASSIGN_OR_RETURN(info.first, IntField(s, source, prefix, "first"));
    ASSIGN_OR_RETURN(info.count, IntField(s, source, prefix, "count"));
    ASSIGN_OR_RETURN(info.sha256, StringField(s, source, prefix, "sha256"));
    if (!IsHex64(info.sha256)) {
      return RecordFieldError(source, prefix + ".sha256",
                              "must be 64 lowercase hex digits");
    }
    r.shards.push_back(std::move(info));
  }
  return r;
}

// --- the part writer ---

StorePartWriter::StorePartWriter(PartRange range,
                                 std::unique_ptr<StoreWriter> writer)
    : range_(range), writer_(std::move(writer)) {}

StorePartWriter::~StorePartWriter() = default;

absl::StatusOr<std::unique_ptr<StorePartWriter>> StorePartWriter::Create(
    const std::string& dir, const StoreSpec& spec, int64_t part_index,
    int64_t num_parts, int64_t total_samples, Env* env) {
  RETURN_IF_ERROR(Annotate(spec.Validate(), "store spec"));
  ASSIGN_OR_RETURN(PartRange range,
                   ComputePartRange(total_samples, spec.samples_per_shard,
                                    part_index, num_parts));
  ASSIGN_OR_RETURN(std::unique_ptr<StoreWriter> writer,
                   StoreWriter::CreateImpl(dir, spec, &range, env));
  return std::unique_ptr<StorePartWriter>(
      new StorePartWriter(range, std::move(writer)));
}

int64_t StorePartWriter::next_sample() const { return writer_->next_sample(); }

int64_t StorePartWriter::resumed_shards() const {
  return writer_->resumed_shards();
}

const StoreSpec& StorePartWriter::spec() const { return writer_->spec(); }

absl::Status StorePartWriter::Append(const SampleRecord& sample) {
  return writer_->Append(sample);
}

absl::StatusOr<PartRecord> StorePartWriter::Finish() {
  StoreWriter& w = *writer_;
  RETURN_IF_ERROR(w.CheckWritable());
  if (w.next_sample_ != range_.end_sample) {
    return absl::FailedPreconditionError(absl::StrCat(
        w.dir_, ": part ", range_.part_index, " of ", range_.num_parts,
        " holds samples [", range_.first_sample, ", ", range_.end_sample,
        ") but only [", range_.first_sample, ", ", w.next_sample_,
        ") were appended (", range_.end_sample - w.next_sample_, " missing)"));
  }
  // Every shard was cut as soon as it was complete.
  if (w.buffered_ != 0) {
    return absl::InternalError(absl::StrCat(w.dir_, ": part writer holds ",
                                            w.buffered_, " unwritten samples"));
  }
  PartRecord record;
  record.spec_sha256 = w.spec_sha256_;
  record.range = range_;
  record.shards = w.shards_;
  const std::string text = record.Serialize();
  const absl::string_view piece = text;
  absl::Status written = WriteFileAtomically(
      w.env_, w.dir_, PartRecordFileName(range_.part_index, range_.num_parts),
      {&piece, 1});
  if (!written.ok()) {
    w.failure_ = written;
    return written;
  }
  w.finished_ = true;
  return record;
}

// --- the join ---

namespace {

// One verified part: its record and the file it came from.
struct JoinedPart {
  std::string file;
  PartRecord record;
};

absl::Status CheckRecordAgainstSpec(const JoinedPart& part, int64_t index,
                                    int64_t num_parts,
                                    const std::string& spec_sha256,
                                    const StoreSpec& spec,
                                    const JoinedPart* first_part,
                                    const JoinedPart* previous) {
  const PartRange& r = part.record.range;
  auto mismatch = [&](absl::string_view field, auto&&... what) {
    return absl::FailedPreconditionError(
        absl::StrCat(part.file, ": field '", field, "' ", what...));
  };
  if (r.part_index != index) {
    return mismatch("part_index", "is ", r.part_index, ", the file name says ",
                    index);
  }
  if (r.num_parts != num_parts) {
    return mismatch("num_parts", "is ", r.num_parts, ", the file name says ",
                    num_parts);
  }
  if (part.record.spec_sha256 != spec_sha256) {
    return mismatch("spec_sha256", "is ", part.record.spec_sha256,
                    ", the spec given to the join has ", spec_sha256,
                    ": the part was built with a different spec");
  }
  if (r.samples_per_shard != spec.samples_per_shard) {
    return mismatch("samples_per_shard", "is ", r.samples_per_shard,
                    ", the spec has ", spec.samples_per_shard);
  }
  if (first_part != nullptr &&
      r.total_samples != first_part->record.range.total_samples) {
    return mismatch("num_samples", "is ", r.total_samples, ", ",
                    first_part->file, " has ",
                    first_part->record.range.total_samples,
                    ": the parts were built for different datasets");
  }
  const int64_t expected_first =
      previous == nullptr ? 0 : previous->record.range.end_sample;
  if (r.first_sample != expected_first) {
    return mismatch(
        "first_sample", "is ", r.first_sample, ", expected ", expected_first,
        previous == nullptr ? " (the store starts at sample 0)"
                            : absl::StrCat(" (where ", previous->file,
                                           " ends): the ranges overlap or "
                                           "leave a gap"));
  }
  // Exactly the shards of the range, under their global names: what a
  // whole-store writer's manifest lists for these samples.
  const std::vector<ShardInfo>& shards = part.record.shards;
  if (int64_t(shards.size()) != r.num_shards()) {
    return mismatch("shards", "lists ", shards.size(), " shards, the range [",
                    r.first_sample, ", ", r.end_sample, ") has ",
                    r.num_shards());
  }
  for (int64_t k = 0; k < r.num_shards(); ++k) {
    const int64_t j = r.first_shard + k;
    const ShardInfo& s = shards[size_t(k)];
    const std::string field = absl::StrCat("shards[", k, "]");
    const int64_t first = j * r.samples_per_shard;
    const int64_t count =
        ShardSampleCount(j, r.total_samples, r.samples_per_shard);
    if (s.file != ShardFileName(j)) {
      return mismatch(field + ".file", "is '", s.file, "', expected '",
                      ShardFileName(j), "'");
    }
    if (s.first != first) {
      return mismatch(field + ".first", "is ", s.first, ", expected ", first);
    }
    if (s.count != count) {
      return mismatch(field + ".count", "is ", s.count, ", expected ", count);
    }
  }
  return absl::OkStatus();
}

// Verifies one listed shard file and appends its norms and sample ids.
// `index_of_id` maps each id seen so far to its global sample index.
absl::Status VerifyShard(Env* env, const std::string& dir,
                         const StoreSpec& spec, const std::string& spec_sha256,
                         const JoinedPart& part, int64_t k,
                         const std::vector<JoinedPart>& parts,
                         std::vector<float>* all_norms,
                         std::unordered_map<int64_t, int64_t>* index_of_id) {
  const ShardInfo& info = part.record.shards[size_t(k)];
  const std::string path = absl::StrCat(dir, "/", info.file);
  const std::string field = absl::StrCat(part.file, " shards[", k, "]");
  ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map,
                   MapListedShard(env, path, field));
  const MappedFile& file = *map;
  RETURN_IF_ERROR(VerifyShardChecksum(file, field, info.sha256));
  ASSIGN_OR_RETURN(SafetensorsHeader header,
                   ParseSafetensorsHeader(file.data(), file.size(), path));
  const int64_t shard_index = info.first / spec.samples_per_shard;
  const std::pair<const char*, std::string> metadata[] = {
      {kMetaFormat, kFormatName},
      {kMetaSpecSha256, spec_sha256},
      {kMetaShardIndex, absl::StrCat(shard_index)},
      {kMetaFirst, absl::StrCat(info.first)}};
  for (const auto& [key, want] : metadata) {
    const std::string got = MetadataOr(header, key);
    if (got != want) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": metadata '", key, "' is '", got,
                       "', expected '", want, "'"));
    }
  }
  const ShardGeometry g{info.count,       spec.num_checkpoints(),
                        spec.num_slots(), spec.projection.dim,
                        spec.dtype,       spec.buckets.replay};
  if (!SameTensors(header.tensors, ShardTensors(g))) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": tensors differ from the layout the spec gives a shard of ",
        info.count, " samples"));
  }
  const uint8_t* data = file.data() + header.data_start;
  const TensorEntry* norms = header.Find(kNormsTensor);
  const TensorEntry* ids = header.Find(kSampleIdsTensor);
  const size_t first_norm = all_norms->size();
  all_norms->resize(first_norm + size_t(norms->end - norms->begin) / 4);
  std::memcpy(all_norms->data() + first_norm, data + norms->begin,
              size_t(norms->end - norms->begin));

  // Where a global sample index lives, for the duplicate message.
  auto describe = [&](int64_t global) {
    const int64_t j = global / spec.samples_per_shard;
    const auto owner = std::upper_bound(
        parts.begin(), parts.end(), j, [](int64_t shard, const JoinedPart& p) {
          return shard < p.record.range.end_shard;
        });
    return absl::StrCat(global, " (", ShardFileName(j), ", ",
                        owner == parts.end() ? "?" : owner->file, ")");
  };
  for (int64_t i = 0; i < info.count; ++i) {
    int64_t id;
    std::memcpy(&id, data + ids->begin + 8 * i, 8);
    const int64_t global = info.first + i;
    auto [it, inserted] = index_of_id->emplace(id, global);
    if (!inserted) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, ": duplicate sample_id ", id, " at sample indices ",
                       describe(it->second), " and ", describe(global)));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Manifest> JoinStoreParts(const std::string& dir,
                                        const StoreSpec& spec,
                                        const nlohmann::json& diagnostics,
                                        Env* env) {
  if (!diagnostics.is_object()) {
    return absl::InvalidArgumentError("diagnostics must be a JSON object");
  }
  if (diagnostics.contains(kNormStatsKey)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "diagnostics: key '", kNormStatsKey, "' is reserved for the join"));
  }
  RETURN_IF_ERROR(Annotate(spec.Validate(), "store spec"));
  ASSIGN_OR_RETURN(const std::string spec_sha256, spec.Sha256());
  // Exclusive: no part may still be writing into this directory.
  ASSIGN_OR_RETURN(std::unique_ptr<DirectoryLock> lock,
                   DirectoryLock::Acquire(dir, DirectoryLock::Mode::kExclusive,
                                          kStoreLockHolderExclusive));
  ASSIGN_OR_RETURN(std::vector<std::string> names, env->ListDirectory(dir));

  std::map<int64_t, std::string> record_files;
  int64_t num_parts = -1;
  for (const std::string& name : names) {
    if (name == kManifestFileName) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, "/", kManifestFileName,
          ": the directory already holds a finished store (joined already?)"));
    }
    int64_t i, n;
    if (!ParsePartRecordFileName(name, &i, &n)) continue;
    if (num_parts < 0) {
      num_parts = n;
    } else if (n != num_parts) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": part records of different splits: ",
          record_files.begin()->second, " and ", name,
          "; all parts of one build must use the same number of parts "
          "(remove the stale records)"));
    }
    record_files[i] = name;
  }
  if (num_parts < 0) {
    return absl::NotFoundError(absl::StrCat(
        dir,
        ": no part records (part-IIII-of-NNNN.json); build the parts "
        "first"));
  }
  std::vector<JoinedPart> parts;
  for (int64_t i = 0; i < num_parts; ++i) {
    auto it = record_files.find(i);
    if (it == record_files.end()) {
      return absl::NotFoundError(absl::StrCat(
          dir, "/", PartRecordFileName(i, num_parts), ": missing: part ", i,
          " of ", num_parts,
          " has not finished (or its files were not copied here)"));
    }
    ASSIGN_OR_RETURN(std::string text,
                     env->ReadFile(absl::StrCat(dir, "/", it->second)));
    JoinedPart part;
    part.file = it->second;
    ASSIGN_OR_RETURN(part.record, PartRecord::Parse(text, part.file));
    RETURN_IF_ERROR(
        CheckRecordAgainstSpec(part, i, num_parts, spec_sha256, spec,
                               parts.empty() ? nullptr : &parts.front(),
                               parts.empty() ? nullptr : &parts.back()));
    parts.push_back(std::move(part));
  }
  const int64_t num_samples = parts.front().record.range.total_samples;
  if (parts.back().record.range.end_sample != num_samples) {
    return absl::FailedPreconditionError(
        absl::StrCat(parts.back().file, ": field 'end_sample' is ",
                     parts.back().record.range.end_sample,
                     ", the store ends at ", num_samples));
  }

  std::vector<ShardInfo> shards;
  std::vector<float> all_norms;
  std::unordered_map<int64_t, int64_t> index_of_id;
  index_of_id.reserve(size_t(num_samples));
  for (const JoinedPart& part : parts) {
    for (int64_t k = 0; k < int64_t(part.record.shards.size()); ++k) {
      RETURN_IF_ERROR(VerifyShard(env, dir, spec, spec_sha256, part, k, parts,
                                  &all_norms, &index_of_id));
      shards.push_back(part.record.shards[size_t(k)]);
    }
  }

  // The same steps as StoreWriter::Finish, so the bytes are the same.
  Manifest manifest;
  manifest.spec = spec;
  manifest.num_samples = num_samples;
  manifest.shards = std::move(shards);
  manifest.diagnostics = diagnostics;
  manifest.diagnostics[kNormStatsKey] = ComputeNormStats(
      all_norms, num_samples, spec.num_checkpoints(), spec.num_slots());
  ASSIGN_OR_RETURN(manifest.store_id,
                   ComputeStoreId(spec, num_samples, manifest.shards));
  RETURN_IF_ERROR(manifest.Validate());
  ASSIGN_OR_RETURN(std::string text, manifest.Serialize());
  const absl::string_view piece = text;
  if (absl::Status written =
          WriteFileAtomically(env, dir, kManifestFileName, {&piece, 1});
      !written.ok()) {
    // As in StoreWriter::Finish: a reported failure leaves no finished store.
    RemoveFile(env, dir, kManifestFileName).IgnoreError();
    return written;
  }

  // The store is complete; what remains is tidying, so that the directory
  // equals a whole-store build. Failures here only leave files readers
  // ignore.
  const int64_t num_shards = NumShards(num_samples, spec.samples_per_shard);
  for (const std::string& name : names) {
    int64_t i, n, index;
    const bool temp = absl::EndsWith(name, kTempSuffix);
    const std::string base =
        temp ? name.substr(0, name.size() - std::strlen(kTempSuffix)) : name;
    const bool part_file = ParsePartRecordFileName(base, &i, &n) ||
                           ParsePartLockFileName(base, &i, &n);
    const bool shard = ParseShardFileName(base, &index);
    const bool stray_shard = shard && !temp && index >= num_shards;
    if (!(part_file || (shard && temp) || stray_shard)) continue;
    if (stray_shard || (shard && temp)) {
      RETRACE_LOG(WARNING) << dir << "/" << name
                           << ": removed: not part of the joined store";
    }
    absl::Status removed = RemoveFile(env, dir, name);
    if (!removed.ok()) {
      RETRACE_LOG(WARNING) << removed;
    }
  }
  absl::Status synced = env->SyncDirectory(dir);
  if (!synced.ok()) {
    RETRACE_LOG(WARNING) << synced;
  }
  RETRACE_LOG(INFO) << dir << ": joined " << num_parts
                    << " parts into a store of " << num_samples
                    << " samples in " << num_shards << " shards";
  return manifest;
}

}  // namespace retrace::store
