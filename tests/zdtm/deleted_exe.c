/*
 * deleted_exe: the program copies its own binary to "exe-copy" in its directory, re-executes
 * the copy (argv[3] = "copy") and the copy unlinks itself before "ready": the process runs a
 * deleted executable. After the move /proc/self/exe still names "exe-copy (deleted)", reads
 * as the same program (size and ELF magic), the text map shows "(deleted)", and the program
 * keeps running code from it (this check is that code).
 */
#include "zdtm.h"
#include <limits.h>
#include <sys/stat.h>

#define COPY "exe-copy"

static void copy_self(const char *to)
{
	int in = open("/proc/self/exe", O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0755);
	if (in < 0 || out < 0)
		zdtm_die("open self/copy");
	char buf[65536];
	ssize_t n;
	while ((n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, n) != n)
			zdtm_die("write copy");
	if (n < 0 || close(in) || close(out))
		zdtm_die("copy self");
}

/* Some line of /proc/self/maps names the copy as deleted and is executable. */
static int text_map_deleted(void)
{
	char line[4096];
	FILE *f = fopen("/proc/self/maps", "r");
	int found = 0;
	while (f && fgets(line, sizeof(line), f)) {
		char perms[8] = "";
		sscanf(line, "%*s %7s", perms);
		if (perms[2] == 'x' && strstr(line, "/" COPY " (deleted)"))
			found = 1;
	}
	if (f)
		fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	if (argc < 4) {
		char path[PATH_MAX];
		if (!getcwd(path, sizeof(path) - sizeof(COPY) - 1))
			zdtm_die("getcwd");
		strcat(path, "/" COPY);
		copy_self(path);
		execl(path, path, argv[1], argv[2], "copy", (char *)NULL);
		zdtm_die("exec copy");
	}
	struct stat before;
	if (stat(argv[0], &before) || unlink(argv[0]))
		zdtm_die("stat/unlink the copy");
	zdtm_ready();
	zdtm_wait();

	char link[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", link, sizeof(link) - 1);
	link[n > 0 ? n : 0] = 0;
	char want[PATH_MAX + 16];
	snprintf(want, sizeof(want), "%s (deleted)", argv[0]);
	if (strcmp(link, want))
		zdtm_fail("/proc/self/exe is '%s', want '%s'", link, want);
	if (access(argv[0], F_OK) == 0)
		zdtm_fail("%s exists again", argv[0]);
	struct stat now;
	if (stat("/proc/self/exe", &now))
		zdtm_fail("stat /proc/self/exe: %s", strerror(errno));
	if (now.st_size != before.st_size || now.st_nlink != 0)
		zdtm_fail("exe is %lld bytes with %lu links, want %lld with 0", (long long)now.st_size,
			  (unsigned long)now.st_nlink, (long long)before.st_size);
	if ((now.st_mode & 0777) != (before.st_mode & 0777))
		zdtm_fail("exe mode %o, want %o", now.st_mode & 0777, before.st_mode & 0777);
	char magic[4] = "";
	int fd = open("/proc/self/exe", O_RDONLY);
	if (fd < 0 || read(fd, magic, 4) != 4 || memcmp(magic, "\177ELF", 4))
		zdtm_fail("/proc/self/exe does not read as an ELF file");
	close(fd);
	if (!text_map_deleted())
		zdtm_fail("no executable map of " COPY " (deleted) in /proc/self/maps");
	zdtm_pass();
}
