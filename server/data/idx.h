// Readers for the IDX format of (Fashion-)MNIST: a big-endian header (two zero
// bytes, a type byte 0x08 = unsigned byte, the number of dimensions) followed
// by one big-endian uint32 per dimension and the data. Files may be gzipped
// (detected by content, not by name).
#ifndef RETRACE_SERVER_DATA_IDX_H_
#define RETRACE_SERVER_DATA_IDX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/data/image_set.h"

namespace retrace::data {

struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;  // product(dims) bytes
};

// Reads one unsigned-byte IDX file. NOT_FOUND when it is missing; DATA_LOSS
// (naming the file and the problem: bad magic, unsupported type, truncated,
// trailing bytes, corrupt gzip) otherwise.
absl::StatusOr<IdxArray> ReadIdxFile(const std::string& path);

// Reads an images file (3 dims: N, H, W) and a labels file (1 dim: N) into an
// ImageSet named `name`. DATA_LOSS when the ranks are wrong or the counts
// differ.
absl::StatusOr<ImageSet> ReadIdxImageSet(const std::string& images_path,
                                         const std::string& labels_path,
                                         absl::string_view name);

// Where Debian's dataset-fashion-mnist package installs the files.
inline constexpr char kDebianFashionMnistDir[] =
    "/usr/share/datasets/fashion-mnist";

enum class Split { kTrain, kTest };
// "train" or "test".
absl::string_view SplitName(Split split);
absl::StatusOr<Split> ParseSplit(absl::string_view name);

// Loads the Fashion-MNIST split from `dir`, which holds
// {train,t10k}-{images-idx3,labels-idx1}-ubyte, each optionally with ".gz".
// The set is named "fashion-mnist/train" or "fashion-mnist/test" and carries
// the ten class names. NOT_FOUND names the files looked for.
absl::StatusOr<ImageSet> LoadFashionMnist(const std::string& dir, Split split);

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_IDX_H_
