// zdtm-known: cp: the frozen original still holds the terminal as its session's controlling terminal while the copy restores on the same host, so TIOCSCTTY (no stealing) is refused with EPERM
// zdtm-known: rsync: host B has its own devpts: the pty slave (and the keeper holding its master) exist on host A only
/*
 * tty_session: a session leader (the program) whose controlling terminal is a pty slave
 * (fd 0, taken with TIOCSCTTY), and a child in a process group of its own that is the
 * terminal's foreground group. The master is held by a detached keeper process outside the
 * tree (as in tty.c: it also holds a slave, so the terminal lives while the program moves;
 * it exits once RESULT_FILE appears, once no other process has held the terminal for 3 s,
 * or after 120 s). After SIGUSR2:
 * the terminal's session is this one (tcgetsid(0) == getsid(0) == getpid()), its foreground
 * group is the child's own (pids may change: found as the group waitpid(-group) finds our
 * running child in), not ours;
 * then the program creates `intr` and the keeper writes ^C to the master: the SIGINT the
 * terminal generates must kill the child (default action) and not reach the program.
 */
#include "zdtm.h"
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <termios.h>

/* Holds the master; types ^C once `intr` exists. Output of the terminal is drained. */
static void keeper(int master, const char *slave, const char *result, const char *intr)
{
	int keep = open(slave, O_RDWR | O_NOCTTY);
	if (keep < 0)
		_exit(2);
	fcntl(master, F_SETFL, O_NONBLOCK);
	int unheld = 0, typed = 0;
	for (int i = 0; i < 1200 && access(result, F_OK) && unheld < 3; i++) {
		if (i % 10 == 0)
			unheld = held_elsewhere(slave) ? 0 : unheld + 1;
		char buf[64];
		while (read(master, buf, sizeof(buf)) > 0)
			;
		if (!typed && !access(intr, F_OK)) {
			typed = 1;
			if (write(master, "\003", 1) != 1)
				_exit(2);
		}
		usleep(50 * 1000);
	}
	_exit(0);
}

/* The absolute form of `name` (relative to the cwd at start). */
static void absolute(char *out, size_t size, const char *name)
{
	if (name[0] == '/') {
		snprintf(out, size, "%s", name);
		return;
	}
	char cwd[2048];
	if (!getcwd(cwd, sizeof(cwd)))
		zdtm_die("getcwd");
	snprintf(out, size, "%s/%s", cwd, name);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	if (getsid(0) != getpid())
		zdtm_die("not started as a session leader");
	signal(SIGINT, SIG_DFL);     /* a shell's background job starts with SIGINT ignored */
	int master = posix_openpt(O_RDWR | O_NOCTTY);
	if (master < 0 || grantpt(master) || unlockpt(master))
		zdtm_die("posix_openpt");
	char slave[64], result[4096], intr[4096];
	if (ptsname_r(master, slave, sizeof(slave)))
		zdtm_die("ptsname");
	absolute(result, sizeof(result), zdtm_result_path);
	absolute(intr, sizeof(intr), "intr");
	unlink(intr);
	pid_t k = fork();
	if (k == 0) {            /* the keeper: detached, another session, outside the tree */
		setsid();
		if (fork() == 0)
			keeper(master, slave, result, intr);
		_exit(0);
	}
	if (k < 0 || waitpid(k, NULL, 0) != k || close(master))
		zdtm_die("fork keeper");

	int s = open(slave, O_RDWR | O_NOCTTY);
	if (s < 0 || dup2(s, 0) != 0 || close(s))
		zdtm_die("open slave");
	if (ioctl(0, TIOCSCTTY, 0))
		zdtm_die("TIOCSCTTY");
	pid_t child = fork();
	if (child == 0) {
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGKILL);    /* never outlives a failed check */
		if (getppid() == 1)
			_exit(0);
		for (;;)
			pause();
	}
	if (child < 0 || (setpgid(child, child) && errno != EACCES))
		zdtm_die("fork child");
	if (tcsetpgrp(0, child))
		zdtm_die("tcsetpgrp");
	zdtm_ready();
	zdtm_wait();

	if (tcgetsid(0) != getsid(0) || getsid(0) != getpid())
		zdtm_fail("terminal session %d, our session %d, we are %d", tcgetsid(0), getsid(0),
			  getpid());
	/* pids may have changed (and /proc may be another pid namespace's): the foreground
	 * group must be our child's own group, which waitpid(-group) finds by the group */
	pid_t fg = tcgetpgrp(0), got = 0;
	int st = 0;
	if (fg <= 0 || fg == getpgrp())
		zdtm_fail("foreground group %d, want the child's (ours is %d)", fg, getpgrp());
	if (waitpid(-fg, &st, WNOHANG) != 0)
		zdtm_fail("the foreground group %d holds no running child of ours", fg);
	int fd = open(intr, O_WRONLY | O_CREAT, 0644);
	if (fd < 0 || close(fd))
		zdtm_fail("create %s: %s", intr, strerror(errno));
	for (int i = 0; i < 100 && got == 0; i++) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		got = waitpid(-fg, &st, WNOHANG);
		if (got == 0)
			nanosleep(&ts, NULL);
	}
	if (got != fg)
		zdtm_fail("the child did not end after ^C (waitpid %d: %s)", got, strerror(errno));
	if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGINT)
		zdtm_fail("the child ended with status %#x, not by the terminal's SIGINT", st);
	zdtm_pass();
}
