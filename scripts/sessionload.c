/* Many iSCSI sessions from one process, for scripts/bench.py --sessions.
 *
 *   sessionload SECONDS QD BLOCK_BYTES URL...
 *
 * Opens one session per URL (a URL may repeat: several sessions to one
 * LUN), each under an initiator name of its own, and reads its capacity.
 * Prints "ready" and waits for a line on stdin; then each session keeps QD
 * random reads of BLOCK_BYTES in flight for SECONDS, and the program prints
 * one JSON line: I/Os done, seconds from the first submission to the last
 * completion, latency percentiles, errors. It waits for another line on
 * stdin before logging out, so the caller can look at the targets while
 * every session is still logged in.
 *
 * One thread, poll() over every session's socket, libiscsi's async calls:
 * the initiator costs a few microseconds of CPU per I/O, so on a small
 * machine the targets, not the initiator, set the pace (qemu-img bench
 * runs one session per process, and 64 of them would compete with the
 * targets for the CPUs).
 */
#include <errno.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct session {
    struct iscsi_context *iscsi;
    struct iscsi_url *url;
    uint64_t blocks;        /* LUN capacity in units of the I/O size */
    uint32_t block_size;    /* logical block size */
    uint64_t rng;
    int inflight;
};

struct io {
    struct session *s;
    uint64_t start_ns;
};

static uint32_t *lat_us;   /* latency of every completed I/O, in microseconds */
static size_t nlat, caplat;
static long errors, inflight_total;
static int running = 1;
static uint32_t io_bytes;
static uint64_t last_done_ns;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t next_rand(struct session *s)
{
    s->rng ^= s->rng << 13;
    s->rng ^= s->rng >> 7;
    s->rng ^= s->rng << 17;
    return s->rng;
}

static void submit(struct session *s);

static void done(struct iscsi_context *iscsi, int status, void *command_data, void *private_data)
{
    struct io *io = private_data;
    struct session *s = io->s;
    uint64_t t = now_ns();
    (void)iscsi;
    if (status != SCSI_STATUS_GOOD)
        errors++;
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat_us = realloc(lat_us, caplat * sizeof *lat_us);
        if (!lat_us) {
            fprintf(stderr, "sessionload: out of memory\n");
            exit(1);
        }
    }
    lat_us[nlat++] = (uint32_t)((t - io->start_ns) / 1000);
    last_done_ns = t;
    if (command_data)
        scsi_free_scsi_task(command_data);
    free(io);
    s->inflight--;
    inflight_total--;
    if (running)
        submit(s);
}

static void submit(struct session *s)
{
    struct io *io = malloc(sizeof *io);
    uint64_t lba = (next_rand(s) % s->blocks) * (io_bytes / s->block_size);
    if (!io) {
        fprintf(stderr, "sessionload: out of memory\n");
        exit(1);
    }
    io->s = s;
    io->start_ns = now_ns();
    if (!iscsi_read16_task(s->iscsi, s->url->lun, lba, io_bytes, s->block_size, 0, 0, 0, 0, 0, done, io)) {
        fprintf(stderr, "sessionload: cannot queue a read: %s\n", iscsi_get_error(s->iscsi));
        exit(1);
    }
    s->inflight++;
    inflight_total++;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        exit(0);   /* the caller went away */
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: sessionload SECONDS QD BLOCK_BYTES URL...\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    int qd = atoi(argv[2]);
    io_bytes = (uint32_t)atoi(argv[3]);
    int n = argc - 4;
    struct session *ss = calloc(n, sizeof *ss);
    struct pollfd *pfd = calloc(n, sizeof *pfd);
    if (!ss || !pfd || qd < 1 || io_bytes == 0 || seconds <= 0) {
        fprintf(stderr, "sessionload: bad arguments\n");
        return 2;
    }
    for (int i = 0; i < n; i++) {
        char name[96];
        struct session *s = &ss[i];
        snprintf(name, sizeof name, "iqn.2026-12.org.scsi-target:load-%d", i);
        s->iscsi = iscsi_create_context(name);
        s->url = s->iscsi ? iscsi_parse_full_url(s->iscsi, argv[4 + i]) : NULL;
        if (!s->url) {
            fprintf(stderr, "sessionload: bad URL %s\n", argv[4 + i]);
            return 1;
        }
        iscsi_set_session_type(s->iscsi, ISCSI_SESSION_NORMAL);
        iscsi_set_header_digest(s->iscsi, ISCSI_HEADER_DIGEST_NONE);
        iscsi_set_targetname(s->iscsi, s->url->target);
        if (iscsi_full_connect_sync(s->iscsi, s->url->portal, s->url->lun)) {
            fprintf(stderr, "sessionload: session %d: %s\n", i, iscsi_get_error(s->iscsi));
            return 1;
        }
        struct scsi_task *t = iscsi_readcapacity16_sync(s->iscsi, s->url->lun);
        struct scsi_readcapacity16 *rc = t && t->status == SCSI_STATUS_GOOD ? scsi_datain_unmarshall(t) : NULL;
        if (!rc || rc->block_length == 0 || io_bytes % rc->block_length) {
            fprintf(stderr, "sessionload: session %d: READ CAPACITY(16) failed\n", i);
            return 1;
        }
        s->block_size = rc->block_length;
        s->blocks = (rc->returned_lba + 1) * rc->block_length / io_bytes;
        s->rng = 0x9E3779B97F4A7C15ull * (i + 1);
        scsi_free_scsi_task(t);
        if (s->blocks == 0) {
            fprintf(stderr, "sessionload: session %d: LUN smaller than one I/O\n", i);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    wait_line();

    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < qd; j++)
            submit(&ss[i]);
    while (inflight_total > 0) {
        if (running && now_ns() >= deadline)
            running = 0;   /* no more submissions; what is in flight completes */
        for (int i = 0; i < n; i++) {
            pfd[i].fd = iscsi_get_fd(ss[i].iscsi);
            pfd[i].events = iscsi_which_events(ss[i].iscsi);
        }
        int r = poll(pfd, n, 100);
        if (r < 0 && errno != EINTR) {
            perror("sessionload: poll");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (pfd[i].revents && iscsi_service(ss[i].iscsi, pfd[i].revents) < 0) {
                fprintf(stderr, "sessionload: session %d: %s\n", i, iscsi_get_error(ss[i].iscsi));
                return 1;
            }
        }
    }
    qsort(lat_us, nlat, sizeof *lat_us, cmp_u32);
    printf("{\"ios\": %zu, \"seconds\": %.6f, \"p50_us\": %u, \"p99_us\": %u, \"errors\": %ld}\n",
           nlat, (last_done_ns - start) / 1e9, nlat ? lat_us[nlat / 2] : 0,
           nlat ? lat_us[(size_t)(nlat * 0.99)] : 0, errors);
    fflush(stdout);
    wait_line();
    for (int i = 0; i < n; i++) {
        iscsi_logout_sync(ss[i].iscsi);
        iscsi_destroy_url(ss[i].url);
        iscsi_destroy_context(ss[i].iscsi);
    }
    return 0;
}
