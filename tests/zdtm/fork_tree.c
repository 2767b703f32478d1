/*
 * fork_tree: a parent with 2 children in its process group and session. On the check the
 * parent signals its group (ignoring the signal itself); each child verifies its group and
 * session against its parent's and exits with 40+i if they match. The parent must still be
 * able to wait() for both children, and see each exit normally with its code.
 */
#include "zdtm.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static volatile sig_atomic_t told;
static void on_term(int sig) { (void)sig; told = 1; }

static void child(int i, int ready_fd)
{
	struct sigaction sa = { .sa_handler = on_term };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGUSR2, SIG_DFL);
	if (write(ready_fd, "c", 1) != 1)
		_exit(3);
	close(ready_fd);
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (!told)
		nanosleep(&ts, NULL);
	pid_t pp = getppid();
	int same = pp != 1 && getpgrp() == getpgid(pp) && getsid(0) == getsid(pp);
	_exit((same ? 40 : 50) + i);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	if (getpgrp() != getpid())	/* kill(0) below must reach only our own group */
		zdtm_die("must be started as a process group leader");
	int p[2];
	char buf[2];
	if (pipe(p))
		zdtm_die("pipe");
	for (int i = 0; i < 2; i++) {
		pid_t pid = fork();
		if (pid < 0)
			zdtm_die("fork");
		if (pid == 0) {
			close(p[0]);
			child(i, p[1]);
		}
	}
	close(p[1]);
	if (read(p[0], buf, 1) != 1 || read(p[0], buf + 1, 1) != 1)
		zdtm_die("children not ready");
	close(p[0]);
	signal(SIGTERM, SIG_IGN);
	zdtm_ready();
	zdtm_wait();

	if (getpgrp() != getpid())
		zdtm_fail("no longer the leader of its process group (pgrp %d, pid %d)", getpgrp(), getpid());
	if (kill(0, SIGTERM))
		zdtm_fail("kill(0, SIGTERM): %s", strerror(errno));
	int seen = 0;
	for (int n = 0; n < 2; n++) {
		int st;
		pid_t pid = wait(&st);
		if (pid < 0)
			zdtm_fail("wait #%d: %s (children lost?)", n, strerror(errno));
		if (!WIFEXITED(st))
			zdtm_fail("child %d did not exit normally (status %#x)", pid, st);
		int code = WEXITSTATUS(st);
		if (code != 40 && code != 41)
			zdtm_fail("child %d exited %d (50+i: wrong group/session)", pid, code);
		seen |= 1 << (code - 40);
	}
	if (seen != 3)
		zdtm_fail("the same child exited twice?");
	if (wait(NULL) != -1 || errno != ECHILD)
		zdtm_fail("a third child appeared");
	zdtm_pass();
}
