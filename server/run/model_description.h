// The model description: one TOML file (conventionally model.toml) that tells
// retrace everything it needs to attribute a diffusion model, wherever the
// model was trained: the network (the built-in UNet or a TorchScript module),
// its checkpoints with their weights w_c, the noise schedule, the loss and
// prediction target, the input image shape and pixel range, and the training
// data. `retrace-batch train` writes one into its run directory; users write
// their own (docs/models.md gives every field). build-store and retraced read
// it; the store manifest records what it says about the model.
//
//   ASSIGN_OR_RETURN(ModelDescription d, LoadModelDescription("run/model.toml"));
//   ASSIGN_OR_RETURN(model::NoiseSchedule s, CreateNoiseSchedule(d));
//   ASSIGN_OR_RETURN(auto net, LoadCheckpointModel(d, /*checkpoint=*/0));
//
// Errors name the file and the field ("model.toml: field 'schedule.type' is
// \"quadratic\"; expected one of ..."); nothing is written anywhere.
//
// Plain value types and free functions; thread-compatible.
#ifndef RETRACE_SERVER_RUN_MODEL_DESCRIPTION_H_
#define RETRACE_SERVER_RUN_MODEL_DESCRIPTION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/data/mixture.h"
#include "server/model/diffusion_model.h"
#include "server/model/loss.h"
#include "server/model/schedule.h"
#include "server/model/unet.h"
#include "server/store/manifest.h"

namespace retrace::run {

inline constexpr char kModelDescriptionFile[] = "model.toml";
inline constexpr char kDescriptionFormat[] = "retrace-model";
inline constexpr int64_t kDescriptionVersion = 1;
// Largest image side a description may declare.
inline constexpr int64_t kMaxImageSide = 256;

enum class ModelKind { kBuiltinUNet, kTorchScript };

// "builtin-unet" or "torchscript".
absl::string_view ModelKindName(ModelKind kind);

struct ImageDescription {
  int64_t channels = 1;  // 1 (gray) or 3 (RGB)
  int64_t height = 28;
  int64_t width = 28;
  // 8-bit pixels 0..255 map linearly onto [pixel_min, pixel_max], the range
  // the model was trained on.
  double pixel_min = -1.0;
  double pixel_max = 1.0;
};

struct ScheduleDescription {
  std::string type = "cosine";  // cosine | linear | betas | alpha_bars
  int64_t timesteps = model::NoiseSchedule::kDefaultNumTimesteps;
  double beta_start = model::NoiseSchedule::kLinearBetaStart;  // linear
  double beta_end = model::NoiseSchedule::kLinearBetaEnd;      // linear
  std::vector<double> values;  // betas / alpha_bars: T values
};

struct CheckpointDescription {
  std::string file;     // as written (relative to the description's folder)
  double weight = 1.0;  // w_c
  // 64 lowercase hex digits. Optional in the file; LoadModelDescription
  // verifies it when present and fills it in when absent.
  std::string sha256;
  int64_t step = 0;  // descriptive; defaults to the checkpoint's index
};

struct DataDescription {
  // "folder": an image folder root/<class>/<image>.png|jpg (classes are the
  // sub-folders in name order; images in file-name order, no shuffle).
  // "mixture": a mixture spec of the built-in datasets (server/data/mixture.h)
  // with its seed, shuffled as retrace-batch train shuffles it.
  std::string source = "folder";
  std::string path;  // folder: the root (relative to the description)
  std::string spec;  // mixture: the spec text
  uint64_t seed = 0;  // mixture: its seed
  // Optional fingerprint of the data as trained on (retrace-batch train's
  // DatasetInfo.sha256); build-store refuses other data when present.
  std::string sha256;
};

struct ModelDescription {
  ModelKind kind = ModelKind::kTorchScript;
  // Built-in UNet only: its hyper-parameters (image fields follow `image`).
  model::UNetConfig unet;
  ImageDescription image;
  ScheduleDescription schedule;
  std::string loss = "mse";           // mse | l1
  std::string prediction = "epsilon";  // only epsilon is supported
  std::vector<CheckpointDescription> checkpoints;  // C >= 1, in order c
  DataDescription data;
  // Optional: the retrace-batch train run directory this model came from
  // (relative); its replay log gives the store a replay slot.
  std::string training_run;

  // The file this was read from ("" when made in memory) and the folder
  // that relative paths resolve against.
  std::string source;
  std::string base_dir;

  // `relative` resolved against base_dir (absolute paths unchanged).
  std::string Resolve(const std::string& relative) const;
  model::ImageShape shape() const {
    return {image.channels, image.height, image.width};
  }
};

// Parses TOML text. `source` names the file in errors; relative paths
// resolve against its folder. INVALID_ARGUMENT naming the field for syntax
// errors, missing or mistyped fields, unknown keys, values out of range, an
// unknown schedule, loss or model kind, and prediction targets other than
// epsilon. Touches no other file.
absl::StatusOr<ModelDescription> ParseModelDescription(
    absl::string_view text, const std::string& source);

// TOML text that ParseModelDescription reads back to an equal description
// (weights and schedule values print in the shortest exact form).
std::string FormatModelDescription(const ModelDescription& description);

// Reads `path` (a description file, or a folder holding model.toml), parses
// it and checks every checkpoint file: NOT_FOUND naming the description, the
// field and the path when one is missing; DATA_LOSS naming the file and both
// hashes when its sha256 differs from the recorded one (only with
// verify_checksums; missing hashes are computed either way).
absl::StatusOr<ModelDescription> LoadModelDescription(
    const std::string& path, bool verify_checksums = true);

// The model library's forms of the description's names.
absl::StatusOr<model::NoiseSchedule> CreateNoiseSchedule(
    const ScheduleDescription& schedule);
absl::StatusOr<model::LossType> LossTypeOf(const ModelDescription& d);

// Creates the network and loads checkpoint c into it (CPU). Errors name the
// description, the field checkpoints[c].file and the cause (a TorchScript
// file of an unsupported format version, a forward with the wrong signature,
// a model that rejects the image shape, a built-in checkpoint that does not
// fit the hyper-parameters...).
absl::StatusOr<std::unique_ptr<model::DiffusionModel>> LoadCheckpointModel(
    const ModelDescription& d, int64_t checkpoint);

// The training images in store order, with their sample ids and provenance.
// `locations` supplies the built-in datasets' folders; the folder spec is
// taken from the description's image shape.
absl::StatusOr<data::Mixture> LoadTrainingData(
    const ModelDescription& d, data::DataLocations locations);
// The mixture spec (with seed and shuffle) LoadTrainingData builds.
absl::StatusOr<data::MixtureSpec> TrainingMixtureSpec(
    const ModelDescription& d);

// Maps pixels in [−1, 1] (the data library's range) onto the description's
// pixel range, in place. Identity for the default [−1, 1].
void ToModelRange(const ImageDescription& image, float* pixels, int64_t count);

// Writes what the store records about the model: architecture, checkpoints
// (file as written, sha256, weight, step), image, prediction, noise schedule
// and loss.
void RecordInStoreSpec(const ModelDescription& d, store::StoreSpec* spec);

// OK when the description is the store's model: same architecture, schedule,
// loss, image and checkpoint hashes in the same order. Otherwise
// FAILED_PRECONDITION naming the description, the first differing field and
// both values.
absl::Status CheckMatchesStore(const ModelDescription& d,
                               const store::StoreSpec& spec);

}  // namespace retrace::run

#endif  // RETRACE_SERVER_RUN_MODEL_DESCRIPTION_H_
