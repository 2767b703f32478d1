/*
 * memfd_map: a memfd "zdtm-mapped" (fd 80, 3 pages, offset 100) mapped MAP_SHARED and
 * MAP_PRIVATE (page 0 of the private map written: copied on write), and a memfd
 * "only-mapped" (2 pages) mapped MAP_SHARED whose descriptor was closed. After the move:
 * the contents are back in every map, the fd and its maps are one memfd again (writes
 * through the fd or the shared map are seen by the other, same inode; the private map's
 * written page stays its own; a tree saves whole chunks of it, so its untouched pages are
 * copies after the move and are not checked against later writes), and the map without
 * descriptor still shows /memfd:only-mapped (deleted).
 */
#define _GNU_SOURCE
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/stat.h>

#define PG 4096UL
#define FD 80

/* The inode /proc/self/maps gives the map at `addr` (0: none); its path into `path`. */
static unsigned long map_inode(void *addr, char *path, size_t size)
{
	char want[32], line[4096];
	unsigned long ino = 0;
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	FILE *f = fopen("/proc/self/maps", "r");
	path[0] = 0;
	while (f && fgets(line, sizeof(line), f)) {
		if (strncmp(line, want, strlen(want)))
			continue;
		line[strcspn(line, "\n")] = 0;
		int at = 0;
		if (sscanf(line, "%*s %*s %*s %*s %lu %n", &ino, &at) < 1)
			ino = 0;
		snprintf(path, size, "%s", line + at);
	}
	if (f)
		fclose(f);
	return ino;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	static unsigned char buf[3 * PG];
	zdtm_fill(buf, 3 * PG, 0, 51);
	int fd = memfd_create("zdtm-mapped", 0);
	if (fd < 0 || dup2(fd, FD) != FD || close(fd))
		zdtm_die("memfd_create");
	if (write(FD, buf, 3 * PG) != (ssize_t)(3 * PG) || lseek(FD, 100, SEEK_SET) != 100)
		zdtm_die("fill memfd");
	unsigned char *map = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, FD, 0);
	unsigned char *priv = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, FD, 0);
	if (priv == MAP_FAILED)
		zdtm_die("mmap private");
	zdtm_fill(priv, PG, 0, 57);
	int only = memfd_create("only-mapped", 0);
	if (map == MAP_FAILED || only < 0 || ftruncate(only, 2 * PG))
		zdtm_die("mmap / second memfd");
	unsigned char *omap = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, only, 0);
	if (omap == MAP_FAILED || close(only))
		zdtm_die("mmap only-mapped");
	zdtm_fill(omap, 2 * PG, 0, 53);
	map[PG] ^= 0x5a;
	zdtm_ready();
	zdtm_wait();

	long bad;
	if ((bad = zdtm_mismatch(map, PG, 0, 51)) >= 0)
		zdtm_fail("memfd map: byte %ld is %#x", bad, map[bad]);
	if (map[PG] != (zdtm_byte(PG, 51) ^ 0x5a))
		zdtm_fail("the byte written through the map before the move is lost");
	if ((bad = zdtm_mismatch(omap, 2 * PG, 0, 53)) >= 0)
		zdtm_fail("only-mapped memfd: byte %ld is %#x", bad, omap[bad]);
	if (lseek(FD, 0, SEEK_CUR) != 100)
		zdtm_fail("fd offset is %ld, want 100", (long)lseek(FD, 0, SEEK_CUR));
	unsigned char b = 0;
	if (pread(FD, &b, 1, PG) != 1 || b != map[PG])
		zdtm_fail("fd reads %#x at page 1, the map holds %#x", b, map[PG]);
	if ((bad = zdtm_mismatch(priv, PG, 0, 57)) >= 0)
		zdtm_fail("private map, written page: byte %ld is %#x", bad, priv[bad]);
	if ((bad = zdtm_mismatch(priv + 2 * PG, PG, 2 * PG, 51)) >= 0)
		zdtm_fail("private map, memfd page: byte %ld is %#x", 2 * PG + bad, priv[2 * PG + bad]);
	if (pwrite(FD, "\x7e", 1, 2 * PG + 7) != 1 || map[2 * PG + 7] != 0x7e)
		zdtm_fail("a write through the fd is not seen in the map");
	if (pwrite(FD, "\x7f", 1, 5) != 1 || priv[5] == 0x7f)
		zdtm_fail("the private map's written page follows the memfd again");
	map[9] = 'M';
	if (pread(FD, &b, 1, 9) != 1 || b != 'M')
		zdtm_fail("a write into the map is not read through the fd");
	char path[512];
	struct stat s;
	unsigned long ino = map_inode(map, path, sizeof(path));
	if (fstat(FD, &s) || s.st_ino != ino)
		zdtm_fail("fd inode %lu, map inode %lu: two objects", (unsigned long)s.st_ino, ino);
	if (strcmp(path, "/memfd:zdtm-mapped (deleted)"))
		zdtm_fail("memfd map shows %s", path);
	map_inode(omap, path, sizeof(path));
	if (strcmp(path, "/memfd:only-mapped (deleted)"))
		zdtm_fail("only-mapped map shows %s", path);
	zdtm_pass();
}
