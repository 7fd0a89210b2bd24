/*
 * The native peer of `npm run bench:vhost-user`: an echo device served by QEMU's libvhost-user (C), built from the
 * QEMU source the project fetches. Each chain is answered with the bytes of its readable part copied into its
 * writable part, then the used element is pushed and the call eventfd signalled: the same work the TypeScript
 * back-end's echo device does. One queue, one connection, then exit.
 *
 * Usage: native-echo-backend SOCKET_PATH   (prints "ready" on stdout once listening)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "libvhost-user.h"

#define MAX_WATCHES 64

struct watch {
    int fd;
    int condition;
    vu_watch_cb cb;
    void *data;
};
static struct watch watches[MAX_WATCHES];
static int n_watches;

static void on_panic(VuDev *dev, const char *err) {
    (void)dev;
    fprintf(stderr, "libvhost-user panic: %s\n", err);
    exit(2);
}

static void set_watch(VuDev *dev, int fd, int condition, vu_watch_cb cb, void *data) {
    (void)dev;
    for (int i = 0; i < n_watches; i++) {
        if (watches[i].fd == fd) {
            watches[i] = (struct watch){fd, condition, cb, data};
            return;
        }
    }
    if (n_watches == MAX_WATCHES) on_panic(dev, "too many watches");
    watches[n_watches++] = (struct watch){fd, condition, cb, data};
}

static void remove_watch(VuDev *dev, int fd) {
    (void)dev;
    for (int i = 0; i < n_watches; i++) {
        if (watches[i].fd == fd) {
            watches[i] = watches[--n_watches];
            return;
        }
    }
}

/* Copies the device-readable bytes of an element into its device-writable buffers; returns the bytes written. */
static unsigned echo(VuVirtqElement *e) {
    unsigned written = 0;
    unsigned oi = 0, ii = 0;
    size_t ooff = 0, ioff = 0;
    while (oi < e->out_num && ii < e->in_num) {
        size_t n = e->out_sg[oi].iov_len - ooff;
        size_t room = e->in_sg[ii].iov_len - ioff;
        if (room < n) n = room;
        memcpy((char *)e->in_sg[ii].iov_base + ioff, (char *)e->out_sg[oi].iov_base + ooff, n);
        written += n;
        ooff += n;
        ioff += n;
        if (ooff == e->out_sg[oi].iov_len) { oi++; ooff = 0; }
        if (ioff == e->in_sg[ii].iov_len) { ii++; ioff = 0; }
    }
    return written;
}

static void handle_queue(VuDev *dev, int qidx) {
    VuVirtq *vq = vu_get_queue(dev, qidx);
    for (;;) {
        VuVirtqElement *e = vu_queue_pop(dev, vq, sizeof(VuVirtqElement));
        if (e == NULL) break;
        vu_queue_push(dev, vq, e, echo(e));
        free(e);
    }
    vu_queue_notify(dev, vq);
}

static uint64_t get_features(VuDev *dev) {
    (void)dev;
    return 1ULL << 32; /* VIRTIO_F_VERSION_1 */
}

static void queue_set_started(VuDev *dev, int qidx, bool started) {
    vu_set_queue_handler(dev, vu_get_queue(dev, qidx), started ? handle_queue : NULL);
}

static const VuDevIface iface = {
    .get_features = get_features,
    .queue_set_started = queue_set_started,
};

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 1;
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
    unlink(argv[1]);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 1) < 0) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    int cfd = accept(lfd, NULL, NULL);
    if (cfd < 0) {
        perror("accept");
        return 1;
    }
    VuDev dev;
    if (!vu_init(&dev, 1, cfd, on_panic, NULL, set_watch, remove_watch, &iface)) {
        fprintf(stderr, "vu_init failed\n");
        return 1;
    }
    for (;;) {
        struct pollfd pfds[MAX_WATCHES + 1];
        struct watch snapshot[MAX_WATCHES];
        int n = n_watches;
        memcpy(snapshot, watches, sizeof(struct watch) * n);
        pfds[0] = (struct pollfd){.fd = cfd, .events = POLLIN};
        for (int i = 0; i < n; i++) pfds[i + 1] = (struct pollfd){.fd = snapshot[i].fd, .events = snapshot[i].condition};
        if (poll(pfds, n + 1, -1) < 0) continue;
        if (pfds[0].revents) {
            if (!vu_dispatch(&dev)) break;
        }
        for (int i = 0; i < n; i++) {
            if (!pfds[i + 1].revents) continue;
            /* The dispatch above may have removed or replaced this watch (a new kick fd): skip stale ones. */
            int live = 0;
            for (int j = 0; j < n_watches; j++) live |= watches[j].fd == snapshot[i].fd && watches[j].cb == snapshot[i].cb;
            if (live) snapshot[i].cb(&dev, pfds[i + 1].revents, snapshot[i].data);
        }
    }
    vu_deinit(&dev);
    close(cfd);
    close(lfd);
    unlink(argv[1]);
    return 0;
}
