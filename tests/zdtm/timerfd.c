/*
 * timerfd: a periodic 50 ms CLOCK_MONOTONIC timerfd (fd 40); a one-shot 1 ms timer (41) that
 * expired once and was never read; an absolute CLOCK_REALTIME one-shot 1000 s ahead (42); a
 * disarmed one (43, non-blocking). After SIGUSR2: the periodic timer has at most one tick per
 * 50 ms since "ready" (+2) and keeps ticking; 41 reads exactly 1; 42 is still absolute and
 * due at the same wall-clock time (±5 s); 43 is still disarmed and non-blocking.
 */
#include "zdtm.h"
#include <poll.h>
#include <stdint.h>
#include <sys/timerfd.h>

static void make(int want, int clock, int flags, int setflags, long vsec, long vnsec, long insec)
{
	int fd = timerfd_create(clock, flags);
	struct itimerspec its = { .it_interval = { 0, insec }, .it_value = { vsec, vnsec } };
	if (fd < 0 || timerfd_settime(fd, setflags, &its, NULL) || dup2(fd, want) != want || close(fd))
		zdtm_die("timerfd");
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	struct timespec rt;
	clock_gettime(CLOCK_REALTIME, &rt);
	long due = rt.tv_sec + 1000;
	make(40, CLOCK_MONOTONIC, 0, 0, 0, 50000000, 50000000);
	make(41, CLOCK_MONOTONIC, 0, 0, 0, 1000000, 0);
	make(42, CLOCK_REALTIME, 0, TFD_TIMER_ABSTIME, due, 0, 0);
	make(43, CLOCK_MONOTONIC, TFD_NONBLOCK, 0, 0, 0, 0);
	uint64_t n;
	if (read(40, &n, 8) != 8)             /* it runs */
		zdtm_die("read periodic");
	struct timespec ms10 = { 0, 10000000 };
	nanosleep(&ms10, NULL);                 /* 41 expires, unread */
	double t0 = now();
	zdtm_ready();
	zdtm_wait();

	double elapsed = now() - t0;
	struct pollfd p = { .fd = 40, .events = POLLIN };
	uint64_t ticks = 0;
	if (poll(&p, 1, 0) == 1 && read(40, &ticks, 8) != 8)
		zdtm_fail("read periodic after the move: %s", strerror(errno));
	if (ticks > elapsed / 0.05 + 2)
		zdtm_fail("%llu ticks in %.3f s: a jump", (unsigned long long)ticks, elapsed);
	if (poll(&p, 1, 500) != 1 || read(40, &ticks, 8) != 8 || ticks < 1)
		zdtm_fail("the periodic timer stopped ticking");
	struct itimerspec its;
	if (timerfd_gettime(40, &its) || its.it_interval.tv_nsec != 50000000 || its.it_interval.tv_sec)
		zdtm_fail("period is %ld.%09ld, want 0.05", (long)its.it_interval.tv_sec,
			  its.it_interval.tv_nsec);
	p.fd = 41;
	if (poll(&p, 1, 0) != 1 || read(41, &ticks, 8) != 8 || ticks != 1)
		zdtm_fail("the unread one-shot expiration was lost");
	if (timerfd_gettime(42, &its))
		zdtm_fail("timerfd_gettime: %s", strerror(errno));
	clock_gettime(CLOCK_REALTIME, &rt);
	long left = its.it_value.tv_sec, want = due - rt.tv_sec;
	if (left < want - 5 || left > want + 5)
		zdtm_fail("absolute timer has %ld s left, want %ld", left, want);
	if (timerfd_gettime(43, &its) || its.it_value.tv_sec || its.it_value.tv_nsec)
		zdtm_fail("the disarmed timer is armed");
	if (!(fcntl(43, F_GETFL) & O_NONBLOCK) || read(43, &ticks, 8) != -1 || errno != EAGAIN)
		zdtm_fail("the disarmed timer lost O_NONBLOCK or reads");
	zdtm_pass();
}
