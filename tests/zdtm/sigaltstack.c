/*
 * sigaltstack: an alternate signal stack and a SIGUSR1 handler installed with SA_ONSTACK.
 * After SIGUSR2 the alternate stack must be unchanged, and SIGUSR1 must run on it.
 */
#include "zdtm.h"
#include <stdint.h>

#define ALT_SIZE (64 * 1024)

static unsigned char alt[ALT_SIZE] __attribute__((aligned(16)));
static volatile uintptr_t handler_sp;
static volatile int handler_flags = -1;

static void on_usr1(int sig)
{
	stack_t now;
	volatile char here;
	(void)sig;
	handler_sp = (uintptr_t)&here;
	if (sigaltstack(NULL, &now) == 0)
		handler_flags = now.ss_flags;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	stack_t ss = { .ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = 0 };
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_ONSTACK };
	sigemptyset(&sa.sa_mask);
	if (sigaltstack(&ss, NULL) || sigaction(SIGUSR1, &sa, NULL))
		zdtm_die("sigaltstack/sigaction");
	zdtm_ready();
	zdtm_wait();

	stack_t now;
	if (sigaltstack(NULL, &now))
		zdtm_fail("sigaltstack query: %s", strerror(errno));
	if (now.ss_sp != alt || now.ss_size != ALT_SIZE || now.ss_flags != 0)
		zdtm_fail("alt stack is %p+%zu flags %#x, want %p+%d flags 0",
			  now.ss_sp, now.ss_size, now.ss_flags, (void *)alt, ALT_SIZE);
	struct sigaction cur;
	if (sigaction(SIGUSR1, NULL, &cur) || cur.sa_handler != on_usr1 || !(cur.sa_flags & SA_ONSTACK))
		zdtm_fail("SIGUSR1 action lost SA_ONSTACK (flags %#x)", cur.sa_flags);
	raise(SIGUSR1);
	uintptr_t lo = (uintptr_t)alt, hi = lo + ALT_SIZE;
	if (handler_sp < lo || handler_sp >= hi)
		zdtm_fail("SIGUSR1 handler ran at %#lx, outside the alt stack %#lx-%#lx",
			  (unsigned long)handler_sp, (unsigned long)lo, (unsigned long)hi);
	if (handler_flags != SS_ONSTACK)
		zdtm_fail("inside the handler ss_flags is %#x, want SS_ONSTACK", handler_flags);
	zdtm_pass();
}
