#include "server/data/image_codec.h"

// clang-format off: jpeglib.h needs stdio.h (FILE) before it.
#include <jpeglib.h>

#include <cstdio>
// clang-format on
#include <png.h>

#include <csetjmp>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"

namespace retrace::data {
namespace {

// Both libraries report errors through a callback that must not return; it
// longjmps back to the setjmp in one of the small functions below. Those
// functions hold no C++ object with a destructor between setjmp and the
// library calls, so the jump skips nothing; buffers are allocated by the
// callers before, and the library state is released by the RAII holders.

constexpr size_t kMessageSize = 200;

bool StartsWith(absl::string_view bytes, absl::string_view prefix) {
  return bytes.substr(0, prefix.size()) == prefix;
}

absl::Status Refuse(absl::string_view what, absl::string_view format,
                    absl::string_view reason) {
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": not a usable ", format, " image: ", reason));
}

// --- PNG
// ------------------------------------------------------------------------

struct PngState {
  const unsigned char* data = nullptr;
  size_t size = 0;
  size_t offset = 0;
  bool animated = false;
  char message[kMessageSize] = "";
};

void PngReadData(png_structp png, png_bytep out, size_t length) {
  auto* state = static_cast<PngState*>(png_get_io_ptr(png));
  if (length > state->size - state->offset) {
    png_error(png, "the file ends early (truncated)");
  }
  std::memcpy(out, state->data + state->offset, length);
  state->offset += length;
}

[[noreturn]] void PngFail(png_structp png, png_const_charp message) {
  auto* state = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(state->message, sizeof(state->message), "%s", message);
  png_longjmp(png, 1);
}

void PngIgnoreWarning(png_structp, png_const_charp) {}

// Unknown chunks are skipped; acTL marks an animated PNG (APNG), which
// libpng itself does not know.
// Unknown critical chunks (upper-case first letter) stay errors.
int PngUnknownChunk(png_structp png, png_unknown_chunkp chunk) {
  auto* state = static_cast<PngState*>(png_get_user_chunk_ptr(png));
  if (std::memcmp(chunk->name, "acTL", 4) == 0) state->animated = true;
  const bool critical = (chunk->name[0] & 0x20) == 0;
  return critical ? 0 : 1;
}

class PngReader {
 public:
  explicit PngReader(PngState* state) {
    png_ = png_create_read_struct(PNG_LIBPNG_VER_STRING, state, &PngFail,
                                  &PngIgnoreWarning);
    if (png_ != nullptr) info_ = png_create_info_struct(png_);
  }
  ~PngReader() { png_destroy_read_struct(&png_, &info_, nullptr); }
  PngReader(const PngReader&) = delete;
  PngReader& operator=(const PngReader&) = delete;

  png_structp png() const { return png_; }
  png_infop info() const { return info_; }

 private:
  png_structp png_ = nullptr;
  png_infop info_ = nullptr;
};

struct PngRawHeader {
  png_uint_32 width = 0;
  png_uint_32 height = 0;
  int bit_depth = 0;
  int color_type = 0;
};

bool PngReadHeader(png_structp png, png_infop info, PngRawHeader* out) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_read_info(png, info);
  out->width = png_get_image_width(png, info);
  out->height = png_get_image_height(png, info);
  out->bit_depth = png_get_bit_depth(png, info);
  out->color_type = png_get_color_type(png, info);
  return true;
}

// Sets the transforms to 8-bit gray / gray + alpha / RGB / RGBA and returns
// the channels and bytes per row that result.
bool PngSetTransforms(png_structp png, png_infop info, int color_type,
                      int* channels, size_t* row_bytes) {
  if (setjmp(png_jmpbuf(png))) return false;
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY) png_set_expand_gray_1_2_4_to_8(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  *channels = png_get_channels(png, info);
  *row_bytes = png_get_rowbytes(png, info);
  return true;
}

bool PngReadPixels(png_structp png, png_infop info, png_bytepp rows) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_read_image(png, rows);
  // The chunks after the pixels are read too, so their CRCs are checked.
  png_read_end(png, info);
  return true;
}

int PngChannels(int color_type) {
  switch (color_type) {
    case PNG_COLOR_TYPE_GRAY:
      return 1;
    case PNG_COLOR_TYPE_GRAY_ALPHA:
      return 2;
    case PNG_COLOR_TYPE_RGB:
    case PNG_COLOR_TYPE_PALETTE:
      return 3;
    case PNG_COLOR_TYPE_RGB_ALPHA:
      return 4;
    default:
      return 0;
  }
}

absl::StatusOr<DecodedPixels> DecodePng(absl::string_view bytes,
                                        absl::string_view what,
                                        const HeaderCheck& check) {
  PngState state;
  state.data = reinterpret_cast<const unsigned char*>(bytes.data());
  state.size = bytes.size();
  PngReader reader(&state);
  if (reader.png() == nullptr || reader.info() == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": cannot allocate the PNG decoder"));
  }
  png_structp png = reader.png();
  png_set_read_fn(png, &state, &PngReadData);
  // Damage of any kind is an error, not a warning.
  png_set_crc_action(png, PNG_CRC_ERROR_QUIT, PNG_CRC_ERROR_QUIT);
  png_set_benign_errors(png, 0);
  // Ancillary chunks (text, ICC profiles) cannot make libpng allocate more.
  png_set_chunk_malloc_max(png, 1 << 20);
  png_set_chunk_cache_max(png, 1000);
  static const png_byte kAnimationControl[] = {'a', 'c', 'T', 'L', '\0'};
  png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_ALWAYS, kAnimationControl,
                              1);
  png_set_read_user_chunk_fn(png, &state, &PngUnknownChunk);

  PngRawHeader raw;
  if (!PngReadHeader(png, reader.info(), &raw)) {
    return Refuse(what, "PNG", state.message);
  }
  if (state.animated) {
    return Refuse(what, "PNG",
                  "it is animated (APNG); send one frame as a still image");
  }
  if (raw.bit_depth == 16) {
    return Refuse(what, "PNG",
                  "it has 16-bit samples; retrace takes 8-bit images (convert "
                  "it to 8 bits as the model's training data was converted)");
  }
  DecodedPixels out;
  out.header.format = "PNG";
  out.header.width = raw.width;
  out.header.height = raw.height;
  out.header.channels = PngChannels(raw.color_type);
  if (out.header.channels == 0) {
    return Refuse(what, "PNG",
                  absl::StrCat("unknown colour type ", raw.color_type));
  }
  RETURN_IF_ERROR(check(out.header));

  int channels = 0;
  size_t row_bytes = 0;
  if (!PngSetTransforms(png, reader.info(), raw.color_type, &channels,
                        &row_bytes)) {
    return Refuse(what, "PNG", state.message);
  }
  if (channels != out.header.channels ||
      row_bytes != static_cast<size_t>(raw.width) * channels) {
    return Refuse(what, "PNG", "its pixel layout is not 8 bits per sample");
  }
  out.pixels.resize(row_bytes * raw.height);
  std::vector<png_bytep> rows(raw.height);
  for (png_uint_32 y = 0; y < raw.height; ++y) {
    rows[y] = out.pixels.data() + y * row_bytes;
  }
  if (!PngReadPixels(png, reader.info(), rows.data())) {
    return Refuse(what, "PNG", state.message);
  }
  return out;
}

// --- JPEG
// -----------------------------------------------------------------------

struct JpegState {
  jpeg_error_mgr errors;  // first: libjpeg's err pointer is cast back to this
  jpeg_progress_mgr progress;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + kMessageSize] = "";
};

[[noreturn]] void JpegFail(j_common_ptr cinfo) {
  auto* state = reinterpret_cast<JpegState*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, state->message);
  std::longjmp(state->jump, 1);
}

// Level −1 is a warning, which libjpeg gives for corrupt data it can step
// over; here it is an error. Trace messages (level ≥ 0) are dropped.
void JpegMessage(j_common_ptr cinfo, int level) {
  if (level < 0) JpegFail(cinfo);
}

void JpegProgress(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->inputctl != nullptr && d->input_scan_number > kMaxJpegScans) {
    auto* state = reinterpret_cast<JpegState*>(cinfo->err);
    std::snprintf(state->message, sizeof(state->message),
                  "a progressive file with more than %d scans", kMaxJpegScans);
    std::longjmp(state->jump, 1);
  }
}

class JpegReader {
 public:
  explicit JpegReader(JpegState* state) {
    cinfo_.err = jpeg_std_error(&state->errors);
    state->errors.error_exit = &JpegFail;
    state->errors.emit_message = &JpegMessage;
    state->progress.progress_monitor = &JpegProgress;
  }
  ~JpegReader() {
    if (created_) jpeg_destroy_decompress(&cinfo_);
  }
  JpegReader(const JpegReader&) = delete;
  JpegReader& operator=(const JpegReader&) = delete;

  jpeg_decompress_struct* cinfo() { return &cinfo_; }
  void set_created() { created_ = true; }

 private:
  jpeg_decompress_struct cinfo_{};
  bool created_ = false;
};

bool JpegCreate(JpegReader* reader, JpegState* state) {
  if (setjmp(state->jump)) return false;
  jpeg_create_decompress(reader->cinfo());
  reader->set_created();
  return true;
}

bool JpegReadHeader(j_decompress_ptr cinfo, JpegState* state,
                    const unsigned char* data, size_t size) {
  if (setjmp(state->jump)) return false;
  cinfo->progress = &state->progress;
  // Far above what a 256 x 256 image needs, far below what a hostile header
  // could ask for.
  cinfo->mem->max_memory_to_use = 64L << 20;
  jpeg_mem_src(cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(cinfo, TRUE);
  return true;
}

bool JpegStart(j_decompress_ptr cinfo, JpegState* state) {
  if (setjmp(state->jump)) return false;
  jpeg_calc_output_dimensions(cinfo);
  return true;
}

bool JpegReadPixels(j_decompress_ptr cinfo, JpegState* state, uint8_t* pixels,
                    size_t row_bytes) {
  if (setjmp(state->jump)) return false;
  jpeg_start_decompress(cinfo);
  while (cinfo->output_scanline < cinfo->output_height) {
    JSAMPROW row = pixels + cinfo->output_scanline * row_bytes;
    jpeg_read_scanlines(cinfo, &row, 1);
  }
  jpeg_finish_decompress(cinfo);
  return true;
}

absl::StatusOr<DecodedPixels> DecodeJpeg(absl::string_view bytes,
                                         absl::string_view what,
                                         const HeaderCheck& check) {
  JpegState state;
  JpegReader reader(&state);
  if (!JpegCreate(&reader, &state)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, ": cannot allocate the JPEG decoder (", state.message, ")"));
  }
  j_decompress_ptr cinfo = reader.cinfo();
  if (!JpegReadHeader(cinfo, &state,
                      reinterpret_cast<const unsigned char*>(bytes.data()),
                      bytes.size())) {
    return Refuse(what, "JPEG", state.message);
  }
  if (cinfo->data_precision != 8) {
    return Refuse(what, "JPEG",
                  absl::StrCat("it has ", cinfo->data_precision,
                               "-bit samples; retrace takes 8-bit images"));
  }
  DecodedPixels out;
  out.header.format = "JPEG";
  out.header.width = cinfo->image_width;
  out.header.height = cinfo->image_height;
  switch (cinfo->num_components) {
    case 1:
      out.header.channels = 1;
      cinfo->out_color_space = JCS_GRAYSCALE;
      break;
    case 3:
      out.header.channels = 3;
      cinfo->out_color_space = JCS_RGB;
      break;
    case 4:
      return Refuse(what, "JPEG",
                    "it is CMYK (4 components); convert it to RGB first");
    default:
      return Refuse(what, "JPEG",
                    absl::StrCat("it has ", cinfo->num_components,
                                 " components; 1 (gray) or 3 (colour) "
                                 "expected"));
  }
  RETURN_IF_ERROR(check(out.header));
  if (!JpegStart(cinfo, &state)) return Refuse(what, "JPEG", state.message);
  if (cinfo->output_width != cinfo->image_width ||
      cinfo->output_height != cinfo->image_height ||
      cinfo->output_components != out.header.channels) {
    return Refuse(what, "JPEG", "its output shape differs from its header");
  }
  const size_t row_bytes =
      static_cast<size_t>(cinfo->output_width) * out.header.channels;
  out.pixels.resize(row_bytes * cinfo->output_height);
  if (!JpegReadPixels(cinfo, &state, out.pixels.data(), row_bytes)) {
    return Refuse(what, "JPEG", state.message);
  }
  return out;
}

std::string LeadingBytes(absl::string_view bytes) {
  std::string hex;
  for (size_t i = 0; i < bytes.size() && i < 8; ++i) {
    absl::StrAppend(&hex, i == 0 ? "" : " ",
                    absl::StrFormat("%02x", static_cast<uint8_t>(bytes[i])));
  }
  return hex;
}

}  // namespace

absl::StatusOr<DecodedPixels> DecodePixels(absl::string_view bytes,
                                           absl::string_view what,
                                           const HeaderCheck& check) {
  if (bytes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": the image data is empty"));
  }
  if (StartsWith(bytes, "\x89PNG\r\n\x1a\n")) {
    return DecodePng(bytes, what, check);
  }
  if (StartsWith(bytes, "\xff\xd8\xff")) return DecodeJpeg(bytes, what, check);
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": not a PNG or JPEG file (it starts with bytes ",
                   LeadingBytes(bytes), ")"));
}

}  // namespace retrace::data
