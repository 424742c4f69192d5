#include "client/format.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/client.h"

namespace retrace::client {
namespace {

using Json = nlohmann::json;

// Display width of UTF-8 text: one column per code point.
size_t DisplayWidth(absl::string_view text) {
  size_t width = 0;
  for (const char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++width;
  }
  return width;
}

// Columns padded to their widest cell; a row may carry note lines printed
// under it (the breakdown).
class TextTable {
 public:
  enum class Align { kLeft, kRight };
  struct Column {
    std::string header;
    Align align;
  };

  explicit TextTable(std::vector<Column> columns)
      : columns_(std::move(columns)) {}

  void AddRow(std::vector<std::string> cells) {
    rows_.push_back(Row{std::move(cells), {}});
  }
  void AddNote(std::string note) { rows_.back().notes.push_back(note); }

  // The header row comes first unless `with_header` is false.
  std::string Render(absl::string_view indent, bool with_header = true) const {
    std::vector<size_t> widths(columns_.size());
    for (size_t c = 0; c < columns_.size(); ++c) {
      widths[c] = DisplayWidth(columns_[c].header);
      for (const Row& row : rows_) {
        widths[c] = std::max(widths[c], DisplayWidth(row.cells[c]));
      }
    }
    std::string out;
    auto append_line = [&](const std::vector<std::string>& cells) {
      std::string line(indent);
      for (size_t c = 0; c < columns_.size(); ++c) {
        const std::string pad(widths[c] - DisplayWidth(cells[c]), ' ');
        if (c > 0) line += "  ";
        if (columns_[c].align == Align::kRight) {
          absl::StrAppend(&line, pad, cells[c]);
        } else {
          absl::StrAppend(&line, cells[c], pad);
        }
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      absl::StrAppend(&out, line, "\n");
    };
    if (with_header) {
      std::vector<std::string> headers;
      for (const Column& column : columns_) headers.push_back(column.header);
      append_line(headers);
    }
    for (const Row& row : rows_) {
      append_line(row.cells);
      for (const std::string& note : row.notes) {
        absl::StrAppend(&out, indent, "      ", note, "\n");
      }
    }
    return out;
  }

 private:
  struct Row {
    std::vector<std::string> cells;
    std::vector<std::string> notes;
  };
  std::vector<Column> columns_;
  std::vector<Row> rows_;
};

using Align = TextTable::Align;

bool AnyLabelName(
    const google::protobuf::RepeatedPtrField<v1::AttributedSample>& samples) {
  return std::any_of(samples.begin(), samples.end(),
                     [](const v1::AttributedSample& sample) {
                       return !sample.label_name().empty();
                     });
}

// The `terms` largest |value| contributions of a sample, e.g.
// "t300-399 ckpt 1 +12.5, ...".
std::string BreakdownNote(const v1::AttributedSample& sample, int terms,
                          const v1::StoreInfo* store) {
  std::vector<const v1::Contribution*> sorted;
  for (const v1::Contribution& term : sample.breakdown()) {
    sorted.push_back(&term);
  }
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const v1::Contribution* a, const v1::Contribution* b) {
                     return std::fabs(a->value()) > std::fabs(b->value());
                   });
  if (sorted.empty()) return "breakdown: no nonzero terms";
  std::vector<std::string> parts;
  const size_t shown = std::min(sorted.size(), static_cast<size_t>(terms));
  for (size_t i = 0; i < shown; ++i) {
    parts.push_back(absl::StrFormat("ckpt %d %s %+.4g", sorted[i]->checkpoint(),
                                    SlotName(sorted[i]->slot(), store),
                                    sorted[i]->value()));
  }
  return absl::StrCat("top terms: ", absl::StrJoin(parts, ", "), "  (", shown,
                      " of ", sorted.size(), ")");
}

std::string SampleTable(
    const google::protobuf::RepeatedPtrField<v1::AttributedSample>& samples,
    absl::string_view score_header, bool breakdown, int breakdown_terms,
    const v1::StoreInfo* store) {
  const bool names = AnyLabelName(samples);
  std::vector<TextTable::Column> columns = {{"rank", Align::kRight},
                                            {"index", Align::kRight},
                                            {"sample_id", Align::kRight},
                                            {"label", Align::kRight}};
  if (names) columns.push_back({"name", Align::kLeft});
  columns.push_back({std::string(score_header), Align::kRight});
  TextTable table(std::move(columns));
  for (const v1::AttributedSample& sample : samples) {
    std::vector<std::string> cells = {
        absl::StrCat(sample.rank()), absl::StrCat(sample.index()),
        absl::StrCat(sample.sample_id()), absl::StrCat(sample.label())};
    if (names) cells.push_back(sample.label_name());
    cells.push_back(FormatScore(sample.score()));
    table.AddRow(std::move(cells));
    if (breakdown) {
      table.AddNote(BreakdownNote(sample, breakdown_terms, store));
    }
  }
  return table.Render("  ");
}

Json SampleJson(const v1::AttributedSample& sample, bool breakdown,
                bool thumbnails) {
  Json out = {{"rank", sample.rank()},
              {"index", sample.index()},
              {"sample_id", sample.sample_id()},
              {"label", sample.label()},
              {"label_name", sample.label_name()},
              {"score", sample.score()}};
  if (breakdown) {
    Json terms = Json::array();
    for (const v1::Contribution& term : sample.breakdown()) {
      terms.push_back({{"checkpoint", term.checkpoint()},
                       {"slot", term.slot()},
                       {"value", term.value()}});
    }
    out["breakdown"] = std::move(terms);
  }
  if (thumbnails) {
    out["thumbnail_png_base64"] = absl::Base64Escape(sample.thumbnail_png());
  }
  return out;
}

Json SampleListJson(
    const google::protobuf::RepeatedPtrField<v1::AttributedSample>& samples,
    bool breakdown, bool thumbnails) {
  Json out = Json::array();
  for (const v1::AttributedSample& sample : samples) {
    out.push_back(SampleJson(sample, breakdown, thumbnails));
  }
  return out;
}

std::string FormatBytes(int64_t bytes) {
  constexpr double kMiB = 1024.0 * 1024.0;
  constexpr double kGiB = kMiB * 1024.0;
  if (bytes >= kGiB) return absl::StrFormat("%.2f GiB", bytes / kGiB);
  if (bytes >= kMiB) return absl::StrFormat("%.1f MiB", bytes / kMiB);
  return absl::StrFormat("%d bytes", bytes);
}

std::string TimestepRange(int32_t begin, int32_t end) {
  return end > begin ? absl::StrCat(begin, "-", end - 1) : absl::StrCat(begin);
}

}  // namespace

std::string FormatScore(double score) { return absl::StrFormat("%.6g", score); }

std::string SlotName(int32_t slot, const v1::StoreInfo* store) {
  if (store != nullptr && slot >= 0) {
    if (slot == store->num_buckets() && store->has_replay()) return "replay";
    if (slot + 1 < store->bucket_edges_size()) {
      return absl::StrCat("t", TimestepRange(store->bucket_edges(slot),
                                             store->bucket_edges(slot + 1)));
    }
  }
  return absl::StrCat("slot ", slot);
}

std::string FormatAttributeText(absl::string_view image,
                                const v1::AttributeResponse& response,
                                const AttributeFormatOptions& options) {
  std::string out = absl::StrCat("query ", image);
  if (!response.store_id().empty()) {
    absl::StrAppend(&out, "  (store ", response.store_id().substr(0, 12), ")");
  }
  absl::StrAppend(&out, "\n");
  for (const v1::MethodResult& result : response.results()) {
    const absl::string_view title = MethodTitle(result.method());
    absl::StrAppend(&out, "\n", title, " proponents (highest scores)\n",
                    SampleTable(result.proponents(), "score", options.breakdown,
                                options.breakdown_terms, options.store));
    if (options.opponents) {
      absl::StrAppend(
          &out, "\n", title, " opponents (lowest scores)\n",
          SampleTable(result.opponents(), "score", options.breakdown,
                      options.breakdown_terms, options.store));
    }
  }
  if (!response.timings().empty()) {
    std::vector<std::string> parts;
    for (const v1::StageTiming& timing : response.timings()) {
      parts.push_back(
          absl::StrFormat("%s %.1f ms", timing.stage(), timing.milliseconds()));
    }
    absl::StrAppend(&out, "\ntimings: ", absl::StrJoin(parts, ", "), "\n");
  }
  return out;
}

Json AttributeJson(absl::string_view image,
                   const v1::AttributeResponse& response,
                   const AttributeFormatOptions& options) {
  Json results = Json::object();
  for (const v1::MethodResult& result : response.results()) {
    results[std::string(MethodName(result.method()))] = {
        {"proponents", SampleListJson(result.proponents(), options.breakdown,
                                      options.thumbnails)},
        {"opponents", options.opponents ? SampleListJson(result.opponents(),
                                                         options.breakdown,
                                                         options.thumbnails)
                                        : Json::array()}};
  }
  Json timings = Json::object();
  for (const v1::StageTiming& timing : response.timings()) {
    timings[timing.stage()] = timing.milliseconds();
  }
  return {{"image", std::string(image)},
          {"store_id", response.store_id()},
          {"request_id", response.request_id()},
          {"results", std::move(results)},
          {"timings_ms", std::move(timings)}};
}

Json AttributeErrorJson(absl::string_view image, const absl::Status& status) {
  return {{"image", std::string(image)},
          {"error",
           {{"code", absl::StatusCodeToString(status.code())},
            {"message", std::string(status.message())}}}};
}

std::string FormatSelfInfluenceText(
    v1::Method method, const std::vector<v1::AttributedSample>& samples) {
  google::protobuf::RepeatedPtrField<v1::AttributedSample> list(samples.begin(),
                                                                samples.end());
  return absl::StrCat(
      MethodTitle(method),
      " self-influence (highest first; outlier candidates)\n",
      SampleTable(list, "self-influence", /*breakdown=*/false, 0, nullptr));
}

Json SelfInfluenceJson(v1::Method method,
                       const std::vector<v1::AttributedSample>& samples) {
  Json list = Json::array();
  for (const v1::AttributedSample& sample : samples) {
    list.push_back(SampleJson(sample, /*breakdown=*/false,
                              /*thumbnails=*/false));
  }
  return {{"method", std::string(MethodName(method))},
          {"samples", std::move(list)}};
}

std::string FormatStoreInfoText(const v1::StoreInfo& info) {
  TextTable summary({{"", Align::kLeft}, {"", Align::kLeft}});
  summary.AddRow({"store", info.store_id()});
  summary.AddRow({"dataset", info.dataset().empty() ? "-" : info.dataset()});
  summary.AddRow({"samples", absl::StrCat(info.num_samples())});
  summary.AddRow({"checkpoints",
                  absl::StrCat(info.num_checkpoints(), " (weights ",
                               absl::StrJoin(info.checkpoint_weights(), ", ",
                                             [](std::string* out, float w) {
                                               absl::StrAppend(
                                                   out,
                                                   absl::StrFormat("%g", w));
                                             }),
                               ")")});
  summary.AddRow(
      {"buckets",
       absl::StrCat(info.num_buckets(), " (edges ",
                    absl::StrJoin(info.bucket_edges(), " "), "), replay slot ",
                    info.has_replay() ? "yes" : "no")});
  summary.AddRow(
      {"vectors", absl::StrCat("dim ", info.dim(), ", ", info.dtype(), ", ",
                               info.projection(), " projection, ",
                               FormatBytes(info.store_bytes()))});
  summary.AddRow({"model", absl::StrCat(info.loss(), " loss, ",
                                        info.noise_schedule(), " schedule")});
  summary.AddRow(
      {"images",
       info.accepts_images()
           ? absl::StrCat("accepted, shape [",
                          absl::StrJoin(info.image_shape(), ", "), "]")
           : "not accepted (precomputed query vectors only)"});
  summary.AddRow({"backend", info.backend()});
  std::string out = summary.Render("", /*with_header=*/false);

  if (!info.diagnostics().empty()) {
    absl::StrAppend(&out,
                    "\nGradient norm |g| per checkpoint and slot "
                    "(timestep-induced bias)\n");
    TextTable norms({{"ckpt", Align::kRight},
                     {"slot", Align::kRight},
                     {"timesteps", Align::kLeft},
                     {"mean", Align::kRight},
                     {"median", Align::kRight},
                     {"p95", Align::kRight}});
    for (const v1::SlotDiagnostics& d : info.diagnostics()) {
      const bool replay = d.bucket() == info.num_buckets();
      norms.AddRow({absl::StrCat(d.checkpoint()),
                    replay ? "R" : absl::StrCat(d.bucket()),
                    replay
                        ? "replay"
                        : TimestepRange(d.timestep_begin(), d.timestep_end()),
                    FormatScore(d.norm_mean()), FormatScore(d.norm_median()),
                    FormatScore(d.norm_p95())});
    }
    absl::StrAppend(&out, norms.Render("  "));
  }

  if (!info.spearman_timestep_norm().empty()) {
    // Largest over smallest bucket median per checkpoint: how much TracIn's
    // unnormalized scores favour some noise levels over others.
    absl::flat_hash_map<int32_t, std::pair<float, float>> median_range;
    for (const v1::SlotDiagnostics& d : info.diagnostics()) {
      if (d.bucket() >= info.num_buckets()) continue;
      auto [it, inserted] = median_range.try_emplace(
          d.checkpoint(), d.norm_median(), d.norm_median());
      if (!inserted) {
        it->second.first = std::min(it->second.first, d.norm_median());
        it->second.second = std::max(it->second.second, d.norm_median());
      }
    }
    absl::StrAppend(&out,
                    "\nSpearman correlation of timestep and |g| per "
                    "checkpoint\n");
    TextTable spearman({{"ckpt", Align::kRight},
                        {"spearman", Align::kRight},
                        {"median max/min", Align::kRight}});
    for (int c = 0; c < info.spearman_timestep_norm_size(); ++c) {
      std::string ratio = "-";
      if (auto it = median_range.find(c);
          it != median_range.end() && it->second.first > 0) {
        ratio = absl::StrFormat("%.3g", it->second.second / it->second.first);
      }
      spearman.AddRow({absl::StrCat(c),
                       absl::StrFormat("%+.3f", info.spearman_timestep_norm(c)),
                       ratio});
    }
    absl::StrAppend(&out, spearman.Render("  "));
  }
  return out;
}

Json StoreInfoJson(const v1::StoreInfo& info) {
  Json diagnostics = Json::array();
  for (const v1::SlotDiagnostics& d : info.diagnostics()) {
    diagnostics.push_back({{"checkpoint", d.checkpoint()},
                           {"slot", d.bucket()},
                           {"replay", d.bucket() == info.num_buckets()},
                           {"timestep_begin", d.timestep_begin()},
                           {"timestep_end", d.timestep_end()},
                           {"norm_mean", d.norm_mean()},
                           {"norm_median", d.norm_median()},
                           {"norm_p95", d.norm_p95()}});
  }
  auto array = [](const auto& repeated) {
    Json out = Json::array();
    for (const auto& value : repeated) out.push_back(value);
    return out;
  };
  return {{"store_id", info.store_id()},
          {"num_samples", info.num_samples()},
          {"num_checkpoints", info.num_checkpoints()},
          {"num_buckets", info.num_buckets()},
          {"has_replay", info.has_replay()},
          {"dim", info.dim()},
          {"dtype", info.dtype()},
          {"projection", info.projection()},
          {"loss", info.loss()},
          {"noise_schedule", info.noise_schedule()},
          {"bucket_edges", array(info.bucket_edges())},
          {"checkpoint_weights", array(info.checkpoint_weights())},
          {"diagnostics", std::move(diagnostics)},
          {"spearman_timestep_norm", array(info.spearman_timestep_norm())},
          {"store_bytes", info.store_bytes()},
          {"backend", info.backend()},
          {"dataset", info.dataset()},
          {"image_shape", array(info.image_shape())},
          {"accepts_images", info.accepts_images()}};
}

}  // namespace retrace::client
