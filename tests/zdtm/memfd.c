/*
 * memfd: a sealable memfd "zdtm-memfd" (fd 50, O_RDWR, 10000 pattern bytes, offset 777, seals
 * SHRINK|GROW), a second read-only description of the same memfd (fd 51, offset 1234, opened
 * through /proc/self/fd/50), and a plain memfd "plain" (fd 52, "hello", offset 3, which the
 * kernel seals with F_SEAL_SEAL). After SIGUSR2: names, contents, offsets, modes and seals are
 * back, and a write through fd 50 is read through fd 51 (one memfd, two descriptions).
 */
#include "zdtm.h"
#include <sys/mman.h>

#define N 10000

static void place(int fd, int want)
{
	if (fd < 0 || (fd != want && (dup2(fd, want) != want || close(fd))))
		zdtm_die("place");
}

static void name_is(int fd, const char *want)
{
	char path[64], link[256];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	link[n < 0 ? 0 : n] = 0;
	if (strcmp(link, want))
		zdtm_fail("fd %d is %s, want %s", fd, link, want);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	static unsigned char buf[N];
	zdtm_fill(buf, N, 0, 7);
	place(memfd_create("zdtm-memfd", MFD_ALLOW_SEALING), 50);
	if (write(50, buf, N) != N || lseek(50, 777, SEEK_SET) != 777 ||
	    fcntl(50, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
		zdtm_die("fill memfd");
	place(open("/proc/self/fd/50", O_RDONLY), 51);
	if (lseek(51, 1234, SEEK_SET) != 1234)
		zdtm_die("lseek");
	place(memfd_create("plain", 0), 52);
	if (write(52, "hello", 5) != 5 || lseek(52, 3, SEEK_SET) != 3)
		zdtm_die("fill plain");
	zdtm_ready();
	zdtm_wait();

	name_is(50, "/memfd:zdtm-memfd (deleted)");
	name_is(52, "/memfd:plain (deleted)");
	if (fcntl(50, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW))
		zdtm_fail("seals of fd 50: 0x%x", fcntl(50, F_GET_SEALS));
	if (fcntl(52, F_GET_SEALS) != F_SEAL_SEAL)
		zdtm_fail("seals of fd 52: 0x%x", fcntl(52, F_GET_SEALS));
	if (lseek(50, 0, SEEK_CUR) != 777 || lseek(51, 0, SEEK_CUR) != 1234 ||
	    lseek(52, 0, SEEK_CUR) != 3)
		zdtm_fail("offsets %ld %ld %ld", (long)lseek(50, 0, SEEK_CUR),
			  (long)lseek(51, 0, SEEK_CUR), (long)lseek(52, 0, SEEK_CUR));
	if ((fcntl(50, F_GETFL) & O_ACCMODE) != O_RDWR || (fcntl(51, F_GETFL) & O_ACCMODE) != O_RDONLY)
		zdtm_fail("access modes changed");
	static unsigned char got[N + 1];
	long bad = -1;
	if (pread(51, got, N + 1, 0) != N || (bad = zdtm_mismatch(got, N, 0, 7)) >= 0)
		zdtm_fail("contents differ (at %ld)", bad);
	char hello[8] = { 0 };
	if (pread(52, hello, 8, 0) != 5 || strcmp(hello, "hello"))
		zdtm_fail("plain memfd holds %s", hello);
	if (pwrite(50, "Z", 1, 0) != 1 || pread(51, got, 1, 0) != 1 || got[0] != 'Z')
		zdtm_fail("fd 50 and 51 are no longer one memfd");
	if (ftruncate(50, N * 2) == 0 || errno != EPERM)
		zdtm_fail("F_SEAL_GROW lost: ftruncate grew the memfd");
	zdtm_pass();
}
