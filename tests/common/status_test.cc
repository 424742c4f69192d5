#include "common/status.h"

#include <gtest/gtest.h>

#include <string>

namespace retrace {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::Status Quarter(int x, int* out) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(*out, Half(h));
  return absl::OkStatus();
}

absl::Status Fails() {
  RETURN_IF_ERROR(absl::NotFoundError("gone"));
  return absl::OkStatus();
}

TEST(StatusTest, Macros) {
  int q = 0;
  EXPECT_TRUE(Quarter(8, &q).ok());
  EXPECT_EQ(q, 2);
  EXPECT_EQ(Quarter(6, &q).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Fails().code(), absl::StatusCode::kNotFound);
}

TEST(StatusTest, Annotate) {
  absl::Status s =
      Annotate(absl::DataLossError("bad"), "shard-00000.safetensors");
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "shard-00000.safetensors: bad");
  EXPECT_TRUE(Annotate(absl::OkStatus(), "x").ok());
}

TEST(StatusTest, QuoteForErrorCutsLongTextAndEscapesBytes) {
  EXPECT_EQ(QuoteForError("abc"), "'abc'");
  EXPECT_EQ(QuoteForError(std::string("a\0\n\xff", 4)), "'a\\x00\\n\\xff'");
  const std::string exact(kQuotedPrefix, 'x');
  EXPECT_EQ(QuoteForError(exact), "'" + exact + "'");
  const std::string huge(100000, 'A');
  const std::string quoted = QuoteForError(huge);
  EXPECT_EQ(quoted,
            "'" + std::string(kQuotedPrefix, 'A') + "\u2026' (100000 bytes)");
  EXPECT_LT(quoted.size(), 80u);
}

}  // namespace
}  // namespace retrace
