#include "common/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastdl {

namespace {
constexpr const char* kAmxName = "amx";
}  // namespace

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

bool cpu_has_amx_bf16() {
  static const bool has = [] {
#if defined(__x86_64__) && defined(__linux__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    const bool tile = (d >> 24 & 1) != 0, bf16 = (d >> 22 & 1) != 0;
    if (!tile || !bf16 || (__get_cpuid(1, &a, &b, &c, &d), (c >> 27 & 1) == 0)) return false;
    // XCR0 bits 17 and 18 (tile configuration and data) say the OS saves the tile state; Linux
    // then hands the 8 KiB of tile data to a process that asks (ARCH_REQ_XCOMP_PERM).
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    constexpr unsigned kTileState = 3u << 17;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return (lo & kTileState) == kTileState && cpu_has_avx512_bf16() &&
           syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
    return false;
#endif
  }();
  return has;
}

namespace {
// On unless FASTDL_CPU_ISA names a level below "amx".
std::atomic<bool>& amx_on() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("FASTDL_CPU_ISA");
    return env == nullptr || *env == '\0' || std::strcmp(env, kAmxName) == 0;
  }()};
  return on;
}
}  // namespace

bool cpu_amx() {
  return amx_on().load(std::memory_order_relaxed) && cpu_isa() == Isa::kAvx512 &&
         cpu_has_amx_bf16();
}

void set_cpu_amx(bool on) {
  TORCH_CHECK(!on || cpu_has_amx_bf16(), "fastdl: this CPU does not support amx (AMX-BF16 tiles ",
              "this process may use; best: ", isa_name(detect_cpu_isa()), ")");
  amx_on().store(on, std::memory_order_relaxed);
}

const char* cpu_isa_level() {
  return cpu_amx() ? kAmxName : isa_name(cpu_isa());
}

const char* best_cpu_isa_level() {
  return cpu_has_amx_bf16() && detect_cpu_isa() == Isa::kAvx512 ? kAmxName
                                                                : isa_name(detect_cpu_isa());
}

void set_cpu_isa_level(const char* name) {
  const bool amx = std::strcmp(name, kAmxName) == 0;
  const Isa isa = parse_isa(name);
  set_cpu_amx(amx);
  set_cpu_isa(isa);
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
  if (std::strcmp(name, kAmxName) == 0) return Isa::kAvx512;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  TORCH_CHECK(false, "fastdl: unknown CPU ISA '", name,
              "'; expected one of scalar, avx2, avx512, amx");
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
