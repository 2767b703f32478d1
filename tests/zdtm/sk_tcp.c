/*
 * sk_tcp: an established TCP connection over 127.0.0.1, both ends here (fds 10 and 11),
 * with 5000 bytes waiting on 11 and 300 on 10, and TCP_NODELAY on 10. The listener is
 * closed: the connection alone must survive (TCP_REPAIR, or the original itself on one host).
 */
#include "zdtm.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

enum { C = 10, S = 11 };

static void put(int fd, size_t len, unsigned seed)
{
	unsigned char buf[8192];
	zdtm_fill(buf, len, 0, seed);
	if (send(fd, buf, len, 0) != (ssize_t)len)
		zdtm_die("send");
}

static void expect(int fd, size_t len, unsigned seed, const char *what)
{
	unsigned char buf[8192];
	size_t got = 0;
	while (got < len) {
		ssize_t n = recv(fd, buf + got, len - got, 0);
		if (n <= 0)
			zdtm_fail("%s: %zu of %zu bytes, then %s", what, got, len,
				  n ? strerror(errno) : "end of stream");
		got += n;
	}
	long bad = zdtm_mismatch(buf, len, 0, seed);
	if (bad >= 0)
		zdtm_fail("%s: byte %ld is %#x", what, bad, buf[bad]);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) ||
	    getsockname(l, (struct sockaddr *)&a, &len))
		zdtm_die("listen");
	int c = socket(AF_INET, SOCK_STREAM, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)) || dup2(c, C) < 0)
		zdtm_die("connect");
	int s = accept(l, NULL, NULL);
	if (s < 0 || dup2(s, S) < 0)
		zdtm_die("accept");
	close(c);
	close(s);
	close(l);
	if (setsockopt(C, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)))
		zdtm_die("TCP_NODELAY");
	put(C, 5000, 3);
	put(S, 300, 4);
	usleep(100 * 1000);	/* acknowledged: nothing left in flight */
	zdtm_ready();
	zdtm_wait();

	int n = -1;
	if (ioctl(S, FIONREAD, &n) || n != 5000)
		zdtm_fail("end 11 holds %d bytes, want 5000", n);
	expect(S, 5000, 3, "end 11");
	expect(C, 300, 4, "end 10");
	int v = 0;
	len = sizeof(v);
	if (getsockopt(C, IPPROTO_TCP, TCP_NODELAY, &v, &len) || !v)
		zdtm_fail("end 10 lost TCP_NODELAY");
	put(C, 2000, 5);
	expect(S, 2000, 5, "end 11 after the move");
	put(S, 7, 6);
	expect(C, 7, 6, "end 10 after the move");
	zdtm_pass();
}
