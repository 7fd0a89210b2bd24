// Finds a file descriptor for the file behind one of libvfio-user's DMA mappings, and the file offset of a byte of
// it. libvfio-user maps every DMA_MAP region itself and keeps the client's fd private (vfu_dma_info_t carries only
// addresses); the backend wants its own fd-backed mapping (the host layer's fd regions, which the MR alias mapper
// can remap). /proc/self/maps names the mapping's file offset, device and inode; the fd libvfio-user holds for it
// is the one in /proc/self/fd with the same device and inode, and a dup of it is ours to map and close.
#include "dma_fd.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

namespace vrdma {

// Lines of /proc/self/maps read before giving up (a process with more mappings than this is not ours to serve).
constexpr int kMaxMapsLines = 1 << 20;
// Entries of /proc/self/fd looked at (the soft limit of open files is far below this).
constexpr int kMaxFdEntries = 1 << 20;

int DmaMappingFd(const void* mapping_base, const void* byte, uint64_t* file_offset) {
  FILE* maps = fopen("/proc/self/maps", "re");
  if (maps == nullptr) return -errno;
  const uintptr_t want = reinterpret_cast<uintptr_t>(mapping_base);
  char line[512];
  bool found = false;
  unsigned long start = 0, end = 0, offset = 0, ino = 0;
  unsigned int major_dev = 0, minor_dev = 0;
  for (int n = 0; n < kMaxMapsLines && fgets(line, sizeof line, maps) != nullptr; n++) {
    char perms[8];
    if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &start, &end, perms, &offset, &major_dev, &minor_dev, &ino) != 7) continue;
    if (start == want) {
      found = true;
      break;
    }
  }
  fclose(maps);
  if (!found || ino == 0) return -ENOENT;
  const uintptr_t at = reinterpret_cast<uintptr_t>(byte);
  if (at < start || at >= end) return -ERANGE;
  *file_offset = offset + (at - start);
  const dev_t dev = makedev(major_dev, minor_dev);

  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -errno;
  int result = -ENOENT;
  struct dirent* entry;
  for (int n = 0; n < kMaxFdEntries && (entry = readdir(dir)) != nullptr; n++) {
    char* tail = nullptr;
    long fd = strtol(entry->d_name, &tail, 10);
    if (tail == entry->d_name || *tail != '\0' || fd == dirfd(dir)) continue;
    struct stat st;
    if (fstat(static_cast<int>(fd), &st) != 0) continue;
    if (st.st_dev == dev && st.st_ino == ino) {
      int copy = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
      result = copy >= 0 ? copy : -errno;
      break;
    }
  }
  closedir(dir);
  return result;
}

}  // namespace vrdma
