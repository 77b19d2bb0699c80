#include "common/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace fastdl {

Isa detect_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// __builtin_cpu_supports takes a string literal; each answer is probed once.
#if defined(__x86_64__) || defined(__i386__)
#define FASTDL_CPU_SUPPORTS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature) != 0)
#else
#define FASTDL_CPU_SUPPORTS(feature) false
#endif

bool cpu_has_avx512_vnni() {
  static const bool has = FASTDL_CPU_SUPPORTS("avx512vnni");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = FASTDL_CPU_SUPPORTS("avx512bf16");
  return has;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa parse_isa(const char* name) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  TORCH_CHECK(false, "fastdl: unknown CPU ISA '", name, "'; expected one of scalar, avx2, avx512");
}

namespace {
std::atomic<int>& current() {
  static std::atomic<int> isa{[] {
    Isa best = detect_cpu_isa();
    const char* env = std::getenv("FASTDL_CPU_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(best);
    Isa asked = parse_isa(env);
    return static_cast<int>(static_cast<int>(asked) < static_cast<int>(best) ? asked : best);
  }()};
  return isa;
}
}  // namespace

Isa cpu_isa() {
  return static_cast<Isa>(current().load(std::memory_order_relaxed));
}

void set_cpu_isa(Isa isa) {
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(detect_cpu_isa()), "fastdl: this CPU ",
              "does not support ", isa_name(isa), " (best: ", isa_name(detect_cpu_isa()), ")");
  current().store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace fastdl
