/*
 * shared_anon: a MAP_SHARED|MAP_ANONYMOUS region shared with a forked child. Before "ready",
 * the parent fills the first half and the child the second. After SIGUSR2 the parent checks
 * both halves, then proves the pages are still shared both ways: it posts a token, the child
 * (polling the region) answers with the token plus one.
 */
#include "zdtm.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define LEN (1UL << 20)
#define HALF (LEN / 2)

struct ctl { volatile unsigned long child_ready, token, answer; };

static void child(unsigned char *mem, struct ctl *c)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	zdtm_fill(mem + HALF, HALF, HALF, 23);
	c->child_ready = 1;
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	while (!c->token)
		nanosleep(&ts, NULL);
	/* Answer only if the parent's half looks right from here too. */
	c->answer = zdtm_mismatch(mem, HALF, 0, 21) < 0 ? c->token + 1 : 0xbad;
	_exit(0);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	unsigned char *mem = mmap(NULL, LEN + 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		zdtm_die("mmap shared");
	struct ctl *c = (struct ctl *)(mem + LEN);
	zdtm_fill(mem, HALF, 0, 21);
	pid_t pid = fork();
	if (pid < 0)
		zdtm_die("fork");
	if (pid == 0)
		child(mem, c);
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	while (!c->child_ready)
		nanosleep(&ts, NULL);
	zdtm_ready();
	zdtm_wait();

	long bad = zdtm_mismatch(mem, HALF, 0, 21);
	if (bad >= 0)
		zdtm_fail("parent's half: byte %ld is %#x", bad, mem[bad]);
	bad = zdtm_mismatch(mem + HALF, HALF, HALF, 23);
	if (bad >= 0)
		zdtm_fail("child's half: byte %ld is %#x", HALF + bad, mem[HALF + bad]);
	c->token = 0x1234;
	for (int i = 0; i < 1000 && !c->answer; i++)
		nanosleep(&ts, NULL);
	if (c->answer != 0x1235)
		zdtm_fail("child answered %#lx, want 0x1235 (region not shared any more?)", c->answer);
	int status;
	if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		zdtm_fail("child ended with status %#x", status);
	zdtm_pass();
}
