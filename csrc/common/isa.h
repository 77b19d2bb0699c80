// Run-time CPU ISA dispatch. Kernels are compiled once per ISA (csrc/cpu/isa/*.cpp, each
// under its own `#pragma GCC target`), and the bind layer picks the table for cpu_isa().
#pragma once

namespace fastdl {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU supports (AVX-512 needs F+BW+VL+DQ; AVX2 needs AVX2+FMA).
Isa detect_cpu_isa();
// The ISA kernels use: detect_cpu_isa(), lowered by FASTDL_CPU_ISA or set_cpu_isa().
Isa cpu_isa();
// Lower (or restore) the ISA in use; asking for more than the CPU supports is an error.
void set_cpu_isa(Isa isa);
const char* isa_name(Isa isa);
Isa parse_isa(const char* name);

// Extensions beyond what Isa::kAvx512 guarantees, which kernels of its table may use when the CPU
// has them (the int8 GEMM's AVX512-VNNI, the bfloat16 GEMM's AVX512-BF16).
bool cpu_has_avx512_vnni();
bool cpu_has_avx512_bf16();

// AMX-BF16 tiles: the bfloat16 GEMM's block kernel of csrc/cpu/isa/amx.cpp. cpu_has_amx_bf16():
// the CPU has AMX-TILE and AMX-BF16 (and AVX512-BF16, whose kernels take the edges), the OS
// enables their state and (Linux) granted it to this
// process, asked once here. cpu_amx(): whether kernels use them now: the ISA in use is AVX-512
// (the AMX kernels are its table's twins) and AMX is not turned off (set_cpu_amx, or
// FASTDL_CPU_ISA set to a level below "amx").
bool cpu_has_amx_bf16();
bool cpu_amx();
// Turn AMX off or back on; on is an error where the CPU lacks it.
void set_cpu_amx(bool on);

// The levels the Python API names: scalar, avx2, avx512 and amx (AVX-512 with AMX tiles), the one
// in use, the best this CPU has, and setting one (set_cpu_isa and set_cpu_amx together).
const char* cpu_isa_level();
const char* best_cpu_isa_level();
void set_cpu_isa_level(const char* name);

}  // namespace fastdl
