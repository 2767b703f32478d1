/*
 * itimer: a periodic ITIMER_REAL (every 10 ms) counted by a SIGALRM handler. After SIGUSR2 the
 * interval must be unchanged, the next expiry due within one interval, and ticks keep coming.
 */
#include "zdtm.h"
#include <sys/time.h>

#define TICK_US 10000

static volatile unsigned long ticks;

static void on_alarm(int sig) { (void)sig; ticks++; }

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART };
	sigemptyset(&sa.sa_mask);
	struct itimerval it = { { 0, TICK_US }, { 0, TICK_US } };
	if (sigaction(SIGALRM, &sa, NULL) || setitimer(ITIMER_REAL, &it, NULL))
		zdtm_die("setitimer");
	zdtm_ready();
	zdtm_wait();

	struct itimerval cur;
	if (getitimer(ITIMER_REAL, &cur))
		zdtm_fail("getitimer: %s", strerror(errno));
	if (cur.it_interval.tv_sec != 0 || cur.it_interval.tv_usec != TICK_US)
		zdtm_fail("interval is %ld.%06ld s, want 0.%06d", (long)cur.it_interval.tv_sec,
			  (long)cur.it_interval.tv_usec, TICK_US);
	long left = cur.it_value.tv_sec * 1000000L + cur.it_value.tv_usec;
	if (left <= 0 || left > TICK_US)
		zdtm_fail("next expiry in %ld us, want 1..%d", left, TICK_US);
	unsigned long before = ticks;
	struct timespec ts = { 0, 200 * 1000 * 1000 };
	while (nanosleep(&ts, &ts))	/* resume after each tick */
		;
	unsigned long got = ticks - before;
	if (got < 5 || got > 40)
		zdtm_fail("%lu ticks in 200 ms, want about 20", got);
	zdtm_pass();
}
