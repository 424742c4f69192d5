#include "server/data/idx.h"

#include <zlib.h>

#include <filesystem>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace retrace::data {
namespace {

constexpr uint8_t kUnsignedByteType = 0x08;
constexpr int kMaxDims = 8;

struct GzCloser {
  void operator()(gzFile file) const { gzclose(file); }
};
using GzHandle = std::unique_ptr<gzFile_s, GzCloser>;

// Reads exactly `size` bytes; false on a short read or a decompression error.
bool ReadExactly(gzFile file, void* out, size_t size) {
  auto* bytes = static_cast<uint8_t*>(out);
  while (size > 0) {
    const unsigned chunk =
        static_cast<unsigned>(std::min<size_t>(size, 1 << 30));
    const int got = gzread(file, bytes, chunk);
    if (got <= 0) return false;
    bytes += got;
    size -= static_cast<size_t>(got);
  }
  return true;
}

std::string GzError(gzFile file) {
  int code = 0;
  const char* message = gzerror(file, &code);
  if (code == Z_OK || code == Z_STREAM_END || message == nullptr) {
    return "file is truncated";
  }
  return absl::StrCat("corrupt gzip data (", message, ")");
}

}  // namespace

absl::StatusOr<IdxArray> ReadIdxFile(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(
        absl::StrCat("IDX file ", path, " does not exist or is not a file"));
  }
  // gzread reads plain files unchanged, so both forms go through zlib.
  GzHandle file(gzopen(path.c_str(), "rb"));
  if (file == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot open IDX file ", path));
  }
  uint8_t header[4];
  if (!ReadExactly(file.get(), header, sizeof(header))) {
    return absl::DataLossError(absl::StrCat(
        "IDX file ", path, ": ", GzError(file.get()), " (no 4-byte header)"));
  }
  if (header[0] != 0 || header[1] != 0) {
    return absl::DataLossError(absl::StrCat(
        "IDX file ", path, ": bad magic (first two bytes must be zero)"));
  }
  if (header[2] != kUnsignedByteType) {
    return absl::DataLossError(absl::StrCat(
        "IDX file ", path, ": element type 0x", absl::Hex(header[2]),
        " unsupported (expected 0x08, unsigned byte)"));
  }
  const int rank = header[3];
  if (rank < 1 || rank > kMaxDims) {
    return absl::DataLossError(absl::StrCat("IDX file ", path, ": rank ", rank,
                                            " out of range [1, ", kMaxDims,
                                            "]"));
  }
  IdxArray array;
  int64_t total = 1;
  for (int d = 0; d < rank; ++d) {
    uint8_t be[4];
    if (!ReadExactly(file.get(), be, sizeof(be))) {
      return absl::DataLossError(absl::StrCat("IDX file ", path, ": ",
                                              GzError(file.get()),
                                              " (in the dimensions)"));
    }
    const int64_t dim = (int64_t{be[0]} << 24) | (int64_t{be[1]} << 16) |
                        (int64_t{be[2]} << 8) | int64_t{be[3]};
    array.dims.push_back(dim);
    total *= dim;
    if (total > (int64_t{1} << 40)) {
      return absl::DataLossError(
          absl::StrCat("IDX file ", path, ": implausible dimensions [",
                       absl::StrJoin(array.dims, ", "), "...]"));
    }
  }
  array.data.resize(static_cast<size_t>(total));
  if (total > 0 &&
      !ReadExactly(file.get(), array.data.data(), array.data.size())) {
    return absl::DataLossError(absl::StrCat(
        "IDX file ", path, ": ", GzError(file.get()), " (expected ", total,
        " data bytes for dimensions [", absl::StrJoin(array.dims, ", "), "])"));
  }
  uint8_t extra;
  if (gzread(file.get(), &extra, 1) != 0) {
    return absl::DataLossError(absl::StrCat(
        "IDX file ", path, ": unexpected bytes after ", total,
        " data bytes for dimensions [", absl::StrJoin(array.dims, ", "), "]"));
  }
  return array;
}

absl::StatusOr<ImageSet> ReadIdxImageSet(const std::string& images_path,
                                         const std::string& labels_path,
                                         absl::string_view name) {
  absl::StatusOr<IdxArray> images = ReadIdxFile(images_path);
  if (!images.ok()) return images.status();
  absl::StatusOr<IdxArray> labels = ReadIdxFile(labels_path);
  if (!labels.ok()) return labels.status();
  if (images->dims.size() != 3) {
    return absl::DataLossError(absl::StrCat(
        "IDX images file ", images_path, " has ", images->dims.size(),
        " dimensions, expected 3 (count, height, width)"));
  }
  if (labels->dims.size() != 1) {
    return absl::DataLossError(absl::StrCat("IDX labels file ", labels_path,
                                            " has ", labels->dims.size(),
                                            " dimensions, expected 1"));
  }
  if (labels->dims[0] != images->dims[0]) {
    return absl::DataLossError(
        absl::StrCat("IDX labels file ", labels_path, " has ", labels->dims[0],
                     " labels but images file ", images_path, " has ",
                     images->dims[0], " images"));
  }
  ImageSet set;
  set.name = std::string(name);
  set.channels = 1;
  set.height = images->dims[1];
  set.width = images->dims[2];
  set.pixels.resize(images->data.size());
  for (size_t i = 0; i < images->data.size(); ++i) {
    set.pixels[i] = ByteToPixel(images->data[i]);
  }
  set.labels.assign(labels->data.begin(), labels->data.end());
  return set;
}

absl::string_view SplitName(Split split) {
  return split == Split::kTrain ? "train" : "test";
}

absl::StatusOr<Split> ParseSplit(absl::string_view name) {
  if (name == "train") return Split::kTrain;
  if (name == "test") return Split::kTest;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown split '", name, "' (expected 'train' or 'test')"));
}

absl::StatusOr<ImageSet> LoadFashionMnist(const std::string& dir, Split split) {
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  auto find = [&](const std::string& stem) -> absl::StatusOr<std::string> {
    for (const char* suffix : {"", ".gz"}) {
      std::string path = absl::StrCat(dir, "/", stem, suffix);
      std::error_code error;
      if (std::filesystem::is_regular_file(path, error)) return path;
    }
    return absl::NotFoundError(absl::StrCat(
        "Fashion-MNIST file ", dir, "/", stem,
        "[.gz] not found (install the "
        "dataset-fashion-mnist package or point the data directory at the IDX "
        "files)"));
  };
  absl::StatusOr<std::string> images = find(prefix + "-images-idx3-ubyte");
  if (!images.ok()) return images.status();
  absl::StatusOr<std::string> labels = find(prefix + "-labels-idx1-ubyte");
  if (!labels.ok()) return labels.status();
  absl::StatusOr<ImageSet> set = ReadIdxImageSet(
      *images, *labels, absl::StrCat("fashion-mnist/", SplitName(split)));
  if (!set.ok()) return set.status();
  for (int32_t label : set->labels) {
    if (label < 0 || label > 9) {
      return absl::DataLossError(absl::StrCat("Fashion-MNIST labels file ",
                                              *labels, " has label ", label,
                                              " outside [0, 9]"));
    }
  }
  set->class_names = {"T-shirt/top", "Trouser",   "Pullover", "Dress",
                      "Coat",        "Sandal",    "Shirt",    "Sneaker",
                      "Bag",         "Ankle boot"};
  return set;
}

}  // namespace retrace::data
