// Fresh output tensors of the CPU ops (csrc/cpu/output.cpp). From 4 MiB up they come from a
// bounded cache of freed blocks backed by transparent huge pages: a fresh large allocation
// otherwise costs a page fault and the zeroing of every 4 KiB page on first touch, and its
// accesses TLB misses (FASTDL_CPU_CACHE_MB, default 1024, bounds the cache; 0 turns it off).
#pragma once

#include <ATen/ATen.h>

namespace fastdl::cpu {

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                      at::MemoryFormat format = at::MemoryFormat::Contiguous);

}  // namespace fastdl::cpu
