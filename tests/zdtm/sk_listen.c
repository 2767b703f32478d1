/*
 * sk_listen: listening sockets.
 *   fd 10: TCP on 127.0.0.1 (port chosen by the kernel), SO_REUSEADDR, backlog 7
 *   fd 11: unix stream bound to the relative path "zdtm.sock" (in the scratch dir), mode 0600
 *   fd 12: unix seqpacket bound to an abstract name
 * After the move each still listens at the same address with the same options: the program
 * connects to itself through each, accepts, and exchanges a byte both ways.
 */
#include "zdtm.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

enum { TCP = 10, UPATH = 11, UABS = 12 };
#define PATH "zdtm.sock"

static void listen_at(int fd, int type, const struct sockaddr *a, socklen_t len, int backlog)
{
	int s = socket(a->sa_family, type, 0), one = 1;
	if (s < 0 || dup2(s, fd) < 0)
		zdtm_die("socket");
	close(s);
	if (a->sa_family == AF_INET && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)))
		zdtm_die("SO_REUSEADDR");
	if (bind(fd, a, len) || listen(fd, backlog))
		zdtm_die("bind/listen");
}

static socklen_t abstract_name(struct sockaddr_un *u)
{
	memset(u, 0, sizeof(*u));
	u->sun_family = AF_UNIX;
	int n = snprintf(u->sun_path + 1, sizeof(u->sun_path) - 1, "zdtm-sk-listen-%d", (int)getpid());
	return offsetof(struct sockaddr_un, sun_path) + 1 + n;
}

/* Connect a new socket to the listener's own address, accept it, talk both ways. */
static void talk(int lfd, int type, const char *what)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof(a);
	if (getsockname(lfd, (struct sockaddr *)&a, &len))
		zdtm_fail("%s: getsockname: %s", what, strerror(errno));
	int c = socket(a.ss_family, type, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, len))
		zdtm_fail("%s: connect to its own address: %s", what, strerror(errno));
	int s = accept(lfd, NULL, NULL);
	char b = 0;
	if (s < 0 || send(c, "a", 1, 0) != 1 || recv(s, &b, 1, 0) != 1 || b != 'a' ||
	    send(s, "b", 1, 0) != 1 || recv(c, &b, 1, 0) != 1 || b != 'b')
		zdtm_fail("%s: no byte exchanged (%s)", what, strerror(errno));
	close(s);
	close(c);
}

static int sockopt(int fd, int opt)
{
	int v = -1;
	socklen_t len = sizeof(v);
	getsockopt(fd, SOL_SOCKET, opt, &v, &len);
	return v;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	struct sockaddr_in in = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	struct sockaddr_un path = { .sun_family = AF_UNIX }, abs;
	strcpy(path.sun_path, PATH);
	unlink(PATH);
	listen_at(TCP, SOCK_STREAM, (struct sockaddr *)&in, sizeof(in), 7);
	listen_at(UPATH, SOCK_STREAM, (struct sockaddr *)&path, sizeof(path), 3);
	if (chmod(PATH, 0600))
		zdtm_die("chmod");
	socklen_t alen = abstract_name(&abs);
	listen_at(UABS, SOCK_SEQPACKET, (struct sockaddr *)&abs, alen, 2);
	struct sockaddr_in before;
	socklen_t blen = sizeof(before);
	getsockname(TCP, (struct sockaddr *)&before, &blen);
	zdtm_ready();
	zdtm_wait();

	struct sockaddr_in now;
	socklen_t nlen = sizeof(now);
	if (getsockname(TCP, (struct sockaddr *)&now, &nlen) || now.sin_port != before.sin_port ||
	    now.sin_addr.s_addr != before.sin_addr.s_addr)
		zdtm_fail("TCP listener is not at 127.0.0.1:%d any more", ntohs(before.sin_port));
	if (!sockopt(TCP, SO_ACCEPTCONN) || !sockopt(UPATH, SO_ACCEPTCONN) || !sockopt(UABS, SO_ACCEPTCONN))
		zdtm_fail("a socket is no longer listening");
	if (!sockopt(TCP, SO_REUSEADDR))
		zdtm_fail("TCP listener lost SO_REUSEADDR");
	if (sockopt(UABS, SO_TYPE) != SOCK_SEQPACKET)
		zdtm_fail("abstract listener is type %d, want seqpacket", sockopt(UABS, SO_TYPE));
	struct stat st;
	if (stat(PATH, &st) || !S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != 0600)
		zdtm_fail("%s is not a socket file with mode 0600 (mode %o)", PATH, st.st_mode);
	struct sockaddr_un got;
	socklen_t glen = sizeof(got);
	if (getsockname(UPATH, (struct sockaddr *)&got, &glen) || strcmp(got.sun_path, PATH))
		zdtm_fail("unix listener is bound to %s, want %s", got.sun_path, PATH);
	talk(TCP, SOCK_STREAM, "TCP 127.0.0.1");
	talk(UPATH, SOCK_STREAM, "unix " PATH);
	talk(UABS, SOCK_SEQPACKET, "unix abstract");
	zdtm_pass();
}
