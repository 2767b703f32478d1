/*
 * cwd_umask: per-process fs state and limits: working directory (a subdirectory), umask 027,
 * and RLIMIT_NOFILE's soft limit lowered to 200 (hard limit unchanged).
 */
#include "zdtm.h"
#include <limits.h>
#include <sys/resource.h>
#include <sys/stat.h>

#define SOFT 200

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	char want_cwd[PATH_MAX], cwd[PATH_MAX];
	struct rlimit orig, rl;
	if (mkdir("cwd_umask.d", 0755) && errno != EEXIST)
		zdtm_die("mkdir");
	if (chdir("cwd_umask.d") || !getcwd(want_cwd, sizeof(want_cwd)) || getrlimit(RLIMIT_NOFILE, &orig))
		zdtm_die("chdir");
	umask(027);
	rl = orig;
	rl.rlim_cur = SOFT;
	if (setrlimit(RLIMIT_NOFILE, &rl))
		zdtm_die("setrlimit");
	zdtm_ready();
	zdtm_wait();

	if (!getcwd(cwd, sizeof(cwd)))
		zdtm_fail("getcwd: %s", strerror(errno));
	if (strcmp(cwd, want_cwd))
		zdtm_fail("cwd is %s, want %s", cwd, want_cwd);
	mode_t m = umask(022);
	if (m != 027)
		zdtm_fail("umask is %03o, want 027", (unsigned)m);
	if (getrlimit(RLIMIT_NOFILE, &rl))
		zdtm_fail("getrlimit: %s", strerror(errno));
	if (rl.rlim_cur != SOFT || rl.rlim_max != orig.rlim_max)
		zdtm_fail("RLIMIT_NOFILE is %llu/%llu, want %d/%llu", (unsigned long long)rl.rlim_cur,
			  (unsigned long long)rl.rlim_max, SOFT, (unsigned long long)orig.rlim_max);
	/* The limit is enforced, not just reported. */
	if (fcntl(0, F_DUPFD, SOFT) != -1 || errno != EINVAL)
		zdtm_fail("F_DUPFD at %d succeeded despite the limit", SOFT);
	zdtm_pass();
}
