#include "client/contact_sheet.h"

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#include <stb/stb_truetype.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/client.h"
#include "common/file_util.h"
#include "common/status.h"

namespace retrace::client {
namespace {

struct Rgb {
  uint8_t r, g, b;
};

constexpr Rgb kBackground = {255, 255, 255};
constexpr Rgb kText = {20, 20, 20};
constexpr Rgb kMutedText = {110, 110, 110};
constexpr Rgb kBoxBackground = {225, 225, 225};
constexpr Rgb kProponentFrame = {40, 140, 70};
constexpr Rgb kOpponentFrame = {190, 50, 50};
constexpr Rgb kQueryFrame = {40, 90, 190};
constexpr Rgb kPanelTint = {246, 246, 246};

constexpr float kTitlePx = 18;
constexpr float kHeaderPx = 18;
constexpr float kNotePx = 12;
constexpr float kSectionPx = 13;
constexpr float kCaptionPx = 11;
constexpr int kCaptionLine = 14;  // line pitch of the two caption lines

// An RGB image in host memory, row-major, 3 bytes per pixel.
class Canvas {
 public:
  Canvas(int width, int height)
      : width_(width),
        height_(height),
        pixels_(static_cast<size_t>(width) * height * 3) {
    FillRect(0, 0, width, height, kBackground);
  }

  int width() const { return width_; }
  int height() const { return height_; }
  const uint8_t* data() const { return pixels_.data(); }

  // Blends `color` over pixel (x, y) with coverage alpha/255; outside: no-op.
  void Blend(int x, int y, Rgb color, int alpha) {
    if (x < 0 || y < 0 || x >= width_ || y >= height_ || alpha <= 0) return;
    uint8_t* p = &pixels_[(static_cast<size_t>(y) * width_ + x) * 3];
    const int a = std::min(alpha, 255);
    p[0] = static_cast<uint8_t>((color.r * a + p[0] * (255 - a)) / 255);
    p[1] = static_cast<uint8_t>((color.g * a + p[1] * (255 - a)) / 255);
    p[2] = static_cast<uint8_t>((color.b * a + p[2] * (255 - a)) / 255);
  }

  void FillRect(int x, int y, int w, int h, Rgb color) {
    for (int yy = std::max(0, y); yy < std::min(height_, y + h); ++yy) {
      for (int xx = std::max(0, x); xx < std::min(width_, x + w); ++xx) {
        uint8_t* p = &pixels_[(static_cast<size_t>(yy) * width_ + xx) * 3];
        p[0] = color.r;
        p[1] = color.g;
        p[2] = color.b;
      }
    }
  }

  // A `thickness`-pixel frame just outside the rectangle (x, y, w, h).
  void Frame(int x, int y, int w, int h, int thickness, Rgb color) {
    FillRect(x - thickness, y - thickness, w + 2 * thickness, thickness, color);
    FillRect(x - thickness, y + h, w + 2 * thickness, thickness, color);
    FillRect(x - thickness, y, thickness, h, color);
    FillRect(x + w, y, thickness, h, color);
  }

  // Copies an RGB image of src_w x src_h scaled to dst_w x dst_h with
  // nearest neighbour, top-left corner at (x, y).
  void Blit(const uint8_t* src, int src_w, int src_h, int x, int y, int dst_w,
            int dst_h) {
    for (int dy = 0; dy < dst_h; ++dy) {
      const int sy = static_cast<int>(static_cast<int64_t>(dy) * src_h / dst_h);
      for (int dx = 0; dx < dst_w; ++dx) {
        const int sx =
            static_cast<int>(static_cast<int64_t>(dx) * src_w / dst_w);
        const uint8_t* s = &src[(static_cast<size_t>(sy) * src_w + sx) * 3];
        const int px = x + dx;
        const int py = y + dy;
        if (px < 0 || py < 0 || px >= width_ || py >= height_) continue;
        std::memcpy(&pixels_[(static_cast<size_t>(py) * width_ + px) * 3], s,
                    3);
      }
    }
  }

 private:
  int width_;
  int height_;
  std::vector<uint8_t> pixels_;
};

// Next code point of UTF-8 `text` from `*pos` (advanced); invalid bytes
// come out as U+FFFD.
int NextCodePoint(absl::string_view text, size_t* pos) {
  const auto byte = [&](size_t i) {
    return static_cast<unsigned char>(text[i]);
  };
  const unsigned char lead = byte(*pos);
  int length = 1;
  int code = lead;
  if (lead >= 0xF0) {
    length = 4;
    code = lead & 0x07;
  } else if (lead >= 0xE0) {
    length = 3;
    code = lead & 0x0F;
  } else if (lead >= 0xC0) {
    length = 2;
    code = lead & 0x1F;
  } else if (lead >= 0x80) {
    ++*pos;
    return 0xFFFD;
  }
  if (*pos + length > text.size()) {
    *pos = text.size();
    return 0xFFFD;
  }
  for (int i = 1; i < length; ++i) {
    const unsigned char next = byte(*pos + i);
    if ((next & 0xC0) != 0x80) {
      ++*pos;
      return 0xFFFD;
    }
    code = (code << 6) | (next & 0x3F);
  }
  *pos += length;
  return code;
}

// A TrueType font for labels; stb_truetype keeps pointers into bytes_, so a
// Font never moves (held by unique_ptr).
class Font {
 public:
  static absl::StatusOr<std::unique_ptr<Font>> Load(const std::string& path) {
    absl::StatusOr<std::string> bytes = ReadFile(path);
    if (!bytes.ok()) {
      if (absl::IsNotFound(bytes.status())) {
        return absl::NotFoundError(absl::StrCat(
            "the contact sheet's font '", path,
            "' does not exist: install fonts-dejavu-core, or pass --font / "
            "set RETRACE_FONT to a TrueType (.ttf) file"));
      }
      return Annotate(bytes.status(), "cannot read the contact sheet's font");
    }
    auto font = std::unique_ptr<Font>(new Font(std::move(*bytes)));
    const auto* data =
        reinterpret_cast<const unsigned char*>(font->bytes_.data());
    const int offset = stbtt_GetFontOffsetForIndex(data, 0);
    if (offset < 0 || !stbtt_InitFont(&font->info_, data, offset)) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", path, "' is not a TrueType font"));
    }
    return font;
  }

  int Width(absl::string_view text, float px) const {
    const float scale = stbtt_ScaleForPixelHeight(&info_, px);
    float x = 0;
    int previous = 0;
    for (size_t pos = 0; pos < text.size();) {
      const int code = NextCodePoint(text, &pos);
      x += Kern(previous, code, scale) + Advance(code, scale);
      previous = code;
    }
    return static_cast<int>(x + 0.999f);
  }

  // `text` shortened with an ellipsis so that it is at most `max_width` wide.
  std::string Fit(absl::string_view text, float px, int max_width) const {
    if (Width(text, px) <= max_width) return std::string(text);
    constexpr absl::string_view kEllipsis = "\xE2\x80\xA6";
    std::string fitted(text);
    while (!fitted.empty()) {
      // Drop whole code points from the end.
      size_t cut = fitted.size() - 1;
      while (cut > 0 &&
             (static_cast<unsigned char>(fitted[cut]) & 0xC0) == 0x80) {
        --cut;
      }
      fitted.resize(cut);
      if (Width(absl::StrCat(fitted, kEllipsis), px) <= max_width) break;
    }
    return absl::StrCat(fitted, kEllipsis);
  }

  // Draws `text` with its top at `top` (the ascent below it is the baseline).
  void Draw(Canvas& canvas, absl::string_view text, int left, int top, float px,
            Rgb color) const {
    const float scale = stbtt_ScaleForPixelHeight(&info_, px);
    int ascent = 0, descent = 0, line_gap = 0;
    stbtt_GetFontVMetrics(&info_, &ascent, &descent, &line_gap);
    const int baseline = top + static_cast<int>(ascent * scale + 0.5f);
    float x = static_cast<float>(left);
    int previous = 0;
    std::vector<unsigned char> glyph;
    for (size_t pos = 0; pos < text.size();) {
      const int code = NextCodePoint(text, &pos);
      x += Kern(previous, code, scale);
      const float shift = x - static_cast<int>(x);
      int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
      stbtt_GetCodepointBitmapBoxSubpixel(&info_, code, scale, scale, shift, 0,
                                          &x0, &y0, &x1, &y1);
      const int w = x1 - x0;
      const int h = y1 - y0;
      if (w > 0 && h > 0) {
        glyph.assign(static_cast<size_t>(w) * h, 0);
        stbtt_MakeCodepointBitmapSubpixel(&info_, glyph.data(), w, h, w, scale,
                                          scale, shift, 0, code);
        for (int gy = 0; gy < h; ++gy) {
          for (int gx = 0; gx < w; ++gx) {
            canvas.Blend(static_cast<int>(x) + x0 + gx, baseline + y0 + gy,
                         color, glyph[static_cast<size_t>(gy) * w + gx]);
          }
        }
      }
      x += Advance(code, scale);
      previous = code;
    }
  }

 private:
  explicit Font(std::string bytes) : bytes_(std::move(bytes)) {}

  float Advance(int code, float scale) const {
    int advance = 0, left_bearing = 0;
    stbtt_GetCodepointHMetrics(&info_, code, &advance, &left_bearing);
    return advance * scale;
  }
  // Kerning between `previous` (0: start of the text) and `code`.
  float Kern(int previous, int code, float scale) const {
    if (previous == 0) return 0;
    return stbtt_GetCodepointKernAdvance(&info_, previous, code) * scale;
  }

  std::string bytes_;
  stbtt_fontinfo info_;
};

// A decoded image (RGB), or nothing when the bytes are absent or undecodable.
struct Decoded {
  std::unique_ptr<uint8_t, void (*)(void*)> pixels{nullptr, stbi_image_free};
  int width = 0;
  int height = 0;
  std::string problem;  // why there are no pixels
};

Decoded DecodeImage(absl::string_view bytes) {
  Decoded out;
  if (bytes.empty()) {
    out.problem = "no image";
    return out;
  }
  int channels = 0;
  out.pixels.reset(stbi_load_from_memory(
      reinterpret_cast<const stbi_uc*>(bytes.data()),
      static_cast<int>(bytes.size()), &out.width, &out.height, &channels, 3));
  if (out.pixels == nullptr) out.problem = "cannot decode";
  return out;
}

// Draws `bytes` scaled into the box x, y, box x box: by an integer factor
// when the image fits (crisp pixels), else shrunk to fit; centered on a grey
// background. Undecodable or missing images leave the grey box with a note.
void DrawImageInBox(Canvas& canvas, const Font& font, absl::string_view bytes,
                    int x, int y, int box) {
  canvas.FillRect(x, y, box, box, kBoxBackground);
  const Decoded image = DecodeImage(bytes);
  if (image.pixels == nullptr) {
    const std::string note = font.Fit(image.problem, kCaptionPx, box - 4);
    font.Draw(canvas, note, x + (box - font.Width(note, kCaptionPx)) / 2,
              y + box / 2 - 6, kCaptionPx, kMutedText);
    return;
  }
  int w = 0, h = 0;
  if (image.width <= box && image.height <= box) {
    const int factor = std::min(box / image.width, box / image.height);
    w = image.width * factor;
    h = image.height * factor;
  } else if (image.width >= image.height) {
    w = box;
    h = std::max(1, static_cast<int>(static_cast<int64_t>(image.height) * box /
                                     image.width));
  } else {
    h = box;
    w = std::max(1, static_cast<int>(static_cast<int64_t>(image.width) * box /
                                     image.height));
  }
  canvas.Blit(image.pixels.get(), image.width, image.height, x + (box - w) / 2,
              y + (box - h) / 2, w, h);
}

struct Grid {
  int columns = 1;
  int rows = 1;
};

Grid GridFor(int k, const SheetOptions& options) {
  Grid grid;
  grid.columns = std::max(1, std::min(k, options.columns));
  grid.rows = (std::max(k, 1) + grid.columns - 1) / grid.columns;
  return grid;
}

int PanelWidth(int k, const SheetOptions& options) {
  const Grid grid = GridFor(k, options);
  return grid.columns * options.thumb_size + (grid.columns - 1) * kSheetGap;
}

int ListHeight(int k, const SheetOptions& options) {
  const Grid grid = GridFor(k, options);
  return kSheetSectionHeight +
         grid.rows * (options.thumb_size + kSheetCaptionHeight) +
         (grid.rows - 1) * kSheetGap;
}

// One list (proponents or opponents) of a panel, its section title at top.
void DrawList(
    Canvas& canvas, const Font& font, absl::string_view title,
    const google::protobuf::RepeatedPtrField<v1::AttributedSample>& samples,
    int k, Rgb frame, int left, int top, const SheetOptions& options) {
  font.Draw(canvas, title, left, top + 2, kSectionPx, kMutedText);
  const Grid grid = GridFor(k, options);
  const int thumb = options.thumb_size;
  for (int i = 0; i < samples.size() && i < k; ++i) {
    const v1::AttributedSample& sample = samples.Get(i);
    const int x = left + (i % grid.columns) * (thumb + kSheetGap);
    const int y =
        top + kSheetSectionHeight +
        (i / grid.columns) * (thumb + kSheetCaptionHeight + kSheetGap);
    DrawImageInBox(canvas, font, sample.thumbnail_png(), x, y, thumb);
    canvas.Frame(x, y, thumb, thumb, 1, frame);
    const std::string line1 =
        absl::StrFormat("#%d  %.4g", sample.rank(), sample.score());
    const std::string line2 =
        sample.label_name().empty()
            ? absl::StrCat("label ", sample.label())
            : absl::StrCat(sample.label(), " ", sample.label_name());
    font.Draw(canvas, font.Fit(line1, kCaptionPx, thumb), x, y + thumb + 2,
              kCaptionPx, kText);
    font.Draw(canvas, font.Fit(line2, kCaptionPx, thumb), x,
              y + thumb + 2 + kCaptionLine, kCaptionPx, kMutedText);
  }
}

absl::string_view MethodNote(v1::Method method) {
  switch (method) {
    case v1::TRACIN:
      return "raw gradients";
    case v1::RETRAC:
      return "normalized gradients";
    default:
      return "";
  }
}

// The numeric options; the font is checked by loading it.
absl::Status CheckSheetRanges(const SheetOptions& options) {
  if (options.thumb_size < 16 || options.thumb_size > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the thumbnail size must be in 16..1024, got ", options.thumb_size));
  }
  if (options.query_size < 16 || options.query_size > 2048) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the query image size must be in 16..2048, got ", options.query_size));
  }
  if (options.columns < 1 || options.columns > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the sheet's columns must be in 1..64, got ", options.columns));
  }
  return absl::OkStatus();
}

}  // namespace

SheetSize ContactSheetSize(int k, bool opponents, int num_methods,
                           const SheetOptions& options) {
  const int list_height = ListHeight(k, options);
  const int panel_height = kSheetHeaderHeight + list_height +
                           (opponents ? kSheetListGap + list_height : 0);
  const int query_height =
      kSheetHeaderHeight + options.query_size + kSheetCaptionHeight;
  SheetSize size;
  size.width = 2 * kSheetMargin + options.query_size +
               num_methods * (kSheetPanelGap + PanelWidth(k, options));
  size.height = 2 * kSheetMargin + kSheetTitleHeight +
                std::max(query_height, panel_height);
  return size;
}

absl::Status ValidateSheetOptions(const SheetOptions& options) {
  RETURN_IF_ERROR(CheckSheetRanges(options));
  return Font::Load(options.font_path).status();
}

absl::StatusOr<std::string> RenderContactSheet(
    const v1::AttributeResponse& response, absl::string_view query_image,
    const SheetOptions& options) {
  RETURN_IF_ERROR(CheckSheetRanges(options));
  if (response.results().empty()) {
    return absl::InvalidArgumentError(
        "the response has no results to draw on a contact sheet");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Font> font, Font::Load(options.font_path));
  int k = 1;
  bool opponents = false;
  for (const v1::MethodResult& result : response.results()) {
    k = std::max({k, result.proponents_size(), result.opponents_size()});
    opponents = opponents || !result.opponents().empty();
  }
  const int num_methods = response.results_size();
  const SheetSize size = ContactSheetSize(k, opponents, num_methods, options);
  Canvas canvas(size.width, size.height);

  // Title.
  std::string title = "retrace contact sheet";
  if (!options.title.empty())
    absl::StrAppend(&title, "  \xC2\xB7  ", options.title);
  if (!response.store_id().empty()) {
    absl::StrAppend(&title, "  \xC2\xB7  store ",
                    response.store_id().substr(0, 12));
  }
  font->Draw(canvas, font->Fit(title, kTitlePx, size.width - 2 * kSheetMargin),
             kSheetMargin, kSheetMargin, kTitlePx, kText);

  // The query column.
  const int top = kSheetMargin + kSheetTitleHeight;
  const int query = options.query_size;
  font->Draw(canvas, "Query", kSheetMargin, top, kHeaderPx, kText);
  const int query_y = top + kSheetHeaderHeight;
  DrawImageInBox(canvas, *font, query_image, kSheetMargin, query_y, query);
  canvas.Frame(kSheetMargin, query_y, query, query, 2, kQueryFrame);
  if (!options.title.empty()) {
    font->Draw(canvas, font->Fit(options.title, kCaptionPx + 1, query),
               kSheetMargin, query_y + query + 4, kCaptionPx + 1, kMutedText);
  }

  // One panel per method.
  const int panel_width = PanelWidth(k, options);
  const int list_height = ListHeight(k, options);
  int left = kSheetMargin + query + kSheetPanelGap;
  for (const v1::MethodResult& result : response.results()) {
    // A light tint behind the panel separates the methods.
    canvas.FillRect(left - kSheetPanelGap / 3, top - 4,
                    panel_width + 2 * (kSheetPanelGap / 3),
                    size.height - top - kSheetMargin + 8, kPanelTint);
    const absl::string_view header = MethodTitle(result.method());
    font->Draw(canvas, header, left, top, kHeaderPx, kText);
    const int header_width = font->Width(header, kHeaderPx);
    font->Draw(canvas,
               font->Fit(MethodNote(result.method()), kNotePx,
                         std::max(0, panel_width - header_width - 8)),
               left + header_width + 8, top + 5, kNotePx, kMutedText);
    int y = top + kSheetHeaderHeight;
    DrawList(canvas, *font, "proponents (highest scores)", result.proponents(),
             k, kProponentFrame, left, y, options);
    if (opponents) {
      y += list_height + kSheetListGap;
      DrawList(canvas, *font, "opponents (lowest scores)", result.opponents(),
               k, kOpponentFrame, left, y, options);
    }
    left += panel_width + kSheetPanelGap;
  }

  std::string png;
  const int written = stbi_write_png_to_func(
      [](void* context, void* data, int size) {
        static_cast<std::string*>(context)->append(
            static_cast<const char*>(data), static_cast<size_t>(size));
      },
      &png, canvas.width(), canvas.height(), 3, canvas.data(),
      canvas.width() * 3);
  if (written == 0) {
    return absl::InternalError("cannot encode the contact sheet as PNG");
  }
  return png;
}

}  // namespace retrace::client
