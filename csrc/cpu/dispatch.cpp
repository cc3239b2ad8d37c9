// Run-time choice of the chunk kernels: one build runs on any x86-64 CPU, and
// no file is compiled with -march beyond the baseline.
//
// TORCHHEALTH_CPU_KERNEL=auto|scalar|generic|avx2|avx512 chooses at the first
// call (auto: the widest x86 kernel this CPU runs, else the portable one). The private op
// torch.ops.torchhealth._cpu_kernel(name) switches at run time, so that the
// tests run every kernel this CPU supports in one process and the benchmark
// compares them side by side; it is not part of the API.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "chunk_kernel.h"

namespace torchhealth {
namespace cpu {
namespace {

bool cpu_has(const std::string& isa) {
  // The same features the kernels are compiled for (kernel_avx2.cpp,
  // kernel_avx512.cpp); the runtime (libgcc, compiler-rt) also checks that the
  // OS saves the wider registers (XCR0).
#if defined(__x86_64__) && defined(__clang__)
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        cpu_has("avx2");
  }
  if (isa == "avx2") {
    // Clang's builtin cannot ask for F16C; every CPU with AVX2 and FMA has it.
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2");
  }
#elif defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("x86-64-v4");
  if (isa == "avx2") return __builtin_cpu_supports("x86-64-v3");
#endif
  return isa == "scalar" || isa == "generic";
}

const Kernels* by_name(const std::string& want) {
  static const Kernels scalar = scalar_kernels();
  static const Kernels avx2 = avx2_kernels();
  static const Kernels avx512 = avx512_kernels();
  static const Kernels generic = generic_kernels();
  TORCH_CHECK(want == "auto" || want == "scalar" || want == "generic" || want == "avx2" ||
                  want == "avx512",
              "TORCHHEALTH_CPU_KERNEL must be auto, scalar, generic, avx2 or avx512, not '", want,
              "'");
  if (want != "auto") {
    TORCH_CHECK(cpu_has(want), "TORCHHEALTH_CPU_KERNEL=", want, " but this CPU cannot run it");
  }
  const bool is_auto = want == "auto";
  if (want == "avx512" || (is_auto && cpu_has("avx512"))) return &avx512;
  if (want == "avx2" || (is_auto && cpu_has("avx2"))) return &avx2;
  return want == "scalar" ? &scalar : &generic;
}

std::atomic<const Kernels*> g_active{nullptr};

const Kernels* from_env() {
  const char* env = std::getenv("TORCHHEALTH_CPU_KERNEL");
  return by_name(env != nullptr && *env != '\0' ? env : "auto");
}

// Selects the kernels by name ("" only asks) and returns the previous name.
std::string select_cpu_kernel(std::string name) {
  const std::string previous = cpu_kernels().name;
  if (!name.empty()) g_active.store(by_name(name), std::memory_order_release);
  return previous;
}

}  // namespace

Kernels scalar_kernels() {
  return {"scalar", &chunk_stats<float>, &chunk_stats<c10::BFloat16>, &chunk_stats<c10::Half>,
          &chunk_stats<double>, &chunk_stats<c10::Float8_e4m3fn>, &chunk_stats<c10::Float8_e5m2>};
}

const Kernels& cpu_kernels() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    static const Kernels* const first = from_env();  // thread-safe, once
    const Kernels* expected = nullptr;
    g_active.compare_exchange_strong(expected, first, std::memory_order_acq_rel);
    k = g_active.load(std::memory_order_acquire);
  }
  return *k;
}

}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(torchhealth, m) {
  m.def("_cpu_kernel(str name) -> str", &cpu::select_cpu_kernel);
}

}  // namespace torchhealth
