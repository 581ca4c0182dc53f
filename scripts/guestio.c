/* guestio: the I/O loop scripts/bench.py --vhost runs inside its guest.
 * fio would do, but its Debian build loads 80 MiB of libraries (every I/O
 * engine), too much for a test initramfs; this is the one loop needed,
 * built static.
 *
 *   guestio DEVICE seqread|seqwrite|randread BLOCK_SIZE COUNT
 *
 * O_DIRECT, one I/O at a time; prints "IOPS MB/s". Random offsets come
 * from a fixed-seed xorshift, so every run reads the same blocks. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: guestio DEVICE seqread|seqwrite|randread BLOCK_SIZE COUNT\n");
        return 2;
    }
    int write = strcmp(argv[2], "seqwrite") == 0, rnd = strcmp(argv[2], "randread") == 0;
    size_t bs = strtoul(argv[3], NULL, 0);
    long count = strtol(argv[4], NULL, 0);
    int fd = open(argv[1], (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    uint64_t size = 0;
    void *buf;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 || size < bs || posix_memalign(&buf, 4096, bs)) {
        perror(argv[1]);
        return 1;
    }
    memset(buf, 0x5a, bs);
    uint64_t blocks = size / bs, x = 88172645463325252ULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        uint64_t block = i % blocks;
        if (rnd) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            block = x % blocks;
        }
        ssize_t n = write ? pwrite(fd, buf, bs, block * bs) : pread(fd, buf, bs, block * bs);
        if (n != (ssize_t)bs) {
            perror("I/O");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.1f %.2f\n", count / s, count * (double)bs / s / 1e6);
    return 0;
}
