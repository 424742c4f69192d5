// Minimal leveled logging to stderr.
//
//   RETRACE_LOG(INFO) << "store opened: " << n << " samples";
//
// Thread-safe: each statement is written with one call. The minimum level is
// read from RETRACE_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO).
#ifndef RETRACE_COMMON_LOGGING_H_
#define RETRACE_COMMON_LOGGING_H_

#include <sstream>

namespace retrace {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

bool LogEnabled(LogLevel level);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace retrace

#define RETRACE_LOG_LEVEL_DEBUG ::retrace::LogLevel::kDebug
#define RETRACE_LOG_LEVEL_INFO ::retrace::LogLevel::kInfo
#define RETRACE_LOG_LEVEL_WARNING ::retrace::LogLevel::kWarning
#define RETRACE_LOG_LEVEL_ERROR ::retrace::LogLevel::kError

#define RETRACE_LOG(level)                                               \
  if (!::retrace::LogEnabled(RETRACE_LOG_LEVEL_##level)) {               \
  } else                                                                 \
    ::retrace::LogMessage(RETRACE_LOG_LEVEL_##level, __FILE__, __LINE__) \
        .stream()

#endif  // RETRACE_COMMON_LOGGING_H_
