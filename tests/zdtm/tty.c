/*
 * tty: the slave of a pseudo-terminal (fd 60, O_RDWR, and fd 61 a dup) whose master is held
 * by a detached keeper process outside the tree (it also holds a slave, so the terminal lives
 * while the program moves; it exits once RESULT_FILE appears, once no other process has held
 * the terminal for 3 s, or after 120 s). After SIGUSR2:
 * fd 60 is still that terminal (same /dev/pts path, isatty, termios as set: no echo, raw), and
 * a line written to it comes back through the master (the keeper echoes it to fd 60 reversed).
 */
#include "zdtm.h"
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>

static void keeper(int master, const char *slave, const char *result)
{
	int keep = open(slave, O_RDWR | O_NOCTTY);   /* the terminal outlives the program's fds */
	if (keep < 0)
		_exit(2);
	fcntl(master, F_SETFL, O_NONBLOCK);
	int unheld = 0;          /* seconds no one else held the terminal (3: the test is over) */
	for (int i = 0; i < 1200 && access(result, F_OK) && unheld < 3; i++) {
		if (i % 10 == 0)
			unheld = held_elsewhere(slave) ? 0 : unheld + 1;
		char buf[64];
		ssize_t n = read(master, buf, sizeof(buf));
		for (ssize_t a = 0, b = n - 2; n > 1 && a < b; a++, b--) {  /* keep the newline */
			char c = buf[a]; buf[a] = buf[b]; buf[b] = c;
		}
		if (n > 0 && write(master, buf, n) != n)
			_exit(2);
		usleep(100 * 1000);
	}
	_exit(0);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int master = posix_openpt(O_RDWR | O_NOCTTY);
	if (master < 0 || grantpt(master) || unlockpt(master))
		zdtm_die("posix_openpt");
	char slave[64];
	if (ptsname_r(master, slave, sizeof(slave)))
		zdtm_die("ptsname");
	int s = open(slave, O_RDWR | O_NOCTTY);
	if (s < 0 || dup2(s, 60) != 60 || dup2(s, 61) != 61 || close(s))
		zdtm_die("open slave");
	struct termios tio;
	if (tcgetattr(60, &tio))
		zdtm_die("tcgetattr");
	cfmakeraw(&tio);
	if (tcsetattr(60, TCSANOW, &tio))
		zdtm_die("tcsetattr");
	char result[4096];
	if (!realpath(".", result) || strlen(result) + strlen(zdtm_result_path) + 2 > sizeof(result))
		zdtm_die("realpath");
	if (zdtm_result_path[0] == '/')
		snprintf(result, sizeof(result), "%s", zdtm_result_path);
	else
		strcat(strcat(result, "/"), zdtm_result_path);
	pid_t child = fork();
	if (child == 0) {
		setsid();
		if (fork() == 0)
			keeper(master, slave, result);
		_exit(0);
	}
	if (child < 0 || waitpid(child, NULL, 0) != child || close(master))
		zdtm_die("fork keeper");
	zdtm_ready();
	zdtm_wait();

	char link[64] = { 0 };
	if (readlink("/proc/self/fd/60", link, sizeof(link) - 1) < 0 || strcmp(link, slave))
		zdtm_fail("fd 60 is %s, want %s", link, slave);
	if (!isatty(60) || !isatty(61))
		zdtm_fail("fd 60/61 are no terminals");
	if (tcgetattr(61, &tio) || (tio.c_lflag & (ECHO | ICANON)))
		zdtm_fail("the terminal lost its raw mode");
	if (write(60, "abc\n", 4) != 4)
		zdtm_fail("write to the terminal: %s", strerror(errno));
	char got[8] = { 0 };
	size_t have = 0;
	for (int i = 0; i < 50 && have < 4; i++) {    /* raw mode: bytes come as they arrive */
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		fcntl(60, F_SETFL, O_NONBLOCK);
		ssize_t n = read(60, got + have, 4 - have);
		if (n > 0)
			have += n;
		else
			nanosleep(&ts, NULL);
	}
	if (have != 4 || memcmp(got, "cba\n", 4))
		zdtm_fail("the keeper answered %zu bytes '%.4s', want 'cba\\n'", have, got);
	zdtm_pass();
}
