/*
 * mmap_pattern: a 64 MiB private anonymous region (3 of every 4 pages written, the rest never
 * touched and so zero), a private file mapping with two copied-on-write pages, and a guard
 * page (PROT_NONE) between two writable pages. Contents, protections and the untouched file
 * must all be as left.
 */
#include "zdtm.h"
#include <sys/mman.h>

#define ANON (64UL << 20)
#define PG 4096UL
#define FPAGES 16
#define NAME "mmap_pattern.dat"

static unsigned char *anon, *fmap, *guard;

/* The permission string /proc/self/maps shows for the mapping that contains `addr`. */
static int perms_of(void *addr, char out[5])
{
	FILE *f = fopen("/proc/self/maps", "r");
	unsigned long lo, hi, a = (unsigned long)addr;
	char line[512];
	int found = 0;
	while (f && !found && fgets(line, sizeof(line), f))
		found = sscanf(line, "%lx-%lx %4s", &lo, &hi, out) == 3 && lo <= a && a < hi;
	if (f)
		fclose(f);
	return found;
}

static void expect_perms(void *addr, const char *want, const char *what)
{
	char got[5] = "";
	if (!perms_of(addr, got) || strcmp(got, want))
		zdtm_fail("%s at %p has perms '%s', want '%s'", what, addr, got, want);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	anon = mmap(NULL, ANON, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	guard = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED || guard == MAP_FAILED || mprotect(guard + PG, PG, PROT_NONE))
		zdtm_die("mmap anon");
	for (unsigned long pg = 0; pg < ANON / PG; pg++)
		if (pg % 4 != 3)
			zdtm_fill(anon + pg * PG, PG, pg * PG, 5);
	guard[0] = 0x5a;
	guard[2 * PG] = 0xa5;

	unsigned char page[PG];
	int fd = open(NAME, O_RDWR | O_CREAT | O_TRUNC, 0644);
	for (int i = 0; fd >= 0 && i < FPAGES; i++) {
		zdtm_fill(page, PG, i * PG, 9);
		if (write(fd, page, PG) != (ssize_t)PG)
			zdtm_die("write " NAME);
	}
	fmap = mmap(NULL, FPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (fd < 0 || fmap == MAP_FAILED || close(fd))
		zdtm_die("map " NAME);
	memset(fmap + 1 * PG, 0x11, PG);	/* copied on write: the file keeps the pattern */
	memset(fmap + 5 * PG + 100, 0x55, 200);
	zdtm_ready();
	zdtm_wait();

	for (unsigned long pg = 0; pg < ANON / PG; pg++) {
		unsigned char *p = anon + pg * PG;
		if (pg % 4 != 3) {
			long bad = zdtm_mismatch(p, PG, pg * PG, 5);
			if (bad >= 0)
				zdtm_fail("anon byte %#lx is %#x", pg * PG + bad, p[bad]);
		} else {
			for (unsigned long i = 0; i < PG; i++)
				if (p[i])
					zdtm_fail("untouched anon byte %#lx is %#x", pg * PG + i, p[i]);
		}
	}
	for (int i = 0; i < FPAGES; i++) {
		unsigned char *p = fmap + i * PG;
		zdtm_fill(page, PG, i * PG, 9);
		if (i == 1)
			memset(page, 0x11, PG);
		if (i == 5)
			memset(page + 100, 0x55, 200);
		for (unsigned long j = 0; j < PG; j++)
			if (p[j] != page[j])
				zdtm_fail("file mapping byte %#lx is %#x, want %#x", i * PG + j, p[j], page[j]);
	}
	fd = open(NAME, O_RDONLY);
	for (int i = 0; fd >= 0 && i < FPAGES; i++)
		if (read(fd, page, PG) != (ssize_t)PG || zdtm_mismatch(page, PG, i * PG, 9) >= 0)
			zdtm_fail("%s page %d changed on disk", NAME, i);
	if (guard[0] != 0x5a || guard[2 * PG] != 0xa5)
		zdtm_fail("pages around the guard hold %#x/%#x", guard[0], guard[2 * PG]);
	expect_perms(anon, "rw-p", "anon region");
	expect_perms(fmap, "rw-p", "file mapping");
	expect_perms(guard, "rw-p", "page below the guard");
	expect_perms(guard + PG, "---p", "guard page");
	expect_perms(guard + 2 * PG, "rw-p", "page above the guard");
	zdtm_pass();
}
