/* A stand-in for librbd's aio calls, for scripts/rbdpath.py: each call
 * completes at once and signals the image's eventfd, so what is measured is
 * our side of the submit and collect path (ctypes, Python, asyncio), not
 * librbd's or the cluster's. Every other librbd/librados symbol the backend
 * declares is a stub returning 0 (rbdpath.py generates them).
 * fakerbd_live: completions created and not yet released (a test's count);
 * fakerbd_refuse: when not 0, what aio reads and writes return instead of
 * starting (a test's refused call). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct { ssize_t ret; } comp_t;
static int efd = -1;
static void *done[1 << 16];
static int ndone;
long fakerbd_live;
int fakerbd_refuse;

static void finish(void *c, ssize_t ret) {
    ((comp_t *)c)->ret = ret;
    done[ndone++] = c;
    if (efd >= 0) eventfd_write(efd, 1);
}

int rbd_get_size(void *img, uint64_t *size) { *size = 1ULL << 30; return 0; }
int rbd_get_features(void *img, uint64_t *f) { *f = 1ULL << 2; return 0; }   /* exclusive-lock */
int rbd_aio_create_completion(void *arg, void *cb, void **c) {
    *c = calloc(1, sizeof(comp_t));
    fakerbd_live++;
    return 0;
}
int rbd_aio_writev(void *img, const struct iovec *iov, int n, uint64_t off, void *c) { finish(c, 0); return 0; }
int rbd_aio_read(void *img, uint64_t off, size_t len, char *buf, void *c) {
    if (fakerbd_refuse) return fakerbd_refuse;
    memset(buf, 0x5a, len);
    finish(c, len);
    return 0;
}
int rbd_aio_write(void *img, uint64_t off, size_t len, const char *buf, void *c) {
    if (fakerbd_refuse) return fakerbd_refuse;
    finish(c, 0);
    return 0;
}
int rbd_poll_io_events(void *img, void **comps, int n) {
    int k = ndone < n ? ndone : n;
    memcpy(comps, done, k * sizeof(void *));
    memmove(done, done + k, (ndone - k) * sizeof(void *));
    ndone -= k;
    return k;
}
ssize_t rbd_aio_get_return_value(void *c) { return ((comp_t *)c)->ret; }
int rbd_aio_is_complete(void *c) { return 1; }
void rbd_aio_release(void *c) { free(c); fakerbd_live--; }
int rbd_set_image_notification(void *img, int fd, int type) { efd = fd; return 0; }
