// A preloaded layer in front of the process's allocator that keeps freed huge blocks mapped for reuse.
//
// Why: XLA CPU allocates one block for all of an executable's temporaries at every run (3.2 GB for
// MedNeXt-tiny's training step at 224 px, batch 32) and frees it when the run ends. Allocators hand blocks
// that large straight to the kernel (mimalloc 3 above about 1 GiB, glibc above 32 MiB), so each step maps and
// zero-fills them anew; on virtual machines whose guests report freed memory to the host (virtio-balloon free
// page reporting), the host takes those pages back within a second or two and the next step pays the host's
// faults as well: touching 3 GB of fresh memory took 0.37 s when it had just been freed and 3.5-4 s after a
// pause, and MedNeXt's steps alternated between 1.7 and 3.9 s. This layer serves requests of at least
// HUGE_MIN bytes itself, from mappings it keeps after free (up to half of physical memory, and only until
// a request they cannot serve), and passes every other call to the next allocator (mimalloc or glibc)
// unchanged.
//
// XLA frees a run's block on a pool thread once the run's outputs are ready, so the next step's request
// can come a moment before the block it should reuse is freed; mapping a second block then costs seconds.
// A request that a block in use would fit therefore waits up to WAIT_MS for it; if a wait ever runs out
// (the program really holds such blocks at once), requests stop waiting.
//
// Loaded by medjax/allocator.py as the first entry of LD_PRELOAD; see that module.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HUGE_MIN ((size_t)256 << 20)      // Requests served here: 256 MiB and up.
#define MAX_BLOCKS 64                     // Live plus cached mappings.
#define ALIGN_MAX ((size_t)2 << 20)       // Blocks start 2 MiB into their mapping: aligned for any request.
#define WAIT_MS 200

typedef struct {
  _Atomic(uintptr_t) start;  // The pointer handed out (0: empty slot).
  size_t capacity;           // Usable bytes from start.
  void* mapping;
  size_t mapping_size;
  int in_use;
} Block;

static Block blocks[MAX_BLOCKS];
static atomic_int live_or_cached;  // Slots in use: lets free() skip the scan when there are none.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed = PTHREAD_COND_INITIALIZER;
static int waiting_helps = 1;

static void* (*next_malloc)(size_t);
static void (*next_free)(void*);
static void* (*next_calloc)(size_t, size_t);
static void* (*next_realloc)(void*, size_t);
static int (*next_posix_memalign)(void**, size_t, size_t);
static void* (*next_aligned_alloc)(size_t, size_t);
static void* (*next_memalign)(size_t, size_t);
static size_t (*next_malloc_usable_size)(void*);

// dlsym may allocate before the next allocator is known: such requests come from this static arena.
static char bootstrap[1 << 16];
static size_t bootstrap_used;
static int resolving;

static void* bootstrap_alloc(size_t size) {
  size_t offset = (bootstrap_used + 15) & ~(size_t)15;
  if (offset + size > sizeof(bootstrap)) return NULL;
  bootstrap_used = offset + size;
  return bootstrap + offset;
}

static int from_bootstrap(const void* p) {
  return (const char*)p >= bootstrap && (const char*)p < bootstrap + sizeof(bootstrap);
}

static void resolve(void) {
  if (next_malloc || resolving) return;
  resolving = 1;
  next_calloc = dlsym(RTLD_NEXT, "calloc");
  next_free = dlsym(RTLD_NEXT, "free");
  next_realloc = dlsym(RTLD_NEXT, "realloc");
  next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
  next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
  next_memalign = dlsym(RTLD_NEXT, "memalign");
  next_malloc_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  next_malloc = dlsym(RTLD_NEXT, "malloc");
  resolving = 0;
}

// The slot whose block starts at p, or NULL. Called without the lock: a pointer being freed or resized
// was handed out by this layer before, under the lock, so its slot is visible.
static Block* find(const void* p) {
  if (atomic_load_explicit(&live_or_cached, memory_order_acquire) == 0) return NULL;
  for (int i = 0; i < MAX_BLOCKS; ++i) {
    if (atomic_load_explicit(&blocks[i].start, memory_order_acquire) == (uintptr_t)p) return &blocks[i];
  }
  return NULL;
}

// Unmaps a cached block and empties its slot; called with the lock held.
static void release(Block* b) {
  atomic_store_explicit(&b->start, 0, memory_order_release);
  atomic_fetch_sub_explicit(&live_or_cached, 1, memory_order_release);
  munmap(b->mapping, b->mapping_size);
}

// Whether block b can serve a request of size bytes: large enough, and wasting under a half of it.
static int fits(const Block* b, size_t size) {
  return b->start && b->capacity >= size && b->capacity - size <= size / 2;
}

// A block of at least size bytes aligned to alignment (at most ALIGN_MAX), or NULL when this layer does
// not take the request; zeroed when zero is set.
static void* huge_alloc(size_t size, size_t alignment, int zero) {
  if (size < HUGE_MIN || alignment > ALIGN_MAX) return NULL;
  pthread_mutex_lock(&lock);
  Block* best = NULL;
  for (int waited = 0;; waited = 1) {
    int in_use_fits = 0;
    for (int i = 0; i < MAX_BLOCKS; ++i) {  // The smallest cached block that fits.
      Block* b = &blocks[i];
      if (!fits(b, size)) continue;
      if (b->in_use) {
        in_use_fits = 1;
      } else if (!best || b->capacity < best->capacity) {
        best = b;
      }
    }
    if (best || !in_use_fits || !waiting_helps) break;
    if (waited) {
      waiting_helps = 0;
      break;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += (long)WAIT_MS * 1000000L;
    deadline.tv_sec += deadline.tv_nsec / 1000000000L;
    deadline.tv_nsec %= 1000000000L;
    while (pthread_cond_timedwait(&freed, &lock, &deadline) == 0) {
      int any_free = 0;
      for (int i = 0; i < MAX_BLOCKS && !any_free; ++i) any_free = fits(&blocks[i], size) && !blocks[i].in_use;
      if (any_free) break;
    }
  }
  if (best) {
    best->in_use = 1;
    pthread_mutex_unlock(&lock);
    if (zero) memset((void*)best->start, 0, size);
    return (void*)best->start;
  }
  // A miss: the cached blocks cannot serve this request (too small, or too large to waste), so they go back
  // to the system before a new block is mapped; what the cache holds never adds to the program's peak.
  // A program that alternates between blocks of two sizes pays a mapping per switch (a training loop's
  // validation, once per epoch), as it would without this layer.
  for (int i = 0; i < MAX_BLOCKS; ++i) {
    if (blocks[i].start && !blocks[i].in_use) release(&blocks[i]);
  }
  Block* slot = NULL;
  for (int i = 0; i < MAX_BLOCKS && !slot; ++i) {
    if (!blocks[i].start) slot = &blocks[i];
  }
  if (!slot) {
    pthread_mutex_unlock(&lock);
    return NULL;  // Every slot taken: the next allocator serves it.
  }
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t mapping_size = (ALIGN_MAX + size + page - 1) / page * page;
  void* mapping = mmap(NULL, mapping_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  uintptr_t start = ((uintptr_t)mapping + ALIGN_MAX) & ~(uintptr_t)(ALIGN_MAX - 1);
  madvise((void*)start, mapping_size - (start - (uintptr_t)mapping), MADV_HUGEPAGE);
  slot->capacity = mapping_size - (start - (uintptr_t)mapping);
  slot->mapping = mapping;
  slot->mapping_size = mapping_size;
  slot->in_use = 1;
  atomic_store_explicit(&slot->start, start, memory_order_release);
  atomic_fetch_add_explicit(&live_or_cached, 1, memory_order_release);
  pthread_mutex_unlock(&lock);
  return (void*)start;  // Fresh anonymous memory is zero.
}

// Keeps the block for reuse, then unmaps the largest cached blocks while the cache holds more than a
// half of physical memory.
static void huge_free(Block* block) {
  const size_t cache_max = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) / 2;
  pthread_mutex_lock(&lock);
  block->in_use = 0;
  pthread_cond_broadcast(&freed);
  for (;;) {
    size_t cached = 0;
    Block* largest = NULL;
    for (int i = 0; i < MAX_BLOCKS; ++i) {
      Block* b = &blocks[i];
      if (b->start && !b->in_use) {
        cached += b->capacity;
        if (!largest || b->capacity > largest->capacity) largest = b;
      }
    }
    if (cached <= cache_max) break;
    release(largest);
  }
  pthread_mutex_unlock(&lock);
}

void* malloc(size_t size) {
  resolve();
  if (!next_malloc) return bootstrap_alloc(size);
  void* p = huge_alloc(size, 16, 0);
  return p ? p : next_malloc(size);
}

void* calloc(size_t count, size_t size) {
  resolve();
  if (!next_calloc) return bootstrap_alloc(count * size);  // The bootstrap arena is zero.
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  void* p = huge_alloc(total, 16, 1);
  return p ? p : next_calloc(count, size);
}

void free(void* p) {
  if (!p || from_bootstrap(p)) return;
  Block* block = find(p);
  if (block) {
    huge_free(block);
    return;
  }
  resolve();
  next_free(p);
}

size_t malloc_usable_size(void* p) {
  if (!p || from_bootstrap(p)) return 0;
  Block* block = find(p);
  if (block) return block->capacity;
  resolve();
  return next_malloc_usable_size(p);
}

void* realloc(void* p, size_t size) {
  resolve();
  if (!p) return malloc(size);
  Block* block = from_bootstrap(p) ? NULL : find(p);
  if (!block && !from_bootstrap(p) && size < HUGE_MIN) return next_realloc(p, size);
  if (block && size >= HUGE_MIN && size <= block->capacity) return p;
  // The block moves between this layer, the bootstrap arena and the next allocator.
  size_t old_size = block                ? block->capacity
                    : from_bootstrap(p) ? (size_t)(bootstrap + sizeof(bootstrap) - (char*)p)
                                        : next_malloc_usable_size(p);
  void* q = malloc(size);
  if (!q) return NULL;
  memcpy(q, p, old_size < size ? old_size : size);
  free(p);
  return q;
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  resolve();
  void* p = huge_alloc(size, alignment, 0);
  if (p) {
    *out = p;
    return 0;
  }
  return next_posix_memalign(out, alignment, size);
}

void* aligned_alloc(size_t alignment, size_t size) {
  resolve();
  void* p = huge_alloc(size, alignment, 0);
  return p ? p : next_aligned_alloc(alignment, size);
}

void* memalign(size_t alignment, size_t size) {
  resolve();
  void* p = huge_alloc(size, alignment, 0);
  return p ? p : next_memalign(alignment, size);
}
