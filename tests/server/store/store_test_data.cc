#include "tests/server/store/store_test_data.h"

#include "common/status.h"

namespace retrace::store::testing {

StoreSpec MakeSpec(kernels::DType dtype, bool replay, int64_t samples_per_shard,
                   int64_t num_checkpoints, std::vector<int64_t> edges,
                   int64_t dim, uint64_t data_seed) {
  StoreSpec spec;
  spec.model.architecture = "unet-small";
  for (int64_t c = 0; c < num_checkpoints; ++c) {
    spec.model.checkpoints.push_back({"ckpt-" + std::to_string(c) + ".pt",
                                      std::string(64, char('a' + c % 6)),
                                      0.5 + 0.25 * double(c), 1000 * (c + 1)});
  }
  spec.noise_schedule.type = "cosine";
  spec.noise_schedule.timesteps = 1000;
  spec.loss = "mse";
  spec.buckets.edges = std::move(edges);
  spec.buckets.replay = replay;
  spec.projection.type = ProjectionType::kSjlt;
  spec.projection.dim = dim;
  spec.projection.sparsity = 4;
  spec.projection.seed =
      0x9e3779b97f4a7c15ull;  // above 2^63: exercises uint64 JSON
  spec.projection.param_regex = "^(down|up)\\.";
  spec.projection.input_dim = 123456789;
  spec.grad_timesteps = 1;
  spec.dtype = dtype;
  spec.samples_per_shard = samples_per_shard;
  spec.dataset = {
      {"name", "formula"},
      {"root", "/data/none"},
      {"provenance", {{"seed", data_seed}, {"generator", "store_test_data"}}}};
  return spec;
}

void FillSample(const StoreSpec& spec, uint64_t seed, int64_t n,
                SampleData* out) {
  const int64_t C = spec.num_checkpoints(), S = spec.num_slots(),
                D = spec.projection.dim;
  out->vectors.resize(size_t(C * S * D));
  out->norms.resize(size_t(C * S));
  for (int64_t i = 0; i < C * S * D; ++i) {
    out->vectors[size_t(i)] = VectorValue(seed, uint64_t(n * C * S * D + i));
  }
  for (int64_t i = 0; i < C * S; ++i) {
    out->norms[size_t(i)] = NormValue(seed, uint64_t(n * C * S + i));
  }
  out->train_timesteps.clear();
  if (spec.buckets.replay) {
    for (int64_t c = 0; c < C; ++c) {
      out->train_timesteps.push_back(TimestepValue(
          seed, uint64_t(n * C + c), spec.noise_schedule.timesteps));
    }
  }
  SampleRecord& r = out->record;
  r.sample_id = SampleIdValue(uint64_t(n));
  r.label = LabelValue(seed, uint64_t(n));
  r.vectors = out->vectors;
  r.norms = out->norms;
  r.self_influence_tracin = SelfInfluenceValue(seed, uint64_t(n), 0);
  r.self_influence_retrac = SelfInfluenceValue(seed, uint64_t(n), 1);
  r.train_timesteps = out->train_timesteps;
}

absl::StatusOr<Manifest> BuildStore(const std::string& dir,
                                    const StoreSpec& spec, int64_t num_samples,
                                    uint64_t seed, Env* env) {
  ASSIGN_OR_RETURN(std::unique_ptr<StoreWriter> writer,
                   StoreWriter::Create(dir, spec, env));
  SampleData data;
  for (int64_t n = writer->next_sample(); n < num_samples; ++n) {
    FillSample(spec, seed, n, &data);
    RETURN_IF_ERROR(writer->Append(data.record));
  }
  return writer->Finish({{"spearman", {-0.5, 0.25}}});
}

}  // namespace retrace::store::testing
