// A console reporter that also remembers each run's wall seconds per
// iteration, so that a benchmark can print the `RATIO <name> <value>` lines
// that scripts/bench.sh collects, from runs measured side by side.
#ifndef RETRACE_BENCH_RATIO_REPORTER_H_
#define RETRACE_BENCH_RATIO_REPORTER_H_

#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace retrace::bench {

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  // Plain text: the output is kept in files and searched for RATIO lines.
  RatioReporter() : ConsoleReporter(OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      // Errored runs (SkipWithError) report no iterations.
      if (run.run_type != Run::RT_Iteration || run.iterations <= 0) continue;
      seconds_[run.benchmark_name()] =
          run.real_accumulated_time / double(run.iterations);
    }
    ConsoleReporter::ReportRuns(runs);
  }

  // Seconds per iteration of the run registered as `name` (Google Benchmark
  // appends options such as "/min_time:2.000/real_time"); < 0 when absent.
  double Seconds(const std::string& name) const {
    for (const auto& [run_name, seconds] : seconds_) {
      if (run_name == name || run_name.rfind(name + "/", 0) == 0)
        return seconds;
    }
    return -1;
  }

  // Prints "RATIO <ratio_name> <seconds(slow) / seconds(fast)>", or a comment
  // line when either run is missing (filtered out or failed).
  void PrintRatio(const char* ratio_name, const std::string& slow,
                  const std::string& fast) const {
    const double s = Seconds(slow), f = Seconds(fast);
    if (s <= 0 || f <= 0) {
      std::printf("# %s not measured (filtered out or failed)\n", ratio_name);
      return;
    }
    std::printf("RATIO %s %.2f\n", ratio_name, s / f);
  }

 private:
  std::map<std::string, double> seconds_;
};

}  // namespace retrace::bench

#endif  // RETRACE_BENCH_RATIO_REPORTER_H_
