/*
 * signalfd: SIGUSR1 and SIGHUP blocked; a non-blocking signalfd (fd 30) for both; SIGUSR1 is
 * queued with sigqueue (value 4242) before the move. After SIGUSR2 the signalfd reads that
 * SIGUSR1 with its value, then nothing; a SIGHUP sent after the move is read through it too
 * (the mask came back).
 */
#include "zdtm.h"
#include <sys/signalfd.h>

#define SFD 30

static int next_signal(struct signalfd_siginfo *si)
{
	ssize_t n = read(SFD, si, sizeof(*si));
	if (n == sizeof(*si))
		return (int)si->ssi_signo;
	if (n < 0 && errno == EAGAIN)
		return 0;
	zdtm_fail("read signalfd: %zd (%s)", n, strerror(errno));
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGHUP);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		zdtm_die("sigprocmask");
	int fd = signalfd(-1, &set, SFD_NONBLOCK);
	if (fd < 0 || dup2(fd, SFD) != SFD || close(fd))
		zdtm_die("signalfd");
	union sigval v = { .sival_int = 4242 };
	if (sigqueue(getpid(), SIGUSR1, v))
		zdtm_die("sigqueue");
	zdtm_ready();
	zdtm_wait();

	if (!(fcntl(SFD, F_GETFL) & O_NONBLOCK))
		zdtm_fail("signalfd lost O_NONBLOCK");
	struct signalfd_siginfo si;
	int sig = next_signal(&si);
	if (sig != SIGUSR1 || si.ssi_int != 4242)
		zdtm_fail("read signal %d value %d, want SIGUSR1 value 4242", sig, si.ssi_int);
	if ((sig = next_signal(&si)) != 0)
		zdtm_fail("a second signal %d was pending", sig);
	if (kill(getpid(), SIGHUP))
		zdtm_fail("kill: %s", strerror(errno));
	if ((sig = next_signal(&si)) != SIGHUP)
		zdtm_fail("after SIGHUP the signalfd read %d (mask lost?)", sig);
	zdtm_pass();
}
