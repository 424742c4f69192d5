#include "server/model/torchscript_model.h"

#include <caffe2/serialize/versions.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "server/model/torch_status.h"

namespace retrace::model {
namespace {

absl::Status CheckIsFile(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(absl::StrCat(
        "TorchScript model ", path, " does not exist or is not a file"));
  }
  return absl::OkStatus();
}

std::string LinkedTorch() {
#ifdef TORCH_VERSION
  return absl::StrCat("LibTorch ", TORCH_VERSION);
#else
  return "the linked LibTorch";
#endif
}

// ---- The archive's file-format version, read without LibTorch ----
//
// PyTorchStreamReader refuses a version outside the supported range inside
// its constructor, before version() can be asked, so the version record is
// read here with a small reader of the zip central directory (zip64
// included). torch.jit.save writes the record last, uncompressed, as
// "<archive>/.data/version" (format 6 and later) or "<archive>/version".

constexpr uint32_t kEndOfDirectorySig = 0x06054b50;
constexpr uint32_t kZip64EndOfDirectorySig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kDirectoryEntrySig = 0x02014b50;
constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr size_t kEndOfDirectorySize = 22;
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kZip64EndOfDirectorySize = 56;
constexpr size_t kDirectoryEntrySize = 46;
constexpr size_t kLocalHeaderSize = 30;
constexpr size_t kMaxZipComment = 65535;

uint64_t LittleEndian(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) {
    v = (v << 8) | static_cast<unsigned char>(p[i]);
  }
  return v;
}

struct ArchiveEntry {
  std::string name;
  uint16_t method = 0;  // 0 stored, 8 deflated
  uint64_t size = 0;    // uncompressed
  uint64_t local_offset = 0;
};

// The central directory of the zip archive `path`; nullopt when the file is
// not a zip archive (or a damaged one).
class ZipDirectory {
 public:
  static std::optional<ZipDirectory> Read(const std::string& path) {
    ZipDirectory zip;
    zip.in_.open(path, std::ios::binary);
    if (!zip.in_) return std::nullopt;
    zip.in_.seekg(0, std::ios::end);
    const uint64_t file_size = static_cast<uint64_t>(zip.in_.tellg());
    if (file_size < kEndOfDirectorySize) return std::nullopt;
    const uint64_t tail_size = std::min<uint64_t>(
        file_size, kEndOfDirectorySize + kMaxZipComment + kZip64LocatorSize);
    std::string tail;
    if (!zip.ReadAt(file_size - tail_size, tail_size, &tail)) {
      return std::nullopt;
    }
    // The end-of-directory record: the last signature whose comment length
    // reaches exactly to the end of the file.
    std::optional<size_t> eocd;
    for (size_t i = tail.size() - kEndOfDirectorySize + 1; i-- > 0;) {
      if (LittleEndian(&tail[i], 4) == kEndOfDirectorySig &&
          i + kEndOfDirectorySize + LittleEndian(&tail[i + 20], 2) ==
              tail.size()) {
        eocd = i;
        break;
      }
    }
    if (!eocd) return std::nullopt;
    uint64_t entries = LittleEndian(&tail[*eocd + 10], 2);
    uint64_t dir_size = LittleEndian(&tail[*eocd + 12], 4);
    uint64_t dir_offset = LittleEndian(&tail[*eocd + 16], 4);
    if (*eocd >= kZip64LocatorSize &&
        LittleEndian(&tail[*eocd - kZip64LocatorSize], 4) == kZip64LocatorSig) {
      const uint64_t record_offset =
          LittleEndian(&tail[*eocd - kZip64LocatorSize + 8], 8);
      std::string record;
      if (!zip.ReadAt(record_offset, kZip64EndOfDirectorySize, &record) ||
          LittleEndian(record.data(), 4) != kZip64EndOfDirectorySig) {
        return std::nullopt;
      }
      entries = LittleEndian(&record[32], 8);
      dir_size = LittleEndian(&record[40], 8);
      dir_offset = LittleEndian(&record[48], 8);
    }
    std::string dir;
    if (dir_offset > file_size || dir_size > file_size - dir_offset ||
        !zip.ReadAt(dir_offset, dir_size, &dir)) {
      return std::nullopt;
    }
    size_t at = 0;
    for (uint64_t e = 0; e < entries; ++e) {
      if (at + kDirectoryEntrySize > dir.size() ||
          LittleEndian(&dir[at], 4) != kDirectoryEntrySig) {
        return std::nullopt;
      }
      const char* h = &dir[at];
      ArchiveEntry entry;
      entry.method = static_cast<uint16_t>(LittleEndian(h + 10, 2));
      entry.size = LittleEndian(h + 24, 4);
      const uint64_t compressed = LittleEndian(h + 20, 4);
      entry.local_offset = LittleEndian(h + 42, 4);
      const size_t name_len = LittleEndian(h + 28, 2);
      const size_t extra_len = LittleEndian(h + 30, 2);
      const size_t comment_len = LittleEndian(h + 32, 2);
      if (at + kDirectoryEntrySize + name_len + extra_len + comment_len >
          dir.size()) {
        return std::nullopt;
      }
      entry.name.assign(h + kDirectoryEntrySize, name_len);
      // The zip64 extra field holds, in this order, the 64-bit values of
      // those fields that read 0xFFFFFFFF.
      const char* extra = h + kDirectoryEntrySize + name_len;
      for (size_t x = 0; x + 4 <= extra_len;) {
        const uint64_t id = LittleEndian(extra + x, 2);
        const size_t len = LittleEndian(extra + x + 2, 2);
        if (id == 1) {
          const char* v = extra + x + 4;
          const char* end = v + std::min(len, extra_len - x - 4);
          if (entry.size == 0xFFFFFFFF && v + 8 <= end) {
            entry.size = LittleEndian(v, 8);
            v += 8;
          }
          if (compressed == 0xFFFFFFFF && v + 8 <= end) v += 8;
          if (entry.local_offset == 0xFFFFFFFF && v + 8 <= end) {
            entry.local_offset = LittleEndian(v, 8);
          }
        }
        x += 4 + len;
      }
      zip.entries_.push_back(std::move(entry));
      at += kDirectoryEntrySize + name_len + extra_len + comment_len;
    }
    return zip;
  }

  const std::vector<ArchiveEntry>& entries() const { return entries_; }

  // The contents of a stored (uncompressed) entry of at most `max_size`
  // bytes; nullopt otherwise.
  std::optional<std::string> ReadStored(const ArchiveEntry& entry,
                                        uint64_t max_size) {
    std::string header;
    if (entry.method != 0 || entry.size > max_size ||
        !ReadAt(entry.local_offset, kLocalHeaderSize, &header) ||
        LittleEndian(header.data(), 4) != kLocalHeaderSig) {
      return std::nullopt;
    }
    const uint64_t data = entry.local_offset + kLocalHeaderSize +
                          LittleEndian(&header[26], 2) +
                          LittleEndian(&header[28], 2);
    std::string out;
    if (!ReadAt(data, entry.size, &out)) return std::nullopt;
    return out;
  }

 private:
  bool ReadAt(uint64_t offset, uint64_t size, std::string* out) {
    out->assign(size, '\0');
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(out->data(), static_cast<std::streamsize>(size));
    return static_cast<uint64_t>(in_.gcount()) == size;
  }

  std::ifstream in_;
  std::vector<ArchiveEntry> entries_;
};

// The file-format version of the TorchScript archive `path`, read as
// PyTorchStreamReader does (the archive's name is the first entry's leading
// directory). INVALID_ARGUMENT naming the file when it is not a zip archive,
// has no version record or holds no TorchScript code.
absl::StatusOr<uint64_t> ReadFormatVersion(const std::string& path) {
  std::optional<ZipDirectory> zip = ZipDirectory::Read(path);
  if (!zip.has_value() || zip->entries().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path,
        " is not a TorchScript file: it is not a zip archive (torch.jit.save "
        "and ScriptModule.save write one)"));
  }
  const std::string& first = zip->entries().front().name;
  const std::string archive = first.substr(0, first.find('/'));
  const ArchiveEntry* record = nullptr;
  bool has_code = false;
  for (const char* name : {"/.data/version", "/version"}) {
    for (const ArchiveEntry& entry : zip->entries()) {
      if (record == nullptr && entry.name == archive + name) record = &entry;
    }
  }
  for (const ArchiveEntry& entry : zip->entries()) {
    if (absl::StartsWith(entry.name, archive + "/code/")) has_code = true;
  }
  if (record == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path,
                     " is a zip archive without a PyTorch version record (",
                     archive, "/version or ", archive,
                     "/.data/version), not a file written by "
                     "torch.jit.save"));
  }
  std::optional<std::string> text = zip->ReadStored(*record, 32);
  uint64_t version = 0;
  if (!text.has_value() ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &version)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path, ": the archive's version record ",
        record->name, " is unreadable"));
  }
  if (!has_code) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path,
        " holds no TorchScript code: it looks like a torch.save file (a "
        "state_dict or pickled module); script or trace the model and save it "
        "with torch.jit.save"));
  }
  return version;
}

absl::Status CheckFormatVersion(const std::string& path) {
  ASSIGN_OR_RETURN(const uint64_t version, ReadFormatVersion(path));
  if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
      version > caffe2::serialize::kMaxSupportedFileFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path, " has file-format version ", version,
        ", outside the range ",
        caffe2::serialize::kMinSupportedFileFormatVersion, "..",
        caffe2::serialize::kMaxSupportedFileFormatVersion, " that ",
        LinkedTorch(),
        " reads; save the model with a PyTorch release that writes a "
        "version in this range (docs/models.md, \"Versions\")"));
  }
  return absl::OkStatus();
}

// torch::jit::load reports bad archives as c10::Error; all of those mean "not
// a usable TorchScript file", so they become INVALID_ARGUMENT.
absl::StatusOr<torch::jit::Module> LoadModule(const std::string& path) {
  absl::Status exists = CheckIsFile(path);
  if (!exists.ok()) return exists;
  RETURN_IF_ERROR(CheckFormatVersion(path));
  absl::StatusOr<torch::jit::Module> module =
      internal::CallTorch(absl::StrCat("loading TorchScript model ", path),
                          [&]() -> absl::StatusOr<torch::jit::Module> {
                            return torch::jit::load(path, torch::kCPU);
                          });
  if (!module.ok()) {
    if (absl::IsResourceExhausted(module.status())) return module.status();
    return absl::InvalidArgumentError(module.status().message());
  }
  if (!module->find_method("forward").has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path, " has no forward method"));
  }
  return module;
}

// "forward(Tensor x_t, Tensor t) -> Tensor", without self.
std::string DescribeSchema(const c10::FunctionSchema& schema) {
  std::vector<std::string> args;
  for (size_t i = 1; i < schema.arguments().size(); ++i) {
    const c10::Argument& arg = schema.arguments()[i];
    args.push_back(absl::StrCat(arg.type()->annotation_str(), " ", arg.name(),
                                arg.default_value().has_value() ? "=..." : ""));
  }
  std::vector<std::string> returns;
  for (const c10::Argument& ret : schema.returns()) {
    returns.push_back(ret.type()->annotation_str());
  }
  const std::string out =
      returns.size() == 1
          ? returns[0]
          : absl::StrCat("(", absl::StrJoin(returns, ", "), ")");
  return absl::StrCat(schema.name(), "(", absl::StrJoin(args, ", "), ") -> ",
                      out);
}

bool IsTensor(const c10::Argument& arg) {
  return arg.type()->kind() == c10::TypeKind::TensorType;
}

// forward(self, x_t: Tensor, t: Tensor) -> Tensor. Further arguments are
// accepted when they have defaults (retrace never passes them).
absl::Status CheckForwardSchema(const std::string& path,
                                const torch::jit::Module& module) {
  const c10::FunctionSchema& schema =
      module.get_method("forward").function().getSchema();
  const std::vector<c10::Argument>& args = schema.arguments();
  bool ok = args.size() >= 3 && IsTensor(args[1]) && IsTensor(args[2]) &&
            schema.returns().size() == 1 && IsTensor(schema.returns()[0]) &&
            !schema.is_vararg();
  for (size_t i = 3; ok && i < args.size(); ++i) {
    ok = args[i].default_value().has_value();
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path, ": its forward schema is \"",
        DescribeSchema(schema),
        "\", expected \"forward(Tensor x_t, Tensor t) -> Tensor\" (noisy "
        "images [B, C, H, W] float32 and timesteps [B] int64, returning the "
        "predicted noise)"));
  }
  return absl::OkStatus();
}

// A TorchScript error's first line is often "The following operation failed
// in the TorchScript interpreter.", followed by the script's traceback; the
// cause is the last line then.
std::string ScriptErrorCause(const char* what) {
  const std::vector<absl::string_view> lines =
      absl::StrSplit(what, '\n', absl::SkipWhitespace());
  if (lines.empty()) return "";
  const absl::string_view line =
      absl::StrContains(lines.front(), "TorchScript interpreter")
          ? lines.back()
          : lines.front();
  return std::string(absl::StripAsciiWhitespace(line));
}

// One forward pass on zeros [1, C, H, W] with t = [0]: a model that cannot take
// the configured image shape fails here rather than at the first request.
absl::Status ProbeImageShape(const std::string& path,
                             torch::jit::Module& module,
                             const ImageShape& shape) {
  const std::vector<int64_t> in = {1, shape.channels, shape.height,
                                   shape.width};
  const std::string shape_text =
      absl::StrCat("[", absl::StrJoin(in, ", "), "]");
  std::string failure;
  try {
    torch::NoGradGuard no_grad;
    torch::jit::GraphOptimizerEnabledGuard unoptimized(false);
    at::Tensor x = torch::zeros(in, torch::kFloat);
    at::Tensor t = torch::zeros({1}, torch::kLong);
    c10::IValue out = module.forward({x, t});
    if (!out.isTensor()) {
      failure = absl::StrCat("forward returned ", out.tagKind());
    } else if (!out.toTensor().sizes().equals(in)) {
      failure = absl::StrCat("forward returned shape [",
                             absl::StrJoin(out.toTensor().sizes().vec(), ", "),
                             "] for input shape ", shape_text);
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "TorchScript model ", path, ": out of memory in a forward pass of one ",
        shape_text, " image"));
  } catch (const c10::Error& e) {
    failure = ScriptErrorCause(e.what_without_backtrace());
  } catch (const std::exception& e) {
    failure = ScriptErrorCause(e.what());
  }
  if (!failure.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path, ": the image shape [", shape.channels, ", ",
        shape.height, ", ", shape.width,
        "] is a shape the model rejects (a forward pass of zeros ", shape_text,
        " with t = [0] must return that shape): ", failure));
  }
  return absl::OkStatus();
}

}  // namespace

struct TorchScriptModel::Impl {
  torch::jit::Module module;
};

TorchScriptModel::TorchScriptModel(std::string path,
                                   const ImageShape& input_shape,
                                   std::unique_ptr<Impl> impl)
    : path_(std::move(path)),
      input_shape_(input_shape),
      impl_(std::move(impl)) {}

TorchScriptModel::~TorchScriptModel() = default;

absl::StatusOr<std::unique_ptr<TorchScriptModel>> TorchScriptModel::Create(
    const std::string& path, const ImageShape& input_shape) {
  absl::StatusOr<torch::jit::Module> module = LoadModule(path);
  if (!module.ok()) return module.status();
  RETURN_IF_ERROR(CheckForwardSchema(path, *module));
  auto impl = std::make_unique<Impl>();
  impl->module = *std::move(module);
  impl->module.eval();
  RETURN_IF_ERROR(ProbeImageShape(path, impl->module, input_shape));
  return std::unique_ptr<TorchScriptModel>(
      new TorchScriptModel(path, input_shape, std::move(impl)));
}

absl::StatusOr<at::Tensor> TorchScriptModel::Forward(const at::Tensor& x_t,
                                                     const at::Tensor& t) {
  if (!x_t.defined() || x_t.dim() != 4 || x_t.scalar_type() != at::kFloat) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path_,
                     ": x_t must be a float32 [B, C, H, W] tensor"));
  }
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != at::kLong ||
      t.size(0) != x_t.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TorchScript model ", path_, ": t must be int64 [", x_t.size(0), "]"));
  }
  absl::StatusOr<at::Tensor> eps = internal::CallTorch(
      absl::StrCat("TorchScript model ", path_, " forward"),
      [&]() -> absl::StatusOr<at::Tensor> {
        torch::jit::GraphOptimizerEnabledGuard unoptimized(false);
        c10::IValue out = impl_->module.forward({x_t, t});
        if (!out.isTensor()) {
          return absl::InvalidArgumentError(
              absl::StrCat("TorchScript model ", path_, ": forward returned ",
                           out.tagKind(), ", expected a Tensor"));
        }
        return out.toTensor();
      });
  if (!eps.ok()) return eps.status();
  if (!eps->sizes().equals(x_t.sizes())) {
    return absl::InvalidArgumentError(
        absl::StrCat("TorchScript model ", path_, ": forward returned shape [",
                     absl::StrJoin(eps->sizes().vec(), ", "), "], expected [",
                     absl::StrJoin(x_t.sizes().vec(), ", "), "]"));
  }
  return eps;
}

std::vector<NamedParameter> TorchScriptModel::NamedParameters() const {
  std::vector<NamedParameter> out;
  for (const auto& item : impl_->module.named_parameters(/*recurse=*/true)) {
    out.push_back(NamedParameter{item.name, item.value});
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DiffusionModel>> TorchScriptModel::Clone()
    const {
  return internal::CallTorch(
      absl::StrCat("copying TorchScript model ", path_),
      [&]() -> absl::StatusOr<std::unique_ptr<DiffusionModel>> {
        auto impl = std::make_unique<Impl>();
        {
          // Under autograd the copied tensors would be clones with a history
          // leading back to this model's parameters.
          torch::NoGradGuard no_grad;
          impl->module = impl_->module.deepcopy();
        }
        std::vector<NamedParameter> mine = NamedParameters();
        std::vector<NamedParameter> copy;
        for (const auto& item : impl->module.named_parameters(true)) {
          copy.push_back(NamedParameter{item.name, item.value});
        }
        if (copy.size() != mine.size()) {
          return absl::InternalError(absl::StrCat(
              "copying TorchScript model ", path_, ": the copy has ",
              copy.size(), " parameters, the original ", mine.size()));
        }
        for (size_t i = 0; i < copy.size(); ++i) {
          copy[i].tensor.requires_grad_(mine[i].tensor.requires_grad());
        }
        return std::unique_ptr<DiffusionModel>(
            new TorchScriptModel(path_, input_shape_, std::move(impl)));
      });
}

void TorchScriptModel::SetTraining(bool training) {
  impl_->module.train(training);
}

absl::Status TorchScriptModel::To(const c10::Device& device) {
  return internal::CallTorch(
      absl::StrCat("moving TorchScript model ", path_, " to ", device.str()),
      [&]() -> absl::Status {
        impl_->module.to(device);
        return absl::OkStatus();
      });
}

absl::Status TorchScriptModel::Save(const std::string& path) const {
  return internal::CallTorch(absl::StrCat("saving TorchScript model to ", path),
                             [&]() -> absl::Status {
                               impl_->module.save(path);
                               return absl::OkStatus();
                             });
}

absl::Status TorchScriptModel::Load(const std::string& path) {
  absl::StatusOr<torch::jit::Module> other = LoadModule(path);
  if (!other.ok()) return other.status();
  std::map<std::string, at::Tensor> values;
  for (const auto& item : other->named_parameters(true)) {
    values.emplace(item.name, item.value);
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> staged;
  for (const auto& item : impl_->module.named_parameters(true)) {
    auto it = values.find(item.name);
    if (it == values.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TorchScript model ", path, " lacks parameter ", item.name));
    }
    if (!it->second.sizes().equals(item.value.sizes())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TorchScript model ", path, ": parameter ", item.name, " has shape [",
          absl::StrJoin(it->second.sizes().vec(), ", "), "], expected [",
          absl::StrJoin(item.value.sizes().vec(), ", "), "]"));
    }
    staged.emplace_back(item.value, it->second);
  }
  return internal::CallTorch(absl::StrCat("loading parameters from ", path),
                             [&]() -> absl::Status {
                               torch::NoGradGuard no_grad;
                               for (auto& [param, value] : staged)
                                 param.copy_(value);
                               return absl::OkStatus();
                             });
}

}  // namespace retrace::model
