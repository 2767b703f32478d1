/*
 * half_read_file: a file read half-way through an O_RDONLY descriptor, and appended to through
 * an O_WRONLY|O_APPEND one. Offsets, access modes and the contents must be as left.
 */
#include "zdtm.h"
#include <sys/stat.h>

#define NAME "half_read.dat"
#define SIZE 8192
#define RPOS 3000		/* bytes already read through the reader */
#define TAIL 100		/* bytes appended through the appender */

static int check_flags(int fd, int want)
{
	int fl = fcntl(fd, F_GETFL);
	return fl >= 0 && (fl & (O_ACCMODE | O_APPEND | O_NONBLOCK)) == want;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	unsigned char buf[SIZE + TAIL];
	zdtm_fill(buf, sizeof(buf), 0, 11);
	int fd = open(NAME, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, buf, SIZE) != SIZE || close(fd))
		zdtm_die("create " NAME);
	int rd = open(NAME, O_RDONLY);
	int ap = open(NAME, O_WRONLY | O_APPEND);
	if (rd < 0 || ap < 0)
		zdtm_die("open " NAME);
	if (read(rd, buf, RPOS) != RPOS || write(ap, buf + SIZE, TAIL) != TAIL)
		zdtm_die("read/append " NAME);
	zdtm_ready();
	zdtm_wait();

	if (!check_flags(rd, O_RDONLY))
		zdtm_fail("reader flags %#x, want O_RDONLY", fcntl(rd, F_GETFL));
	if (!check_flags(ap, O_WRONLY | O_APPEND))
		zdtm_fail("appender flags %#x, want O_WRONLY|O_APPEND", fcntl(ap, F_GETFL));
	off_t rpos = lseek(rd, 0, SEEK_CUR), apos = lseek(ap, 0, SEEK_CUR);
	if (rpos != RPOS)
		zdtm_fail("reader offset %lld, want %d", (long long)rpos, RPOS);
	if (apos != SIZE + TAIL)
		zdtm_fail("appender offset %lld, want %d", (long long)apos, SIZE + TAIL);
	struct stat st;
	if (fstat(rd, &st) || st.st_size != SIZE + TAIL)
		zdtm_fail("file size %lld, want %d", (long long)st.st_size, SIZE + TAIL);
	ssize_t n = read(rd, buf, sizeof(buf));
	if (n != SIZE + TAIL - RPOS)
		zdtm_fail("read %zd bytes after offset %d, want %d", n, RPOS, SIZE + TAIL - RPOS);
	long bad = zdtm_mismatch(buf, n, RPOS, 11);
	if (bad >= 0)
		zdtm_fail("byte %ld of the file differs", RPOS + bad);
	/* O_APPEND still in force: a write after an lseek lands at the end. */
	if (lseek(ap, 0, SEEK_SET) != 0 || write(ap, "z", 1) != 1 || lseek(ap, 0, SEEK_CUR) != SIZE + TAIL + 1)
		zdtm_fail("append descriptor no longer appends");
	zdtm_pass();
}
