/* sleeping: a plain process in a nanosleep loop; its stack and data must survive unchanged. */
#include "zdtm.h"

static unsigned long data_words[512] = { 1 };	/* .data */
static unsigned long bss_words[4096];		/* .bss */

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	unsigned char stack[8192];
	zdtm_fill(stack, sizeof(stack), 0, 3);
	for (int i = 0; i < 512; i++)
		data_words[i] = 0x1111111111111111UL * (i % 15 + 1);
	for (int i = 0; i < 4096; i += 7)
		bss_words[i] = ~(unsigned long)i;
	pid_t sid = getsid(0);
	zdtm_ready();

	unsigned long naps = 0;
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (!zdtm_check_now) {
		nanosleep(&ts, NULL);
		naps++;
	}

	long bad = zdtm_mismatch(stack, sizeof(stack), 0, 3);
	if (bad >= 0)
		zdtm_fail("stack byte %ld changed", bad);
	for (int i = 0; i < 512; i++)
		if (data_words[i] != 0x1111111111111111UL * (i % 15 + 1))
			zdtm_fail("data word %d is %#lx", i, data_words[i]);
	for (int i = 0; i < 4096; i++)
		if (bss_words[i] != (i % 7 ? 0 : ~(unsigned long)i))
			zdtm_fail("bss word %d is %#lx", i, bss_words[i]);
	if (getsid(0) != getpid() || getpgrp() != getpid())
		zdtm_fail("not a session and group leader any more: sid %d pgrp %d pid %d (sid was %d)",
			  getsid(0), getpgrp(), getpid(), sid);
	if (naps == 0)
		zdtm_fail("never slept");
	zdtm_pass();
}
