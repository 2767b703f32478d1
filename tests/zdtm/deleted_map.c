/*
 * deleted_map: a 16-page file mapped MAP_PRIVATE (whole), MAP_SHARED (whole) and MAP_SHARED
 * again (pages 4-7), then closed and unlinked. Pages 0-1 of the private map are written
 * (copied on write), pages 2-3 of the shared map (written into the file, so the private map's
 * untouched pages 2-3 show them too). A forked child keeps the maps. After the move: the maps
 * hold those bytes, /proc/self/maps still says "(deleted)" for them, the shared maps are of
 * one file (a write through one shows in the other) and shared with the child.
 */
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define NAME "mapped.dat"
#define PG 4096UL
#define PAGES 16
#define LEN (PAGES * PG)
#define CTL (LEN - PG)          /* last page of the shared map: the child's mailbox */

struct ctl { volatile unsigned long child_ready, token, answer; };

static void child(unsigned char *shr, struct ctl *c)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	c->child_ready = 1;
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	while (!c->token)
		nanosleep(&ts, NULL);
	c->answer = zdtm_mismatch(shr + 2 * PG, 2 * PG, 0, 35) < 0 ? c->token + 1 : 0xbad;
	_exit(0);
}

/* The line of /proc/self/maps starting at `addr` ends with " (deleted)". */
static int shown_deleted(void *addr)
{
	char want[32], line[4096];
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	FILE *f = fopen("/proc/self/maps", "r");
	int found = 0;
	while (f && fgets(line, sizeof(line), f)) {
		if (strncmp(line, want, strlen(want)))
			continue;
		line[strcspn(line, "\n")] = 0;
		size_t n = strlen(line);
		found = n > 10 && !strcmp(line + n - 10, " (deleted)") && strstr(line, NAME);
	}
	if (f)
		fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	static unsigned char buf[LEN];
	zdtm_fill(buf, LEN, 0, 31);
	int fd = open(NAME, O_RDWR | O_CREAT | O_TRUNC, 0640);
	if (fd < 0 || write(fd, buf, LEN) != (ssize_t)LEN)
		zdtm_die("create " NAME);
	unsigned char *priv = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	unsigned char *shr = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	unsigned char *shr2 = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4 * PG);
	if (priv == MAP_FAILED || shr == MAP_FAILED || shr2 == MAP_FAILED)
		zdtm_die("mmap " NAME);
	if (close(fd) || unlink(NAME))
		zdtm_die("close/unlink " NAME);
	zdtm_fill(priv, 2 * PG, 0, 33);
	zdtm_fill(shr + 2 * PG, 2 * PG, 0, 35);
	memset(shr + CTL, 0, PG);
	struct ctl *c = (struct ctl *)(shr + CTL);
	pid_t pid = fork();
	if (pid < 0)
		zdtm_die("fork");
	if (pid == 0)
		child(shr, c);
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	while (!c->child_ready)
		nanosleep(&ts, NULL);
	zdtm_ready();
	zdtm_wait();

	long bad;
	if ((bad = zdtm_mismatch(priv, 2 * PG, 0, 33)) >= 0)
		zdtm_fail("private map, written page: byte %ld is %#x", bad, priv[bad]);
	if ((bad = zdtm_mismatch(priv + 2 * PG, 2 * PG, 0, 35)) >= 0)
		zdtm_fail("private map, page the shared map wrote: byte %ld is %#x", bad, priv[2 * PG + bad]);
	if ((bad = zdtm_mismatch(priv + 4 * PG, CTL - 4 * PG, 4 * PG, 31)) >= 0)
		zdtm_fail("private map, file page: byte %ld is %#x", 4 * PG + bad, priv[4 * PG + bad]);
	if ((bad = zdtm_mismatch(shr, 2 * PG, 0, 31)) >= 0)
		zdtm_fail("shared map: byte %ld is %#x", bad, shr[bad]);
	if ((bad = zdtm_mismatch(shr + 2 * PG, 2 * PG, 0, 35)) >= 0)
		zdtm_fail("shared map, written page: byte %ld is %#x", 2 * PG + bad, shr[2 * PG + bad]);
	if ((bad = zdtm_mismatch(shr + 4 * PG, CTL - 4 * PG, 4 * PG, 31)) >= 0)
		zdtm_fail("shared map: byte %ld is %#x", 4 * PG + bad, shr[4 * PG + bad]);
	if (!shown_deleted(priv) || !shown_deleted(shr))
		zdtm_fail("/proc/self/maps does not show " NAME " (deleted) for both maps");
	if (access(NAME, F_OK) == 0)
		zdtm_fail("%s exists again", NAME);
	/* one file under both shared maps: a write through one shows in the other */
	shr[5 * PG] ^= 0xff;
	if (shr2[PG] != shr[5 * PG])
		zdtm_fail("the two shared maps are of different files now");
	c->token = 0x4321;
	for (int i = 0; i < 1000 && !c->answer; i++)
		nanosleep(&ts, NULL);
	if (c->answer != 0x4322)
		zdtm_fail("child answered %#lx, want 0x4322 (map not shared any more?)", c->answer);
	int status;
	if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		zdtm_fail("child ended with status %#x", status);
	zdtm_pass();
}
