/*
 * personality: execution domain flags set with personality(2) (ADDR_NO_RANDOMIZE and
 * ADDR_COMPAT_LAYOUT: they only steer later exec/mmap layout choices). Check: the same
 * flags come back from personality(0xffffffff).
 */
#include "zdtm.h"
#include <sys/personality.h>

#define WANT (ADDR_NO_RANDOMIZE | ADDR_COMPAT_LAYOUT)

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	if (personality(WANT) == -1)
		zdtm_die("personality");
	if (personality(0xffffffff) != WANT)
		zdtm_die("personality did not take");
	zdtm_ready();
	zdtm_wait();

	int now = personality(0xffffffff);
	if (now != WANT)
		zdtm_fail("personality %#x, want %#x", now, WANT);
	zdtm_pass();
}
