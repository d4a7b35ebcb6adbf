/*
 * A slow disk on demand. Loaded with LD_PRELOAD into the service under test (see
 * slow_disk.rs), it delays every fsync, fdatasync and sync_file_range of the process by the
 * milliseconds written in the file named by SLOW_SYNC_CONTROL, read at each call: no file,
 * or no number in it, means no delay. The write itself is done, only later.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long delay_ms(void) {
    const char *path = getenv("SLOW_SYNC_CONTROL");
    if (path == NULL) {
        return 0;
    }
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        return 0;
    }
    long ms = 0;
    if (fscanf(f, "%ld", &ms) != 1) {
        ms = 0;
    }
    fclose(f);
    return ms;
}

static void slow(void) {
    int saved = errno;
    long ms = delay_ms();
    if (ms > 0) {
        struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
        while (nanosleep(&t, &t) != 0 && errno == EINTR) {
        }
    }
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    slow();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    slow();
    return real(fd);
}

int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags) {
    static int (*real)(int, off_t, off_t, unsigned int);
    if (real == NULL) {
        real = (int (*)(int, off_t, off_t, unsigned int))dlsym(RTLD_NEXT, "sync_file_range");
    }
    slow();
    return real(fd, offset, nbytes, flags);
}
