// Fresh CPU output tensors (cpu/output.h): large ones from a cache of freed blocks on huge pages.
#include "cpu/output.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include <sys/mman.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

namespace fastdl::cpu {
namespace {

// Large outputs come from a bounded cache of freed blocks backed by transparent huge pages.
// glibc returns large freed blocks to the kernel (munmap above 32 MiB, heap trimming below), so
// a new output of tens of MiB is a page fault plus the zeroing of a page per 4 KiB on first
// touch: measured here, more time than the normalization itself. Like the CUDA caching
// allocator, freed blocks are kept (at most FASTDL_CPU_CACHE_MB, default 1024; 0 turns the
// cache off) for the next output of the same size. When a freed block does not fit, the blocks
// freed longest ago make room for it: a process whose sizes change (another model, another batch
// size) keeps caching the sizes it uses now.
class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }
  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* p = take(bytes);
    if (p == nullptr) {
      TORCH_CHECK(posix_memalign(&p, kHugePage, bytes) == 0, "fastdl: out of memory allocating ",
                  bytes, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP these are ordinary pages
#endif
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = bytes;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
  // The sizes of the cached free blocks, freed longest ago first.
  std::vector<int64_t> idle_sizes() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t> sizes;
    for (const auto& [bytes, p] : idle_) sizes.push_back(static_cast<int64_t>(bytes));
    return sizes;
  }

 private:
  static constexpr size_t kHugePage = size_t{2} << 20;

  OutputCache() {
    const char* env = std::getenv("FASTDL_CPU_CACHE_MB");
    limit_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 1024) << 20;
  }
  // A freed block: its size and address, in idle_ by the time it was freed (oldest first).
  using Idle = std::list<std::pair<size_t, void*>>;

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto [lo, hi] = free_.equal_range(bytes);
    if (lo == hi) return nullptr;
    const auto it = std::prev(hi);  // the most recently freed of this size
    void* p = it->second->second;
    idle_.erase(it->second);
    free_.erase(it);
    cached_ -= bytes;
    live_[p] = bytes;
    return p;
  }
  // Frees the block freed longest ago.
  void evict_oldest() {
    const auto [bytes, p] = idle_.front();
    auto [lo, hi] = free_.equal_range(bytes);
    while (lo->second != idle_.begin()) ++lo;
    free_.erase(lo);
    idle_.pop_front();
    cached_ -= bytes;
    std::free(p);
  }
  static void release(void* p) {
    OutputCache& c = get();
    std::lock_guard<std::mutex> lock(c.mu_);
    auto it = c.live_.find(p);
    const size_t bytes = it->second;
    c.live_.erase(it);
    if (bytes > c.limit_) return std::free(p);
    while (c.cached_ + bytes > c.limit_) c.evict_oldest();
    c.free_.emplace(bytes, c.idle_.emplace(c.idle_.end(), bytes, p));
    c.cached_ += bytes;
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;
  Idle idle_;
  std::multimap<size_t, Idle::iterator> free_;  // idle_ by size
  size_t cached_ = 0, limit_ = 0;
};

}  // namespace

// A fresh output tensor; large ones from the OutputCache.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                      at::MemoryFormat format) {
  const size_t bytes = c10::multiply_integers(sizes) * opts.dtype().itemsize();
  OutputCache& cache = OutputCache::get();
  if (bytes < OutputCache::kMinBytes || !cache.enabled())
    return at::empty(sizes, opts.memory_format(format));
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), format);
}

std::vector<int64_t> output_cache_blocks() {
  return OutputCache::get().idle_sizes();
}

at::Tensor as_output(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  // An empty t counts as contiguous in every format; a fresh one has format's strides.
  if (t.scalar_type() == dtype && t.is_contiguous(format) && t.numel() > 0) return t;
  at::Tensor out = new_output(t.sizes(), t.options().dtype(dtype), format);
  out.copy_(t);
  return out;
}

}  // namespace fastdl::cpu
