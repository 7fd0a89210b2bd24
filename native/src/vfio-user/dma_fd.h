#pragma once
#include <stdint.h>

namespace vrdma {
// A new close-on-exec fd for the file mapped at `mapping_base` (a mapping this process holds, found in
// /proc/self/maps), and in *file_offset the file offset of `byte` inside that mapping; or -errno.
int DmaMappingFd(const void* mapping_base, const void* byte, uint64_t* file_offset);
}
