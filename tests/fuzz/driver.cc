// A stand-in for libFuzzer where the compiler has none (GCC builds, and so
// scripts/test.sh and its --sanitize variant): the same fuzz targets, the
// same command line for what CTest uses, but blind mutation instead of
// coverage guidance. scripts/fuzz.sh builds the real libFuzzer binaries with
// clang for campaigns.
//
//   <target> [-max_total_time=S] [-runs=N] [-seed=N] [-flag=...] PATH...
//
// Every file under each PATH (a file or a folder, not recursive) is run as it
// is; then, until S seconds or N mutated runs have passed, a corpus entry is
// picked, mutated (bit flips, interesting bytes, inserts, deletes, copies of
// a range, splices with another entry, truncation) and run. Other -flags are
// accepted and ignored, so one command line serves both kinds of binary; the
// first folder, where libFuzzer would write new inputs, is only read. The
// run is a function of the seed and the corpus: a failure names the seed and
// the run that failed, which reproduce it with -runs.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc,
                                                          char*** argv);

namespace {

long long g_seed = 1;
long long g_run = -1;  // -1 while the corpus runs

// Names the seed and run on a crash or a sanitizer's abort, then dies as
// the signal would have it.
void OnFatalSignal(int signal) {
  char line[128];
  const int n = std::snprintf(line, sizeof(line),
                              "\nfatal signal %d in mutated run %lld of seed "
                              "%lld (reproduce: -seed=%lld -runs=%lld)\n",
                              signal, g_run, g_seed, g_seed, g_run + 1);
  if (n > 0) (void)!write(2, line, static_cast<size_t>(n));
  std::signal(signal, SIG_DFL);
  std::raise(signal);
}

using Input = std::vector<uint8_t>;

bool ReadFile(const std::filesystem::path& path, Input* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in),
              std::istreambuf_iterator<char>());
  return !in.bad();
}

bool Flag(const char* arg, const char* name, long long* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = std::atoll(arg + n + 1);
  return true;
}

// Bytes that often sit on a parser's edge: zero, sign bits, all ones, and
// the characters of numbers, quotes and brackets for the text formats.
constexpr uint8_t kInteresting[] = {0,   1,   0x7f, 0x80, 0xff, '0', '9', '-',
                                    '.', 'e', '"',  '[',  ']',  '{', '}', ':',
                                    ',', '=', '\n', '\\', ' ',  0xfe};

void Mutate(Input* in, const std::vector<Input>& corpus, std::mt19937_64& rng,
            size_t max_len) {
  auto pick = [&](size_t n) {
    return n == 0 ? 0 : static_cast<size_t>(rng() % n);
  };
  const int rounds = 1 + static_cast<int>(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    switch (rng() % 8) {
      case 0:  // flip a bit
        if (!in->empty()) (*in)[pick(in->size())] ^= 1u << (rng() % 8);
        break;
      case 1:  // an interesting byte
        if (!in->empty()) {
          (*in)[pick(in->size())] = kInteresting[pick(sizeof(kInteresting))];
        }
        break;
      case 2:  // a random byte
        if (!in->empty()) (*in)[pick(in->size())] = static_cast<uint8_t>(rng());
        break;
      case 3:  // insert bytes
        if (in->size() < max_len) {
          const size_t at = pick(in->size() + 1);
          const size_t n = 1 + pick(8);
          in->insert(in->begin() + at, n,
                     kInteresting[pick(sizeof(kInteresting))]);
        }
        break;
      case 4: {  // delete a range
        if (in->empty()) break;
        const size_t at = pick(in->size());
        const size_t n = 1 + pick(std::min<size_t>(16, in->size() - at));
        in->erase(in->begin() + at, in->begin() + at + n);
        break;
      }
      case 5: {  // copy a range over another place
        if (in->size() < 2) break;
        const size_t from = pick(in->size());
        const size_t to = pick(in->size());
        const size_t n = 1 + pick(std::min(in->size() - from, in->size() - to));
        std::memmove(in->data() + to, in->data() + from, n);
        break;
      }
      case 6: {  // splice: our head, another entry's tail
        const Input& other = corpus[pick(corpus.size())];
        if (other.empty()) break;
        const size_t head = pick(in->size() + 1);
        const size_t tail = pick(other.size());
        in->resize(head);
        in->insert(in->end(), other.begin() + tail, other.end());
        break;
      }
      case 7:  // truncate
        if (!in->empty()) in->resize(pick(in->size()));
        break;
    }
  }
  if (in->size() > max_len) in->resize(max_len);
}

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize != nullptr) LLVMFuzzerInitialize(&argc, &argv);
  long long max_time = 0, runs = -1, seed = 1, max_len = 1 << 16;
  std::vector<Input> corpus;
  for (int i = 1; i < argc; ++i) {
    if (Flag(argv[i], "-max_total_time", &max_time) ||
        Flag(argv[i], "-runs", &runs) || Flag(argv[i], "-seed", &seed) ||
        Flag(argv[i], "-max_len", &max_len)) {
      continue;
    }
    if (argv[i][0] == '-') continue;
    const std::filesystem::path path(argv[i]);
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(path)) {
      for (const auto& entry : std::filesystem::directory_iterator(path)) {
        if (entry.is_regular_file()) files.push_back(entry.path());
      }
    } else {
      files.push_back(path);
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      Input input;
      if (!ReadFile(file, &input)) {
        std::fprintf(stderr, "cannot read %s\n", file.c_str());
        return 1;
      }
      LLVMFuzzerTestOneInput(input.data(), input.size());
      corpus.push_back(std::move(input));
    }
  }
  std::printf("ran %zu corpus inputs\n", corpus.size());
  if (corpus.empty()) corpus.push_back({});
  if (max_time <= 0 && runs < 0) return 0;

  g_seed = seed;
  for (int signal : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    std::signal(signal, &OnFatalSignal);
  }
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  const auto start = std::chrono::steady_clock::now();
  long long done = 0;
  for (; runs < 0 || done < runs; ++done) {
    if (max_time > 0 && (done & 63) == 0 &&
        std::chrono::steady_clock::now() - start >=
            std::chrono::seconds(max_time)) {
      break;
    }
    Input input = corpus[static_cast<size_t>(rng() % corpus.size())];
    Mutate(&input, corpus, rng, static_cast<size_t>(max_len));
    g_run = done;
    LLVMFuzzerTestOneInput(input.data(), input.size());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  std::printf("%lld mutated runs in %.1f s (seed %lld), no failure\n", done,
              seconds, seed);
  return 0;
}
