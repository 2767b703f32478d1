/*
 * Shared harness for the ckptfs ZDTM-style programs (after CRIU's zdtm tests).
 *
 * Every program is run as `prog READY_FILE RESULT_FILE` with its working directory set to a
 * scratch directory of its own. It sets up one kernel object, writes "ready\n" to READY_FILE,
 * then waits -- keeping its object alive -- until it gets SIGUSR2 ("check now"). Then it checks
 * that the object is exactly as it would be had the process never been checkpointed, writes
 * "PASS\n" or "FAIL: <reason>\n" to RESULT_FILE and exits 0 or 1.
 *
 * Files are opened by path only when needed, so a process restored elsewhere (other pid, other
 * host with the same paths) still reports where the test looks.
 */
#ifndef ZDTM_H
#define ZDTM_H
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *zdtm_ready_path, *zdtm_result_path;
static volatile sig_atomic_t zdtm_check_now;

static inline void zdtm_on_usr2(int sig) { (void)sig; zdtm_check_now = 1; }

/* Write `text` to `path` through a temporary name and rename, so readers never see half. */
static inline void zdtm_write_file(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f || fputs(text, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
		fprintf(stderr, "zdtm: cannot write %s: %s\n", path, strerror(errno));
		exit(2);
	}
}

/* Parse argv and install the SIGUSR2 handler; call first thing in main(). */
static inline void zdtm_init(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s READY_FILE RESULT_FILE\n", argv[0]);
		exit(2);
	}
	zdtm_ready_path = argv[1];
	zdtm_result_path = argv[2];
	struct sigaction sa = { .sa_handler = zdtm_on_usr2 };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR2, &sa, NULL)) {
		perror("zdtm: sigaction SIGUSR2");
		exit(2);
	}
}

static inline void zdtm_ready(void) { zdtm_write_file(zdtm_ready_path, "ready\n"); }

/* Sleep in short steps until SIGUSR2 arrived; EINTR (timers, restore) just loops. */
static inline void zdtm_wait(void)
{
	struct timespec ts = { 0, 20 * 1000 * 1000 };
	while (!zdtm_check_now)
		nanosleep(&ts, NULL);
}

static inline void zdtm_pass(void) __attribute__((noreturn));
static inline void zdtm_pass(void)
{
	zdtm_write_file(zdtm_result_path, "PASS\n");
	exit(0);
}

static inline void zdtm_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static inline void zdtm_fail(const char *fmt, ...)
{
	char msg[4096];
	int n = snprintf(msg, sizeof(msg), "FAIL: ");
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg + n, sizeof(msg) - n - 1, fmt, ap);
	va_end(ap);
	strcat(msg, "\n");
	zdtm_write_file(zdtm_result_path, msg);
	exit(1);
}

/* Setup errors happen before "ready": report them on stderr, the test sees the early exit. */
#define zdtm_die(what) do { fprintf(stderr, "%s: %s: %s\n", __FILE__, what, strerror(errno)); exit(2); } while (0)

/* The byte at position i of the known pattern with seed s. */
static inline unsigned char zdtm_byte(unsigned long i, unsigned s) { return (unsigned char)((i * 131 + s) % 251); }

static inline void zdtm_fill(unsigned char *p, size_t n, unsigned long from, unsigned s)
{
	for (size_t i = 0; i < n; i++)
		p[i] = zdtm_byte(from + i, s);
}

/* Index of the first byte of p[0..n) that differs from the pattern, or -1. */
static inline long zdtm_mismatch(const unsigned char *p, size_t n, unsigned long from, unsigned s)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != zdtm_byte(from + i, s))
			return (long)i;
	return -1;
}

/* Does a process other than this one have `slave` open? (/proc/PID/fd links; the tty
 * programs wait for their detached keeper with it) */
static inline int held_elsewhere(const char *slave)
{
	DIR *proc = opendir("/proc");
	struct dirent *p;
	int found = 0;
	while (proc && !found && (p = readdir(proc))) {
		char dir[300], path[600], link[64];
		if (p->d_name[0] < '1' || p->d_name[0] > '9' || atoi(p->d_name) == getpid())
			continue;
		snprintf(dir, sizeof(dir), "/proc/%s/fd", p->d_name);
		DIR *fds = opendir(dir);
		struct dirent *f;
		while (fds && !found && (f = readdir(fds))) {
			snprintf(path, sizeof(path), "%s/%s", dir, f->d_name);
			ssize_t n = readlink(path, link, sizeof(link) - 1);
			found = n > 0 && (link[n] = 0, !strcmp(link, slave));
		}
		if (fds)
			closedir(fds);
	}
	if (proc)
		closedir(proc);
	return found;
}

#endif
