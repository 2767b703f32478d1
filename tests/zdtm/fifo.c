/*
 * fifo: a named FIFO with 777 known bytes queued, its read and write ends open here.
 */
#include "zdtm.h"
#include <sys/ioctl.h>
#include <sys/stat.h>

#define NAME "zdtm.fifo"
#define LEN 777

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	unsigned char buf[LEN + 1];
	if (mkfifo(NAME, 0600) && errno != EEXIST)
		zdtm_die("mkfifo");
	int rd = open(NAME, O_RDONLY | O_NONBLOCK);	/* a reader first, so the writer opens */
	int wr = open(NAME, O_WRONLY);
	zdtm_fill(buf, LEN, 0, 19);
	if (rd < 0 || wr < 0 || write(wr, buf, LEN) != LEN)
		zdtm_die("fifo");
	zdtm_ready();
	zdtm_wait();

	struct stat st, byname;
	if (fstat(rd, &st) || !S_ISFIFO(st.st_mode) || stat(NAME, &byname) ||
	    st.st_ino != byname.st_ino || st.st_dev != byname.st_dev)
		zdtm_fail("read end is not the FIFO %s any more", NAME);
	if ((fcntl(rd, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) != (O_RDONLY | O_NONBLOCK) ||
	    (fcntl(wr, F_GETFL) & O_ACCMODE) != O_WRONLY)
		zdtm_fail("fifo flags %#x/%#x", fcntl(rd, F_GETFL), fcntl(wr, F_GETFL));
	int queued = -1;
	if (ioctl(rd, FIONREAD, &queued) || queued != LEN)
		zdtm_fail("fifo holds %d bytes, want %d", queued, LEN);
	ssize_t got = read(rd, buf, sizeof(buf));
	if (got != LEN)
		zdtm_fail("read %zd bytes, want %d", got, LEN);
	long bad = zdtm_mismatch(buf, LEN, 0, 19);
	if (bad >= 0)
		zdtm_fail("fifo byte %ld is %#x", bad, buf[bad]);
	if (write(wr, "q", 1) != 1 || read(rd, buf, 2) != 1 || buf[0] != 'q')
		zdtm_fail("fifo ends no longer connected");
	zdtm_pass();
}
