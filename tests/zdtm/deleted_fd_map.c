/*
 * deleted_fd_map: a 4-page file opened O_RDWR (fd 70, offset 1000), written, mapped
 * MAP_SHARED, then unlinked while fd 70 stays open. After the move the descriptor and the
 * map are one file again: the contents and offset are back, a write through the fd shows in
 * the map and a write into the map is read through the fd, both /proc/self/maps and the fd
 * link say "(deleted)", and the map's inode (from /proc/self/maps) is the fd's st_ino.
 */
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/stat.h>

#define NAME "both.dat"
#define PG 4096UL
#define LEN (4 * PG)
#define FD 70

/* The inode /proc/self/maps gives the map at `addr`, or 0; `*deleted` says "(deleted)". */
static unsigned long map_inode(void *addr, int *deleted)
{
	char want[32], line[4096];
	unsigned long ino = 0;
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	FILE *f = fopen("/proc/self/maps", "r");
	while (f && fgets(line, sizeof(line), f)) {
		if (strncmp(line, want, strlen(want)))
			continue;
		line[strcspn(line, "\n")] = 0;
		size_t n = strlen(line);
		*deleted = n > 10 && !strcmp(line + n - 10, " (deleted)") && strstr(line, NAME);
		if (sscanf(line, "%*s %*s %*s %*s %lu", &ino) != 1)
			ino = 0;
	}
	if (f)
		fclose(f);
	return ino;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	static unsigned char buf[LEN];
	zdtm_fill(buf, LEN, 0, 41);
	int fd = open(NAME, O_RDWR | O_CREAT | O_TRUNC, 0640);
	if (fd < 0 || dup2(fd, FD) != FD || close(fd))
		zdtm_die("create " NAME);
	if (write(FD, buf, LEN) != (ssize_t)LEN || lseek(FD, 1000, SEEK_SET) != 1000)
		zdtm_die("fill " NAME);
	unsigned char *map = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, FD, 0);
	if (map == MAP_FAILED || unlink(NAME))
		zdtm_die("mmap/unlink " NAME);
	map[PG] ^= 0x5a;        /* one byte changed through the map before the move */
	zdtm_ready();
	zdtm_wait();

	long bad;
	if ((bad = zdtm_mismatch(map, PG, 0, 41)) >= 0)
		zdtm_fail("map: byte %ld is %#x", bad, map[bad]);
	if (map[PG] != (zdtm_byte(PG, 41) ^ 0x5a))
		zdtm_fail("the byte written through the map before the move is lost");
	if (lseek(FD, 0, SEEK_CUR) != 1000)
		zdtm_fail("fd offset is %ld, want 1000", (long)lseek(FD, 0, SEEK_CUR));
	if ((fcntl(FD, F_GETFL) & O_ACCMODE) != O_RDWR)
		zdtm_fail("fd %d is no longer O_RDWR", FD);
	unsigned char b = 0;
	if (pread(FD, &b, 1, PG) != 1 || b != map[PG])
		zdtm_fail("fd reads %#x at page 1, the map holds %#x", b, map[PG]);
	if (pwrite(FD, "\x7e", 1, 2 * PG + 7) != 1 || map[2 * PG + 7] != 0x7e)
		zdtm_fail("a write through the fd is not seen in the map");
	map[3 * PG + 9] = 'M';
	if (pread(FD, &b, 1, 3 * PG + 9) != 1 || b != 'M')
		zdtm_fail("a write into the map is not read through the fd");
	struct stat s;
	int deleted = 0;
	unsigned long ino = map_inode(map, &deleted);
	if (fstat(FD, &s) || s.st_ino != ino)
		zdtm_fail("fd inode %lu, map inode %lu: two files", (unsigned long)s.st_ino, ino);
	if (!deleted || s.st_nlink != 0)
		zdtm_fail("map not shown (deleted) or the file has %lu links", (unsigned long)s.st_nlink);
	char link[256];
	ssize_t n = readlink("/proc/self/fd/70", link, sizeof(link) - 1);
	link[n < 0 ? 0 : n] = 0;
	if (n < 10 || strcmp(link + n - 10, " (deleted)") || !strstr(link, NAME))
		zdtm_fail("fd link is %s", link);
	if (access(NAME, F_OK) == 0)
		zdtm_fail("%s exists again", NAME);
	zdtm_pass();
}
