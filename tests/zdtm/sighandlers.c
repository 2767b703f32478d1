/*
 * sighandlers: signal dispositions and masks.
 *   SIGUSR1  handler with SA_SIGINFO|SA_RESTART, sa_mask {SIGINT, SIGQUIT}
 *   SIGHUP   handler with SA_RESETHAND|SA_NODEFER (a stray SIGHUP resets it: the negative test)
 *   SIGTERM  ignored
 *   SIGPWR, SIGURG blocked; SIGPWR also pending (raised while blocked)
 */
#include "zdtm.h"

static volatile int usr1_signo, usr1_code, usr1_masked;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	sigset_t now;
	(void)sig; (void)uc;
	usr1_signo = si->si_signo;
	usr1_code = si->si_code;
	sigprocmask(SIG_BLOCK, NULL, &now);
	usr1_masked = sigismember(&now, SIGINT) && sigismember(&now, SIGQUIT) && sigismember(&now, SIGUSR1);
}

static void on_hup(int sig) { (void)sig; }

static void check_action(int sig, void *handler, int flags, const int *mask, const char *name)
{
	struct sigaction cur;
	if (sigaction(sig, NULL, &cur))
		zdtm_fail("sigaction(%s): %s", name, strerror(errno));
	void *got = (cur.sa_flags & SA_SIGINFO) ? (void *)cur.sa_sigaction : (void *)cur.sa_handler;
	if (got != handler)
		zdtm_fail("%s handler is %p, want %p", name, got, handler);
	int want_flags = flags, got_flags = cur.sa_flags & ~0x04000000;	/* SA_RESTORER is libc's */
	if (got_flags != want_flags)
		zdtm_fail("%s flags %#x, want %#x", name, got_flags, want_flags);
	for (int s = 1; s < 32; s++) {
		int want = 0;
		for (const int *m = mask; m && *m; m++)
			want |= *m == s;
		if (sigismember(&cur.sa_mask, s) != want)
			zdtm_fail("%s sa_mask: signal %d is %s", name, s, want ? "missing" : "extra");
	}
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	static const int usr1_mask[] = { SIGINT, SIGQUIT, 0 };
	struct sigaction a = { .sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO | SA_RESTART };
	sigemptyset(&a.sa_mask);
	sigaddset(&a.sa_mask, SIGINT);
	sigaddset(&a.sa_mask, SIGQUIT);
	struct sigaction h = { .sa_handler = on_hup, .sa_flags = SA_RESETHAND | SA_NODEFER };
	sigemptyset(&h.sa_mask);
	struct sigaction ign = { .sa_handler = SIG_IGN };
	sigemptyset(&ign.sa_mask);
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGPWR);
	sigaddset(&block, SIGURG);
	if (sigaction(SIGUSR1, &a, NULL) || sigaction(SIGHUP, &h, NULL) ||
	    sigaction(SIGTERM, &ign, NULL) || sigprocmask(SIG_BLOCK, &block, NULL) || raise(SIGPWR))
		zdtm_die("signal setup");
	zdtm_ready();
	zdtm_wait();

	check_action(SIGUSR1, (void *)on_usr1, SA_SIGINFO | SA_RESTART, usr1_mask, "SIGUSR1");
	check_action(SIGHUP, (void *)on_hup, SA_RESETHAND | SA_NODEFER, NULL, "SIGHUP");
	check_action(SIGTERM, (void *)SIG_IGN, 0, NULL, "SIGTERM");
	sigset_t cur, pend;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	sigpending(&pend);
	for (int s = 1; s < 32; s++) {
		if (sigismember(&cur, s) != (s == SIGPWR || s == SIGURG))
			zdtm_fail("blocked mask: signal %d is %s", s, sigismember(&cur, s) ? "extra" : "missing");
		if (sigismember(&pend, s) != (s == SIGPWR))
			zdtm_fail("pending set: signal %d is %s", s, sigismember(&pend, s) ? "extra" : "missing");
	}
	raise(SIGTERM);		/* ignored: we live on */
	raise(SIGUSR1);
	if (usr1_signo != SIGUSR1 || usr1_code != SI_TKILL || !usr1_masked)
		zdtm_fail("SIGUSR1 handler saw signo %d code %d mask-ok %d", usr1_signo, usr1_code, usr1_masked);
	zdtm_pass();
}
