// torch's CPU allocator with the large blocks in a region of their own (kernels/cpu_pool.py says why).
//
// Blocks of at least min_bytes come from one address range reserved at the first install (PROT_NONE, made
// readable and writable as the used part grows), carved best fit, lowest address first, in whole pages; a
// freed block merges with its free neighbours, and one that ends at the used part's top lowers the top.
// Freed pages stay resident for reuse (as glibc's heap keeps them under loop.keep_freed_cpu_memory) until
// more than trim_bytes of them lie above the top, or `cpu_pool_release` hands them back. Smaller blocks, and
// any block the region cannot hold, come from torch's default CPU allocator. Every block is reported to
// torch's profiler as the default allocator reports it (its memory events, posttrain.measure.TensorPeak).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kCommitStep = size_t{64} << 20;  // the usable part grows by mprotect in steps of this

struct Region {
  std::mutex mu;
  char* base = nullptr;
  size_t reserved = 0;   // bytes of address space
  size_t committed = 0;  // bytes readable and writable from base
  size_t top = 0;        // every byte from top on is free
  size_t resident = 0;   // bytes from base that may hold pages (top's high-water mark since the last trim)
  size_t trim_bytes = size_t{1} << 30;
  size_t in_use = 0;
  std::map<size_t, size_t> free_at;              // offset -> size of the free blocks below top
  std::set<std::pair<size_t, size_t>> free_fit;  // (size, offset) of the same blocks: best fit, lowest first
  std::unordered_map<size_t, size_t> used;       // offset -> size

  bool contains(const void* p) const {
    const char* c = static_cast<const char*>(p);
    return base != nullptr && c >= base && c < base + reserved;
  }

  void add_free(size_t off, size_t size) {
    free_at.emplace(off, size);
    free_fit.emplace(size, off);
  }

  void drop_free(size_t off, size_t size) {
    free_at.erase(off);
    free_fit.erase({size, off});
  }

  // n: a multiple of kPage. nullptr where the region cannot hold it.
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    size_t off;
    auto fit = free_fit.lower_bound({n, 0});
    if (fit != free_fit.end()) {
      const size_t size = fit->first;
      off = fit->second;
      drop_free(off, size);
      if (size > n) add_free(off + n, size - n);
    } else {
      if (n > reserved - top) return nullptr;
      if (top + n > committed) {
        size_t grow = (top + n - committed + kCommitStep - 1) / kCommitStep * kCommitStep;
        if (grow > reserved - committed) grow = reserved - committed;
        if (mprotect(base + committed, grow, PROT_READ | PROT_WRITE) != 0) return nullptr;
        committed += grow;
      }
      off = top;
      top += n;
      if (top > resident) resident = top;
    }
    used.emplace(off, n);
    in_use += n;
    return base + off;
  }

  void give(void* p) {
    std::lock_guard<std::mutex> lock(mu);
    size_t off = static_cast<size_t>(static_cast<char*>(p) - base);
    auto u = used.find(off);
    if (u == used.end()) return;  // not a block of ours: nothing to do (never happens through the deleter)
    size_t size = u->second;
    used.erase(u);
    in_use -= size;
    auto next = free_at.find(off + size);
    if (next != free_at.end()) {
      const size_t next_size = next->second;
      drop_free(next->first, next_size);
      size += next_size;
    }
    auto prev = free_at.lower_bound(off);
    if (prev != free_at.begin()) {
      --prev;
      const size_t prev_off = prev->first, prev_size = prev->second;
      if (prev_off + prev_size == off) {
        drop_free(prev_off, prev_size);
        off = prev_off;
        size += prev_size;
      }
    }
    if (off + size == top) {
      top = off;
      if (resident - top > trim_bytes) release_above_top();
    } else {
      add_free(off, size);
    }
  }

  // Hands the pages above top back to the kernel (the address space stays ours). Called with mu held.
  size_t release_above_top() {
    const size_t released = resident - top;
    if (released > 0 && madvise(base + top, released, MADV_DONTNEED) == 0) resident = top;
    return released;
  }
};

Region region;
size_t min_bytes = size_t{64} << 10;
c10::Allocator* fallback = nullptr;
c10::DeleterFnPtr fallback_delete = nullptr;

void pool_delete(void* p) {
  if (region.contains(p)) {
    c10::profiledCPUMemoryReporter().Delete(p);
    region.give(p);
  } else {
    fallback_delete(p);  // a block the default allocator made (raw_deallocate of a small one)
  }
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes >= min_bytes) {
      if (void* p = region.take((nbytes + kPage - 1) / kPage * kPage)) {
        c10::profiledCPUMemoryReporter().New(p, nbytes);
        return {p, p, &pool_delete, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return fallback->allocate(nbytes);
  }

  // raw_allocate / raw_deallocate (oneDNN's scratch buffers) take one deleter for every block
  c10::DeleterFnPtr raw_deleter() const override { return &pool_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const final {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator pool_allocator;

// A fork while another thread holds the lock would leave the child's copy locked for ever.
void lock_region() { region.mu.lock(); }
void unlock_region() { region.mu.unlock(); }

}  // namespace

extern "C" {

// Reserves `reserve_bytes` of address space at the first call (later calls keep the first region) and makes
// the pool torch's CPU allocator. Returns 1 if it now is, 0 where the reservation failed or another
// allocator of higher priority was set.
int cpu_pool_install(size_t reserve_bytes, size_t min_block_bytes, size_t trim_bytes) {
  if (fallback == nullptr) {
    fallback = c10::GetDefaultCPUAllocator();
    fallback_delete = fallback->raw_deleter();
    if (fallback_delete == nullptr) return 0;
  }
  if (region.base == nullptr) {
    reserve_bytes = reserve_bytes / kPage * kPage;
    void* p = mmap(nullptr, reserve_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return 0;
    region.base = static_cast<char*>(p);
    region.reserved = reserve_bytes;
    pthread_atfork(lock_region, unlock_region, unlock_region);
  }
  {
    std::lock_guard<std::mutex> lock(region.mu);
    region.trim_bytes = trim_bytes;
  }
  min_bytes = min_block_bytes < 1 ? 1 : min_block_bytes;
  c10::SetCPUAllocator(&pool_allocator, 0);
  return c10::GetCPUAllocator() == &pool_allocator;
}

// Gives torch back its default allocator; the pool's blocks still alive return to it when freed.
void cpu_pool_uninstall() {
  if (fallback != nullptr && c10::GetCPUAllocator() == &pool_allocator) c10::SetCPUAllocator(fallback, 0);
}

int cpu_pool_installed() { return c10::GetCPUAllocator() == &pool_allocator; }

// stats[0..5]: base address, reserved, top, resident, in use (bytes), free blocks below top
void cpu_pool_stats(size_t* stats) {
  std::lock_guard<std::mutex> lock(region.mu);
  stats[0] = reinterpret_cast<size_t>(region.base);
  stats[1] = region.reserved;
  stats[2] = region.top;
  stats[3] = region.resident;
  stats[4] = region.in_use;
  stats[5] = region.free_at.size();
}

// Hands the free pages above the used part back to the kernel; returns their bytes.
size_t cpu_pool_release() {
  std::lock_guard<std::mutex> lock(region.mu);
  return region.release_above_top();
}
}
