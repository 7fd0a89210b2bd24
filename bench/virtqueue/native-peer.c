/*
 * The native baseline of `npm run bench:virtqueue`: QEMU's libvhost-user (C, built from the QEMU source the
 * project fetches) doing exactly the workload bench/virtqueue/run.ts gives our engine: a split ring with
 * EVENT_IDX, batches of 3-descriptor chains made available by a driver loop, and the device side popping each
 * chain (vu_queue_pop: read, translate, build the element) and returning it (vu_queue_push: used element + index).
 * Only the device side is timed, in CPU time of the process. Prints one JSON object on stdout.
 *
 * Usage: native-peer QUEUE_SIZE BATCH SECONDS
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "libvhost-user.h"

#define MEM_SIZE (64u << 20)
#define DESC_GPA 0x0
#define AVAIL_GPA 0x100000
#define USED_GPA 0x200000
#define BUF_GPA 0x400000

static void on_panic(VuDev *dev, const char *err) {
    (void)dev;
    fprintf(stderr, "libvhost-user panic: %s\n", err);
    exit(2);
}

/* Wall-clock time bounds the run; CPU time of the process measures the device side, so that other load on the
 * machine (preemption) does not count against either peer. */
static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s QUEUE_SIZE BATCH SECONDS\n", argv[0]);
        return 1;
    }
    unsigned qsize = (unsigned)atoi(argv[1]);
    unsigned batch = (unsigned)atoi(argv[2]);
    double seconds = atof(argv[3]);
    if (batch * 3 > qsize) {
        fprintf(stderr, "batch * 3 must fit the queue\n");
        return 1;
    }
    uint8_t *mem = aligned_alloc(4096, MEM_SIZE);
    memset(mem, 0, MEM_SIZE);

    VuDevRegion region = {.gpa = 0, .size = MEM_SIZE, .qva = (uint64_t)(uintptr_t)mem, .mmap_offset = 0,
                          .mmap_addr = (uint64_t)(uintptr_t)mem};
    VuVirtq vq;
    memset(&vq, 0, sizeof(vq));
    VuDev dev;
    memset(&dev, 0, sizeof(dev));
    dev.nregions = 1;
    dev.regions = &region;
    dev.vq = &vq;
    dev.max_queues = 1;
    dev.panic = on_panic;
    dev.features = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_RING_F_EVENT_IDX);
    vq.vring.num = qsize;
    vq.vring.desc = (struct vring_desc *)(mem + DESC_GPA);
    vq.vring.avail = (struct vring_avail *)(mem + AVAIL_GPA);
    vq.vring.used = (struct vring_used *)(mem + USED_GPA);
    vq.enable = 1;
    vq.started = true;

    /* Chain k: descriptors 3k (16 B readable), 3k+1 (64 B readable), 3k+2 (64 B writable). */
    for (unsigned k = 0; k < batch; k++) {
        struct vring_desc *d = vq.vring.desc + 3 * k;
        uint64_t base = BUF_GPA + (uint64_t)k * 4096;
        d[0] = (struct vring_desc){.addr = base, .len = 16, .flags = VRING_DESC_F_NEXT, .next = 3 * k + 1};
        d[1] = (struct vring_desc){.addr = base + 256, .len = 64, .flags = VRING_DESC_F_NEXT, .next = 3 * k + 2};
        d[2] = (struct vring_desc){.addr = base + 1024, .len = 64, .flags = VRING_DESC_F_WRITE, .next = 0};
    }

    uint16_t avail_idx = 0, used_seen = 0;
    double device_ns = 0;
    unsigned long chains = 0;
    double start = now_ns();
    unsigned rounds = 0;
    for (;;) {
        /* Driver: make `batch` chains available. */
        for (unsigned k = 0; k < batch; k++) vq.vring.avail->ring[(avail_idx + k) % qsize] = 3 * k;
        __atomic_store_n(&vq.vring.avail->idx, (uint16_t)(avail_idx + batch), __ATOMIC_RELEASE);
        avail_idx += batch;

        double t0 = cpu_ns();
        for (;;) {
            VuVirtqElement *elem = vu_queue_pop(&dev, &vq, sizeof(VuVirtqElement));
            if (elem == NULL) break;
            vu_queue_push(&dev, &vq, elem, 64);
            free(elem);
            chains++;
        }
        device_ns += cpu_ns() - t0;

        /* Driver: reclaim. */
        uint16_t used = __atomic_load_n(&vq.vring.used->idx, __ATOMIC_ACQUIRE);
        if ((uint16_t)(used - used_seen) != batch) {
            fprintf(stderr, "lost chains: used moved %u, expected %u\n", (uint16_t)(used - used_seen), batch);
            return 3;
        }
        used_seen = used;
        if ((++rounds & 63) == 0 && now_ns() - start > seconds * 1e9) break;
    }
    printf("{\"chains\": %lu, \"device_ns\": %.0f, \"chains_per_sec\": %.0f}\n", chains, device_ns,
           chains / (device_ns / 1e9));
    return 0;
}
