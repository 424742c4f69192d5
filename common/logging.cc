#include "common/logging.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace retrace {
namespace {

LogLevel MinLevel() {
  static const LogLevel level = [] {
    const char* env = std::getenv("RETRACE_LOG_LEVEL");
    if (env == nullptr) return LogLevel::kInfo;
    if (std::strcmp(env, "DEBUG") == 0) return LogLevel::kDebug;
    if (std::strcmp(env, "WARNING") == 0) return LogLevel::kWarning;
    if (std::strcmp(env, "ERROR") == 0) return LogLevel::kError;
    return LogLevel::kInfo;
  }();
  return level;
}

const char* LevelLetter(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "D";
    case LogLevel::kInfo:
      return "I";
    case LogLevel::kWarning:
      return "W";
    case LogLevel::kError:
      return "E";
  }
  return "?";
}

}  // namespace

bool LogEnabled(LogLevel level) { return level >= MinLevel(); }

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level) {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                now.time_since_epoch())
                .count() %
            1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  const char* base = std::strrchr(file, '/');
  char msbuf[8];
  std::snprintf(msbuf, sizeof(msbuf), ".%03d", static_cast<int>(ms));
  stream_ << LevelLetter(level) << " " << buf << msbuf << "Z "
          << (base ? base + 1 : file) << ":" << line << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  const std::string s = stream_.str();
  std::fwrite(s.data(), 1, s.size(), stderr);
  (void)level_;
}

}  // namespace retrace
