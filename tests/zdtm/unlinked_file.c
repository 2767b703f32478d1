/*
 * unlinked_file: a file opened O_RDWR, filled with 10000 known bytes, left at offset 5000 and
 * then unlinked. Contents, size, offset and the "deleted" state must survive.
 */
#include "zdtm.h"
#include <sys/stat.h>

#define NAME "unlinked.dat"
#define SIZE 10000
#define POS 5000

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	unsigned char buf[SIZE];
	zdtm_fill(buf, SIZE, 0, 17);
	int fd = open(NAME, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, buf, SIZE) != SIZE || lseek(fd, POS, SEEK_SET) != POS || unlink(NAME))
		zdtm_die("create/unlink " NAME);
	zdtm_ready();
	zdtm_wait();

	struct stat st;
	if (fstat(fd, &st))
		zdtm_fail("fstat: %s", strerror(errno));
	if (st.st_nlink != 0)
		zdtm_fail("file has %lu links, want 0 (unlinked)", (unsigned long)st.st_nlink);
	if (st.st_size != SIZE)
		zdtm_fail("size %lld, want %d", (long long)st.st_size, SIZE);
	if ((fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDWR)
		zdtm_fail("flags %#x, want O_RDWR", fcntl(fd, F_GETFL));
	off_t pos = lseek(fd, 0, SEEK_CUR);
	if (pos != POS)
		zdtm_fail("offset %lld, want %d", (long long)pos, POS);
	memset(buf, 0, SIZE);
	if (pread(fd, buf, SIZE, 0) != SIZE)
		zdtm_fail("short read");
	long bad = zdtm_mismatch(buf, SIZE, 0, 17);
	if (bad >= 0)
		zdtm_fail("byte %ld is %#x", bad, buf[bad]);
	char link[4096], path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	link[n > 0 ? n : 0] = 0;
	if (n < 10 || strcmp(link + n - 10, " (deleted)"))
		zdtm_fail("fd link is '%s', want a deleted file", link);
	if (access(NAME, F_OK) == 0)
		zdtm_fail("%s exists again", NAME);
	zdtm_pass();
}
