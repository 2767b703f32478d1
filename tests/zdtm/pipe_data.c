/* pipe_data: a pipe with 1000 known bytes buffered and both ends open in this process. */
#include "zdtm.h"
#include <sys/ioctl.h>

#define LEN 1000
enum { RD = 10, WR = 11 };	/* fixed numbers, easy to find in the tree */

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int p[2];
	unsigned char buf[LEN + 1];
	if (pipe(p) || dup2(p[0], RD) < 0 || dup2(p[1], WR) < 0)
		zdtm_die("pipe");
	close(p[0]);
	close(p[1]);
	zdtm_fill(buf, LEN, 0, 7);
	if (write(WR, buf, LEN) != LEN)
		zdtm_die("write pipe");
	zdtm_ready();
	zdtm_wait();

	if ((fcntl(RD, F_GETFL) & O_ACCMODE) != O_RDONLY || (fcntl(WR, F_GETFL) & O_ACCMODE) != O_WRONLY)
		zdtm_fail("pipe ends have flags %#x/%#x", fcntl(RD, F_GETFL), fcntl(WR, F_GETFL));
	int queued = -1;
	if (ioctl(RD, FIONREAD, &queued) || queued != LEN)
		zdtm_fail("pipe holds %d bytes, want %d", queued, LEN);
	if (fcntl(RD, F_SETFL, O_NONBLOCK))
		zdtm_fail("F_SETFL: %s", strerror(errno));
	memset(buf, 0, sizeof(buf));
	ssize_t got = read(RD, buf, sizeof(buf));
	if (got != LEN)
		zdtm_fail("read %zd bytes from the pipe, want %d", got, LEN);
	long bad = zdtm_mismatch(buf, LEN, 0, 7);
	if (bad >= 0)
		zdtm_fail("pipe byte %ld is %#x", bad, buf[bad]);
	/* Both ends still connected: what we write now comes back. */
	if (write(WR, "x", 1) != 1 || read(RD, buf, 2) != 1 || buf[0] != 'x')
		zdtm_fail("pipe ends are no longer connected");
	zdtm_pass();
}
