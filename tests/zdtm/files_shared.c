/*
 * files_shared: a child made with clone(CLONE_FILES) shares its parent's descriptor table
 * (not its memory). Before "ready" the parent puts a pipe end at fd 61. On the check the
 * parent puts another at fd 60 and signals its process group (the child; pids may change
 * in a move), which must see fd 60 (made after the move, by the other task) and closes
 * fd 61, then exits 40 (50: fd 60 missing). The parent then must find fd 61 gone: one
 * table for both, in both directions.
 */
#include "zdtm.h"
#include <sched.h>
#include <sys/wait.h>

#define STACK (256 * 1024)

static volatile sig_atomic_t told;
static void on_term(int sig) { (void)sig; told = 1; }

static int child(void *arg)
{
	(void)arg;
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (!told)
		nanosleep(&ts, NULL);
	int seen = fcntl(60, F_GETFD) != -1;
	close(61);
	return seen ? 40 : 50;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int p[2];
	if (pipe(p) || dup2(p[1], 61) != 61)
		zdtm_die("pipe");
	struct sigaction sa = { .sa_handler = on_term };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTERM, &sa, NULL))   /* inherited by the child (its own copy) */
		zdtm_die("sigaction");
	char *stack = malloc(STACK);
	if (!stack)
		zdtm_die("malloc");
	if (getpgrp() != getpid())	/* kill(0) below must reach only our own group */
		zdtm_die("must be started as a process group leader");
	pid_t pid = clone(child, stack + STACK, CLONE_FILES | SIGCHLD, NULL);
	if (pid < 0)
		zdtm_die("clone");
	signal(SIGTERM, SIG_IGN);
	zdtm_ready();
	zdtm_wait();

	if (fcntl(61, F_GETFD) == -1)
		zdtm_fail("fd 61 is gone before the child closed it");
	if (dup2(p[0], 60) != 60)
		zdtm_fail("dup2: %s", strerror(errno));
	if (kill(0, SIGTERM))
		zdtm_fail("kill(0, SIGTERM): %s", strerror(errno));
	int st;
	if (wait(&st) < 0)
		zdtm_fail("wait: %s (child lost?)", strerror(errno));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 40)
		zdtm_fail("child status %#x (exit 50: it did not see fd 60 made by the parent)", st);
	if (fcntl(61, F_GETFD) != -1 || errno != EBADF)
		zdtm_fail("fd 61 still open here after the child closed it: two tables");
	zdtm_pass();
}
