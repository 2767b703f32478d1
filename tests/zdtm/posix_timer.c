// zdtm-flags: -lrt
/*
 * posix_timer: two POSIX timers.
 *   fast: CLOCK_MONOTONIC, every 20 ms, SIGRTMIN+1 with sival_int 0x5a5a (counted by a handler)
 *   slow: CLOCK_REALTIME, one-shot in 1000 s (must still be armed, with time left counting down)
 */
#include "zdtm.h"

#define FAST_NS (20 * 1000 * 1000L)
#define COOKIE 0x5a5a

static volatile unsigned long ticks, bad_cookie;

static void on_tick(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	if (si->si_code != SI_TIMER || si->si_value.sival_int != COOKIE)
		bad_cookie++;
	ticks++;
}

static timer_t make_timer(clockid_t clock, int sig, int cookie, long interval_ns, time_t first_s)
{
	struct sigevent ev = { .sigev_notify = SIGEV_SIGNAL, .sigev_signo = sig };
	ev.sigev_value.sival_int = cookie;
	timer_t t;
	struct itimerspec its = { { 0, interval_ns }, { first_s, first_s ? 0 : interval_ns } };
	if (timer_create(clock, &ev, &t) || timer_settime(t, 0, &its, NULL))
		zdtm_die("timer_create/settime");
	return t;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	struct sigaction sa = { .sa_sigaction = on_tick, .sa_flags = SA_SIGINFO | SA_RESTART };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGRTMIN + 1, &sa, NULL))
		zdtm_die("sigaction");
	timer_t fast = make_timer(CLOCK_MONOTONIC, SIGRTMIN + 1, COOKIE, FAST_NS, 0);
	timer_t slow = make_timer(CLOCK_REALTIME, SIGRTMIN + 2, 7, 0, 1000);
	zdtm_ready();
	zdtm_wait();

	struct itimerspec f, s;
	if (timer_gettime(fast, &f) || timer_gettime(slow, &s))
		zdtm_fail("timer_gettime: %s (timer ids lost?)", strerror(errno));
	if (f.it_interval.tv_sec || f.it_interval.tv_nsec != FAST_NS)
		zdtm_fail("fast interval %ld.%09ld, want 0.%09ld", (long)f.it_interval.tv_sec,
			  f.it_interval.tv_nsec, FAST_NS);
	if (s.it_interval.tv_sec || s.it_interval.tv_nsec || s.it_value.tv_sec < 900 || s.it_value.tv_sec > 1000)
		zdtm_fail("slow timer has %ld s left (interval %ld), want 900..1000 one-shot",
			  (long)s.it_value.tv_sec, (long)s.it_interval.tv_sec);
	unsigned long before = ticks;
	struct timespec ts = { 0, 300 * 1000 * 1000 };
	while (nanosleep(&ts, &ts))
		;
	unsigned long got = ticks - before;
	if (got < 5 || got > 30)
		zdtm_fail("%lu ticks in 300 ms, want about 15", got);
	if (bad_cookie)
		zdtm_fail("%lu ticks came with a wrong si_code/sival_int", bad_cookie);
	zdtm_pass();
}
