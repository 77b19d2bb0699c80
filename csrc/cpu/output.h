// Fresh output tensors of the CPU ops (csrc/cpu/output.cpp). From 1 MiB up they come from a
// bounded cache of freed blocks backed by transparent huge pages: a fresh large allocation
// otherwise costs a page fault and the zeroing of every 4 KiB page on first touch, and its
// accesses TLB misses (FASTDL_CPU_CACHE_MB, default 1024, bounds the cache; 0 turns it off).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace fastdl::cpu {

// Outputs at least this large are written with non-temporal stores where a kernel can: they
// cannot stay in the caches anyway, and streaming saves reading each destination line before
// writing it.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);

// t in `dtype` and dense in `format`: t itself when it already is, else a copy into new_output
// (what x.to(dtype).contiguous(format) gives, without a fresh allocation's page faults).
at::Tensor as_output(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format);

// Test hook: the sizes in bytes of the cached free blocks, freed longest ago first.
std::vector<int64_t> output_cache_blocks();

}  // namespace fastdl::cpu
