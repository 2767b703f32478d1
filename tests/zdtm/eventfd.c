/*
 * eventfd: a counter eventfd holding 12345 (non-blocking) and a semaphore eventfd holding 3.
 * After SIGUSR2 the counter must read 12345 once and the semaphore 1 three times.
 */
#include "zdtm.h"
#include <stdint.h>
#include <sys/eventfd.h>

#define COUNT 12345

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int cnt = eventfd(0, EFD_NONBLOCK), sem = eventfd(0, EFD_NONBLOCK | EFD_SEMAPHORE);
	uint64_t v = COUNT;
	if (cnt < 0 || sem < 0 || write(cnt, &v, 8) != 8)
		zdtm_die("eventfd");
	v = 3;
	if (write(sem, &v, 8) != 8)
		zdtm_die("eventfd write");
	zdtm_ready();
	zdtm_wait();

	if (!(fcntl(cnt, F_GETFL) & O_NONBLOCK) || !(fcntl(sem, F_GETFL) & O_NONBLOCK))
		zdtm_fail("eventfds lost O_NONBLOCK");
	if (read(cnt, &v, 8) != 8 || v != COUNT)
		zdtm_fail("counter read %llu, want %d", (unsigned long long)v, COUNT);
	if (read(cnt, &v, 8) != -1 || errno != EAGAIN)
		zdtm_fail("counter not empty after one read");
	for (int i = 0; i < 3; i++)
		if (read(sem, &v, 8) != 8 || v != 1)
			zdtm_fail("semaphore read %d gave %llu, want 1 (not a semaphore any more?)", i,
				  (unsigned long long)v);
	if (read(sem, &v, 8) != -1 || errno != EAGAIN)
		zdtm_fail("semaphore not empty after 3 reads");
	zdtm_pass();
}
