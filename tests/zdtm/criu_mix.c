// zdtm-flags: -pthread
/*
 * criu_mix: one process tree with the shape tests/test_criu.py checks CRIU images against.
 *
 *   root   main thread (SIGUSR1 blocked) + one worker thread (SIGHUP, SIGINT, SIGUSR2 blocked)
 *     fd 20  criu_mix.dat, O_RDWR, 4096 bytes, offset 1234
 *     fd 21/22  a pipe with "hello pipe" queued
 *     big    3 MiB private anonymous, every 8-byte word = its address ^ KEY_PRIV
 *     part   64 private anonymous pages (MADV_NOHUGEPAGE), only pages 0-15 and 32 written
 *            (same rule); the others never touched, so zero and not saved
 *            (each anonymous region sits between two PROT_NONE guard pages: one VMA each)
 *     fmap   criu_mix.map, 4 pages mapped MAP_PRIVATE: page 0 read (file page, not saved),
 *            page 1 written (copied on write: words = address ^ KEY_COW), pages 2-3 untouched
 *     shm    16 pages MAP_SHARED|MAP_ANONYMOUS shared with the child: word at object offset
 *            o = o ^ KEY_SHM. The root wrote pages 0-3, the child pages 2-5, so each task's
 *            page tables hold only its own pages (a forked child gets no ptes of a shared map)
 *     fd 23  write end of the wake pipe
 *   child  forked first (inherits little); fd 23 the read end of the wake pipe, where it
 *          blocks until the check
 *   zombie with CRIU_MIX_ZOMBIE=1 in the environment: a second child that exited with 7 and
 *          is reaped only at the check
 * With CRIU_MIX_HOSTNAME=name the root first moves into a UTS namespace of its own with that
 * hostname (the child shares it).
 *
 * criu_mix.addrs (in the cwd) tells the test where things are: `name hex` per line.
 * The check proves every byte, offset and mask as left, and that the shared map is still
 * shared both ways (root posts a token in page 6, the child answers token + 1).
 */
#include "zdtm.h"
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define PG 4096UL
#define BIG_LEN (3UL << 20)
#define PART_PAGES 64
#define SHM_PAGES 16
#define FMAP_PAGES 4
#define FILE_LEN 4096
#define FILE_POS 1234
#define FILE_FD 20
#define PIPE_R 21
#define PIPE_W 22
#define WAKE_FD 23	/* root: write end, child: read end of the wake pipe */
#define PIPE_TEXT "hello pipe"
#define KEY_PRIV 0x5A5A5A5A5A5A5A5AULL
#define KEY_COW 0x0123456789ABCDEFULL
#define KEY_SHM 0x00000C0000000000ULL
#define TOKEN 0x7070UL

static volatile int thread_go, thread_verdict;	/* 0 none yet, 1 ok, 2 bad mask */

/* Words of [p, p + n): (origin + byte offset) ^ key. */
static void fill_words(void *p, size_t n, uint64_t origin, uint64_t key)
{
	uint64_t *w = p;
	for (size_t i = 0; i < n / 8; i++)
		w[i] = (origin + 8 * i) ^ key;
}

static long bad_word(const void *p, size_t n, uint64_t origin, uint64_t key)
{
	const uint64_t *w = p;
	for (size_t i = 0; i < n / 8; i++)
		if (w[i] != ((origin + 8 * i) ^ key))
			return (long)(8 * i);
	return -1;
}

static int shm_pages_ok(unsigned char *shm, int from, int to)
{
	return bad_word(shm + from * PG, (to - from) * PG, from * PG, KEY_SHM) < 0;
}

static void child(unsigned char *shm, int ready_fd)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	fill_words(shm + 2 * PG, 4 * PG, 2 * PG, KEY_SHM);
	if (write(ready_fd, "c", 1) != 1)
		_exit(2);
	close(ready_fd);
	char c;
	ssize_t n;
	while ((n = read(WAKE_FD, &c, 1)) < 0 && errno == EINTR)
		;
	uint64_t *box = (uint64_t *)(shm + 6 * PG);
	if (n != 1 || !shm_pages_ok(shm, 0, 6) || box[0] != TOKEN)
		_exit(1);
	box[1] = TOKEN + 1;
	_exit(0);
}

static void *worker(void *arg)
{
	(void)arg;
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGHUP);
	sigaddset(&m, SIGINT);
	sigaddset(&m, SIGUSR2);
	pthread_sigmask(SIG_SETMASK, &m, NULL);
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (!thread_go)
		nanosleep(&ts, NULL);
	pthread_sigmask(SIG_BLOCK, NULL, &m);
	int ok = 1;
	for (int s = 1; s < 32; s++)
		ok &= sigismember(&m, s) == (s == SIGHUP || s == SIGINT || s == SIGUSR2);
	thread_verdict = ok ? 1 : 2;
	return NULL;
}

/* Wake the child (a byte down the wake pipe) and collect every child's end with wait():
 * no pids are used, a restore may give the children other ones (or a pid namespace whose pids
 * /proc does not show). The live child must exit 0 (it saw the shared pages and the token),
 * the zombie (if any) was an exit 7 all along. */
static void check_children(int with_zombie)
{
	int exited0 = 0, exited7 = 0;
	if (write(WAKE_FD, "w", 1) != 1)
		zdtm_fail("wake pipe: %s", strerror(errno));
	for (int i = 0; i < 1 + with_zombie; i++) {
		int status = 0;
		if (wait(&status) < 0 || !WIFEXITED(status))
			zdtm_fail("a child did not exit normally (status %#x, %s)", status, strerror(errno));
		exited0 += WEXITSTATUS(status) == 0;
		exited7 += WEXITSTATUS(status) == 7;
	}
	if (exited0 != 1 || exited7 != with_zombie)
		zdtm_fail("%d children exited 0 (want 1: the shared pages or the token were wrong "
			  "otherwise), %d exited 7 (want %d)", exited0, exited7, with_zombie);
}

static void put_at(int fd, int want)
{
	if (fd != want && (dup2(fd, want) != want || close(fd)))
		zdtm_die("dup2");
}

/* A region between two PROT_NONE guard pages, so the kernel never merges it with a
 * neighbour (a thread stack with the same flags would): each region is exactly one VMA. */
static unsigned char *map_anon(size_t len, int flags)
{
	unsigned char *g = mmap(NULL, len + 2 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g == MAP_FAILED || mmap(g + PG, len, PROT_READ | PROT_WRITE,
				    flags | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != g + PG)
		zdtm_die("mmap");
	return g + PG;
}

static unsigned char *map_file(const char *name)
{
	unsigned char page[PG];
	int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0644);
	for (int i = 0; fd >= 0 && i < FMAP_PAGES; i++) {
		zdtm_fill(page, PG, i * PG, 9);
		if (write(fd, page, PG) != (ssize_t)PG)
			zdtm_die("write criu_mix.map");
	}
	void *p = mmap(NULL, FMAP_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (fd < 0 || p == MAP_FAILED || close(fd))
		zdtm_die("map criu_mix.map");
	return p;
}

static void check_file_map(unsigned char *fmap)
{
	unsigned char page[PG];
	for (int i = 0; i < FMAP_PAGES; i++) {
		if (i == 1) {
			if (bad_word(fmap + PG, PG, (uintptr_t)(fmap + PG), KEY_COW) >= 0)
				zdtm_fail("copied-on-write page of the file map changed");
			continue;
		}
		zdtm_fill(page, PG, i * PG, 9);
		if (memcmp(fmap + i * PG, page, PG))
			zdtm_fail("file map page %d changed", i);
	}
	int fd = open("criu_mix.map", O_RDONLY);
	for (int i = 0; fd >= 0 && i < FMAP_PAGES; i++)
		if (read(fd, page, PG) != (ssize_t)PG || zdtm_mismatch(page, PG, i * PG, 9) >= 0)
			zdtm_fail("criu_mix.map page %d changed on disk", i);
}

static void check_part(unsigned char *part)
{
	for (int i = 0; i < PART_PAGES; i++) {
		unsigned char *p = part + i * PG;
		if (i < 16 || i == 32) {
			if (bad_word(p, PG, (uintptr_t)p, KEY_PRIV) >= 0)
				zdtm_fail("written page %d of part changed", i);
			continue;
		}
		for (unsigned long j = 0; j < PG; j++)
			if (p[j])
				zdtm_fail("untouched page %d of part holds %#x at %lu", i, p[j], j);
	}
}

static void check_fds(void)
{
	unsigned char buf[FILE_LEN];
	if (lseek(FILE_FD, 0, SEEK_CUR) != FILE_POS)
		zdtm_fail("criu_mix.dat offset is %ld, want %d", (long)lseek(FILE_FD, 0, SEEK_CUR), FILE_POS);
	if ((fcntl(FILE_FD, F_GETFL) & O_ACCMODE) != O_RDWR)
		zdtm_fail("criu_mix.dat is no longer O_RDWR");
	if (pread(FILE_FD, buf, FILE_LEN, 0) != FILE_LEN || zdtm_mismatch(buf, FILE_LEN, 0, 3) >= 0)
		zdtm_fail("criu_mix.dat contents changed");
	if (fcntl(PIPE_R, F_SETFL, O_NONBLOCK))
		zdtm_fail("pipe read end: %s", strerror(errno));
	ssize_t n = read(PIPE_R, buf, sizeof(buf));
	if (n != (ssize_t)strlen(PIPE_TEXT) || memcmp(buf, PIPE_TEXT, n))
		zdtm_fail("pipe gave %zd bytes, want \"%s\"", n, PIPE_TEXT);
	if (write(PIPE_W, "x", 1) != 1 || read(PIPE_R, buf, 2) != 1 || buf[0] != 'x')
		zdtm_fail("pipe ends no longer connected");
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	const char *hostname = getenv("CRIU_MIX_HOSTNAME");
	if (hostname && (unshare(CLONE_NEWUTS) || sethostname(hostname, strlen(hostname))))
		zdtm_die("own uts namespace");

	unsigned char *shm = map_anon(SHM_PAGES * PG, MAP_SHARED);
	fill_words(shm, 4 * PG, 0, KEY_SHM);
	int sync[2], wake[2];
	if (pipe(sync) || pipe(wake))
		zdtm_die("pipe");
	pid_t kid = fork();
	if (kid < 0)
		zdtm_die("fork");
	if (kid == 0) {
		close(sync[0]);
		close(wake[1]);
		put_at(wake[0], WAKE_FD);
		child(shm, sync[1]);
	}
	char c;
	close(sync[1]);
	close(wake[0]);
	put_at(wake[1], WAKE_FD);
	if (read(sync[0], &c, 1) != 1)
		zdtm_die("child did not start");
	close(sync[0]);
	pid_t zombie = -1;
	if (getenv("CRIU_MIX_ZOMBIE")) {
		zombie = fork();
		if (zombie < 0)
			zdtm_die("fork zombie");
		if (zombie == 0)
			_exit(7);
		siginfo_t si;	/* wait until it is dead, but leave it unreaped */
		if (waitid(P_PID, zombie, &si, WEXITED | WNOWAIT))
			zdtm_die("waitid zombie");
	}

	unsigned char buf[FILE_LEN];
	zdtm_fill(buf, FILE_LEN, 0, 3);
	int fd = open("criu_mix.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, buf, FILE_LEN) != FILE_LEN || lseek(fd, FILE_POS, SEEK_SET) != FILE_POS)
		zdtm_die("criu_mix.dat");
	put_at(fd, FILE_FD);
	int p[2];
	if (pipe(p))
		zdtm_die("pipe");
	put_at(p[0], PIPE_R);
	put_at(p[1], PIPE_W);
	if (write(PIPE_W, PIPE_TEXT, strlen(PIPE_TEXT)) != (ssize_t)strlen(PIPE_TEXT))
		zdtm_die("write pipe");

	unsigned char *big = map_anon(BIG_LEN, MAP_PRIVATE);
	fill_words(big, BIG_LEN, (uintptr_t)big, KEY_PRIV);
	unsigned char *part = map_anon(PART_PAGES * PG, MAP_PRIVATE);
	if (madvise(part, PART_PAGES * PG, MADV_NOHUGEPAGE))
		zdtm_die("madvise");
	fill_words(part, 16 * PG, (uintptr_t)part, KEY_PRIV);
	fill_words(part + 32 * PG, PG, (uintptr_t)(part + 32 * PG), KEY_PRIV);
	unsigned char *fmap = map_file("criu_mix.map");
	volatile unsigned char first = fmap[0];	/* a present file page: not saved */
	(void)first;
	fill_words(fmap + PG, PG, (uintptr_t)(fmap + PG), KEY_COW);

	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR1);
	sigprocmask(SIG_BLOCK, &m, NULL);
	pthread_t th;
	if (pthread_create(&th, NULL, worker, NULL))
		zdtm_die("pthread_create");

	char addrs[512];
	snprintf(addrs, sizeof(addrs), "big %lx\npart %lx\nfmap %lx\nshm %lx\nchild %x\nzombie %x\n",
		 (unsigned long)big, (unsigned long)part, (unsigned long)fmap, (unsigned long)shm,
		 kid, zombie > 0 ? zombie : 0);	/* pids as of now: the test's, not the check's */
	zdtm_write_file("criu_mix.addrs", addrs);
	zdtm_ready();
	zdtm_wait();

	if (bad_word(big, BIG_LEN, (uintptr_t)big, KEY_PRIV) >= 0)
		zdtm_fail("big region byte %ld changed", bad_word(big, BIG_LEN, (uintptr_t)big, KEY_PRIV));
	check_part(part);
	check_file_map(fmap);
	check_fds();
	thread_go = 1;
	pthread_join(th, NULL);
	if (thread_verdict != 1)
		zdtm_fail("worker thread: signal mask changed");
	sigprocmask(SIG_BLOCK, NULL, &m);
	if (!sigismember(&m, SIGUSR1) || sigismember(&m, SIGHUP))
		zdtm_fail("main thread: signal mask changed");
	if (!shm_pages_ok(shm, 0, 6))
		zdtm_fail("shared pages 0-5 changed");
	uint64_t *box = (uint64_t *)(shm + 6 * PG);
	box[0] = TOKEN;
	check_children(zombie > 0);
	if (box[1] != TOKEN + 1)
		zdtm_fail("child answered %#lx, want %#lx (map not shared any more?)",
			  (unsigned long)box[1], TOKEN + 1);
	char name[256] = "";
	if (hostname && (gethostname(name, sizeof(name)) || strcmp(name, hostname)))
		zdtm_fail("hostname is '%s', want '%s'", name, hostname);
	zdtm_pass();
}
